"""Logits in -> per-token log-prob of the target and full-vocabulary entropy, for callers that hold logits.

Owns the Triton kernels of the logits-in op, their launchers, the ``torch.autograd.Function`` and the public
function. The op is memory-bound: the forward reads each logit once (fp32 statistics, whatever the input
dtype) and writes three floats per row; the backward reads the logits once more and writes their gradient,
into a new tensor or, with ``inplace_backward=True``, over the logits themselves (the caller promises not to
use them after backward).

Rows may be strided: ``[N, V]`` and ``[B, T, V]`` views (e.g. ``logits[:, :-1]``) are read in place; only the
vocabulary dimension must have unit stride (otherwise it is made contiguous).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._triton_common import (
    cdiv,
    grad_logits,
    interpreting,
    load_row_grads,
    next_pow2,
    on_device,
    softmax_stats_finalize,
    softmax_stats_update,
)
from .. import reference


@triton.jit
def _row_offsets(offs_r, T, stride_b, stride_t):
    r = offs_r.to(tl.int64)
    return (r // T) * stride_b + (r % T) * stride_t


@triton.jit
def _logits_stats_fwd_kernel(
    X, TGT, LOGP, ENT, LSE, N, V, T, stride_b, stride_t, inv_temp, ignore_index,
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    offs_r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    r_mask = offs_r < N
    x_rows = X + _row_offsets(offs_r, T, stride_b, stride_t)[:, None]
    tgt = tl.load(TGT + offs_r, mask=r_mask, other=ignore_index)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    s = tl.zeros([ROWS], tl.float32)
    b = tl.zeros([ROWS], tl.float32)
    zt = tl.zeros([ROWS], tl.float32)
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
        z = x.to(tl.float32) * inv_temp
        z = tl.where(v_mask[None, :], z, float("-inf"))
        m, s, b = softmax_stats_update(m, s, b, z)
        zt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), 1)
    lse, ent = softmax_stats_finalize(m, s, b)
    valid = tgt != ignore_index
    tl.store(LOGP + offs_r, tl.where(valid, zt - lse, 0.0), mask=r_mask)
    tl.store(ENT + offs_r, tl.where(valid, ent, 0.0), mask=r_mask)
    tl.store(LSE + offs_r, lse, mask=r_mask)


@triton.jit
def _logits_grad_kernel(
    X, DX, TGT, LSE, ENT, G_LOGP, G_ENT, N, V, T, stride_b, stride_t, dstride_b, dstride_t, inv_temp,
    HAS_GRAD_ENTROPY: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
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
    z = x.to(tl.float32) * inv_temp
    dz = grad_logits(z, offs_v[None, :] == tgt[:, None], lse, ent, g_logp, g_ent, inv_temp, HAS_GRAD_ENTROPY)
    dz = tl.where(mask, dz, 0.0)
    tl.store(DX + _row_offsets(offs_r, T, dstride_b, dstride_t)[:, None] + offs_v[None, :],
             dz.to(DX.dtype.element_ty), mask=r_mask[:, None] & (offs_v < V)[None, :])


def _config(n: int, vocab: int, dtype: torch.dtype, interpret: Optional[bool] = None):
    if interpreting() if interpret is None else interpret:
        return dict(ROWS=min(16, next_pow2(n)), BLOCK_V=min(1024, next_pow2(vocab))), {}
    block_v = min(4096 if dtype != torch.float32 else 2048, next_pow2(vocab))
    return dict(ROWS=1, BLOCK_V=block_v), dict(num_warps=8 if block_v >= 2048 else 4)


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """View logits as ``[B, T, V]`` without copying when possible; the vocab dim must have unit stride."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(0)
    if x.dim() == 3:
        return x
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def triton_fwd(x3, targets, inv_temp, ignore_index):
    bsz, t, vocab = x3.shape
    n = bsz * t
    cfg, launch = _config(n, vocab, x3.dtype)
    out = torch.empty((3, n), device=x3.device, dtype=torch.float32)
    with on_device(x3):
        _logits_stats_fwd_kernel[(cdiv(n, cfg["ROWS"]),)](
            x3, targets, out[0], out[1], out[2], n, vocab, t, x3.stride(0), x3.stride(1), inv_temp, ignore_index,
            **cfg, **launch,
        )
    return out[0], out[1], out[2]


def triton_bwd(x3, targets, lse, entropy, grad_logp, grad_entropy, inv_temp, out3):
    bsz, t, vocab = x3.shape
    n = bsz * t
    cfg, launch = _config(n, vocab, x3.dtype)
    has_ge = grad_entropy is not None
    with on_device(x3):
        _logits_grad_kernel[(cdiv(n, cfg["ROWS"]), cdiv(vocab, cfg["BLOCK_V"]))](
            x3, out3, targets, lse, entropy if has_ge else lse, grad_logp, grad_entropy if has_ge else grad_logp,
            n, vocab, t, x3.stride(0), x3.stride(1), out3.stride(0), out3.stride(1), inv_temp,
            HAS_GRAD_ENTROPY=has_ge, **cfg, **launch,
        )
    return out3


def _torch_fwd(x3, targets, inv_temp, ignore_index):
    return reference.logprob_entropy_fwd(x3.reshape(-1, x3.shape[-1]), targets, inv_temp, ignore_index)


def _torch_bwd(x3, targets, lse, entropy, grad_logp, grad_entropy, inv_temp, out3):
    # reference works on [N, V]; a strided [B, T, V] view is walked one batch row at a time
    t = x3.shape[1]
    for i in range(x3.shape[0]):
        sl = slice(i * t, (i + 1) * t)
        reference.logprob_entropy_bwd(
            x3[i], targets[sl], lse[sl], None if entropy is None else entropy[sl], grad_logp[sl],
            None if grad_entropy is None else grad_entropy[sl], inv_temp, out3[i],
        )
    return out3


def cuda_fwd(x3, targets, inv_temp, ignore_index):
    """The csrc/ CUDA C++ kernels (``impl="cuda"``), loaded or built by :mod:`edge_kernels._cuda` on first use."""
    from .._cuda import logprob_entropy_fwd

    return logprob_entropy_fwd(x3, targets, inv_temp, ignore_index)


def cuda_bwd(x3, targets, lse, entropy, grad_logp, grad_entropy, inv_temp, out3):
    from .._cuda import logprob_entropy_bwd

    return logprob_entropy_bwd(x3, targets, lse, entropy, grad_logp, grad_entropy, inv_temp, out3)


_BACKENDS = {"torch": (_torch_fwd, _torch_bwd), "triton": (triton_fwd, triton_bwd)}
_BACKENDS["cuda"] = (cuda_fwd, cuda_bwd)


class LogprobEntropyFunction(torch.autograd.Function):
    """Autograd over the logits-in launchers; ``logits`` is ``[B, T, V]`` (unit vocab stride)."""

    @staticmethod
    def forward(ctx, logits, targets, inv_temp, ignore_index, inplace_backward, impl):
        fwd, _ = _BACKENDS[impl]
        logp, entropy, lse = fwd(logits, targets, inv_temp, ignore_index)
        ctx.set_materialize_grads(False)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.meta = (inv_temp, ignore_index, inplace_backward, impl)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        inv_temp, ignore_index, inplace, impl = ctx.meta
        if grad_logp is None and grad_entropy is None:
            return (None,) * 6
        valid = targets != ignore_index
        zero = torch.zeros_like(lse)
        g_logp = zero if grad_logp is None else torch.where(valid, grad_logp.float(), zero).contiguous()
        g_ent = None if grad_entropy is None else torch.where(valid, grad_entropy.float(), zero).contiguous()
        # rows that share memory (an expanded view) cannot be overwritten in place: every block would race
        inplace = inplace and torch._debug_has_internal_overlap(logits) == 0
        out = logits if inplace else torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
        _, bwd = _BACKENDS[impl]
        return bwd(logits, targets, lse, entropy, g_logp, g_ent, inv_temp, out), None, None, None, None, None


def logprob_entropy(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                    ignore_index: int = -100, inplace_backward: bool = False, impl: str = "auto",
                    process_group=None, vocab_start: Optional[int] = None):
    """Per-token log-prob of ``targets`` and full-vocabulary entropy from ``logits [..., V]``.

    ``z = logits / temperature``; ``logp = log_softmax(z)[target]``, ``entropy = -sum_v p_v log p_v``
    (``../shared/algorithms.md``, notation), computed in fp32 whatever the logits' dtype. ``-inf`` logits are
    masked vocabulary entries (probability 0, no entropy contribution); NaN or ``+inf`` logits give NaN.

    Args:
        logits: ``[..., V]`` float32/float16/bfloat16; rows may be strided (``logits[:, :-1]`` is not copied).
        targets: integer, shaped ``logits.shape[:-1]``, in ``[0, V)`` or ``ignore_index``.
        temperature: > 0.
        ignore_index: positions with this target return 0 for both outputs and receive no gradient.
        inplace_backward: write the logits gradient over ``logits`` in the backward (saves ``N*V`` memory;
            the caller must not read ``logits`` after ``backward``). Logits whose rows overlap in memory (an
            ``expand``-ed view) get a new gradient tensor instead.
        impl: ``"auto"`` (Triton on CUDA tensors, PyTorch elsewhere), ``"triton"``, ``"cuda"`` (the csrc/
            extension, built on first use) or ``"torch"``.
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded: rank r holds the r-th
            contiguous slice ``logits [..., V_r]``, ``targets`` are global ids (the same on every rank), and
            every rank gets the full-vocabulary outputs; its logits gradient is its slice's
            (:mod:`edge_kernels.ops.vocab_parallel`). ``None`` or a one-rank group: the unsharded op.
        vocab_start: sharded only: this rank's first vocabulary id; saves the all-gather that finds it.

    Returns:
        ``(logp, entropy)`` float32, shaped like ``targets``.
    """
    from ..dispatch import resolve_impl, validate_logits_inputs
    from . import vocab_parallel

    sharded = vocab_parallel.check_group_args(process_group, vocab_start)
    temperature = validate_logits_inputs(logits, targets, temperature, ignore_index,
                                         target_vocab=vocab_parallel.UNCHECKED_VOCAB if sharded else None)
    backend = resolve_impl(impl, logits, op="logprob_entropy", cuda_available="cuda" in _BACKENDS)
    lead_shape = targets.shape
    x3 = _as_3d(logits)
    t1 = targets.reshape(-1).to(torch.int64).contiguous()
    if sharded:
        logp, entropy = vocab_parallel.VocabParallelLogitsFunction.apply(
            x3, t1, 1.0 / temperature, ignore_index, bool(inplace_backward), backend, process_group, vocab_start)
    else:
        logp, entropy = LogprobEntropyFunction.apply(x3, t1, 1.0 / temperature, ignore_index,
                                                     bool(inplace_backward), backend)
    return logp.view(lead_shape), entropy.view(lead_shape)
