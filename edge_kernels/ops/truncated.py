"""Log-prob and entropy under the truncated sampling distribution (``top_k`` / ``top_p`` / ``min_p``) for both
ops: the autograd Functions and the PyTorch backend; the Triton backend's launchers live next to its kernels.

Per call: (1) the per-row threshold of :mod:`edge_kernels.truncation`, found by walking vocabulary chunks of
fp32 logits (``tiles``) a few times; (2) the usual chunked softmax statistics of the kept, renormalised set
(``z'`` of :func:`~edge_kernels.truncation.kept_logits`) with the target's own logit, then the entropy
correction for a partial tie; (3) in the backward, the restricted softmax gradient. Each backend forms its tiles
with one function for all passes, forward and backward, so every pass sees bit-identical logits (a boundary
token is never in the kept set of one pass and out of the next).

A backend is ``(tiles, fwd, bwd)``: ``tiles(inputs, params) -> Tiles``; ``fwd(inputs, targets, th, params) ->
(zt, lse, entropy')`` (``entropy'`` of ``z'``); ``bwd(inputs, targets, th, lse, entropy, g_logp, g_ent, params,
needs) -> grads``.
"""

from __future__ import annotations

import torch

from .. import reference
from ..dispatch import default_chunk_size
from ..truncation import Threshold, Truncation, entropy_correction, find_threshold, grad_kept_tile, kept_logits, \
    target_logp
from .params import LaunchParams

# ----------------------------------------------------------------------------------------------------------
# PyTorch backend, logits in: inputs = (x3,), x3 [B, T, V] with unit vocabulary stride


def _logits_chunk(params: LaunchParams, n: int, vocab: int) -> int:
    return params.chunk_size or default_chunk_size(n, vocab)


def torch_logits_tiles(inputs, params: LaunchParams):
    (x3,) = inputs
    n, vocab = x3.shape[0] * x3.shape[1], x3.shape[2]
    chunk = _logits_chunk(params, n, vocab)

    def tiles():
        for c0 in range(0, vocab, chunk):
            x = x3[:, :, c0:c0 + chunk].reshape(n, -1).float()
            yield c0, reference.softcap_tile(x, params.softcap) * params.inv_temp  # always a new tensor
    return tiles


def _kept_stats(tiles, n, device, targets, th: Threshold):
    """``(z_target, lse, entropy')`` over the kept logits ``z'`` of every tile."""
    m, s, b = reference.init_stats(n, device)
    zt = torch.zeros(n, device=device)
    for c0, z in tiles():
        m, s, b = reference.update_stats(m, s, b, kept_logits(z, th))
        reference._gather_target(z, c0, targets, zt)
    lse, ent = reference.finalize_stats(m, s, b)
    return zt, lse, ent


def torch_logits_fwd(inputs, targets, th: Threshold, params: LaunchParams):
    (x3,) = inputs
    return _kept_stats(torch_logits_tiles(inputs, params), x3.shape[0] * x3.shape[1], x3.device, targets, th)


def torch_logits_bwd(inputs, targets, th, lse, entropy, g_logp, g_ent, params: LaunchParams, needs):
    (x3,), (out3,) = inputs, needs
    bsz, t = x3.shape[0], x3.shape[1]
    for c0, z in torch_logits_tiles(inputs, params)():
        dz = grad_kept_tile(z, c0, targets, lse, entropy, g_logp, g_ent, th)
        if params.softcap is not None:
            dz = dz * reference.softcap_grad(z / params.inv_temp, params.softcap)
        out3[:, :, c0:c0 + z.shape[1]] = (dz * params.inv_temp).view(bsz, t, -1).to(out3.dtype)
    return (out3,)


# ----------------------------------------------------------------------------------------------------------
# PyTorch backend, hidden states in: inputs = (hidden [N, D], weight [V, D], bias [V] or None)


def _linear_setup(inputs, params: LaunchParams):
    hidden, weight, bias = inputs
    mixed = reference._mixed_mm_ok(hidden)
    h_op = hidden if mixed else hidden.float()
    chunk = params.chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0])
    return h_op, mixed, chunk, (bias.float() if bias is not None else None)


def torch_linear_tiles(inputs, params: LaunchParams):
    hidden, weight, _ = inputs
    h_op, mixed, chunk, bias32 = _linear_setup(inputs, params)
    vocab = weight.shape[0]

    def tiles():
        for c0 in range(0, vocab, chunk):
            c1 = min(vocab, c0 + chunk)
            w = weight[c0:c1] if mixed else weight[c0:c1].float()
            out = torch.empty((hidden.shape[0], c1 - c0), device=hidden.device)
            yield c0, reference._logits_tile(h_op, w, None if bias32 is None else bias32[c0:c1], params.inv_temp,
                                             out, params.softcap)
    return tiles


def torch_linear_fwd(inputs, targets, th: Threshold, params: LaunchParams):
    hidden = inputs[0]
    return _kept_stats(torch_linear_tiles(inputs, params), hidden.shape[0], hidden.device, targets, th)


def torch_linear_bwd(inputs, targets, th, lse, entropy, g_logp, g_ent, params: LaunchParams, needs):
    hidden, weight, bias = inputs
    needs_h, needs_w, needs_b = needs
    h_op, mixed, _, _ = _linear_setup(inputs, params)
    dh = torch.zeros(hidden.shape, device=hidden.device) if needs_h else None
    dw = torch.zeros_like(weight) if needs_w else None
    db = torch.zeros(weight.shape[0], device=weight.device) if needs_b else None
    for c0, z in torch_linear_tiles(inputs, params)():
        c1 = c0 + z.shape[1]
        dz = grad_kept_tile(z, c0, targets, lse, entropy, g_logp, g_ent, th)
        if params.softcap is not None:
            dz = dz * reference.softcap_grad(z / params.inv_temp, params.softcap)
        dz = (dz * params.inv_temp).to(h_op.dtype)
        w = weight[c0:c1] if mixed else weight[c0:c1].float()
        if needs_h:
            reference._mm_into(dh, dz, w, accumulate=True)
        if needs_w:
            dw[c0:c1] = reference._mm_into(torch.empty(w.shape, device=w.device), dz.t(), h_op).to(dw.dtype)
        if needs_b:
            db[c0:c1] = dz.float().sum(dim=0)
    return (dh.to(hidden.dtype) if needs_h else None), dw, (db.to(bias.dtype) if needs_b else None)


_LOGITS = {"torch": (torch_logits_tiles, torch_logits_fwd, torch_logits_bwd)}
_LINEAR = {"torch": (torch_linear_tiles, torch_linear_fwd, torch_linear_bwd)}


def _backend(table, impl: str, kind: str):
    if impl == "triton" and impl not in table:
        from . import truncated_triton as tri

        _LOGITS["triton"] = (tri.logits_tiles, tri.logits_fwd, tri.logits_bwd)
        _LINEAR["triton"] = (tri.linear_tiles, tri.linear_fwd, tri.linear_bwd)
    if impl not in table:
        raise NotImplementedError(
            f"top_k/top_p/min_p have no impl={impl!r} backend for {kind}; use impl='torch' or impl='triton'")
    return table[impl]


# ----------------------------------------------------------------------------------------------------------
# autograd


def _forward(ctx, table, kind, inputs, targets, params: LaunchParams, trunc: Truncation, impl: str):
    tiles, fwd, _ = _backend(table, impl, kind)
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
        return _forward(ctx, _LOGITS, "logprob_entropy", (x3,), targets, params, trunc, impl)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        if grad_logp is None and grad_entropy is None:
            return (None,) * 6
        (x3,), targets, lse, entropy, th, g_l, g_h = _upstream(ctx, grad_logp, grad_entropy)
        params, impl, kind, _ = ctx.meta
        inplace = ctx.inplace and torch._debug_has_internal_overlap(x3) == 0
        out = x3 if inplace else torch.empty(x3.shape, device=x3.device, dtype=x3.dtype)
        _, _, bwd = _backend(_LOGITS, impl, kind)
        (dx,) = bwd((x3,), targets, th, lse, entropy, g_l, g_h, params, (out,))
        return dx, None, None, None, None, None


class TruncatedLinearFunction(torch.autograd.Function):
    """Hidden states in: ``hidden [N, D]``, ``weight [V, D]``, optional ``bias [V]``, flat int64 targets."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, params, trunc, impl):
        return _forward(ctx, _LINEAR, "linear_logprob_entropy", (hidden, weight, bias), targets, params, trunc,
                        impl)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        if grad_logp is None and grad_entropy is None:
            return (None,) * 7
        inputs, targets, lse, entropy, th, g_l, g_h = _upstream(ctx, grad_logp, grad_entropy)
        params, impl, kind, _ = ctx.meta
        bias = inputs[2]
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        _, _, bwd = _backend(_LINEAR, impl, kind)
        dh, dw, db = bwd(inputs, targets, th, lse, entropy, g_l, g_h, params, needs)
        return dh, dw, db, None, None, None, None


def check_impl(impl: str, sharded: bool, op: str) -> None:
    """Refuse, by name, what has no truncated path (before any kernel is built): the csrc/ CUDA extension and a
    vocabulary-sharded group (the threshold would need the whole row: a distributed select)."""
    if sharded:
        raise NotImplementedError(f"top_k/top_p/min_p are not implemented with a vocabulary-sharded process_group "
                                  f"in {op}")
    if impl == "cuda":
        raise NotImplementedError(
            f"top_k/top_p/min_p are not implemented for impl='cuda' (the csrc/ kernels) in {op}; "
            "use impl='triton' or impl='torch'")


def apply_logits(x3, targets, params, trunc, inplace_backward: bool, impl: str):
    return TruncatedLogitsFunction.apply(x3, targets, params, trunc, inplace_backward, impl)


def apply_linear(hidden, weight, bias, targets, params, trunc, impl: str):
    return TruncatedLinearFunction.apply(hidden, weight, bias, targets, params, trunc, impl)
