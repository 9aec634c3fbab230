"""The seed's path to the GEMMLOWP quantizer (its README links this file): the code lives in
``pytorch_quantizer.grid`` (the definition and its parameters) and ``pytorch_quantizer.quantize`` (the entry points)."""

from ...grid import reference_quantize_
from ...quantize import *  # noqa: F403
from ...quantize import __all__ as _public

__all__ = [*_public, "reference_quantize_"]
