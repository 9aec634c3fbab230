#!/usr/bin/env bash
# One-shot check of the fused GEMMLOWP kernels on a GPU machine (no network, no pip): build the CPU and
# CUDA extensions with that machine's own torch, run the parity tests, then the benchmarks.
# Run from the repository root:  bash scripts/gpu_check.sh 2>&1 | tee gpu_check.log
# Each step has its own time limit, cut short where the script's whole budget (GPU_CHECK_SECONDS, default 480:
# 8 minutes) would run out; the most important steps come first.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1  # a step killed by its time limit still shows what it printed
status=0
budget_end=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-480} ))
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

step "parity tests (kernels, statistics, the CUDA kernels against their host emulation, torch.compile)"
# Several workers when pytest-xdist is there, so that a crashing test is reported and the rest still run.
xdist=""
if "$PYTHON" -c "import xdist" 2>/dev/null; then xdist="-n 4"; fi
timeout "$(left 150)" "$PYTHON" -m pytest -q -rfEs --tb=short -p no:cacheprovider $xdist tests/test_kernels.py tests/test_statistics.py \
  tests/test_cuda_emulation.py tests/test_compiled.py || status=1

# eager figures print before compiling starts, so a compile cut short by the limit still leaves them
step "benchmark: GPU kernels + ResNet-50 batch 256, eager and under torch.compile (quantization fused by Inductor)"
timeout "$(left 330)" "$PYTHON" benchmarks/bench_quant.py --device cuda --arch resnet50 --batch-size 256 --repeats 10 \
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
