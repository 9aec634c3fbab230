"""ACIQ: analytical clipping for integer quantization of activations, applied to torchvision CNNs."""

from .clipping import (
    TensorStats,
    aciq_range,
    gaus_sigma_from_range,
    mse_gaus,
    mse_grid,
    mse_laplace,
    optimal_alpha,
    optimal_alpha_grid,
)
from .fake_quant import (
    gemmlowp_qparams,
    gemmlowp_qparams_per_channel,
    gemmlowp_quantize,
    gemmlowp_quantize_per_channel,
    quantize_per_channel_with_qparams,
    quantize_with_qparams,
)
from .methods import ClippingMethod, Grid, choose_clipping, get_method, method_names, register

__version__ = "0.1.0"

__all__ = [
    "ClippingMethod",
    "Grid",
    "TensorStats",
    "__version__",
    "aciq_range",
    "choose_clipping",
    "gaus_sigma_from_range",
    "get_method",
    "gemmlowp_qparams",
    "gemmlowp_qparams_per_channel",
    "gemmlowp_quantize",
    "gemmlowp_quantize_per_channel",
    "mse_gaus",
    "mse_grid",
    "method_names",
    "mse_laplace",
    "optimal_alpha",
    "optimal_alpha_grid",
    "quantize_per_channel_with_qparams",
    "quantize_with_qparams",
    "register",
]
