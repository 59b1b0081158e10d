"""Chunked pure-PyTorch implementations of every op: the CPU path, the fallback, and the readable spec.

Everything here works on flattened inputs that :mod:`edge_kernels.dispatch` has validated: ``hidden [N, D]``,
``weight [V, D]``, ``targets [N]`` (int64), ``logits [N, V]``. No function allocates ``[N, V]``: the
vocabulary is walked in chunks of ``chunk_size`` columns and softmax statistics are carried across chunks
online. Logits are formed in fp32 (inputs upcast before the matmul), so this path is at least as exact as the
Triton kernels and serves as their fallback.

The math (``docs/algorithms.md``, notation section), with ``z = logits / T`` and ``p = softmax(z)``:

* ``lse = logsumexp(z)``, ``logp = z[target] - lse``, ``H = -sum_v p_v log p_v = lse - sum_v p_v z_v``.
* Streaming statistics per row: ``m`` (running max), ``s = sum exp(z - m)``,
  ``b = sum exp(z - m) (z - m)``; then ``lse = m + log s`` and ``H = log s - b / s``. The shifted form keeps
  the entropy exact for peaked rows, where ``lse`` and ``sum p z`` nearly cancel.
* Gradient w.r.t. ``z`` for upstream grads ``g_l`` (log-prob) and ``g_H`` (entropy):
  ``dz_v = g_l (1[v = target] - p_v) - g_H p_v (log p_v + H)``; w.r.t. raw logits it is ``dz / T``.
  A ``-inf`` logit (a masked vocabulary entry) has ``p = 0`` and contributes nothing.
* Soft-cap (``softcap=c``, Gemma 2/3): the fp32 logits become ``c * tanh(logits / c)`` before the temperature
  (:func:`softcap_tile`; ``-inf`` stays ``-inf``), and the gradient w.r.t. the raw logits gains the factor
  ``1 - tanh^2`` (:func:`softcap_grad`), for the log-prob and the entropy term alike.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .dispatch import default_chunk_size

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------------------
# streaming softmax statistics


def init_stats(n: int, device) -> Tuple[Tensor, Tensor, Tensor]:
    m = torch.full((n,), float("-inf"), device=device, dtype=torch.float32)
    return m, torch.zeros(n, device=device), torch.zeros(n, device=device)


def _safe_shift(m: Tensor) -> Tensor:
    # the shift used for exp(): 0 where the running max is -inf (no finite logit seen yet)
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)


def update_stats(m: Tensor, s: Tensor, b: Tensor, z: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Fold a fp32 logits tile ``z [n, c]`` into the running ``(m, s, b)``."""
    m_new = torch.maximum(m, z.amax(dim=1))
    shift = _safe_shift(m_new)
    alpha = torch.exp(m - shift)
    e = torch.exp(z - shift[:, None])
    d = z - shift[:, None]
    tile_b = (torch.where(e > 0, d, torch.zeros_like(d)) * e).sum(dim=1)  # where() first: no 0 * -inf
    carried_b = b + torch.where(s > 0, m - shift, torch.zeros_like(s)) * s
    return m_new, alpha * s + e.sum(dim=1), alpha * carried_b + tile_b


def combine_stats_stacked(m: Tensor, s: Tensor, b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Merge ``K`` partial statistics stacked as ``[K, n]`` (disjoint vocabulary ranges) in one pass."""
    m_all = m.amax(dim=0)
    shift = _safe_shift(m_all)
    a = torch.exp(m - shift)
    carried = b + torch.where(s > 0, m - shift, torch.zeros_like(s)) * s
    return m_all, (a * s).sum(dim=0), (a * carried).sum(dim=0)


def finalize_stats(m: Tensor, s: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """``(lse, entropy)`` from the streaming statistics."""
    log_s = torch.log(s)
    return _safe_shift(m) + log_s, log_s - b / s


def softcap_tile(z: Tensor, softcap: Optional[float]) -> Tensor:
    """``softcap * tanh(z / softcap)`` on a fp32 logits tile (None: ``z`` unchanged); ``-inf`` entries (masked
    vocabulary) stay ``-inf``."""
    if softcap is None:
        return z
    return torch.where(torch.isneginf(z), z, torch.tanh(z / softcap) * softcap)


def softcap_grad(capped: Tensor, softcap: float) -> Tensor:
    """``d capped / d z = 1 - tanh^2 = 1 - (capped / softcap)^2``; 0 on ``-inf`` (masked) entries."""
    t = capped / softcap
    return torch.where(torch.isneginf(capped), torch.zeros_like(t), 1.0 - t * t)


def grad_logits_tile(z: Tensor, col0: int, targets: Tensor, lse: Tensor, entropy: Optional[Tensor],
                     grad_logp: Tensor, grad_entropy: Optional[Tensor], inv_temp: float,
                     softcap: Optional[float] = None) -> Tensor:
    """Gradient w.r.t. the raw logits of the columns ``[col0, col0 + z.shape[1])`` (fp32 ``z`` is soft-capped
    with ``softcap``, then scaled).

    ``grad_logp``/``grad_entropy`` must already be 0 on ignored rows. A row whose upstream gradients are both 0
    gets exactly 0 (not ``0 * NaN`` from NaN logits of a padding row), as the Triton and CUDA kernels, which
    skip such rows, give.
    """
    p = torch.exp(z - lse[:, None])
    dz = -grad_logp[:, None] * p
    active = grad_logp != 0
    if grad_entropy is not None:
        ent_term = p * torch.where(torch.isneginf(z), torch.zeros_like(p), z - lse[:, None] + entropy[:, None])
        dz = dz - grad_entropy[:, None] * ent_term
        active = active | (grad_entropy != 0)
    dz = torch.where(active[:, None], dz, torch.zeros_like(dz))
    local, in_chunk = _local_targets(targets, col0, z.shape[1])
    dz.scatter_add_(1, local[:, None], torch.where(in_chunk, grad_logp, torch.zeros_like(grad_logp))[:, None])
    if softcap is not None:  # chain rule through the cap: z / inv_temp is the capped logit
        dz = dz * softcap_grad(z / inv_temp, softcap)
    return dz * inv_temp


def _chunks(vocab: int, chunk_size: int):
    for c0 in range(0, vocab, chunk_size):
        yield c0, min(vocab, c0 + chunk_size)


def _local_targets(targets: Tensor, col0: int, cols: int) -> Tuple[Tensor, Tensor]:
    """Targets as column indices of the chunk ``[col0, col0 + cols)`` (clamped into it) and which lie inside.
    Masked gathers and scatters instead of ``nonzero``: no host sync per chunk on a GPU."""
    local = targets - col0
    return local.clamp(0, cols - 1), (local >= 0) & (local < cols)


def _gather_target(z: Tensor, col0: int, targets: Tensor, out: Tensor) -> None:
    local, in_chunk = _local_targets(targets, col0, z.shape[1])
    out.copy_(torch.where(in_chunk, z.gather(1, local[:, None]).squeeze(1), out))


def _finish(zt: Tensor, lse: Tensor, entropy: Tensor, valid: Tensor):
    zero = torch.zeros_like(lse)
    return torch.where(valid, zt - lse, zero), torch.where(valid, entropy, zero)


# ----------------------------------------------------------------------------------------------------------
# hidden states in: logits = (hidden @ weight.T + bias) / T, one chunk of the vocabulary at a time


def _logits_chunk(h32: Tensor, weight: Tensor, bias: Optional[Tensor], c0: int, c1: int, inv_temp: float,
                  softcap: Optional[float] = None):
    z = h32 @ weight[c0:c1].float().t()
    if bias is not None:
        z = z + bias[c0:c1].float()
    return softcap_tile(z, softcap) * inv_temp


def linear_logprob_entropy_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                               inv_temp: float, ignore_index: int, chunk_size: Optional[int] = None,
                               softcap: Optional[float] = None):
    """Returns ``(logp, entropy, lse)``, fp32 ``[N]``; ignored rows give 0 for logp and entropy."""
    n, vocab = hidden.shape[0], weight.shape[0]
    chunk = chunk_size or default_chunk_size(n, vocab)
    h32 = hidden.float()
    m, s, b = init_stats(n, hidden.device)
    zt = torch.zeros(n, device=hidden.device)
    for c0, c1 in _chunks(vocab, chunk):
        z = _logits_chunk(h32, weight, bias, c0, c1, inv_temp, softcap)
        m, s, b = update_stats(m, s, b, z)
        _gather_target(z, c0, targets, zt)
    lse, entropy = finalize_stats(m, s, b)
    logp, entropy = _finish(zt, lse, entropy, targets != ignore_index)
    return logp, entropy, lse


def linear_logprob_entropy_bwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                               lse: Tensor, entropy: Optional[Tensor], grad_logp: Tensor,
                               grad_entropy: Optional[Tensor], inv_temp: float, chunk_size: Optional[int],
                               needs_hidden: bool, needs_weight: bool, needs_bias: bool,
                               softcap: Optional[float] = None):
    """Gradients ``(d_hidden, d_weight, d_bias)`` (None where not needed), accumulated in fp32 and returned
    in the inputs' dtypes. ``grad_*`` are fp32 and already 0 on ignored rows."""
    n, vocab = hidden.shape[0], weight.shape[0]
    chunk = chunk_size or default_chunk_size(n, vocab)
    h32 = hidden.float()
    dh = torch.zeros(hidden.shape, device=hidden.device) if needs_hidden else None
    dw = torch.empty(weight.shape, device=weight.device, dtype=weight.dtype) if needs_weight else None
    db = torch.empty(vocab, device=weight.device, dtype=bias.dtype) if needs_bias else None
    for c0, c1 in _chunks(vocab, chunk):
        z = _logits_chunk(h32, weight, bias, c0, c1, inv_temp, softcap)
        dz = grad_logits_tile(z, c0, targets, lse, entropy, grad_logp, grad_entropy, inv_temp, softcap)
        if needs_hidden:
            dh.addmm_(dz, weight[c0:c1].float())
        if needs_weight:
            dw[c0:c1] = (dz.t() @ h32).to(weight.dtype)
        if needs_bias:
            db[c0:c1] = dz.sum(dim=0).to(bias.dtype)
    return (dh.to(hidden.dtype) if needs_hidden else None), dw, db


# ----------------------------------------------------------------------------------------------------------
# logits in


def logprob_entropy_fwd(logits: Tensor, targets: Tensor, inv_temp: float, ignore_index: int,
                        chunk_size: Optional[int] = None, softcap: Optional[float] = None):
    """``logits [N, V]`` (any float dtype, any row stride) -> ``(logp, entropy, lse)`` fp32 ``[N]``."""
    n, vocab = logits.shape
    chunk = chunk_size or default_chunk_size(n, vocab)
    m, s, b = init_stats(n, logits.device)
    zt = torch.zeros(n, device=logits.device)
    for c0, c1 in _chunks(vocab, chunk):
        z = softcap_tile(logits[:, c0:c1].float(), softcap) * inv_temp
        m, s, b = update_stats(m, s, b, z)
        _gather_target(z, c0, targets, zt)
    lse, entropy = finalize_stats(m, s, b)
    logp, entropy = _finish(zt, lse, entropy, targets != ignore_index)
    return logp, entropy, lse


def logprob_entropy_bwd(logits: Tensor, targets: Tensor, lse: Tensor, entropy: Optional[Tensor],
                        grad_logp: Tensor, grad_entropy: Optional[Tensor], inv_temp: float,
                        out: Tensor, chunk_size: Optional[int] = None, softcap: Optional[float] = None) -> Tensor:
    """Write the logits gradient into ``out`` (which may be ``logits`` itself: each chunk is read before it
    is overwritten)."""
    n, vocab = logits.shape
    chunk = chunk_size or default_chunk_size(n, vocab)
    for c0, c1 in _chunks(vocab, chunk):
        z = softcap_tile(logits[:, c0:c1].float(), softcap) * inv_temp
        dz = grad_logits_tile(z, c0, targets, lse, entropy, grad_logp, grad_entropy, inv_temp, softcap)
        out[:, c0:c1] = dz.to(out.dtype)
    return out
