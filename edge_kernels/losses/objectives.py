"""Policy objectives on per-token log-probs: the clipped GRPO/PPO loss, its aggregation modes and its metrics.

The fused hidden-states-in front (:func:`edge_kernels.losses.fused.fused_linear_policy_loss`) computes the
log-probs with the kernels and calls :func:`policy_loss` here.

The math is ``docs/algorithms.md`` section 6 (section 2 for ``eda="current"``). Everything works on
``[B, T]`` tensors (``B`` responses, ``T`` response positions) with a response mask ``m`` (1 on tokens that
count; any non-negative float weights are accepted and act as token weights).

Per token, with ``l`` the current log-prob, ``l_old`` the sampling policy's, ``l_ref`` the reference's,
``A`` the advantage and ``H`` the entropy::

    rho   = exp(l - l_old)                                   (is_level="token")
          = exp(mean_t[l - l_old])  for every token of i     (is_level="sequence", GSPO)
    L     = max(-rho A, -clip(rho, 1 - clip_low, 1 + clip_high) A)
    L     = min(L, dual_clip * |A|)  where A < 0             (dual_clip set; verl's dual clip)
    L    += kl_coef * k(l, l_ref) - entropy_coef * H

then ``L`` is aggregated over the kept tokens by ``agg``. Numerical guards, the same as verl's: the log-ratio
(token or sequence) is clamped to ``[-20, 20]`` before ``exp``; masked positions never enter a non-linearity,
so garbage (even ``inf``/``NaN`` log-probs) under a zero mask cannot reach the loss or its gradient.

Differences from verl 0.9 (``verl.trainer.ppo.core_algos``), all deliberate:

* GSPO (``is_level="sequence"``): the gradient flows through the masked mean, ``d s_i / d l_{i,t} = s_i m_t / |o_i|``
  (the GSPO paper's sequence ratio). verl's ``compute_policy_loss_gspo`` uses the straight-through
  ``sg[s_i] * exp(l - sg[l])`` (gradient ``s_i`` per token, no ``1/|o_i|``) and clamps the log-ratio at
  ``max=10``; forward values agree whenever ``|log s_i| <= 10``.
* KL ``k3`` is exactly ``exp(l_ref - l) - (l_ref - l) - 1`` (section 6); verl additionally clamps the log-ratio to
  ``[-20, 20]`` and the result to ``[-10, 10]``.
* Aggregation: see :func:`aggregate`; ``seq-mean-token-sum-norm`` divides by ``B * max_len`` (all rows) as the
  spec and Dr.GRPO do, where verl divides by the number of non-empty rows times ``max_len``; the batch-wide
  ``token-mean`` of an all-masked batch is 0 here, ``NaN`` in verl.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..advantage_formulas import group_advantage_variance, zero_advantage_group_fraction
from ..ops.validation import check_same_device

Tensor = torch.Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "k2", "k3")
IS_LEVELS = ("token", "sequence")
EDA_MODES = ("off", "current")
LOG_RATIO_CLAMP = 20.0  # verl's clamp of log(rho) before exp()
_IGNORE_INDEX = -100

__all__ = ["policy_loss", "aggregate", "AGG_MODES", "KL_TYPES", "IS_LEVELS", "EDA_MODES"]


# ----------------------------------------------------------------------------------------------------------
# validation (argument-naming errors; the kernels' own inputs are validated in edge_kernels.ops.validation)


def _check_choice(name: str, value, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_float(name: str, value, *, min_value: Optional[float] = None, min_inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if min_value is not None and (v < min_value or (v == min_value and not min_inclusive)):
        rel = ">=" if min_inclusive else ">"
        raise ValueError(f"{name} must be {rel} {min_value}, got {value!r}")
    return v


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


def _validate_loss_options(clip_low, clip_high, dual_clip, is_level, kl_coef, kl_type, entropy_coef,
                           top_entropy_quantile, agg, max_len):
    clip_low = _check_float("clip_low", clip_low, min_value=0.0)
    clip_high = _check_float("clip_high", clip_high, min_value=0.0)
    if dual_clip is not None:
        dual_clip = _check_float("dual_clip", dual_clip, min_value=1.0, min_inclusive=False)
    _check_choice("is_level", is_level, IS_LEVELS)
    kl_coef = _check_float("kl_coef", kl_coef)
    _check_choice("kl_type", kl_type, KL_TYPES)
    entropy_coef = _check_float("entropy_coef", entropy_coef)
    q = _check_float("top_entropy_quantile", top_entropy_quantile)
    if not 0.0 < q <= 1.0:
        raise ValueError(f"top_entropy_quantile must lie in (0, 1], got {top_entropy_quantile!r}")
    _check_choice("agg", agg, AGG_MODES)
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")
    return clip_low, clip_high, dual_clip, kl_coef, entropy_coef, q


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
    _check_choice("agg", agg, AGG_MODES)
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
    group_size: Optional[int] = None,
    group_ids: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Clipped policy-gradient loss with optional KL, entropy bonus and entropy token filter (section 6).

    Args:
        logp: ``[B, T]`` current-policy log-probs of the sampled tokens (differentiable).
        old_logp: ``[B, T]`` sampling-policy log-probs (no gradient), or None for on-policy
            (``old = logp.detach()``, so ``rho = 1`` with the gradient of ``exp(l - sg[l])``).
        advantages: ``[B]`` (broadcast over tokens) or ``[B, T]``. May carry a gradient (``eda="current"``).
        mask: ``[B, T]`` response mask (bool, int or float weights >= 0).
        entropy: ``[B, T]`` token entropies; needed by ``entropy_coef != 0`` (its gradient is used) and by
            ``top_entropy_quantile < 1`` (detached); when given, ``entropy_mean`` is reported.
        ref_logp: ``[B, T]`` reference-policy log-probs (no gradient); needed when ``kl_coef != 0``.
        clip_low, clip_high: ``eps_low``/``eps_high`` of ``clip(rho, 1 - eps_low, 1 + eps_high)``; DAPO's
            clip-higher is ``clip_high=0.28``.
        dual_clip: ``c > 1`` enables dual-clip PPO exactly as verl's ``compute_policy_loss_vanilla``: on tokens
            with ``A < 0``, ``L = min(L^clip, -c A) = min(L^clip, c |A|)`` (bounds the loss of a very large ratio
            on a negative advantage). ``None`` (default) disables it.
        is_level: ``"token"`` or ``"sequence"`` (GSPO: ``s_i = exp(mean_t[l - l_old])`` for every token of row
            ``i``, gradient through the mean).
        kl_coef: ``beta`` of the KL-to-reference term; ``kl_type`` ``"k1"``, ``"k2"`` or ``"k3"`` (section 6).
        entropy_coef: per-token bonus ``-entropy_coef * H``.
        top_entropy_quantile: ``rho`` in ``(0, 1]``; below 1 only tokens with ``H`` at or above the ``(1 - rho)``
            quantile of the batch's masked-token entropies (detached) enter the loss (all terms) and its
            denominators. ``rho = 0.2`` keeps the top 20% high-entropy "forking" tokens.
        agg: aggregation mode, see :func:`aggregate`; ``max_len`` is the ``seq-mean-token-sum-norm`` horizon
            (default ``T``).
        group_size, group_ids: optional group layout (contiguous groups of ``group_size`` rows, or a group-id
            per row); with ``[B]`` advantages it adds ``adv_group_var`` and ``zero_adv_group_frac``.

    Returns:
        ``(loss, metrics)``: a 0-d loss, and a dict of detached 0-d tensors (left on the device, never
        ``.item()``-ed; computed from values already in hand), averaged over the masked tokens (``mask``, before
        the entropy filter) unless said otherwise:

        * ``ratio_mean``: mean ``rho`` (``s_i`` per token at sequence level).
        * ``clip_frac_low`` / ``clip_frac_high``: fraction of tokens where the lower clip (``A < 0`` and
          ``rho < 1 - clip_low``) / upper clip (``A > 0`` and ``rho > 1 + clip_high``) is active; their sum is
          verl's ``pg_clipfrac``.
        * ``clip_frac_dual`` (dual clip only): verl's ``pg_clipfrac_lower``, tokens with ``A < 0`` and
          ``L^clip > c |A|``.
        * ``approx_kl``: k3 estimate of KL(old || current) from tokens sampled under the old policy,
          ``mean(exp(l - l_old) - 1 - (l - l_old))`` (unbiased for that direction), from the clamped token
          log-ratio (always token level).
        * ``kl_ref`` (when ``ref_logp`` is given): mean of the chosen ``kl_type`` estimator.
        * ``entropy_mean`` (when ``entropy`` is given).
        * ``keep_frac`` (entropy filter only): kept tokens' share of the masked tokens.
        * ``adv_mean``, ``adv_std``: token-weighted mean and unbiased std of the advantages (verl's
          ``critic/advantages`` statistics).
        * ``adv_group_var``, ``zero_adv_group_frac``: see :mod:`edge_kernels.advantage_formulas` (``[B]`` advantages
          with a group layout only); ``adv_batch_var``: the unbiased variance of the ``[B]`` advantages over the
          whole batch, the quantity EDGE-GRPO's official trainer logs.

    Raises:
        ValueError: a bad shape, an unknown mode string, ``clip_low``/``clip_high`` < 0, ``dual_clip <= 1``,
            ``top_entropy_quantile`` outside ``(0, 1]``, NaN advantages, or a missing ``entropy``/``ref_logp``.
    """
    clip_low, clip_high, dual_clip, kl_coef, entropy_coef, q = _check_policy_inputs(
        logp, old_logp, advantages, mask, entropy, ref_logp, group_ids, clip_low, clip_high, dual_clip, is_level,
        kl_coef, kl_type, entropy_coef, top_entropy_quantile, agg, max_len)
    shape = (logp.shape[0], logp.shape[1])
    dtype = torch.promote_types(logp.dtype, torch.float32)
    m = mask.to(dtype)
    valid = m != 0
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    l = logp.to(dtype)
    l_old = l.detach() if old_logp is None else old_logp.detach().to(dtype)
    adv = advantages.to(dtype)
    adv = adv[:, None].expand(shape) if adv.dim() == 1 else adv
    adv = torch.where(valid, adv, zero)

    log_ratio, ratio = _importance_ratio(l, l_old, m, valid, is_level)
    per_token, pg_clip = _clipped_surrogate(adv, ratio, clip_low, clip_high, dual_clip)
    kl = None if ref_logp is None else _kl(torch.where(valid, l - ref_logp.detach().to(dtype), zero), kl_type)
    ent = None if entropy is None else torch.where(valid, entropy.to(dtype), zero)
    # _check_policy_inputs made sure: kl_coef != 0 has ref_logp, entropy_coef != 0 or q < 1 has entropy
    if kl_coef != 0.0:
        assert kl is not None
        per_token = per_token + kl_coef * kl
    if entropy_coef != 0.0:
        assert ent is not None
        per_token = per_token - entropy_coef * ent
    keep = _entropy_quantile_keep(ent.detach(), valid, q) if q < 1.0 and ent is not None else None
    loss_mask = m if keep is None else m * keep.to(dtype)
    loss = aggregate(per_token, loss_mask, agg, max_len)

    with torch.no_grad():
        metrics = _loss_metrics(m, log_ratio, ratio, adv, pg_clip, kl, ent, loss_mask if keep is not None else None,
                                clip_low, clip_high, dual_clip)
        if advantages.dim() == 1 and (group_size is not None or group_ids is not None):
            metrics.update(_group_metrics(advantages, group_size, group_ids))
    return loss, metrics


def _check_policy_inputs(logp, old_logp, advantages, mask, entropy, ref_logp, group_ids, clip_low, clip_high,
                         dual_clip, is_level, kl_coef, kl_type, entropy_coef, top_entropy_quantile, agg, max_len):
    """Shapes, devices and options of :func:`policy_loss`; returns the checked numbers."""
    _check_tensor("logp", logp, floating=True)
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape [B, T], got {tuple(logp.shape)}")
    shape = (logp.shape[0], logp.shape[1])
    _check_bt("old_logp", old_logp, shape)
    _check_bt("ref_logp", ref_logp, shape)
    _check_bt("entropy", entropy, shape)
    _check_bt("mask", mask, shape, floating=False)
    checked = _validate_loss_options(clip_low, clip_high, dual_clip, is_level, kl_coef, kl_type, entropy_coef,
                                     top_entropy_quantile, agg, max_len)
    _check_advantages(advantages, shape)
    kl_coef, entropy_coef, q = checked[3], checked[4], checked[5]
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError("kl_coef != 0 needs ref_logp")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy")
    if q < 1.0 and entropy is None:
        raise ValueError("top_entropy_quantile < 1 needs entropy")
    check_same_device(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, entropy=entropy,
                      ref_logp=ref_logp, group_ids=group_ids)
    return checked


def _importance_ratio(l: Tensor, l_old: Tensor, m: Tensor, valid: Tensor, is_level: str) -> Tuple[Tensor, Tensor]:
    """``(log_ratio, rho)`` ``[B, T]``: token level, or GSPO's sequence ratio (gradient through the masked mean).
    Masked positions are replaced by 0 before any ``exp``; the log-ratio is clamped to ``[-20, 20]``."""
    log_ratio = torch.where(valid, l - l_old, torch.zeros_like(l))
    if is_level == "sequence":
        seq_log_ratio = (log_ratio * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1)  # the spec's masked mean
        seq_log_ratio = seq_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return log_ratio, torch.exp(seq_log_ratio)[:, None].expand(l.shape)
    return log_ratio, torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


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


def _loss_metrics(m: Tensor, log_ratio: Tensor, ratio: Tensor, adv: Tensor, pg_clip: Tensor, kl: Optional[Tensor],
                  ent: Optional[Tensor], kept_mask: Optional[Tensor], clip_low: float, clip_high: float,
                  dual_clip: Optional[float]) -> Dict[str, Tensor]:
    """The metrics of :func:`policy_loss`, averaged over the masked tokens (no host sync)."""
    n_tok = m.sum()

    def mmean(x: Tensor) -> Tensor:
        return _safe_div((x.to(m.dtype) * m).sum(), n_tok)

    lr_tok = log_ratio.detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    a, r = adv.detach(), ratio.detach()
    metrics: Dict[str, Tensor] = {
        "ratio_mean": mmean(r),
        "clip_frac_low": mmean((a < 0) & (r < 1.0 - clip_low)),
        "clip_frac_high": mmean((a > 0) & (r > 1.0 + clip_high)),
        "approx_kl": mmean(torch.expm1(lr_tok) - lr_tok),
    }
    if dual_clip is not None:
        metrics["clip_frac_dual"] = mmean((a < 0) & (pg_clip.detach() > -a * dual_clip))
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
