"""Build hooks; the package metadata lives in pyproject.toml.

* Default (``pip install .``, ``pip install -e .``): a pure-Python package, no compiler, torch not imported at
  build time. The CUDA sources of ``csrc/`` are copied into the package (``edge_kernels/csrc/``) so that
  ``impl="cuda"`` can be built just in time, with ninja, on a machine that has ``nvcc``.
* ``EDGE_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation .``: also compiles the extension ahead of time
  into ``edge_kernels/_cuda_ext`` with torch's ``CUDAExtension``/``BuildExtension``. It needs the CUDA build of
  torch the package will run with, importable at build time (hence ``--no-build-isolation``), and ``nvcc``.
  ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (e.g. ``"8.0;9.0"``; default: the visible GPUs').
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
SOURCE_SUFFIXES = (".cu", ".cuh", ".cpp", ".h")


def build_cuda_requested() -> bool:
    return os.environ.get("EDGE_KERNELS_BUILD_CUDA", "").strip().lower() in ("1", "true", "yes", "on")


class BuildPyWithCudaSources(build_py):
    """build_py that also ships csrc/ as edge_kernels/csrc/ (what the just-in-time build compiles)."""

    def run(self):
        super().run()
        if not CSRC.is_dir():  # e.g. an sdist made without csrc/: impl="cuda" then says it lacks sources
            return
        dest = Path(self.build_lib) / "edge_kernels" / "csrc"
        self.mkpath(str(dest))
        for f in sorted(CSRC.iterdir()):
            if f.suffix in SOURCE_SUFFIXES:
                self.copy_file(str(f), str(dest / f.name))


def _cuda_module():
    """edge_kernels/backends/cuda.py loaded by path (the build needs its flags, not the installed package)."""
    path = ROOT / "edge_kernels" / "backends" / "cuda.py"
    spec = importlib.util.spec_from_file_location("_edge_kernels_cuda_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cuda_build_kwargs() -> dict:
    """setup() arguments for the ahead-of-time CUDA build, or {} when it is not requested."""
    if not build_cuda_requested():
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:
        raise SystemExit(
            f"EDGE_KERNELS_BUILD_CUDA=1: torch must be importable at build time ({e}); install the CUDA build of "
            "torch first, then: EDGE_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation ."
        ) from e
    if torch.version.cuda is None:
        raise SystemExit(f"EDGE_KERNELS_BUILD_CUDA=1: torch {torch.__version__} is a CPU-only build; the CUDA "
                         "extension needs a CUDA build of torch")
    if CUDA_HOME is None:
        raise SystemExit("EDGE_KERNELS_BUILD_CUDA=1: nvcc was not found; install the CUDA toolkit and set CUDA_HOME")
    cuda = _cuda_module()
    ext = CUDAExtension(
        name=cuda.AOT_MODULE,
        sources=[f"csrc/{s}" for s in cuda.SOURCES],  # relative to this file, as setuptools wants
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": list(cuda.CXX_FLAGS), "nvcc": list(cuda.NVCC_FLAGS)},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


def setup_kwargs() -> dict:
    kwargs = cuda_build_kwargs()
    kwargs.setdefault("cmdclass", {})["build_py"] = BuildPyWithCudaSources
    return kwargs


if __name__ == "__main__":
    setup(**setup_kwargs())
