"""Logits in -> per-token log-prob of the target and full-vocabulary entropy, for callers that hold logits.

Owns the public function (validation, backend choice, the ``[B, T, V]`` view) and the thin
``torch.autograd.Function`` over the backends registered in :mod:`edge_kernels.backends`: PyTorch, Triton
(imported on first use, so the package works without triton) and the csrc/ CUDA kernels. The op is
memory-bound: the forward reads each logit once (fp32 statistics,
whatever the input dtype) and writes three floats per row; the backward reads the logits once more and writes
their gradient, into a new tensor or, with ``inplace_backward=True``, over the logits themselves (the caller
promises not to use them after backward).

Rows may be strided: ``[N, V]`` and
``[B, T, V]`` views (e.g. ``logits[:, :-1]``) are read in place; only the vocabulary dimension must have unit
stride (otherwise it is made contiguous).
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
from .validation import check_softcap, check_truncation, validate_logits_inputs

OP = "logprob_entropy"


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


class LogprobEntropyFunction(torch.autograd.Function):
    """Autograd over the logits-in backends; ``logits`` is ``[B, T, V]`` (unit vocab stride)."""

    @staticmethod
    def forward(ctx, logits, targets, params, inplace_backward, impl):
        fwd, _ = backends.get(OP, impl)
        logp, entropy, lse = fwd(logits, targets, params)
        ctx.set_materialize_grads(False)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.meta = (params, inplace_backward, impl)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        params, inplace, impl = ctx.meta
        if grad_logp is None and grad_entropy is None:
            return (None,) * 5
        valid = targets != params.ignore_index
        zero = torch.zeros_like(lse)
        g_logp = zero if grad_logp is None else torch.where(valid, grad_logp.float(), zero).contiguous()
        g_ent = None if grad_entropy is None else torch.where(valid, grad_entropy.float(), zero).contiguous()
        # rows that share memory (an expanded view) cannot be overwritten in place: every block would race
        inplace = inplace and torch._debug_has_internal_overlap(logits) == 0
        out = logits if inplace else torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
        _, bwd = backends.get(OP, impl)
        return bwd(logits, targets, lse, entropy, g_logp, g_ent, params, out), None, None, None, None


def logprob_entropy(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                    ignore_index: int = -100, inplace_backward: bool = False, softcap: Optional[float] = None,
                    impl: str = "auto", vocab_parallel: Optional[VocabParallel] = None,
                    top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None):
    """Per-token log-prob of ``targets`` and full-vocabulary entropy from ``logits [..., V]``.

    ``z = logits / temperature`` (``z = softcap * tanh(logits / softcap) / temperature`` with a soft-cap);
    ``logp = log_softmax(z)[target]``, ``entropy = -sum_v p_v log p_v`` (``docs/algorithms.md``, notation),
    computed in fp32 whatever the logits' dtype. ``-inf`` logits are masked vocabulary entries (probability 0,
    no entropy contribution, also under a soft-cap); NaN gives NaN, and ``+inf`` gives NaN without a soft-cap.

    Args:
        logits: ``[..., V]`` float32/float16/bfloat16; rows may be strided (``logits[:, :-1]`` is not copied).
        targets: integer, shaped ``logits.shape[:-1]``, in ``[0, V)`` or ``ignore_index``.
        temperature: > 0.
        ignore_index: positions with this target return 0 for both outputs and receive no gradient.
        inplace_backward: write the logits gradient over ``logits`` in the backward (saves ``N*V`` memory;
            the caller must not read ``logits`` after ``backward``). Logits whose rows overlap in memory (an
            ``expand``-ed view) get a new gradient tensor instead.
        softcap: ``c`` > 0 to soft-cap the raw logits as ``c * tanh(logits / c)`` (in fp32, before the
            temperature; Gemma 2/3's ``final_logit_softcapping``) for callers holding uncapped logits, or None
            (no cap, no cost). The gradient is taken through ``tanh``.
        impl: ``"auto"`` (Triton on CUDA tensors, PyTorch elsewhere), ``"triton"``, ``"cuda"`` (the csrc/
            extension, built on first use) or ``"torch"``.
        vocab_parallel: a :class:`~edge_kernels.VocabParallel` for logits sharded by vocabulary over its
            ``process_group``: rank r holds the r-th contiguous slice ``logits [..., V_r]``, ``targets`` are
            global ids (the same on every rank), and every rank gets the full-vocabulary outputs; its logits
            gradient is its slice's (:mod:`edge_kernels.ops.vocab_parallel`). None: the unsharded op.
        top_k, top_p, min_p: score under the distribution a sampler truncated this way (vLLM's rule: temperature,
            then min-p, top-k, top-p, renormalised over the kept set; ``docs/algorithms.md`` section 9): a target
            outside the kept set gets ``logp = -inf`` (no gradient), the entropy is the kept set's. None (or
            ``top_p=1``, ``min_p=0``): the full softmax. Not with ``vocab_parallel`` or ``impl="cuda"``.

    Returns:
        ``(logp, entropy)`` float32, shaped like ``targets``.
    """
    trunc = check_truncation(top_k, top_p, min_p)
    sharded = vp.check_options(vocab_parallel, hidden_states_in=False)
    if trunc is not None:
        truncated.check_impl(impl, sharded, "logprob_entropy")
    temperature = validate_logits_inputs(logits, targets, temperature, ignore_index,
                                         target_vocab=vp.UNCHECKED_VOCAB if sharded else None)
    params = LaunchParams(1.0 / temperature, ignore_index, check_softcap(softcap))
    impl = resolve_impl(impl, logits, op=OP)
    lead_shape = targets.shape
    x3 = _as_3d(logits)
    t1 = targets.reshape(-1).to(torch.int64).contiguous()
    if trunc is not None:
        logp, entropy = truncated.apply_logits(x3, t1, params, trunc, bool(inplace_backward), impl)
    elif sharded:
        assert vocab_parallel is not None
        logp, entropy = vp.VocabParallelLogitsFunction.apply(
            x3, t1, params, bool(inplace_backward), backends.get(OP, impl), vocab_parallel.process_group,
            vocab_parallel.vocab_start)
    else:
        logp, entropy = LogprobEntropyFunction.apply(x3, t1, params, bool(inplace_backward), impl)
    return logp.view(lead_shape), entropy.view(lead_shape)
