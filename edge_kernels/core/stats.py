"""Streaming softmax statistics and their merge: the arithmetic every backend and the vocabulary-parallel merge share.

Per row, over the logits ``z`` seen so far: ``m`` (running max), ``s = sum exp(z - m)`` and
``b = sum exp(z - m) (z - m)``; then ``lse = m + log s`` and the entropy ``H = log s - b / s``
(``docs/algorithms.md``, notation). The shifted form keeps the entropy exact for peaked rows, where ``lse`` and
``sum p z`` nearly cancel. The Triton kernels carry the same three numbers (``backends/triton/common.py``).
Torch only; imports nothing else of the package.
"""

from __future__ import annotations

from typing import Tuple

import torch

Tensor = torch.Tensor


def init_stats(n: int, device) -> Tuple[Tensor, Tensor, Tensor]:
    m = torch.full((n,), float("-inf"), device=device, dtype=torch.float32)
    return m, torch.zeros(n, device=device), torch.zeros(n, device=device)


def safe_shift(m: Tensor) -> Tensor:
    # the shift used for exp(): 0 where the running max is -inf (no finite logit seen yet)
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)


def update_stats(m: Tensor, s: Tensor, b: Tensor, z: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Fold a fp32 logits tile ``z [n, c]`` into the running ``(m, s, b)``."""
    m_new = torch.maximum(m, z.amax(dim=1))
    shift = safe_shift(m_new)
    alpha = torch.exp(m - shift)
    e = torch.exp(z - shift[:, None])
    d = z - shift[:, None]
    tile_b = (torch.where(e > 0, d, torch.zeros_like(d)) * e).sum(dim=1)  # where() first: no 0 * -inf
    carried_b = b + torch.where(s > 0, m - shift, torch.zeros_like(s)) * s
    return m_new, alpha * s + e.sum(dim=1), alpha * carried_b + tile_b


def combine_stats_stacked(m: Tensor, s: Tensor, b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Merge ``K`` partial statistics stacked as ``[K, n]`` (disjoint vocabulary ranges) in one pass."""
    m_all = m.amax(dim=0)
    shift = safe_shift(m_all)
    a = torch.exp(m - shift)
    carried = b + torch.where(s > 0, m - shift, torch.zeros_like(s)) * s
    return m_all, (a * s).sum(dim=0), (a * carried).sum(dim=0)


def finalize_stats(m: Tensor, s: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """``(lse, entropy)`` from the streaming statistics."""
    log_s = torch.log(s)
    return safe_shift(m) + log_s, log_s - b / s
