"""The fused policy loss: hidden states and the LM head in, the loss of :func:`~.objectives.policy_loss` out,
without ``[B, T, V]`` logits.

It computes the log-probs and entropies with :func:`edge_kernels.linear_logprob_entropy` (four matmuls over
forward and backward) or, where a token's gradient depends on its own log-prob only, with the three-matmul path
of :mod:`.three_matmul` (the gradient formed in the forward), then applies the objective.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ..advantage_formulas import eda_scale as _eda_scale_formula
from ..advantage_formulas import seq_mean_entropy
from ..ops.linear_logprob_entropy import linear_logprob_entropy
from ..ops.validation import check_softcap, validate_linear_inputs
from ..ops.vocab_parallel import VocabParallel
from .objectives import (
    EDA_MODES,
    _check_advantages,
    _check_bt,
    _check_choice,
    _check_tensor,
    _validate_loss_options,
    policy_loss,
)
from .three_matmul import fused_policy_loss_three_matmul, three_matmul_applies

Tensor = torch.Tensor

_IGNORE_INDEX = -100

__all__ = ["fused_linear_policy_loss"]


def _eda_current(advantages: Tensor, entropy: Tensor, mask: Tensor, group_size, group_ids, eps: float,
                 clamp) -> Tuple[Tensor, Tensor]:
    """docs/algorithms.md section 2, ``entropy_source="current"``: ``A^_i = A_i * s_i`` with ``s`` =
    :func:`edge_kernels.advantage_formulas.eda_scale` of ``P_i = mean_t[H]`` of the policy being updated (gradient
    through ``1 / P_i``, group mean detached). Returns ``(A^ [B], s [B])``."""
    p = seq_mean_entropy(entropy, mask)
    s = _eda_scale_formula(p, group_size=group_size, group_ids=group_ids, eps=eps, clamp=clamp,
                           valid=(mask != 0).any(-1))
    return advantages.to(p.dtype) * s, s


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
    eda: str = "off",
    group_size: Optional[int] = None,
    group_ids: Optional[Tensor] = None,
    eda_eps: float = 1e-6,
    eda_clamp: Optional[Tuple[float, float]] = None,
    impl: str = "auto",
    chunk_size: Optional[int] = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: Optional[float] = None,
    is_level: str = "token",
    kl_coef: float = 0.0,
    kl_type: str = "k1",
    entropy_coef: float = 0.0,
    top_entropy_quantile: float = 1.0,
    agg: str = "token-mean",
    max_len: Optional[int] = None,
    softcap: Optional[float] = None,
    vocab_parallel: Optional[VocabParallel] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Policy loss from hidden states and the LM head, without ``[B, T, V]`` logits (section 6; section 2 for EDA).

    Log-probs and full-vocabulary entropies come from :func:`edge_kernels.linear_logprob_entropy` at
    ``temperature``; masked positions get ``ignore_index`` targets, so their targets may be anything (padding)
    and their gradient is 0 (the Triton kernel skips a 128-row block whose rows are all masked; the cuBLAS
    matmuls and the PyTorch path still run over every row). The entropy is always computed (free in the forward,
    and reported as ``entropy_mean``) but enters the graph only where its gradient is needed (``entropy_coef != 0`` or
    ``eda="current"``); otherwise a detached copy is used and the backward does no entropy-gradient work.

    Args:
        hidden: ``[B, T, D]`` final hidden states at the response positions (already aligned with ``targets``).
        weight: ``[V, D]`` LM head, same dtype as ``hidden``; ``bias``: optional ``[V]``.
        targets: ``[B, T]`` integer sampled tokens.
        advantages: ``[B]`` or ``[B, T]`` (``[B]`` required by ``eda="current"``).
        mask: ``[B, T]`` response mask.
        temperature: the sampling temperature the logits are divided by.
        old_logp, ref_logp: ``[B, T]``, as in :func:`policy_loss`.
        eda: ``"off"`` or ``"current"``: EDGE-GRPO's Entropy-Driven Advantage with the entropy of the policy being
            updated (the official code's variant): ``P_i = mean_t[H_{i,t}]`` with gradient and
            ``A^_i = A_i * sg[mean_g P] / (P_i + eda_eps)`` (gradient flows through ``1 / P_i``), the scale
            optionally clamped to ``eda_clamp = (s_min, s_max)``. Needs ``group_size`` or ``group_ids``. The
            ``"old"`` variant (detached entropy of the scoring pass) is applied to the advantages before the loss
            with :func:`edge_kernels.advantage_formulas.eda_advantages`.
        group_size, group_ids: the group layout (EDA, and the group metrics of :func:`policy_loss`).
        impl, chunk_size: passed to :func:`edge_kernels.linear_logprob_entropy`.
        clip_low ... max_len: as in :func:`policy_loss`.
        softcap: the model's final-logit soft-cap (Gemma 2/3), passed to
            :func:`edge_kernels.linear_logprob_entropy`; None for none.
        vocab_parallel: a :class:`~edge_kernels.VocabParallel` for a vocabulary-sharded LM head (``weight``/
            ``bias`` are this rank's slice), passed to :func:`edge_kernels.linear_logprob_entropy`; every rank gets
            the same loss and metrics, its own ``d_weight`` slice and the summed (or partial) ``d_hidden``.

    Returns:
        ``(loss, metrics)`` as :func:`policy_loss` (the advantage metrics describe the EDA-rescaled
        advantages); with EDA also ``eda_scale_mean``, the mean over rows of the (clamped) scale
        ``sg[mean_g P] / (P_i + eps)``.
    """
    _check_fused_inputs(hidden, targets, advantages, mask, old_logp, ref_logp, eda, group_size, group_ids,
                        clip_low, clip_high, dual_clip, is_level, kl_coef, kl_type, entropy_coef,
                        top_entropy_quantile, agg, max_len)
    tgt = targets.to(torch.int64)
    tgt = torch.where(mask != 0, tgt, torch.full_like(tgt, _IGNORE_INDEX))
    loss_kwargs: Dict[str, Any] = dict(ref_logp=ref_logp, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                       is_level=is_level, kl_coef=kl_coef, kl_type=kl_type, entropy_coef=entropy_coef,
                       top_entropy_quantile=top_entropy_quantile, agg=agg, max_len=max_len,
                       group_size=group_size, group_ids=group_ids)
    if vocab_parallel is None and three_matmul_applies(impl, hidden, weight, bias, advantages, eda, is_level,
                                                      top_entropy_quantile, chunk_size):
        inv_temp = 1.0 / validate_linear_inputs(hidden, weight, tgt, bias, temperature, chunk_size, _IGNORE_INDEX)
        return fused_policy_loss_three_matmul(hidden, weight, tgt, bias, inv_temp, _IGNORE_INDEX,
                                              (old_logp, advantages, mask), loss_kwargs, check_softcap(softcap))
    logp, entropy = linear_logprob_entropy(hidden, weight, tgt, bias=bias, temperature=temperature,
                                           ignore_index=_IGNORE_INDEX, return_entropy=True,
                                           chunk_size=chunk_size, softcap=softcap, impl=impl,
                                           vocab_parallel=vocab_parallel)
    eda_scale = None
    if eda == "current":
        advantages, eda_scale = _eda_current(advantages, entropy, mask, group_size, group_ids, eda_eps, eda_clamp)

    loss, metrics = policy_loss(logp, old_logp, advantages, mask,
                                entropy=entropy if entropy_coef != 0.0 else entropy.detach(), **loss_kwargs)
    if eda_scale is not None:
        metrics["eda_scale_mean"] = eda_scale.detach().mean()
    return loss, metrics


def _check_fused_inputs(hidden, targets, advantages, mask, old_logp, ref_logp, eda, group_size, group_ids,
                        clip_low, clip_high, dual_clip, is_level, kl_coef, kl_type, entropy_coef,
                        top_entropy_quantile, agg, max_len) -> None:
    """Shapes and options of :func:`fused_linear_policy_loss` (before the kernel runs)."""
    _check_tensor("hidden", hidden, floating=True)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [B, T, D], got {tuple(hidden.shape)}")
    shape = (hidden.shape[0], hidden.shape[1])
    _check_bt("targets", targets, shape, floating=False)
    _check_bt("mask", mask, shape, floating=False)
    _check_choice("eda", eda, EDA_MODES)
    _validate_loss_options(clip_low, clip_high, dual_clip, is_level, kl_coef, kl_type, entropy_coef,
                           top_entropy_quantile, agg, max_len)
    _check_bt("old_logp", old_logp, shape)
    _check_bt("ref_logp", ref_logp, shape)
    _check_advantages(advantages, shape, check_nan=False)  # policy_loss checks for NaN (EDA propagates it)
    if eda == "current":
        if advantages.dim() != 1:
            raise ValueError(f"eda='current' needs per-sequence advantages [B], got {tuple(advantages.shape)}")
        if group_size is None and group_ids is None:
            raise ValueError("eda='current' needs group_size or group_ids")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
