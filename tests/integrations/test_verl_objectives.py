"""The new ``edge_*`` policy losses against verl 0.9.1's own registered losses, and the rollout correction against
verl's ``compute_rollout_correction_weights``, on the same batch (real verl, CPU).

Tolerance: everything is fp32 on both sides, formed by the same operations in a different order (masked sums,
where vs multiply), so the loss and gradient agree to a few fp32 ulps; asserted at 1e-6 relative + 1e-7
absolute, as tests/integrations/test_verl.py does for ``vanilla``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("verl")

from verl.trainer.ppo import core_algos  # noqa: E402
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402
from verl.workers.config.actor import PolicyLossConfig  # noqa: E402

import edge_kernels.integrations.verl as ev  # noqa: E402
from edge_kernels.losses import policy_loss  # noqa: E402

AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def _config(mode: str, **gbi) -> ActorConfig:
    pl = PolicyLossConfig(loss_mode=mode, clip_cov_ratio=0.15, clip_cov_lb=-0.3, clip_cov_ub=0.6,
                          kl_cov_ratio=0.1, ppo_kl_coef=0.4)
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=0.2,
                      clip_ratio_high=0.28, tau_pos=1.5, tau_neg=2.5, policy_loss=pl)
    cfg.global_batch_info.update(gbi)
    return cfg


def _inputs(seed=0, B=6, T=9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 5, 2, 7, 4, 3])[:B]  # no fully masked row: verl's clip_cov needs none
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = -torch.rand(B, T, generator=g) * 3
    new = (old + 0.4 * torch.randn(B, T, generator=g)).requires_grad_(True)
    adv = (torch.randn(B, generator=g)[:, None].expand(B, T) * mask).contiguous()
    w = torch.rand(B, T, generator=g) * 2
    return old, new, adv, mask, w


@pytest.mark.parametrize("weights", [False, True], ids=["no_is", "rollout_is"])
@pytest.mark.parametrize("gbi", [{}, {"dp_size": 2, "batch_num_tokens": 61, "global_batch_size": 11}],
                         ids=["local", "global"])
# verl's sapo ignores loss_agg_mode (always seq-mean-token-mean); edge_sapo honours it: compared at that mode
@pytest.mark.parametrize("mode,agg", [(m, a) for m in ("cispo", "clip_cov", "kl_cov") for a in AGG_MODES]
                         + [("sapo", "seq-mean-token-mean")])
def test_edge_loss_matches_verl(mode, agg, gbi, weights):
    old, new, adv, mask, w = _inputs()
    cfg = _config(mode, **gbi)
    kw = dict(old_log_prob=old, log_prob=new, advantages=adv, response_mask=mask, loss_agg_mode=agg, config=cfg,
              rollout_is_weights=w if weights else None)
    torch.manual_seed(7)  # clip_cov draws its tokens from torch's global generator, as verl does
    l_ours, m_ours = core_algos.get_policy_loss_fn(f"edge_{mode}")(**kw)
    (g_ours,) = torch.autograd.grad(l_ours, new)
    torch.manual_seed(7)
    l_verl, m_verl = core_algos.get_policy_loss_fn(mode)(**kw)
    (g_verl,) = torch.autograd.grad(l_verl, new)
    torch.testing.assert_close(l_ours, l_verl, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_ours, g_verl, rtol=1e-6, atol=1e-7)
    if mode in ("cispo", "clip_cov"):
        assert m_ours["actor/pg_clipfrac"] == pytest.approx(m_verl["actor/pg_clipfrac"], rel=1e-6, abs=1e-7)
    if mode == "clip_cov":
        assert m_ours["actor/pg_clipfrac"] > 0  # the draw dropped tokens: the comparison saw the random path


def test_clip_cov_draw_differs_with_the_seed():
    """The comparison above is not vacuous: another draw changes verl's clip_cov, and ours with it."""
    old, new, adv, mask, _ = _inputs()
    cfg = _config("clip_cov")
    kw = dict(old_log_prob=old, log_prob=new, advantages=adv, response_mask=mask, config=cfg)
    grads = []
    for seed in (7, 8):
        torch.manual_seed(seed)
        (g,) = torch.autograd.grad(core_algos.get_policy_loss_fn("edge_clip_cov")(**kw)[0], new)
        grads.append(g)
    assert not torch.equal(grads[0], grads[1])


def test_luspo_refuses_another_aggregation_and_vespo_runs():
    old, new, adv, mask, w = _inputs()
    with pytest.raises(ValueError, match="loss_agg_mode='seq-mean-token-sum'"):
        core_algos.get_policy_loss_fn("edge_luspo")(old, new, adv, mask, loss_agg_mode="token-mean",
                                                   config=_config("gspo"))
    loss, _ = core_algos.get_policy_loss_fn("edge_luspo")(old, new, adv, mask, loss_agg_mode="seq-mean-token-sum",
                                                         config=_config("gspo"))
    ref, _ = policy_loss(new, old, adv, mask, objective="luspo", is_level="sequence", clip_low=0.2, clip_high=0.28)
    torch.testing.assert_close(loss, ref)
    loss, _ = core_algos.get_policy_loss_fn("edge_vespo")(old, new, adv, mask, config=_config("vanilla"),
                                                         rollout_is_weights=w)
    assert torch.isfinite(loss)
    assert set(ev.POLICY_LOSSES) == set(ev._LOSS_FNS)
    assert all(core_algos.get_policy_loss_fn(n) is ev._LOSS_FNS[n] for n in ev.POLICY_LOSSES)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("kind", ["truncate", "mask"])
def test_rollout_correction_matches_verl_weights(level, kind):
    """Ours (from the engine's log-probs) vs verl's ``compute_rollout_correction_weights`` (TIS for a single
    threshold, IcePop for ``"lower_upper"``) fed to the same loss: equal loss, gradient, mean weight and ESS."""
    old, new, adv, mask, _ = _inputs()
    g = torch.Generator().manual_seed(3)
    mu = old + (0.15 if level == "token" else 0.05) * torch.randn(old.shape, generator=g)
    if kind == "truncate":
        opts = dict(rollout_is=f"{level}_truncate", rollout_is_max=1.1)
        threshold = 1.1
    else:
        opts = dict(rollout_is=f"{level}_mask", rollout_is_min=0.9, rollout_is_max=1.15)
        threshold = "0.9_1.15"
    w_verl, m_verl = compute_rollout_correction_weights(old - mu, mask.float(), rollout_is=level,
                                                        rollout_is_threshold=threshold)
    l1, m1 = policy_loss(new, old, adv, mask, rollout_logp=mu, **opts)
    (g1,) = torch.autograd.grad(l1, new)
    l2, _ = policy_loss(new, old, adv, mask, rollout_is_weights=w_verl)
    (g2,) = torch.autograd.grad(l2, new)
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-7)
    assert float(m1["rollout_is_weight_mean"]) == pytest.approx(m_verl["rollout_is_mean"], rel=1e-5)
    assert float(m1["rollout_is_ess"]) == pytest.approx(m_verl["rollout_is_eff_sample_size"], rel=1e-5)
    frac = m1.get("rollout_is_clipped_frac", m1.get("rollout_is_masked_frac"))
    assert 0 < float(frac) < 1  # the batch exercises the bound
