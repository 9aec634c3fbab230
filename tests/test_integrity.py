"""Statistics folders prove their integrity: every file's size and sha256 in meta.json, checked on load; the
calibration list as JSON (any name round-trips) with the count meta.json gives; a layer the run quantizes that
has no statistics is an error.  Folders of earlier releases still load."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from pytorch_quantizer.layers import activation_layers
from pytorch_quantizer.policy import layer_policy, plan_layers
from pytorch_quantizer.quant_config import ActivationConfig, QuantConfig
from pytorch_quantizer.stats import StatisticsCollector, StatisticsError, file_record, load_statistics

LEGACY = Path(__file__).resolve().parent / "data" / "legacy_stats_v1"
NAMES = ["n01/a.JPEG", "n01/line\nbreak.JPEG", "n02/é, \"quoted\".png"]


@pytest.fixture
def folder(tiny_model, tmp_path) -> Path:
    with torch.no_grad(), StatisticsCollector(tiny_model) as collector:
        for _ in range(3):
            tiny_model(torch.randn(1, 3, 16, 16))
    return collector.save(tmp_path / "stats", {"arch": "tiny"}, calibration=NAMES)


def rewrite_meta(folder: Path, **changes) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, **changes}))


def test_a_folder_records_and_verifies_its_files(folder):
    meta = json.loads((folder / "meta.json").read_text())
    assert set(meta["files"]) == {p.name for p in folder.iterdir()} - {"meta.json"}
    stats = load_statistics(folder)
    assert stats.calibration_images() == NAMES  # a newline, a comma, quotes and accents round-trip


@pytest.mark.parametrize("damage", ["truncate", "edit", "remove", "add", "foreign"])
def test_damaged_files_are_refused_by_name(folder, tmp_path, tiny_model, damage):
    target = folder / "conv1_activation_summary.csv"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-20])
    elif damage == "edit":
        target.write_text(target.read_text().replace(",", ",-5", 1))
    elif damage == "remove":
        target.unlink()
    elif damage == "add":
        target = folder / "conv9_activation.csv"
        target.write_text("min,max\n0,1\n")
    else:  # one layer's files copied in from another collection
        with torch.no_grad(), StatisticsCollector(tiny_model) as other:
            tiny_model(torch.randn(2, 3, 16, 16) * 3)
        other_folder = other.save(tmp_path / "other", {"arch": "tiny"})
        shutil.copy(other_folder / target.name, target)
    with pytest.raises(StatisticsError, match=target.name):
        load_statistics(folder)


@pytest.mark.parametrize(("meta", "phrase"), [
    ([1, 2], "JSON object"), ({"images": -3}, "positive count"), ({"images": "3"}, "positive count"),
])
def test_a_bad_meta_is_one_clear_error(folder, meta, phrase):
    if isinstance(meta, dict):
        rewrite_meta(folder, **meta)
    else:
        (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StatisticsError, match=phrase):
        load_statistics(folder)


def test_the_calibration_list_must_count_the_images(folder):
    calibration = folder / "calibration.json"
    calibration.write_text(json.dumps(NAMES[:2]))
    meta = json.loads((folder / "meta.json").read_text())
    rewrite_meta(folder, files={**meta["files"], "calibration.json": file_record(calibration)})
    with pytest.raises(StatisticsError, match="names 2 images .* counts 3"):
        load_statistics(folder)


def test_a_layer_the_run_quantizes_needs_statistics(folder, tiny_model):
    meta = json.loads((folder / "meta.json").read_text())
    kept = [layer for layer in meta["layers"] if layer["name"] != "conv1_activation"]
    files = {k: v for k, v in meta["files"].items() if not k.startswith("conv1_activation")}
    for path in folder.glob("conv1_activation*"):
        path.unlink()
    rewrite_meta(folder, layers=kept, files=files)
    stats = load_statistics(folder)
    layers = activation_layers(tiny_model)
    specs = layer_policy(QuantConfig(act=ActivationConfig(bits=4, method="laplace")), layers).specs(layers)
    with pytest.raises(StatisticsError, match="nothing for conv1_activation.*--missing_stats float"):
        plan_layers(layers, stats, specs)


def test_missing_stats_float_leaves_the_layers_float_and_says_so(folder, tiny_model, caplog):
    meta = json.loads((folder / "meta.json").read_text())
    rewrite_meta(folder, layers=[layer for layer in meta["layers"] if layer["name"] != "conv1_activation"],
                 files={k: v for k, v in meta["files"].items() if not k.startswith("conv1_activation")})
    for path in folder.glob("conv1_activation*"):
        path.unlink()
    layers = activation_layers(tiny_model)
    specs = layer_policy(QuantConfig(act=ActivationConfig(bits=4, method="laplace")), layers).specs(layers)
    with caplog.at_level(logging.WARNING, logger="pytorch_quantizer"):
        plans = plan_layers(layers, load_statistics(folder), specs, missing_float=True)
    by_name = {p.name: p for p in plans}
    assert (by_name["conv1_activation"].role, by_name["conv1_activation"].bits) == ("missing", None)
    assert all(p.bits is not None for p in plans if p.name != "conv1_activation" and p.role != "unobserved")
    assert "1 layers have no statistics" in caplog.text and "conv1_activation" in caplog.text


def test_an_earlier_release_folder_loads_unverified(caplog):
    with caplog.at_level(logging.INFO, logger="pytorch_quantizer"):
        stats = load_statistics(LEGACY)
    assert stats.layer_names and "without file hashes: not verified" in caplog.text


def test_a_symlinked_folder_keeps_its_link(tiny_model, tmp_path):
    target = tmp_path / "real" / "stats"
    target.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    for scale in (1.0, 2.0):  # the first save fills the empty target, the second replaces it
        with torch.no_grad(), StatisticsCollector(tiny_model) as collector:
            tiny_model(torch.randn(2, 3, 16, 16) * scale)
        collector.save(link, {"arch": "tiny"})
        assert link.is_symlink() and link.resolve() == target.resolve()
        assert load_statistics(link).meta["images"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no .link.old-* left beside it
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["stats"]
