"""edge_kernels.estimators: the one options object and dispatch (docs/algorithms.md sections 1, 2, 4, 5)."""

import pytest
import torch

from edge_kernels import advantage_formulas as A
from edge_kernels.estimators import (DEFAULTS, ESTIMATORS, EstimatorOptions, advantage_stats, compute_advantages,
                                     needed_inputs, option_help, options_from)

G = 4


def batch():
    g = torch.Generator().manual_seed(1)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    mask = torch.ones(8, 5, dtype=torch.bool)
    mask[2, 3:] = False
    mask[5] = False  # a row with no token left
    return rewards, mask, -torch.rand(8, 5, generator=g) * 3, torch.rand(8, 5, generator=g) + 0.1


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_dispatch_is_the_formula_with_the_options(estimator):
    rewards, mask, logp, ent = batch()
    o = EstimatorOptions(eda_clamp=(0.6, 1.7), egpo_mode="symmetric", egpo_renorm=True, prog_alpha=0.4,
                         ep_num_buckets=3, correct_threshold=0.5)
    est = compute_advantages(estimator, rewards, mask, group_size=G, old_logp=logp, entropy=ent, options=o)
    valid = mask.any(-1)
    base = A.grpo_advantages(rewards, group_size=G, scale="none" if estimator == "dr_grpo" else "group")
    expected = {
        "grpo": lambda: base,
        "dr_grpo": lambda: base,
        "eda": lambda: A.eda_advantages(base, A.seq_mean_entropy(ent, mask), group_size=G, clamp=(0.6, 1.7),
                                        valid=valid),
        "egpo": lambda: A.egpo_advantages(rewards, A.nll_uncertainty(logp, mask), group_size=G, mode="symmetric",
                                          renorm=True, correct_threshold=0.5, valid=valid),
        "prog_grpo": lambda: A.prog_grpo_advantages(base, logp, mask, rewards, group_size=G, alpha=0.4,
                                                    correct_threshold=0.5),
        "ep_grpo": lambda: A.ep_grpo_token_advantages(base, ent, mask, rewards, group_size=G, num_buckets=3,
                                                      correct_threshold=0.5),
    }[estimator]()
    torch.testing.assert_close(est.advantages, expected, rtol=0, atol=0)
    torch.testing.assert_close(est.base, base, rtol=0, atol=0)
    assert not est.rescale_in_loss
    stats = advantage_stats(est.advantages, mask, group_size=G)
    assert set(stats) == {"adv_group_var", "zero_adv_group_frac"}


def test_eda_current_hands_the_base_to_the_loss():
    rewards, mask, logp, ent = batch()
    est = compute_advantages("eda", rewards, mask, group_size=G, entropy=ent,
                             options=EstimatorOptions(eda_entropy_source="current"))
    assert est.rescale_in_loss and {"seq_entropy_mean", "eda_scale_mean"} <= set(est.stats)
    torch.testing.assert_close(est.base, A.grpo_advantages(rewards, group_size=G))


def test_eda_scale_is_the_one_scale():
    p = torch.tensor([1.0, 2.0, 0.0, 4.0], requires_grad=True)
    valid = torch.tensor([True, True, False, True])
    s = A.eda_scale(p, group_size=4, valid=valid, clamp=(0.5, 1.2))
    mean = (1.0 + 2.0 + 4.0) / 3
    expected = torch.tensor([mean / (1 + 1e-6), mean / (2 + 1e-6), 1.0, mean / (4 + 1e-6)]).clamp(0.5, 1.2)
    expected[2] = 1.0
    torch.testing.assert_close(s.detach(), expected)
    s[1].backward()  # gradient through 1 / P_i only: the group mean is detached
    assert p.grad[0] == 0 and p.grad[3] == 0 and p.grad[1] < 0


def test_options_name_the_option_in_errors():
    with pytest.raises(ValueError, match="egpo_w_min must be > 0"):
        EstimatorOptions(egpo_w_min=0.0)
    with pytest.raises(ValueError, match="eda_entropy_source must be one of"):
        EstimatorOptions(eda_entropy_source="new")
    with pytest.raises(ValueError, match="ep_num_buckets"):
        EstimatorOptions(ep_num_buckets=0)
    with pytest.raises(ValueError, match="eda_eps must be > 0"):
        EstimatorOptions(eda_eps=0.0)
    with pytest.raises(ValueError, match="applies to the 'eda' estimator only"):
        EstimatorOptions(eda_entropy_source="current").check_for("egpo")
    with pytest.raises(ValueError, match="needs entropy"):
        compute_advantages("ep_grpo", torch.ones(4), torch.ones(4, 2), group_size=4)


def test_options_from_a_config_object_or_mapping():
    class Cfg:
        egpo_w_min = 0.8
        eda_clamp = [0.5, 2.0]
        unrelated = 3

    o = options_from(Cfg(), adv_scale="none")
    assert o.egpo_w_min == 0.8 and o.eda_clamp == (0.5, 2.0) and o.adv_scale == "none"
    assert o.egpo_w_max == DEFAULTS.egpo_w_max
    assert options_from({"ep_lambda": 0.3}).ep_lambda == 0.3
    assert option_help("egpo_w_min")


def test_needed_inputs():
    assert needed_inputs("grpo") == needed_inputs("dr_grpo") == frozenset()
    assert needed_inputs("eda") == needed_inputs("ep_grpo") == {"entropy"}
    assert needed_inputs("egpo") == needed_inputs("prog_grpo") == {"old_logp"}
    assert needed_inputs("egpo", EstimatorOptions(egpo_uncertainty="entropy")) == {"entropy"}
