"""Chunked pure-PyTorch implementations of every op: the CPU path, the fallback, and the readable spec.

Everything here works on flattened inputs that :mod:`edge_kernels.dispatch` has validated: ``hidden [N, D]``,
``weight [V, D]``, ``targets [N]`` (int64), ``logits [N, V]``. No function allocates ``[N, V]``. The logits-in
ops walk the vocabulary in chunks of ``chunk_size`` columns with softmax statistics carried across chunks
online. The hidden-states-in op tiles for the CPU (see "hidden states in" below): its forward takes row
blocks times the whole vocabulary (or vocabulary chunks with online statistics when ``chunk_size < V``), its
backward vocabulary chunks times row blocks. Logits are formed in fp32 and never rounded to 16 bits (16-bit
inputs are upcast, or multiplied by ``mm(..., out_dtype=float32)`` on CUDA), so this path is at least as exact
as the Triton kernels and serves as their fallback.

The math (``docs/algorithms.md``, notation section), with ``z = logits / T`` and ``p = softmax(z)``:

* ``lse = logsumexp(z)``, ``logp = z[target] - lse``, ``H = -sum_v p_v log p_v = lse - sum_v p_v z_v``.
* Streaming statistics per row: ``m`` (running max), ``s = sum exp(z - m)``,
  ``b = sum exp(z - m) (z - m)``; then ``lse = m + log s`` and ``H = log s - b / s``. The shifted form keeps
  the entropy exact for peaked rows, where ``lse`` and ``sum p z`` nearly cancel.
* Gradient w.r.t. ``z`` for upstream grads ``g_l`` (log-prob) and ``g_H`` (entropy):
  ``dz_v = g_l (1[v = target] - p_v) - g_H p_v (log p_v + H)``; w.r.t. raw logits it is ``dz / T``.
  A ``-inf`` logit (a masked vocabulary entry) has ``p = 0`` and contributes nothing.
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
# hidden states in: logits = (hidden @ weight.T + bias) / T
#
# Tiling (measured on a 2-core EPYC, torch 2.13 CPU; see benchmarks/results/cpu_side_by_side.md): each GEMM
# writes an fp32 tile of about TILE_ELEMENTS values with at least MIN_TILE_ROWS rows (fewer rows would
# stream the whole weight from memory once per row block), and every elementwise pass then walks that tile
# in row slices of about CACHE_ELEMENTS values, so the several passes a slice needs (max, shift, exp, sums)
# hit the cache instead of memory. Ignored rows (forward) and rows with zero upstream gradient (backward)
# are compacted away first (one host sync per call): they cost no GEMM work and padding rows holding NaN
# cannot leak into the weight gradient.

TILE_ELEMENTS = 1 << 23  # 32 MiB of fp32 logits per GEMM tile
MIN_TILE_ROWS = 256
MIN_CHUNK_COLS = 256
# Elementwise slice: 16 MiB, so a slice and its exp() stay in a 32 MiB L3 between passes. Smaller (L2-sized)
# slices measured slower on the shared 2-core machine: every op is an OpenMP parallel region, and with more
# runnable threads than cores each region's barrier waits for a descheduled thread (milliseconds per op).
CACHE_ELEMENTS = 1 << 22
FULL_ROW_MAX_VOCAB = 1 << 18  # above this the forward falls back to vocabulary chunks with online statistics
_NEG_CLAMP = -1.0e4  # log p below this has p == 0 exactly in fp32 (exp underflows below -104)


def _row_block(n: int, cols: int) -> int:
    return max(1, min(n, max(MIN_TILE_ROWS, TILE_ELEMENTS // max(cols, 1))))


def _slices(rows: int, cols: int):
    step = max(1, CACHE_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _mixed_mm_ok(t: Tensor) -> bool:
    """16-bit CUDA operands with a torch that multiplies them into fp32 (``mm(..., out_dtype=float32)``,
    probed once per device by the Triton backward's probe): the logits are formed at tensor-core speed and
    never rounded to 16 bits. Elsewhere (CPU torch has no such kernel) the operands are upcast to fp32."""
    if not t.is_cuda or t.dtype == torch.float32 or torch.cuda.is_current_stream_capturing():
        return False
    from .ops.linear_logprob_entropy import _mixed_mm_support  # lazy: that module imports this one

    return _mixed_mm_support(t.device) in ("addmm", "mm")


def _mm_into(out: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0, accumulate: bool = False) -> Tensor:
    """``out (+)= alpha * a @ b`` with an fp32 result; 16-bit CUDA operands go through ``out_dtype``."""
    if a.dtype != torch.float32:  # both 16-bit (CUDA, where _mixed_mm_ok said so)
        prod = torch.mm(a, b, out_dtype=torch.float32)
        if alpha != 1.0:
            prod.mul_(alpha)
        return out.add_(prod) if accumulate else out.copy_(prod)
    # beta=0 ignores out's old contents (even NaN), so no zero fill is needed
    return torch.addmm(out, a, b, beta=1.0 if accumulate else 0.0, alpha=alpha, out=out)


def _logits_tile(h: Tensor, w: Tensor, bias32: Optional[Tensor], inv_temp: float, out: Tensor,
                 softcap: Optional[float] = None) -> Tensor:
    """``out = softcap(h @ w.T + bias) * inv_temp`` in fp32 (without a cap the scale rides on the GEMM's
    alpha; with one the capped tile is formed out of place, the soft-cap path's price)."""
    scale = inv_temp if softcap is None else 1.0
    _mm_into(out, h, w.t(), alpha=scale)
    if bias32 is not None:
        out.add_(bias32, alpha=scale)
    if softcap is not None:
        out.copy_(softcap_tile(out, softcap)).mul_(inv_temp)
    return out


def _cap_factor(z: Tensor, inv_temp: float, softcap: Optional[float]) -> Optional[Tensor]:
    """``d capped / d raw`` of a scaled, capped logits tile ``z`` (None without a cap): the chain-rule factor of
    the logits gradient, read before :func:`_grad_tile` overwrites ``z``."""
    return None if softcap is None else softcap_grad(z / inv_temp, softcap)


def _full_row_stats(z: Tensor, tgt: Tensor, ebuf: Tensor):
    """``(lse, entropy, z[target], shift)`` of fp32 logits rows ``z [r, V]`` holding the whole vocabulary; ``z``
    is overwritten (it becomes ``z - shift``, ``shift`` = the row max, 0 for an all ``-inf`` row). Per cache
    slice: max, shift in place, exp, and the two row sums ``s = sum e`` and ``b = sum e d`` (``d = z - max``;
    ``e d`` formed in place in ``e``, no temporary)."""
    # targets outside [0, V) (a vocabulary shard's rows whose target another shard owns) read 0, as the chunked
    # forward's masked gather gives
    local, inside = _local_targets(tgt, 0, z.shape[1])
    zt = torch.where(inside, z.gather(1, local[:, None]).squeeze(1), torch.zeros((), device=z.device))
    m = z.new_empty(z.shape[0])
    s, b = torch.empty_like(m), torch.empty_like(m)
    for r0, r1 in _slices(z.shape[0], z.shape[1]):
        d, e = z[r0:r1], ebuf[: r1 - r0]
        torch.amax(d, dim=1, out=m[r0:r1])
        d.sub_(_safe_shift(m[r0:r1])[:, None])
        torch.exp(d, out=e)
        torch.sum(e, dim=1, out=s[r0:r1])
        _fix_masked_b(d, e, m[r0:r1], torch.sum(e.mul_(d), dim=1, out=b[r0:r1]))
    lse, entropy = finalize_stats(m, s, b)
    return lse, entropy, zt, _safe_shift(m)


def _fix_masked_b(d: Tensor, ed: Tensor, m: Tensor, b: Tensor) -> None:
    """Rows with a ``-inf`` logit got ``0 * -inf = NaN`` in ``ed = e * d`` and ``b``; recompute them without
    it. A NaN logit makes ``m`` NaN too, so such rows stay NaN (the error propagates, as in the other kernels)."""
    bad = torch.isnan(b) & ~torch.isnan(m)
    if bool(bad.any()):
        idx = bad.nonzero().squeeze(1)
        dd = d.index_select(0, idx)
        ee = torch.exp(dd)
        b.index_copy_(0, idx, (torch.where(ee > 0, dd, torch.zeros_like(dd)) * ee).sum(dim=1))


def _compact(keep: Tensor):
    """Indices of the kept rows, or None when every row is kept (no gather needed)."""
    idx = keep.nonzero().squeeze(1)
    return None if idx.numel() == keep.numel() else idx


def _take(t: Optional[Tensor], idx: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or idx is None else t.index_select(0, idx)


def linear_logprob_entropy_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                               inv_temp: float, ignore_index: int, chunk_size: Optional[int] = None,
                               softcap: Optional[float] = None):
    """Returns ``(logp, entropy, lse)``, fp32 ``[N]``; ignored rows give 0 for all three. ``softcap``: the
    fp32 logits are soft-capped before the temperature (:func:`softcap_tile`).

    Row blocks times the whole vocabulary (exact two-pass statistics, no online rescaling), unless
    ``chunk_size < V`` or ``V > FULL_ROW_MAX_VOCAB``, which walk vocabulary chunks with online statistics.
    16-bit inputs on the CPU: the weight is upcast to fp32 once per call (a transient ``V x D`` fp32 copy)
    because CPU torch has no 16-bit GEMM with fp32 output and a 16-bit output would round the logits."""
    n, vocab = hidden.shape[0], weight.shape[0]
    if (chunk_size is not None and chunk_size < vocab) or vocab > FULL_ROW_MAX_VOCAB:
        return _linear_fwd_vocab_chunks(hidden, weight, bias, targets, inv_temp, ignore_index, chunk_size,
                                        softcap)
    out = torch.zeros((3, n), device=hidden.device)
    idx = _compact(targets != ignore_index)
    h, tgt = _take(hidden, idx), _take(targets, idx)
    if tgt.numel() == 0:
        return out[0], out[1], out[2]
    mixed = _mixed_mm_ok(hidden)
    w, h = (weight, h) if mixed else (weight.float(), h.float())
    bias32 = bias.float() if bias is not None else None
    rows = _row_block(h.shape[0], vocab)
    zbuf = torch.empty((rows, vocab), device=hidden.device)
    ebuf = torch.empty((min(rows, max(1, CACHE_ELEMENTS // vocab)), vocab), device=hidden.device)
    res = torch.empty((3, h.shape[0]), device=hidden.device)
    for r0 in range(0, h.shape[0], rows):
        r1 = min(h.shape[0], r0 + rows)
        z = _logits_tile(h[r0:r1], w, bias32, inv_temp, zbuf[: r1 - r0], softcap)
        lse, ent, zt, _ = _full_row_stats(z, tgt[r0:r1], ebuf)
        res[0, r0:r1], res[1, r0:r1], res[2, r0:r1] = zt - lse, ent, lse
    if idx is None:
        return res[0], res[1], res[2]
    out.index_copy_(1, idx, res)
    return out[0], out[1], out[2]


def _linear_fwd_vocab_chunks(hidden, weight, bias, targets, inv_temp, ignore_index, chunk_size, softcap=None):
    """The forward over vocabulary chunks with streaming ``(m, s, b)`` statistics (every row at once)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    chunk = chunk_size or default_chunk_size(n, vocab)
    mixed = _mixed_mm_ok(hidden)
    h_op = hidden if mixed else hidden.float()
    bias32 = bias.float() if bias is not None else None
    m, s, b = init_stats(n, hidden.device)
    zt = torch.zeros(n, device=hidden.device)
    zbuf = torch.empty((n, min(chunk, vocab)), device=hidden.device)
    for c0, c1 in _chunks(vocab, chunk):
        w = weight[c0:c1] if mixed else weight[c0:c1].float()
        z = _logits_tile(h_op, w, None if bias32 is None else bias32[c0:c1], inv_temp, zbuf[:, : c1 - c0],
                         softcap)
        m, s, b = update_stats(m, s, b, z)
        _gather_target(z, c0, targets, zt)
    lse, entropy = finalize_stats(m, s, b)
    logp, entropy = _finish(zt, lse, entropy, targets != ignore_index)
    return logp, entropy, lse


def _grad_coefs(entropy, grad_logp, grad_entropy, inv_temp):
    """Per-row coefficients of ``dz/dlogits = inv_temp * p * (a + c log p)`` plus ``inv_temp * g_l`` at the
    target: ``a = -g_l - g_H H`` and ``c = -g_H`` (from ``dz = g_l (1[t] - p) - g_H p (log p + H)``)."""
    a = grad_logp * -inv_temp
    if grad_entropy is None:
        return a, None
    return a - grad_entropy * entropy * inv_temp, grad_entropy * -inv_temp


def _grad_tile(z: Tensor, col0: int, tgt: Tensor, lse: Tensor, a: Tensor, c: Optional[Tensor], g_t: Tensor,
               ebuf: Tensor) -> Tensor:
    """Turn the fp32 logits tile ``z [r, cols]`` (columns ``col0...``) into its logits gradient in place."""
    for r0, r1 in _slices(z.shape[0], z.shape[1]):
        lp = z[r0:r1].sub_(lse[r0:r1, None])  # log p
        if c is None:
            torch.exp(lp, out=lp).mul_(a[r0:r1, None])
            continue
        p = torch.exp(lp, out=ebuf[: r1 - r0, : z.shape[1]])
        lp.clamp_(min=_NEG_CLAMP)  # p == 0 there; keeps (a + c log p) finite so 0 * it stays 0
        torch.addcmul(a[r0:r1, None], lp, c[r0:r1, None], out=lp).mul_(p)
    local, in_chunk = _local_targets(tgt, col0, z.shape[1])
    z.scatter_add_(1, local[:, None], torch.where(in_chunk, g_t, torch.zeros_like(g_t))[:, None])
    return z


def linear_logprob_entropy_bwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                               lse: Tensor, entropy: Optional[Tensor], grad_logp: Tensor,
                               grad_entropy: Optional[Tensor], inv_temp: float, chunk_size: Optional[int],
                               needs_hidden: bool, needs_weight: bool, needs_bias: bool,
                               softcap: Optional[float] = None):
    """Gradients ``(d_hidden, d_weight, d_bias)`` (None where not needed), accumulated in fp32 and returned
    in the inputs' dtypes. ``grad_*`` are fp32 and already 0 on ignored rows; ``softcap`` as in the forward.

    Vocabulary chunks outside, row blocks inside: each weight chunk is upcast (16-bit on the CPU) once and
    reused by the logits GEMM and the ``d_hidden`` GEMM, and its ``d_weight`` rows are final when the chunk
    ends, so a 16-bit weight needs only a chunk-sized fp32 accumulator, never a ``V x D`` one."""
    n, vocab = hidden.shape[0], weight.shape[0]
    active = grad_logp != 0 if grad_entropy is None else (grad_logp != 0) | (grad_entropy != 0)
    idx = _compact(active)
    h = _take(hidden, idx)
    dh = torch.zeros(hidden.shape, device=hidden.device) if needs_hidden else None
    dw = torch.zeros_like(weight) if needs_weight else None
    db = torch.zeros(vocab, device=weight.device) if needs_bias else None
    if h.shape[0] == 0:
        return (dh.to(hidden.dtype) if needs_hidden else None), dw, (db.to(bias.dtype) if needs_bias else None)
    lse, g_l = _take(lse, idx), _take(grad_logp, idx)
    a, c = _grad_coefs(_take(entropy, idx), g_l, _take(grad_entropy, idx), inv_temp)
    g_t, tgt = g_l * inv_temp, _take(targets, idx)
    mixed = _mixed_mm_ok(hidden)
    h_op = h if mixed else h.float()
    chunk = chunk_size or min(vocab, max(MIN_CHUNK_COLS, (TILE_ELEMENTS // h.shape[0]) // 256 * 256))
    rows = min(h.shape[0], max(1, TILE_ELEMENTS // min(chunk, vocab)))
    zbuf = torch.empty((rows, min(chunk, vocab)), device=hidden.device)
    ebuf = torch.empty((max(1, CACHE_ELEMENTS // zbuf.shape[1]), zbuf.shape[1]), device=hidden.device)
    dh_act = torch.zeros((h.shape[0], h.shape[1]), device=hidden.device) if needs_hidden else None
    for c0, c1 in _chunks(vocab, chunk):
        w = weight[c0:c1] if mixed else weight[c0:c1].float()
        dw_c = dw[c0:c1] if needs_weight and dw.dtype == torch.float32 else \
            (torch.empty(w.shape, device=w.device) if needs_weight else None)
        bias_c = None if bias is None else bias[c0:c1].float()
        for r0 in range(0, h.shape[0], rows):
            r1 = min(h.shape[0], r0 + rows)
            z = _logits_tile(h_op[r0:r1], w, bias_c, inv_temp, zbuf[: r1 - r0, : c1 - c0], softcap)
            cap = _cap_factor(z, inv_temp, softcap)
            dz = _grad_tile(z, c0, tgt[r0:r1], lse[r0:r1], a[r0:r1], None if c is None else c[r0:r1],
                            g_t[r0:r1], ebuf)
            if cap is not None:
                dz.mul_(cap)
            dz_op = dz.to(h_op.dtype) if mixed else dz  # CUDA out_dtype GEMMs take 16-bit dz, as Triton's
            if needs_hidden:
                _mm_into(dh_act[r0:r1], dz_op, w, accumulate=True)
            if needs_weight:
                _mm_into(dw_c, dz_op.t(), h_op[r0:r1], accumulate=r0 > 0)
            if needs_bias:
                db[c0:c1] += dz.sum(dim=0)
        if needs_weight and dw_c.data_ptr() != dw[c0:c1].data_ptr():
            dw[c0:c1] = dw_c.to(dw.dtype)
    if needs_hidden:
        if idx is None:
            dh = dh_act
        else:
            dh.index_copy_(0, idx, dh_act)
    return (dh.to(hidden.dtype) if needs_hidden else None), dw, (db.to(bias.dtype) if needs_bias else None)


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
