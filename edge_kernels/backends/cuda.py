"""The CUDA C++ extension in ``csrc/`` (``impl="cuda"``): locate, build, load, and call it.

Only ``edge_kernels.logprob_entropy`` (logits in) has CUDA C++ kernels. They are reached through
``torch.library`` operators, ``torch.ops.edge_kernels.logprob_entropy_fwd`` / ``logprob_entropy_bwd``, whose
fake implementations are registered here so ``torch.compile`` can trace callers.

Loading, in order:

1. the ahead-of-time build ``edge_kernels._cuda_ext`` (``EDGE_KERNELS_BUILD_CUDA=1 pip install
   --no-build-isolation .``, see ``setup.py``);
2. else a just-in-time build with ninja through :func:`torch.utils.cpp_extension.load`, on first use, cached in
   ``$EDGE_KERNELS_CACHE_DIR``, else ``$XDG_CACHE_HOME/edge_kernels``, else ``~/.cache/edge_kernels``, in a
   folder per torch version, CUDA version and GPU architectures (``torch2.11.0+cu130-cu13.0-sm90``); later
   processes reuse it (torch rebuilds only when a source or flag changes). ``TORCH_CUDA_ARCH_LIST`` overrides
   the architectures (default: those of the visible GPUs). ``EDGE_KERNELS_VERBOSE_BUILD=1`` shows the build;
   ``EDGE_KERNELS_CUDA_JIT=1`` ignores a prebuilt extension.

Everything that cannot work says why, before any compiler runs (:func:`unavailable_reason`): a CPU-only or
ROCm build of PyTorch, no visible GPU, no ``nvcc``, no ``ninja``.

This module imports nothing from the rest of the package (``setup.py`` loads it by path for the build flags).
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

OPS_NAMESPACE = "edge_kernels"
JIT_NAME = "edge_kernels_cuda"
AOT_MODULE = "edge_kernels._cuda_ext"
SOURCES = ("logprob_entropy.cu", "bindings.cpp")
HEADERS = ("logprob_entropy.h",)

# Flags of our own, on top of those torch.utils.cpp_extension adds (its COMMON_NVCC_FLAGS, -std, the ABI).
NVCC_FLAGS = ["-O3", "-lineinfo"]
CXX_FLAGS = ["-O3"]

_lock = threading.Lock()
_module = None  # the loaded extension module
_fakes_registered: set = set()


# ----------------------------------------------------------------------------------------------------------
# where things are


def source_dir() -> Path:
    """The folder holding the CUDA sources: ``edge_kernels/csrc`` in an installed wheel (setup.py copies them
    there), ``<checkout>/csrc`` in a source checkout or an editable install."""
    package = Path(__file__).resolve().parent.parent  # edge_kernels/ (this file is edge_kernels/backends/cuda.py)
    for cand in (package / "csrc", package.parent / "csrc"):
        if all((cand / s).is_file() for s in SOURCES):
            return cand
    raise RuntimeError(
        f"edge_kernels: the CUDA sources {SOURCES} were found neither in {package / 'csrc'} nor in "
        f"{package.parent / 'csrc'}; reinstall edge-kernels from a wheel or a source checkout"
    )


def source_files() -> List[Path]:
    d = source_dir()
    return [d / s for s in SOURCES]


def _sanitize(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", s)


def arch_flags() -> Tuple[List[str], str]:
    """``(-gencode flags, tag)`` for the JIT build: the visible GPUs' architectures (PTX of the newest one
    embedded too), or, when ``TORCH_CUDA_ARCH_LIST`` is set, no flags (torch applies it) and a tag from it."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return [], "arch-" + _sanitize(env.replace(" ", "_").replace(";", "_"))
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    flags = [f"-gencode=arch=compute_{ma}{mi},code=sm_{ma}{mi}" for ma, mi in caps]
    if caps:
        ma, mi = caps[-1]
        flags.append(f"-gencode=arch=compute_{ma}{mi},code=compute_{ma}{mi}")
    return flags, "-".join(f"sm{ma}{mi}" for ma, mi in caps) or "noarch"


def cache_root() -> Path:
    if os.environ.get("EDGE_KERNELS_CACHE_DIR"):
        return Path(os.environ["EDGE_KERNELS_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "edge_kernels"


def cache_dir(arch_tag: Optional[str] = None) -> Path:
    """The JIT build folder for this torch, CUDA version and architecture list."""
    if arch_tag is None:
        arch_tag = arch_flags()[1]
    return cache_root() / _sanitize(f"torch{torch.__version__}-cu{torch.version.cuda}-{arch_tag}")


# ----------------------------------------------------------------------------------------------------------
# can it work here?


def _nvcc_path() -> Optional[str]:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home:
        cand = Path(home) / "bin" / "nvcc"
        if cand.is_file():
            return str(cand)
    return None


def _aot_importable() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(AOT_MODULE) is not None
    except (ImportError, ValueError):
        return False


def _force_jit() -> bool:
    """``EDGE_KERNELS_CUDA_JIT=1``: ignore a prebuilt extension and build just in time (tests, debugging)."""
    return os.environ.get("EDGE_KERNELS_CUDA_JIT", "0") not in ("", "0")


def unavailable_reason() -> Optional[str]:
    """Why ``impl="cuda"`` cannot run in this process, or None when it can (nothing is built here)."""
    if _module is not None:
        return None
    if getattr(torch.version, "hip", None):
        return (f"this PyTorch ({torch.__version__}) is a ROCm build; the csrc/ kernels are CUDA C++ only "
                "(use impl='triton')")
    if torch.version.cuda is None:
        return (f"this PyTorch ({torch.__version__}) is a CPU-only build; impl='cuda' needs a CUDA build of "
                "PyTorch (a +cuXXX wheel) and an NVIDIA GPU")
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    if _aot_importable() and not _force_jit():
        return None
    if _nvcc_path() is None:
        return (f"nvcc was not found, so the extension cannot be built on first use: install the CUDA toolkit "
                f"(major version {torch.version.cuda.split('.')[0]}, like this PyTorch's CUDA "
                f"{torch.version.cuda}) and set CUDA_HOME or put nvcc on PATH; or build ahead of time on a "
                f"machine that has it: EDGE_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation edge-kernels")
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja was not found; the just-in-time build needs it: pip install ninja"
    return None


def is_available() -> bool:
    """True when ``impl="cuda"`` can run (the extension is loaded, importable, or buildable); builds nothing."""
    return unavailable_reason() is None


# ----------------------------------------------------------------------------------------------------------
# loading


def _register_fakes(namespace: str = OPS_NAMESPACE) -> None:
    """Fake (meta) implementations of the operators, for FakeTensor tracing (torch.compile, torch.export)."""
    if namespace in _fakes_registered:
        return

    def fwd_fake(x, targets, inv_temp, ignore_index, splits=0, softcap=0.0):
        n = targets.numel()
        return tuple(x.new_empty((n,), dtype=torch.float32) for _ in range(3))

    def bwd_fake(x, targets, lse, entropy, grad_logp, grad_entropy, inv_temp, out, splits=0, softcap=0.0):
        return None

    torch.library.register_fake(f"{namespace}::logprob_entropy_fwd")(fwd_fake)
    torch.library.register_fake(f"{namespace}::logprob_entropy_bwd")(bwd_fake)
    _fakes_registered.add(namespace)


def _jit_build(verbose: bool):
    from torch.utils import cpp_extension

    flags, tag = arch_flags()
    build_dir = cache_dir(tag)
    build_dir.mkdir(parents=True, exist_ok=True)
    src = source_dir()
    try:
        return cpp_extension.load(
            name=JIT_NAME,
            sources=[str(p) for p in source_files()],
            extra_cflags=list(CXX_FLAGS),
            extra_cuda_cflags=list(NVCC_FLAGS) + flags,
            extra_include_paths=[str(src)],
            build_directory=str(build_dir),
            with_cuda=True,
            is_python_module=True,
            verbose=verbose,
        )
    except Exception as e:  # compiler errors, version mismatches, a locked or unwritable cache...
        raise RuntimeError(
            f"edge_kernels: building the CUDA extension (impl='cuda') failed: {e}\n"
            f"  sources: {src}\n  build folder: {build_dir} (delete it to start clean; "
            f"EDGE_KERNELS_VERBOSE_BUILD=1 shows the compiler output; EDGE_KERNELS_CACHE_DIR moves it)\n"
            f"  nvcc: {_nvcc_path()}, torch {torch.__version__} built with CUDA {torch.version.cuda}"
        ) from e


def load():
    """Load the extension (building it on first use if needed) and return its Python module.

    Raises ``RuntimeError`` saying what is missing when it cannot work here."""
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"edge_kernels: impl='cuda' is unavailable: {reason}")
        mod = None
        if _aot_importable() and not _force_jit():
            import importlib
            import warnings

            try:
                mod = importlib.import_module(AOT_MODULE)
            except ImportError as e:  # e.g. built against another torch: fall back to the JIT build
                warnings.warn(f"edge_kernels: the prebuilt {AOT_MODULE} does not load ({e}); building just in time",
                              stacklevel=2)
        if mod is None:
            if _nvcc_path() is None:
                raise RuntimeError("edge_kernels: impl='cuda' is unavailable: the prebuilt extension does not "
                                   "load and nvcc was not found to build it")
            mod = _jit_build(os.environ.get("EDGE_KERNELS_VERBOSE_BUILD", "0") not in ("", "0"))
        _register_fakes(OPS_NAMESPACE)
        _module = mod
        return mod


def ops():
    """``torch.ops.edge_kernels``, loading the extension first if needed."""
    if _module is None:
        load()
    return getattr(torch.ops, OPS_NAMESPACE)


# ----------------------------------------------------------------------------------------------------------
# launchers (the signatures of edge_kernels.backends.triton.logprob_entropy's triton_fwd / triton_bwd); ``params`` is
# an edge_kernels.core.params.LaunchParams. The operators take softcap = 0.0 for "no soft-cap".


def logprob_entropy_fwd(x3, targets, params):
    """``x3 [B, T, V]`` (unit vocab stride), ``targets`` int64 ``[B*T]`` -> ``(logp, entropy, lse)`` fp32.

    Rows whose target is ``ignore_index`` are not read; all three outputs are 0 there."""
    return ops().logprob_entropy_fwd(x3, targets, float(params.inv_temp), int(params.ignore_index),
                                     softcap=float(params.softcap or 0.0))


def logprob_entropy_bwd(x3, targets, lse, entropy, grad_logp, grad_entropy, params, out3):
    """Write dlogits into ``out3`` (may be ``x3``) and return it."""
    ops().logprob_entropy_bwd(x3, targets, lse, entropy, grad_logp, grad_entropy, float(params.inv_temp), out3,
                              softcap=float(params.softcap or 0.0))
    return out3


# ----------------------------------------------------------------------------------------------------------
# standalone compile commands (CPU CI compiles the sources with nvcc without a GPU or a CUDA torch)


def _torch_cxx_std() -> str:
    from torch.utils import cpp_extension

    try:
        text = Path(cpp_extension.__file__).read_text()
    except OSError:
        return "-std=c++17"
    return "-std=c++20" if "-std=c++20" in text else "-std=c++17"


def standalone_compile_flags(extension_name: str = JIT_NAME,
                             defines: Sequence[str] = ()) -> Tuple[List[str], List[str]]:
    """``(nvcc flags, c++ flags)`` equivalent to what ``torch.utils.cpp_extension`` passes when building this
    extension (its common nvcc flags, C++ standard, ABI, extension defines, include folders, Python headers)
    plus ours, without any ``-gencode``/``-c``/``-o``. Works with a CPU-only torch."""
    import sysconfig

    from torch.utils import cpp_extension

    std = _torch_cxx_std()
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    includes = []
    for p in [str(source_dir())] + cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]:
        includes += ["-isystem", p] if p != str(source_dir()) else ["-I", p]
    common = [abi, "-DTORCH_API_INCLUDE_EXTENSION_H", f"-DTORCH_EXTENSION_NAME={extension_name}",
              *[f"-D{d}" for d in defines], *includes]
    nvcc_common = list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))
    nvcc = [*nvcc_common, std, "-Xcompiler", "-fPIC", *NVCC_FLAGS, *common]
    cxx = [std, "-fPIC", *CXX_FLAGS, *common]
    return nvcc, cxx
