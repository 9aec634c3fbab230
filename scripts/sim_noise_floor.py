"""The simulator against itself: the top-1 agreement of a quantized network with the same network fed images
perturbed by N(0, EPS^2) noise (default 1e-6, far below a JPEG's 8-bit resolution of the normalised input).

An integer engine computes the same grids with other rounding of the float work (accumulation order, x / s against
(x - o) * (1 / s)), so a value within an ulp of a rounding tie may land on the other level; each such flip feeds the
next layer.  This script measures how much top-1 moves from perturbations of that size alone: the noise floor under
which no simulator-vs-engine agreement goal can be met (docs/onnx.md).

Usage: python scripts/sim_noise_floor.py [EPS] -- <inference_sim.py flags of a -sm use run>
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import inference_sim  # noqa: E402
from pytorch_quantizer.distributed import DistContext  # noqa: E402
from pytorch_quantizer.model_quantizer import ModelQuantizer  # noqa: E402
from pytorch_quantizer.results import Accuracy  # noqa: E402
from pytorch_quantizer.session import Session  # noqa: E402


def main(argv: list[str]) -> None:
    eps = float(argv[0]) if argv and argv[0] != "--" else 1e-6
    flags = argv[argv.index("--") + 1:] if "--" in argv else argv[1:]
    parser = inference_sim.build_parser()
    cfg = inference_sim.config_from_args(parser.parse_args(flags), parser)
    session = Session(cfg, DistContext())
    loader = session.loader(calibration=False, passes=2)
    generator = torch.Generator().manual_seed(cfg.data.seed)
    clean, noisy = Accuracy(), Accuracy()
    agree = images = 0
    largest = 0.0
    with ModelQuantizer(session.model, cfg.quant(), session.stats), torch.inference_mode():
        for batch, target in loader:
            a = session.runner(batch.to(session.device)).cpu()
            shaken = batch + eps * torch.randn(batch.shape, generator=generator)
            b = session.runner(shaken.to(session.device)).cpu()
            clean.add(a, target)
            noisy.add(b, target)
            agree += int((a.argmax(1) == b.argmax(1)).sum())
            images += len(target)
            largest = max(largest, float((a - b).abs().max()))
    print(f"simulator: Prec@1 {clean.prec1:.3f}; with N(0, {eps:g}^2) input noise: Prec@1 {noisy.prec1:.3f}; "
          f"top-1 agreement {100.0 * agree / images:.2f} % of {images} images; largest logit difference {largest:.4g}")


if __name__ == "__main__":
    main(sys.argv[1:])
