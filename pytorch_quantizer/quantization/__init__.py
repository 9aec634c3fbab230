"""Kept for the seed's import path ``pytorch_quantizer.quantization.qtypes.int_quantizer``; nothing else lives here."""
