"""The fused policy loss: hidden states and the LM head in, the loss of :func:`~.objectives.policy_loss` out,
without ``[B, T, V]`` logits.

It computes the log-probs and entropies with :func:`edge_kernels.linear_logprob_entropy` (four matmuls over
forward and backward) or, where a token's gradient depends on its own log-prob only, with the three-matmul path
of :mod:`.three_matmul` (the gradient formed in the forward); the ``gradient`` argument makes the choice
explicit. Then it applies the objective.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ..ops.linear_logprob_entropy import linear_logprob_entropy
from ..ops.validation import check_softcap, validate_linear_inputs
from ..ops.vocab_parallel import VocabParallel
from .objectives import _check_advantages, _check_bt, _check_needs, _check_tensor, _options, policy_loss
from .options import PolicyLossOptions
from .three_matmul import fused_policy_loss_three_matmul, in_forward_unavailable

Tensor = torch.Tensor

GRADIENT_STRATEGIES = ("auto", "in_forward", "recompute")
_IGNORE_INDEX = -100

__all__ = ["fused_linear_policy_loss", "GRADIENT_STRATEGIES"]


def fused_linear_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    old_logp: Optional[Tensor] = None,
    ref_logp: Optional[Tensor] = None,
    rollout_logp: Optional[Tensor] = None,
    options: Optional[PolicyLossOptions] = None,
    group_size: Optional[int] = None,
    group_ids: Optional[Tensor] = None,
    impl: str = "auto",
    chunk_size: Optional[int] = None,
    gradient: str = "auto",
    softcap: Optional[float] = None,
    vocab_parallel: Optional[VocabParallel] = None,
    **option_overrides: Any,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """:func:`policy_loss` from hidden states and the LM head, without ``[B, T, V]`` logits (sections 6, 2, 8).

    Log-probs and full-vocabulary entropies come from :func:`edge_kernels.linear_logprob_entropy` at
    ``temperature``; masked positions get ``ignore_index`` targets, so their targets may be anything (padding)
    and their gradient is 0 (the Triton kernel skips a 128-row block whose rows are all masked; the cuBLAS
    matmuls and the PyTorch path still run over every row). The entropy is always computed (free in the
    forward, and reported as ``entropy_mean``) but enters the graph only where its gradient is needed
    (``entropy_coef != 0`` or ``eda="current"``); otherwise a detached copy is used and the backward does no
    entropy-gradient work.

    Args:
        hidden: ``[B, T, D]`` final hidden states at the response positions (already aligned with ``targets``).
        weight: ``[V, D]`` LM head, same dtype as ``hidden``; ``bias``: optional ``[V]``.
        targets: ``[B, T]`` integer sampled tokens.
        advantages, mask, old_logp, ref_logp, rollout_logp, options, group_size, group_ids,
            ``option_overrides``: as in :func:`policy_loss` (``eda="current"``: EDGE-GRPO's Entropy-Driven
            Advantage with the entropy computed here, section 2).
        temperature: the sampling temperature the logits are divided by.
        impl, chunk_size: passed to :func:`edge_kernels.linear_logprob_entropy`.
        gradient: how the gradient is formed (the answer differs only by round-off):

            * ``"in_forward"``: three matmuls. The PyTorch backend walks row blocks over the whole vocabulary,
              and since each token's loss gradient is then known (it needs the options' ``token_local``: token
              ratios, objective clip/cispo/sapo, no entropy filter, no EDA, no off-policy mask, advantages
              without gradient), it forms ``d_hidden`` and ``d_weight`` in the forward. Cost: ``d_hidden``
              (``N x D``) and an fp32 ``d_weight`` (``4 V D`` bytes, twice a 16-bit head; plus the head's fp32
              copy on the CPU) held from the forward to the backward. Needs ``impl`` ``"torch"`` (or ``"auto"``
              on the CPU), no ``vocab_parallel``, ``chunk_size`` None or ``>= V``, and ``V <=``
              :data:`edge_kernels.backends.torch.FULL_ROW_MAX_VOCAB`; refused naming the reason otherwise.
            * ``"recompute"``: four matmuls: the op's forward, and a backward that recomputes the logits chunk
              by chunk; holds only chunk-sized fp32 buffers.
            * ``"auto"`` (default): ``"in_forward"`` on the CPU (PyTorch backend) wherever it applies, else
              ``"recompute"``; on CUDA always ``"recompute"`` unless ``impl="torch"`` is asked for.
        softcap: the model's final-logit soft-cap (Gemma 2/3), passed to the op; None for none.
        vocab_parallel: a :class:`~edge_kernels.VocabParallel` for a vocabulary-sharded LM head (``weight``/
            ``bias`` are this rank's slice), passed to :func:`edge_kernels.linear_logprob_entropy`; every rank gets
            the same loss and metrics, its own ``d_weight`` slice and the summed (or partial) ``d_hidden``.

    Returns:
        ``(loss, metrics)`` as :func:`policy_loss` (the advantage metrics describe the EDA-rescaled advantages).
    """
    o = _options(options, option_overrides)
    _check_fused_inputs(hidden, targets, advantages, mask, old_logp, ref_logp, rollout_logp, o, group_size,
                        group_ids, gradient)
    tgt = targets.to(torch.int64)
    tgt = torch.where(mask != 0, tgt, torch.full_like(tgt, _IGNORE_INDEX))
    loss_kwargs: Dict[str, Any] = dict(ref_logp=ref_logp, rollout_logp=rollout_logp, options=o, group_size=group_size,
                       group_ids=group_ids)
    if _use_in_forward(gradient, impl, hidden, weight, bias, advantages, o, chunk_size, vocab_parallel):
        inv_temp = 1.0 / validate_linear_inputs(hidden, weight, tgt, bias, temperature, chunk_size, _IGNORE_INDEX)
        return fused_policy_loss_three_matmul(hidden, weight, tgt, bias, inv_temp, _IGNORE_INDEX,
                                              (old_logp, advantages, mask), loss_kwargs, check_softcap(softcap))
    logp, entropy = linear_logprob_entropy(hidden, weight, tgt, bias=bias, temperature=temperature,
                                           ignore_index=_IGNORE_INDEX, return_entropy=True,
                                           chunk_size=chunk_size, softcap=softcap, impl=impl,
                                           vocab_parallel=vocab_parallel)
    with_grad = o.entropy_coef != 0.0 or o.eda != "off"
    return policy_loss(logp, old_logp, advantages, mask, entropy=entropy if with_grad else entropy.detach(),
                       **loss_kwargs)


def _use_in_forward(gradient: str, impl: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                    advantages: Tensor, o: PolicyLossOptions, chunk_size: Optional[int],
                    vocab_parallel: Optional[VocabParallel]) -> bool:
    """The gradient strategy of :func:`fused_linear_policy_loss` (see its ``gradient`` argument)."""
    if gradient == "recompute":
        return False
    reason = ("vocab_parallel is set (the vocabulary-parallel op recomputes)" if vocab_parallel is not None else
              in_forward_unavailable(impl, hidden, weight, bias, advantages, o, chunk_size))
    if gradient == "in_forward":
        if reason is not None:
            raise ValueError(f"gradient='in_forward' does not apply: {reason}")
        return True
    return reason is None and not (impl == "auto" and hidden.is_cuda)


def _check_fused_inputs(hidden, targets, advantages, mask, old_logp, ref_logp, rollout_logp, o, group_size,
                        group_ids, gradient) -> None:
    """Shapes and arguments of :func:`fused_linear_policy_loss` (before the kernel runs)."""
    _check_tensor("hidden", hidden, floating=True)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [B, T, D], got {tuple(hidden.shape)}")
    shape = (hidden.shape[0], hidden.shape[1])
    _check_bt("targets", targets, shape, floating=False)
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    _check_bt("mask", mask, shape, floating=False)
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("rollout_logp", rollout_logp)):
        _check_bt(name, t, shape)
    _check_advantages(advantages, shape, check_nan=False)  # policy_loss checks for NaN (EDA propagates it)
    _check_needs(o, shape, advantages, hidden if o.needs_entropy else None, ref_logp, rollout_logp, group_size,
                 group_ids)  # the entropy comes from the kernel
    if gradient not in GRADIENT_STRATEGIES:
        raise ValueError(f"gradient must be one of {list(GRADIENT_STRATEGIES)}, got {gradient!r}")
