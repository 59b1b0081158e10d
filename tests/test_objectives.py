"""Every policy objective, the off-policy mask, the bias-corrected KL and the rollout correction (docs/algorithms.md
sections 6 and 8) against a plain-Python float64 oracle, and through the fused loss.

The oracle below is written from the spec, one scalar at a time (no torch): its loss is compared with
``policy_loss`` in float64 to 1e-12, and its gradient, by central finite differences (step 1e-6, the
stop-gradient quantities held at the base point), to 1e-7 (the difference error is O(h^2) ~ 1e-12 times the
third derivative, far below that; round-off ~ 1e-16 / 1e-6 = 1e-10). The fused loss is compared with
``policy_loss`` on the explicit fp32 logits' log-probs to fp32 round-off (2e-5 relative, 2e-6 absolute).
"""

from __future__ import annotations

import math

import pytest
import torch

from edge_kernels.losses import fused_linear_policy_loss, policy_loss
from edge_kernels.losses.options import OBJECTIVES, PolicyLossOptions

B, T = 4, 5
LENGTHS = [5, 3, 1, 4]


def _batch(seed=0, token_adv=False):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).double()
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.1
    new = old + 0.35 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.3, -0.7, 0.4, -1.1], dtype=torch.float64)
    if token_adv:
        adv = adv[:, None] * (1 + 0.5 * torch.rand(B, T, generator=g, dtype=torch.float64))
    ref = new - 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mu = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    return new, old, adv, mask, ref, mu, ent


# ----------------------------------------------------------------------------------------------------------
# the oracle: the spec, one scalar at a time


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _rollout_w(o, old, mu, mask):
    """section 8: the rollout weight of each token (list of lists)."""
    w = [[1.0] * T for _ in range(B)]
    if o.rollout_is == "off":
        return w
    lo = -math.inf if o.rollout_is_min is None else o.rollout_is_min
    hi = math.inf if o.rollout_is_max is None else o.rollout_is_max
    for i in range(B):
        toks = [t for t in range(T) if mask[i][t]]
        seq = math.exp(sum(old[i][t] - mu[i][t] for t in toks))
        for t in toks:
            raw = seq if o.rollout_is.startswith("sequence") else math.exp(old[i][t] - mu[i][t])
            if o.rollout_is.endswith("truncate"):
                w[i][t] = min(max(raw, lo), hi)
            else:
                w[i][t] = raw if lo <= raw <= hi else 0.0
    return w


def _cov_tokens(l_sg, adv, mask):
    toks = [(i, t) for i in range(B) for t in range(T) if mask[i][t]]
    ma = sum(adv[i][t] for i, t in toks) / len(toks)
    ml = sum(l_sg[i][t] for i, t in toks) / len(toks)
    return {(i, t): (adv[i][t] - ma) * (l_sg[i][t] - ml) for i, t in toks}


def oracle(o: PolicyLossOptions, l, l_sg, old, adv, mask, ref=None, mu=None, ent=None):
    """The loss of section 6 (lists of lists; ``l_sg``: the log-probs where a stop-gradient reads them)."""
    n = [sum(mask[i]) for i in range(B)]
    lr = [[(l[i][t] - old[i][t]) if mask[i][t] else 0.0 for t in range(T)] for i in range(B)]
    lr_sg = [[(l_sg[i][t] - old[i][t]) if mask[i][t] else 0.0 for t in range(T)] for i in range(B)]
    seq_r = [math.exp(sum(lr[i]) / max(n[i], 1)) for i in range(B)]
    ratio = [[seq_r[i] if o.is_level == "sequence" else math.exp(lr[i][t]) for t in range(T)] for i in range(B)]
    ratio_sg = [[math.exp(sum(lr_sg[i]) / max(n[i], 1)) if o.is_level == "sequence" else math.exp(lr_sg[i][t])
                 for t in range(T)] for i in range(B)]
    w_is = _rollout_w(o, old, old if mu is None else mu, mask)
    cov = _cov_tokens(l_sg, adv, mask) if o.objective in ("clip_cov", "kl_cov") else {}
    picked = set()
    if o.objective == "kl_cov":
        k = max(1, int(len(cov) * o.cov_ratio))
        picked = set(sorted(cov, key=lambda it: -cov[it])[:k])
    L = [[0.0] * T for _ in range(B)]
    for i in range(B):
        lw = sum(lr_sg[i]) + sum(math.log(max(w_is[i][t], 1e-8)) for t in range(T) if mask[i][t])
        lw = min(max(lw, math.log(1e-8)), 20.0)
        for t in range(T):
            if not mask[i][t]:
                continue
            a, r = adv[i][t], ratio[i][t]
            if o.objective in ("clip", "luspo", "clip_cov"):
                lo, hi = 1 - o.clip_low, 1 + o.clip_high
                x = max(-a * r, -a * min(max(r, lo), hi))
                if o.dual_clip is not None and a < 0:
                    x = min(x, -a * o.dual_clip)
                if o.objective == "clip_cov":
                    r0 = ratio_sg[i][t]
                    clipped = -a * min(max(r0, lo), hi) > -a * r0
                    if not clipped and o.clip_cov_lb < cov[(i, t)] < o.clip_cov_ub:
                        x = 0.0  # the test's cov_ratio makes every candidate clipped
            elif o.objective == "cispo":
                x = -min(max(ratio_sg[i][t], 1 - o.clip_low), 1 + o.clip_high) * a * l[i][t]
            elif o.objective == "sapo":
                tau = o.sapo_tau_pos if a > 0 else o.sapo_tau_neg
                x = -_sig(tau * (r - 1)) * 4 / tau * a
            elif o.objective == "vespo":
                k, lam = (o.vespo_k_pos, o.vespo_lambda_pos) if a >= 0 else (o.vespo_k_neg, o.vespo_lambda_neg)
                w = math.exp(lw)
                x = -math.exp(lam) * w ** k * math.exp(-lam * w) * a * l[i][t]
            else:  # kl_cov
                x = -a * r + (o.kl_cov_coef * abs(lr[i][t]) if (i, t) in picked else 0.0)
            if o.objective != "vespo":
                x *= w_is[i][t]
            if o.off_policy_mask_threshold is not None and a < 0:
                src = old if mu is None else mu
                mkl = sum(src[i][s] - l_sg[i][s] for s in range(T) if mask[i][s]) / max(n[i], 1)
                x *= 0.0 if mkl > o.off_policy_mask_threshold else 1.0
            if o.kl_coef:
                d = l[i][t] - ref[i][t]
                kl = {"k1": d, "k2": d * d / 2, "k3": math.exp(-d) + d - 1}[o.kl_type]
                x += o.kl_coef * kl * (ratio[i][t] if o.kl_bias_correction else 1.0)
            if o.entropy_coef:
                x -= o.entropy_coef * ent[i][t]
            L[i][t] = x
    return _agg(o, L, mask, n)


def _agg(o, L, mask, n):
    rows = [i for i in range(B) if n[i] > 0]
    if o.agg == "token-mean":
        return sum(L[i][t] for i in range(B) for t in range(T)) / sum(n)
    if o.agg == "seq-mean-token-sum-norm":
        return sum(L[i][t] for i in range(B) for t in range(T)) / (B * (o.max_len or T))
    if o.agg == "seq-mean-token-sum":
        return sum(sum(L[i]) for i in rows) / len(rows)
    return sum(sum(L[i]) / n[i] for i in rows) / len(rows)


CASES = {
    "clip": dict(objective="clip", clip_high=0.28),
    "clip_dual": dict(objective="clip", dual_clip=2.0, agg="seq-mean-token-mean"),
    "gspo": dict(objective="clip", is_level="sequence", clip_low=0.05, clip_high=0.08),
    "cispo": dict(objective="cispo", clip_low=1.0, clip_high=0.15),
    "cispo_seq_norm": dict(objective="cispo", clip_low=0.1, clip_high=0.2, agg="seq-mean-token-sum-norm",
                           max_len=7),
    "sapo": dict(objective="sapo", agg="seq-mean-token-mean"),
    "sapo_seq": dict(objective="sapo", is_level="sequence", sapo_tau_pos=2.0, sapo_tau_neg=3.0),
    "luspo": dict(objective="luspo", is_level="sequence", clip_low=0.1, clip_high=0.1),
    "vespo": dict(objective="vespo"),
    "vespo_params": dict(objective="vespo", vespo_k_pos=1.0, vespo_lambda_pos=0.5, vespo_k_neg=0.5,
                         vespo_lambda_neg=4.0, agg="seq-mean-token-sum"),
    "clip_cov": dict(objective="clip_cov", cov_ratio=1.0, clip_cov_lb=-0.05, clip_cov_ub=0.3),
    "kl_cov": dict(objective="kl_cov", cov_ratio=0.25, kl_cov_coef=0.7),
    "opm": dict(objective="clip", off_policy_mask_threshold=0.02),
    "opm_rollout": dict(objective="sapo", off_policy_mask_threshold=0.05, rollout_is="token_truncate",
                        rollout_is_max=1.2),
    "kl_bias": dict(objective="clip", kl_coef=0.3, kl_type="k3", kl_bias_correction=True),
    "kl_bias_seq": dict(objective="clip", is_level="sequence", kl_coef=0.2, kl_type="k2", kl_bias_correction=True),
    "entropy": dict(objective="cispo", entropy_coef=0.05, kl_coef=0.1, kl_type="k1"),
    "is_token_truncate": dict(objective="clip", rollout_is="token_truncate", rollout_is_min=0.9, rollout_is_max=1.1),
    "is_token_mask": dict(objective="clip", rollout_is="token_mask", rollout_is_min=0.8, rollout_is_max=1.25),
    "is_seq_truncate": dict(objective="clip", rollout_is="sequence_truncate", rollout_is_max=1.3),
    "is_seq_mask": dict(objective="cispo", rollout_is="sequence_mask", rollout_is_min=0.7, rollout_is_max=1.4),
    "vespo_is": dict(objective="vespo", rollout_is="token_mask", rollout_is_min=0.8, rollout_is_max=1.25),
}


def _lists(x):
    return x.tolist() if x.dim() == 2 else [[v] * T for v in x.tolist()]


@pytest.mark.parametrize("token_adv", [False, True], ids=["seq_adv", "token_adv"])
@pytest.mark.parametrize("case", list(CASES))
def test_objective_matches_float64_oracle(case, token_adv):
    o = PolicyLossOptions(**CASES[case])
    new, old, adv, mask, ref, mu, ent = _batch(token_adv=token_adv)
    x = new.clone().requires_grad_(True)
    kw = dict(ref_logp=ref if o.kl_coef else None, rollout_logp=mu if o.rollout_is != "off" else None,
              entropy=ent if o.entropy_coef else None)
    loss, metrics = policy_loss(x, old, adv, mask, options=o, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    args = dict(old=old.tolist(), adv=_lists(adv), mask=mask.tolist(), ref=ref.tolist(),
                mu=mu.tolist() if o.rollout_is != "off" else None, ent=ent.tolist())
    l0 = new.tolist()
    expected = oracle(o, l0, l0, **args)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    h = 1e-6
    for i in range(B):
        for t in range(T):
            lp = [row[:] for row in l0]
            lm = [row[:] for row in l0]
            lp[i][t] += h
            lm[i][t] -= h
            fd = (oracle(o, lp, l0, **args) - oracle(o, lm, l0, **args)) / (2 * h)
            assert float(grad[i, t]) == pytest.approx(fd, abs=1e-7), (i, t)
    assert all(torch.isfinite(v) for v in metrics.values())


def test_masked_garbage_never_reaches_any_objective():
    new, old, adv, mask, ref, mu, ent = _batch()
    bad = new.clone()
    bad[mask == 0] = float("nan")
    bad_old = old.clone()
    bad_old[mask == 0] = float("inf")
    for case, kw in CASES.items():
        o = PolicyLossOptions(**kw)
        x = bad.clone().requires_grad_(True)
        extra = dict(ref_logp=ref if o.kl_coef else None, rollout_logp=mu if o.rollout_is != "off" else None,
                     entropy=ent if o.entropy_coef else None)
        loss, _ = policy_loss(x, bad_old, adv, mask, options=o, **extra)
        (g,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), case
        assert (g[mask == 0] == 0).all(), case


# ----------------------------------------------------------------------------------------------------------
# behaviour the oracle's cases do not pin down


def test_clip_cov_drops_exactly_the_requested_count_among_candidates():
    new, old, adv, mask, *_ = _batch()
    o = PolicyLossOptions(objective="clip_cov", cov_ratio=1 / 13, clip_cov_lb=-10.0, clip_cov_ub=10.0)
    n_valid = int(mask.sum())  # 13: int(13 / 13) = 1 token
    base = PolicyLossOptions(objective="clip")
    x = new.clone().requires_grad_(True)
    loss, m = policy_loss(x, old, adv, mask, options=o)
    (g,) = torch.autograd.grad(loss, x)
    (g0,) = torch.autograd.grad(policy_loss(x, old, adv, mask, options=base)[0], x)
    changed = (g != g0) & (mask != 0)
    assert int(changed.sum()) == 1 and (g[changed] == 0).all()
    assert float(m["cov_frac"]) == pytest.approx(1 / n_valid)


def test_rollout_correction_metrics():
    new, old, adv, mask, ref, mu, ent = _batch()
    o = PolicyLossOptions(rollout_is="token_mask", rollout_is_min=0.8, rollout_is_max=1.25)
    _, m = policy_loss(new, old, adv, mask, rollout_logp=mu, options=o)
    v = mask != 0
    raw = torch.exp(old - mu)[v]
    out = (raw < 0.8) | (raw > 1.25)
    w = torch.where(out, torch.zeros_like(raw), raw)
    assert float(m["rollout_is_masked_frac"]) == pytest.approx(float(out.double().mean()))
    assert float(m["rollout_is_weight_mean"]) == pytest.approx(float(w.mean()))
    assert float(m["rollout_is_ess"]) == pytest.approx(float(w.mean() ** 2 / (w ** 2).mean()))
    assert 0 < float(m["rollout_is_masked_frac"]) < 1  # the batch exercises the mask
    # tokens the engine did not sample (NaN) get weight 1
    mu_nan = mu.clone()
    mu_nan[0] = float("nan")
    o_t = PolicyLossOptions(rollout_is="token_truncate", rollout_is_max=1.0001)
    l1, _ = policy_loss(new, old, adv, mask, rollout_logp=mu_nan, options=o_t)
    mu_same = mu.clone()
    mu_same[0] = old[0]
    l2, _ = policy_loss(new, old, adv, mask, rollout_logp=mu_same, options=o_t)
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-15)


def test_off_policy_mask_keeps_positive_advantages_and_reports_the_dropped_rows():
    new, old, adv, mask, *_ = _batch()
    o = PolicyLossOptions(off_policy_mask_threshold=1e-9)
    _, m = policy_loss(new, old, adv, mask, options=o)
    mean_kl = ((old - new) * mask).sum(-1) / mask.sum(-1)
    dropped = (adv < 0) & (mean_kl > 1e-9)
    assert float(m["off_policy_mask_frac"]) == pytest.approx(float(dropped.double().mean()))


# ----------------------------------------------------------------------------------------------------------
# the options object: validated once, every inapplicable option named


@pytest.mark.parametrize("kw,match", [
    (dict(objective="nope"), "objective must be one of"),
    (dict(objective="luspo"), "is_level='token' does not apply to objective='luspo'"),
    (dict(objective="vespo", is_level="sequence"), "is_level='sequence' does not apply to objective='vespo'"),
    (dict(objective="clip_cov", is_level="sequence"), "is_level"),
    (dict(objective="luspo", is_level="sequence", agg="token-mean"), "agg='token-mean' does not apply"),
    (dict(objective="sapo", clip_high=0.28), "clip_high does not apply to objective='sapo'"),
    (dict(objective="cispo", dual_clip=3.0), "dual_clip does not apply"),
    (dict(sapo_tau_pos=1.0), "sapo_tau_pos does not apply to objective='clip'"),
    (dict(objective="vespo", vespo_lambda_pos=0.0), "vespo_lambda_pos must be > 0"),
    (dict(objective="kl_cov", cov_ratio=2.0), "cov_ratio must lie in"),
    (dict(objective="clip_cov", clip_cov_lb=3.0, clip_cov_ub=2.0), "clip_cov_lb must be < clip_cov_ub"),
    (dict(kl_cov_coef=0.1), "kl_cov_coef does not apply"),
    (dict(max_len=4), "max_len applies only to agg='seq-mean-token-sum-norm'"),
    (dict(eda_eps=1e-3), "eda_eps applies only with eda='current'"),
    (dict(eda_clamp=(0.5, 2.0)), "eda_clamp applies only with eda='current'"),
    (dict(eda="current", eda_clamp=(2.0, 0.5)), "eda_clamp must be"),
    (dict(kl_bias_correction=True), "kl_bias_correction needs kl_coef != 0"),
    (dict(rollout_is_max=2.0), "rollout_is_max applies only with rollout_is != 'off'"),
    (dict(rollout_is="token_truncate"), "needs rollout_is_max"),
    (dict(rollout_is="sequence_mask"), "needs rollout_is_min or rollout_is_max"),
    (dict(rollout_is="token_mask", rollout_is_min=1.5, rollout_is_max=2.0), "rollout_is_min must be <= 1"),
    (dict(rollout_is="token_truncate", rollout_is_max=0.5), "rollout_is_max must be >= 1"),
    (dict(objective="vespo", rollout_is="sequence_truncate", rollout_is_max=2.0),
     "does not apply to objective='vespo'"),
    (dict(off_policy_mask_threshold=0.0), "off_policy_mask_threshold must be > 0"),
    (dict(dual_clip=1.0), "dual_clip must be > 1.0"),
    (dict(clip_low=-0.1), "clip_low must be >= 0.0"),
    (dict(top_entropy_quantile=0.0), "top_entropy_quantile must lie in"),
])
def test_options_refuse_naming_the_option(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PolicyLossOptions(**kw)


def test_options_resolve_defaults_and_replace_reresolves():
    o = PolicyLossOptions()
    assert (o.clip_low, o.clip_high, o.agg) == (0.2, 0.2, "token-mean")
    s = o.replace(objective="sapo")
    assert (s.clip_low, s.sapo_tau_pos, s.sapo_tau_neg) == (None, 1.0, 1.05)
    lu = o.replace(objective="luspo", is_level="sequence")
    assert lu.agg == "seq-mean-token-sum"
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        o.objective = "sapo"  # type: ignore[misc]
    new, old, adv, mask, *_ = _batch()
    with pytest.raises(ValueError, match="needs rollout_logp"):
        policy_loss(new, old, adv, mask, rollout_is="token_truncate", rollout_is_max=2.0)
    with pytest.raises(TypeError, match="options must be a PolicyLossOptions"):
        policy_loss(new, old, adv, mask, options={"objective": "sapo"})
    # keyword overrides apply on top of an options object
    a, _ = policy_loss(new, old, adv, mask, options=PolicyLossOptions(objective="cispo"), clip_high=0.05)
    b, _ = policy_loss(new, old, adv, mask, options=PolicyLossOptions(objective="cispo", clip_high=0.05))
    assert float(a) == float(b)


def test_every_objective_has_a_case():
    assert {PolicyLossOptions(**kw).objective for kw in CASES.values()} == set(OBJECTIVES)


# ----------------------------------------------------------------------------------------------------------
# through the fused loss


V, D = 37, 12


def _fused_inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g)
    weight = torch.randn(V, D, generator=g) * 0.6
    targets = torch.randint(0, V, (B, T), generator=g)
    new, old, adv, mask, ref, mu, ent = _batch(seed)
    with torch.no_grad():
        lp = torch.log_softmax((hidden @ weight.t()) / 0.8, -1).gather(-1, targets[..., None])[..., 0]
    g2 = torch.Generator().manual_seed(seed + 1)
    old = (lp + 0.3 * torch.randn(B, T, generator=g2)).float()
    mu = (old + 0.2 * torch.randn(B, T, generator=g2)).float()
    return hidden, weight, targets, adv.float(), mask.float(), old, (lp - 0.1).float(), mu


# in_forward applies to token-local options only (the others: test_in_forward_refusals_and_auto_choice)
FUSED_CASES = [(c, "recompute") for c in CASES] + [
    (c, "in_forward") for c in CASES if PolicyLossOptions(**CASES[c]).token_local]


@pytest.mark.parametrize("case,gradient", FUSED_CASES)
def test_fused_matches_policy_loss_on_explicit_logits(case, gradient):
    o = PolicyLossOptions(**CASES[case])
    hidden, weight, targets, adv, mask, old, ref, mu = _fused_inputs()
    kw = dict(ref_logp=ref if o.kl_coef else None, rollout_logp=mu if o.rollout_is != "off" else None)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    torch.manual_seed(5)  # clip_cov's draw
    loss, m = fused_linear_policy_loss(h1, w1, targets, adv, mask, old_logp=old, temperature=0.8, options=o,
                                       impl="torch", gradient=gradient, **kw)
    loss.backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    z = (h2 @ w2.t()) / 0.8
    logp = torch.log_softmax(z, -1)
    lp = logp.gather(-1, targets[..., None])[..., 0]
    ent = -(logp.exp() * logp).sum(-1)
    torch.manual_seed(5)
    loss2, m2 = policy_loss(lp, old, adv, mask, entropy=ent if o.entropy_coef else ent.detach(), options=o, **kw)
    loss2.backward()
    torch.testing.assert_close(loss, loss2, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=2e-5, atol=2e-6)
    for k in m2:
        torch.testing.assert_close(m[k], m2[k], rtol=2e-5, atol=2e-6, msg=k)


def test_in_forward_refusals_and_auto_choice(monkeypatch):
    import edge_kernels.losses.fused as losses_module

    hidden, weight, targets, adv, mask, old, ref, mu = _fused_inputs()
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    for kw, why in [(dict(is_level="sequence"), "depends on other tokens"),
                    (dict(objective="vespo"), "depends on other tokens"),
                    (dict(off_policy_mask_threshold=0.1), "depends on other tokens"),
                    (dict(chunk_size=V - 1), "asks for vocabulary chunks"),
                    (dict(impl="triton"), "not the PyTorch backend")]:
        with pytest.raises(ValueError, match=f"gradient='in_forward' does not apply: .*{why}"):
            fused_linear_policy_loss(h, w, targets, adv, mask, old_logp=old, gradient="in_forward", **kw)
    with pytest.raises(ValueError, match="gradient must be one of"):
        fused_linear_policy_loss(h, w, targets, adv, mask, gradient="three")
    taken = []
    real = losses_module.fused_policy_loss_three_matmul
    monkeypatch.setattr(losses_module, "fused_policy_loss_three_matmul", lambda *a: taken.append(1) or real(*a))
    fused_linear_policy_loss(h, w, targets, adv, mask, old_logp=old)  # auto on the CPU: in the forward
    fused_linear_policy_loss(h, w, targets, adv, mask, old_logp=old, gradient="recompute")
    fused_linear_policy_loss(h, w, targets, adv, mask, old_logp=old, objective="sapo")
    assert taken == [1, 1]
