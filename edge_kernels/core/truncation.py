"""Sampling truncation (top-k / top-p / min-p) as a per-row threshold: the streaming threshold search,
and the tile math of the log-probs and entropy under the truncated, renormalised distribution.

Owns one rule, vLLM's sampler's (``docs/algorithms.md``, section 9): with ``z = logits / T`` (after the
soft-cap), min-p keeps ``p_v >= min_p * max p``, then top-k keeps ``z_v >=`` the k-th largest ``z`` (every tie),
then top-p keeps, in descending order, each token whose preceding mass (renormalised over what is left) is
``< top_p`` (the token crossing ``top_p`` is kept; of ``g`` tokens tied at that boundary, vLLM keeps a count
``k_tau`` its sort order decides). The kept set is ``{z > tau} + k_tau of the g tokens at tau``; every tied token
counts with weight ``w = k_tau / g`` (the normaliser, the entropy and a tied target's log-prob are those of any
choice of the ``k_tau``; the gradient is shared symmetrically). Kernels see it as masked, shifted logits
``z' = z (z > tau), z + log w (z == tau), -inf (z < tau)``.

The threshold is found without ``[N, V]`` logits: ``tiles()`` yields fp32 logits chunks ``(col0, z [n, c])`` and
is walked a few times (one pass for the max and a streaming top-k merge, one for min-p, four radix-select passes
on the fp32 bit pattern with per-bin count and probability mass for top-p, the first also summing the kept mass,
or for a top-k above ``TOPK_MERGE_MAX``). Torch only; every backend calls it with tiles bit-identical to the
ones its kernels form.
The options are validated by :func:`edge_kernels.ops.validation.check_truncation`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Optional, Tuple

import torch

Tensor = torch.Tensor
Tiles = Callable[[], Iterable[Tuple[int, Tensor]]]

TOPK_MERGE_MAX = 1024  # a larger top_k is found by the radix select instead of a [n, k + chunk] merge
_SLICE_ELEMENTS = 1 << 20  # the radix passes work on row slices of this many elements (int64 bin indices)


@dataclass(frozen=True)
class Truncation:
    """Validated sampling truncation; a field is None when that filter is off."""

    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None


class Threshold(NamedTuple):
    """Per-row kept set ``{z > tau} + weight exp(log_w) on z == tau``; ``k_tie`` kept tokens of the tie group
    (their count; the entropy correction of kernels that see ``z'`` only needs it)."""

    tau: Tensor
    log_w: Tensor
    k_tie: Tensor


# ----------------------------------------------------------------------------------------------------------
# sortable keys of fp32 values: signed int32 whose order is the float order (-0.0 is normalised to +0.0 first)


def _keys(z: Tensor) -> Tensor:
    b = (z + 0.0).view(torch.int32)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


def _key_to_float(key: Tensor) -> Tensor:
    k = key.to(torch.int32)
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).view(torch.float32)


def _digit(keys: Tensor, shift: int) -> Tensor:
    d = keys >> shift
    return (d + 128).to(torch.int64) if shift == 24 else (d & 0xFF).to(torch.int64)


def row_slices(rows: int, cols: int):
    """Row ranges of ``[rows, cols]`` tiles holding about ``_SLICE_ELEMENTS`` elements each."""
    step = max(1, _SLICE_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _radix_select(tiles: Tiles, n: int, device, target: Optional[Tensor], floor: Tensor, m: Optional[Tensor],
                  frac: Optional[float] = None):
    """Largest value ``u`` per row with ``weight({z >= u, z >= floor}) >= target``: by count (``m`` None) or by
    probability mass ``exp(z - m)`` (float64 sums). Four passes, one byte of the key each. With ``frac`` the
    target is ``frac`` times the total weight over ``z >= floor``, which the first pass's histogram sums.
    Returns ``(u, weight strictly above u, count at u, weight at u, target)`` (all float64 but ``u``)."""
    prefix = torch.zeros(n, dtype=torch.int64, device=device)
    above = torch.zeros(n, dtype=torch.float64, device=device)
    for shift in (24, 16, 8, 0):
        h_w = torch.zeros((n, 256), dtype=torch.float64, device=device)
        h_c = torch.zeros((n, 256), dtype=torch.float64, device=device) if m is not None else h_w
        for _, z in tiles():
            for r0, r1 in row_slices(n, z.shape[1]):
                zs = z[r0:r1]
                keys = _keys(zs)
                sel = zs >= floor[r0:r1, None]
                if shift != 24:
                    sel &= (keys >> (shift + 8)).to(torch.int64) == prefix[r0:r1, None]
                dig = _digit(keys, shift)
                one = sel.to(torch.float64)
                h_c[r0:r1].scatter_add_(1, dig, one)
                if m is not None:
                    e = torch.exp(zs - m[r0:r1, None]).to(torch.float64) * one
                    h_w[r0:r1].scatter_add_(1, dig, e)
        if target is None:
            assert frac is not None  # the caller passes one of target, frac
            target = frac * h_w.sum(dim=1)
        at_least = above[:, None] + h_w.flip(1).cumsum(1).flip(1)
        # the bin holding u: the highest one whose cumulative weight from the top reaches the target (>= 1 bin
        # always does, since the target is at most the total)
        pick = ((at_least >= target[:, None]).sum(1) - 1).clamp(min=0)
        w_at = h_w.gather(1, pick[:, None]).squeeze(1)
        c_at = h_c.gather(1, pick[:, None]).squeeze(1)
        above = at_least.gather(1, pick[:, None]).squeeze(1) - w_at
        prefix = pick - 128 if shift == 24 else (prefix << 8) | pick
    return _key_to_float(prefix), above, c_at, w_at, target


def _max_and_topk(tiles: Tiles, n: int, device, k: Optional[int]):
    """Row max, and the k-th largest value by a streaming top-k merge (None without top_k)."""
    m = torch.full((n,), float("-inf"), device=device)
    best = None
    for _, z in tiles():
        m = torch.maximum(m, z.amax(dim=1))
        if k is not None:
            kk = min(k, z.shape[1] + (0 if best is None else best.shape[1]))
            merged = torch.empty((n, kk), device=device)
            for r0, r1 in row_slices(n, z.shape[1] + kk):
                cand = z[r0:r1] if best is None else torch.cat([best[r0:r1], z[r0:r1]], dim=1)
                merged[r0:r1] = cand.topk(kk, dim=1).values
            best = merged
    if k is None:
        return m, None
    assert best is not None  # k is set: the merge ran over every chunk
    if best.shape[1] < k:  # fewer tokens than k: nothing is cut
        return m, torch.full((n,), float("-inf"), device=device)
    return m, best[:, k - 1].contiguous()


def _min_p_floor(tiles: Tiles, n: int, device, m: Tensor, min_p: float) -> Tensor:
    """Smallest ``z`` with ``p >= min_p * max p``, i.e. ``z - max z >= log(min_p)`` (in float64: exact
    differences of fp32 values)."""
    log_min_p = math.log(min_p)
    floor = torch.full((n,), float("inf"), device=device)
    for _, z in tiles():
        for r0, r1 in row_slices(n, z.shape[1]):
            keep = (z[r0:r1].double() - m[r0:r1].double()[:, None]) >= log_min_p
            low = torch.where(keep, z[r0:r1], float("inf")).amin(dim=1)
            floor[r0:r1] = torch.minimum(floor[r0:r1], low)
    return floor


def find_threshold(tiles: Tiles, n: int, vocab: int, device, trunc: Truncation) -> Threshold:
    """The per-row kept set of ``trunc`` over the ``[n, vocab]`` logits ``tiles()`` yields (module docstring)."""
    if trunc.top_k is not None and trunc.top_k >= vocab:  # keeps every token, as vLLM's top-k does
        trunc = Truncation(None, trunc.top_p, trunc.min_p)
    small_k = trunc.top_k if trunc.top_k is not None and trunc.top_k <= TOPK_MERGE_MAX else None
    m, tau = _max_and_topk(tiles, n, device, small_k)
    if tau is None:
        tau = torch.full((n,), float("-inf"), device=device)
    if trunc.top_k is not None and small_k is None:
        k = torch.full((n,), float(trunc.top_k), dtype=torch.float64, device=device)
        tau = _radix_select(tiles, n, device, k, torch.full((n,), float("-inf"), device=device), None)[0]
    if trunc.min_p is not None:
        tau = torch.maximum(tau, _min_p_floor(tiles, n, device, m, trunc.min_p))
    zero = torch.zeros(n, device=device)
    if trunc.top_p is None:
        return Threshold(tau, zero, zero)
    u, above, count, mass, target = _radix_select(tiles, n, device, None, tau, m, frac=trunc.top_p)
    # of the `count` tokens tied at u (each of mass q), vLLM keeps those whose preceding mass is < top_p * total
    # (target): j - 1 < (target - above) / q for j = 1..count
    q = mass / count.clamp(min=1)
    k_tie = torch.minimum(count, torch.ceil((target - above) / q)).clamp(min=1)
    log_w = torch.log(k_tie / count.clamp(min=1)).float()
    return Threshold(u, log_w, k_tie.float())


# ----------------------------------------------------------------------------------------------------------
# tile math on the kept set


def kept_logits(z: Tensor, th: Threshold) -> Tensor:
    """``z'``: ``z`` above ``tau``, ``z + log w`` at ``tau``, ``-inf`` below (fp32 tile ``[n, c]``)."""
    tau = th.tau[:, None]
    return torch.where(z > tau, z, torch.where(z == tau, z + th.log_w[:, None], float("-inf")))


def entropy_correction(entropy_kept: Tensor, lse: Tensor, th: Threshold) -> Tensor:
    """Entropy of the truncated distribution from the plain entropy ``H'`` of ``z'``: each tied token's
    probability is ``exp(tau - lse)``, not ``exp(tau + log w - lse)``, so ``H = H' + log w * k_tie exp(tau - lse)``
    (0 without a partial tie)."""
    return entropy_kept + th.log_w * th.k_tie * torch.exp(th.tau - lse)


def target_logp(zt: Tensor, lse: Tensor, th: Threshold) -> Tensor:
    """``z_t - lse`` for a kept target (a target tied at ``tau`` was sampled, so it is one of the kept), ``-inf``
    for a target below ``tau``."""
    return torch.where(zt >= th.tau, zt - lse, float("-inf"))


def grad_kept_tile(z: Tensor, col0: int, targets: Tensor, lse: Tensor, entropy: Optional[Tensor],
                   grad_logp: Tensor, grad_entropy: Optional[Tensor], th: Threshold) -> Tensor:
    """Gradient w.r.t. ``z`` of the truncated log-prob and entropy on the tile ``z [n, c]`` (columns ``col0...``):
    ``dz = g_l (1[v = t] - p~) - g_H p~ (z - lse + H)``, ``p~ = exp(z' - lse)`` (0 off the kept set; ``tau`` is
    piecewise constant, so no gradient flows through it). ``grad_logp`` must be 0 on ignored rows and on rows
    whose target was cut; a row with both upstream gradients 0 gets exact zeros."""
    dz = torch.empty_like(z)
    for r0, r1 in row_slices(z.shape[0], z.shape[1]):  # row slices: the temporaries stay slice-sized
        sl = slice(r0, r1)
        p = torch.exp(kept_logits(z[sl], Threshold(th.tau[sl], th.log_w[sl], th.k_tie[sl])) - lse[sl, None])
        d = -grad_logp[sl, None] * p
        active = grad_logp[sl] != 0
        if grad_entropy is not None:
            assert entropy is not None  # an entropy gradient comes with the entropy it differentiates
            logq = torch.where(p > 0, z[sl] - lse[sl, None] + entropy[sl, None], 0.0)
            d -= grad_entropy[sl, None] * p * logq
            active = active | (grad_entropy[sl] != 0)
        dz[sl] = torch.where(active[:, None], d, 0.0)
    local = targets - col0
    inside = (local >= 0) & (local < z.shape[1])
    dz.scatter_add_(1, local.clamp(0, z.shape[1] - 1)[:, None], torch.where(inside, grad_logp, 0.0)[:, None])
    return dz
