"""ImageNet folder loading, class mapping, subsets, caching and loaders on small synthetic ImageFolders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pytorch_quantizer.data import (
    CachedDataset,
    DataError,
    deterministic_subset,
    imagenet_val_dataset,
    imagenet_wnids,
    make_loader,
)
from pytorch_quantizer.models import Preprocess

SHARED_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
PRE = Preprocess(resize=36, crop=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _write_folder(root: Path, wnids: list[str], per_class: int = 2, seed: int = 0) -> Path:
    """``root/val/<wnid>/*.JPEG`` with small random images."""
    rng = np.random.default_rng(seed)
    for wnid in wnids:
        folder = root / "val" / wnid
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(40 + i, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=90)
    return root


def test_wnids_are_the_standard_sorted_list() -> None:
    wnids = imagenet_wnids()
    assert len(wnids) == len(set(wnids)) == 1000
    assert list(wnids) == sorted(wnids) and wnids[0] == "n01440764"


def test_partial_folder_maps_to_standard_indices(tmp_path: Path) -> None:
    wnids = imagenet_wnids()
    chosen = [wnids[5], wnids[999], wnids[123]]
    dataset = imagenet_val_dataset(_write_folder(tmp_path, chosen), PRE.transform())
    assert sorted(set(dataset.targets)) == [5, 123, 999]
    image, target = dataset[0]
    assert image.shape == (3, 32, 32) and target == 5
    assert dataset.classes[999] == wnids[999]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "no val/ folder"),
        (lambda root: (root / "val").mkdir(parents=True), "has no class folders"),
        (lambda root: (root / "val" / "n01440764").mkdir(parents=True), "no images"),
    ],
)
def test_layout_errors(tmp_path: Path, setup: object, message: str) -> None:
    root = tmp_path / "data"
    setup(root)  # type: ignore[operator]
    with pytest.raises(DataError, match=message):
        imagenet_val_dataset(root)


def test_flat_val_folder_and_non_wnid_folders(tmp_path: Path) -> None:
    flat = tmp_path / "flat" / "val"
    flat.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(flat / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DataError, match="holds images directly"):
        imagenet_val_dataset(tmp_path / "flat")
    root = _write_folder(tmp_path / "mixed", ["n01440764", "cats", "dogs"])
    with pytest.raises(DataError, match=r"2 folders .* are not ImageNet wnids \(cats, dogs\)"):
        imagenet_val_dataset(root)


def test_corrupt_image_is_a_one_line_error_even_from_a_worker(tmp_path: Path) -> None:
    root = _write_folder(tmp_path, ["n01440764"], per_class=1)
    (root / "val" / "n01440764" / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    dataset = imagenet_val_dataset(root, PRE.transform())
    with pytest.raises(DataError, match="cannot read image .*broken.JPEG") as info:
        list(make_loader(dataset, batch_size=2, workers=1))
    assert "\n" not in str(info.value)


def test_deterministic_subset(tmp_path: Path) -> None:
    dataset = list(range(100))
    a = deterministic_subset(dataset, 10, seed=3)
    assert list(a) == list(deterministic_subset(dataset, 10, seed=3))
    assert list(a) == sorted(a) and len(set(a)) == 10
    assert list(a) != list(deterministic_subset(dataset, 10, seed=4))
    assert set(a) <= set(deterministic_subset(dataset, 20, seed=3))  # prefix property
    with pytest.warns(UserWarning, match="using all 100"):
        assert len(deterministic_subset(dataset, 500, seed=0)) == 100
    with pytest.raises(DataError):
        deterministic_subset(dataset, 0, seed=0)


def test_loader_order_independent_of_workers_and_cache_is_identical(tmp_path: Path) -> None:
    wnids = imagenet_wnids()
    root = _write_folder(tmp_path, [wnids[i] for i in (3, 1, 7)], per_class=3)
    plain = deterministic_subset(imagenet_val_dataset(root, PRE.transform()), 6, seed=0)
    batches0 = list(make_loader(plain, batch_size=4, workers=0))
    batches2 = list(make_loader(plain, batch_size=4, workers=2))
    decoded = deterministic_subset(imagenet_val_dataset(root, PRE.decode_transform()), 6, seed=0)
    cached = CachedDataset(decoded, transform=PRE.normalize_transform(), workers=1)
    assert cached.items[0][0].dtype == torch.uint8
    batches_cached = list(make_loader(cached, batch_size=4, workers=2))
    for (x0, y0), (x2, y2), (xc, yc) in zip(batches0, batches2, batches_cached, strict=True):
        assert torch.equal(x0, x2) and torch.equal(x0, xc)
        assert torch.equal(y0, y2) and torch.equal(y0, yc)


def test_cache_is_memory_bounded(tmp_path: Path) -> None:
    root = _write_folder(tmp_path, ["n01440764"], per_class=3)
    with pytest.raises(DataError, match="over the"):
        CachedDataset(imagenet_val_dataset(root, PRE.decode_transform()), max_bytes=3 * 32 * 32 * 2)
    with pytest.raises(DataError, match="decode_transform"):
        CachedDataset(imagenet_val_dataset(root))


def test_loader_arguments() -> None:
    with pytest.raises(DataError):
        make_loader(list(range(4)), batch_size=0)
    loader = make_loader(list(range(4)), batch_size=3)
    assert [b.tolist() for b in loader] == [[0, 1, 2], [3]]


@pytest.mark.skipif(not (SHARED_SAMPLE / "val").is_dir(), reason="shared data (../shared/data) not present")
def test_shared_sample_layout() -> None:
    dataset = imagenet_val_dataset(SHARED_SAMPLE, PRE.transform())
    assert len(dataset) == 1000
    assert sorted(dataset.targets) == list(range(1000))
    image, _ = deterministic_subset(dataset, 1, seed=0)[0]
    assert image.shape == (3, 32, 32)


def test_seeded_calibration_and_evaluation_split_one_permutation() -> None:
    """The selection inference_sim.py and benchmarks/bench_peer.py share: calibration from the front of the seeded
    order, evaluation from its end, disjoint when held out, in folder order."""
    from pytorch_quantizer.data import DataError, seeded_calibration, seeded_evaluation, seeded_order

    order = seeded_order(50, seed=3)
    cal = seeded_calibration(50, 10, seed=3)
    assert cal == sorted(order[:10]) and cal != list(range(10))
    assert set(seeded_calibration(50, 5, seed=3)) <= set(cal)  # a smaller -cs is a subset
    evaluation = seeded_evaluation(50, 3, set(cal), subset=20)
    assert evaluation == sorted(order[-20:]) and not set(evaluation) & set(cal)
    assert seeded_evaluation(50, 3, set(), None) == list(range(50))
    with pytest.raises(DataError):
        seeded_calibration(50, 51, seed=3)
