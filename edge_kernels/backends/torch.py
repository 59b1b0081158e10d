"""The PyTorch backend of every op: the CPU path and the fallback elsewhere (the readable spec is
:mod:`edge_kernels.oracle`).

Everything here works on flattened inputs that :mod:`edge_kernels.ops.validation` has checked: ``hidden [N, D]``,
``weight [V, D]``, ``targets [N]`` (int64), ``logits [N, V]``. No function allocates ``[N, V]``. The logits-in
ops walk the vocabulary in chunks of ``chunk_size`` columns with the streaming statistics of
:mod:`edge_kernels.core.stats` carried across chunks. The hidden-states-in op tiles for the CPU (see "hidden
states in" below): its forward takes row blocks times the whole vocabulary (or vocabulary chunks with online
statistics when ``chunk_size < V``), its backward vocabulary chunks times row blocks. Logits are formed in fp32
and never rounded to 16 bits (16-bit inputs are upcast, or multiplied by ``mm(..., out_dtype=float32)`` on
CUDA), so this path is at least as exact as the Triton kernels. The math: ``docs/algorithms.md``, notation, and
:mod:`edge_kernels.core.tiles` for the gradient.

The public tile helpers (``logits_tile``, ``full_row_stats``, ``grad_coefs``, ``grad_tile``, ``mm_into``,
``compact_rows``, ``take_rows``, ``row_block``, ``cap_factor``) are also the building blocks of the fused
policy loss's three-matmul path (:mod:`edge_kernels.losses.three_matmul`). The registry entries are the
``*_forward``/``*_backward`` functions at the end (signatures: :mod:`edge_kernels.backends`).
"""

from __future__ import annotations

from typing import Optional, overload

import torch

from ..core.params import LaunchParams, default_chunk_size
from ..core.probes import mixed_mm_ok
from ..core.stats import combine_stats_stacked, finalize_stats, init_stats, safe_shift, update_stats
from ..core.tiles import grad_logits_tile, local_targets, softcap_grad, softcap_tile

Tensor = torch.Tensor

__all__ = ["combine_stats_stacked", "finalize_stats", "init_stats", "update_stats", "softcap_grad",
           "softcap_tile", "grad_logits_tile"]  # re-exported: the statistics the tiles below are built from


# ----------------------------------------------------------------------------------------------------------
# vocabulary chunks


def _chunks(vocab: int, chunk_size: int):
    for c0 in range(0, vocab, chunk_size):
        yield c0, min(vocab, c0 + chunk_size)


def _gather_target(z: Tensor, col0: int, targets: Tensor, out: Tensor) -> None:
    local, in_chunk = local_targets(targets, col0, z.shape[1])
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


def row_block(n: int, cols: int) -> int:
    return max(1, min(n, max(MIN_TILE_ROWS, TILE_ELEMENTS // max(cols, 1))))


def _slices(rows: int, cols: int):
    step = max(1, CACHE_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def mm_into(out: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0, accumulate: bool = False) -> Tensor:
    """``out (+)= alpha * a @ b`` with an fp32 result; 16-bit CUDA operands go through ``out_dtype``."""
    if a.dtype != torch.float32:  # both 16-bit (CUDA, where mixed_mm_ok said so)
        prod = torch.mm(a, b, out_dtype=torch.float32)
        if alpha != 1.0:
            prod.mul_(alpha)
        return out.add_(prod) if accumulate else out.copy_(prod)
    # beta=0 ignores out's old contents (even NaN), so no zero fill is needed
    return torch.addmm(out, a, b, beta=1.0 if accumulate else 0.0, alpha=alpha, out=out)


def logits_tile(h: Tensor, w: Tensor, bias32: Optional[Tensor], inv_temp: float, out: Tensor,
                 softcap: Optional[float] = None) -> Tensor:
    """``out = softcap(h @ w.T + bias) * inv_temp`` in fp32 (without a cap the scale rides on the GEMM's
    alpha; with one the capped tile is formed out of place, the soft-cap path's price)."""
    scale = inv_temp if softcap is None else 1.0
    mm_into(out, h, w.t(), alpha=scale)
    if bias32 is not None:
        out.add_(bias32, alpha=scale)
    if softcap is not None:
        out.copy_(softcap_tile(out, softcap)).mul_(inv_temp)
    return out


def cap_factor(z: Tensor, inv_temp: float, softcap: Optional[float]) -> Optional[Tensor]:
    """``d capped / d raw`` of a scaled, capped logits tile ``z`` (None without a cap): the chain-rule factor of
    the logits gradient, read before :func:`grad_tile` overwrites ``z``."""
    return None if softcap is None else softcap_grad(z / inv_temp, softcap)


def full_row_stats(z: Tensor, tgt: Tensor, ebuf: Tensor):
    """``(lse, entropy, z[target], shift)`` of fp32 logits rows ``z [r, V]`` holding the whole vocabulary; ``z``
    is overwritten (it becomes ``z - shift``, ``shift`` = the row max, 0 for an all ``-inf`` row). Per cache
    slice: max, shift in place, exp, and the two row sums ``s = sum e`` and ``b = sum e d`` (``d = z - max``;
    ``e d`` formed in place in ``e``, no temporary)."""
    # targets outside [0, V) (a vocabulary shard's rows whose target another shard owns) read 0, as the chunked
    # forward's masked gather gives
    local, inside = local_targets(tgt, 0, z.shape[1])
    zt = torch.where(inside, z.gather(1, local[:, None]).squeeze(1), torch.zeros((), device=z.device))
    m = z.new_empty(z.shape[0])
    s, b = torch.empty_like(m), torch.empty_like(m)
    for r0, r1 in _slices(z.shape[0], z.shape[1]):
        d, e = z[r0:r1], ebuf[: r1 - r0]
        torch.amax(d, dim=1, out=m[r0:r1])
        d.sub_(safe_shift(m[r0:r1])[:, None])
        torch.exp(d, out=e)
        torch.sum(e, dim=1, out=s[r0:r1])
        _fix_masked_b(d, e, m[r0:r1], torch.sum(e.mul_(d), dim=1, out=b[r0:r1]))
    lse, entropy = finalize_stats(m, s, b)
    return lse, entropy, zt, safe_shift(m)


def _fix_masked_b(d: Tensor, ed: Tensor, m: Tensor, b: Tensor) -> None:
    """Rows with a ``-inf`` logit got ``0 * -inf = NaN`` in ``ed = e * d`` and ``b``; recompute them without
    it. A NaN logit makes ``m`` NaN too, so such rows stay NaN (the error propagates, as in the other kernels)."""
    bad = torch.isnan(b) & ~torch.isnan(m)
    if bool(bad.any()):
        idx = bad.nonzero().squeeze(1)
        dd = d.index_select(0, idx)
        ee = torch.exp(dd)
        b.index_copy_(0, idx, (torch.where(ee > 0, dd, torch.zeros_like(dd)) * ee).sum(dim=1))


def compact_rows(keep: Tensor):
    """Indices of the kept rows, or None when every row is kept (no gather needed)."""
    idx = keep.nonzero().squeeze(1)
    return None if idx.numel() == keep.numel() else idx


@overload
def take_rows(t: Tensor, idx: Optional[Tensor]) -> Tensor: ...
@overload
def take_rows(t: None, idx: Optional[Tensor]) -> None: ...


def take_rows(t: Optional[Tensor], idx: Optional[Tensor]) -> Optional[Tensor]:
    """The rows ``idx`` of ``t`` (all of them when ``idx`` is None; None stays None)."""
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
    idx = compact_rows(targets != ignore_index)
    h, tgt = take_rows(hidden, idx), take_rows(targets, idx)
    if tgt.numel() == 0:
        return out[0], out[1], out[2]
    mixed = mixed_mm_ok(hidden)
    w, h = (weight, h) if mixed else (weight.float(), h.float())
    bias32 = bias.float() if bias is not None else None
    rows = row_block(h.shape[0], vocab)
    zbuf = torch.empty((rows, vocab), device=hidden.device)
    ebuf = torch.empty((min(rows, max(1, CACHE_ELEMENTS // vocab)), vocab), device=hidden.device)
    res = torch.empty((3, h.shape[0]), device=hidden.device)
    for r0 in range(0, h.shape[0], rows):
        r1 = min(h.shape[0], r0 + rows)
        z = logits_tile(h[r0:r1], w, bias32, inv_temp, zbuf[: r1 - r0], softcap)
        lse, ent, zt, _ = full_row_stats(z, tgt[r0:r1], ebuf)
        res[0, r0:r1], res[1, r0:r1], res[2, r0:r1] = zt - lse, ent, lse
    if idx is None:
        return res[0], res[1], res[2]
    out.index_copy_(1, idx, res)
    return out[0], out[1], out[2]


def _linear_fwd_vocab_chunks(hidden, weight, bias, targets, inv_temp, ignore_index, chunk_size, softcap=None):
    """The forward over vocabulary chunks with streaming ``(m, s, b)`` statistics (every row at once)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    chunk = chunk_size or default_chunk_size(n, vocab)
    mixed = mixed_mm_ok(hidden)
    h_op = hidden if mixed else hidden.float()
    bias32 = bias.float() if bias is not None else None
    m, s, b = init_stats(n, hidden.device)
    zt = torch.zeros(n, device=hidden.device)
    zbuf = torch.empty((n, min(chunk, vocab)), device=hidden.device)
    for c0, c1 in _chunks(vocab, chunk):
        w = weight[c0:c1] if mixed else weight[c0:c1].float()
        z = logits_tile(h_op, w, None if bias32 is None else bias32[c0:c1], inv_temp, zbuf[:, : c1 - c0],
                         softcap)
        m, s, b = update_stats(m, s, b, z)
        _gather_target(z, c0, targets, zt)
    lse, entropy = finalize_stats(m, s, b)
    logp, entropy = _finish(zt, lse, entropy, targets != ignore_index)
    return logp, entropy, lse


def grad_coefs(entropy, grad_logp, grad_entropy, inv_temp):
    """Per-row coefficients of ``dz/dlogits = inv_temp * p * (a + c log p)`` plus ``inv_temp * g_l`` at the
    target: ``a = -g_l - g_H H`` and ``c = -g_H`` (from ``dz = g_l (1[t] - p) - g_H p (log p + H)``)."""
    a = grad_logp * -inv_temp
    if grad_entropy is None:
        return a, None
    return a - grad_entropy * entropy * inv_temp, grad_entropy * -inv_temp


def grad_tile(z: Tensor, col0: int, tgt: Tensor, lse: Tensor, a: Tensor, c: Optional[Tensor], g_t: Tensor,
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
    local, in_chunk = local_targets(tgt, col0, z.shape[1])
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
    vocab = weight.shape[0]
    active = grad_logp != 0 if grad_entropy is None else (grad_logp != 0) | (grad_entropy != 0)
    idx = compact_rows(active)
    h = take_rows(hidden, idx)
    dw = torch.zeros_like(weight) if needs_weight else None
    db = torch.zeros(vocab, device=weight.device) if needs_bias and bias is not None else None
    if h.shape[0] == 0:
        dh0 = torch.zeros_like(hidden) if needs_hidden else None
        return dh0, dw, (None if db is None or bias is None else db.to(bias.dtype))
    lse, g_l = take_rows(lse, idx), take_rows(grad_logp, idx)
    a, c = grad_coefs(take_rows(entropy, idx), g_l, take_rows(grad_entropy, idx), inv_temp)
    g_t, tgt = g_l * inv_temp, take_rows(targets, idx)
    mixed = mixed_mm_ok(hidden)
    h_op = h if mixed else h.float()
    chunk = chunk_size or min(vocab, max(MIN_CHUNK_COLS, (TILE_ELEMENTS // h.shape[0]) // 256 * 256))
    rows = min(h.shape[0], max(1, TILE_ELEMENTS // min(chunk, vocab)))
    zbuf = torch.empty((rows, min(chunk, vocab)), device=hidden.device)
    ebuf = torch.empty((max(1, CACHE_ELEMENTS // zbuf.shape[1]), zbuf.shape[1]), device=hidden.device)
    dh_act = torch.zeros((h.shape[0], h.shape[1]), device=hidden.device) if needs_hidden else None
    for c0, c1 in _chunks(vocab, chunk):
        w = weight[c0:c1] if mixed else weight[c0:c1].float()
        dw_c = None if dw is None else dw[c0:c1] if dw.dtype == torch.float32 else \
            torch.empty(w.shape, device=w.device)
        bias_c = None if bias is None else bias[c0:c1].float()
        for r0 in range(0, h.shape[0], rows):
            r1 = min(h.shape[0], r0 + rows)
            z = logits_tile(h_op[r0:r1], w, bias_c, inv_temp, zbuf[: r1 - r0, : c1 - c0], softcap)
            cap = cap_factor(z, inv_temp, softcap)
            dz = grad_tile(z, c0, tgt[r0:r1], lse[r0:r1], a[r0:r1], None if c is None else c[r0:r1],
                            g_t[r0:r1], ebuf)
            if cap is not None:
                dz.mul_(cap)
            dz_op = dz.to(h_op.dtype) if mixed else dz  # CUDA out_dtype GEMMs take 16-bit dz, as Triton's
            if dh_act is not None:
                mm_into(dh_act[r0:r1], dz_op, w, accumulate=True)
            if dw_c is not None:
                mm_into(dw_c, dz_op.t(), h_op[r0:r1], accumulate=r0 > 0)
            if db is not None:
                db[c0:c1] += dz.sum(dim=0)
        if dw is not None and dw_c is not None and dw_c.data_ptr() != dw[c0:c1].data_ptr():
            dw[c0:c1] = dw_c.to(dw.dtype)
    dh = None
    if dh_act is not None:
        dh = dh_act if idx is None else \
            torch.zeros(hidden.shape, device=hidden.device).index_copy_(0, idx, dh_act)
    db_out = None if db is None or bias is None else db.to(bias.dtype)
    return (None if dh is None else dh.to(hidden.dtype)), dw, db_out


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


# ----------------------------------------------------------------------------------------------------------
# the registry's signatures (edge_kernels.backends): tensors positionally, the settings in one LaunchParams


def linear_forward(hidden, weight, bias, targets, params: LaunchParams):
    return linear_logprob_entropy_fwd(hidden, weight, bias, targets, params.inv_temp, params.ignore_index,
                                      params.chunk_size, softcap=params.softcap)


def linear_backward(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, params: LaunchParams,
                    needs):
    return linear_logprob_entropy_bwd(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
                                      params.inv_temp, params.chunk_size, needs[0], needs[1], needs[2],
                                      softcap=params.softcap)


def logits_forward(x3, targets, params: LaunchParams):
    return logprob_entropy_fwd(x3.reshape(-1, x3.shape[-1]), targets, params.inv_temp, params.ignore_index,
                               params.chunk_size, softcap=params.softcap)


def logits_backward(x3, targets, lse, entropy, grad_logp, grad_entropy, params: LaunchParams, out3):
    # the chunked path works on [N, V]; a strided [B, T, V] view is walked one batch row at a time
    t = x3.shape[1]
    for i in range(x3.shape[0]):
        sl = slice(i * t, (i + 1) * t)
        logprob_entropy_bwd(
            x3[i], targets[sl], lse[sl], None if entropy is None else entropy[sl], grad_logp[sl],
            None if grad_entropy is None else grad_entropy[sl], params.inv_temp, out3[i], params.chunk_size,
            softcap=params.softcap,
        )
    return out3
