"""Triton kernels and launchers of :func:`edge_kernels.logprob_entropy` (logits in).

Imported by :func:`edge_kernels.backends.get` on the first ``impl="triton"`` call only, so the package
works without triton. The launchers take ``[B, T, V]`` logits (unit vocabulary stride, any row strides), the
flat targets and one :class:`~edge_kernels.core.params.LaunchParams`. A soft-cap is a compile-time branch
(``HAS_SOFTCAP``): ``c * tanh(x / c)`` on the fp32 logits before the temperature, ``1 - tanh^2`` in the backward.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import (
    cdiv,
    grad_logits,
    interpreting,
    kept_logits,
    load_row_grads,
    next_pow2,
    on_device,
    softcap_logits,
    softmax_stats_finalize,
    softmax_stats_update,
)
from ...core.params import LaunchParams


@triton.jit
def _row_offsets(offs_r, T, stride_b, stride_t):
    r = offs_r.to(tl.int64)
    return (r // T) * stride_b + (r % T) * stride_t


@triton.jit
def _logits_stats_fwd_kernel(
    X, TGT, LOGP, ENT, LSE, TAU, LOGW, N, V, T, stride_b, stride_t, inv_temp, ignore_index, softcap,
    HAS_SOFTCAP: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr, HAS_TRUNC: tl.constexpr = False,
):
    # HAS_TRUNC (sampling truncation, edge_kernels.backends.truncated): statistics of the kept logits z' of the row
    # thresholds TAU/LOGW, and LOGP receives the target's raw z (the caller finishes log-prob and entropy)
    offs_r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    r_mask = offs_r < N
    x_rows = X + _row_offsets(offs_r, T, stride_b, stride_t)[:, None]
    tgt = tl.load(TGT + offs_r, mask=r_mask, other=ignore_index)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    s = tl.zeros([ROWS], tl.float32)
    b = tl.zeros([ROWS], tl.float32)
    zt = tl.zeros([ROWS], tl.float32)
    if HAS_TRUNC:
        tau = tl.load(TAU + offs_r, mask=r_mask, other=0.0)
        log_w = tl.load(LOGW + offs_r, mask=r_mask, other=0.0)
    else:
        tau = zt
        log_w = zt
    # rows whose targets are all ignored (padding) are never read: their outputs are 0 and their statistics
    # those of one zero logit (lse = 0), which the backward never uses (their gradient is 0)
    v_end = V
    if tl.max((tgt != ignore_index).to(tl.int32), 0) == 0:
        v_end = 0
        m = tl.zeros([ROWS], tl.float32)
        s = tl.full([ROWS], 1.0, tl.float32)
    for v0 in range(0, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < V
        x = tl.load(x_rows + offs_v[None, :], mask=r_mask[:, None] & v_mask[None, :], other=float("-inf"))
        z = softcap_logits(x.to(tl.float32), softcap, HAS_SOFTCAP) * inv_temp
        z = tl.where(v_mask[None, :], z, float("-inf"))
        m, s, b = softmax_stats_update(m, s, b, kept_logits(z, tau, log_w, HAS_TRUNC))
        zt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), 1)
    lse, ent = softmax_stats_finalize(m, s, b)
    valid = tgt != ignore_index
    if HAS_TRUNC:
        tl.store(LOGP + offs_r, zt, mask=r_mask)
    else:
        tl.store(LOGP + offs_r, tl.where(valid, zt - lse, 0.0), mask=r_mask)
    tl.store(ENT + offs_r, tl.where(valid, ent, 0.0), mask=r_mask)
    tl.store(LSE + offs_r, lse, mask=r_mask)


@triton.jit
def _logits_grad_kernel(
    X, DX, TGT, LSE, ENT, G_LOGP, G_ENT, TAU, LOGW, N, V, T, stride_b, stride_t, dstride_b, dstride_t, inv_temp,
    softcap, HAS_GRAD_ENTROPY: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_TRUNC: tl.constexpr = False,
):
    offs_r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    r_mask = offs_r < N
    tgt, lse, ent, g_logp, g_ent, active = load_row_grads(TGT, LSE, ENT, G_LOGP, G_ENT, offs_r, r_mask,
                                                          HAS_GRAD_ENTROPY)
    # rows with zero upstream gradient (ignored, padding, loss-masked) get exact zeros without reading logits
    row_active = r_mask & active
    mask = row_active[:, None] & (offs_v < V)[None, :]
    x = tl.load(X + _row_offsets(offs_r, T, stride_b, stride_t)[:, None] + offs_v[None, :], mask=mask, other=0.0)
    z = softcap_logits(x.to(tl.float32), softcap, HAS_SOFTCAP) * inv_temp
    zk = z
    if HAS_TRUNC:
        tau = tl.load(TAU + offs_r, mask=r_mask, other=0.0)
        log_w = tl.load(LOGW + offs_r, mask=r_mask, other=0.0)
        zk = kept_logits(z, tau, log_w, HAS_TRUNC)
    dz = grad_logits(z, offs_v[None, :] == tgt[:, None], lse, ent, g_logp, g_ent, inv_temp, softcap,
                     HAS_GRAD_ENTROPY, HAS_SOFTCAP, zk, HAS_TRUNC)
    dz = tl.where(mask, dz, 0.0)
    tl.store(DX + _row_offsets(offs_r, T, dstride_b, dstride_t)[:, None] + offs_v[None, :],
             dz.to(DX.dtype.element_ty), mask=r_mask[:, None] & (offs_v < V)[None, :])


def _config(n: int, vocab: int, dtype: torch.dtype, interpret: Optional[bool] = None):
    if interpreting() if interpret is None else interpret:
        return dict(ROWS=min(16, next_pow2(n)), BLOCK_V=min(1024, next_pow2(vocab))), {}
    block_v = min(4096 if dtype != torch.float32 else 2048, next_pow2(vocab))
    return dict(ROWS=1, BLOCK_V=block_v), dict(num_warps=8 if block_v >= 2048 else 4)


def triton_fwd(x3, targets, params: LaunchParams):
    """``(logp, entropy, lse)`` (the backend signature every logits-in backend shares)."""
    return kept_fwd(x3, targets, params, None)


def triton_bwd(x3, targets, lse, entropy, grad_logp, grad_entropy, params: LaunchParams, out3):
    return kept_bwd(x3, targets, lse, entropy, grad_logp, grad_entropy, params, out3, None)


def kept_fwd(x3, targets, params: LaunchParams, th):
    """:func:`triton_fwd`, or with ``th`` (a sampling-truncation threshold) ``(z_target, lse, entropy')`` of the
    kept logits, for :mod:`edge_kernels.ops.truncated` to finish."""
    bsz, t, vocab = x3.shape
    n = bsz * t
    cfg, launch = _config(n, vocab, x3.dtype)
    out = torch.empty((3, n), device=x3.device, dtype=torch.float32)
    with on_device(x3):
        _logits_stats_fwd_kernel[(cdiv(n, cfg["ROWS"]),)](
            x3, targets, out[0], out[1], out[2], out[2] if th is None else th.tau, out[2] if th is None else th.log_w,
            n, vocab, t, x3.stride(0), x3.stride(1), params.inv_temp, params.ignore_index, params.softcap or 1.0,
            HAS_SOFTCAP=params.softcap is not None, HAS_TRUNC=th is not None, **cfg, **launch,
        )
    if th is not None:
        return out[0], out[2], out[1]
    return out[0], out[1], out[2]


def kept_bwd(x3, targets, lse, entropy, grad_logp, grad_entropy, params: LaunchParams, out3, th):
    """:func:`triton_bwd`, or with ``th`` the gradient of the truncated log-prob and entropy."""
    bsz, t, vocab = x3.shape
    n = bsz * t
    cfg, launch = _config(n, vocab, x3.dtype)
    has_ge = grad_entropy is not None
    with on_device(x3):
        _logits_grad_kernel[(cdiv(n, cfg["ROWS"]), cdiv(vocab, cfg["BLOCK_V"]))](
            x3, out3, targets, lse, entropy if has_ge else lse, grad_logp, grad_entropy if has_ge else grad_logp,
            lse if th is None else th.tau, lse if th is None else th.log_w,
            n, vocab, t, x3.stride(0), x3.stride(1), out3.stride(0), out3.stride(1), params.inv_temp,
            params.softcap or 1.0, HAS_GRAD_ENTROPY=has_ge, HAS_SOFTCAP=params.softcap is not None,
            HAS_TRUNC=th is not None, **cfg, **launch,
        )
    return out3


@triton.jit
def _logits_tile_kernel(X, OUT, N, V, T, stride_b, stride_t, col0, n_cols, inv_temp, softcap,
                        HAS_SOFTCAP: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """``OUT [N, n_cols]`` = the fp32 scaled (soft-capped) logits of columns ``col0...``: the tiles of the
    sampling-truncation threshold search, formed by the same code as the kernels above."""
    offs_r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs_c = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = (offs_r < N)[:, None] & (offs_c < n_cols)[None, :]
    x = tl.load(X + _row_offsets(offs_r, T, stride_b, stride_t)[:, None] + (col0 + offs_c)[None, :], mask=mask,
                other=0.0)
    z = softcap_logits(x.to(tl.float32), softcap, HAS_SOFTCAP) * inv_temp
    tl.store(OUT + offs_r.to(tl.int64)[:, None] * n_cols + offs_c[None, :], z, mask=mask)


def triton_logits_tiles(x3, params: LaunchParams, chunk: int):
    """``(col0, fp32 logits [N, c])`` chunks for the threshold search (see ``_logits_tile_kernel``)."""
    bsz, t, vocab = x3.shape
    n = bsz * t
    cfg, launch = _config(n, vocab, x3.dtype)

    def gen():
        for c0 in range(0, vocab, chunk):
            cols = min(chunk, vocab - c0)
            z = torch.empty((n, cols), device=x3.device, dtype=torch.float32)
            with on_device(x3):
                _logits_tile_kernel[(cdiv(n, cfg["ROWS"]), cdiv(cols, cfg["BLOCK_V"]))](
                    x3, z, n, vocab, t, x3.stride(0), x3.stride(1), c0, cols, params.inv_temp,
                    params.softcap or 1.0, HAS_SOFTCAP=params.softcap is not None, **cfg, **launch)
            yield c0, z
    return gen
