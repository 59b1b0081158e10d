"""Policy objectives on per-token log-probs: every objective, its aggregation modes, filters and metrics.

The fused hidden-states-in front (:func:`edge_kernels.losses.fused.fused_linear_policy_loss`) computes the log-probs
with the kernels and calls :func:`policy_loss` here. The math is ``docs/algorithms.md`` section 6 (section 2 for
``eda="current"``, section 8 for the rollout correction); the options are one
:class:`edge_kernels.losses.options.PolicyLossOptions`, validated once. Everything works on ``[B, T]`` tensors
(``B`` responses, ``T`` response positions) with a response mask ``m`` (1 on tokens that count; any non-negative
float weights are accepted and act as token weights).

Per token, with ``l`` the current log-prob, ``l_old`` the sampling policy's, ``l_ref`` the reference's,
``A`` the advantage and ``H`` the entropy, the default objective (``"clip"``) is::

    rho   = exp(l - l_old)                                   (is_level="token")
          = exp(mean_t[l - l_old])  for every token of i     (is_level="sequence", GSPO)
    L     = max(-rho A, -clip(rho, 1 - clip_low, 1 + clip_high) A)
    L     = min(L, dual_clip * |A|)  where A < 0             (dual_clip set; verl's dual clip)
    L     = L * w_rollout * keep_offpolicy                   (rollout correction, off-policy mask)
    L    += kl_coef * k(l, l_ref) [* rho] - entropy_coef * H

then ``L`` is aggregated over the kept tokens by ``agg``; CISPO, SAPO, LUSPO, VESPO, Clip-Cov and KL-Cov replace
the first lines (:func:`_surrogate`). Numerical guards, the same as verl's: the log-ratio (token or sequence) is
clamped to ``[-20, 20]`` before ``exp``; masked positions never enter a non-linearity, so garbage (even
``inf``/``NaN`` log-probs) under a zero mask cannot reach the loss or its gradient.

Differences from verl 0.9 (``verl.trainer.ppo.core_algos``) and TRL 1.16, all deliberate (the tests state each):

* GSPO (``is_level="sequence"``): the gradient flows through the masked mean, ``d s_i / d l_{i,t} = s_i m_t / |o_i|``
  (the GSPO paper's sequence ratio). verl's ``compute_policy_loss_gspo`` uses the straight-through
  ``sg[s_i] * exp(l - sg[l])`` (gradient ``s_i`` per token, no ``1/|o_i|``) and clamps the log-ratio at
  ``max=10``; forward values agree whenever ``|log s_i| <= 10``.
* KL ``k3`` is exactly ``exp(l_ref - l) - (l_ref - l) - 1`` (section 6); verl additionally clamps the log-ratio to
  ``[-20, 20]`` and the result to ``[-10, 10]``.
* Aggregation: see :func:`aggregate`; ``seq-mean-token-sum-norm`` divides by ``B * max_len`` (all rows) as the
  spec and Dr.GRPO do, where verl divides by the number of non-empty rows times ``max_len``; the batch-wide
  ``token-mean`` of an all-masked batch is 0 here, ``NaN`` in verl.
* The entropy filter removes a token from every term (KL and entropy bonus included); TRL filters only the
  policy-gradient term. The rollout weight and the off-policy mask scale the policy-gradient term only, as in
  TRL and verl.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch

from ..advantage_formulas import eda_scale, group_advantage_variance, seq_mean_entropy, zero_advantage_group_fraction
from ..ops.validation import check_same_device
from .options import AGG_MODES, EDA_MODES, IS_LEVELS, KL_TYPES, PolicyLossOptions, options_from

Tensor = torch.Tensor

LOG_RATIO_CLAMP = 20.0  # verl's clamp of log(rho) before exp()
VESPO_LOG_W_MIN = math.log(1e-8)  # TRL's lower clamp of VESPO's log sequence weight

__all__ = ["policy_loss", "aggregate", "PolicyLossOptions", "AGG_MODES", "KL_TYPES", "IS_LEVELS", "EDA_MODES"]


# ----------------------------------------------------------------------------------------------------------
# input validation (argument-naming errors; the options validate themselves, the kernels' inputs in dispatch)


def _check_tensor(name: str, t, *, floating: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_bt(name: str, t: Optional[Tensor], shape: Tuple[int, int], *, floating: bool = True) -> None:
    if t is None:
        return
    _check_tensor(name, t, floating=floating)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape [B, T] = {tuple(shape)}, got {tuple(t.shape)}")


def _check_advantages(advantages: Tensor, shape: Tuple[int, int], check_nan: bool = True) -> None:
    _check_tensor("advantages", advantages, floating=True)
    if tuple(advantages.shape) not in ((shape[0],), tuple(shape)):
        raise ValueError(
            f"advantages must have shape [B] = ({shape[0]},) or [B, T] = {tuple(shape)}, got {tuple(advantages.shape)}"
        )
    # one host sync: a NaN advantage would silently poison the whole batch's loss (skipped while a CUDA graph
    # is being captured, where a sync is illegal: eager calls check it)
    capturing = advantages.is_cuda and torch.cuda.is_current_stream_capturing()
    if check_nan and not capturing and advantages.numel() and bool(torch.isnan(advantages.detach()).any()):
        raise ValueError("advantages contains NaN")


def _options(options: Optional[PolicyLossOptions], overrides: Dict[str, Any]) -> PolicyLossOptions:
    """The call's options: ``options`` (or the defaults) with the keyword ``overrides`` applied."""
    if options is not None and not isinstance(options, PolicyLossOptions):
        raise TypeError(f"options must be a PolicyLossOptions, got {type(options).__name__}")
    if not overrides:
        return PolicyLossOptions() if options is None else options
    return options_from(options, **overrides)


def _check_needs(o: PolicyLossOptions, shape, advantages: Tensor, entropy, ref_logp, rollout_logp, group_size,
                 group_ids) -> None:
    """The inputs each option needs (one place for the loss and its fused front)."""
    if o.kl_coef != 0.0 and ref_logp is None:
        raise ValueError("kl_coef != 0 needs ref_logp")
    if o.entropy_coef != 0.0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy")
    if o.top_entropy_quantile < 1.0 and entropy is None:
        raise ValueError("top_entropy_quantile < 1 needs entropy")
    if o.rollout_is != "off" and rollout_logp is None:
        raise ValueError(f"rollout_is={o.rollout_is!r} needs rollout_logp (the rollout engine's log-probs)")
    if o.eda == "current":
        if entropy is None:
            raise ValueError("eda='current' needs entropy (with its gradient)")
        if advantages.dim() != 1:
            raise ValueError(f"eda='current' needs per-sequence advantages [B], got {tuple(advantages.shape)}")
        if group_size is None and group_ids is None:
            raise ValueError("eda='current' needs group_size or group_ids")


# ----------------------------------------------------------------------------------------------------------
# building blocks


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with ``den == 0`` giving 0 (an empty row or batch contributes nothing, never NaN)."""
    return num / torch.where(den > 0, den, torch.ones_like(den))


def aggregate(loss_mat: Tensor, mask: Tensor, agg: str = "token-mean", max_len: Optional[int] = None) -> Tensor:
    """Reduce a per-token loss ``[B, T]`` with mask (weights) ``[B, T]`` to a scalar (section 6, verl's names).

    * ``"token-mean"``: ``sum(L m) / sum(m)``.
    * ``"seq-mean-token-mean"``: per row ``sum_t(L m) / sum_t(m)``, averaged over the rows with ``sum_t m > 0``.
    * ``"seq-mean-token-sum"``: per row ``sum_t(L m)``, averaged over the rows with ``sum_t m > 0``.
    * ``"seq-mean-token-sum-norm"``: ``sum(L m) / (B * max_len)``, ``max_len`` defaulting to ``T`` (Dr.GRPO's
      constant normaliser).

    verl's ``agg_loss`` (dp_size = 1) is matched exactly for the first three modes, including the exclusion of
    fully masked rows from the row average, except that an empty denominator gives 0 instead of NaN and the
    per-row token mean divides by ``sum_t m`` rather than ``sum_t m + 1e-8``. For ``seq-mean-token-sum-norm``
    verl divides by (non-empty rows) * ``max_len``; here all ``B`` rows count, as in the spec, so the two agree
    when no row is fully masked.
    """
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {list(AGG_MODES)}, got {agg!r}")
    lm = loss_mat * mask
    if agg == "token-mean":
        return _safe_div(lm.sum(), mask.sum())
    if agg == "seq-mean-token-sum-norm":
        horizon = loss_mat.shape[-1] if max_len is None else max_len
        return lm.sum() / (loss_mat.shape[0] * horizon)
    row_count = mask.sum(dim=-1)
    row = lm.sum(dim=-1)
    if agg == "seq-mean-token-mean":
        row = _safe_div(row, row_count)
    n_rows = (row_count > 0).to(lm.dtype).sum()
    return _safe_div(row.sum(), n_rows)


def _kl(d: Tensor, kl_type: str) -> Tensor:
    """Section 6, from ``d = l - l_ref``: k1 = d, k2 = d^2 / 2, k3 = exp(l_ref - l) - (l_ref - l) - 1."""
    if kl_type == "k1":
        return d
    if kl_type == "k2":
        return 0.5 * d * d
    return torch.exp(-d) + d - 1.0


def _entropy_quantile_keep(entropy: Tensor, valid: Tensor, rho: float) -> Tensor:
    """Boolean ``[B, T]``: valid tokens whose entropy is >= the ``(1 - rho)`` quantile of the valid tokens'
    entropies (linear interpolation, as ``torch.quantile``). No host sync: invalid entries sort last as +inf
    and the quantile's position is a device tensor."""
    h = torch.where(valid, entropy, torch.full_like(entropy, float("inf"))).flatten()
    sorted_h = torch.sort(h).values
    n = valid.sum()
    pos = (1.0 - rho) * (n - 1).clamp(min=0).to(sorted_h.dtype)
    lo = pos.floor()
    frac = pos - lo
    idx = torch.stack([lo, pos.ceil()]).long()
    lo_v, hi_v = sorted_h.index_select(0, idx)  # index_select, not [0-d tensor] indexing: no .item() sync
    threshold = torch.where(frac > 0, lo_v + frac * (hi_v - lo_v), lo_v)  # n == 0: +inf, nothing kept
    return valid & (entropy >= threshold)


def _group_metrics(advantages: Tensor, group_size, group_ids) -> Dict[str, Tensor]:
    """Intra-group advantage variance and zero-advantage-group fraction of per-sequence advantages ``[B]``
    (definitions, and the validation of the group layout, in :mod:`edge_kernels.advantage_formulas`)."""
    a = advantages.detach()
    return {
        "adv_group_var": group_advantage_variance(a, group_size=group_size, group_ids=group_ids),
        "adv_batch_var": a.var() if a.numel() > 1 else torch.zeros((), dtype=a.dtype, device=a.device),
        "zero_adv_group_frac": zero_advantage_group_fraction(a, group_size=group_size, group_ids=group_ids),
    }


# ----------------------------------------------------------------------------------------------------------
# the loss


def policy_loss(
    logp: Tensor,
    old_logp: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    *,
    entropy: Optional[Tensor] = None,
    ref_logp: Optional[Tensor] = None,
    rollout_logp: Optional[Tensor] = None,
    rollout_is_weights: Optional[Tensor] = None,
    options: Optional[PolicyLossOptions] = None,
    group_size: Optional[int] = None,
    group_ids: Optional[Tensor] = None,
    **option_overrides: Any,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Policy-gradient loss (section 6): the chosen objective, KL, entropy terms, filters, rollout correction.

    Args:
        logp: ``[B, T]`` current-policy log-probs of the sampled tokens (differentiable).
        old_logp: ``[B, T]`` sampling-policy log-probs (no gradient), or None for on-policy
            (``old = logp.detach()``, so ``rho = 1`` with the gradient of ``exp(l - sg[l])``).
        advantages: ``[B]`` (broadcast over tokens) or ``[B, T]``. May carry a gradient (``eda="current"``).
        mask: ``[B, T]`` response mask (bool, int or float weights >= 0).
        entropy: ``[B, T]`` token entropies; needed by ``entropy_coef != 0`` and ``eda="current"`` (their
            gradients are used) and by ``top_entropy_quantile < 1`` (detached); when given, ``entropy_mean`` is
            reported.
        ref_logp: ``[B, T]`` reference-policy log-probs (no gradient); needed when ``kl_coef != 0``.
        rollout_logp: ``[B, T]`` the rollout engine's log-probs of the sampled tokens (no gradient; ``NaN`` where
            the engine gave none: weight 1 there); needed by ``rollout_is``; used by the off-policy mask in
            place of ``old_logp`` when given.
        rollout_is_weights: ``[B, T]`` rollout-correction weights a framework computed already (verl's
            ``rollout_is_weights``; detached, ``>= 0``), applied like the weights of ``rollout_is`` (section 8);
            only with ``rollout_is="off"``.
        options: a :class:`edge_kernels.losses.options.PolicyLossOptions` (default: its defaults); keyword
            ``option_overrides`` (its field names: ``clip_high=0.28``, ``objective="cispo"``, ...) are applied
            on top of it and validated with it.
        group_size, group_ids: optional group layout (contiguous groups of ``group_size`` rows, or a group-id
            per row): needed by ``eda="current"``; with ``[B]`` advantages it adds ``adv_group_var`` and
            ``zero_adv_group_frac``.

    Returns:
        ``(loss, metrics)``: a 0-d loss, and a dict of detached 0-d tensors (left on the device, never
        ``.item()``-ed except where Clip-Cov/KL-Cov count their tokens), averaged over the masked tokens
        (``mask``, before the entropy filter) unless said otherwise:

        * ``ratio_mean``: mean ``rho`` (``s_i`` per token at sequence level).
        * ``clip_frac_low`` / ``clip_frac_high`` (hard-clip objectives: clip, luspo, clip_cov, cispo): tokens
          where the lower clip (``A < 0`` and ``rho < 1 - clip_low``) / upper clip (``A > 0`` and
          ``rho > 1 + clip_high``) is active; for CISPO the weight's clip, whatever the sign of ``A``.
        * ``clip_frac_dual`` (dual clip only): verl's ``pg_clipfrac_lower``, tokens with ``A < 0`` and
          ``L^clip > c |A|``.
        * ``cov_frac`` (clip_cov, kl_cov): tokens whose gradient Clip-Cov dropped / KL-Cov penalised;
          ``vespo_phi_mean`` (vespo); ``off_policy_mask_frac``: responses the off-policy mask dropped (share
          of the non-empty rows); ``rollout_is_*`` (rollout correction, section 8): ``weight_mean``, ``ess``,
          ``clipped_frac``, ``masked_frac``.
        * ``approx_kl``: k3 estimate of KL(old || current), ``mean(exp(l - l_old) - 1 - (l - l_old))``.
        * ``kl_ref`` (when ``ref_logp`` is given): mean of the chosen ``kl_type`` estimator (before the bias
          correction).
        * ``entropy_mean`` (when ``entropy`` is given); ``keep_frac`` (entropy filter only); ``eda_scale_mean``
          (``eda="current"``: the mean over rows of the scale).
        * ``adv_mean``, ``adv_std``: token-weighted mean and unbiased std of the advantages used (verl's
          ``critic/advantages`` statistics; after EDA's rescaling).
        * ``adv_group_var``, ``zero_adv_group_frac``, ``adv_batch_var``: see :mod:`edge_kernels.advantage_formulas`
          (``[B]`` advantages with a group layout only).

    Raises:
        ValueError / TypeError: a bad shape or dtype, NaN advantages, a missing input an option needs, or an
            option value or combination :class:`PolicyLossOptions` refuses (the message names the option).
    """
    o = _options(options, option_overrides)
    _check_tensor("logp", logp, floating=True)
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape [B, T], got {tuple(logp.shape)}")
    shape = (logp.shape[0], logp.shape[1])
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("entropy", entropy),
                    ("rollout_logp", rollout_logp), ("rollout_is_weights", rollout_is_weights)):
        _check_bt(name, t, shape)
    _check_bt("mask", mask, shape, floating=False)
    _check_advantages(advantages, shape)
    _check_needs(o, shape, advantages, entropy, ref_logp, rollout_logp, group_size, group_ids)
    if rollout_is_weights is not None and o.rollout_is != "off":
        raise ValueError(f"rollout_is_weights (precomputed) and rollout_is={o.rollout_is!r} (computed here) "
                         "exclude each other")
    check_same_device(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, entropy=entropy,
                      ref_logp=ref_logp, rollout_logp=rollout_logp, rollout_is_weights=rollout_is_weights,
                      group_ids=group_ids)
    return _policy_loss(o, logp, old_logp, advantages, mask, entropy, ref_logp, rollout_logp, rollout_is_weights,
                        group_size, group_ids)


def _policy_loss(o: PolicyLossOptions, logp, old_logp, advantages, mask, entropy, ref_logp, rollout_logp,
                 rollout_is_weights, group_size, group_ids) -> Tuple[Tensor, Dict[str, Tensor]]:
    """:func:`policy_loss` on checked inputs."""
    shape = (logp.shape[0], logp.shape[1])
    dtype = torch.promote_types(logp.dtype, torch.float32)
    m = mask.to(dtype)
    valid = m != 0
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    l = torch.where(valid, logp.to(dtype), zero)
    l_old = l.detach() if old_logp is None else torch.where(valid, old_logp.detach().to(dtype), zero)
    ent = None if entropy is None else torch.where(valid, entropy.to(dtype), zero)
    extra: Dict[str, Tensor] = {}
    adv_in = advantages
    if o.eda == "current":
        assert ent is not None  # _check_needs
        adv_in, scale = _eda_current(advantages, ent, m, group_size, group_ids, o.num("eda_eps"), o.eda_clamp)
        extra["eda_scale_mean"] = scale.detach().mean()
    adv = adv_in.to(dtype)
    adv = torch.where(valid, adv[:, None].expand(shape) if adv.dim() == 1 else adv, zero)

    log_ratio, ratio = _importance_ratio(l, l_old, m, valid, o.is_level)
    is_w = None
    if o.rollout_is != "off":
        assert rollout_logp is not None  # _check_needs
        is_w, is_metrics = _rollout_weights(o, l_old, rollout_logp.detach().to(dtype), m, valid)
        extra.update(is_metrics)
    elif rollout_is_weights is not None:
        is_w = torch.where(valid, rollout_is_weights.detach().to(dtype), zero)
        extra.update(_weight_metrics(is_w, m))
    per_token, pg_clip, info = _surrogate(o, l, log_ratio, ratio, adv, m, valid, is_w)
    extra.update(info)
    if is_w is not None and o.objective != "vespo":  # VESPO folds the weights into its sequence ratio
        per_token = per_token * is_w
    if o.off_policy_mask_threshold is not None:
        keep_rows = _off_policy_keep(o, l, l_old, rollout_logp, adv, m, valid)
        per_token = per_token * keep_rows
        rows = valid.any(-1)
        extra["off_policy_mask_frac"] = _safe_div(((keep_rows == 0).any(-1) & rows).to(dtype).sum(),
                                                  rows.to(dtype).sum())
    kl = None if ref_logp is None else _kl(torch.where(valid, l - ref_logp.detach().to(dtype), zero), o.kl_type)
    if o.kl_coef != 0.0:
        assert kl is not None  # _check_needs: ref_logp given
        per_token = per_token + o.kl_coef * (kl * ratio if o.kl_bias_correction else kl)
    if o.entropy_coef != 0.0 or o.top_entropy_quantile < 1.0:
        assert ent is not None  # _check_needs
        per_token = per_token - o.entropy_coef * ent if o.entropy_coef != 0.0 else per_token
    keep = _entropy_quantile_keep(ent.detach(), valid, o.top_entropy_quantile) if ent is not None and \
        o.top_entropy_quantile < 1 else None
    loss_mask = m if keep is None else m * keep.to(dtype)
    loss = aggregate(per_token, loss_mask, o.aggregation, o.max_len)

    with torch.no_grad():
        metrics = _loss_metrics(o, m, log_ratio, ratio, adv, pg_clip, kl, ent, loss_mask if keep is not None else None)
        metrics.update(extra)
        if advantages.dim() == 1 and (group_size is not None or group_ids is not None):
            metrics.update(_group_metrics(adv_in, group_size, group_ids))
    return loss, metrics


def _importance_ratio(l: Tensor, l_old: Tensor, m: Tensor, valid: Tensor, is_level: str) -> Tuple[Tensor, Tensor]:
    """``(log_ratio, rho)`` ``[B, T]``: token level, or GSPO's sequence ratio (gradient through the masked mean).
    Masked positions are 0 before any ``exp``; the log-ratio is clamped to ``[-20, 20]``."""
    log_ratio = torch.where(valid, l - l_old, torch.zeros_like(l))
    if is_level == "sequence":
        seq_log_ratio = (log_ratio * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1)  # the spec's masked mean
        seq_log_ratio = seq_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return log_ratio, torch.exp(seq_log_ratio)[:, None].expand(l.shape)
    return log_ratio, torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


# ----------------------------------------------------------------------------------------------------------
# the objectives (section 6; one definition each)


def _surrogate(o: PolicyLossOptions, l: Tensor, log_ratio: Tensor, ratio: Tensor, adv: Tensor, m: Tensor,
               valid: Tensor, is_w: Optional[Tensor]) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
    """The per-token policy-gradient term of ``o.objective``: ``(L [B, T], L before the dual clip, metrics)``."""
    if o.objective in ("clip", "luspo"):  # LUSPO: GSPO's surrogate; its length scaling is agg (token sum)
        per_token, pg_clip = _clipped_surrogate(adv, ratio, o.num("clip_low"), o.num("clip_high"), o.dual_clip)
        return per_token, pg_clip, {}
    if o.objective == "cispo":
        w = ratio.detach().clamp(1.0 - o.num("clip_low"), 1.0 + o.num("clip_high"))
        return -w * adv * l, ratio, {}
    if o.objective == "sapo":
        tau = torch.where(adv > 0, adv.new_tensor(o.num("sapo_tau_pos")), adv.new_tensor(o.num("sapo_tau_neg")))
        per_token = -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * adv
        return per_token, per_token, {}
    if o.objective == "vespo":
        phi = _vespo_weight(o, log_ratio, adv, m, is_w)
        return -phi * adv * l, phi, {"vespo_phi_mean": _masked_mean(phi, m)}
    if o.objective == "clip_cov":
        return _clip_cov(o, l, ratio, adv, m, valid)
    return _kl_cov(o, l, log_ratio, ratio, adv, m, valid)


def _clipped_surrogate(adv: Tensor, ratio: Tensor, clip_low: float, clip_high: float,
                       dual_clip: Optional[float]) -> Tuple[Tensor, Tensor]:
    """verl's form, the max of the two negated objectives, then the dual clip on ``A < 0``; returns the loss
    and the clipped loss before the dual clip (for its metric)."""
    surr = -adv * ratio
    surr_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg_clip = torch.maximum(surr, surr_clipped)
    if dual_clip is None:
        return pg_clip, pg_clip
    return torch.where(adv < 0, torch.minimum(pg_clip, -adv * dual_clip), pg_clip), pg_clip


def _vespo_weight(o: PolicyLossOptions, log_ratio: Tensor, adv: Tensor, m: Tensor, is_w: Optional[Tensor]) -> Tensor:
    """VESPO's detached gamma weight ``phi(w) = exp(lambda + k log w - lambda w)`` of the sequence ratio
    ``w = exp(sum_t clamp(l - l_old) [+ sum_t log w_rollout])``, ``log w`` clamped to ``[log 1e-8, 20]``."""
    with torch.no_grad():
        seq = (log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP) * m).sum(-1, keepdim=True)
        if is_w is not None:
            seq = seq + (torch.log(is_w).clamp(VESPO_LOG_W_MIN, LOG_RATIO_CLAMP) * m).sum(-1, keepdim=True)
        log_w = seq.clamp(VESPO_LOG_W_MIN, LOG_RATIO_CLAMP)
        nonneg = adv >= 0
        pick = lambda pos, neg: torch.where(nonneg, log_w.new_tensor(o.num(pos)), log_w.new_tensor(o.num(neg)))  # noqa: E731
        k, lam = pick("vespo_k_pos", "vespo_k_neg"), pick("vespo_lambda_pos", "vespo_lambda_neg")
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


def _token_cov(l: Tensor, adv: Tensor, m: Tensor, valid: Tensor) -> Tensor:
    """Clip-Cov / KL-Cov's per-token covariance ``(A - mean A)(l - mean l)`` over the masked tokens (detached)."""
    a, lp = adv.detach(), l.detach()
    return (a - _masked_mean(a, valid.to(a.dtype))) * (lp - _masked_mean(lp, valid.to(lp.dtype)))


def _clip_cov(o: PolicyLossOptions, l, ratio, adv, m, valid):
    """Clip-Cov as verl's ``compute_policy_loss_clip_cov``: among the tokens the hard clip left alone whose
    covariance lies in ``(lb, ub)``, ``max(1, int(cov_ratio * n))`` drawn at random (``torch.randperm`` on the
    global CPU generator, as verl) lose their gradient (loss multiplied by 0)."""
    per_token, _ = _clipped_surrogate(adv, ratio, o.num("clip_low"), o.num("clip_high"), None)
    with torch.no_grad():
        clipped = (-adv * ratio.clamp(1.0 - o.num("clip_low"), 1.0 + o.num("clip_high")) > -adv * ratio) & valid
        cov = _token_cov(l, adv, m, valid)
        cand = ~clipped & valid & (cov > o.num("clip_cov_lb")) & (cov < o.num("clip_cov_ub"))
        n_clip = max(int(o.num("cov_ratio") * int(valid.sum())), 1)  # host syncs: verl's token count and nonzero
        idx = torch.nonzero(cand)
        idx = idx[torch.randperm(len(idx))[:n_clip].to(idx.device)]
        corr = torch.ones_like(per_token)
        corr[idx[:, 0], idx[:, 1]] = 0.0
    return per_token * corr, per_token, {"cov_frac": _masked_mean((corr == 0).to(m.dtype), m)}


def _kl_cov(o: PolicyLossOptions, l, log_ratio, ratio, adv, m, valid):
    """KL-Cov as verl's ``compute_policy_loss_kl_cov``: the unclipped ``-A rho`` everywhere, plus
    ``kl_cov_coef * |l - l_old|`` on the ``max(1, int(cov_ratio * n))`` masked tokens of largest covariance."""
    per_token = -adv * ratio
    with torch.no_grad():
        flat_valid = torch.nonzero(valid.reshape(-1), as_tuple=True)[0]
        pick = torch.zeros(valid.numel(), dtype=torch.bool, device=valid.device)
        if flat_valid.numel():
            cov = _token_cov(l, adv, m, valid).reshape(-1)[flat_valid]
            k = max(1, int(flat_valid.numel() * o.num("cov_ratio")))
            pick[flat_valid[torch.topk(cov, k, largest=True).indices]] = True
        pick = pick.view(valid.shape)
    per_token = torch.where(pick, per_token + o.num("kl_cov_coef") * log_ratio.abs(), per_token)
    return per_token, per_token, {"cov_frac": _masked_mean(pick.to(m.dtype), m)}


# ----------------------------------------------------------------------------------------------------------
# rollout correction and the off-policy sequence mask (section 8)


def _rollout_weights(o: PolicyLossOptions, l_old: Tensor, l_mu: Tensor, m: Tensor,
                     valid: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
    """``w`` ``[B, T]`` (detached, 1 where the engine gave no log-prob, i.e. ``NaN``) and its metrics: TRL's
    ``vllm_importance_sampling_mode`` semantics, the log-weight clamped to ``[-20, 20]`` (verl's bound)."""
    diff = torch.where(valid & ~torch.isnan(l_mu), l_old - torch.nan_to_num(l_mu), torch.zeros_like(l_old))
    if o.rollout_is.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True).expand(diff.shape)
    raw = torch.exp(diff.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    lo = -math.inf if o.rollout_is_min is None else o.rollout_is_min
    hi = math.inf if o.rollout_is_max is None else o.rollout_is_max
    out = (raw < lo) | (raw > hi)
    if o.rollout_is.endswith("truncate"):
        w, metrics = raw.clamp(lo, hi), {"rollout_is_clipped_frac": _masked_mean(out.to(m.dtype), m)}
    else:
        w, metrics = torch.where(out, torch.zeros_like(raw), raw), {
            "rollout_is_masked_frac": _masked_mean(out.to(m.dtype), m)}
    metrics.update(_weight_metrics(w, m))
    return w, metrics


def _weight_metrics(w: Tensor, m: Tensor) -> Dict[str, Tensor]:
    """Mean rollout weight and the normalised effective sample size ``(sum w)^2 / (n sum w^2)`` over the masked
    tokens (verl's ``rollout_is_eff_sample_size``)."""
    wm = (w * m).sum()
    return {"rollout_is_weight_mean": _safe_div(wm, m.sum()),
            "rollout_is_ess": _safe_div(wm * wm, m.sum() * (w * w * m).sum())}


def _off_policy_keep(o: PolicyLossOptions, l, l_old, rollout_logp, adv, m, valid) -> Tensor:
    """DeepSeek-V3.2's off-policy sequence mask, as TRL's ``get_off_policy_mask``: keep a token unless its
    ``A < 0`` and its response's mean ``log mu - sg[l]`` exceeds the threshold (``mu`` the engine's log-probs
    when given, else ``l_old``; ``NaN`` counts as 0)."""
    with torch.no_grad():
        mu = l_old if rollout_logp is None else rollout_logp.detach().to(l.dtype)
        kl = torch.where(valid, torch.nan_to_num(mu - l, nan=0.0), torch.zeros_like(l))
        mean_kl = (kl * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
        return ((adv >= 0) | (mean_kl <= o.num("off_policy_mask_threshold"))).to(l.dtype)


def _masked_mean(x: Tensor, m: Tensor) -> Tensor:
    return _safe_div((x * m).sum(), m.sum())


def _loss_metrics(o: PolicyLossOptions, m: Tensor, log_ratio: Tensor, ratio: Tensor, adv: Tensor, pg_clip: Tensor,
                  kl: Optional[Tensor], ent: Optional[Tensor], kept_mask: Optional[Tensor]) -> Dict[str, Tensor]:
    """The metrics of :func:`policy_loss`, averaged over the masked tokens (no host sync)."""
    n_tok = m.sum()

    def mmean(x: Tensor) -> Tensor:
        return _safe_div((x.to(m.dtype) * m).sum(), n_tok)

    lr_tok = log_ratio.detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    a, r = adv.detach(), ratio.detach()
    metrics: Dict[str, Tensor] = {"ratio_mean": mmean(r), "approx_kl": mmean(torch.expm1(lr_tok) - lr_tok)}
    if o.objective == "cispo":
        metrics["clip_frac_low"] = mmean(r < 1.0 - o.num("clip_low"))
        metrics["clip_frac_high"] = mmean(r > 1.0 + o.num("clip_high"))
    elif o.clip_low is not None:
        metrics["clip_frac_low"] = mmean((a < 0) & (r < 1.0 - o.num("clip_low")))
        metrics["clip_frac_high"] = mmean((a > 0) & (r > 1.0 + o.num("clip_high")))
    if o.dual_clip is not None:
        metrics["clip_frac_dual"] = mmean((a < 0) & (pg_clip.detach() > -a * o.dual_clip))
    if kl is not None:
        metrics["kl_ref"] = mmean(kl.detach())
    if ent is not None:
        metrics["entropy_mean"] = mmean(ent.detach())
    if kept_mask is not None:
        metrics["keep_frac"] = _safe_div(kept_mask.sum(), n_tok)
    adv_mean = mmean(a)
    metrics["adv_mean"] = adv_mean
    metrics["adv_std"] = torch.sqrt(_safe_div(((a - adv_mean) ** 2 * m).sum(), n_tok - 1).clamp(min=0))
    return metrics


def _eda_current(advantages: Tensor, entropy: Tensor, mask: Tensor, group_size, group_ids, eps: float,
                 clamp) -> Tuple[Tensor, Tensor]:
    """docs/algorithms.md section 2, ``entropy_source="current"``: ``A^_i = A_i * s_i`` with ``s`` =
    :func:`edge_kernels.advantage_formulas.eda_scale` of ``P_i = mean_t[H]`` of the policy being updated
    (gradient through ``1 / P_i``, group mean detached). Returns ``(A^ [B], s [B])``."""
    p = seq_mean_entropy(entropy, mask)
    s = eda_scale(p, group_size=group_size, group_ids=group_ids, eps=eps, clamp=clamp, valid=(mask != 0).any(-1))
    return advantages.to(p.dtype) * s, s
