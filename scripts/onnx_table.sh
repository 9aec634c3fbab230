#!/usr/bin/env bash
# The README's ONNX table (docs/onnx.md): simulator against ONNX Runtime top-1 for mobilenet_v2 and
# efficientnet_lite0 at W8A8 per tensor, W8A8 with per-channel weights (-pcw), W8A4 and W4A4, calibrated on 500 of
# the sample's photos and evaluated on the 2277 photos of imagenet-val-2k.  Each row is one run: the simulator's pass,
# the export and ONNX Runtime's pass (its closing lines and an `onnxruntime` results row with top-1 agreement and the
# largest logit difference).  -pz everywhere: 0.0 on a level, so the exported grids are the simulator's exactly;
# -hr --onnx_relu_pairs: one-sided grids capped at ReLU6's 6 and repeated after each ReLU6 (values unchanged), so
# that ORT fuses most convs into QLinearConv at W8A8 (41 of 52 on mobilenet_v2 instead of 7).  W4A4 with -bca
# (4-bit weights score ~0 without it, README); -bcw/-vcw move weights off their grid and cannot be exported.
# Usage: bash scripts/onnx_table.sh [DATA_ROOT]   (default ../shared/data); SUBSET=N evaluates N images only.
# About 2 passes of 2277 images per row (simulator + ORT): 5-10 min a row on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
D="${1:-../shared/data}"
OUT="${OUT:-results/onnx}"
MV2=(-a mobilenet_v2 --weights "$D/weights/mobilenet_v2_tflite_quant.pth")
LITE=(-a efficientnet_lite0)
SUB=(${SUBSET:+--subset "$SUBSET"})
mkdir -p "$OUT"
run() { python inference_sim.py --cal-data "$D/imagenet-sample/val" -cs 500 --data "$D/imagenet-val-2k" -b 100 -j 2 \
          --results "$OUT/results.csv" "${SUB[@]}" "$@"; }
ROWS=(
  "w8a8:--qtype int8 -pz -hr --onnx_relu_pairs"
  "w8a8_pcw:--qtype int8 -pz -hr -pcw --onnx_relu_pairs"
  "w8a4:--qtype int4 -th laplace -hr -pz --onnx_relu_pairs"
  "w4a4:--qtype int4 -qw int4 -pcw -th laplace -hr -pz -bca --onnx_relu_pairs"
)
for model in MV2 LITE; do
  declare -n args="$model"
  stats="$OUT/statistics/${model,,}"
  [ -f "$stats/meta.json" ] || run "${args[@]}" -sm collect -sf "$stats"
  for entry in "${ROWS[@]}"; do
    name="${entry%%:*}"; read -r -a flags <<< "${entry#*:}"
    echo "== ${model,,} $name: ${flags[*]}"
    log="$OUT/${model,,}_$name.log"
    run "${args[@]}" -sm use -sf "$stats" "${flags[@]}" --export_onnx "$OUT/${model,,}_$name.onnx" --eval_onnx \
      > "$log" 2>&1 || { tail -1 "$log"; exit 1; }
    grep -E "^ \* |ONNX|optimised" "$log"
  done
done
