"""edge-train's policy-loss options: flags and YAML map onto one PolicyLossOptions, --help lists every objective
and rollout correction, a bad combination is a startup error naming the option, and each objective trains."""

from __future__ import annotations

import pytest
import torch

from train_helpers import TINY
from edge_kernels.losses.options import OBJECTIVES, ROLLOUT_IS_MODES
from edge_kernels.train.cli import train_parser
from edge_kernels.train.config import ConfigError, TrainConfig, build_config, loss_options, resolve
from edge_kernels.train.loop import Trainer


def test_help_lists_each_objective_and_correction_on_its_own_line():
    text = train_parser().format_help()
    lines = text.splitlines()
    for name in OBJECTIVES + ROLLOUT_IS_MODES:
        assert sum(1 for ln in lines if ln.split()[:1] == [name]) == 1, name
    assert "--objective" in text and "--rollout-is-max" in text


def test_flags_and_yaml_map_onto_the_options(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("objective: sapo\nsapo-tau-neg: 2.0\nrollout: vllm\nrollout_is: sequence_mask\n"
                 "rollout_is_min: 0.5\n")
    ns = vars(train_parser().parse_args(["--config", str(y), "--rollout-is-max", "2", "--off-policy-mask-threshold",
                                         "0.1"]))
    cfg = resolve(build_config(ns))
    o = loss_options(cfg)
    assert (o.objective, o.sapo_tau_pos, o.sapo_tau_neg) == ("sapo", 1.0, 2.0)
    assert (o.rollout_is, o.rollout_is_min, o.rollout_is_max, o.off_policy_mask_threshold) == (
        "sequence_mask", 0.5, 2.0, 0.1)
    assert o.clip_low is None and o.agg == "token-mean"
    lu = resolve(TrainConfig(objective="luspo", is_level="sequence"))
    assert lu.loss_agg == "seq-mean-token-sum" and loss_options(lu).agg == "seq-mean-token-sum"
    eda = loss_options(resolve(TrainConfig(estimator="eda", eda_entropy_source="current", eda_clamp=[0.5, 2.0])))
    assert (eda.eda, eda.eda_clamp) == ("current", (0.5, 2.0))
    assert loss_options(resolve(TrainConfig(estimator="grpo"))).eda == "off"


@pytest.mark.parametrize("over,match", [
    (dict(objective="sapo", clip_high=0.28), "clip_high does not apply to objective='sapo'"),
    (dict(objective="luspo"), "is_level='token' does not apply to objective='luspo'"),
    (dict(objective="luspo", is_level="sequence", loss_agg="token-mean"), "agg='token-mean' does not apply"),
    (dict(sapo_tau_pos=2.0), "sapo_tau_pos does not apply to objective='clip'"),
    (dict(rollout_is="token_truncate", rollout_is_max=2.0), "needs --rollout vllm"),
])
def test_bad_combinations_are_startup_errors(over, match):
    with pytest.raises(ConfigError, match=match):
        resolve(TrainConfig(**over))


@pytest.mark.parametrize("over", [dict(objective="cispo", clip_low=1.0, clip_high=4.0), dict(objective="sapo"),
                                  dict(objective="luspo", is_level="sequence"), dict(objective="vespo"),
                                  dict(objective="clip_cov", cov_ratio=0.2, clip_cov_lb=-1.0, clip_cov_ub=1.0),
                                  dict(objective="kl_cov", cov_ratio=0.2),
                                  dict(is_level="sequence", off_policy_mask_threshold=1e-6, dual_clip=None),
                                  dict(objective="sapo", estimator="eda", eda_entropy_source="current")],
                         ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_each_objective_trains_one_step(tmp_path, over):
    tr = Trainer(TrainConfig(**{**TINY, "output": str(tmp_path / "run"), "warmup_steps": 0, **over}),
                 log=lambda s: None)
    tr.setup()
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    rec = tr.rl_step()
    assert all(v == v for v in rec.values())  # no NaN
    assert any(not torch.equal(v, before[k]) for k, v in tr.model.state_dict().items())
    if "cov_ratio" in over:
        assert rec["cov_frac"] > 0
    if "off_policy_mask_threshold" in over:
        assert "off_policy_mask_frac" in rec
