"""Triton kernels and launchers of :func:`edge_kernels.linear_logprob_entropy` (hidden states in).

Imported by :func:`edge_kernels.backends.get` on the first ``impl="triton"`` call only, so the
package works without triton. The launchers take the op's tensors and one
:class:`~edge_kernels.core.params.LaunchParams`.

Forward (one matmul's worth of work): a program owns ``BLOCK_N`` rows and a contiguous slice of the vocabulary,
forms logits tiles with ``tl.dot`` in fp32 (never rounded to the input dtype), folds them into streaming softmax
statistics and picks the target logit out of the tile it lies in. The vocabulary is split across programs
(``L2_SPLITS`` slices, more when there are too few row blocks to fill the GPU), split index fastest in the launch
order so that the programs resident together share a few row blocks of ``hidden`` through L2; the per-split
statistics are merged afterwards (``O(splits * N)``). No ``[N, V]`` tensor exists.

A soft-cap (``params.softcap``) is a compile-time branch: the kernels built without it are unchanged; with it
the fp32 logits tile becomes ``c * tanh(z / c)`` before the temperature, and the backward multiplies the logits
gradient by ``1 - tanh^2``.

Backward (three matmuls' worth): the vocabulary is walked in chunks of ``chunk_size`` columns. For each chunk a
kernel (one output tile per program, programs in GEMM-style grouped order for L2 reuse) recomputes the logits
tile, turns it into the logits gradient and stores it (input dtype) in an ``[N, chunk_size]`` workspace; two
cuBLAS matmuls then add ``dZ @ W_chunk`` to an fp32 ``d_hidden`` accumulator (in the GEMM epilogue where torch
supports an fp32 accumulator for 16-bit inputs) and write ``dZ.T @ hidden`` (fp32 sums, reduced-precision
split-K reductions disabled for the call, one write) into the chunk's rows of ``d_weight``. Each ``d_weight``
element is thus summed over all tokens in fp32 exactly once.
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
    num_sms,
    on_device,
    softcap_logits,
    softmax_stats_update,
)
from ...core.stats import combine_stats_stacked, finalize_stats
from ...core.params import LaunchParams, default_chunk_size
from ...core.probes import mixed_mm_support


@triton.jit
def _linear_stats_fwd_kernel(
    H, W, BIAS, TGT, PART_M, PART_S, PART_B, PART_ZT, TAU, LOGW,
    N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, cols_per_split, num_splits, inv_temp, ignore_index, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, HAS_TRUNC: tl.constexpr = False,
):
    # HAS_TRUNC (sampling truncation, edge_kernels.backends.truncated): statistics of the kept logits z' of the row
    # thresholds TAU/LOGW; the target's raw z is gathered as always
    # the split index varies fastest, so the programs resident at one time share a few row blocks of H (kept
    # in L2 while they sweep their vocabulary slices) instead of each streaming its own from HBM per tile
    pid = tl.program_id(0)
    pid_s = pid % num_splits
    pid_n = pid // num_splits
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    tgt = tl.load(TGT + offs_n, mask=n_mask, other=ignore_index)
    h_rows = H + offs_n.to(tl.int64)[:, None] * stride_hn
    # a block of ignored rows (padding) does no work: its outputs are zeroed by the launcher anyway
    any_valid = tl.max((tgt != ignore_index).to(tl.int32), 0) > 0

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    b = tl.zeros([BLOCK_N], tl.float32)
    zt = tl.zeros([BLOCK_N], tl.float32)
    if HAS_TRUNC:
        tau = tl.load(TAU + offs_n, mask=n_mask, other=0.0)
        log_w = tl.load(LOGW + offs_n, mask=n_mask, other=0.0)
    else:
        tau = zt
        log_w = zt

    v_start = pid_s * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, V)
    if not any_valid:  # empty range: the statistics become those of one zero logit (finite lse, no NaN)
        v_end = v_start
        m = tl.zeros([BLOCK_N], tl.float32)
        s = tl.full([BLOCK_N], 1.0, tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < v_end
        w_cols = W + offs_v.to(tl.int64)[None, :] * stride_wv
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            h = tl.load(h_rows + offs_d[None, :] * stride_hd, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            w = tl.load(w_cols + offs_d[:, None] * stride_wd, mask=d_mask[:, None] & v_mask[None, :], other=0.0)
            if UPCAST_DOT:
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
        acc = softcap_logits(acc, softcap, HAS_SOFTCAP)
        z = tl.where(v_mask[None, :], acc * inv_temp, float("-inf"))
        m, s, b = softmax_stats_update(m, s, b, kept_logits(z, tau, log_w, HAS_TRUNC))
        zt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), 1)

    out = pid_s * N + offs_n
    tl.store(PART_M + out, m, mask=n_mask)
    tl.store(PART_S + out, s, mask=n_mask)
    tl.store(PART_B + out, b, mask=n_mask)
    tl.store(PART_ZT + out, zt, mask=n_mask)


@triton.jit
def _linear_grad_logits_kernel(
    H, W, BIAS, TGT, LSE, ENT, G_LOGP, G_ENT, DZ, PART_DB, TAU, LOGW,
    N, D, col0, n_cols, stride_hn, stride_hd, stride_wv, stride_wd, stride_dzn, stride_dbn, inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, WRITE_DB: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_TRUNC: tl.constexpr = False, STORE_LOGITS: tl.constexpr = False,
):
    # HAS_TRUNC: the gradient of the truncated log-prob/entropy (kept logits z' of TAU/LOGW). STORE_LOGITS: store
    # the fp32 logits tile itself into DZ, every row (the threshold search's tiles, bit-identical to the ones the
    # forward and this gradient form)
    # grouped order: consecutive programs cover GROUP_N row blocks x a run of column tiles, so both the H
    # blocks and the W tiles they read are shared through L2 (one output tile per program, as in a GEMM)
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(N, BLOCK_N)
    col_tiles = tl.cdiv(n_cols, BLOCK_V)
    per_group = GROUP_N * col_tiles
    first_row_block = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(row_blocks - first_row_block, GROUP_N)
    pid_n = first_row_block + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # column within the chunk
    c_mask = offs_c < n_cols
    offs_v = col0 + offs_c
    h_rows = H + offs_n.to(tl.int64)[:, None] * stride_hn
    w_cols = W + offs_v.to(tl.int64)[None, :] * stride_wv

    tgt, lse, ent, g_logp, g_ent, active = load_row_grads(TGT, LSE, ENT, G_LOGP, G_ENT, offs_n, n_mask,
                                                          HAS_GRAD_ENTROPY)
    # rows with zero upstream gradient (ignored targets, masked-out loss tokens, padding) contribute exactly 0:
    # a block of only such rows skips the recomputation and writes zeros
    any_active = tl.max(active.to(tl.int32), 0) > 0
    if STORE_LOGITS:
        any_active = True
    d_end = D
    if not any_active:
        d_end = 0

    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for d0 in range(0, d_end, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        h = tl.load(h_rows + offs_d[None, :] * stride_hd, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_cols + offs_d[:, None] * stride_wd, mask=d_mask[:, None] & c_mask[None, :], other=0.0)
        if UPCAST_DOT:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_v, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    z = softcap_logits(acc, softcap, HAS_SOFTCAP) * inv_temp
    zk = z
    if HAS_TRUNC:
        tau = tl.load(TAU + offs_n, mask=n_mask, other=0.0)
        log_w = tl.load(LOGW + offs_n, mask=n_mask, other=0.0)
        zk = kept_logits(z, tau, log_w, HAS_TRUNC)
    if STORE_LOGITS:
        dz = z
    else:
        dz = grad_logits(z, offs_v[None, :] == tgt[:, None], lse, ent, g_logp, g_ent, inv_temp, softcap,
                         HAS_GRAD_ENTROPY, HAS_SOFTCAP, zk, HAS_TRUNC)
    mask = n_mask[:, None] & c_mask[None, :]
    dz = tl.where(mask & any_active, dz, 0.0)
    tl.store(DZ + offs_n.to(tl.int64)[:, None] * stride_dzn + offs_c[None, :],
             dz.to(DZ.dtype.element_ty), mask=mask)
    if WRITE_DB:
        tl.store(PART_DB + pid_n * stride_dbn + offs_c, tl.sum(dz, 0), mask=c_mask)


# ----------------------------------------------------------------------------------------------------------
# launch configuration


def _dot_settings(dtype: torch.dtype, interpret: Optional[bool] = None):
    """(UPCAST_DOT, DOT_PRECISION): fp32 inputs get an exact fp32 dot, not tf32; the interpreter's bf16
    arithmetic is unreliable, so it upcasts tiles to fp32 first."""
    interpret = interpreting() if interpret is None else interpret
    upcast = interpret and dtype != torch.float32
    precision = "ieee" if (dtype == torch.float32 or upcast) else "tf32"
    return upcast, precision


def _tile_config(n: int, d: int, dtype: torch.dtype, interpret: Optional[bool] = None):
    """Tiles and launch settings. GPU choices are the largest tiles that compile without register spills for
    sm_80 and sm_90 (checked ahead of time by ``python -m edge_kernels.backends.triton.aot`` and its test): 128x128
    logits tiles with a 32-deep K step and 4 pipeline stages for 16-bit inputs (tensor cores: wgmma / mma),
    32x64x32 for fp32 (exact fp32 FMA dot). Not autotuned: ``@triton.autotune`` with several configs does not
    run under the interpreter, and a fixed choice keeps runs reproducible."""
    if interpreting() if interpret is None else interpret:
        # few, large tiles: the interpreter's cost is per program and per loop trip
        return dict(BLOCK_N=max(16, min(64, next_pow2(n))), BLOCK_V=128, BLOCK_D=max(16, min(128, next_pow2(d)))), {}
    if dtype == torch.float32:
        return dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32), dict(num_warps=4, num_stages=3)
    return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=32), dict(num_warps=8, num_stages=4)


# Forward: vocabulary splits per row block on a GPU. With the split index fastest, the ~#SM programs resident at
# once span about #SM / L2_SPLITS row blocks: at the 7B shape (D=3584, 128-row blocks of 0.9 MB) that is ~8
# blocks (~7 MB of H) plus one W tile per split in flight, well inside L2, and W is read from HBM about
# N / (128 * 8) times (8.7 GB at N=8192: a quarter of the matmul's time at HBM speed, not the bottleneck).
L2_SPLITS = 16
# Backward: row blocks per group of the grouped program order (see _linear_grad_logits_kernel).
GROUP_N = 8


def triton_fwd(hidden, weight, bias, targets, params: LaunchParams, num_splits=None, th=None):
    """Launch the forward; returns ``(logp, entropy, lse)`` fp32 ``[N]``. ``params.chunk_size`` is unused here
    (the forward needs no workspace beyond ``O(splits * N)`` statistics). With ``th`` (a sampling-truncation
    :class:`~edge_kernels.core.truncation.Threshold`): the statistics of the kept logits, returned as
    ``(z_target, lse, entropy')`` for :mod:`edge_kernels.ops.truncated` to finish."""
    ignore_index = params.ignore_index
    n, d = hidden.shape
    vocab = weight.shape[0]
    tiles, launch = _tile_config(n, d, hidden.dtype)
    upcast, precision = _dot_settings(hidden.dtype)
    row_blocks = cdiv(n, tiles["BLOCK_N"])
    v_tiles = cdiv(vocab, tiles["BLOCK_V"])
    if num_splits is None:  # enough programs for ~2 waves (and L2 reuse on a GPU), never more than vocab tiles
        waves = cdiv(2 * num_sms(hidden.device), row_blocks)
        num_splits = min(v_tiles, max(1 if interpreting() else L2_SPLITS, waves))
    cols_per_split = cdiv(v_tiles, num_splits) * tiles["BLOCK_V"]
    num_splits = cdiv(vocab, cols_per_split)
    part = torch.empty((4, num_splits, n), device=hidden.device, dtype=torch.float32)
    with on_device(hidden):
        _linear_stats_fwd_kernel[(row_blocks * num_splits,)](
            hidden, weight, bias if bias is not None else hidden, targets,
            part[0], part[1], part[2], part[3], part[3] if th is None else th.tau, part[3] if th is None else th.log_w,
            n, vocab, d, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            cols_per_split, num_splits, params.inv_temp, ignore_index, params.softcap or 1.0,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=params.softcap is not None, UPCAST_DOT=upcast,
            DOT_PRECISION=precision, HAS_TRUNC=th is not None, **tiles, **launch,
        )
    lse, entropy = finalize_stats(*combine_stats_stacked(part[0], part[1], part[2]))
    zt = part[3].sum(dim=0)
    if th is not None:
        return zt, lse, entropy
    valid = targets != ignore_index
    zero = torch.zeros_like(lse)
    return torch.where(valid, zt - lse, zero), torch.where(valid, entropy, zero), lse


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with fp32 accumulation; ``acc`` is fp32, ``a``/``b`` may be 16-bit."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif not a.is_cuda:  # interpreter runs on CPU tensors
        acc.addmm_(a.float(), b.float())
    else:
        # the probe syncs, which a CUDA graph capture forbids: captured calls take the path every torch >= 2.8 has
        how = "mm" if torch.cuda.is_current_stream_capturing() else mixed_mm_support(a.device)
        if how == "addmm":  # newer torch: beta=1 accumulation into the fp32 accumulator, one read + one write
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        elif how == "mm":  # torch >= 2.8: fp32 product, never rounded, then added (an N x D temporary)
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))
        else:  # older torch: the chunk's partial product is rounded to 16 bits once
            acc.add_(torch.mm(a, b).float())


def _mm_fp32_reduction(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out = a @ b`` with every sum in fp32. For 16-bit inputs cuBLAS may otherwise reduce split-K partial
    sums in 16 bits (``allow_*_reduced_precision_reduction``, on by default), and ``d_weight`` = ``dz.T @ H``
    is exactly the tall-K shape (K = tokens) where it splits K."""
    if not a.is_cuda or a.dtype == torch.float32:
        torch.mm(a, b, out=out)
        return
    matmul = torch.backends.cuda.matmul
    flag = "allow_bf16_reduced_precision_reduction" if a.dtype == torch.bfloat16 else \
        "allow_fp16_reduced_precision_reduction"
    saved = getattr(matmul, flag)
    setattr(matmul, flag, False)
    try:
        torch.mm(a, b, out=out)
    finally:
        setattr(matmul, flag, saved)


def triton_bwd(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, params: LaunchParams, needs,
               th=None):
    """Gradients ``(d_hidden, d_weight, d_bias)``, None where ``needs`` (hidden, weight, bias) is False. With
    ``th`` (sampling truncation): the gradient of the truncated log-prob and entropy."""
    needs_hidden, needs_weight, needs_bias = needs
    n, d = hidden.shape
    vocab = weight.shape[0]
    chunk = params.chunk_size or default_chunk_size(n, vocab)
    tiles, launch = _tile_config(n, d, hidden.dtype)
    if th is not None:  # column tiles aligned as in the forward and the threshold search: the same logits bits
        chunk = cdiv(chunk, tiles["BLOCK_V"]) * tiles["BLOCK_V"]
    upcast, precision = _dot_settings(hidden.dtype)
    row_blocks = cdiv(n, tiles["BLOCK_N"])
    dz_buf = torch.empty((n, chunk), device=hidden.device, dtype=hidden.dtype)
    part_db = torch.empty((row_blocks, chunk), device=hidden.device, dtype=torch.float32) if needs_bias else None
    dh = torch.zeros((n, d), device=hidden.device, dtype=torch.float32) if needs_hidden else None
    dw = torch.empty_like(weight) if needs_weight else None
    db = torch.empty(vocab, device=weight.device, dtype=bias.dtype) if needs_bias else None
    has_grad_entropy = grad_entropy is not None
    for c0 in range(0, vocab, chunk):
        cols = min(chunk, vocab - c0)
        dz = dz_buf[:, :cols]
        with on_device(hidden):
            _linear_grad_logits_kernel[(row_blocks * cdiv(cols, tiles["BLOCK_V"]),)](
                hidden, weight, bias if bias is not None else hidden, targets, lse,
                entropy if has_grad_entropy else lse, grad_logp, grad_entropy if has_grad_entropy else grad_logp,
                dz, part_db if needs_bias else lse, lse if th is None else th.tau, lse if th is None else th.log_w,
                n, d, c0, cols, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                dz.stride(0), chunk, params.inv_temp, params.softcap or 1.0,
                HAS_BIAS=bias is not None, HAS_GRAD_ENTROPY=has_grad_entropy, WRITE_DB=needs_bias,
                HAS_SOFTCAP=params.softcap is not None, HAS_TRUNC=th is not None,
                UPCAST_DOT=upcast, DOT_PRECISION=precision, GROUP_N=GROUP_N, **tiles, **launch,
            )
        if dh is not None:
            _accumulate_mm(dh, dz, weight[c0:c0 + cols])
        if dw is not None:
            _mm_fp32_reduction(dz.t(), hidden, out=dw[c0:c0 + cols])
        if db is not None and part_db is not None:
            db[c0:c0 + cols] = part_db[:, :cols].sum(dim=0).to(db.dtype)
    return (None if dh is None else dh.to(hidden.dtype)), dw, db


def triton_logits_tiles(hidden, weight, bias, params: LaunchParams):
    """The sampling-truncation threshold search's tiles: ``(col0, fp32 logits [N, c])`` chunks formed by the
    gradient kernel's own code (``STORE_LOGITS``), so the kept set it finds is the one the forward and backward
    kernels see, bit for bit."""
    n, d = hidden.shape
    vocab = weight.shape[0]
    tiles, launch = _tile_config(n, d, hidden.dtype)
    upcast, precision = _dot_settings(hidden.dtype)
    chunk = cdiv(params.chunk_size or default_chunk_size(n, vocab), tiles["BLOCK_V"]) * tiles["BLOCK_V"]
    row_blocks = cdiv(n, tiles["BLOCK_N"])
    dummy = torch.zeros(n, device=hidden.device, dtype=torch.float32)
    tgt = torch.zeros(n, device=hidden.device, dtype=torch.int64)

    def gen():
        buf = torch.empty((n, min(chunk, vocab)), device=hidden.device, dtype=torch.float32)
        for c0 in range(0, vocab, chunk):
            cols = min(chunk, vocab - c0)
            z = buf[:, :cols] if cols == buf.shape[1] else torch.empty((n, cols), device=hidden.device)
            with on_device(hidden):
                _linear_grad_logits_kernel[(row_blocks * cdiv(cols, tiles["BLOCK_V"]),)](
                    hidden, weight, bias if bias is not None else hidden, tgt, dummy, dummy, dummy, dummy,
                    z, dummy, dummy, dummy,
                    n, d, c0, cols, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                    z.stride(0), chunk, params.inv_temp, params.softcap or 1.0,
                    HAS_BIAS=bias is not None, HAS_GRAD_ENTROPY=False, WRITE_DB=False,
                    HAS_SOFTCAP=params.softcap is not None, STORE_LOGITS=True,
                    UPCAST_DOT=upcast, DOT_PRECISION=precision, GROUP_N=GROUP_N, **tiles, **launch,
                )
            yield c0, z
    return gen
