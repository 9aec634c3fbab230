"""AdaRound (``--weight_rounding adaround``): the learned rounding lowers a layer's output reconstruction error
against nearest rounding, leaves every weight on the level below or above it, on any grid; the CLI learns once,
caches by settings and refuses what it cannot do."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from test_cli import data_dir  # noqa: F401  (the synthetic wnid folder fixture)
from test_equalize import run_cli
from torch import nn

from pytorch_quantizer.adaround import LearnedRounding, learn_layer, reconstruction_error
from pytorch_quantizer.methods import get_method
from pytorch_quantizer.quant_config import RoundingConfig
from pytorch_quantizer.weights import grid_floor, grid_view, parameter_grid, quantize_on_grid, round_on_grid


def correlated_inputs(n: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose features share a few latent factors (strongly correlated channels), as a conv's neighbouring
    input channels and positions are: where nearest rounding's errors add up instead of cancelling."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 4, generator=g)
    mixing = torch.randn(4, features, generator=g)
    return latent @ mixing + 0.1 * torch.randn(n, features, generator=g)


def levels_of(w: torch.Tensor, learned: torch.Tensor, grid) -> torch.Tensor:
    """The integer level of each learned weight, and a check that it is one (on the grid)."""
    scale, _, offset, _ = grid_view(grid, w)
    q = (learned - offset) / scale
    assert torch.allclose(q, q.round(), atol=1e-3), "a learned weight is off the grid"
    return q.round()


@pytest.mark.parametrize(("bits", "per_channel", "method"), [(3, False, None), (4, True, None), (3, True, "laplace")])
def test_adaround_lowers_the_reconstruction_error_and_keeps_floor_or_ceil(bits, per_channel, method):
    torch.manual_seed(0)
    layer = nn.Linear(24, 8)
    x = correlated_inputs(512, 24)
    with torch.no_grad():
        target = layer(x)
    grid = parameter_grid(layer.weight.detach(), bits, per_channel, True, False,
                          get_method(method) if method else None)
    cfg = RoundingConfig(method="adaround", iters=400, batch=64)
    up, result = learn_layer(layer, grid, x, target, None, cfg, torch.Generator().manual_seed(0))
    w = layer.weight.detach()
    learned, nearest = round_on_grid(w, grid, up), quantize_on_grid(w, grid)
    with torch.no_grad():
        errors = [float(reconstruction_error(nn.functional.linear(x, q, layer.bias), target))
                  for q in (nearest, learned)]
    assert errors[1] < 0.8 * errors[0], errors
    assert result.learned == pytest.approx(errors[1], rel=1e-4)
    assert result.nearest == pytest.approx(errors[0], rel=1e-4)
    # every weight on the level below or above its scaled value, clamped to the grid's ends like nearest rounding
    q = levels_of(w, learned, grid)
    _, _, _, qmax = grid_view(grid, w)
    floor = grid_floor(w, grid)
    assert bool(((q == floor.clamp(0).minimum(qmax)) | (q == (floor + 1).clamp(0).minimum(qmax))).all())
    assert 0 < result.flipped < 0.5


def test_too_few_steps_are_named_as_layers_worse_than_nearest():
    """Each Adam step moves V by TRAVEL / iters: at 4 steps the roundings jump and can reconstruct worse than
    nearest rounding, which ``worse`` names (the run warns of it); 400 steps do not."""
    torch.manual_seed(0)
    layer = nn.Linear(24, 8)
    x = correlated_inputs(512, 24)
    with torch.no_grad():
        target = layer(x)
    grid = parameter_grid(layer.weight.detach(), 3, False, True, False, None)
    results = {}
    for iters in (4, 400):
        up, result = learn_layer(layer, grid, x, target, None, RoundingConfig(method="adaround", iters=iters, batch=64),
                                 torch.Generator().manual_seed(0))
        results[iters] = LearnedRounding({"fc": up}, 0.0, {"fc": result}).worse()
    assert results == {4: ["fc"], 400: []}


def test_round_on_grid_is_floor_without_ups_and_nearest_with_the_nearer_ones():
    w = torch.randn(6, 5, 3, 3)
    for per_channel in (False, True):
        grid = parameter_grid(w, 4, per_channel, True, False)
        floor = round_on_grid(w, grid, torch.zeros_like(w, dtype=torch.bool))
        scale, inv_scale, offset, qmax = grid_view(grid, w)
        assert torch.equal(levels_of(w, floor, grid), torch.minimum(grid_floor(w, grid).clamp(min=0), qmax))
        rest = (w - offset) * inv_scale - grid_floor(w, grid)
        nearest = round_on_grid(w, grid, rest > 0.5)
        assert torch.equal(nearest, quantize_on_grid(w, grid))  # no exact ties among random weights


def test_a_constant_channel_keeps_its_value():
    w = torch.randn(3, 8)
    w[1] = 0.25
    grid = parameter_grid(w, 4, True, True, False)
    out = round_on_grid(w, grid, torch.ones_like(w, dtype=torch.bool))
    assert torch.equal(out[1], w[1])


# -- the command line -------------------------------------------------------------------------------------------
def test_cli_learns_once_then_reads_the_cache_and_leaves_the_model_as_it_was(data_dir, tmp_path, caplog):  # noqa: F811
    flags = ["-qw", "int4", "-pcw", "--qtype", "int8", "-cs", "4", "--weight_rounding", "adaround",
             "--adaround_iters", "3", "--adaround_batch", "2"]
    with caplog.at_level("INFO", logger="pytorch_quantizer"):
        assert run_cli(data_dir, tmp_path, *flags) == 0
    assert "AdaRound: the learned rounding is saved to" in caplog.text
    cached = list((tmp_path / "adaround").glob("*.pt"))
    assert len(cached) == 1
    caplog.clear()
    with caplog.at_level("INFO", logger="pytorch_quantizer"):  # another activation width: the same rounding
        assert run_cli(data_dir, tmp_path, *[f if f != "int8" else "int4" for f in flags]) == 0
    assert "is read from" in caplog.text and "AdaRound 1/" not in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="pytorch_quantizer"):  # float biases: each layer learned with its own
        assert run_cli(data_dir, tmp_path, *flags, "--float_bias") == 0
    assert "is read from" in caplog.text and "AdaRound 1/" not in caplog.text
    with caplog.at_level("INFO", logger="pytorch_quantizer"):  # another weight grid: learned again
        assert run_cli(data_dir, tmp_path, *flags, "-thw", "laplace") == 0
    assert len(list((tmp_path / "adaround").glob("*.pt"))) == 2
    rows = pd.read_csv(tmp_path / "results.csv")
    assert rows["rounding.method"].eq("adaround").all()
    assert (rows["cal_seconds"] > 0).all()


def test_cli_adaround_with_quantized_inputs_and_bca(data_dir, tmp_path):  # noqa: F811
    assert run_cli(data_dir, tmp_path, "-qw", "int4", "--qtype", "int4", "-th", "laplace", "-cs", "4", "-bca",
                   "--weight_rounding", "adaround", "--adaround_input", "quantized", "--adaround_iters", "2") == 0
    rows = pd.read_csv(tmp_path / "results.csv")
    assert rows["rounding.input"].tolist() == ["quantized"]


def test_cli_warns_of_adaround_settings_without_adaround(data_dir, tmp_path, caplog):  # noqa: F811
    with caplog.at_level("WARNING", logger="pytorch_quantizer"):
        assert run_cli(data_dir, tmp_path, "--qtype", "int8", "--adaround_iters", "5") == 0
    assert "--adaround_iters has no effect" in caplog.text
