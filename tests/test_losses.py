"""Tests of edge_kernels.losses (docs/algorithms.md section 6, section 2 for EDA "current").

The oracle here is deliberately plain: a float64 loop over rows and tokens that spells out the per-token loss
and each aggregation. Tolerances: the library computes in fp32 (as in training) on fp32 inputs, the oracle in
float64 on the same values upcast, so the expected disagreement is fp32 round-off, ~1e-6 relative per
operation; 1e-5 relative (plus a tiny absolute floor for values near 0) leaves a margin without hiding a
wrong formula (any formula error here shows up at the 1e-2 level or worse).
"""

from __future__ import annotations

import math

import pytest
import torch

from edge_kernels.losses import AGG_MODES, aggregate, fused_linear_policy_loss, policy_loss
from edge_kernels import backends

RTOL, ATOL = 1e-5, 1e-6


# ----------------------------------------------------------------------------------------------------------
# float64 oracle


def oracle_policy_loss(logp, old_logp, adv, mask, *, entropy=None, ref_logp=None, clip_low=0.2, clip_high=0.2,
                       dual_clip=None, is_level="token", kl_coef=0.0, kl_type="k1", entropy_coef=0.0,
                       top_entropy_quantile=1.0, agg="token-mean", max_len=None):
    """Float64, one token at a time. ``logp``/``entropy`` may require grad (float64 leaves)."""
    B, T = logp.shape
    old = logp.detach() if old_logp is None else old_logp.double()
    a_tok = adv.double()[:, None].expand(B, T) if adv.dim() == 1 else adv.double()
    valid = [[bool(mask[i, t] != 0) for t in range(T)] for i in range(B)]

    keep = [row[:] for row in valid]
    if top_entropy_quantile < 1.0:
        values = torch.stack([entropy[i, t].detach() for i in range(B) for t in range(T) if valid[i][t]])
        thr = torch.quantile(values.double(), 1.0 - top_entropy_quantile).item()
        keep = [[valid[i][t] and entropy[i, t].item() >= thr for t in range(T)] for i in range(B)]

    losses = {}  # (i, t) -> 0-d tensor, kept tokens only
    for i in range(B):
        n_i = sum(valid[i])
        seq_ratio = None
        if is_level == "sequence":
            s = sum((logp[i, t] - old[i, t] for t in range(T) if valid[i][t]), torch.zeros((), dtype=torch.float64))
            seq_ratio = torch.exp(s / max(1, n_i))
        for t in range(T):
            if not keep[i][t]:
                continue
            ratio = seq_ratio if seq_ratio is not None else torch.exp(logp[i, t] - old[i, t])
            a = a_tok[i, t]
            clipped_ratio = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
            loss = -torch.minimum(ratio * a, clipped_ratio * a)
            if dual_clip is not None and a < 0:
                loss = torch.minimum(loss, dual_clip * (-a))
            if kl_coef:
                d = logp[i, t] - ref_logp[i, t].double()
                if kl_type == "k1":
                    kl = d
                elif kl_type == "k2":
                    kl = d * d / 2
                else:
                    kl = torch.exp(-d) - (-d) - 1
                loss = loss + kl_coef * kl
            if entropy_coef:
                loss = loss - entropy_coef * entropy[i, t]
            losses[i, t] = loss

    zero = torch.zeros((), dtype=torch.float64)
    rows = [[losses[i, t] for t in range(T) if (i, t) in losses] for i in range(B)]
    if agg == "token-mean":
        n = sum(len(r) for r in rows)
        return sum((x for r in rows for x in r), zero) / max(n, 1)
    if agg == "seq-mean-token-sum-norm":
        return sum((x for r in rows for x in r), zero) / (B * (T if max_len is None else max_len))
    nonempty = [r for r in rows if r]  # verl: fully masked rows are left out of the row average
    if agg == "seq-mean-token-mean":
        per_row = [sum(r, zero) / len(r) for r in nonempty]
    else:  # seq-mean-token-sum
        per_row = [sum(r, zero) for r in nonempty]
    return sum(per_row, zero) / max(len(per_row), 1)


def make_batch(B=4, T=7, seed=0, empty_row=True):
    """fp32 inputs with clipped tokens on both sides, some ratios > 3 (dual clip), a partial and an empty row."""
    g = torch.Generator().manual_seed(seed)
    logp = -3.0 * torch.rand(B, T, generator=g)
    old = logp - 0.7 * torch.randn(B, T, generator=g)  # |log ratio| up to ~2: ratios from ~0.1 to ~8
    ref = logp + 0.5 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    adv[0], adv[1] = 1.3, -0.9  # both signs for sure
    old[1, 0] = logp[1, 0] - 1.5  # ratio e^1.5 > 3 on a negative advantage: the dual clip bites
    entropy = 2.0 * torch.rand(B, T, generator=g)
    mask = torch.ones(B, T)
    mask[1, T - 3:] = 0
    if empty_row:
        mask[2] = 0
    return logp, old, ref, adv, entropy, mask


def loss_and_grads(fn, logp, entropy, **kw):
    lp = logp.detach().clone().requires_grad_(True)
    h = entropy.detach().clone().requires_grad_(True)
    out = fn(lp, entropy=h, **kw)
    loss = out[0] if isinstance(out, tuple) else out
    g_lp, g_h = torch.autograd.grad(loss, (lp, h), allow_unused=True)
    zeros = torch.zeros_like(lp)
    return loss.detach(), (zeros if g_lp is None else g_lp), (zeros if g_h is None else g_h)


def check_against_oracle(**opts):
    logp, old, ref, adv, entropy, mask = make_batch(seed=opts.pop("seed", 0))
    old_logp = opts.pop("old", old)

    def ours(lp, entropy):
        return policy_loss(lp, old_logp, adv, mask, entropy=entropy, ref_logp=ref, **opts)

    def oracle(lp, entropy):
        return oracle_policy_loss(lp, old_logp, adv, mask, entropy=entropy, ref_logp=ref, **opts)

    l1, glp1, gh1 = loss_and_grads(ours, logp, entropy)
    l2, glp2, gh2 = loss_and_grads(oracle, logp.double(), entropy.double())
    assert l1.dtype == torch.float32
    torch.testing.assert_close(l1.double(), l2, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(glp1.double(), glp2, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(gh1.double(), gh2, rtol=RTOL, atol=ATOL)
    assert glp2.abs().sum() > 0  # the case exercises a gradient at all


# ----------------------------------------------------------------------------------------------------------
# policy_loss vs the oracle


def test_batch_exercises_every_branch():
    logp, old, ref, adv, entropy, mask = make_batch()
    _, m = policy_loss(logp, old, adv, mask, dual_clip=3.0)
    assert m["clip_frac_low"] > 0 and m["clip_frac_high"] > 0 and m["clip_frac_dual"] > 0


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("clip", [dict(), dict(clip_high=0.28), dict(dual_clip=3.0)], ids=["sym", "higher", "dual"])
def test_clipped_surrogate_every_agg(agg, clip):
    check_against_oracle(agg=agg, **clip)


def test_on_policy_and_max_len():
    check_against_oracle(old=None)
    check_against_oracle(agg="seq-mean-token-sum-norm", max_len=16)


@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_kl_to_reference(kl_type):
    check_against_oracle(kl_coef=0.05, kl_type=kl_type, dual_clip=3.0)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_sequence_level_ratio(agg):
    check_against_oracle(is_level="sequence", agg=agg)
    check_against_oracle(is_level="sequence", agg=agg, clip_low=3e-2, clip_high=4e-2)


def test_entropy_bonus():
    check_against_oracle(entropy_coef=0.01, kl_coef=0.1, kl_type="k3")


@pytest.mark.parametrize("rho", [0.2, 0.5])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_entropy_quantile_filter(rho, agg):
    check_against_oracle(top_entropy_quantile=rho, entropy_coef=0.01, agg=agg)


def test_entropy_quantile_keeps_the_top_fraction():
    logp, old, _, adv, entropy, mask = make_batch(B=8, T=10, empty_row=False)
    _, m = policy_loss(logp, old, adv, torch.ones(8, 10), entropy=entropy, top_entropy_quantile=0.2)
    # 80 distinct values: the 0.8 quantile sits between the 63rd and 64th smallest; 16 (= 20%) are kept
    assert m["keep_frac"].item() == pytest.approx(16 / 80)


def test_entropy_quantile_threshold_is_inclusive():
    # 6 masked tokens with H = 1..6: the 0.8 quantile is exactly 5 (position 0.8 * 5 = 4), and "at or above"
    # keeps H = 5 and 6; the masked-out token (H = 100) neither counts in the quantile nor is kept
    entropy = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 6.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    logp = torch.zeros(2, 4)
    _, m = policy_loss(logp, None, torch.ones(2), mask, entropy=entropy, top_entropy_quantile=0.2)
    assert m["keep_frac"].item() == pytest.approx(2 / 6)
    _, m = policy_loss(logp, None, torch.ones(2), mask, entropy=torch.zeros(2, 4), top_entropy_quantile=0.2)
    assert m["keep_frac"].item() == 1.0  # ties at the threshold are all kept


def test_token_level_advantages_and_float64():
    logp, old, ref, adv, entropy, mask = make_batch()
    adv_tok = adv[:, None] * (1 + torch.rand(4, 7))
    lp64 = logp.double().requires_grad_(True)
    loss, _ = policy_loss(lp64, old.double(), adv_tok.double(), mask, dual_clip=3.0)
    (g,) = torch.autograd.grad(loss, lp64)
    lp_o = logp.double().requires_grad_(True)
    expected = oracle_policy_loss(lp_o, old, adv_tok, mask, dual_clip=3.0)
    (g_o,) = torch.autograd.grad(expected, lp_o)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, g_o, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------------------
# a hand-computed example


def test_hand_computed_example():
    # log-ratios ln 1.5, ln 0.5 (row 0, A = +1) and 0, ln 4 (row 1, A = -1); eps = 0.2.
    # row 0: -min(1.5, 1.2) = -1.2 (upper clip active), -min(0.5, 0.8) = -0.5
    # row 1: -min(-1, -1) = 1, -min(-4, -1.2) = 4, with dual clip c = 3: min(4, 3) = 3
    old = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]])
    logp = old + torch.log(torch.tensor([[1.5, 0.5], [1.0, 4.0]]))
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2)
    lp = logp.clone().requires_grad_(True)
    loss, m = policy_loss(lp, old, adv, mask)
    loss.backward()
    assert loss.item() == pytest.approx(3.3 / 4, rel=1e-6)
    # dL/dl = -A rho / 4 where unclipped, 0 where clipped
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, -0.125], [0.25, 1.0]]))
    assert m["clip_frac_high"].item() == pytest.approx(0.25)
    assert m["clip_frac_low"].item() == 0.0
    assert m["ratio_mean"].item() == pytest.approx(1.75, rel=1e-6)
    # k3 of KL(old || current) under old samples: mean(r - 1 - ln r) over r = 1.5, 0.5, 1, 4
    # = ((0.5 - ln 1.5) + (-0.5 + ln 2) + 0 + (3 - ln 4)) / 4 = 0.4753470...
    k3 = ((0.5 - math.log(1.5)) + (-0.5 + math.log(2.0)) + 0.0 + (3.0 - math.log(4.0))) / 4
    assert k3 == pytest.approx(0.475347, abs=1e-6)
    assert m["approx_kl"].item() == pytest.approx(k3, rel=1e-5)
    assert m["adv_mean"].item() == 0.0
    assert m["adv_std"].item() == pytest.approx(math.sqrt(4 / 3), rel=1e-6)  # unbiased over 4 tokens

    lp = logp.clone().requires_grad_(True)
    loss, m = policy_loss(lp, old, adv, mask, dual_clip=3.0)
    loss.backward()
    assert loss.item() == pytest.approx(2.3 / 4, rel=1e-6)
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, -0.125], [0.25, 0.0]]))
    assert m["clip_frac_dual"].item() == pytest.approx(0.25)

    assert policy_loss(logp, old, adv, mask, agg="seq-mean-token-sum")[0].item() == pytest.approx(1.65, rel=1e-6)
    assert policy_loss(logp, old, adv, mask, agg="seq-mean-token-mean")[0].item() == pytest.approx(0.825, rel=1e-6)
    norm = policy_loss(logp, old, adv, mask, agg="seq-mean-token-sum-norm", max_len=4)[0]
    assert norm.item() == pytest.approx(3.3 / 8, rel=1e-6)


def test_aggregate_empty_rows_follow_verl():
    loss_mat = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert aggregate(loss_mat, mask, "token-mean").item() == pytest.approx(7 / 3)
    assert aggregate(loss_mat, mask, "seq-mean-token-mean").item() == pytest.approx((1.5 + 4) / 2)  # 2 non-empty
    assert aggregate(loss_mat, mask, "seq-mean-token-sum").item() == pytest.approx((3 + 4) / 2)
    assert aggregate(loss_mat, mask, "seq-mean-token-sum-norm").item() == pytest.approx(7 / (3 * 3))  # all B rows
    assert aggregate(loss_mat, torch.zeros_like(mask), "token-mean").item() == 0.0


# ----------------------------------------------------------------------------------------------------------
# robustness and metrics


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("is_level", ["token", "sequence"])
def test_masked_garbage_and_empty_rows_stay_finite(agg, is_level):
    logp, old, ref, adv, entropy, mask = make_batch()
    bad = mask == 0
    logp = logp.masked_fill(bad, float("-inf"))
    old = old.masked_fill(bad, float("nan"))
    ref = ref.masked_fill(bad, float("inf"))
    entropy = entropy.masked_fill(bad, float("nan"))
    lp = logp.clone().requires_grad_(True)
    h = entropy.clone().requires_grad_(True)
    loss, m = policy_loss(lp, old, adv, mask, entropy=h, ref_logp=ref, kl_coef=0.1, kl_type="k3",
                          entropy_coef=0.01, top_entropy_quantile=0.5, dual_clip=3.0, agg=agg, is_level=is_level)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(lp.grad).all() and (lp.grad[bad] == 0).all()
    assert torch.isfinite(h.grad).all() and (h.grad[bad] == 0).all()
    assert all(torch.isfinite(v) for v in m.values())
    for mode in AGG_MODES:  # a batch with no token at all: loss 0
        assert policy_loss(logp, old, adv, torch.zeros_like(mask), agg=mode)[0].item() == 0.0


def test_metrics_are_detached_scalars_and_group_metrics():
    from edge_kernels.advantage_formulas import group_advantage_variance

    logp, old, ref, adv, entropy, mask = make_batch()
    adv = torch.tensor([0.0, 0.0, 1.0, -1.0])
    lp = logp.clone().requires_grad_(True)
    _, m = policy_loss(lp, old, adv, mask, entropy=entropy.requires_grad_(True), ref_logp=ref, group_size=2)
    for k, v in m.items():
        assert v.dim() == 0 and not v.requires_grad, k
    assert m["zero_adv_group_frac"].item() == 0.5
    assert m["adv_group_var"].item() == pytest.approx(group_advantage_variance(adv, group_size=2).item())
    # groups (0, 0) and (1, -1): population variances 0 and 1 -> 0.5; batch-wide unbiased variance of
    # [0, 0, 1, -1] = (0 + 0 + 1 + 1) / 3
    assert m["adv_group_var"].item() == pytest.approx(0.5)
    assert m["adv_batch_var"].item() == pytest.approx(2 / 3)
    torch.testing.assert_close(m["entropy_mean"], (entropy * mask).sum() / mask.sum())
    _, m_ids = policy_loss(logp, old, adv, mask, group_ids=torch.tensor([7, 3, 7, 3]))
    assert m_ids["zero_adv_group_frac"].item() == 0.0  # groups {0, 2}, {1, 3} both nonzero
    _, m_tok = policy_loss(logp, old, adv[:, None].expand(4, 7), mask, group_size=2)
    assert "adv_group_var" not in m_tok  # group metrics need per-sequence advantages


# ----------------------------------------------------------------------------------------------------------
# fused_linear_policy_loss vs a float64 reference that materializes the logits

B, T, D, V = 3, 5, 40, 127
TEMP = 0.7


def make_fused_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g)
    weight = torch.randn(V, D, generator=g) / D ** 0.5 * 2
    bias = 0.3 * torch.randn(V, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, 3:] = 0
    mask[2, 4] = 0
    targets = torch.where(mask == 0, torch.full_like(targets, -7), targets)  # padding garbage must be ignored
    old = oracle_logp_entropy(hidden, weight, bias, targets.clamp(min=0))[0].float() \
        + 0.4 * torch.randn(B, T, generator=g)
    ref = old + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.tensor([1.0, -0.5, 0.8])
    return hidden, weight, bias, targets, mask, old, ref, adv


def oracle_logp_entropy(hidden, weight, bias, targets):
    logits = (hidden.double() @ weight.double().t() + bias.double()) / TEMP
    logsm = torch.log_softmax(logits, dim=-1)
    logp = logsm.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp, entropy


def oracle_fused(hidden, weight, bias, targets, adv, mask, *, eda="off", group_size=None, group_ids=None,
                 eda_eps=1e-6, **opts):
    logp, entropy = oracle_logp_entropy(hidden, weight, bias, targets)
    if eda == "current":
        ids = list(range(B)) if group_ids is None else group_ids.tolist()
        if group_size is not None:
            ids = [i // group_size for i in range(B)]
        p = [sum(entropy[i, t] for t in range(T) if mask[i, t]) / max(1, int(mask[i].sum())) for i in range(B)]
        scaled = []
        for i in range(B):
            members = [j for j in range(B) if ids[j] == ids[i]]
            group_mean = sum(p[j].detach() for j in members) / len(members)
            scaled.append(adv[i] * group_mean / (p[i] + eda_eps))
        adv = torch.stack(scaled)
    return oracle_policy_loss(logp, opts.pop("old_logp", None), adv, mask, entropy=entropy, **opts)


FUSED_CASES = {
    "clip": dict(old=True, dual_clip=3.0),
    "kl-entropy-seqmean": dict(old=True, ref=True, kl_coef=0.1, kl_type="k3", entropy_coef=0.02,
                               agg="seq-mean-token-mean"),
    "eda-current": dict(old=True, eda="current", group_size=1, entropy_coef=0.01, clip_high=0.28),
    "eda-ids-gspo-filter": dict(eda="current", group_ids=torch.tensor([4, 9, 4]), is_level="sequence",
                                top_entropy_quantile=0.5, agg="seq-mean-token-sum-norm"),
}


def run_fused_case(name, impl, device="cpu"):
    hidden, weight, bias, targets, mask, old, ref, adv = make_fused_inputs()
    opts = dict(FUSED_CASES[name])
    if opts.pop("old", False):
        opts["old_logp"] = old
    if opts.pop("ref", False):
        opts["ref_logp"] = ref
    dev = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in opts.items()}
    h = hidden.to(device).requires_grad_(True)
    w = weight.to(device).requires_grad_(True)
    loss, metrics = fused_linear_policy_loss(h, w, targets.to(device), adv.to(device), mask.to(device),
                                             bias=bias.to(device), temperature=TEMP, impl=impl, **dev)
    dh, dw = (g.cpu() for g in torch.autograd.grad(loss, (h, w)))
    loss = loss.cpu()

    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    expected = oracle_fused(h64, w64, bias, targets, adv, mask, **opts)
    dh64, dw64 = torch.autograd.grad(expected, (h64, w64))
    # fp32 logits/softmax (D = 40, V = 127) vs float64: ~1e-6 relative per value; norm-wise 1e-5 is ample
    torch.testing.assert_close(loss.double(), expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(dh.double(), dh64, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(dw.double(), dw64, rtol=RTOL, atol=ATOL)
    assert dh64.abs().sum() > 0 and (dh[mask == 0] == 0).all()
    return metrics


@pytest.mark.parametrize("name", list(FUSED_CASES))
def test_fused_torch(name):
    metrics = run_fused_case(name, "torch")
    assert "entropy_mean" in metrics
    if FUSED_CASES[name].get("eda") == "current":
        assert "eda_scale_mean" in metrics


@pytest.mark.parametrize("name", ["clip", "eda-current"])
def test_fused_triton(name, device):
    run_fused_case(name, "triton", device)  # CPU: Triton's interpreter (conftest), so tiny shapes only


def test_fused_backward_skips_entropy_gradient_unless_needed(monkeypatch):
    seen = []
    fwd, bwd = backends.REGISTRY[("linear_logprob_entropy", "torch")]

    def spy(*args):
        seen.append(args[7] is not None)  # grad_entropy
        return bwd(*args)

    monkeypatch.setitem(backends.REGISTRY, ("linear_logprob_entropy", "torch"), (fwd, spy))
    hidden, weight, bias, targets, mask, old, ref, adv = make_fused_inputs()
    for kw, needs in [(dict(), False), (dict(top_entropy_quantile=0.5), False), (dict(entropy_coef=0.01), True),
                      (dict(eda="current", group_size=3), True)]:
        h = hidden.clone().requires_grad_(True)
        # chunk_size < V keeps the four-matmul path (the three-matmul one never calls this backward)
        loss, _ = fused_linear_policy_loss(h, weight, targets, adv, mask, old_logp=old, impl="torch",
                                           chunk_size=V - 1, **kw)
        loss.backward()
        assert seen.pop() is needs, kw


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_three_matmul_path_matches_four_matmul_path(agg, dtype, monkeypatch):
    """Token-level ratios: the gradient formed in the forward (three matmuls) equals the chunked op's
    backward (four matmuls), for every aggregation, with KL, entropy bonus, dual clip and a bias."""
    seen = []
    fwd, bwd = backends.REGISTRY[("linear_logprob_entropy", "torch")]
    monkeypatch.setitem(backends.REGISTRY, ("linear_logprob_entropy", "torch"),
                        (fwd, lambda *a: seen.append(1) or bwd(*a)))
    hidden, weight, bias, targets, mask, old, ref, adv = make_fused_inputs()
    kw = dict(old_logp=old, ref_logp=ref, kl_coef=0.1, kl_type="k3", entropy_coef=0.02, dual_clip=3.0, agg=agg,
              bias=bias.to(dtype), temperature=TEMP, impl="torch")
    out = []
    for chunk_size in (None, V - 1):  # None: three matmuls; V - 1: vocabulary chunks, four matmuls
        h, w = hidden.to(dtype).requires_grad_(True), weight.to(dtype).requires_grad_(True)
        loss, metrics = fused_linear_policy_loss(h, w, targets, adv, mask, chunk_size=chunk_size, **kw)
        out.append((loss, *torch.autograd.grad(2.5 * loss, (h, w)), metrics["entropy_mean"]))
    assert seen == [1]  # only the chunked run called the op's backward
    # both form fp32-exact logits and fp32 gradients; only the final rounding to bf16 may differ, by one ulp
    # (2^-8 to 2^-7 relative) where the two summation orders land on either side of a rounding boundary
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-6)
    for a, b in zip(*out):
        torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
def test_fused_three_matmul_path_with_softcap(agg):
    """A soft-cap that bites: the three-matmul path's chain rule through tanh equals the chunked op's."""
    hidden, weight, bias, targets, mask, old, ref, adv = make_fused_inputs()
    cap = 1.5
    raw = hidden @ weight.t() + bias
    assert raw.abs().max() > 2 * cap  # the cap changes the logits
    kw = dict(old_logp=old, entropy_coef=0.02, agg=agg, bias=bias, temperature=TEMP, impl="torch", softcap=cap)
    out = []
    for chunk_size in (None, V - 1):  # three matmuls, then four
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss, _ = fused_linear_policy_loss(h, w, targets, adv, mask, chunk_size=chunk_size, **kw)
        out.append((loss, *torch.autograd.grad(loss, (h, w))))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    uncapped, _ = fused_linear_policy_loss(hidden, weight, targets, adv, mask, **{**kw, "softcap": None})
    assert abs(uncapped.item() - out[0][0].item()) > 1e-4


def test_fused_three_matmul_not_taken_where_inexact(monkeypatch):
    import edge_kernels.losses.fused as losses_module

    taken = []
    real = losses_module.fused_policy_loss_three_matmul
    monkeypatch.setattr(losses_module, "fused_policy_loss_three_matmul", lambda *a: taken.append(1) or real(*a))
    hidden, weight, bias, targets, mask, old, ref, adv = make_fused_inputs()
    for kw in (dict(top_entropy_quantile=0.5), dict(eda="current", group_size=3), dict(is_level="sequence"),
               dict(chunk_size=V - 1)):
        h = hidden.clone().requires_grad_(True)
        fused_linear_policy_loss(h, weight, targets, adv, mask, old_logp=old, impl="torch", **kw)
    assert taken == []
    fused_linear_policy_loss(hidden.clone().requires_grad_(True), weight, targets, adv, mask, impl="torch")
    assert taken == [1]


# ----------------------------------------------------------------------------------------------------------
# bad inputs


def test_policy_loss_rejects_bad_inputs():
    logp, old, ref, adv, entropy, mask = make_batch()
    ok = dict(old_logp=old, advantages=adv, mask=mask)

    def call(**kw):
        args = {**ok, **kw}
        return policy_loss(logp, args.pop("old_logp"), args.pop("advantages"), args.pop("mask"), **args)

    with pytest.raises(ValueError, match="mask must have shape"):
        call(mask=mask[:, :-1])
    with pytest.raises(ValueError, match="advantages must have shape"):
        call(advantages=adv[:-1])
    with pytest.raises(ValueError, match="old_logp must have shape"):
        call(old_logp=old.T)
    with pytest.raises(ValueError, match="ref_logp must have shape"):
        call(ref_logp=ref[:1])
    with pytest.raises(ValueError, match="logp must have shape"):
        policy_loss(logp[0], None, adv, mask)
    with pytest.raises(ValueError, match="advantages contains NaN"):
        call(advantages=torch.tensor([1.0, float("nan"), 0.0, 0.0]))
    with pytest.raises(ValueError, match="agg must be one of"):
        call(agg="token_mean")
    with pytest.raises(ValueError, match="kl_type must be one of"):
        call(kl_type="k4")
    with pytest.raises(ValueError, match="is_level must be one of"):
        call(is_level="seq")
    with pytest.raises(ValueError, match="clip_low must be >= 0"):
        call(clip_low=-0.1)
    with pytest.raises(ValueError, match="clip_high must be >= 0"):
        call(clip_high=-0.1)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        call(dual_clip=1.0)
    with pytest.raises(ValueError, match="top_entropy_quantile must lie in"):
        call(top_entropy_quantile=0.0, entropy=entropy)
    with pytest.raises(ValueError, match="top_entropy_quantile must lie in"):
        call(top_entropy_quantile=1.5, entropy=entropy)
    with pytest.raises(ValueError, match="top_entropy_quantile < 1 needs entropy"):
        call(top_entropy_quantile=0.2)
    with pytest.raises(ValueError, match="entropy_coef != 0 needs entropy"):
        call(entropy_coef=0.01)
    with pytest.raises(ValueError, match="kl_coef != 0 needs ref_logp"):
        call(kl_coef=0.1)
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        call(max_len=0)
    with pytest.raises(ValueError, match="group_size"):
        call(group_size=3)
    with pytest.raises(TypeError):
        call(clip_ratio=0.2)


def test_fused_rejects_bad_inputs():
    hidden, weight, bias, targets, mask, old, ref, adv = make_fused_inputs()
    with pytest.raises(ValueError, match="hidden must have shape"):
        fused_linear_policy_loss(hidden[0], weight, targets, adv, mask)
    with pytest.raises(ValueError, match="targets must have shape"):
        fused_linear_policy_loss(hidden, weight, targets[:, :2], adv, mask)
    with pytest.raises(ValueError, match="mask must have shape"):
        fused_linear_policy_loss(hidden, weight, targets, adv, mask[:2])
    with pytest.raises(ValueError, match="eda must be one of"):
        fused_linear_policy_loss(hidden, weight, targets, adv, mask, eda="old")
    with pytest.raises(ValueError, match="needs per-sequence advantages"):
        fused_linear_policy_loss(hidden, weight, targets, adv[:, None].expand(B, T), mask, eda="current",
                                 group_size=1)
    with pytest.raises(ValueError, match="needs group_size or group_ids"):
        fused_linear_policy_loss(hidden, weight, targets, adv, mask, eda="current")
    with pytest.raises(ValueError, match="impl must be one of"):
        fused_linear_policy_loss(hidden, weight, targets, adv, mask, impl="cudnn")
    with pytest.raises(ValueError, match="targets must lie in"):
        fused_linear_policy_loss(hidden, weight, torch.full_like(targets, V), adv, mask)
    with pytest.raises(TypeError, match="unexpected keyword"):
        fused_linear_policy_loss(hidden, weight, targets, adv, mask, cliprange=0.2)


# ----------------------------------------------------------------------------------------------------------
# cross-check with verl (optional dependency; its import takes several seconds)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # compute_policy_loss is verl's deprecated alias
def test_matches_verl_vanilla_policy_loss():
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    logp, old, ref, adv, entropy, mask = make_batch()  # row 2 fully masked
    adv_tok = adv[:, None].expand_as(logp)
    for agg in ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]:
        lp = logp.clone().requires_grad_(True)
        theirs, clipfrac, _, clipfrac_lower = core_algos.compute_policy_loss(
            old, lp, adv_tok, mask, cliprange=0.2, cliprange_low=0.2, cliprange_high=0.28, clip_ratio_c=3.0,
            loss_agg_mode=agg)
        (g_theirs,) = torch.autograd.grad(theirs, lp)
        lp = logp.clone().requires_grad_(True)
        ours, m = policy_loss(lp, old, adv, mask, clip_high=0.28, dual_clip=3.0, agg=agg)
        (g_ours,) = torch.autograd.grad(ours, lp)
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(g_ours, g_theirs)
        torch.testing.assert_close(m["clip_frac_low"] + m["clip_frac_high"], clipfrac)
        torch.testing.assert_close(m["clip_frac_dual"], clipfrac_lower)
    # seq-mean-token-sum-norm: equal when no row is fully masked (verl divides by the non-empty rows)
    full = torch.ones_like(mask)
    theirs = core_algos.agg_loss(logp * adv_tok, full, "seq-mean-token-sum-norm")
    torch.testing.assert_close(aggregate(logp * adv_tok, full, "seq-mean-token-sum-norm"), theirs)
    for kl_type in ["k1", "k2", "k3"]:
        theirs = core_algos.agg_loss(core_algos.kl_penalty(logp, ref, kl_type), mask, "token-mean")
        with_kl, _ = policy_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=1.0, kl_type=kl_type)
        torch.testing.assert_close(with_kl - policy_loss(logp, old, adv, mask)[0], theirs)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(FUSED_CASES))
def test_fused_gpu_bf16_against_float64(name):
    # bf16 inputs at an LLM-like vocabulary (Qwen2.5's V); the oracle runs in float64 on the same bf16 values.
    # Tolerances: loss 1e-4 relative (fp32 statistics); gradients ||err|| / ||ref|| <= 1.2e-2 (3 bf16 units:
    # the logits-gradient tile and the returned gradients are rounded to bf16, see tests/ops).
    b, t, d, v = 8, 64, 896, 151936
    g = torch.Generator().manual_seed(zlib_seed(name))
    hidden = (torch.randn(b, t, d, generator=g) * 2).to("cuda", torch.bfloat16)
    weight = (torch.randn(v, d, generator=g) / d ** 0.5).to("cuda", torch.bfloat16)
    targets = torch.randint(0, v, (b, t), generator=g).cuda()
    mask = (torch.rand(b, t, generator=g) > 0.1).float().cuda()
    old = -torch.rand(b, t, generator=g).cuda() * 3
    adv = torch.randn(b, generator=g).cuda()
    opts = {k: (val.cuda() if isinstance(val, torch.Tensor) else val) for k, val in FUSED_CASES[name].items()
            if k not in ("old", "ref", "group_size", "group_ids")}
    opts["group_size"] = 4 if "eda" in opts else None
    opts["old_logp"] = old
    if FUSED_CASES[name].get("ref"):
        opts["ref_logp"] = old + 0.1
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss, _ = fused_linear_policy_loss(h, w, targets, adv, mask, temperature=TEMP, impl="triton", **opts)
    dh, dw = torch.autograd.grad(loss, (h, w))

    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    logits = (h64 @ w64.t()) / TEMP
    logsm = torch.log_softmax(logits, -1)
    logp = logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    ref_opts = {k: val for k, val in opts.items() if k not in ("eda", "group_size")}
    if opts.get("eda") == "current":
        p = (ent * mask).sum(1) / mask.sum(1).clamp_min(1)
        group_mean = p.detach().view(-1, 4).mean(1).repeat_interleave(4)
        adv = adv.double() * group_mean / (p + 1e-6)
    expected = oracle_policy_loss(logp, ref_opts.pop("old_logp").double(), adv, mask, entropy=ent,
                                  **{k: (val.double() if isinstance(val, torch.Tensor) else val)
                                     for k, val in ref_opts.items()})
    dh64, dw64 = torch.autograd.grad(expected, (h64, w64))
    assert abs(loss.double().item() - expected.item()) <= 1e-4 * max(1.0, abs(expected.item()))
    for got, ref in ((dh, dh64), (dw, dw64)):
        assert ((got.double() - ref).norm() / ref.norm()).item() <= 1.2e-2


def zlib_seed(name):
    import zlib

    return zlib.crc32(name.encode())
