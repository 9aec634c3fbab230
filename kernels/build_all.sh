#!/usr/bin/env bash
# Builds the fused GEMMLOWP kernels in place (next to pytorch_quantizer/backends.py),
# with the Python that holds torch: the CPU kernel always, the CUDA kernel where nvcc and CUDA torch are
# present (ACIQ_BUILD_CUDA=1 insists, =0 skips; TORCH_CUDA_ARCH_LIST picks the GPUs, see setup.py).
# Optional: without it the kernels are compiled on first use (pytorch_quantizer/kernel_build.py, same sources and
# flags); modules built here take precedence over those (delete pytorch_quantizer/_gemmlowp_*.so to go back).
# Usage: cd kernels && ./build_all.sh        (PYTHON=/path/to/python to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
start=$(date +%s)
"$PYTHON" setup.py build_ext --inplace
echo "build_all.sh: built in $(( $(date +%s) - start )) s:"
ls -1 pytorch_quantizer/_gemmlowp_*.so
