"""Write a mobilenet_v2 state_dict with the same float function as the input but a per-tensor collapse built in:
issue 24's check of ``--equalize``.

Where a block's projection feeds only the next block's expansion, with no activation between (features.1 ->
features.2 and features.17 -> features.18), every 4th output channel of the projection (its BatchNorm's affine
parameters, which folding carries into the conv) is multiplied by ``--factor`` and the consumer's matching input
channel divided by it. The float network computes the same function (up to float rounding), but a per-tensor grid
of those projections, and of their outputs, spends its levels on the magnified channels.

    python scripts/skew_mobilenet_v2.py --weights ../shared/data/weights/mobilenet_v2_tflite_quant.pth \\
        --out /tmp/mnv2_skewed.pth [--factor 1000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

PAIRS = (("features.1.conv.1", "features.1.conv.2", "features.2.conv.0.0"),
         ("features.17.conv.2", "features.17.conv.3", "features.18.0"))  # (projection, its BatchNorm, consumer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--factor", type=float, default=1000.0)
    args = parser.parse_args(argv)
    if not args.weights.is_file():
        parser.error(f"--weights {args.weights}: no such file")
    if not args.factor > 0:
        parser.error(f"--factor must be > 0, got {args.factor}")
    state = torch.load(args.weights, weights_only=True)
    for conv, bn, consumer in PAIRS:
        channels = state[f"{conv}.weight"].shape[0]
        factor = torch.ones(channels)
        factor[::4] = args.factor
        for name in ("weight", "bias"):  # BN(y) = gamma (y - mu) / sigma + beta: k gamma, k beta give k BN(y)
            state[f"{bn}.{name}"] = state[f"{bn}.{name}"] * factor
        state[f"{consumer}.weight"] = state[f"{consumer}.weight"] / factor.view(1, -1, 1, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(args.out)
    print(f"wrote {args.out}: {len(PAIRS)} projections with every 4th channel x{args.factor:g}")


if __name__ == "__main__":
    main()
