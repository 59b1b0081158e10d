"""Log-prob and entropy under the truncated sampling distribution (``top_k`` / ``top_p`` / ``min_p``) for both
ops: the autograd Functions over the truncated backends of :mod:`edge_kernels.backends.truncated`.

Per call: (1) the per-row threshold of :mod:`edge_kernels.core.truncation`, found by walking vocabulary chunks of
fp32 logits (``tiles``) a few times; (2) the usual chunked softmax statistics of the kept, renormalised set
(``z'`` of :func:`~edge_kernels.core.truncation.kept_logits`) with the target's own logit, then the entropy
correction for a partial tie; (3) in the backward, the restricted softmax gradient. Each backend forms its tiles
with one function for all passes, forward and backward, so every pass sees bit-identical logits (a boundary
token is never in the kept set of one pass and out of the next).
"""

from __future__ import annotations

import torch

from ..backends import truncated as truncated_backends
from ..core.params import LaunchParams
from ..core.truncation import Threshold, Truncation, entropy_correction, find_threshold, target_logp

# ----------------------------------------------------------------------------------------------------------
# autograd


def _forward(ctx, kind, inputs, targets, params: LaunchParams, trunc: Truncation, impl: str):
    tiles, fwd, _ = truncated_backends.get(kind, impl)
    n = targets.shape[0]
    vocab = inputs[0].shape[-1] if kind == "logprob_entropy" else inputs[1].shape[0]
    th = find_threshold(tiles(inputs, params), n, vocab, targets.device, trunc)
    zt, lse, ent_kept = fwd(inputs, targets, th, params)
    entropy = entropy_correction(ent_kept, lse, th)
    logp = target_logp(zt, lse, th)
    valid = targets != params.ignore_index
    zero = torch.zeros_like(lse)
    logp, entropy = torch.where(valid, logp, zero), torch.where(valid, entropy, zero)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs, targets, lse, entropy, logp, th.tau, th.log_w, th.k_tie)
    ctx.meta = (params, impl, kind, len(inputs))
    return logp, entropy


def _upstream(ctx, grad_logp, grad_entropy):
    """Saved state and the fp32 upstream gradients, 0 on ignored rows and (log-prob) on rows whose target was
    cut (its log-prob is the constant -inf)."""
    params, n_inputs = ctx.meta[0], ctx.meta[3]
    saved = ctx.saved_tensors
    inputs, (targets, lse, entropy, logp, tau, log_w, k_tie) = saved[:n_inputs], saved[n_inputs:]
    live = (targets != params.ignore_index)
    zero = torch.zeros_like(lse)
    g_l = zero if grad_logp is None else torch.where(live & torch.isfinite(logp), grad_logp.float(), zero)
    g_h = None if grad_entropy is None else torch.where(live, grad_entropy.float(), zero).contiguous()
    return inputs, targets, lse, entropy, Threshold(tau, log_w, k_tie), g_l.contiguous(), g_h


class TruncatedLogitsFunction(torch.autograd.Function):
    """Logits in: ``x3 [B, T, V]`` (unit vocab stride), flat int64 targets."""

    @staticmethod
    def forward(ctx, x3, targets, params, trunc, inplace_backward, impl):
        ctx.inplace = inplace_backward
        return _forward(ctx, "logprob_entropy", (x3,), targets, params, trunc, impl)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        if grad_logp is None and grad_entropy is None:
            return (None,) * 6
        (x3,), targets, lse, entropy, th, g_l, g_h = _upstream(ctx, grad_logp, grad_entropy)
        params, impl, kind, _ = ctx.meta
        inplace = ctx.inplace and torch._debug_has_internal_overlap(x3) == 0
        out = x3 if inplace else torch.empty(x3.shape, device=x3.device, dtype=x3.dtype)
        _, _, bwd = truncated_backends.get(kind, impl)
        (dx,) = bwd((x3,), targets, th, lse, entropy, g_l, g_h, params, (out,))
        return dx, None, None, None, None, None


class TruncatedLinearFunction(torch.autograd.Function):
    """Hidden states in: ``hidden [N, D]``, ``weight [V, D]``, optional ``bias [V]``, flat int64 targets."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, params, trunc, impl):
        return _forward(ctx, "linear_logprob_entropy", (hidden, weight, bias), targets, params, trunc,
                        impl)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        if grad_logp is None and grad_entropy is None:
            return (None,) * 7
        inputs, targets, lse, entropy, th, g_l, g_h = _upstream(ctx, grad_logp, grad_entropy)
        params, impl, kind, _ = ctx.meta
        bias = inputs[2]
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        _, _, bwd = truncated_backends.get(kind, impl)
        dh, dw, db = bwd(inputs, targets, th, lse, entropy, g_l, g_h, params, needs)
        return dh, dw, db, None, None, None, None


def check_impl(impl: str, sharded: bool, op: str) -> None:
    """Refuse, by name, what has no truncated path (before any kernel is built): the csrc/ CUDA extension and a
    vocabulary-sharded group (the threshold would need the whole row: a distributed select)."""
    if sharded:
        raise NotImplementedError(f"top_k/top_p/min_p are not implemented with vocab_parallel (a vocabulary-"
                                  f"sharded head) in {op}")
    if impl == "cuda":
        raise NotImplementedError(
            f"top_k/top_p/min_p are not implemented for impl='cuda' (the csrc/ kernels) in {op}; "
            "use impl='triton' or impl='torch'")


def apply_logits(x3, targets, params, trunc, inplace_backward: bool, impl: str):
    return TruncatedLogitsFunction.apply(x3, targets, params, trunc, inplace_backward, impl)


def apply_linear(hidden, weight, bias, targets, params, trunc, impl: str):
    return TruncatedLinearFunction.apply(hidden, weight, bias, targets, params, trunc, impl)
