"""The seed's path to the GEMMLOWP quantizer (its README links this file): the code lives in
``pytorch_quantizer.gemmlowp`` (the definition and its parameters) and ``pytorch_quantizer.fake_quant`` (the entry
points)."""

from ...fake_quant import *  # noqa: F403
from ...fake_quant import __all__ as _public
from ...gemmlowp import reference_quantize_

__all__ = [*_public, "reference_quantize_"]
