#!/usr/bin/env bash
# The commands behind the main Results table (docs/results.md): every row is one -ep sweep (FP32, then W8A8 .. W8A4)
# on the images not used for calibration, its table written to results/precision/*_<settings>.csv and its rows
# appended to results/results.csv.  Usage: bash scripts/readme_results.sh [DATA_ROOT]   (default ../shared/data)
# About 6 passes of 750 images per sweep: 5-15 min each on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
D="${1:-../shared/data}"
SAMPLE="$D/imagenet-sample"
MV2=(-a mobilenet_v2 --weights "$D/weights/mobilenet_v2_tflite_quant.pth")
LITE=(-a efficientnet_lite0)
run() { python inference_sim.py --data "$SAMPLE" -b 100 -j 2 "$@"; }

run "${MV2[@]}"                                                     # FP32 on all 1000 images: 80.0
for model in MV2 LITE; do
  declare -n args="$model"
  stats="results/statistics/${model,,}"
  run "${args[@]}" -cs 250 -sm collect -sf "$stats"                 # outputs, the seed's placement
  run "${args[@]}" -cs 250 -sm collect -sf "${stats}_in" --act_point input
  for th in no laplace; do run "${args[@]}" -sm use -th "$th" -ep -sf "$stats"; done
  run "${args[@]}" -sm use -th laplace -hr -ep -sf "$stats"         # + ReLU-aware (half range)
  run "${args[@]}" -sm use -th laplace --act_point input -ep -sf "${stats}_in"
done
run "${LITE[@]}" -sm use -th laplace -hr -pcw -ep -sf results/statistics/lite            # + per-channel weights
run "${MV2[@]}" -sm use -th laplace -hr -qw int4 -pcw -ep -sf results/statistics/mv2   # W4 per channel
