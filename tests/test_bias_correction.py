"""-bca: the empirical bias correction of activations (pytorch_quantizer/bias_correction.py)."""

from contextlib import nullcontext

import pandas as pd
import pytest
import torch
from test_cli import data_dir, run_cli, stats_dir  # noqa: F401  (module fixtures of the CLI tests)

from pytorch_quantizer.bias_correction import ShiftRecorder, bias_shifts, check_biases
from pytorch_quantizer.graph import relu_fed_layers
from pytorch_quantizer.layers import activation_layers
from pytorch_quantizer.model_quantizer import ModelQuantizer
from pytorch_quantizer.models import fold_batchnorm
from pytorch_quantizer.quant_config import ActivationConfig, QuantConfig, WeightConfig

# no statistics: every grid from the live tensor; 3 bits shift the means visibly
QUANTIZED = QuantConfig(act=ActivationConfig(bits=3, method="laplace", first_bits=3),
                        weight=WeightConfig(bits=3, bias_bits=8))
WEIGHTS_ONLY = QuantConfig(act=ActivationConfig(bits=None), weight=WeightConfig(bits=3, bias_bits=8))
FLOAT = QuantConfig(act=ActivationConfig(bits=None), weight=WeightConfig(bits=None, bias_bits=None))


def _setup(model, config, relu_caps=None):
    torch.manual_seed(1)
    batches = [torch.randn(8, 3, 12, 12) for _ in range(3)]
    layers = activation_layers(model)

    def quantized_run(shifts, recorder=None):
        logits = []
        with ModelQuantizer(model, config, None, shifts), recorder or nullcontext(), torch.inference_mode():
            for x in batches:
                logits.append(model(x))
        return torch.cat(logits)

    def residual(shifts) -> dict:
        recorder = ShiftRecorder(layers, relu_caps)
        quantized_run(shifts, recorder)
        return recorder.shifts()

    return layers, quantized_run, residual


def _total(shifts: dict) -> float:
    return sum(v.abs().sum().item() for v in shifts.values())


def test_weights_only_first_layer_is_exact_after_one_round(tiny_model):
    """With float activations the first layer's corrected mean equals the float layer's (to rounding)."""
    layers, quantized_run, residual = _setup(tiny_model, WEIGHTS_ONLY)
    first = layers[0].module_name
    before = residual({})[first].abs().max().item()
    after = residual(bias_shifts(layers, quantized_run, rounds=1))[first].abs().max().item()
    assert before > 1e-4 and after < 1e-3 * before


def test_rounds_shrink_the_remaining_shift(tiny_model):
    layers, quantized_run, residual = _setup(tiny_model, QUANTIZED)
    uncorrected = _total(residual({}))
    one = _total(residual(bias_shifts(layers, quantized_run, rounds=1)))
    three = _total(residual(bias_shifts(layers, quantized_run, rounds=3)))
    assert three < one < 0.5 * uncorrected


def test_the_logits_mean_moves_towards_the_float_networks(tiny_model):
    layers, quantized_run, _ = _setup(tiny_model, QUANTIZED)
    float_logits = _setup(tiny_model, FLOAT)[1]({})
    error = {rounds: (quantized_run(bias_shifts(layers, quantized_run, rounds) if rounds else {}).mean(0)
                      - float_logits.mean(0)).abs().mean().item() for rounds in (0, 2)}
    assert error[2] < error[0], error


def test_relu_fed_layers_are_measured_after_the_relu(tiny_model):
    """With one-sided grids (-hr) the negative part that the ReLU discards is no shift to correct: measured after
    the ReLU, the correction brings the logits' mean closer to the float network's."""
    model, _ = fold_batchnorm(tiny_model, torch.randn(2, 3, 12, 12))
    caps = relu_fed_layers(model)
    assert len(caps) == 2
    config = QuantConfig(act=ActivationConfig(bits=3, method="laplace", first_bits=3, half_range=True),
                         weight=WeightConfig(bits=4, bias_bits=8))
    layers, quantized_run, _ = _setup(model, config, caps)
    float_logits = _setup(model, FLOAT)[1]({})
    error = {rounds: (quantized_run(bias_shifts(layers, quantized_run, rounds, caps) if rounds else {}).mean(0)
                      - float_logits.mean(0)).abs().mean().item() for rounds in (0, 2)}
    assert error[2] < error[0], error


def test_model_is_restored_exactly(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    layers, quantized_run, _ = _setup(tiny_model, QUANTIZED)
    shifts = bias_shifts(layers, quantized_run, rounds=2)
    with ModelQuantizer(tiny_model, FLOAT, None, shifts):
        fc = tiny_model.fc.bias.detach().clone()
    assert not torch.equal(fc, before["fc.bias"])  # float weights, biases shifted alone
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_layers_without_bias_are_refused(tiny_model):
    check_biases(activation_layers(tiny_model))
    tiny_model.fc.bias = None
    with pytest.raises(ValueError, match="none"):
        check_biases(activation_layers(tiny_model))
    with pytest.raises(ValueError, match="round"):
        bias_shifts([], lambda shifts, recorder: None, rounds=0)


def test_cli_use_mode_with_bca(data_dir, stats_dir, capsys):
    assert run_cli(data_dir, stats_dir, "-sm", "use", "--qtype", "int4", "-th", "laplace", "-bca") == 0
    assert " * Prec@1 " in capsys.readouterr().out
    row = pd.read_csv(stats_dir / "results.csv", keep_default_na=False).iloc[-1]
    assert (str(row["correct.act_bias"]), int(row["correct.act_bias_rounds"]), int(row["images"])) == ("True", 2, 4)


@pytest.mark.parametrize("flags, message", [
    (("-sm", "collect", "-bca"), "not in a collect pass"),
    (("-sm", "no", "--qtype", "int4", "-bca"), "give -cs N"),
    (("-sm", "no", "--qtype", "fp32", "-qw", "f32", "-bca"), "nothing is quantized"),
    (("-sm", "no", "--qtype", "int4", "-cs", "4", "-bca", "--no_fold_bn"), "BatchNorm folding"),
    (("-sm", "no", "--qtype", "int4", "-cs", "4", "-bca", "--bca_rounds", "0"), "positive"),
])
def test_bad_bca_input_is_one_line_exit_2(data_dir, tmp_path, capsys, flags, message):
    assert run_cli(data_dir, tmp_path, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "stats").exists()
