"""``fused_linear_policy_loss`` in three matmuls on the PyTorch backend: the backward is formed in the forward.

With token-level ratios (``is_level="token"``), every aggregation mode, no entropy filter and no
``eda="current"``, a token's loss gradient ``(dL/dl_t, dL/dH_t)`` depends only on its own log-prob (and on
constants: advantages, old/ref log-probs, the mask's denominators), so it is known as soon as the token's row
log-sum-exp is. This module walks the tokens in row blocks, each with the whole vocabulary: one GEMM forms
the block's fp32 logits, the statistics give ``l`` and ``H``, the per-token gradient comes from
:func:`edge_kernels.losses.objectives.policy_loss` itself (autograd on the ``[B, T]`` log-probs; only the
block's entries are read, which is exact because they depend on nothing else), and two more GEMMs turn the logits
gradient into ``d_hidden`` rows and a ``d_weight`` contribution. Forward plus backward is three matmuls instead of four
(the chunked op recomputes the logits in its backward); the workspace is one row block's logits.

Where a token's gradient depends on other tokens' log-probs or entropies the four-matmul path stays:
``eda="current"`` (the scale needs every row's mean entropy), ``top_entropy_quantile < 1`` (the threshold
needs every entropy), GSPO (``is_level="sequence"``, the ratio is a mean over the row), and advantages that
carry a gradient. So does ``chunk_size < V`` (the caller asked for vocabulary chunks) and a vocabulary above
:data:`edge_kernels.backends.torch.FULL_ROW_MAX_VOCAB`.

Memory trade-off: the gradients are computed before the backward is called, so ``d_hidden`` (``N x D``) and
``d_weight`` (``V x D``) are held from the forward to the backward. With fp32 weights ``d_weight`` is the
gradient the backward returns anyway. With 16-bit weights it is an fp32 accumulator (summed over row blocks,
never rounded until the end): ``4 V D`` bytes, twice the weight's own size, plus on the CPU the weight's fp32
copy (``4 V D`` more), where the four-matmul path needs only chunk-sized fp32 buffers.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ..backends import torch as torch_backend
from .objectives import policy_loss

Tensor = torch.Tensor


def three_matmul_applies(impl: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], advantages: Tensor,
                         eda: str, is_level: str, top_entropy_quantile: float,
                         chunk_size: Optional[int]) -> bool:
    """Whether :func:`fused_linear_policy_loss` can take the three-matmul path (see the module docstring)."""
    if impl not in ("auto", "torch") or (impl == "auto" and hidden.is_cuda):
        return False
    wants_grad = any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    return (torch.is_grad_enabled() and wants_grad and not advantages.requires_grad and eda == "off"
            and is_level == "token" and float(top_entropy_quantile) == 1.0
            and (chunk_size is None or chunk_size >= weight.shape[0])
            and weight.shape[0] <= torch_backend.FULL_ROW_MAX_VOCAB)


class _PrecomputedGrads(torch.autograd.Function):
    """Returns ``loss`` and hands back the gradients formed in the forward, scaled by the upstream one."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grads):
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_out):
        # fp32 gradients scaled, then rounded once to the parameters' dtypes
        out = tuple(None if g is None else (g * grad_out.float()).to(dt) for g, dt in ctx.grads)
        return (None,) + out + (None,)


def _token_grads(l_bt: Tensor, h_bt: Tensor, loss_args, loss_kwargs, with_entropy: bool):
    """``(dL/dl, dL/dH or None)`` over ``[B, T]`` from :func:`policy_loss` at the log-probs in hand."""
    with torch.enable_grad():
        l_var = l_bt.detach().requires_grad_()
        h_var = h_bt.detach().requires_grad_() if with_entropy else h_bt
        loss, _ = policy_loss(l_var, *loss_args, entropy=h_var, **loss_kwargs)
        grads = torch.autograd.grad(loss, [l_var, h_var] if with_entropy else [l_var])
    return grads[0], (grads[1] if with_entropy else None)


def fused_policy_loss_three_matmul(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor],
                                   inv_temp: float, ignore_index: int, loss_args: Tuple, loss_kwargs: Dict,
                                   softcap: Optional[float] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The loss and metrics of :func:`policy_loss` on the fused log-probs, its gradient formed in the forward.

    ``targets [B, T]`` int64 with ``ignore_index`` on masked tokens; ``loss_args = (old_logp, advantages,
    mask)`` and ``loss_kwargs`` are passed to :func:`policy_loss` (its ``entropy`` comes from here)."""
    shape, d = targets.shape, hidden.shape[-1]
    h2, flat_t = hidden.reshape(-1, d), targets.reshape(-1)
    n = flat_t.shape[0]
    with_entropy = float(loss_kwargs.get("entropy_coef", 0.0)) != 0.0
    stats = torch.zeros((2, n), device=hidden.device)  # logp, entropy of every token (0 where ignored)
    idx = torch_backend.compact_rows(flat_t != ignore_index)
    h, tgt = torch_backend.take_rows(h2, idx), torch_backend.take_rows(flat_t, idx)
    mixed = torch_backend.mixed_mm_ok(hidden)
    w = weight.detach() if mixed else weight.detach().float()
    h_op = h.detach() if mixed else h.detach().float()
    bias32 = None if bias is None else bias.detach().float()
    need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    dh = torch.zeros(h.shape, device=hidden.device) if need[0] else None
    dw = torch.zeros(weight.shape, device=weight.device) if need[1] else None
    db = torch.zeros(weight.shape[0], device=weight.device) if need[2] else None
    rows = torch_backend.row_block(max(h.shape[0], 1), weight.shape[0])
    zbuf = torch.empty((min(rows, h.shape[0]), weight.shape[0]), device=hidden.device)
    ebuf = torch.empty((max(1, torch_backend.CACHE_ELEMENTS // weight.shape[0]), weight.shape[0]), device=hidden.device)
    pos = torch.arange(n, device=hidden.device) if idx is None else idx
    for r0 in range(0, h.shape[0], rows):
        r1 = min(h.shape[0], r0 + rows)
        z = torch_backend.logits_tile(h_op[r0:r1], w, bias32, inv_temp, zbuf[: r1 - r0], softcap)
        lse, ent, zt, shift = torch_backend.full_row_stats(z, tgt[r0:r1], ebuf)
        stats[:, pos[r0:r1]] = torch.stack([zt - lse, ent])
        g_l, g_h = _token_grads(stats[0].view(shape), stats[1].view(shape), loss_args, loss_kwargs, with_entropy)
        g_l = g_l.reshape(-1)[pos[r0:r1]].float()
        g_h = None if g_h is None else g_h.reshape(-1)[pos[r0:r1]].float()
        # z now holds z - shift, so log p = z - (lse - shift); the cap's factor reads the capped z back
        cap = torch_backend.cap_factor(z + shift[:, None], inv_temp, softcap)
        _block_grads(z, w, h_op[r0:r1], tgt[r0:r1], lse - shift, ent, g_l, g_h, inv_temp, ebuf, mixed,
                     None if dh is None else dh[r0:r1], dw, db, cap)
    loss, metrics = _final_loss(stats, shape, loss_args, loss_kwargs)
    grads = ((None if dh is None else _scatter_rows(dh, idx, n).view(hidden.shape), hidden.dtype),
             (dw, weight.dtype), (db, None if bias is None else bias.dtype))
    return _PrecomputedGrads.apply(loss, hidden, weight, bias, grads), metrics


def _block_grads(z, w, h, tgt, log_s, ent, g_l, g_h, inv_temp, ebuf, mixed, dh, dw, db, cap=None) -> None:
    """The block's logits gradient (in place in ``z``; times the soft-cap's factor ``cap``) and the two GEMMs
    that consume it."""
    a, c = torch_backend.grad_coefs(ent, g_l, g_h, inv_temp)
    dz = torch_backend.grad_tile(z, 0, tgt, log_s, a, c, g_l * inv_temp, ebuf)
    if cap is not None:
        dz.mul_(cap)
    dz_op = dz.to(h.dtype) if mixed else dz  # CUDA out_dtype GEMMs take 16-bit operands, as Triton's
    if dh is not None:
        torch_backend.mm_into(dh, dz_op, w)
    if dw is not None:
        torch_backend.mm_into(dw, dz_op.t(), h, accumulate=True)
    if db is not None:
        db += dz.sum(dim=0)


def _final_loss(stats: Tensor, shape, loss_args, loss_kwargs):
    """The loss value and metrics from :func:`policy_loss` on the finished log-probs and entropies."""
    with torch.no_grad():
        return policy_loss(stats[0].view(shape), *loss_args, entropy=stats[1].view(shape), **loss_kwargs)


def _scatter_rows(rows: Tensor, idx: Optional[Tensor], n: int) -> Tensor:
    if idx is None:
        return rows
    out = rows.new_zeros((n, rows.shape[1]))
    return out.index_copy_(0, idx, rows)
