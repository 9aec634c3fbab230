#!/usr/bin/env bash
# A fixed set of driver commands whose every output file (statistics, results rows, plans, precision and
# layer-selection tables, --compare CSVs) must stay the same across a refactor: run it with the old and the new
# code into two folders, then `python scripts/compare_outputs.py OLD NEW`.
# Usage: bash scripts/behaviour_commands.sh OUT [DATA_ROOT]   (mobilenet_v2 with the shared weights; ~10 min on 2 cores)
set -euo pipefail
OUT="$(realpath -m "$1")"
D="$(realpath "${2:-../shared/data}")"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
S="$OUT/stats"
common=(-a mobilenet_v2 --weights "$D/weights/mobilenet_v2_tflite_quant.pth" --data "$D/imagenet-val-2k"
        --cal-data "$D/imagenet-sample/val" -cs 32 --subset 64 -b 32 -j 2 --results "$OUT/results.csv")
run() { echo "+ $*" >&2; python inference_sim.py "${common[@]}" "$@" > /dev/null; }
run                                                   # FP32
run -sm collect -sf "$S"
run -sm collect -sf "$S-pc" -pcq_a
run -sm use -sf "$S" --qtype int4 -th laplace
run -sm use -sf "$S" --qtype int4 -th mse
run -sm use -sf "$S" --qtype int4 -th kld -hr -pcw
run -sm use -sf "$S" --qtype int4 -th laplace -hr -pcw -bca
run -sm use -sf "$S" --qtype int4 -qw int4 -th laplace -hr -pcw -bcw -thw laplace
run -sm use -sf "$S-pc" --qtype int4 -th laplace -hr -pcq_a -baa -baw
run -sm use -sf "$S" -th laplace -hr -ep -ep_a int8,int4
run -sm use -sf "$S" --qtype int4 -th laplace -ct --ct_step 20
run -sm use -sf "$S" --qtype int4,int8 --compare laplace,mse
run -sm no --qtype int4 -th laplace
