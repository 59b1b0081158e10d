"""Tests of edge_kernels.advantage_formulas against docs/algorithms.md sections 1, 2, 4, 5 and 6.

Three kinds of checks per formula: a small hand-computed example (expected numbers written out literally),
an independent float64 reference written here with plain Python loops over groups (both the ``group_size`` and
the shuffled ``group_ids`` forms, the latter with uneven groups including groups of one row), and the edge
cases / input errors.
"""

from __future__ import annotations

import math
import statistics
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_kernels.advantage_formulas import (
    eda_advantages,
    egpo_advantages,
    ep_grpo_token_advantages,
    group_advantage_variance,
    group_mean,
    grpo_advantages,
    masked_mean,
    nll_uncertainty,
    prog_grpo_advantages,
    seq_mean_entropy,
    zero_advantage_group_fraction,
)

F64 = torch.float64


def close(actual, expected, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual).double(), torch.as_tensor(expected, dtype=F64),
                               atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------------------------
# independent float64 references: plain Python loops over groups (and, where it is clearer, over rows)


def groups_of(ids: torch.Tensor) -> list[list[int]]:
    rows: dict[int, list[int]] = {}
    for i, label in enumerate(ids.tolist()):
        rows.setdefault(label, []).append(i)
    return list(rows.values())


def contiguous(batch: int, size: int) -> list[list[int]]:
    return [list(range(s, s + size)) for s in range(0, batch, size)]


def ref_grpo(r, groups, scale="group", eps=1e-6):
    r = [float(x) for x in r]
    out = [0.0] * len(r)
    batch_std = statistics.stdev(r) if len(r) > 1 else 0.0
    for rows in groups:
        vals = [r[i] for i in rows]
        if len(rows) == 1 or max(vals) == min(vals):
            continue
        mean = sum(vals) / len(vals)
        denom = {"group": statistics.stdev(vals) + eps, "batch": batch_std + eps, "none": 1.0}[scale]
        for i in rows:
            out[i] = (r[i] - mean) / denom
    return out


def ref_eda(a, p, groups, eps=1e-6, clamp=None):
    a = a.double().clone()
    for rows in groups:
        mean = sum(float(p[i]) for i in rows) / len(rows)
        for i in rows:
            s = mean / (float(p[i]) + eps)
            if clamp is not None:
                s = min(max(s, clamp[0]), clamp[1])
            a[i] = a[i] * s
    return a


def ref_egpo(r, u, groups, w_min=0.5, w_max=2.0, mode="asymmetric", renorm=False, nsr=-1.0, eps=1e-6,
             scale="group", thr=0.0):
    base = ref_grpo(r, groups, scale, eps)
    out = [0.0] * len(base)
    for rows in groups:
        correct = {i: float(r[i]) > thr for i in rows}
        if not any(correct.values()):
            for i in rows:
                base[i] = nsr
        mean_u = sum(float(u[i]) for i in rows) / len(rows)
        w = {}
        for i in rows:
            x = mean_u / (float(u[i]) + eps)
            if mode == "symmetric":
                w[i] = min(max(x, w_min), w_max)
            elif correct[i]:
                w[i] = min(max(x, 1.0), w_max)
            else:
                w[i] = min(max(x, w_min), 1.0) if mode == "asymmetric" else 1.0
        if renorm:
            mean_w = sum(w.values()) / len(rows)
            w = {i: x / mean_w for i, x in w.items()}
        for i in rows:
            out[i] = base[i] * w[i]
    return out


def ref_confidence(logp_row, mask_row, frac: Fraction):
    vals = sorted(float(x) for x, m in zip(logp_row, mask_row) if m)
    if not vals:
        return None
    k = max(1, -(-len(vals) * frac.numerator // frac.denominator))  # exact integer ceil
    return math.exp(sum(vals[:k]) / k)


def ref_prog(a, logp, mask, r, groups, alpha=0.3, frac=Fraction(1, 5), prompt=None, thr=0.0):
    out = [float(x) for x in a]
    for rows in groups:
        if not any(float(r[i]) > thr for i in rows):
            continue
        c = {i: ref_confidence(logp[i], mask[i], frac) for i in rows}
        valid = [i for i in rows if c[i] is not None]
        for i in valid:
            if prompt is None:
                b = sum(c[j] for j in valid) / len(valid)
            else:
                b = ref_confidence(prompt[0][i], prompt[1][i], frac)
                if b is None:
                    continue
            out[i] += alpha * (b - c[i])
    return out


def ref_ep(a, h, mask, r, groups, g_min=0.5, g_max=2.0, k=10, lam=0.1, eps=1e-6, thr=0.0):
    batch, t_len = h.shape
    out = [[0.0] * t_len for _ in range(batch)]
    for rows in groups:
        rewards = [float(r[i]) for i in rows]
        if max(rewards) != min(rewards):
            for i in rows:
                toks = [t for t in range(t_len) if mask[i][t]]
                mean = sum(float(h[i][t]) for t in toks) / max(1, len(toks))
                for t in toks:
                    gate = min(max(float(h[i][t]) / (mean + eps), g_min), g_max) if mean > 0 else 1.0
                    out[i][t] = float(a[i]) * gate
            continue
        sigma = 1.0 if rewards[0] > thr else -1.0
        cells: dict[int, list[tuple[int, int, float]]] = {}
        for i in rows:
            toks = [t for t in range(t_len) if mask[i][t]]
            total = sum(float(h[i][t]) for t in toks)
            cum = 0.0
            for n, t in enumerate(toks, start=1):
                cum += float(h[i][t])
                progress = cum / total if total > 0 else n / len(toks)
                cells.setdefault(min(int(progress * k), k - 1), []).append((i, t, float(h[i][t])))
        for members in cells.values():
            vals = [v for _, _, v in members]
            mean, std = statistics.fmean(vals), statistics.pstdev(vals)
            for i, t, v in members:
                out[i][t] = sigma * lam * (mean - v) / (std + eps)
    return out


# ----------------------------------------------------------------------------------------------------------
# random inputs in both group layouts

B, G = 24, 4


def layouts(seed: int):
    """``(group kwargs, row groups)`` for contiguous blocks of G and for shuffled uneven integer labels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-4, 6, (B,), generator=gen) * 7  # arbitrary labels, any order, uneven, some size 1
    return [({"group_size": G}, contiguous(B, G)), ({"group_ids": ids}, groups_of(ids))]


def random_rewards(gen):
    r = torch.randint(0, 2, (B,), generator=gen).double()
    r[:4] = 1.0  # an all-correct block
    r[4:8] = 0.0  # an all-incorrect block
    r[8:12] = torch.rand(4, generator=gen, dtype=F64)  # continuous rewards
    return r


LAYOUT_IDS = ["group_size", "group_ids"]


@pytest.mark.parametrize("layout", [0, 1], ids=LAYOUT_IDS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_matches_loop_reference(layout, scale):
    gen = torch.Generator().manual_seed(1)
    r = random_rewards(gen)
    kw, groups = layouts(2)[layout]
    close(grpo_advantages(r.float(), scale=scale, **kw), ref_grpo(r.float(), groups, scale), atol=2e-5)


@pytest.mark.parametrize("layout", [0, 1], ids=LAYOUT_IDS)
@pytest.mark.parametrize("clamp", [None, (0.5, 2.0)])
@pytest.mark.parametrize("token_level", [False, True])
def test_eda_matches_loop_reference(layout, clamp, token_level):
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(B, 5, generator=gen) if token_level else torch.randn(B, generator=gen)
    p = torch.rand(B, generator=gen) * 3 + 0.05
    kw, groups = layouts(4)[layout]
    close(eda_advantages(a, p, clamp=clamp, **kw), ref_eda(a, p, groups, clamp=clamp))


@pytest.mark.parametrize("layout", [0, 1], ids=LAYOUT_IDS)
@pytest.mark.parametrize("mode", ["asymmetric", "symmetric", "lock_one"])
@pytest.mark.parametrize("renorm", [False, True])
def test_egpo_matches_loop_reference(layout, mode, renorm):
    gen = torch.Generator().manual_seed(5)
    r = random_rewards(gen)
    u = torch.rand(B, generator=gen, dtype=F64) * 2 + 0.1
    kw, groups = layouts(6)[layout]
    got = egpo_advantages(r, u, mode=mode, renorm=renorm, w_min=0.8, nsr_value=-0.5, **kw)
    close(got, ref_egpo(r, u, groups, w_min=0.8, mode=mode, renorm=renorm, nsr=-0.5))


@pytest.mark.parametrize("layout", [0, 1], ids=LAYOUT_IDS)
@pytest.mark.parametrize("baseline", ["group", "prompt"])
@pytest.mark.parametrize("frac", [Fraction(1, 5), Fraction(1, 2), Fraction(1, 1)])
def test_prog_grpo_matches_loop_reference(layout, baseline, frac):
    gen = torch.Generator().manual_seed(7)
    r = random_rewards(gen)
    a = torch.randn(B, generator=gen, dtype=F64)
    logp = -torch.rand(B, 16, generator=gen, dtype=F64) * 4
    mask = torch.rand(B, 16, generator=gen) < 0.8
    mask[5] = False  # a row with no response token
    logp[~mask] = float("-inf")  # padding never counts
    p_logp = -torch.rand(B, 6, generator=gen, dtype=F64) * 2
    p_mask = torch.rand(B, 6, generator=gen) < 0.7
    p_mask[9] = False
    kw, groups = layouts(8)[layout]
    extra = {"prompt_logp": p_logp, "prompt_mask": p_mask} if baseline == "prompt" else {}
    got = prog_grpo_advantages(a, logp, mask, r, low_frac=float(frac), baseline=baseline, **extra, **kw)
    prompt = (p_logp, p_mask) if baseline == "prompt" else None
    close(got, ref_prog(a, logp, mask, r, groups, frac=frac, prompt=prompt))


@pytest.mark.parametrize("layout", [0, 1], ids=LAYOUT_IDS)
@pytest.mark.parametrize("num_buckets", [1, 4, 10])
def test_ep_grpo_matches_loop_reference(layout, num_buckets):
    gen = torch.Generator().manual_seed(9)
    r = random_rewards(gen)
    a = torch.randn(B, generator=gen, dtype=F64)
    h = torch.rand(B, 12, generator=gen, dtype=F64) * 2
    h[3, 2:7] = 0.0  # zero-entropy tokens
    h[2] = 0.0  # a row with zero total entropy (in an all-correct block): progress by token count
    h[13] = 0.0  # the same in a mixed group: gate 1
    mask = torch.rand(B, 12, generator=gen) < 0.85
    mask[6] = False  # a row with no response token
    kw, groups = layouts(10)[layout]
    got = ep_grpo_token_advantages(a, h, mask, r, num_buckets=num_buckets, **kw)
    close(got, ref_ep(a, h, mask, r, groups, k=num_buckets))


@pytest.mark.parametrize("layout", [0, 1], ids=LAYOUT_IDS)
def test_metrics_match_loop_reference(layout):
    gen = torch.Generator().manual_seed(11)
    a = torch.randn(B, generator=gen, dtype=F64)
    a[:4] = 0.0
    kw, groups = layouts(12)[layout]
    for rows in groups[:2]:
        a[rows] = 0.0  # at least two all-zero groups in either layout
    variances = [statistics.pvariance([float(a[i]) for i in rows]) for rows in groups]
    zero = [all(float(a[i]) == 0.0 for i in rows) for rows in groups]
    close(group_advantage_variance(a, **kw), sum(variances) / len(groups))
    close(zero_advantage_group_fraction(a, **kw), sum(zero) / len(groups))


# ----------------------------------------------------------------------------------------------------------
# hand-computed examples (expected numbers worked out in the comments)


def test_grpo_hand_example():
    # r = [1, 0, 0, 1]: mean 0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.577350;
    # A = +-0.5 / (0.577350 + 1e-6) = +-0.866024
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    close(grpo_advantages(r, group_size=4), [0.866024, -0.866024, -0.866024, 0.866024])
    # Dr.GRPO: r - mean
    close(grpo_advantages(r, group_size=4, scale="none"), [0.5, -0.5, -0.5, 0.5])


def test_grpo_batch_scale_hand_example():
    # groups [1, 0] and [0, 0]; group means 0.5 and 0. Batch [1, 0, 0, 0]: mean 0.25,
    # unbiased var = (0.5625 + 3 * 0.0625) / 3 = 0.25, std 0.5 -> A = [0.5/0.5, -0.5/0.5, 0, 0].
    # With scale="group": std of [1, 0] = sqrt(0.5) = 0.707107 -> A = +-0.707106.
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    close(grpo_advantages(r, group_size=2, scale="batch"), [0.999998, -0.999998, 0.0, 0.0])
    close(grpo_advantages(r, group_size=2), [0.707106, -0.707106, 0.0, 0.0])


def test_eda_hand_example():
    # A = [1, -1, 1, -1], P = [1, 2, 3, 2], mean_g P = 2 -> scale = [2, 1, 2/3, 1]
    a, p = torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.tensor([1.0, 2.0, 3.0, 2.0])
    close(eda_advantages(a, p, group_size=4), [2.0, -1.0, 0.666667, -1.0])
    # clamp (0.5, 1.5): scale = [1.5, 1, 2/3, 1]
    close(eda_advantages(a, p, group_size=4, clamp=(0.5, 1.5)), [1.5, -1.0, 0.666667, -1.0])


def test_eda_raises_intra_group_advantage_variance():
    # rewards [1, 1, 0, 0] -> GRPO A = [0.866, 0.866, -0.866, -0.866], population variance 0.75.
    # P = [1, 3, 1, 3] (mean 2) -> scales [2, 2/3, 2, 2/3] -> A^ = [1.732, 0.577, -1.732, -0.577],
    # variance (3 + 1/3 + 3 + 1/3) / 4 = 1.6667. GRPO gives both correct responses (and both incorrect ones)
    # the same advantage; EDA separates equal-reward responses by their entropy (the confident one gets the
    # larger magnitude), which is exactly the added intra-group variance EDGE-GRPO's Figure 5 shows.
    a = grpo_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), group_size=4)
    eda = eda_advantages(a, torch.tensor([1.0, 3.0, 1.0, 3.0]), group_size=4)
    close(eda, [1.732048, 0.577349, -1.732048, -0.577349])
    grpo_var = group_advantage_variance(a, group_size=4)
    eda_var = group_advantage_variance(eda, group_size=4)
    close(grpo_var, 0.75)
    close(eda_var, 1.666664)
    assert eda_var > grpo_var


def test_eda_gradient_through_entropy_with_detached_mean():
    # out_i = A_i * m / (P_i + eps) with m = mean_g(P) detached, so d(sum out)/dP_i = -A_i * m / (P_i + eps)^2.
    # A = [1, -1], P = [1, 3], m = 2: grad = [-2, 2/9 = 0.222222].
    # (Were m not detached, each entry would gain sum_j A_j / (P_j + eps) / G = (1 - 1/3) / 2 = 1/3.)
    p = torch.tensor([1.0, 3.0], requires_grad=True)
    out = eda_advantages(torch.tensor([1.0, -1.0]), p, group_size=2)
    (grad,) = torch.autograd.grad(out.sum(), p)
    close(grad, [-2.0, 0.222222])
    # the full Jacobian is diagonal (no path through the group mean): d out_i / d P_i = -A_i m_g / (P_i + eps)^2
    # with m = [(0.7 + 1.9) / 2, (2.5 + 0.4) / 2] = [1.3, 1.45] per group
    p64 = torch.tensor([0.7, 1.9, 2.5, 0.4], dtype=F64)
    a64 = torch.tensor([0.3, -1.2, 0.8, 0.1], dtype=F64)
    jac = torch.autograd.functional.jacobian(lambda x: eda_advantages(a64, x, group_size=2), p64)
    means = torch.tensor([1.3, 1.3, 1.45, 1.45], dtype=F64)
    close(jac, torch.diag(-a64 * means / (p64 + 1e-6) ** 2), atol=1e-9)


def test_rows_without_tokens_are_left_out_of_the_group_means():
    # group of 4, row 3 has no response token (P = U = 0, says nothing): valid = [T, T, T, F]
    a, p = torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.tensor([1.0, 2.0, 3.0, 0.0])
    valid = torch.tensor([True, True, True, False])
    # without valid: mean_g P = 6/4 = 1.5 -> scale [1.5, 0.75, 0.5, 1.5e6]; with: mean over 3 rows = 2
    # -> scale [2, 1, 2/3] and 1 for row 3
    close(eda_advantages(a, p, group_size=4, valid=valid), [2.0, -1.0, 0.666667, -1.0])
    close(eda_advantages(a, p, group_size=4), [1.5, -0.75, 0.5, -1.5e6], rtol=1e-5)
    # with a clamp whose floor is above 1, the empty row still keeps exactly 1
    close(eda_advantages(a, p, group_size=4, valid=valid, clamp=(1.2, 1.8)), [1.8, -1.2, 1.2, -1.0])
    close(group_mean(p, group_size=4, valid=valid), [2.0, 2.0, 2.0, 2.0])
    close(group_mean(p, group_size=2, valid=valid), [1.5, 1.5, 3.0, 3.0])
    # EGPO: r = [1, 0, 1, 0], U = [1, 4, 1, 0] with row 3 empty: mean_g U over rows 0-2 = 2
    # -> w = [2, 0.5, 2] and 1 for row 3; asymmetric: [2, 0.5, 2, 1] times A = [.866, -.866, .866, -.866]
    r, u = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 1.0, 0.0])
    close(egpo_advantages(r, u, group_size=4, valid=valid), [1.732048, -0.433012, 1.732048, -0.866024])
    with pytest.raises(TypeError, match="valid must be a bool"):
        eda_advantages(a, p, group_size=4, valid=valid.float())
    with pytest.raises(ValueError, match=r"valid must have shape \[B\]"):
        eda_advantages(a, p, group_size=4, valid=valid[:3])


def test_egpo_hand_example():
    # r = [1, 0, 1, 0] -> base A = [0.866024, -0.866024, 0.866024, -0.866024]
    # U = [1, 4, 2, 1], mean 2 -> w = [2, 0.5, 1, 2]
    r, u = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 2.0, 1.0])
    # asymmetric: correct rows 0, 2 -> clip(w, 1, 2) = [2, 1]; incorrect 1, 3 -> clip(w, 0.5, 1) = [0.5, 1]
    close(egpo_advantages(r, u, group_size=4), [1.732048, -0.433012, 0.866024, -0.866024])
    # symmetric: clip(w, 0.5, 2) = [2, 0.5, 1, 2]
    close(egpo_advantages(r, u, group_size=4, mode="symmetric"), [1.732048, -0.433012, 0.866024, -1.732048])
    # lock_one: incorrect rows w = 1 -> [2, 1, 1, 1]
    close(egpo_advantages(r, u, group_size=4, mode="lock_one"), [1.732048, -0.866024, 0.866024, -0.866024])
    # asymmetric + renorm: w = [2, 0.5, 1, 1] / 1.125 = [1.777778, 0.444444, 0.888889, 0.888889]
    close(egpo_advantages(r, u, group_size=4, renorm=True), [1.539599, -0.384900, 0.769799, -0.769799])


def test_egpo_nsr_hand_example():
    # all-incorrect group [0, 0], U = [1, 3] (mean 2): w = [2, 0.666667] -> incorrect clip to [0.5, 1]
    # = [1, 0.666667]; A = nsr_value * w. The all-correct group [1, 1] stays 0.
    r, u = torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([1.0, 3.0, 1.0, 3.0])
    close(egpo_advantages(r, u, group_size=2), [-1.0, -0.666667, 0.0, 0.0])
    close(egpo_advantages(r, u, group_size=2, nsr_value=-0.5), [-0.5, -0.333333, 0.0, 0.0])


def test_nll_uncertainty_and_seq_mean_entropy_hand_example():
    # row 0: mean of -[-1, -2, -3] over the first two tokens = 1.5; row 1: all-zero mask -> 0
    logp = torch.tensor([[-1.0, -2.0, float("-inf")], [-5.0, -5.0, -5.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    close(nll_uncertainty(logp, mask), [1.5, 0.0])
    h = torch.tensor([[0.5, 1.5, float("nan")], [2.0, 2.0, 2.0]])
    close(seq_mean_entropy(h, mask.bool()), [1.0, 0.0])
    # a float mask weights the entries: (1 * 2 + 0.5 * 4) / max(1, 1.5) = 2.666667; (0.5 * 2) / max(1, 0.5) = 1
    x = torch.tensor([[2.0, 4.0], [2.0, 9.0]])
    close(masked_mean(x, torch.tensor([[1.0, 0.5], [0.5, 0.0]])), [2.666667, 1.0])
    close(masked_mean(x, torch.tensor([[1, 1], [0, 1]]), dim=0), [2.0, 6.5])


def test_prog_grpo_hand_example():
    # row 0: 5 tokens, ceil(0.2 * 5) = 1 lowest log p = -2.0 -> c = exp(-2) = 0.135335
    # row 1: the -100 is masked; 4 tokens, ceil(0.8) = 1 lowest = -0.6 -> c = exp(-0.6) = 0.548812
    # b = (0.135335 + 0.548812) / 2 = 0.342074; A~ = A + 0.3 * (b - c) = A +- 0.062022
    logp = torch.tensor([[-0.1, -2.0, -0.5, -1.0, -0.2], [-0.3, -0.4, -100.0, -0.1, -0.6]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 1, 1]])
    a = torch.tensor([0.707107, -0.707107])
    close(prog_grpo_advantages(a, logp, mask, torch.tensor([1.0, 0.0]), group_size=2), [0.769129, -0.769129])
    # an all-incorrect group keeps A
    close(prog_grpo_advantages(a, logp, mask, torch.tensor([0.0, 0.0]), group_size=2), [0.707107, -0.707107])
    # low_frac = 0.5 on row 0: ceil(2.5) = 3 lowest: (-2 - 1 - 0.5) / 3 = -1.166667 -> c = 0.311403;
    # row 1: ceil(2) = 2 lowest: (-0.6 - 0.4) / 2 = -0.5 -> c = 0.606531; b = 0.458967; shift = +-0.044269
    got = prog_grpo_advantages(a, logp, mask, torch.tensor([1.0, 0.0]), group_size=2, low_frac=0.5)
    close(got, [0.751376, -0.751376])
    # prompt baseline: c(q) = exp(mean of the lowest ceil(0.2 * 2) = 1 prompt log p) = exp(-1) = 0.367879
    # row 0: 0.707107 + 0.3 * (0.367879 - 0.135335) = 0.776870; row 1: -0.707107 + 0.3 * (0.367879 - 0.548812)
    p_logp, p_mask = torch.tensor([[-0.5, -1.0], [-1.0, -0.2]]), torch.ones(2, 2, dtype=torch.bool)
    got = prog_grpo_advantages(a, logp, mask, torch.tensor([1.0, 0.0]), group_size=2, baseline="prompt",
                               prompt_logp=p_logp, prompt_mask=p_mask)
    close(got, [0.776870, -0.761387])


def test_prog_grpo_ceil_is_exact():
    # 0.28 * 25 = 7.000000000000001 in floating point; T_low must still hold 7 positions, not 8.
    # Row 0: seven log p of -1 and eighteen of 0 -> c = exp(-1) = 0.367879 (8 positions would give exp(-7/8)).
    # Row 1: all 0 -> c = 1. b = (0.367879 + 1) / 2 = 0.683940; shifts (alpha = 1) = b - c = +-0.316060.
    logp = torch.tensor([[-1.0] * 7 + [0.0] * 18, [0.0] * 25])
    out = prog_grpo_advantages(torch.zeros(2), logp, torch.ones(2, 25), torch.tensor([1.0, 0.0]), group_size=2,
                               alpha=1.0, low_frac=0.28)
    close(out, [0.316060, -0.316060])


def test_ep_grpo_hand_example():
    # group 0 (rewards [1, 0], varying): A = [1, -1], H rows [1, 3, .] and [2, 2, .] (mean 2 each):
    # gates [0.5, 1.5] and [1, 1] -> [0.5, 1.5] and [-1, -1]
    # group 1 (rewards [1, 1], zero variance, sigma = +1), K = 2 buckets:
    # row 2 H = [1, 1, 2]: progress [0.25, 0.5, 1] -> buckets [0, 1, 1]; row 3 H = [3, 1, masked]:
    # progress [0.75, 1] -> buckets [1, 1]. Bucket 0 = {1}: one token -> 0. Bucket 1 = {1, 2, 3, 1}: mean 1.75,
    # population var = (0.5625 + 0.0625 + 1.5625 + 0.5625) / 4 = 0.6875, std 0.829156;
    # signal 0.1 * (1.75 - H) / 0.829156 -> H=1: 0.090453, H=2: -0.030151, H=3: -0.150755.
    h = torch.tensor([[1.0, 3.0, 9.0], [2.0, 2.0, 9.0], [1.0, 1.0, 2.0], [3.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 0]])
    a = torch.tensor([1.0, -1.0, 0.0, 0.0])
    out = ep_grpo_token_advantages(a, h, mask, torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2, num_buckets=2)
    expected = [[0.5, 1.5, 0.0], [-1.0, -1.0, 0.0], [0.0, 0.090453, -0.030151], [-0.150755, 0.090453, 0.0]]
    close(out, expected)
    # an all-incorrect group flips the sign (sigma = -1)
    out = ep_grpo_token_advantages(a, h, mask, torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=2, num_buckets=2)
    close(out[2:], [[0.0, -0.090453, 0.030151], [0.150755, -0.090453, 0.0]])
    # the gate clips: H = [0.1, 3.9] (mean 2) -> ratios [0.05, 1.95] -> gates [0.5, 1.95]
    out = ep_grpo_token_advantages(torch.tensor([2.0, -2.0]), torch.tensor([[0.1, 3.9], [1.0, 1.0]]),
                                   torch.ones(2, 2), torch.tensor([1.0, 0.0]), group_size=2)
    close(out, [[1.0, 3.9], [-2.0, -2.0]])


def test_metrics_hand_example():
    # groups [1, -1] (population var 1) and [2, 2] (var 0) -> mean 0.5
    close(group_advantage_variance(torch.tensor([1.0, -1.0, 2.0, 2.0]), group_size=2), 0.5)
    # groups [0, 0], [1, -1], [1e-9, 0]: the first and last are all ~0 -> 2/3
    a = torch.tensor([0.0, 0.0, 1.0, -1.0, 1e-9, 0.0])
    close(zero_advantage_group_fraction(a, group_size=2), 0.666667)
    close(zero_advantage_group_fraction(a, group_size=2, atol=0.0), 0.333333)


# ----------------------------------------------------------------------------------------------------------
# edge cases


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_group_of_one_and_constant_rewards_give_exact_zeros(scale):
    r = torch.tensor([1.0, 0.1, 0.1, 0.1, 0.7])  # 0.1 * 3 does not round-trip through a float32 mean exactly
    out = grpo_advantages(r, group_ids=torch.tensor([5, 2, 2, 2, 9]), scale=scale)
    assert torch.equal(out, torch.zeros(5))
    out = grpo_advantages(torch.tensor([3.0]), group_size=1, scale=scale, eps=0.0)
    assert torch.equal(out, torch.zeros(1))


def test_dtypes():
    assert grpo_advantages(torch.tensor([1, 0, 1, 1]), group_size=2).dtype == torch.float32
    assert grpo_advantages(torch.tensor([True, False]), group_size=2).dtype == torch.float32
    assert grpo_advantages(torch.tensor([1.0, 0.0], dtype=torch.bfloat16), group_size=2).dtype == torch.float32
    assert grpo_advantages(torch.tensor([1.0, 0.0], dtype=F64), group_size=2).dtype == F64


def test_eda_zero_groups_stay_zero_and_zero_entropy_is_finite():
    a = torch.tensor([0.0, 0.0, 1.0, -1.0, 1.0, -1.0])
    # group 0: A all 0 stays 0; group 1: P all 0 (e.g. all-masked rows) -> scale 1, not 0 / eps;
    # group 2: one P = 0 next to P = 2 -> scale 1 / 1e-6, huge but finite (clamp= bounds it)
    p = torch.tensor([0.5, 2.0, 0.0, 0.0, 0.0, 2.0])
    out = eda_advantages(a, p, group_size=2)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:2], torch.zeros(2))
    close(out[2:4], [1.0, -1.0])
    close(eda_advantages(a, p, group_size=2, clamp=(0.5, 2.0))[4:], [2.0, -0.5])
    # slightly negative entropies (kernel round-off) count as 0
    assert torch.isfinite(eda_advantages(a, -1e-7 * torch.ones(6), group_size=2)).all()


def test_edge_cases_are_finite():
    # group of one: incorrect -> NSR, w = U / (U + eps) ~ 1; correct -> 0
    close(egpo_advantages(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 2.0]), group_size=1), [-1.0, 0.0])
    # all-zero uncertainty in a group: weights 1
    close(egpo_advantages(torch.tensor([0.0, 0.0]), torch.zeros(2), group_size=2), [-1.0, -1.0])
    # non-binary all-correct group keeps its base advantage; threshold moves what "correct" means
    r = torch.tensor([1.0, 0.5])
    close(egpo_advantages(r, torch.ones(2), group_size=2), [0.707106, -0.707106])
    close(egpo_advantages(r, torch.ones(2), group_size=2, correct_threshold=1.0), [-1.0, -1.0])
    # rows with an all-zero mask: ProGRPO keeps A, EP-GRPO gives zeros, never NaN
    logp = torch.tensor([[-1.0, -2.0], [float("-inf"), float("nan")]])
    mask = torch.tensor([[1, 1], [0, 0]])
    close(prog_grpo_advantages(torch.tensor([0.5, -0.5]), logp, mask, torch.tensor([1.0, 0.0]), group_size=2),
          [0.5, -0.5])
    for rewards in ([1.0, 0.0], [1.0, 1.0]):
        out = ep_grpo_token_advantages(torch.tensor([0.5, -0.5]), torch.tensor([[1.0, 2.0], [float("nan"), 1.0]]),
                                       mask, torch.tensor(rewards), group_size=2)
        assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros(2))


def test_token_level_advantages():
    a = torch.tensor([[1.0, 2.0, 3.0], [-1.0, -1.0, 0.0]])
    close(eda_advantages(a, torch.tensor([1.0, 3.0]), group_size=2), [[2.0, 4.0, 6.0], [-0.666667, -0.666667, 0.0]])
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    out = prog_grpo_advantages(a, logp, torch.ones(2, 3), torch.tensor([1.0, 0.0]), group_size=2, alpha=1.0)
    # c = [exp(-1), exp(-2)] = [0.367879, 0.135335]; b = 0.251607; shifts [-0.116272, +0.116272]
    close(out, [[0.883728, 1.883728, 2.883728], [-0.883728, -0.883728, 0.116272]])
    # EP-GRPO gate on token-level advantages: H row 0 = [1, 1, 4] (mean 2) -> gates [0.5, 0.5, 2]
    out = ep_grpo_token_advantages(a, torch.tensor([[1.0, 1.0, 4.0], [1.0, 1.0, 1.0]]), torch.ones(2, 3),
                                   torch.tensor([1.0, 0.0]), group_size=2)
    close(out, [[0.5, 1.0, 6.0], [-1.0, -1.0, 0.0]])


# ----------------------------------------------------------------------------------------------------------
# property tests


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.data())
def test_grpo_properties(group_size, n_groups, data):
    # per-group sums are ~0 and adding a constant leaves the advantages unchanged (quarters: exact in binary)
    quarters = data.draw(st.lists(st.integers(0, 4), min_size=group_size * n_groups,
                                  max_size=group_size * n_groups))
    shift = data.draw(st.integers(-50, 50))
    r = torch.tensor(quarters, dtype=torch.float32) / 4
    for scale in ("group", "batch", "none"):
        a = grpo_advantages(r, group_size=group_size, scale=scale)
        assert torch.isfinite(a).all()
        assert a.view(n_groups, group_size).sum(1).abs().max() < 1e-5
        close(grpo_advantages(r + shift, group_size=group_size, scale=scale), a)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(0.0, 10.0)), min_size=3, max_size=3).map(list),
       st.floats(0.1, 1.0), st.floats(1.0, 3.0))
def test_egpo_asymmetric_weights_stay_in_bounds(rows, w_min, w_max):
    r = torch.tensor([float(c) for c, _ in rows] + [1.0, 0.0, 1.0], dtype=F64)
    u = torch.tensor([x for _, x in rows] + [0.5, 1.0, 2.0], dtype=F64)
    out = egpo_advantages(r, u, group_size=3, w_min=w_min, w_max=w_max)
    base = grpo_advantages(r, group_size=3).clone()
    base[:3] = base[:3] if bool(r[:3].any()) else -1.0
    keep = base != 0
    w = out[keep] / base[keep]
    correct = r[keep] > 0
    tol = 1e-9
    assert ((w[correct] >= 1 - tol) & (w[correct] <= w_max + tol)).all()
    assert ((w[~correct] >= w_min - tol) & (w[~correct] <= 1 + tol)).all()


# ----------------------------------------------------------------------------------------------------------
# input errors

R4 = torch.tensor([1.0, 0.0, 0.0, 1.0])
LOGP = -torch.ones(4, 3)
MASK = torch.ones(4, 3)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: grpo_advantages(torch.zeros(10), group_size=4), ValueError,
     r"rewards has 10 rows, not divisible by group_size=4"),
    (lambda: grpo_advantages(R4), ValueError, r"exactly one of group_size and group_ids"),
    (lambda: grpo_advantages(R4, group_size=2, group_ids=torch.zeros(4, dtype=torch.long)), ValueError,
     r"exactly one of group_size and group_ids"),
    (lambda: grpo_advantages(R4, group_size=0), ValueError, r"group_size must be >= 1"),
    (lambda: grpo_advantages(R4, group_size=2.0), TypeError, r"group_size must be an int"),
    (lambda: grpo_advantages(R4, group_size=True), TypeError, r"group_size must be an int"),
    (lambda: grpo_advantages(R4, group_ids=torch.zeros(3, dtype=torch.long)), ValueError, r"group_ids has shape"),
    (lambda: grpo_advantages(R4, group_ids=torch.zeros(4)), TypeError, r"group_ids must be an integer tensor"),
    (lambda: grpo_advantages(R4, group_ids=[0, 0, 1, 1]), TypeError, r"group_ids must be a torch.Tensor"),
    (lambda: grpo_advantages(torch.tensor([1.0, float("nan")]), group_size=2), ValueError, r"rewards contains NaN"),
    (lambda: grpo_advantages(torch.tensor([1.0, float("inf")]), group_size=2), ValueError, r"rewards contains Inf"),
    (lambda: grpo_advantages(torch.zeros(0), group_size=1), ValueError, r"rewards is empty"),
    (lambda: grpo_advantages([1.0, 0.0], group_size=2), TypeError, r"rewards must be a torch.Tensor"),
    (lambda: grpo_advantages(torch.zeros(2, 2), group_size=2), ValueError, r"rewards must be 1-D"),
    (lambda: grpo_advantages(R4, group_size=2, scale="std"), ValueError,
     r"scale must be one of \('group', 'batch', 'none'\)"),
    (lambda: grpo_advantages(R4, group_size=2, eps=-1.0), ValueError, r"eps must be >= 0"),
    (lambda: eda_advantages(torch.zeros(4, 2, 2), torch.ones(4), group_size=2), ValueError,
     r"advantages must be shaped \[B\] or \[B, T\]"),
    (lambda: eda_advantages(torch.zeros(()), torch.ones(4), group_size=2), ValueError, r"advantages must be shaped"),
    (lambda: eda_advantages(torch.zeros(0, 3), torch.ones(0), group_size=2), ValueError, r"advantages is empty"),
    (lambda: eda_advantages(R4, torch.ones(3), group_size=2), ValueError, r"seq_entropy has shape \(3,\)"),
    (lambda: eda_advantages(R4, torch.full((4,), float("nan")), group_size=2), ValueError,
     r"seq_entropy contains NaN"),
    (lambda: eda_advantages(R4, torch.ones(4), group_size=2, clamp=(2.0, 1.0)), ValueError, r"clamp must satisfy"),
    (lambda: eda_advantages(R4, torch.ones(4), group_size=2, clamp=0.5), TypeError, r"clamp must be a"),
    (lambda: eda_advantages(R4, torch.ones(4), group_size=2, eps=0.0), ValueError, r"eps must be > 0"),
    (lambda: egpo_advantages(R4, torch.ones(4), group_size=2, mode="clip"), ValueError,
     r"mode must be one of \('asymmetric', 'symmetric', 'lock_one'\)"),
    (lambda: egpo_advantages(R4, torch.ones(4), group_size=2, w_min=1.5), ValueError, r"w_min must be <= 1"),
    (lambda: egpo_advantages(R4, torch.ones(4), group_size=2, w_max=0.9), ValueError, r"w_max must be >= 1"),
    (lambda: egpo_advantages(R4, torch.ones(4), group_size=2, w_min=0.0), ValueError, r"w_min must be > 0"),
    (lambda: egpo_advantages(R4, torch.ones(4), group_size=2, mode="symmetric", w_min=2.0, w_max=1.5),
     ValueError, r"w_min \(2.0\) must be <= w_max"),
    (lambda: egpo_advantages(R4, torch.ones(4), group_size=2, nsr_value=0.0), ValueError, r"nsr_value must be < 0"),
    (lambda: egpo_advantages(R4, torch.ones(4), group_size=2, nsr_value=float("nan")), ValueError,
     r"nsr_value must be finite"),
    (lambda: egpo_advantages(R4, torch.ones(4), group_size=2, scale="z"), ValueError, r"scale must be one of"),
    (lambda: egpo_advantages(R4, torch.ones(5), group_size=2), ValueError, r"seq_uncertainty has shape"),
    (lambda: prog_grpo_advantages(R4, LOGP, torch.ones(4, 2), R4, group_size=2), ValueError,
     r"mask has shape \(4, 2\)"),
    (lambda: prog_grpo_advantages(R4, -torch.ones(4), MASK, R4, group_size=2), ValueError,
     r"token_logp must be 2-D"),
    (lambda: prog_grpo_advantages(R4, LOGP, MASK, R4[:3], group_size=2), ValueError, r"rewards has shape"),
    (lambda: prog_grpo_advantages(torch.zeros(4, 2), LOGP, MASK, R4, group_size=2), ValueError,
     r"advantages has shape \(4, 2\)"),
    (lambda: prog_grpo_advantages(R4, LOGP, MASK, R4, group_size=2, baseline="mean"), ValueError,
     r"baseline must be one of \('group', 'prompt'\)"),
    (lambda: prog_grpo_advantages(R4, LOGP, MASK, R4, group_size=2, baseline="prompt"), ValueError,
     r"baseline='prompt' needs prompt_logp and prompt_mask"),
    (lambda: prog_grpo_advantages(R4, LOGP, MASK, R4, group_size=2, baseline="prompt", prompt_logp=LOGP,
                                  prompt_mask=torch.ones(4, 2)), ValueError, r"prompt_mask has shape"),
    (lambda: prog_grpo_advantages(R4, LOGP, MASK, R4, group_size=2, low_frac=0.0), ValueError,
     r"low_frac must lie in \(0, 1\]"),
    (lambda: prog_grpo_advantages(R4, torch.full((4, 3), float("nan")), MASK, R4, group_size=2), ValueError,
     r"token_logp \(at unmasked positions\) contains NaN"),
    (lambda: ep_grpo_token_advantages(R4, LOGP.abs(), torch.ones(4, 4), R4, group_size=2), ValueError,
     r"mask has shape"),
    (lambda: ep_grpo_token_advantages(R4, LOGP.abs(), MASK, R4, group_size=2, g_min=3.0), ValueError,
     r"g_min and g_max"),
    (lambda: ep_grpo_token_advantages(R4, LOGP.abs(), MASK, R4, group_size=2, num_buckets=0), ValueError,
     r"num_buckets must be a positive int"),
    (lambda: ep_grpo_token_advantages(R4, LOGP.abs(), MASK, R4, group_size=3), ValueError,
     r"advantages has 4 rows, not divisible by group_size=3"),
    (lambda: group_advantage_variance(torch.zeros(4, 2), group_size=2), ValueError,
     r"advantages must be per-sequence \[B\]"),
    (lambda: zero_advantage_group_fraction(R4, group_size=2, atol=-1.0), ValueError, r"atol must be >= 0"),
    (lambda: masked_mean(torch.ones(2, 3), torch.ones(2, 2)), ValueError, r"mask has shape"),
    (lambda: seq_mean_entropy(torch.ones(2, 3), torch.ones(3, 3)), ValueError, r"mask has shape"),
    (lambda: nll_uncertainty(torch.ones(3), torch.ones(3)), ValueError, r"old_logp must be 2-D"),
])
def test_bad_inputs_raise(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
