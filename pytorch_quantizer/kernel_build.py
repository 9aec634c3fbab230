"""Builds the fused GEMMLOWP kernels from the checkout's ``kernels/`` sources, with one set of flags for both ways.

* On first use (``load``, called by ``backends.kernel_module``): ``torch.utils.cpp_extension.load`` compiles the
  kernel with ninja into a cache folder and imports it.  Later processes find ninja's outputs up to date and only
  import (ninja rebuilds when a source, a header or a flag changes); torch holds a file lock on the folder while it
  builds, so concurrent first uses (several processes, DataLoader workers) build once.  The cache is
  ``build/jit/`` in the checkout, or ``$ACIQ_KERNEL_CACHE``, one subfolder per Python and torch installation.
* By setup.py when torch is importable at build time (``cd kernels && ./build_all.sh``, ``pip install
  --no-build-isolation``): the same sources and flags, as modules next to backends.py; those take precedence.

``ACIQ_BUILD_CPU`` / ``ACIQ_BUILD_CUDA``: unset builds the CPU kernel, and the CUDA one where a CUDA build of torch
and a CUDA toolkit (nvcc) are present, any failure leaving the pure-PyTorch backend in use; ``0`` builds nothing;
``1`` insists (a kernel that cannot be built is an error).  Without a visible GPU TORCH_CUDA_ARCH_LIST defaults to
``DEFAULT_CUDA_ARCHS``.

Imports nothing from the package, and torch only inside functions, so that setup.py can load this file alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
KERNELS_DIR = ROOT / "kernels"
DEFAULT_CUDA_ARCHS = "8.0;8.6;9.0+PTX"
# One IEEE operation per step: no FMA contraction, no fast-math; -fno-trapping-math only lets GCC if-convert
# (vectorise) the per-channel pass-through select, it changes no result.
CXX_FLAGS = ("-O3", "-g0", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math")
OPENMP = ("-fopenmp",) if sys.platform.startswith("linux") else ()
NVCC_FLAGS = ("-O3", "--fmad=false")
# setuptools compiles with CPython's CFLAGS before the extension's own; of those, these change the generated code
# (the others are warnings, and -g / -O3, which CXX_FLAGS restates), so the JIT build passes them too.
SETUPTOOLS_CFLAGS = ("-DNDEBUG", "-fwrapv")

_log = logging.getLogger("pytorch_quantizer")


class NotBuilt(RuntimeError):
    """The kernel is not built here on purpose or for want of what it needs: a reason, not a build failure."""


@dataclass(frozen=True)
class Kernel:
    """One extension: its backend name, module name (TORCH_EXTENSION_NAME), sources and headers (in kernels/)."""

    backend: str
    name: str
    sources: tuple[str, ...]
    depends: tuple[str, ...] = ()

    @property
    def cuda(self) -> bool:
        return self.backend == "cuda"

    @property
    def env(self) -> str:
        return f"ACIQ_BUILD_{self.backend.upper()}"

    @property
    def cxx_flags(self) -> list[str]:
        return [*CXX_FLAGS, *(() if self.cuda else OPENMP)]

    @property
    def link_flags(self) -> list[str]:
        return [] if self.cuda else list(OPENMP)


KERNELS = {
    "cpu": Kernel("cpu", "_gemmlowp_cpu", ("cpu_quantization.cpp",), ("bindings.h", "common.h", "stats_math.h")),
    "cuda": Kernel(
        "cuda",
        "_gemmlowp_cuda",
        ("int_quantization.cpp", "gemmlowp.cu"),
        ("bindings.h", "common.h", "gemmlowp_device.cuh", "stats_math.h"),
    ),
}


def build_setting(backend: str) -> bool | None:
    """``ACIQ_BUILD_<BACKEND>``: True/False for an explicit 1/0-style value, None when unset (automatic)."""
    value = os.environ.get(f"ACIQ_BUILD_{backend.upper()}", "").strip().lower()
    if not value:
        return None
    return value not in ("0", "false", "no", "off")


def guess_cuda_home() -> None:
    """Sets CUDA_HOME to /usr/local/cuda when it is unset and torch's own guess would be wrong: torch takes nvcc's
    grandparent folder, which has no CUDA headers when nvcc is a wrapper script (/usr/local/bin/nvcc)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else ""
    if not _has_cuda_headers(guess) and _has_cuda_headers("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _has_cuda_headers(home: str | None) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def cpp_extension() -> ModuleType:
    """``torch.utils.cpp_extension`` with the CUDA toolkit guessed right (even when it was imported before the
    guess) and without its warning that no GPU is visible, which is no news to a build."""
    guess_cuda_home()
    name = "torch.utils.cpp_extension"
    if name in sys.modules:
        module = sys.modules[name]
    else:
        torch_log = logging.getLogger(name)
        level = torch_log.level
        torch_log.setLevel(logging.ERROR)
        try:
            from torch.utils import cpp_extension as module
        finally:
            torch_log.setLevel(level)
    home = os.environ.get("CUDA_HOME")
    if module.CUDA_HOME is not None and _has_cuda_headers(home) and not _has_cuda_headers(module.CUDA_HOME):
        module.CUDA_HOME = home
    return module


def cuda_unavailable() -> str | None:
    """Why no CUDA kernel can be built here (None when one can): a CUDA build of torch and a CUDA toolkit."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if cpp_extension().CUDA_HOME is None:
        return "no CUDA toolkit found (nvcc; set CUDA_HOME)"
    return None


def cache_dir() -> Path:
    """Where the JIT builds live: ``$ACIQ_KERNEL_CACHE`` or the checkout's build/jit/, then one folder per Python
    and torch installation (the modules are tied to their ABIs; two environments with the same torch each keep
    their own, rather than rebuilding in turn over each other), then one per kernel."""
    import torch

    base = Path(os.environ.get("ACIQ_KERNEL_CACHE") or ROOT / "build" / "jit")
    where = hashlib.sha256(os.path.dirname(os.path.realpath(torch.__file__)).encode()).hexdigest()[:8]
    return base / f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-{where}"


def cuda_arch_list() -> str | None:
    """The TORCH_CUDA_ARCH_LIST to build with when neither the user (that variable) nor torch (the visible GPUs)
    chooses: ``DEFAULT_CUDA_ARCHS``; None when one of them does."""
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.is_available():
        return None
    return DEFAULT_CUDA_ARCHS


@contextlib.contextmanager
def _cuda_arch_list():
    """``cuda_arch_list()`` in the environment for the duration of a build."""
    archs = cuda_arch_list()
    if archs is None:
        yield
        return
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    try:
        yield
    finally:
        del os.environ["TORCH_CUDA_ARCH_LIST"]


def _ensure_ninja() -> None:
    """torch builds with the ``ninja`` on PATH; the PyPI package's is in the virtualenv's bin/, which is not on PATH
    when that Python runs without the environment activated."""
    if shutil.which("ninja"):
        return
    with contextlib.suppress(ImportError):
        import ninja

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def load(kernel: Kernel, kernels_dir: Path | None = None, cache: Path | None = None) -> ModuleType:
    """``kernel`` built (when its build is missing or out of date) and imported.

    Raises NotBuilt when it is switched off (``ACIQ_BUILD_<BACKEND>=0``) or cannot be built here (no sources, no
    CUDA build of torch or no toolkit), and torch's RuntimeError, with the compiler's output, when the build fails."""
    if build_setting(kernel.backend) is False:
        raise NotBuilt(f"{kernel.env}=0")
    sources = [(kernels_dir or KERNELS_DIR) / source for source in kernel.sources]
    missing = [str(source) for source in sources if not source.is_file()]
    if missing:
        raise NotBuilt(f"no kernel sources at {missing[0]} (they are built from a checkout of the project)")
    if kernel.cuda and (why := cuda_unavailable()):
        raise NotBuilt(why)
    cpp = cpp_extension()
    _ensure_ninja()
    build_dir = (cache or cache_dir()) / kernel.name
    build_dir.mkdir(parents=True, exist_ok=True)
    if not (build_dir / f"{kernel.name}{cpp.LIB_EXT}").exists():
        _log.info("GEMMLOWP %s kernel: first use, building it in %s (a minute or two)", kernel.backend, build_dir)
    start, start_ns = time.perf_counter(), time.time_ns()
    try:
        with _cuda_arch_list() if kernel.cuda else contextlib.nullcontext():
            module = cpp.load(
                kernel.name,
                [str(source) for source in sources],
                extra_cflags=[*SETUPTOOLS_CFLAGS, *kernel.cxx_flags],
                extra_cuda_cflags=list(NVCC_FLAGS) if kernel.cuda else None,
                extra_ldflags=kernel.link_flags,
                build_directory=str(build_dir),
                with_cuda=kernel.cuda,
            )
    except Exception:
        # torch notes the sources as built before it builds them, so that a second try in this process would only
        # import the missing module: forget them, a retry compiles again (and shows the compiler's message again).
        cpp.JIT_EXTENSION_VERSIONER.entries.pop(kernel.name, None)
        raise
    built = Path(module.__file__).stat().st_mtime_ns >= start_ns
    _log.log(
        logging.INFO if built else logging.DEBUG,
        "GEMMLOWP %s kernel %s in %.1f s: %s",
        kernel.backend,
        "built" if built else "loaded from the cache",
        time.perf_counter() - start,
        module.__file__,
    )
    return module
