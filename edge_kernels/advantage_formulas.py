"""Group-relative advantages and their entropy-aware variants, in pure, vectorized PyTorch.

Owns every advantage formula of ``docs/algorithms.md`` sections 1, 2, 4 and 5 (GRPO / Dr.GRPO base
advantages, EDGE-GRPO's Entropy-Driven Advantage, EGPO's calibrated weights with NSR, and this library's
readings of ProGRPO and EP-GRPO), the small per-sequence reductions they consume (masked mean, sequence mean
entropy, NLL uncertainty) and the two advantage metrics of section 6 (intra-group advantage variance, fraction
of zero-advantage groups). It owns no kernels and no loss.

Groups are given either by ``group_size`` (contiguous blocks of ``G`` rows; ``B`` must be divisible by ``G``)
or by ``group_ids`` (an integer tensor ``[B]`` of arbitrary labels in any order); exactly one of the two.
Every group statistic is computed with ``index_add``/``scatter_reduce`` over a per-row group index, never
with a Python loop over groups. Outputs are float32 (float64 when a float64 tensor goes in). Advantages are
constants of the loss, except in :func:`eda_advantages`, which lets gradient flow through ``seq_entropy``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor

__all__ = [
    "masked_mean",
    "seq_mean_entropy",
    "group_mean",
    "nll_uncertainty",
    "grpo_advantages",
    "eda_scale",
    "eda_advantages",
    "egpo_advantages",
    "prog_grpo_advantages",
    "ep_grpo_token_advantages",
    "group_advantage_variance",
    "zero_advantage_group_fraction",
]

SCALES = ("group", "batch", "none")
EGPO_MODES = ("asymmetric", "symmetric", "lock_one")
PROG_BASELINES = ("group", "prompt")

# Slack for ceil(low_frac * n): 0.28 * 25 is 7.000000000000001 in floating point, whose ceil would be 8.
_CEIL_SLACK = 1e-9


# ----------------------------------------------------------------------------------------------------------
# validation


def _check_tensor(name: str, x) -> Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_complex:
        raise TypeError(f"{name} must be a real tensor, got {x.dtype}")
    return x


def _as_float(x: Tensor) -> Tensor:
    """``x`` as a floating tensor of at least float32 precision (fp16/bf16/int/bool -> float32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_finite(name: str, x: Tensor) -> None:
    x = x.detach()
    if bool(torch.isnan(x).any()):
        raise ValueError(f"{name} contains NaN")
    if bool(torch.isinf(x).any()):
        raise ValueError(f"{name} contains Inf")


def _per_sequence(name: str, x, batch: Optional[int] = None) -> Tensor:
    """A finite 1-D float tensor ``[B]`` (``B == batch`` when given, ``B > 0``)."""
    x = _check_tensor(name, x)
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D [B], got shape {tuple(x.shape)}")
    if batch is None and x.shape[0] == 0:
        raise ValueError(f"{name} is empty: the batch has no rows")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected ({batch},)")
    x = _as_float(x)
    _check_finite(name, x)
    return x


def _advantage_input(x, name: str = "advantages") -> Tensor:
    """Per-sequence ``[B]`` or token-level ``[B, T]`` advantages, finite, ``B > 0``."""
    x = _check_tensor(name, x)
    if x.dim() not in (1, 2):
        raise ValueError(f"{name} must be shaped [B] or [B, T], got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: the batch has no rows")
    x = _as_float(x)
    _check_finite(name, x)
    return x


def _token_pair(name: str, x, mask, batch: Optional[int] = None,
                mask_name: str = "mask") -> Tuple[Tensor, Tensor]:
    """A ``[B, T]`` float tensor, finite where unmasked, and its boolean mask (``mask != 0``)."""
    x = _check_tensor(name, x)
    mask = _check_tensor(mask_name, mask)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B, T], got shape {tuple(x.shape)}")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{name} has {x.shape[0]} rows, expected {batch}")
    if mask.shape != x.shape:
        raise ValueError(f"{mask_name} has shape {tuple(mask.shape)}, expected {name}'s shape {tuple(x.shape)}")
    m = mask != 0
    x = _as_float(x)
    _check_finite(f"{name} (at unmasked positions)", torch.where(m, x.detach(), torch.zeros_like(x)))
    return x, m


def _token_level_advantages(advantages: Tensor, shape: torch.Size) -> Tensor:
    """``[B]`` advantages broadcast to ``[B, T]``; ``[B, T]`` ones checked against ``shape``."""
    if advantages.dim() == 1:
        if advantages.shape[0] != shape[0]:
            raise ValueError(f"advantages has {advantages.shape[0]} rows, expected {shape[0]}")
        return advantages[:, None].expand(shape)
    if advantages.shape != shape:
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected the mask's {tuple(shape)}")
    return advantages


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _eps(eps, positive: bool = False) -> float:
    """``eps`` as a float: >= 0, or > 0 where it guards a division by a value that may be 0."""
    eps = _number("eps", eps)
    if eps < 0 or (positive and eps == 0):
        raise ValueError(f"eps must be {'> 0' if positive else '>= 0'}, got {eps!r}")
    return eps


def _choice(name: str, value, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------------
# groups


@dataclass(frozen=True)
class _Groups:
    index: Tensor  # [B] int64, the group of each row, in [0, count)
    count: int  # number of groups
    sizes: Tensor  # [count] int64, rows per group (every group has >= 1 row)


def _resolve_groups(name: str, batch: int, device: torch.device, group_size, group_ids) -> _Groups:
    """Turn ``group_size`` xor ``group_ids`` into a per-row group index (``name`` is the batch's tensor)."""
    if (group_size is None) == (group_ids is None):
        raise ValueError("exactly one of group_size and group_ids must be given")
    if batch == 0:
        raise ValueError(f"{name} is empty: the batch has no rows")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"group_size must be an int, got {group_size!r}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if batch % group_size:
            raise ValueError(f"{name} has {batch} rows, not divisible by group_size={group_size}")
        count = batch // group_size
        index = torch.arange(batch, device=device) // group_size
        return _Groups(index, count, torch.full((count,), group_size, device=device, dtype=torch.int64))
    ids = _check_tensor("group_ids", group_ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"group_ids must be an integer tensor, got {ids.dtype}")
    if ids.dim() != 1 or ids.shape[0] != batch:
        raise ValueError(f"group_ids has shape {tuple(ids.shape)}, expected ({batch},) to match {name}")
    labels, index, sizes = torch.unique(ids.to(device), return_inverse=True, return_counts=True)
    return _Groups(index, int(labels.numel()), sizes)


def _group_sum(x: Tensor, g: _Groups) -> Tensor:
    """Per-group sums of the rows of ``x [B, ...]`` -> ``[count, ...]`` (differentiable)."""
    return x.new_zeros((g.count, *x.shape[1:])).index_add(0, g.index, x)


def _group_mean(x: Tensor, g: _Groups) -> Tensor:
    """Per-group mean of ``x [B]``, gathered back to ``[B]``."""
    return (_group_sum(x, g) / g.sizes.to(x.dtype))[g.index]


def _group_any(flag: Tensor, g: _Groups) -> Tensor:
    """Whether any row of each row's group has ``flag`` set -> bool ``[B]``."""
    return (_group_sum(flag.to(torch.float32), g) > 0)[g.index]


def _group_constant(x: Tensor, g: _Groups) -> Tensor:
    """Whether each row's group has all-equal values (exactly: max == min) -> bool ``[B]``.

    Exact equality, not ``std == 0``: the rounding of a group mean leaves a tiny nonzero ``r - mean`` that
    ``/ (std + eps)`` would blow up into a visible advantage.
    """
    empty = x.new_zeros(g.count)
    hi = empty.scatter_reduce(0, g.index, x, "amax", include_self=False)
    lo = empty.scatter_reduce(0, g.index, x, "amin", include_self=False)
    return (hi == lo)[g.index]


def _valid_group_mean(v: Tensor, g: _Groups, valid: Optional[Tensor]) -> Tensor:
    """Per-group mean of ``v [B]`` over the rows where ``valid`` (all rows when None), gathered back to ``[B]``;
    0 for a group without valid rows."""
    if valid is None:
        return _group_mean(v, g)
    vf = valid.to(v.dtype)
    total = _group_sum(torch.where(valid, v, torch.zeros_like(v)), g)
    return (total / _group_sum(vf, g).clamp_min(1))[g.index]


def _relative_scale(values: Tensor, g: _Groups, eps: float, valid: Optional[Tensor] = None) -> Tensor:
    """``mean_g(v) / (v_i + eps)`` with the group mean detached (the EDA scale and the EGPO weight).

    Negative values (round-off of an entropy kernel) count as 0, so the scale is always finite. A group whose
    values are all 0 gets scale 1 (the limit for equal values; the literal formula would give 0 / eps = 0 and
    erase the group's advantages). Rows outside ``valid`` (no response token left: a truncated or fully
    masked completion) are left out of the group mean, where their ``v = 0`` would drag it down, and get 1.
    """
    v = values.clamp_min(0)
    mean = _valid_group_mean(v.detach(), g, valid)
    scale = torch.where(mean > 0, mean / (v + eps), torch.ones_like(v))
    return scale if valid is None else torch.where(valid, scale, torch.ones_like(scale))


def _valid_rows(valid: Optional[Tensor], batch: int, device) -> Optional[Tensor]:
    if valid is None:
        return None
    if not isinstance(valid, Tensor):
        raise TypeError(f"valid must be a bool tensor [B] or None, got {type(valid).__name__}")
    if tuple(valid.shape) != (batch,):
        raise ValueError(f"valid must have shape [B] = ({batch},), got {tuple(valid.shape)}")
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor, got {valid.dtype}")
    return valid.to(device)


def group_mean(values: Tensor, *, group_size: Optional[int] = None, group_ids: Optional[Tensor] = None,
               valid: Optional[Tensor] = None) -> Tensor:
    """Per-group mean of ``values [B]`` over the rows where ``valid`` (bool ``[B]``; all rows by default),
    gathered back to ``[B]`` (0 for a group without valid rows): the ``mean_g`` of sections 2 and 4. The EDA
    scale itself is :func:`eda_scale`'s to form."""
    v = _per_sequence("values", values)
    g = _resolve_groups("values", v.shape[0], v.device, group_size, group_ids)
    return _valid_group_mean(v, g, _valid_rows(valid, v.shape[0], v.device))


# ----------------------------------------------------------------------------------------------------------
# per-sequence reductions


def masked_mean(x: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """``sum(x * m) / max(1, sum(m))`` along ``dim`` (the notation's masked mean).

    Spec: docs/algorithms.md, notation. ``mask`` has ``x``'s shape and may be bool, integer or float
    (float masks weight the entries). Values at positions where ``mask == 0`` never affect the result, even
    when they are NaN or Inf (e.g. ``-inf`` log-probs of padding). A row with an all-zero mask gives 0.
    """
    x = _check_tensor("x", x)
    mask = _check_tensor("mask", mask)
    if mask.shape != x.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected x's shape {tuple(x.shape)}")
    x = _as_float(x)
    m = mask.to(x.dtype)
    total = torch.where(mask != 0, x * m, torch.zeros_like(x)).sum(dim)
    return total / m.sum(dim).clamp_min(1)


def seq_mean_entropy(token_entropy: Tensor, mask: Tensor) -> Tensor:
    """``P_i = mean_t[H_{i,t}]``: per-sequence masked mean entropy ``[B]`` from ``token_entropy [B, T]``.

    Spec: docs/algorithms.md section 2. Differentiable (for EDA's "current" entropy mode).
    """
    h, _ = _token_pair("token_entropy", token_entropy, mask)
    return masked_mean(h, mask)


def nll_uncertainty(old_logp: Tensor, mask: Tensor) -> Tensor:
    """EGPO's uncertainty proxy ``U_i = mean_t[-l^old_{i,t}]`` ``[B]`` from ``old_logp [B, T]``.

    Spec: docs/algorithms.md section 4.
    """
    logp, _ = _token_pair("old_logp", old_logp, mask)
    return masked_mean(-logp, mask)


# ----------------------------------------------------------------------------------------------------------
# section 1: base advantages


def _grpo(r: Tensor, g: _Groups, scale: str, eps: float) -> Tensor:
    centered = r - _group_mean(r, g)
    constant = _group_constant(r, g)
    if scale == "group":
        n = g.sizes.to(r.dtype)
        var = _group_sum(centered * centered, g) / (n - 1).clamp_min(1)
        denom = var.sqrt()[g.index] + eps
    elif scale == "batch":
        dev = r - r.mean()
        denom = ((dev * dev).sum() / max(r.shape[0] - 1, 1)).sqrt() + eps
        denom = denom.expand_as(r)
    else:
        denom = torch.ones_like(r)
    safe = torch.where(constant, torch.ones_like(denom), denom)  # no 0/0 even with eps = 0
    return torch.where(constant, torch.zeros_like(r), centered / safe)


def grpo_advantages(rewards: Tensor, *, group_size: Optional[int] = None, group_ids: Optional[Tensor] = None,
                    scale: str = "group", eps: float = 1e-6) -> Tensor:
    """GRPO / Dr.GRPO advantages ``A [B]`` from scalar rewards ``[B]``.

    Spec: docs/algorithms.md section 1. ``A_i = (r_i - mean_g r) / (std_g r + eps)``:

    * ``scale="group"``: ``std_g`` is the unbiased std of the row's group;
    * ``scale="batch"``: the unbiased std of the whole batch (the mean stays the group's);
    * ``scale="none"``: Dr.GRPO, ``A_i = r_i - mean_g r``.

    A group of size 1 or with all-equal rewards gives ``A_i = 0`` exactly in every mode (never NaN).
    """
    r = _per_sequence("rewards", rewards)
    scale = _choice("scale", scale, SCALES)
    eps = _eps(eps)
    g = _resolve_groups("rewards", r.shape[0], r.device, group_size, group_ids)
    return _grpo(r, g, scale, eps)


# ----------------------------------------------------------------------------------------------------------
# section 2: EDGE-GRPO's Entropy-Driven Advantage


def _check_clamp(clamp) -> Optional[Tuple[float, float]]:
    if clamp is None:
        return None
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
        raise TypeError(f"clamp must be a (s_min, s_max) pair or None, got {clamp!r}")
    lo, hi = _number("clamp[0]", clamp[0]), _number("clamp[1]", clamp[1])
    if not 0 <= lo <= hi:
        raise ValueError(f"clamp must satisfy 0 <= s_min <= s_max, got {tuple(clamp)!r}")
    return lo, hi


def eda_scale(seq_entropy: Tensor, *, group_size: Optional[int] = None, group_ids: Optional[Tensor] = None,
              eps: float = 1e-6, clamp: Optional[Tuple[float, float]] = None,
              valid: Optional[Tensor] = None) -> Tensor:
    """EDGE-GRPO's Entropy-Driven Advantage scale ``s_i = sg[mean_g(P)] / (P_i + eps)`` ``[B]``.

    Spec: docs/algorithms.md section 2. The one place the scale is formed: :func:`eda_advantages`, the fused
    loss (``eda="current"``) and every adapter call it. ``seq_entropy`` is ``P [B]`` (see
    :func:`seq_mean_entropy`); gradient flows through ``1 / (P_i + eps)`` when it requires grad (the "current"
    entropy source), while ``mean_g(P)`` is always taken from ``seq_entropy.detach()``. ``clamp=(s_min, s_max)``
    clamps the scale (off by default; a common variant uses ``(0.5, 2)``).

    A group whose ``P`` are all 0 gets scale 1. ``valid`` (bool ``[B]``, e.g. ``mask.any(-1)``): rows with at
    least one response token; the others (a completion truncated away or fully masked, whose ``P = 0`` says
    nothing) are left out of ``mean_g(P)`` and keep exactly 1, whatever the clamp. Default: every row counts.
    """
    p = _per_sequence("seq_entropy", seq_entropy)
    eps = _eps(eps, positive=True)
    bounds = _check_clamp(clamp)
    g = _resolve_groups("seq_entropy", p.shape[0], p.device, group_size, group_ids)
    valid = _valid_rows(valid, p.shape[0], p.device)
    s = _relative_scale(p, g, eps, valid)
    if bounds is not None:
        s = s.clamp(*bounds)
        if valid is not None:
            s = torch.where(valid, s, torch.ones_like(s))
    return s


def eda_advantages(advantages: Tensor, seq_entropy: Tensor, *, group_size: Optional[int] = None,
                   group_ids: Optional[Tensor] = None, eps: float = 1e-6,
                   clamp: Optional[Tuple[float, float]] = None, valid: Optional[Tensor] = None) -> Tensor:
    """EDGE-GRPO's Entropy-Driven Advantage: ``A^_i = A_i * s_i`` with ``s`` = :func:`eda_scale`.

    Spec: docs/algorithms.md section 2. ``advantages`` is ``[B]`` or token-level ``[B, T]`` (the scale
    broadcasts over ``T``). For the "old" entropy source pass a detached ``P``; with a ``P`` that requires grad
    the gradient flows through ``1 / P_i`` (the "current" source). EDA only rescales: a group whose advantages
    are all 0 stays 0.
    """
    a = _advantage_input(advantages)
    _per_sequence("seq_entropy", seq_entropy, a.shape[0])
    s = eda_scale(seq_entropy, group_size=group_size, group_ids=group_ids, eps=eps, clamp=clamp, valid=valid)
    return a * (s if a.dim() == 1 else s[:, None])


# ----------------------------------------------------------------------------------------------------------
# section 4: EGPO


def _egpo_weights(u: Tensor, correct: Tensor, g: _Groups, mode: str, w_min: float, w_max: float,
                  renorm: bool, eps: float, valid: Optional[Tensor]) -> Tensor:
    w = _relative_scale(u, g, eps, valid)
    if mode == "symmetric":
        w = w.clamp(w_min, w_max)
    else:
        low = w.clamp(w_min, 1.0) if mode == "asymmetric" else torch.ones_like(w)
        w = torch.where(correct, w.clamp(1.0, w_max), low)
    if renorm:
        w = w / _group_mean(w, g)
    return w


def _check_weight_bounds(mode: str, w_min: float, w_max: float, prefix: str = "") -> None:
    lo, hi = f"{prefix}w_min", f"{prefix}w_max"  # the names the caller knows them by
    if mode != "lock_one" and w_min <= 0:
        raise ValueError(f"{lo} must be > 0, got {w_min}")
    if mode == "symmetric" and w_min > w_max:
        raise ValueError(f"{lo} ({w_min}) must be <= {hi} ({w_max}) for mode='symmetric'")
    if mode == "asymmetric" and w_min > 1:
        raise ValueError(f"{lo} must be <= 1 for mode='asymmetric', got {w_min}")
    if mode != "symmetric" and w_max < 1:
        raise ValueError(f"{hi} must be >= 1 for mode={mode!r}, got {w_max}")


def egpo_advantages(rewards: Tensor, seq_uncertainty: Tensor, *, group_size: Optional[int] = None,
                    group_ids: Optional[Tensor] = None, w_min: float = 0.5, w_max: float = 2.0,
                    mode: str = "asymmetric", renorm: bool = False, nsr_value: float = -1.0, eps: float = 1e-6,
                    scale: str = "group", correct_threshold: float = 0.0,
                    valid: Optional[Tensor] = None) -> Tensor:
    """EGPO calibrated advantages ``A~_i = A_i * w_i`` ``[B]`` with negative-sample reinforcement (NSR).

    Spec: docs/algorithms.md section 4.

    * Base ``A`` = :func:`grpo_advantages` with ``scale``. A row is correct when ``r_i > correct_threshold``.
      Entirely-incorrect groups get ``A_i = nsr_value`` (< 0); entirely-correct groups keep their base
      advantage, which is 0 whenever their rewards are equal (always, for binary rewards).
    * ``w_i = mean_g(U) / (U_i + eps)`` with ``U = seq_uncertainty [B]`` (e.g. :func:`nll_uncertainty`), then
      ``mode="asymmetric"``: correct rows ``clip(w, 1, w_max)``, incorrect ``clip(w, w_min, 1)``;
      ``"symmetric"``: ``clip(w, w_min, w_max)``; ``"lock_one"``: incorrect rows ``w = 1``, correct rows
      ``clip(w, 1, w_max)``. ``renorm=True`` then divides by ``mean_g(w)``.
    * ``valid`` (bool ``[B]``): as in :func:`eda_advantages`, rows without response tokens are left out of
      ``mean_g(U)`` and get ``w = 1``.
    """
    r = _per_sequence("rewards", rewards)
    u = _per_sequence("seq_uncertainty", seq_uncertainty, r.shape[0])
    mode = _choice("mode", mode, EGPO_MODES)
    scale = _choice("scale", scale, SCALES)
    w_min, w_max = _number("w_min", w_min), _number("w_max", w_max)
    _check_weight_bounds(mode, w_min, w_max)
    nsr_value = _number("nsr_value", nsr_value)
    if nsr_value >= 0:
        raise ValueError(f"nsr_value must be < 0, got {nsr_value}")
    threshold = _number("correct_threshold", correct_threshold)
    eps = _eps(eps, positive=True)
    g = _resolve_groups("rewards", r.shape[0], r.device, group_size, group_ids)

    correct = r > threshold
    a = _grpo(r, g, scale, eps)
    a = torch.where(_group_any(correct, g), a, torch.full_like(a, nsr_value))
    return a * _egpo_weights(u, correct, g, mode, w_min, w_max, bool(renorm), eps,
                             _valid_rows(valid, r.shape[0], r.device))


# ----------------------------------------------------------------------------------------------------------
# section 5: ProGRPO and EP-GRPO (this library's reading; the papers publish no code)


def _low_confidence(logp: Tensor, m: Tensor, low_frac: float) -> Tuple[Tensor, Tensor]:
    """``c(o) = exp(mean of the ceil(low_frac * |o|) lowest unmasked log-probs)`` ``[B]``, and whether the
    row has any unmasked token (``c = 0`` where it has none)."""
    n = m.sum(-1)
    valid = n > 0
    k = torch.ceil(n.double() * low_frac - _CEIL_SLACK).clamp_min(1).to(torch.int64)
    k = torch.where(valid, k, torch.zeros_like(k))
    lowest = torch.where(m, logp, torch.full_like(logp, float("inf"))).sort(dim=-1).values  # masked sort last
    take = torch.arange(logp.shape[-1], device=logp.device)[None, :] < k[:, None]
    mean = torch.where(take, lowest, torch.zeros_like(lowest)).sum(-1) / k.clamp_min(1).to(logp.dtype)
    return torch.where(valid, mean.exp(), torch.zeros_like(mean)), valid


def prog_grpo_advantages(advantages: Tensor, token_logp: Tensor, mask: Tensor, rewards: Tensor, *,
                         group_size: Optional[int] = None, group_ids: Optional[Tensor] = None,
                         alpha: float = 0.3, low_frac: float = 0.2, baseline: str = "group",
                         prompt_logp: Optional[Tensor] = None, prompt_mask: Optional[Tensor] = None,
                         correct_threshold: float = 0.0) -> Tensor:
    """ProGRPO's Advantage Re-weighting: ``A~_i = A_i + alpha * (b_g - c(o_i|q))``.

    Spec: docs/algorithms.md section 5. This is this library's reading of a paper without code.

    ``c(o|q) = exp(mean of log p over T_low(o))`` with ``T_low(o)`` the ``ceil(low_frac * |o|)`` (at least
    one) unmasked positions of ``token_logp [B, T]`` (old policy) with the lowest log-prob. Baseline ``b``:
    ``"group"`` = group mean of ``c`` over the rows with at least one unmasked token; ``"prompt"`` =
    ``c(q)``, the same statistic over ``prompt_logp``/``prompt_mask [B, Tp]`` (required then). Entirely-
    incorrect groups (no ``r_i > correct_threshold``) keep ``A_i``; so do rows with an all-zero mask (or, for
    ``"prompt"``, an all-zero prompt mask). ``advantages`` is ``[B]`` or ``[B, T]`` (shift broadcast over T).
    """
    a = _advantage_input(advantages)
    batch = a.shape[0]
    logp, m = _token_pair("token_logp", token_logp, mask, batch)
    _token_level_advantages(a, logp.shape)  # shape check only: the shift broadcasts below
    r = _per_sequence("rewards", rewards, batch)
    alpha = _number("alpha", alpha)
    low_frac = _number("low_frac", low_frac)
    if not 0 < low_frac <= 1:
        raise ValueError(f"low_frac must lie in (0, 1], got {low_frac}")
    baseline = _choice("baseline", baseline, PROG_BASELINES)
    if baseline == "prompt" and (prompt_logp is None or prompt_mask is None):
        raise ValueError("baseline='prompt' needs prompt_logp and prompt_mask")
    threshold = _number("correct_threshold", correct_threshold)
    g = _resolve_groups("advantages", batch, a.device, group_size, group_ids)

    c, valid = _low_confidence(logp, m, low_frac)
    if baseline == "group":
        v = valid.to(c.dtype)
        b = (_group_sum(c * v, g) / _group_sum(v, g).clamp_min(1))[g.index]
    else:
        p_logp, p_m = _token_pair("prompt_logp", prompt_logp, prompt_mask, batch, mask_name="prompt_mask")
        b, p_valid = _low_confidence(p_logp, p_m, low_frac)
        valid = valid & p_valid
    adjust = valid & _group_any(r > threshold, g)
    shift = torch.where(adjust, alpha * (b - c), torch.zeros_like(c))
    return a + (shift if a.dim() == 1 else shift[:, None])


def _entropy_gate(h: Tensor, m: Tensor, g_min: float, g_max: float, eps: float) -> Tensor:
    """``clip(H_{i,t} / mean_t[H_i], g_min, g_max)``; a row whose mean entropy is 0 gets gate 1."""
    mean = masked_mean(h, m)[:, None]
    return torch.where(mean > 0, h / (mean + eps), torch.ones_like(h)).clamp(g_min, g_max)


def _progress_signal(h: Tensor, m: Tensor, g: _Groups, num_buckets: int, eps: float) -> Tensor:
    """``(mean_bucket H - H_{i,t}) / (std_bucket H + eps)`` over (group, progress-bucket) cells ``[B, T]``."""
    w = m.to(h.dtype)
    cum_h = (h * w).cumsum(-1)
    cum_n = w.cumsum(-1)
    total_h, total_n = cum_h[:, -1:], cum_n[:, -1:].clamp_min(1)
    # progress through the response's entropy; by token count for a row with zero total entropy
    progress = torch.where(total_h > 0, cum_h / total_h.clamp_min(torch.finfo(h.dtype).tiny), cum_n / total_n)
    bucket = (progress * num_buckets).floor().to(torch.int64).clamp(0, num_buckets - 1)
    cell = (g.index[:, None] * num_buckets + bucket).flatten()
    n_cells = g.count * num_buckets

    def cell_sum(x: Tensor) -> Tensor:
        return h.new_zeros(n_cells).index_add(0, cell, x.flatten())

    count = cell_sum(w).clamp_min(1)
    mean = (cell_sum(h * w) / count)[cell].view_as(h)
    dev = h - mean
    std = (cell_sum(dev * dev * w) / count).sqrt()[cell].view_as(h)  # population std of the cell
    return -dev / (std + eps)


def ep_grpo_token_advantages(advantages: Tensor, token_entropy: Tensor, mask: Tensor, rewards: Tensor, *,
                             group_size: Optional[int] = None, group_ids: Optional[Tensor] = None,
                             g_min: float = 0.5, g_max: float = 2.0, num_buckets: int = 10, lam: float = 0.1,
                             eps: float = 1e-6, correct_threshold: float = 0.0) -> Tensor:
    """EP-GRPO token-level advantages ``[B, T]``: entropy gate plus a progress-aligned signal.

    Spec: docs/algorithms.md section 5. This is this library's interpretation of a paper without code.

    * Groups whose rewards vary: ``A_{i,t} = A_i * clip(H_{i,t} / mean_t[H_i], g_min, g_max)`` (a row whose
      mean entropy is 0 gets gate 1; the ratio's denominator carries ``+ eps``). ``advantages`` is ``[B]`` or
      ``[B, T]``.
    * Zero-variance groups (all rewards equal; ``sigma_g = +1`` when they are ``> correct_threshold``, else
      ``-1``): progress ``c_{i,t} = cumsum_t H / sum_t H`` (by token count if ``sum_t H = 0``) picks one of
      ``num_buckets`` equal-width buckets; within each (group, bucket) cell of unmasked tokens,
      ``A_{i,t} = sigma_g * lam * (mean_cell H - H_{i,t}) / (std_cell H + eps)``, std being the population std
      (a one-token cell gives 0). The given advantages of these groups are replaced.

    Masked tokens get 0.
    """
    a = _advantage_input(advantages)
    h, m = _token_pair("token_entropy", token_entropy, mask, a.shape[0])
    a = _token_level_advantages(a, h.shape)
    r = _per_sequence("rewards", rewards, h.shape[0])
    g_min, g_max = _number("g_min", g_min), _number("g_max", g_max)
    if not 0 <= g_min <= g_max:
        raise ValueError(f"g_min and g_max must satisfy 0 <= g_min <= g_max, got ({g_min}, {g_max})")
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or num_buckets < 1:
        raise ValueError(f"num_buckets must be a positive int, got {num_buckets!r}")
    lam = _number("lam", lam)
    eps = _eps(eps, positive=True)
    threshold = _number("correct_threshold", correct_threshold)
    g = _resolve_groups("advantages", h.shape[0], h.device, group_size, group_ids)

    h = torch.where(m, h, torch.zeros_like(h))
    gated = a * _entropy_gate(h, m, g_min, g_max, eps)
    sigma = torch.where(r > threshold, 1.0, -1.0).to(h.dtype)
    progress = (sigma * lam)[:, None] * _progress_signal(h, m, g, num_buckets, eps)
    out = torch.where(_group_constant(r, g)[:, None], progress, gated)
    return torch.where(m, out, torch.zeros_like(out))


# ----------------------------------------------------------------------------------------------------------
# section 6 metrics


def _metric_input(advantages, group_size, group_ids) -> Tuple[Tensor, _Groups]:
    a = _check_tensor("advantages", advantages)
    if a.dim() != 1:
        raise ValueError(
            f"advantages must be per-sequence [B] (reduce token-level ones first), got shape {tuple(a.shape)}"
        )
    a = _per_sequence("advantages", a)
    return a, _resolve_groups("advantages", a.shape[0], a.device, group_size, group_ids)


def group_advantage_variance(advantages: Tensor, *, group_size: Optional[int] = None,
                             group_ids: Optional[Tensor] = None) -> Tensor:
    """Mean over groups of the within-group variance of per-sequence advantages ``[B]`` -> 0-d tensor.

    Spec: docs/algorithms.md section 6 ("intra-group advantage variance", the quantity behind EDGE-GRPO's
    Figure 5). Uses the population variance (divide by the group size), so a group of one row contributes 0.
    EDGE-GRPO's official trainer logs the batch-wide unbiased variance instead (``adv_batch_var`` in
    :func:`edge_kernels.policy_loss`'s metrics); the two differ by how the groups' means spread. Only ``[B]`` is
    accepted.
    """
    a, g = _metric_input(advantages, group_size, group_ids)
    dev = a - _group_mean(a, g)
    return (_group_sum(dev * dev, g) / g.sizes.to(a.dtype)).mean()


def zero_advantage_group_fraction(advantages: Tensor, *, group_size: Optional[int] = None,
                                  group_ids: Optional[Tensor] = None, atol: float = 1e-8) -> Tensor:
    """Fraction of groups whose advantages ``[B]`` are all within ``atol`` of 0 -> 0-d tensor.

    Spec: docs/algorithms.md section 6. Only ``[B]`` is accepted.
    """
    a, g = _metric_input(advantages, group_size, group_ids)
    atol = _number("atol", atol)
    if atol < 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    nonzero = _group_sum((a.abs() > atol).to(a.dtype), g)
    return (nonzero == 0).to(a.dtype).mean()
