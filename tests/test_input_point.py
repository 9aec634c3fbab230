"""--act_point input: each conv/linear's input is observed and quantized (a copy), the image stays float, and
inputs that are never negative get one-sided grids."""

import pytest
import torch

from pytorch_quantizer.model_quantizer import ModelQuantizer
from pytorch_quantizer.models import fold_batchnorm
from pytorch_quantizer.policy import plan_table
from pytorch_quantizer.quant_config import ActivationConfig, QuantConfig
from pytorch_quantizer.stats import StatisticsCollector, StatisticsError, load_statistics


@pytest.fixture
def folded(tiny_model):
    return fold_batchnorm(tiny_model, torch.randn(2, 3, 16, 16))[0]


def _collect(model, x, folder, point):
    with torch.no_grad(), StatisticsCollector(model, point=point) as collector:
        model(x)
    return load_statistics(collector.save(folder, {"arch": "tiny"}))


def test_inputs_are_planned_and_quantized_as_copies(folded, tmp_path):
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    stats = _collect(folded, x, tmp_path / "s", "input")
    assert stats.point == "input" and stats.numel("conv0_activation") == 3 * 16 * 16  # the image
    quantizer = ModelQuantizer(folded, QuantConfig(act=ActivationConfig(4, "laplace", placement="input")), stats)
    plan = plan_table(quantizer.plan)
    assert plan.loc["conv0_activation", "bits"] != plan.loc["conv0_activation", "bits"]  # NaN: the image stays float
    conv1 = plan.loc["conv1_activation"]
    assert conv1["one_sided"] and conv1["offset"] == 0.0 and conv1["bits"] == 4  # after a ReLU: never negative

    seen = {}
    with torch.no_grad(), quantizer:  # hooks registered after the quantizer's run after them
        handles = [
            folded.features[2].register_forward_hook(lambda m, i, o: seen.setdefault("relu", o.clone())),
            folded.features[3].register_forward_pre_hook(lambda m, i: seen.setdefault("conv1_in", i[0].clone())),
        ]
        folded(x)
        for h in handles:
            h.remove()
    assert len(torch.unique(seen["conv1_in"])) <= 16  # what conv1 read was quantized
    assert len(torch.unique(seen["relu"])) > 100  # the tensor itself was not changed in place
    assert (seen["conv1_in"] >= 0).all()


def test_statistics_of_the_other_point_are_refused(folded, tmp_path):
    stats = _collect(folded, torch.randn(4, 3, 16, 16), tmp_path / "s", "output")
    with pytest.raises(StatisticsError, match="--act_point input"):
        ModelQuantizer(folded, QuantConfig(act=ActivationConfig(4, "laplace", placement="input")), stats)
    with pytest.raises(ValueError, match="half range"):
        QuantConfig(act=ActivationConfig(4, "laplace", placement="input", half_range=True))


def test_live_input_quantization(folded):
    """-sm no with inputs: the grid from each live input, one-sided where it is never negative."""
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    seen = {}
    with torch.no_grad(), ModelQuantizer(folded, QuantConfig(act=ActivationConfig(3, "no", placement="input"))):
        handles = [folded.features[3].register_forward_pre_hook(lambda m, i: seen.setdefault("conv1", i[0].clone()))]
        folded(x)
        handles[0].remove()
    assert len(torch.unique(seen["conv1"])) <= 8 and seen["conv1"].min() == 0  # one-sided, 3 bits
