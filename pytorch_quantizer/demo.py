"""A small ImageFolder of real photographs that ships with the package, for a first run without ImageNet or internet.

The five photographs in ``pytorch_quantizer/demo_photos/`` are public-domain / CC0 sample images copied from
scikit-image's wheel (``skimage/data``), downscaled to a shorter side of at most 320 pixels and stored as JPEG
(164 KB together; README.md there gives each source and licence).  ``demo_folder`` writes each of them three times
into the ImageFolder layout ``ROOT/val/<wnid>/``: the photo itself (byte for byte), its mirror image and one fixed crop,
15 images in all.  The mirror and the crop are PNG (lossless, so no second JPEG loss) and come out the same bytes on
every run.

The class folders are ImageNet wnids so that ``data.imagenet_val_dataset(ROOT)`` reads them; a photo is filed under
its true ImageNet class where it has one.  The labels are cosmetic: five photos say nothing about accuracy, and the
demo reports label-free measures (agreement of the quantized logits with the FP32 ones).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from PIL import Image, ImageOps

from .atomic import atomic_write
from .data import DataError

PHOTO_FOLDER = "demo_photos"


@dataclass(frozen=True)
class DemoPhoto:
    """One shipped photograph: its file in ``demo_photos/``, the ImageNet class folder it goes to and the box of its
    extra crop, as fractions (left, top, right, bottom) of the photo's width and height."""

    file: str
    wnid: str
    crop: tuple[float, float, float, float]
    subject: str


DEMO_PHOTOS: tuple[DemoPhoto, ...] = (
    DemoPhoto("chelsea.jpg", "n02123045", (0.10, 0.00, 0.80, 1.00), "Chelsea the cat (tabby, class 281)"),
    DemoPhoto("coffee.jpg", "n07920052", (0.10, 0.00, 0.75, 0.90), "a cup of coffee (espresso, class 967)"),
    DemoPhoto("rocket.jpg", "n03773504", (0.30, 0.15, 0.70, 1.00), "Falcon 9 on its launch pad (missile, class 657)"),
    # No ImageNet class for a person or a space suit: filed under the space shuttle model beside her (the crop).
    DemoPhoto("astronaut.jpg", "n04266014", (0.60, 0.00, 1.00, 0.55), "astronaut Eileen Collins (space shuttle, 812)"),
    DemoPhoto("camera.jpg", "n04485082", (0.50, 0.10, 1.00, 1.00), "a cameraman, grey levels (tripod, class 872)"),
)
VARIANTS = (".jpg", "_mirror.png", "_crop.png")  # file name endings: the photo itself, its mirror, its crop
DEMO_IMAGES = len(DEMO_PHOTOS) * len(VARIANTS)


def photo_files() -> dict[str, Path]:
    """The shipped photographs by file name.  Raises DataError naming the missing files when the package was
    installed without them (a wheel built without ``package_data``)."""
    folder = resources.files("pytorch_quantizer").joinpath(PHOTO_FOLDER)
    files = {photo.file: Path(str(folder.joinpath(photo.file))) for photo in DEMO_PHOTOS}
    missing = [name for name, path in files.items() if not path.is_file()]
    if missing:
        raise DataError(f"the demo photos {', '.join(missing)} are missing from {folder}; reinstall the package "
                        "(pip install -e .) so that pytorch_quantizer/demo_photos/ comes with it")
    return files


def photos_available() -> bool:
    """Whether every shipped photograph is present (tests skip without them)."""
    try:
        photo_files()
    except DataError:
        return False
    return True


def demo_folder(root: Path) -> Path:
    """Write the demo ImageFolder under ``root`` (``root/val/<wnid>/*``, DEMO_IMAGES images) and return ``root``.

    For each photo: ``<name>.jpg`` (the shipped file, copied byte for byte), ``<name>_mirror.png`` (left-right
    mirror) and ``<name>_crop.png`` (its fixed crop box).  Running it again rewrites the same bytes.  ``root/val``
    may not hold anything else, so that a reused folder never mixes other images into the demo (DataError).
    Every file is written under a temporary name and renamed into place: an interrupted run leaves no half image.
    """
    root = Path(root).expanduser()
    val = root / "val"
    _refuse_other_files(val)
    files = photo_files()
    for photo in DEMO_PHOTOS:
        data = files[photo.file].read_bytes()
        photo_path, mirror_path, crop_path = (val / name for name in _outputs(photo))
        _write_bytes(photo_path, data)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            _write_bytes(mirror_path, _png(ImageOps.mirror(image)))
            _write_bytes(crop_path, _png(image.crop(_box(photo.crop, image.size))))
    return root


def _outputs(photo: DemoPhoto) -> list[str]:
    """The files ``demo_folder`` writes for ``photo``, relative to ``val``: photo, mirror, crop."""
    stem = Path(photo.file).stem
    return [f"{photo.wnid}/{stem}{ending}" for ending in VARIANTS]


def _refuse_other_files(val: Path) -> None:
    """DataError when ``val`` holds visible entries that ``demo_folder`` does not write (hidden ones, such as an
    interrupted write's temporary file, are ignored here and by the ImageFolder reader, which wants an image suffix)."""
    if not val.is_dir():
        return
    expected = {name for photo in DEMO_PHOTOS for name in _outputs(photo)}
    folders = {name.split("/")[0] for name in expected}
    others = []
    for entry in sorted(val.iterdir()):
        if entry.name.startswith("."):
            continue
        if not (entry.is_dir() and entry.name in folders):
            others.append(entry.name)
            continue
        others += [f"{entry.name}/{f.name}" for f in sorted(entry.iterdir())
                   if not f.name.startswith(".") and f"{entry.name}/{f.name}" not in expected]
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise DataError(f"{val} holds files the demo does not write ({shown}); give the demo an empty folder or "
                        "the one it wrote before")


def _box(fractions: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A crop box in whole pixels from fractions of (width, height)."""
    width, height = size
    left, top, right, bottom = fractions
    return round(left * width), round(top * height), round(right * width), round(bottom * height)


def _png(image: Image.Image) -> bytes:
    """PNG without metadata: the same pixels give the same bytes on every run (same Pillow and zlib)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through a temporary file renamed into place (no half-written image after a kill)."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
