"""-thw: clipping the weights with a registered method, per tensor or per output channel."""

import pandas as pd
import pytest
import torch
from test_cli import data_dir, run_cli  # noqa: F401  (module fixture of the CLI tests)

from pytorch_quantizer.methods import ClippingMethod, get_method, register, unregister
from pytorch_quantizer.weights import quantize_parameter


def _laplace_weight(channels: int = 8, fan_in: int = 4096) -> torch.Tensor:
    """Laplace(0, b_c) rows (|x| exponential, random sign) with a different scale b_c per output channel."""
    g = torch.Generator().manual_seed(0)
    scales = torch.linspace(0.01, 0.1, channels)[:, None]
    magnitude = -torch.rand(channels, fan_in, generator=g).log()
    sign = torch.sign(torch.rand(channels, fan_in, generator=g) - 0.5)
    return (magnitude * sign * scales).float()


def test_no_method_is_the_min_max_rule_bit_for_bit():
    w = _laplace_weight()
    for per_channel in (False, True):
        plain = quantize_parameter(w, 4, per_channel, True, False)
        assert torch.equal(quantize_parameter(w, 4, per_channel, True, False, get_method("no")), plain)


@pytest.mark.parametrize("per_channel", [False, True])
def test_laplace_clipping_lowers_the_4_bit_error_of_laplace_weights(per_channel):
    w = _laplace_weight()
    mse = {name: (quantize_parameter(w, 4, per_channel, True, False, get_method(name)) - w).square().mean().item()
           for name in ("no", "laplace")}
    assert mse["laplace"] < 0.7 * mse["no"], mse


def test_per_channel_clipping_is_the_per_tensor_rule_on_each_channel():
    w = _laplace_weight(channels=4)
    together = quantize_parameter(w, 4, True, True, False, get_method("laplace"))
    for c in range(w.shape[0]):
        alone = quantize_parameter(w[c:c + 1], 4, False, True, False, get_method("laplace"))
        assert torch.equal(together[c:c + 1], alone)


def test_a_method_that_needs_more_than_moments_is_refused():
    @register
    class NeedsHistogram(ClippingMethod):
        name = "test-needs-histogram"
        requires = ("moments", "histogram")

        def clip(self, obs, bits):  # pragma: no cover - never reached
            raise AssertionError

    try:
        with pytest.raises(ValueError, match="needs only moments"):
            quantize_parameter(_laplace_weight(), 4, True, True, False, get_method("test-needs-histogram"))
    finally:
        unregister("test-needs-histogram")


def test_cli_weight_clipping(data_dir, tmp_path):
    assert run_cli(data_dir, tmp_path, "--qtype", "fp32", "-qw", "int4", "-pcw", "-thw", "laplace") == 0
    row = pd.read_csv(tmp_path / "results.csv", keep_default_na=False).iloc[-1]
    assert (row["weight.method"], row["qweight"]) == ("laplace", "int4")
