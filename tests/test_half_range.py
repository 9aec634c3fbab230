"""alpha+ of the one-sided ("half range") grid against an independent minimisation of the half-distribution MSE."""

import math

import pytest
from scipy import integrate, optimize, stats

from pytorch_quantizer.clipping import optimal_alpha, optimal_alpha_for_bins, optimal_alpha_half

DENSITIES = {"laplace": stats.laplace(scale=1.0).pdf, "gaus": stats.norm(scale=1.0).pdf}


def half_mse(prior: str, alpha: float, bits: int) -> float:
    """ReLU(x) on [0, alpha] with 2**bits bins, by quadrature: the positive tail clipped at alpha, and the
    positive half's mass (1/2, as the paper's model counts the whole mass in the two-sided case) rounded with
    bins of width alpha / 2**bits; the zeros of the negative half are exact."""
    pdf = DENSITIES[prior]
    clip, _ = integrate.quad(lambda x: (x - alpha) ** 2 * pdf(x), alpha, math.inf)
    return clip + 0.5 * (alpha / 2**bits) ** 2 / 12.0


@pytest.mark.parametrize("prior", ["laplace", "gaus"])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_alpha_half_minimises_the_half_distribution_mse(prior, bits):
    found = optimize.minimize_scalar(lambda a: half_mse(prior, a, bits), bounds=(0.1, 20.0), method="bounded",
                                     options={"xatol": 1e-9})
    assert optimal_alpha_half(prior, bits) == pytest.approx(found.x, rel=1e-5)
    assert half_mse(prior, optimal_alpha_half(prior, bits), bits) <= half_mse(prior, optimal_alpha(prior, bits), bits)


def test_bins_generalise_bits():
    assert optimal_alpha_for_bins("laplace", 16.0) == optimal_alpha("laplace", 4)
    between = optimal_alpha_for_bins("gaus", 12.0)  # 12 levels: between 3 and 4 bits
    assert optimal_alpha("gaus", 3) < between < optimal_alpha("gaus", 4)
    with pytest.raises(ValueError, match="bins"):
        optimal_alpha_for_bins("laplace", 1.5)


def _folded_tiny(tiny_model):
    import torch

    from pytorch_quantizer.models import fold_batchnorm

    return fold_batchnorm(tiny_model, torch.randn(2, 3, 16, 16))[0]


def test_half_range_plans_one_sided_grids_for_relu_fed_layers(tiny_model, tmp_path):
    """TinyNet (BN folded): both convs feed a ReLU and get [0, ...] grids; the classifier keeps its own."""
    import torch

    from pytorch_quantizer.model_quantizer import ModelQuantizer
    from pytorch_quantizer.policy import plan_table
    from pytorch_quantizer.quant_config import ActivationConfig, QuantConfig
    from pytorch_quantizer.stats import StatisticsCollector, load_statistics

    model = _folded_tiny(tiny_model)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) ** 3
    with torch.no_grad(), StatisticsCollector(model) as collector:
        model(x)
    stats = load_statistics(collector.save(tmp_path / "s", {"arch": "tiny"}))
    config = QuantConfig(act=ActivationConfig(bits=4, method="laplace", half_range=True))
    plan = plan_table(ModelQuantizer(model, config, stats).plan)
    assert list(plan["one_sided"]) == [True, True, False]
    conv1, ts = plan.loc["conv1_activation"], stats.tensor_stats("conv1_activation")
    assert conv1["offset"] == 0.0 and conv1["method"] == "laplace"
    assert conv1["alpha"] == pytest.approx(optimal_alpha_half("laplace", 4) * ts.b)
    assert conv1["delta"] == pytest.approx(min(max(ts.mean, 0.0) + conv1["alpha"], ts.max))

    # what the ReLU keeps is quantized more finely: lower post-ReLU error than the two-sided grid
    def post_relu_error(half_range: bool) -> float:
        config = QuantConfig(act=ActivationConfig(bits=4, method="laplace", half_range=half_range))
        quantizer = ModelQuantizer(model, config, stats)
        seen = {}
        handle = model.features[5].register_forward_hook(lambda m, i, o: seen.setdefault("q", o.clone()))
        try:
            with torch.no_grad(), quantizer:
                model(x)
        finally:
            handle.remove()
        with torch.no_grad():
            reference = model.features[:6](x)
        return (seen["q"] - reference).square().mean().item()

    assert post_relu_error(True) < 0.7 * post_relu_error(False)


def test_half_range_on_a_network_without_relu_says_it_changes_nothing(tmp_path, caplog):
    import logging

    from pytorch_quantizer.config import DataConfig, RunConfig
    from pytorch_quantizer.demo import demo_folder
    from pytorch_quantizer.quant_config import ActivationConfig
    from pytorch_quantizer.session import Session

    root = demo_folder(tmp_path / "photos")
    cfg = RunConfig(arch="efficientnet_b0", weights="none", data=DataConfig(root=root, workers=0), device="cpu",
                    act=ActivationConfig(bits=4, half_range=True))
    with caplog.at_level(logging.WARNING, logger="pytorch_quantizer"):
        session = Session(cfg)
    assert session.relu_caps == {} and "changes nothing here" in caplog.text
