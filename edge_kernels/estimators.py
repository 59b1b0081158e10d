"""The estimator layer: one options object for every advantage setting, one function that runs a named estimator.

Owns the names, defaults and validation of every estimator option (GRPO scale/eps; EDA entropy source, eps and
clamp; EGPO uncertainty, weight bounds, mode, renorm and NSR value; ProGRPO alpha, low fraction and baseline;
EP-GRPO gate bounds, buckets and lambda) and the dispatch from an estimator's name to the formulas of
:mod:`edge_kernels.advantage_formulas` (docs/algorithms.md sections 1, 2, 4 and 5). edge-train
(``Trainer._advantages``),
the TRL adapter (``EdgeGRPOTrainer._edge_advantages``) and the verl adapter (``algorithm.adv_estimator=edge_*``)
only map their configuration onto :class:`EstimatorOptions` (the option names are the same in all three: the
field names below) and call :func:`compute_advantages`; none forms an advantage by hand.

EDA's two entropy sources (docs/algorithms.md section 2): ``"old"`` rescales here, with the detached entropy of
the scoring pass; ``"current"`` (the official EDGE-GRPO code) rescales inside the loss, with the entropy of the
policy being updated: the caller multiplies :attr:`Estimate.base` by :func:`edge_kernels.advantage_formulas.eda_scale`
of the current entropies (gradient through ``1 / P_i``, group mean detached), as
:func:`edge_kernels.losses.fused_linear_policy_loss` does with ``eda="current"``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Mapping, NamedTuple, Optional, Tuple

import torch

from . import advantage_formulas as adv

Tensor = torch.Tensor

__all__ = ["ESTIMATORS", "EstimatorOptions", "Estimate", "compute_advantages", "needed_inputs",
           "options_from", "option_help", "sequence_advantages", "advantage_stats"]

ESTIMATORS = ("grpo", "dr_grpo", "eda", "egpo", "prog_grpo", "ep_grpo")
EDA_SOURCES = ("old", "current")
EGPO_UNCERTAINTIES = ("nll", "entropy")


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class EstimatorOptions:
    """Every estimator setting, with the defaults of docs/algorithms.md. The field names are the option names of
    edge-train (``--egpo-w-min``), ``EdgeGRPOConfig`` (``egpo_w_min=``) and verl (``algorithm.edge.egpo_w_min``)."""

    adv_scale: str = _opt("group", "GRPO std normalisation: group, batch, or none (Dr.GRPO)")
    adv_eps: float = _opt(1e-6, "eps of the GRPO std normalisation (TRL's own 'grpo' uses 1e-4)")
    correct_threshold: float = _opt(0.0, "a response is correct when its reward is > this (EGPO, ProGRPO, "
                                         "EP-GRPO)")
    eda_entropy_source: str = _opt("old", "EDA entropy: old (scoring pass, detached) or current (the policy being "
                                          "updated, gradient through 1/P_i, group mean detached)")
    eda_eps: float = _opt(1e-6, "eps in EDA's mean_g(P) / (P_i + eps)")
    eda_clamp: Optional[Tuple[float, float]] = _opt(None, "clamp EDA's scale to [s_min, s_max] (e.g. 0.5 2)")
    egpo_uncertainty: str = _opt("nll", "EGPO uncertainty: nll (mean -log p_old) or entropy (mean H of the "
                                        "scoring pass)")
    egpo_w_min: float = _opt(0.5, "EGPO lower weight bound (the authors' runs: 0.8)")
    egpo_w_max: float = _opt(2.0, "EGPO upper weight bound")
    egpo_mode: str = _opt("asymmetric", "EGPO clamp mode: asymmetric, symmetric or lock_one")
    egpo_renorm: bool = _opt(False, "EGPO: divide the weights by their group mean")
    egpo_nsr_value: float = _opt(-1.0, "EGPO: advantage (< 0) of every row of an entirely incorrect group")
    egpo_eps: float = _opt(1e-6, "eps in EGPO's mean_g(U) / (U_i + eps) and its GRPO base")
    prog_alpha: float = _opt(0.3, "ProGRPO re-weighting strength alpha")
    prog_low_frac: float = _opt(0.2, "ProGRPO: fraction of lowest-log-prob tokens")
    prog_baseline: str = _opt("group", "ProGRPO baseline: group, or prompt (needs the prompts' log-probs)")
    ep_g_min: float = _opt(0.5, "EP-GRPO entropy gate lower bound")
    ep_g_max: float = _opt(2.0, "EP-GRPO entropy gate upper bound")
    ep_num_buckets: int = _opt(10, "EP-GRPO progress buckets K")
    ep_lambda: float = _opt(0.1, "EP-GRPO lambda of the progress-aligned signal")
    ep_eps: float = _opt(1e-6, "EP-GRPO eps")

    def __post_init__(self):
        adv._choice("adv_scale", self.adv_scale, adv.SCALES)
        adv._choice("eda_entropy_source", self.eda_entropy_source, EDA_SOURCES)
        adv._choice("egpo_uncertainty", self.egpo_uncertainty, EGPO_UNCERTAINTIES)
        adv._choice("egpo_mode", self.egpo_mode, adv.EGPO_MODES)
        adv._choice("prog_baseline", self.prog_baseline, adv.PROG_BASELINES)
        for name in ("adv_eps", "eda_eps", "egpo_eps", "ep_eps"):
            value = adv._number(name, getattr(self, name))
            if value < 0 or (value == 0 and name != "adv_eps"):
                raise ValueError(f"{name} must be {'>= 0' if name == 'adv_eps' else '> 0'}, got {value!r}")
        for name in ("correct_threshold", "prog_alpha", "ep_lambda"):
            adv._number(name, getattr(self, name))
        clamp = adv._check_clamp(self.eda_clamp) if self.eda_clamp is not None else None
        object.__setattr__(self, "eda_clamp", clamp)
        w_min, w_max = adv._number("egpo_w_min", self.egpo_w_min), adv._number("egpo_w_max", self.egpo_w_max)
        adv._check_weight_bounds(self.egpo_mode, w_min, w_max, prefix="egpo_")
        if adv._number("egpo_nsr_value", self.egpo_nsr_value) >= 0:
            raise ValueError(f"egpo_nsr_value must be < 0, got {self.egpo_nsr_value}")
        if not 0 < adv._number("prog_low_frac", self.prog_low_frac) <= 1:
            raise ValueError(f"prog_low_frac must lie in (0, 1], got {self.prog_low_frac}")
        g_min, g_max = adv._number("ep_g_min", self.ep_g_min), adv._number("ep_g_max", self.ep_g_max)
        if not 0 <= g_min <= g_max:
            raise ValueError(f"ep_g_min and ep_g_max must satisfy 0 <= ep_g_min <= ep_g_max, got ({g_min}, {g_max})")
        n = self.ep_num_buckets
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"ep_num_buckets must be a positive int, got {n!r}")
        if not isinstance(self.egpo_renorm, bool):
            raise TypeError(f"egpo_renorm must be a bool, got {self.egpo_renorm!r}")

    def check_for(self, estimator: str) -> "EstimatorOptions":
        """Refuse the options the named estimator cannot honor (returns ``self``)."""
        adv._choice("estimator", estimator, ESTIMATORS)
        if self.eda_entropy_source == "current" and estimator != "eda":
            raise ValueError(f"eda_entropy_source='current' applies to the 'eda' estimator only, got {estimator!r}")
        return self


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(EstimatorOptions))
DEFAULTS = EstimatorOptions()


def option_help(name: str) -> str:
    """The help text of option ``name`` (shared by edge-train's flags and ``EdgeGRPOConfig``'s fields)."""
    return EstimatorOptions.__dataclass_fields__[name].metadata["help"]


def options_from(source: Any, **overrides) -> EstimatorOptions:
    """:class:`EstimatorOptions` from any object or mapping that holds (some of) the option names as attributes
    or keys (an adapter's config); ``overrides`` win. Names the source lacks keep their defaults."""
    get = source.get if isinstance(source, Mapping) else (lambda k, d: getattr(source, k, d))
    missing = object()
    values = {k: v for k in OPTION_NAMES if (v := get(k, missing)) is not missing}
    values.update(overrides)
    if values.get("eda_clamp") is not None:
        values["eda_clamp"] = tuple(values["eda_clamp"])
    return EstimatorOptions(**values)


def needed_inputs(estimator: str, options: EstimatorOptions = DEFAULTS) -> FrozenSet[str]:
    """Which per-token inputs the estimator reads: a subset of ``{"old_logp", "entropy"}``."""
    if estimator in ("eda", "ep_grpo"):
        return frozenset({"entropy"})
    if estimator == "egpo":
        return frozenset({"old_logp" if options.egpo_uncertainty == "nll" else "entropy"})
    if estimator == "prog_grpo":
        return frozenset({"old_logp"})
    return frozenset()


class Estimate(NamedTuple):
    """What :func:`compute_advantages` returns.

    ``advantages``: ``[B]`` (``[B, T]`` for EP-GRPO) at the scoring pass's weights (what the loss trains on,
    except that EDA ``"current"`` recomputes the scale inside the loss). ``base``: the GRPO advantages ``[B]``
    (what EDA ``"current"`` hands the loss). ``rescale_in_loss``: EDA ``"current"``. ``stats``: detached 0-d
    tensors (``seq_entropy_mean`` and ``eda_scale_mean`` for EDA, ``seq_uncertainty_mean`` for EGPO)."""

    advantages: Tensor
    base: Tensor
    rescale_in_loss: bool
    stats: Dict[str, Tensor]


def _need(name: str, x: Optional[Tensor], estimator: str) -> Tensor:
    if x is None:
        raise ValueError(f"estimator {estimator!r} needs {name} ([B, T] per-token values of the scoring pass)")
    return x


def compute_advantages(estimator: str, rewards: Tensor, response_mask: Tensor, *,
                       group_size: Optional[int] = None, group_ids: Optional[Tensor] = None,
                       old_logp: Optional[Tensor] = None, entropy: Optional[Tensor] = None,
                       valid: Optional[Tensor] = None, options: EstimatorOptions = DEFAULTS,
                       prompt_logp: Optional[Tensor] = None, prompt_mask: Optional[Tensor] = None) -> Estimate:
    """The advantages of ``estimator`` (one of :data:`ESTIMATORS`) from scalar ``rewards [B]``.

    ``response_mask [B, T]``: the tokens that count; ``group_size`` xor ``group_ids``: the group layout;
    ``old_logp`` / ``entropy [B, T]``: the scoring pass's per-token log-probs and entropies (as
    :func:`needed_inputs` says; detached here); ``valid`` (bool ``[B]``, default ``response_mask.any(-1)``): the
    rows that enter the EDA/EGPO group means; ``prompt_logp`` / ``prompt_mask``: ProGRPO's ``"prompt"``
    baseline only. ``"dr_grpo"`` is ``"grpo"`` with ``adv_scale="none"``.
    """
    o = options.check_for(estimator)
    mask = response_mask != 0
    valid = mask.any(-1) if valid is None else valid
    thr = o.correct_threshold
    scale = "none" if estimator == "dr_grpo" else o.adv_scale
    base = adv.grpo_advantages(rewards, scale=scale, eps=o.adv_eps, group_size=group_size, group_ids=group_ids)
    stats: Dict[str, Tensor] = {}
    out = base
    if estimator == "eda":
        p = adv.seq_mean_entropy(_need("entropy", entropy, estimator).detach(), mask)
        s = adv.eda_scale(p, eps=o.eda_eps, clamp=o.eda_clamp, valid=valid, group_size=group_size, group_ids=group_ids)
        out = base * s
        stats = {"seq_entropy_mean": p.mean(), "eda_scale_mean": s.mean()}
    elif estimator == "egpo":
        if o.egpo_uncertainty == "nll":
            u = adv.nll_uncertainty(_need("old_logp", old_logp, estimator).detach(), mask)
        else:
            u = adv.seq_mean_entropy(_need("entropy", entropy, estimator).detach(), mask)
        out = adv.egpo_advantages(rewards, u, w_min=o.egpo_w_min, w_max=o.egpo_w_max, mode=o.egpo_mode,
                                  renorm=o.egpo_renorm, nsr_value=o.egpo_nsr_value, eps=o.egpo_eps, scale=scale,
                                  correct_threshold=thr, valid=valid, group_size=group_size, group_ids=group_ids)
        stats = {"seq_uncertainty_mean": u.mean()}
    elif estimator == "prog_grpo":
        out = adv.prog_grpo_advantages(base, _need("old_logp", old_logp, estimator).detach(), mask, rewards,
                                       alpha=o.prog_alpha, low_frac=o.prog_low_frac, baseline=o.prog_baseline,
                                       prompt_logp=prompt_logp, prompt_mask=prompt_mask, correct_threshold=thr,
                                       group_size=group_size, group_ids=group_ids)
    elif estimator == "ep_grpo":
        out = adv.ep_grpo_token_advantages(base, _need("entropy", entropy, estimator).detach(), mask, rewards,
                                           g_min=o.ep_g_min, g_max=o.ep_g_max, num_buckets=o.ep_num_buckets,
                                           lam=o.ep_lambda, eps=o.ep_eps, correct_threshold=thr,
                                           group_size=group_size, group_ids=group_ids)
    rescale = estimator == "eda" and o.eda_entropy_source == "current"
    return Estimate(out, base, rescale, {k: v.detach() for k, v in stats.items()})


def sequence_advantages(advantages: Tensor, response_mask: Tensor) -> Tensor:
    """Per-row advantages ``[B]``: as they are, or the masked mean of token-level ``[B, T]`` ones (EP-GRPO)."""
    return advantages if advantages.dim() == 1 else adv.masked_mean(advantages, response_mask)


def advantage_stats(advantages: Tensor, response_mask: Tensor, *, group_size: Optional[int] = None,
                    group_ids: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """``adv_group_var`` and ``zero_adv_group_frac`` (docs/algorithms.md section 6) of the per-row advantages."""
    a = sequence_advantages(advantages, response_mask).detach()
    return {"adv_group_var": adv.group_advantage_variance(a, group_size=group_size, group_ids=group_ids),
            "zero_adv_group_frac": adv.zero_advantage_group_fraction(a, group_size=group_size, group_ids=group_ids)}
