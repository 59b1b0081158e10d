"""Fused ``hidden @ weight.T (+ bias)`` -> per-token log-prob of the target and full-vocabulary entropy.

Owns the public function (validation, backend choice, flattening) and the thin ``torch.autograd.Function``
over the backends registered in :mod:`edge_kernels.backends` (PyTorch; Triton, imported on first use, so
``import edge_kernels`` works where triton is not installed). A sharded LM head goes to
:mod:`edge_kernels.ops.vocab_parallel`, handed the same backend.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from ..core.params import LaunchParams
from . import truncated
from . import vocab_parallel as vp
from .vocab_parallel import VocabParallel
from .backend_choice import resolve_impl
from .validation import check_softcap, check_truncation, validate_linear_inputs

OP = "linear_logprob_entropy"


class LinearLogprobEntropyFunction(torch.autograd.Function):
    """Autograd over the backends. Inputs are flat and validated: ``hidden [N, D]``, ``targets [N]`` int64."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, params, impl):
        fwd, _ = backends.get(OP, impl)
        logp, entropy, lse = fwd(hidden, weight, bias, targets, params)
        ctx.set_materialize_grads(False)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.meta = (params, impl)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        params, impl = ctx.meta
        if grad_logp is None and grad_entropy is None:
            return (None,) * 6
        valid = targets != params.ignore_index
        zero = torch.zeros_like(lse)
        g_logp = zero if grad_logp is None else torch.where(valid, grad_logp.float(), zero).contiguous()
        g_ent = None if grad_entropy is None else torch.where(valid, grad_entropy.float(), zero).contiguous()
        _, bwd = backends.get(OP, impl)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        dh, dw, db = bwd(hidden, weight, bias, targets, lse, entropy, g_logp, g_ent, params, needs)
        return dh, dw, db, None, None, None


def linear_logprob_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                           bias: Optional[torch.Tensor] = None, temperature: float = 1.0, ignore_index: int = -100,
                           return_entropy: bool = True, chunk_size: Optional[int] = None,
                           softcap: Optional[float] = None, impl: str = "auto",
                           vocab_parallel: Optional[VocabParallel] = None,
                           top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None):
    """Per-token log-prob of ``targets`` and full-vocabulary entropy from hidden states, without ``[N, V]`` logits.

    Logits are ``(hidden @ weight.T + bias) / temperature``, formed in fp32 tiles (soft-capped first when
    ``softcap`` is given). With ``p = softmax(logits)``: ``logp = log p[target]`` and
    ``entropy = -sum_v p_v log p_v`` (``docs/algorithms.md``, notation).

    Args:
        hidden: ``[..., D]`` float32/float16/bfloat16.
        weight: ``[V, D]``, same dtype as ``hidden`` (the LM head).
        targets: integer ``[...]`` (``hidden.shape[:-1]``) in ``[0, V)``, or ``ignore_index``.
        bias: optional ``[V]``.
        temperature: the sampling temperature (> 0).
        ignore_index: positions with this target return 0 for both outputs and receive no gradient.
        return_entropy: when False the entropy is returned as None (it costs nothing extra in the forward, and
            no entropy-gradient work is done in the backward either way unless the entropy is used).
        chunk_size: vocabulary columns per backward chunk; the workspace is ``N * chunk_size`` elements of the
            input dtype (Triton) or fp32 (PyTorch path). Default: the largest multiple of 256 with
            ``N * chunk_size <= 2**25`` (64 MiB in bf16).
        softcap: ``c`` > 0 to soft-cap the fp32 logits as ``c * tanh(z / c)`` before the temperature (Gemma 2/3's
            ``final_logit_softcapping``), or None (no cap, no cost); differentiated through ``tanh``.
        impl: ``"auto"`` (Triton on CUDA tensors, PyTorch elsewhere), ``"triton"`` or ``"torch"``.
        vocab_parallel: a :class:`~edge_kernels.VocabParallel` for an LM head sharded by vocabulary over its
            ``process_group``: rank r holds the r-th contiguous slice (``weight [V_r, D]``, ``bias [V_r]``),
            ``hidden``/``targets`` (global ids) are the same on every rank, and every rank gets the
            full-vocabulary outputs (:mod:`edge_kernels.ops.vocab_parallel`). None: the unsharded op.
        top_k, top_p, min_p: score under the distribution a sampler truncated this way (vLLM's rule: temperature,
            then min-p, top-k, top-p, renormalised over the kept set; ``docs/algorithms.md`` section 9): a target
            outside the kept set gets ``logp = -inf`` (no gradient), the entropy is the kept set's. None (or
            ``top_p=1``, ``min_p=0``): the full softmax. Costs a few more passes over the vocabulary (the
            threshold search); not with ``vocab_parallel``.

    Returns:
        ``(logp, entropy)``: float32 tensors shaped like ``targets`` (``entropy`` is None when
        ``return_entropy=False``). Differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` through both.
    """
    trunc = check_truncation(top_k, top_p, min_p)
    sharded = vp.check_options(vocab_parallel, hidden_states_in=True)
    if trunc is not None:
        truncated.check_impl(impl, sharded, "linear_logprob_entropy")
    temperature = validate_linear_inputs(hidden, weight, targets, bias, temperature, chunk_size, ignore_index,
                                         target_vocab=vp.UNCHECKED_VOCAB if sharded else None)
    params = LaunchParams(1.0 / temperature, ignore_index, check_softcap(softcap), chunk_size)
    impl = resolve_impl(impl, hidden, weight, op=OP)
    lead_shape = targets.shape
    # the kernels index the feature dim and the bias with unit stride (and int32 feature offsets): copy the rare
    # operand that is not laid out that way (a transposed weight view, a strided bias); autograd maps it back
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if bias is not None and bias.stride(-1) != 1:
        bias = bias.contiguous()
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    t1 = targets.reshape(-1).to(torch.int64).contiguous()
    if trunc is not None:
        logp, entropy = truncated.apply_linear(h2, weight, bias, t1, params, trunc, impl)
    elif sharded:
        assert vocab_parallel is not None
        logp, entropy = vp.VocabParallelLinearFunction.apply(
            h2, weight, bias, t1, params, backends.get(OP, impl), vocab_parallel.process_group,
            vocab_parallel.vocab_start, vocab_parallel.reduce_hidden_grad)
    else:
        logp, entropy = LinearLogprobEntropyFunction.apply(h2, weight, bias, t1, params, impl)
    logp = logp.view(lead_shape)
    return logp, (entropy.view(lead_shape) if return_entropy else None)
