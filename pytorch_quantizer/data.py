"""ImageNet validation data: standard class indices, ImageFolder loading, deterministic subsets, an in-memory cache.

Typical use (the cache keeps uint8 crops, so cached and uncached inputs are bit-identical)::

    dataset = deterministic_subset(imagenet_val_dataset(root, preprocess.decode_transform()), n=1000, seed=0)
    dataset = CachedDataset(dataset, transform=preprocess.normalize_transform(), workers=2)
    loader = make_loader(dataset, batch_size=50, workers=2)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

DEFAULT_CACHE_BYTES = 2 * 1024**3  # ~14k uint8 crops of 224x224
# Passes over the same images cache them when the uint8 crops take at most this share of the available memory: the
# 50,000 ImageNet val images at 224x224 take 50,000 x 150,528 B = 7.5 GB, so they are cached with 15 GB available.
CACHE_MEMORY_FRACTION = 0.5


class DataError(ValueError):
    """Data that cannot be used as asked: missing folders, wrong layout, unreadable images.

    A DataError raised in a DataLoader worker comes back in the main process wrapped with the worker's traceback;
    ``str()`` then still gives only the original one-line message, so the CLI can print it as is.
    """

    def __str__(self) -> str:
        text = super().__str__()
        marker = f"{type(self).__name__}: "
        if "\n" in text and marker in text:
            return text.rsplit(marker, 1)[1].strip()
        return text


def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids; position == standard class index (sorted order)."""
    text = resources.files("pytorch_quantizer").joinpath("imagenet_wnids.txt").read_text(encoding="utf-8")
    return tuple(text.split())


def _load_rgb(path: str) -> Image.Image:
    """Open an image as RGB; an unreadable file stops the run with a one-line DataError naming it."""
    try:
        with open(path, "rb") as file:
            return Image.open(file).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"cannot read image {path} ({reason}); remove or replace it") from exc


class ImageNetVal(ImageFolder):
    """ImageFolder whose wnid-named class folders map to the standard ImageNet-1k indices.

    Targets are right even when only some classes are present; ``classes`` lists all 1000 wnids so that
    ``classes[target]`` names any target.
    """

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], Any] | None = None) -> None:
        self._wnids = imagenet_wnids()
        super().__init__(str(root), transform=transform, loader=_load_rgb, allow_empty=True)
        self.classes = list(self._wnids)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        """Present wnid folders and their standard indices; other folders are an error (listed)."""
        index = {wnid: i for i, wnid in enumerate(self._wnids)}
        folders = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        unknown = [name for name in folders if name not in index]
        if unknown:
            shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            raise DataError(f"{len(unknown)} folders in {directory} are not ImageNet wnids ({shown}); expected "
                            f"ImageFolder layout {directory}/<wnid>/*.JPEG with wnids such as n01440764")
        return folders, {name: index[name] for name in folders}


def imagenet_val_dataset(data_dir: str | Path, transform: Callable[[Image.Image], Any] | None = None) -> ImageNetVal:
    """The images of ``data_dir/val`` (ImageFolder layout, wnid folders) with standard ImageNet-1k targets.

    Every problem with the layout is a one-line DataError. An unreadable or corrupt image also stops the run (with a
    DataError naming the file, when it is loaded) instead of being skipped: an accuracy is only comparable with
    other runs and reference numbers when it covers the same fixed set of images, and a skipped image would change
    that set silently (and differently for runs with different subsets). Fixing or removing the file is a one-time
    step for the user.
    """
    root = _directory(data_dir, "data directory")
    val = root / "val"
    if not val.is_dir():
        raise DataError(f"no val/ folder in {root}; expected {val}/<wnid>/*.JPEG (ImageFolder layout)")
    return wnid_folder_dataset(val, transform)


def wnid_folder_dataset(folder: str | Path, transform: Callable[[Image.Image], Any] | None = None,
                        what: str = "data directory") -> ImageNetVal:
    """The images of ``folder/<wnid>/*`` with standard ImageNet-1k targets: a ``val`` folder, an ImageNet ``train``
    folder, or any folder of wnid-named class folders (``--cal-data``).  Layout problems are one-line DataErrors."""
    folder = _directory(folder, what)
    entries = [e for e in os.scandir(folder) if not e.name.startswith(".")]
    if not any(e.is_dir() for e in entries):
        if any(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS) for e in entries):
            raise DataError(f"{folder} holds images directly; sort them into one folder per class, "
                            f"{folder}/<wnid>/*.JPEG (ImageFolder layout)")
        raise DataError(f"{folder} has no class folders; expected {folder}/<wnid>/*.JPEG (ImageFolder layout)")
    dataset = ImageNetVal(folder, transform=transform)
    if not dataset.samples:
        raise DataError(f"no images ({', '.join(IMG_EXTENSIONS[:3])}, ...) in the class folders of {folder}")
    return dataset


def _directory(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise DataError(f"{what} {path} is not a directory")
    return path


def relative_paths(dataset: ImageNetVal) -> list[str]:
    """Each image as ``<wnid>/<file>`` (the dataset's order): how statistics name the images they were collected
    on, so that evaluation can leave them out wherever the folder is mounted."""
    root = Path(dataset.root)
    return [Path(path).relative_to(root).as_posix() for path, _ in dataset.samples]


def deterministic_subset(dataset: Dataset, n: int, seed: int = 0) -> Subset:
    """``n`` images drawn with ``seed``, kept in dataset order; the same (n, seed) always gives the same images.

    Indices are drawn once in the main process, so worker count does not matter, and a smaller ``n`` with the same
    seed gives a prefix-subset of a larger one. Asking for more images than there are uses all of them with a
    warning rather than failing, so one command works on both the 1000-image sample and the full 50k set.
    """
    total = len(dataset)  # type: ignore[arg-type]
    if n <= 0:
        raise DataError(f"the number of images must be positive, got {n}")
    if n >= total:
        if n > total:
            warnings.warn(f"asked for {n} images but the dataset has {total}; using all {total}", stacklevel=2)
        return Subset(dataset, list(range(total)))
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(total, generator=generator)[:n]
    return Subset(dataset, sorted(chosen.tolist()))


def seeded_order(total: int, seed: int) -> list[int]:
    """The one permutation of ``total`` images by ``seed`` that a run's calibration images are taken from the front
    of and its evaluation images from the end of (``Session``; ``benchmarks/bench_peer.py`` picks the same images
    for a peer library through these functions)."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()


def seeded_calibration(total: int, size: int, seed: int) -> list[int]:
    """``-cs size --seed seed``'s calibration images of a folder of ``total``: the front of ``seeded_order``, in
    folder order.  More than the folder holds is an error (a calibration set is never silently smaller)."""
    if size > total:
        raise DataError(f"-cs {size} asks for more calibration images than the {total} of the folder")
    return sorted(seeded_order(total, seed)[:size])


def seeded_evaluation(total: int, seed: int, held_out: set[int], subset: int | None) -> list[int]:
    """The evaluation images of a folder of ``total``: all but ``held_out``, or the last ``subset`` of them in
    ``seeded_order`` (so ``-cs N --subset M`` give the same images in every release), in folder order."""
    pool = [i for i in seeded_order(total, seed) if i not in held_out]
    if subset is not None:
        pool = pool[max(len(pool) - subset, 0):]
    return sorted(pool)


class CachedDataset(Dataset):
    """Decodes every item of ``dataset`` once and keeps it in memory, then applies ``transform`` on access.

    An evaluation runs many passes (FP32, int8 ... int4) over the same images and JPEG decoding dominates on a few
    cores; decoding once makes later passes cheap. Pair it with ``Preprocess.decode_transform`` (uint8 crops, 4x
    smaller than float) and ``transform=Preprocess.normalize_transform()``. Filling uses ``workers`` processes.
    The cache refuses (DataError) to grow beyond ``max_bytes``, estimated from the first item before decoding all.
    """

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any] | None = None, workers: int = 0,
                 max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.transform = transform
        total = len(dataset)  # type: ignore[arg-type]
        self.items: list[tuple[torch.Tensor, int]] = []
        if total == 0:
            return
        estimate = _nbytes(dataset[0][0]) * total
        if estimate > max_bytes:
            raise DataError(f"caching {total} images needs about {estimate / 2**20:.0f} MiB, over the "
                            f"{max_bytes / 2**20:.0f} MiB limit; use fewer images, a larger limit, or no cache")
        loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers)
        for image, target in loader:
            # clone: release the worker's shared-memory block instead of holding one per image
            self.items.append((image.clone() if workers > 0 else image, int(target)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, target = self.items[index]
        return (self.transform(image) if self.transform is not None else image), target


def available_memory() -> int:
    """Bytes of memory available to new allocations: Linux's MemAvailable (free memory plus reclaimable page cache),
    elsewhere the free pages ``os.sysconf`` reports (an underestimate: caching is then only less eager)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cache_budget(fraction: float = CACHE_MEMORY_FRACTION) -> int:
    """The most bytes a decoded-image cache may take: ``fraction`` of the memory available now."""
    return int(fraction * available_memory())


def cache_bytes(dataset: Dataset) -> int:
    """Estimated bytes of ``dataset`` cached (its first decoded item times its length; crops share one size)."""
    total = len(dataset)  # type: ignore[arg-type]
    return _nbytes(dataset[0][0]) * total if total else 0


def _nbytes(item: Any) -> int:
    """Bytes held by a cached image (a tensor); refuses other types because the bound could not be kept."""
    if not isinstance(item, torch.Tensor):
        raise DataError(f"CachedDataset needs tensor images (use Preprocess.decode_transform()), got {type(item)}")
    return item.element_size() * item.nelement()


def make_loader(dataset: Dataset, batch_size: int, workers: int = 0) -> DataLoader:
    """Batches in dataset order (no shuffle), so every pass and every run sees the images in the same order.

    A CachedDataset is read in the main process (its items are already decoded; worker processes would only copy
    them). Workers persist across passes; memory is pinned only when CUDA is available.
    """
    if batch_size <= 0:
        raise DataError(f"batch size must be positive, got {batch_size}")
    if workers < 0:
        raise DataError(f"number of workers must be >= 0, got {workers}")
    if isinstance(dataset, CachedDataset):
        workers = 0
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
