"""Names that say what things are, and the old ones that keep working: the seed's import path, the previous
releases' class name, and every flag spelled with hyphens or underscores."""

import importlib

import pytest
import torch

import inference_sim


def test_the_seeds_import_path_still_quantizes():
    seed = importlib.import_module("pytorch_quantizer.quantization.qtypes.int_quantizer")
    from pytorch_quantizer.fake_quant import gemmlowp_quantize
    from pytorch_quantizer.gemmlowp import reference_quantize_

    assert seed.gemmlowp_quantize is gemmlowp_quantize and seed.reference_quantize_ is reference_quantize_
    x = torch.linspace(-1, 1, 11)
    assert torch.equal(seed.gemmlowp_quantize(x, 2.0, -1.0, 2), gemmlowp_quantize(x, 2.0, -1.0, 2))


def test_the_previous_class_name_is_the_model_quantizer():
    from pytorch_quantizer.model_quantizer import ActivationQuantizer, ModelQuantizer

    assert ActivationQuantizer is ModelQuantizer


@pytest.mark.parametrize(("old", "new"), [
    (["--bca_rounds", "3"], ["--bca-rounds", "3"]),
    (["--stats_mode", "use"], ["--stats-mode", "use"]),
    (["--cal_data", "x"], ["--cal-data", "x"]),
    (["-th", "laplace"], ["--method", "laplace"]),
    (["--threshold", "laplace"], ["--method", "laplace"]),
    (["--weight_threshold", "laplace"], ["--weight-method", "laplace"]),
    (["-ct"], ["--layer-selection"]),
    (["--custom_test"], ["--layer-selection"]),
    (["--ct_step", "4"], ["--layer-selection-step", "4"]),
    (["--per_channel_weights"], ["-pcq_w"]),
    (["--act_point", "input"], ["--act-point", "input"]),
])
def test_every_spelling_sets_the_same_field(old, new):
    parser = inference_sim.build_parser()
    assert vars(parser.parse_args(old)) == vars(parser.parse_args(new))
    assert len(vars(parser.parse_args(new))) == 1  # one flag, one field


def test_a_missing_data_folder_is_reported_before_any_weights_load(tmp_path, capsys, monkeypatch):
    """The README's commands on a machine without ImageNet: the one line names the folder, and no weights were
    asked for (torchvision would download them)."""
    import pytorch_quantizer.session as session

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the image folder was checked")

    monkeypatch.setattr(session, "build_model", no_weights)
    code = inference_sim.main(["--data", str(tmp_path / "ILSVRC2012"), "-a", "resnet18", "--results",
                               str(tmp_path / "r.csv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "ILSVRC2012" in err[0], err
