"""The policy-loss options: one frozen object, validated once, shared by every entry point.

:class:`PolicyLossOptions` holds every option of :func:`edge_kernels.losses.policy_loss` and
:func:`edge_kernels.losses.fused_linear_policy_loss` (objective, ratio level, clipping, KL, entropy terms,
aggregation, EDA, rollout correction). ``__post_init__`` checks each value and each combination once, naming
the option on error; an option that cannot apply to the chosen objective or mode raises instead of being
ignored. Objective-specific options default to ``None`` ("the objective's default"), resolved here, so that an
explicit value can be told from a default. The formulas are ``docs/algorithms.md`` sections 6 and 8.
edge-train's flags, verl's ``policy_loss`` config and TRL's ``GRPOConfig`` are mapped onto this object by
their adapters; nothing else re-validates it.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

from ..advantage_formulas import eda_scale

#: ``objective``: the per-token surrogate (docs/algorithms.md section 6).
OBJECTIVES = ("clip", "cispo", "sapo", "luspo", "vespo", "clip_cov", "kl_cov")
OBJECTIVE_HELP = {
    "clip": "PPO/GRPO clipped surrogate (clip-higher, dual clip; GSPO with is_level=sequence)",
    "cispo": "MiniMax-M1 CISPO: -sg[clip(rho)] * A * log p, no token dropped",
    "sapo": "SAPO (arXiv 2511.20347): soft sigmoid gate of the ratio in place of the hard clip",
    "luspo": "LUSPO (arXiv 2602.05261): GSPO's clipped sequence surrogate scaled by the response length",
    "vespo": "VESPO (arXiv 2602.10693): -phi(w) * A * log p, phi a gamma weight of the sequence IS ratio w",
    "clip_cov": "Clip-Cov (arXiv 2505.22617, verl's clip_cov): drop the gradient of a few high-covariance tokens",
    "kl_cov": "KL-Cov (arXiv 2505.22617, verl's kl_cov): |log rho| penalty on the top-covariance tokens",
}
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "k2", "k3")
IS_LEVELS = ("token", "sequence")
EDA_MODES = ("off", "current")
#: ``rollout_is``: correction against the rollout engine's log-probs (docs/algorithms.md section 8).
ROLLOUT_IS_MODES = ("off", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
ROLLOUT_IS_HELP = {
    "off": "no correction",
    "token_truncate": "w_t = clip(pi_old/mu, min, max) per token (TIS)",
    "token_mask": "w_t = pi_old/mu, set to 0 outside [min, max] (token rejection)",
    "sequence_truncate": "one w_i = clip(prod_t pi_old/mu, min, max) per response",
    "sequence_mask": "w_i = prod_t pi_old/mu, 0 outside [min, max] (sequence rejection)",
}

# the objectives' own defaults (None in the dataclass means "this default, where it applies")
_DEFAULTS = {
    "clip_low": 0.2, "clip_high": 0.2,
    "sapo_tau_pos": 1.0, "sapo_tau_neg": 1.05,  # TRL's and verl's defaults
    "vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0,  # TRL's
    "cov_ratio": 2e-4, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0, "kl_cov_coef": 0.1,  # verl's PolicyLossConfig
    "eda_eps": inspect.signature(eda_scale).parameters["eps"].default,  # EDA's own default (section 2)
}
#: the defaults of the objective-specific options (``None`` in :class:`PolicyLossOptions` resolves to these)
DEFAULTS = dict(_DEFAULTS)

# which objective-specific options each objective reads
_USES = {
    "clip_low": ("clip", "cispo", "luspo", "clip_cov"),
    "clip_high": ("clip", "cispo", "luspo", "clip_cov"),
    "dual_clip": ("clip",),
    "sapo_tau_pos": ("sapo",), "sapo_tau_neg": ("sapo",),
    "vespo_k_pos": ("vespo",), "vespo_lambda_pos": ("vespo",), "vespo_k_neg": ("vespo",),
    "vespo_lambda_neg": ("vespo",),
    "cov_ratio": ("clip_cov", "kl_cov"), "clip_cov_lb": ("clip_cov",), "clip_cov_ub": ("clip_cov",),
    "kl_cov_coef": ("kl_cov",),
}
_IS_LEVELS_OF = {"luspo": ("sequence",), "vespo": ("token",), "clip_cov": ("token",), "kl_cov": ("token",)}


def _choice(name: str, value, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _number(name: str, value, *, lo: Optional[float] = None, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    return v


@dataclass(frozen=True)
class PolicyLossOptions:
    """Every option of the policy loss (docs/algorithms.md section 6; rollout correction section 8).

    Objective and ratio:
        objective: one of :data:`OBJECTIVES` (see :data:`OBJECTIVE_HELP`); ``"clip"`` is PPO/GRPO/DAPO/GSPO.
        is_level: ``"token"`` or ``"sequence"`` (GSPO's ``s_i = exp(mean_t[l - l_old])``); ``luspo`` needs
            ``"sequence"``; ``vespo`` (which forms its own sequence weight), ``clip_cov`` and ``kl_cov`` need
            ``"token"``.
        clip_low, clip_high: ``eps_low``/``eps_high`` of ``clip(rho, 1 - eps_low, 1 + eps_high)`` (default 0.2
            each; DAPO's clip-higher is ``clip_high=0.28``); for ``cispo`` the bounds of the detached weight
            (TRL's ``epsilon_high = E`` is ``clip_low=1, clip_high=E - 1``). Only clip, cispo, luspo, clip_cov.
        dual_clip: ``c > 1``: verl's dual clip on ``A < 0`` (``objective="clip"`` only); None: off.
        sapo_tau_pos, sapo_tau_neg: SAPO's gate temperatures for ``A > 0`` / ``A <= 0`` (1.0 / 1.05).
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's gamma weight for ``A >= 0`` /
            ``A < 0`` (2, 3 / 3, 2; ``lambda > 0``, ``k >= 0``).
        cov_ratio: fraction of the masked tokens Clip-Cov clips / KL-Cov penalises (2e-4, verl's
            ``clip_cov_ratio`` / ``kl_cov_ratio``); clip_cov_lb, clip_cov_ub: Clip-Cov's covariance window
            (1, 5); kl_cov_coef: KL-Cov's ``ppo_kl_coef`` (0.1).
    Terms, filters and aggregation:
        kl_coef, kl_type: ``beta`` and ``k1``/``k2``/``k3`` of the KL to the reference; ``kl_bias_correction``:
            multiply the KL by the (differentiable) ratio ``rho`` (TRL's ``use_bias_correction_kl``,
            DeepSeek-V3.2); needs ``kl_coef != 0``.
        entropy_coef: bonus ``-entropy_coef * H``; top_entropy_quantile: keep the top ``rho`` of tokens by entropy.
        agg: one of :data:`AGG_MODES`; None: ``"seq-mean-token-sum"`` for ``luspo`` (its length scaling; any
            other raises), else ``"token-mean"`` (= TRL's ``bnpo``). max_len: the ``seq-mean-token-sum-norm``
            horizon (default ``T``), only with that mode.
        off_policy_mask_threshold: ``delta > 0``: drop responses with ``A < 0`` whose mean ``log mu - log pi``
            exceeds ``delta`` (DeepSeek-V3.2's off-policy sequence mask); None: off.
    EDA (fused loss or an entropy-carrying call): eda ``"off"``/``"current"`` (section 2); eda_eps (1e-6),
        eda_clamp ``(s_min, s_max)``; both only with ``eda="current"``.
    Rollout correction: rollout_is one of :data:`ROLLOUT_IS_MODES`, with bounds rollout_is_min /
        rollout_is_max (``min <= 1 <= max``; truncate modes need ``rollout_is_max``; mask modes at least one
        bound); needs the engine's log-probs at call time. ``vespo`` folds token weights into its sequence
        ratio (token modes only).
    """

    objective: str = "clip"
    is_level: str = "token"
    clip_low: Optional[float] = None
    clip_high: Optional[float] = None
    dual_clip: Optional[float] = None
    sapo_tau_pos: Optional[float] = None
    sapo_tau_neg: Optional[float] = None
    vespo_k_pos: Optional[float] = None
    vespo_lambda_pos: Optional[float] = None
    vespo_k_neg: Optional[float] = None
    vespo_lambda_neg: Optional[float] = None
    cov_ratio: Optional[float] = None
    clip_cov_lb: Optional[float] = None
    clip_cov_ub: Optional[float] = None
    kl_cov_coef: Optional[float] = None
    kl_coef: float = 0.0
    kl_type: str = "k1"
    kl_bias_correction: bool = False
    entropy_coef: float = 0.0
    top_entropy_quantile: float = 1.0
    agg: Optional[str] = None
    max_len: Optional[int] = None
    off_policy_mask_threshold: Optional[float] = None
    eda: str = "off"
    eda_eps: Optional[float] = None
    eda_clamp: Optional[Tuple[float, float]] = None
    rollout_is: str = "off"
    rollout_is_min: Optional[float] = None
    rollout_is_max: Optional[float] = None
    # the options as given (before defaults resolve), for replace()
    _given: Dict[str, Any] = dataclasses.field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_given", {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init})
        _choice("objective", self.objective, OBJECTIVES)
        _choice("is_level", self.is_level, IS_LEVELS)
        allowed = _IS_LEVELS_OF.get(self.objective, IS_LEVELS)
        if self.is_level not in allowed:
            raise ValueError(f"is_level={self.is_level!r} does not apply to objective={self.objective!r} "
                             f"(it needs is_level={allowed[0]!r})")
        for name, users in _USES.items():
            value = getattr(self, name)
            if self.objective in users:
                if value is None and name in _DEFAULTS:
                    self._set(name, _DEFAULTS[name])
            elif value is not None:
                raise ValueError(f"{name} does not apply to objective={self.objective!r} (used by {list(users)})")
        self._check_objective_numbers()
        self._check_terms()
        self._check_agg()
        self._check_eda()
        self._check_rollout_is()

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # frozen: only __post_init__ resolves defaults

    def _check_objective_numbers(self) -> None:
        for name in ("clip_low", "clip_high", "clip_cov_lb", "clip_cov_ub", "kl_cov_coef"):
            if getattr(self, name) is not None:
                self._set(name, _number(name, getattr(self, name), lo=0.0 if name != "clip_cov_lb" else None))
        if self.dual_clip is not None:
            self._set("dual_clip", _number("dual_clip", self.dual_clip, lo=1.0, lo_open=True))
        for name in ("sapo_tau_pos", "sapo_tau_neg", "vespo_lambda_pos", "vespo_lambda_neg", "cov_ratio"):
            if getattr(self, name) is not None:
                self._set(name, _number(name, getattr(self, name), lo=0.0, lo_open=True))
        for name in ("vespo_k_pos", "vespo_k_neg"):
            if getattr(self, name) is not None:
                self._set(name, _number(name, getattr(self, name), lo=0.0))
        if self.cov_ratio is not None and self.cov_ratio > 1.0:
            raise ValueError(f"cov_ratio must lie in (0, 1], got {self.cov_ratio!r}")
        if self.objective == "clip_cov" and not self.num("clip_cov_lb") < self.num("clip_cov_ub"):
            raise ValueError(f"clip_cov_lb must be < clip_cov_ub, got {self.clip_cov_lb} and {self.clip_cov_ub}")

    def _check_terms(self) -> None:
        self._set("kl_coef", _number("kl_coef", self.kl_coef))
        _choice("kl_type", self.kl_type, KL_TYPES)
        if not isinstance(self.kl_bias_correction, bool):
            raise TypeError(f"kl_bias_correction must be a bool, got {type(self.kl_bias_correction).__name__}")
        if self.kl_bias_correction and self.kl_coef == 0.0:
            raise ValueError("kl_bias_correction needs kl_coef != 0 (there is no KL term to correct)")
        self._set("entropy_coef", _number("entropy_coef", self.entropy_coef))
        q = _number("top_entropy_quantile", self.top_entropy_quantile)
        if not 0.0 < q <= 1.0:
            raise ValueError(f"top_entropy_quantile must lie in (0, 1], got {self.top_entropy_quantile!r}")
        self._set("top_entropy_quantile", q)
        if self.off_policy_mask_threshold is not None:
            self._set("off_policy_mask_threshold", _number("off_policy_mask_threshold",
                                                           self.off_policy_mask_threshold, lo=0.0, lo_open=True))

    def _check_agg(self) -> None:
        natural = "seq-mean-token-sum" if self.objective == "luspo" else "token-mean"
        if self.agg is None:
            self._set("agg", natural)
        _choice("agg", self.agg, AGG_MODES)
        if self.objective == "luspo" and self.agg != natural:
            raise ValueError(f"agg={self.agg!r} does not apply to objective='luspo': its length scaling is the "
                             "per-response token sum, agg='seq-mean-token-sum' (leave agg unset)")
        if self.max_len is not None:
            if isinstance(self.max_len, bool) or not isinstance(self.max_len, int) or self.max_len < 1:
                raise ValueError(f"max_len must be a positive int or None, got {self.max_len!r}")
            if self.agg != "seq-mean-token-sum-norm":
                raise ValueError(f"max_len applies only to agg='seq-mean-token-sum-norm', not agg={self.agg!r}")

    def _check_eda(self) -> None:
        _choice("eda", self.eda, EDA_MODES)
        if self.eda == "off":
            for name in ("eda_eps", "eda_clamp"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies only with eda='current', not eda='off'")
            return
        self._set("eda_eps", _number("eda_eps", _DEFAULTS["eda_eps"] if self.eda_eps is None else self.eda_eps,
                                     lo=0.0))
        if self.eda_clamp is not None:
            lo, hi = (_number("eda_clamp", v, lo=0.0) for v in tuple(self.eda_clamp))
            if not lo <= hi:
                raise ValueError(f"eda_clamp must be (s_min, s_max) with s_min <= s_max, got {self.eda_clamp!r}")
            self._set("eda_clamp", (lo, hi))

    def _check_rollout_is(self) -> None:
        _choice("rollout_is", self.rollout_is, ROLLOUT_IS_MODES)
        bounds = [(n, getattr(self, n)) for n in ("rollout_is_min", "rollout_is_max")]
        if self.rollout_is == "off":
            for name, value in bounds:
                if value is not None:
                    raise ValueError(f"{name} applies only with rollout_is != 'off'")
            return
        for name, value in bounds:
            if value is not None:
                self._set(name, _number(name, value, lo=0.0))
        lo, hi = self.rollout_is_min, self.rollout_is_max
        if self.rollout_is.endswith("truncate") and hi is None:
            raise ValueError(f"rollout_is={self.rollout_is!r} needs rollout_is_max (the truncation cap)")
        if self.rollout_is.endswith("mask") and lo is None and hi is None:
            raise ValueError(f"rollout_is={self.rollout_is!r} needs rollout_is_min or rollout_is_max")
        # a bound on the wrong side of 1 would reweight or drop even the tokens the engine got exactly right
        if lo is not None and lo > 1.0:
            raise ValueError(f"rollout_is_min must be <= 1 (an on-policy token has weight 1), got {lo}")
        if hi is not None and hi < 1.0:
            raise ValueError(f"rollout_is_max must be >= 1 (an on-policy token has weight 1), got {hi}")
        if self.objective == "vespo" and self.rollout_is.startswith("sequence"):
            raise ValueError(f"rollout_is={self.rollout_is!r} does not apply to objective='vespo': VESPO folds "
                             "token IS weights into its own sequence ratio (use token_truncate or token_mask)")

    # ---- derived facts the entry points need

    @property
    def token_local(self) -> bool:
        """Whether each token's loss gradient depends only on its own log-prob and entropy (plus constants), the
        condition of the fused loss's gradient-in-forward strategy."""
        return (self.is_level == "token" and self.objective in ("clip", "cispo", "sapo")
                and self.top_entropy_quantile == 1.0 and self.eda == "off"
                and self.off_policy_mask_threshold is None)

    @property
    def needs_entropy(self) -> bool:
        return self.entropy_coef != 0.0 or self.top_entropy_quantile < 1.0 or self.eda != "off"

    def num(self, name: str) -> float:
        """The resolved value of a numeric option the chosen objective or mode uses (raises if it does not)."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"{name} does not apply to objective={self.objective!r} with these options")
        return float(value)

    @property
    def aggregation(self) -> str:
        """``agg`` as resolved (always set after validation)."""
        return str(self.agg)

    def replace(self, **changes: Any) -> "PolicyLossOptions":
        """A copy with ``changes`` applied to the options as they were given (defaults re-resolve, so a change
        of objective drops the old objective's defaults). Use this, not ``dataclasses.replace``."""
        return PolicyLossOptions(**{**self._given, **changes})


FIELDS = tuple(f.name for f in dataclasses.fields(PolicyLossOptions) if f.init)


def options_from(source: Any = None, **overrides: Any) -> PolicyLossOptions:
    """:class:`PolicyLossOptions` from ``overrides`` (keyword names = the fields); an unknown name raises."""
    unknown = set(overrides) - set(FIELDS)
    if unknown:
        raise TypeError(f"unknown policy-loss option(s): {sorted(unknown)} (see PolicyLossOptions)")
    if source is None:
        return PolicyLossOptions(**overrides)
    return source.replace(**overrides)


def help_lines() -> Dict[str, str]:
    """One line per objective and rollout-correction mode (edge-train's ``--help``)."""
    return {**{f"objective {k}": v for k, v in OBJECTIVE_HELP.items()},
            **{f"rollout-is {k}": v for k, v in ROLLOUT_IS_HELP.items()}}
