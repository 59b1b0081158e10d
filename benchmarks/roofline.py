"""Yardsticks measured in the same run: one matmul of the op's shape, and device-to-device copy bandwidth.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .env import free_memory
from .timing import TimingConfig, bench, is_oom, short_reason


# ----------------------------------------------------------------------------------------------------------
# rooflines


def matmul_roofline(hidden: torch.Tensor, weight: torch.Tensor, timing: TimingConfig) -> Dict[str, Any]:
    """One cuBLAS (or CPU BLAS) ``hidden @ weight.T`` into a preallocated output, in the inputs' dtype."""
    n, d = hidden.shape
    vocab = weight.shape[0]
    try:
        out = torch.empty(n, vocab, device=hidden.device, dtype=hidden.dtype)
        t = bench(lambda: torch.mm(hidden, weight.t(), out=out), hidden.device, timing)
    except Exception as exc:  # noqa: BLE001
        return {"status": "oom" if is_oom(exc) else "skipped", "reason": short_reason(exc)}
    finally:
        out = None
        free_memory(hidden.device)
    return {"status": "ok", "ms": t.median, "p20": t.p20, "p80": t.p80, "tflops": 2.0 * n * d * vocab / t.median / 1e9}


def copy_bandwidth(device: torch.device, timing: TimingConfig, nbytes: Optional[int] = None) -> Dict[str, Any]:
    """Device-to-device copy of an ``nbytes`` buffer; TB/s counts the read and the write (2 * nbytes)."""
    nbytes = nbytes or ((2 << 30) if device.type == "cuda" else (64 << 20))
    try:
        src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
        dst = torch.empty_like(src)
        t = bench(lambda: dst.copy_(src), device, timing)
    except Exception as exc:  # noqa: BLE001
        return {"status": "skipped", "reason": short_reason(exc)}
    finally:
        src = dst = None
        free_memory(device)
    return {"status": "ok", "bytes": nbytes, "ms": t.median, "tbps": 2.0 * nbytes / t.median / 1e9}
