#!/usr/bin/env bash
# One-shot check of the fused GEMMLOWP kernels on a GPU machine (no network, no pip): build the CPU and
# CUDA extensions with that machine's own torch, run the parity tests, then the benchmarks.
# Run from the repository root:  bash scripts/gpu_check.sh 2>&1 | tee gpu_check.log
# Each step has its own time limit, cut short where the script's whole budget (GPU_CHECK_SECONDS, default 570:
# 9.5 minutes, so one run fits a 10-minute slot) would run out; the most important steps come first: the builds,
# the per-channel level-count CUDA kernel, the parity tests, torchrun --nproc_per_node 1 (NCCL) against a plain
# run, the pass benchmark (benchmarks/bench_pass.py) on ResNet-50 batch 256, then the kernel benchmarks.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1  # a step killed by its time limit still shows what it printed
status=0
budget_end=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-570} ))
left() {  # left <seconds>: that limit, or what is left of the budget when that is less (at least 1 s)
  local rest=$(( budget_end - $(date +%s) ))
  if (( rest < $1 )); then echo $(( rest > 1 ? rest : 1 )); else echo "$1"; fi
}
step() { echo; echo "=== $1 ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
nproc
"$PYTHON" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU')"
nvcc --version | tail -1
"$("$PYTHON" -c 'from torch.utils.cpp_extension import get_cxx_compiler as c; print(c())')" --version | head -1

# Two separate builds side by side (own build folders), so that a CUDA failure or time-out still leaves the
# CPU kernel built: setuptools copies the .so files into the tree only when its build_ext run finishes.
build() {  # build <what> <seconds> <env...>
  local what=$1 limit=$2; shift 2
  local start log="${TMPDIR:-/tmp}/aciq_build_$what.log"
  start=$(date +%s)
  if env "$@" MAX_JOBS="${MAX_JOBS:-8}" timeout "$limit" "$PYTHON" setup.py build_ext --inplace \
      --build-lib "build/lib_$what" --build-temp "build/temp_$what" > "$log" 2>&1; then
    echo "$what build OK in $(( $(date +%s) - start )) s" >> "$log"
  else
    echo "BUILD OF $what FAILED after $(( $(date +%s) - start )) s" >> "$log"
    return 1
  fi
}
step "build the CPU and CUDA extensions in place"
rm -f pytorch_quantizer/_gemmlowp_*.so
build cpu "$(left 180)" ACIQ_BUILD_CUDA=0 & cpu_pid=$!
build cuda "$(left 240)" ACIQ_BUILD_CPU=0 ACIQ_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" & cuda_pid=$!
wait $cpu_pid || status=1
wait $cuda_pid || status=1
for what in cpu cuda; do echo "--- $what build log (tail)"; tail -n 12 "${TMPDIR:-/tmp}/aciq_build_$what.log"; done
ls -l pytorch_quantizer/_gemmlowp_*.so || status=1

step "diagnostics: signed zero in ATen's CUDA clamp/round, kernel refusals in a child process"
timeout "$(left 60)" "$PYTHON" - <<'PY' || status=1
import subprocess, sys, torch
if torch.cuda.is_available():
    z = torch.tensor([-0.0, -1e-45], device="cuda")
    print("ATen CUDA: clamp_(0, 255) of -0.0 ->", z.clone().clamp_(0.0, 255.0).tolist(),
          " round_(-0.0) ->", z[:1].clone().round_().tolist(), " -1e-45 * 1e-4 ->", (z[1:] * 1e-4).tolist())
code = ("import torch; from pytorch_quantizer import backends as b\n"
        "for n, d in (('cpu', 'cpu'), ('cuda', 'cuda')):\n"
        "    m = b.kernel_module(n)\n"
        "    if m is None or (d == 'cuda' and not torch.cuda.is_available()): continue\n"
        "    try: m.quantize_(torch.zeros(10, device=d), torch.zeros(9, device=d), 1.0, 1.0, 0.0, 255.0)\n"
        "    except RuntimeError as e: print(n, 'refuses:', str(e).splitlines()[0])\n")
r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
print(r.stdout, r.stderr[-2000:], "child exit code", r.returncode)
PY

step "the per-channel level-count CUDA kernel (bit allocation's per-channel qmax), which had compiled but never run"
# -rA lists every case that ran: the cuda cases must be among them, not skipped
timeout "$(left 60)" "$PYTHON" -m pytest -q -rA --tb=short -p no:cacheprovider tests/test_kernels.py \
  -k "per_channel_levels" 2>&1 | tee "${TMPDIR:-/tmp}/aciq_levels.log" | tail -n 40 || status=1
grep -q "PASSED.*cuda" "${TMPDIR:-/tmp}/aciq_levels.log" || { echo "NO CUDA CASE OF THE PER-CHANNEL KERNEL RAN"; status=1; }

step "parity tests (kernels, statistics, the CUDA kernels against their host emulation, torch.compile)"
# Several workers when pytest-xdist is there, so that a crashing test is reported and the rest still run.
xdist=""
if "$PYTHON" -c "import xdist" 2>/dev/null; then xdist="-n 4"; fi
timeout "$(left 150)" "$PYTHON" -m pytest -q -rfEs --tb=short -p no:cacheprovider $xdist tests/test_kernels.py tests/test_statistics.py \
  tests/test_cuda_emulation.py tests/test_compiled.py || status=1

# random JPEGs in an ImageNet layout (no dataset on this machine): decoding is part of each pass, as on real photos
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" - "$work/data" <<'PY' || status=1
import sys
from pathlib import Path
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for i in range(512):
    folder = Path(sys.argv[1]) / "val" / f"n{1440764 + i % 8:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(folder / f"img_{i}.JPEG", quality=90)
print("512 random 500x375 JPEGs")
PY

step "torchrun --nproc_per_node 1 (NCCL) against a plain run: the same statistics folder byte for byte, and the time"
common=(--data "$work/data" -a resnet18 --weights none -b 128 -j 4 --device cuda -sm collect --results "$work/r.csv")
timeout "$(left 60)" "$PYTHON" inference_sim.py "${common[@]}" -sf "$work/plain" || status=1
timeout "$(left 60)" torchrun --standalone --nproc_per_node 1 inference_sim.py "${common[@]}" -sf "$work/torchrun" || status=1
"$PYTHON" - "$work" <<'PY' || status=1
import sys
from pathlib import Path
from pytorch_quantizer.stats import folder_fingerprint
work = Path(sys.argv[1])
plain, dist = folder_fingerprint(work / "plain"), folder_fingerprint(work / "torchrun")
print("statistics folders", "IDENTICAL" if plain == dist else "DIFFER", plain[:16], dist[:16])
sys.exit(plain != dist)
PY
timeout "$(left 120)" "$PYTHON" benchmarks/bench_distributed.py --no-cpu --arch resnet18 --gpu-images 1024 --rounds 2 \
  || status=1

step "pass benchmark: every kind of pass against a plain torchvision loop, ResNet-50 batch 256 (benchmarks/bench_pass.py)"
timeout "$(left 200)" "$PYTHON" benchmarks/bench_pass.py --device cuda --data "$work/data" --arch resnet50 --images 512 \
  --batch-size 256 --workers 8 --rounds 1 --compare-widths int4 --log benchmarks/logs/bench_pass_resnet50_gpu.txt \
  || status=1

# eager figures print before compiling starts, so a compile cut short by the limit still leaves them
step "benchmark: GPU kernels + ResNet-50 batch 256, eager and under torch.compile (quantization fused by Inductor)"
timeout "$(left 150)" "$PYTHON" benchmarks/bench_quant.py --device cuda --arch resnet50 --batch-size 256 --repeats 10 \
  --compile || status=1

step "benchmark: GPU kernels one call at a time (the host's Python per call not hidden behind the GPU's work)"
timeout "$(left 40)" "$PYTHON" benchmarks/bench_quant.py --device cuda --part kernels --repeats 5 --calls 1 || status=1

step "benchmark: ResNet-50 batch 256 with BatchNorm kept, like the first GPU measurement"
timeout "$(left 90)" "$PYTHON" benchmarks/bench_quant.py --device cuda --arch resnet50 --batch-size 256 --part model \
  --no-fold-bn --model-repeats 5 || status=1

step "benchmark: CPU kernels on this machine's cores"
timeout "$(left 60)" "$PYTHON" benchmarks/bench_quant.py --device cpu --part kernels --repeats 5 || status=1

step "done: status $status"
exit $status
