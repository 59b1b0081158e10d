"""Capability probes: what this machine and this torch build can do (triton present, Triton's interpreter on,
16-bit GEMMs with an fp32 result). Torch only; imports nothing else of the package.
"""

from __future__ import annotations

import functools
import os

import torch


def triton_interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def triton_available() -> bool:
    """Whether triton imports (Linux only); imported here, on the first call that needs it, never at package
    import, so ``import edge_kernels`` works without it."""
    try:
        import triton  # noqa: F401  (optional third-party: triton)
    except Exception:  # pragma: no cover - triton missing (macOS/Windows) or broken
        return False
    return True


@functools.lru_cache(maxsize=None)
def mixed_mm_support(device: torch.device) -> str:
    """How this torch build multiplies 16-bit matrices into fp32 on ``device``, probed once per device:
    ``"addmm"`` (``addmm(fp32 acc, a, b, out_dtype=fp32)`` accumulates in the GEMM epilogue, no temporary),
    ``"mm"`` (``mm(a, b, out_dtype=fp32)`` then an add), or ``"none"`` (round the product to 16 bits once)."""
    a = torch.ones((16, 16), device=device, dtype=torch.bfloat16)
    acc = torch.ones((16, 16), device=device, dtype=torch.float32)
    try:
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        if bool((acc == 17).all()):
            return "addmm"
    except (TypeError, RuntimeError, NotImplementedError):
        pass
    try:
        if torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32:
            return "mm"
    except (TypeError, RuntimeError, NotImplementedError):
        pass
    return "none"


def mixed_mm_ok(t: torch.Tensor) -> bool:
    """16-bit CUDA operands with a torch that multiplies them into fp32 (``mm(..., out_dtype=float32)``): the
    PyTorch backend then forms the logits at tensor-core speed, never rounded to 16 bits. Elsewhere (CPU torch
    has no such kernel; a CUDA graph capture forbids the probe's sync) the operands are upcast to fp32."""
    if not t.is_cuda or t.dtype == torch.float32 or torch.cuda.is_current_stream_capturing():
        return False
    return mixed_mm_support(t.device) in ("addmm", "mm")
