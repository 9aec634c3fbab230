"""Quantized inference under ``torch.compile``: the quantization fused into the ops around it.

Eager, each hooked layer's quantization is a pass of its own over the layer's output.  The fused kernels make it
as cheap as a copy, but on a GPU a copy of every conv output of ResNet-50 costs about as much as the 15 % the
simulation may add.  Compiled, Dynamo inlines the forward hooks, ``select_backend`` gives it the pure-PyTorch
definition, and Inductor fuses the quantization into the element-wise op that reads the conv output anyway (ReLU,
residual add): the quantization then costs arithmetic, not memory traffic.

Bits: ``INDUCTOR_OPTIONS`` stop Inductor contracting multiply-add pairs into FMAs (Triton does by default) and
flushing denormals, so that a compiled quantization of a given tensor gives the eager bits (tests/test_compiled.py).
The convolutions are another matter: Inductor may run them with other algorithms or layouts, which moves FP32
results by an ulp, and at a few bits an ulp can cross a rounding boundary; the one-level changes then spread
through the network.  So a compiled run's accuracy differs from the eager run's (mobilenet_v2 W8A6 on the
1000-image sample: 70.9 % against 72.1 % top-1); compare settings within one mode."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from torch import nn

_log = logging.getLogger("pytorch_quantizer")

INDUCTOR_OPTIONS: dict[str, object] = {
    "emulate_precision_casts": True,  # among eager numerics: Triton kernels built without FMA contraction
    "eager_numerics.disable_ftz": True,  # keep denormals, as eager CUDA does
    "cpp.enable_floating_point_contract_flag": "off",  # the CPU code: no FMA contraction either (the default)
    "cpp.enable_unsafe_math_opt_flag": False,
}


def inductor_options() -> dict[str, object]:
    """``INDUCTOR_OPTIONS`` that this torch's Inductor knows (``torch.compile`` refuses unknown ones; older
    versions lack some).  A dropped option is logged: tests/test_compiled.py then tells whether the bits still
    match on this machine."""
    from torch._inductor import config

    known = {}
    for key, value in INDUCTOR_OPTIONS.items():
        try:
            functools.reduce(getattr, key.split("."), config)
        except AttributeError:
            _log.warning("torch %s's Inductor has no option %s; compiling without it", torch.__version__, key)
            continue
        known[key] = value
    return known


def compile_model(model: nn.Module) -> Callable[..., torch.Tensor]:
    """``model`` under ``torch.compile`` for hooked inference: static shapes, options that keep the quantization's
    bits, and guards on the modules' hooks.

    Dynamo by default does not guard on hooks: a second model of the same architecture with other hooks (or the
    same model after attaching or detaching a quantizer) would silently run the graph traced first.  Here every
    call runs with those guards on, so a change of hooks recompiles instead.  Call ``torch.compiler.reset()``
    between passes with different hooks so that old graphs are dropped (Dynamo stops recompiling after
    ``torch._dynamo.config.recompile_limit`` variants).  Supported: statistics "use" mode with round-to-nearest
    (live statistics and stochastic rounding would split the graph at every layer).
    """
    compiled = torch.compile(model, dynamic=False, options=inductor_options())

    def run(*args: object, **kwargs: object) -> torch.Tensor:
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
            return compiled(*args, **kwargs)

    return run
