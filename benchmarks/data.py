"""LLM-like inputs (``make_linear_data``, ``make_logits_data``) and the float64 oracle the errors are measured
against (row chunks on the same device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch


# ----------------------------------------------------------------------------------------------------------
# LLM-like data


@dataclass
class LinearData:
    hidden: torch.Tensor  # [N, D]
    weight: torch.Tensor  # [V, D]
    targets: torch.Tensor  # [N] int64


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _target_logits(n: int, vocab: int, logit_std: float, margin_lo: float, margin_hi: float, g, device):
    """Target logit per row: the non-target logits are ~N(0, logit_std^2), whose logsumexp is about
    ``log V + logit_std^2 / 2``; the target sits a uniform random ``[margin_lo, margin_hi]`` above that, so
    ``p_target`` ranges from a few percent (entropy of several nats) to ~1 (entropy ~0)."""
    base = math.log(vocab) + 0.5 * logit_std ** 2
    u = torch.rand(n, generator=g, device=device) * (margin_hi - margin_lo) + margin_lo
    return base + u


def make_linear_data(n: int, d: int, vocab: int, dtype: torch.dtype, device: torch.device, *, seed: int = 0,
                     logit_std: float = 3.0, margin: tuple = (-4.0, 12.0)) -> LinearData:
    """``hidden [N, D]``, ``weight [V, D]``, ``targets [N]`` with LLM-like logits ``hidden @ weight.T``.

    ``weight ~ N(0, logit_std^2 / D)`` and ``hidden ~ N(0, 1)`` give non-target logits of std ``logit_std``;
    each row's hidden state is then moved along ``w_target / |w_target|^2`` so that its target logit equals a
    per-row value drawn by :func:`_target_logits`. Generated in fp32 on ``device``, rounded to ``dtype`` last.
    """
    g = _generator(device, seed)
    weight = (torch.randn(vocab, d, generator=g, device=device) * (logit_std / math.sqrt(d))).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g, device=device)
    hidden = torch.randn(n, d, generator=g, device=device)
    want = _target_logits(n, vocab, logit_std, margin[0], margin[1], g, device)
    w_t = weight[targets].float()
    have = (hidden * w_t).sum(-1)
    hidden += ((want - have) / (w_t * w_t).sum(-1).clamp_min(1e-12))[:, None] * w_t
    return LinearData(hidden.to(dtype), weight, targets)


def make_logits_data(n: int, vocab: int, dtype: torch.dtype, device: torch.device, *, seed: int = 0,
                     logit_std: float = 3.0, margin: tuple = (-4.0, 12.0)):
    """``(logits [N, V], targets [N])``: Gaussian non-target logits and a target logit per row as in
    :func:`make_linear_data` (no matmul needed)."""
    g = _generator(device, seed)
    logits = torch.empty(n, vocab, device=device, dtype=dtype)
    targets = torch.randint(0, vocab, (n,), generator=g, device=device)
    want = _target_logits(n, vocab, logit_std, margin[0], margin[1], g, device)
    rows = max(1, (1 << 26) // vocab)  # fill in fp32 slabs of <= 256 MiB
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        slab = torch.randn(r1 - r0, vocab, generator=g, device=device) * logit_std
        slab[torch.arange(r1 - r0, device=device), targets[r0:r1]] = want[r0:r1]
        logits[r0:r1] = slab.to(dtype)
    return logits, targets


# ----------------------------------------------------------------------------------------------------------
# float64 oracle


def _oracle_rows(z: torch.Tensor, t: torch.Tensor):
    """fp64 ``z [r, V]`` (consumed) -> ``(logp, entropy)``."""
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, t[:, None]).squeeze(1) - lse
    z.sub_(lse[:, None])  # log p
    p = z.exp()
    ent = -(p * torch.where(p > 0, z, torch.zeros_like(z))).sum(-1)
    return logp, ent


@torch.no_grad()
def oracle_linear(hidden, weight, targets, *, bias=None, temperature: float = 1.0, chunk_elems: int = 1 << 27):
    """float64 ``(logp, entropy)`` of ``(hidden @ weight.T + bias) / temperature``, ``chunk_elems`` logits
    (1 GiB of fp64) at a time, on the inputs' device. The weight is upcast once (``V * D * 8`` bytes)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    w64 = weight.double()
    b64 = None if bias is None else bias.double()
    logp = torch.empty(n, dtype=torch.float64, device=hidden.device)
    ent = torch.empty_like(logp)
    rows = max(1, chunk_elems // vocab)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        z = hidden[r0:r1].double() @ w64.t()
        if b64 is not None:
            z += b64
        if temperature != 1.0:
            z /= temperature
        logp[r0:r1], ent[r0:r1] = _oracle_rows(z, targets[r0:r1])
        del z
    return logp, ent


@torch.no_grad()
def oracle_logits(logits, targets, *, temperature: float = 1.0, chunk_elems: int = 1 << 27):
    n, vocab = logits.shape
    logp = torch.empty(n, dtype=torch.float64, device=logits.device)
    ent = torch.empty_like(logp)
    rows = max(1, chunk_elems // vocab)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        z = logits[r0:r1].double()
        if temperature != 1.0:
            z /= temperature
        logp[r0:r1], ent[r0:r1] = _oracle_rows(z, targets[r0:r1])
        del z
    return logp, ent


def entropy_stats(ent64: torch.Tensor, logp64: Optional[torch.Tensor] = None) -> Dict[str, float]:
    e = ent64.float()
    out = {"mean": float(e.mean()), "min": float(e.min()), "median": float(e.median()), "max": float(e.max())}
    if logp64 is not None:
        out["mean_p_target"] = float(logp64.exp().mean())
    return out


def describe_entropy(stats: Dict[str, float]) -> str:
    s = (f"entropy (fp64 oracle) mean {stats['mean']:.2f} nats, median {stats['median']:.2f}, "
         f"range [{stats['min']:.3g}, {stats['max']:.2f}]")
    if "mean_p_target" in stats:
        s += f"; mean p(target) {stats['mean_p_target']:.2f}"
    return s
