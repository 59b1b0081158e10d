"""The loop on a tiny embedded configuration: advantages per estimator, an update that changes the weights,
metrics.jsonl, plots, checkpoints, errors, and exact resumption after a SIGKILL."""

import json
import os

import pytest
import torch

from edge_kernels.estimators import ESTIMATORS
from edge_kernels.train.config import TrainConfig
from edge_kernels.train.loop import METRIC_FIELDS, TrainError, Trainer
from train_helpers import TINY, run_cli, tiny_flags

REQUIRED = set(METRIC_FIELDS) | {"step", "reward_mean", "accuracy", "entropy_mean", "adv_var", "zero_adv_frac",
                                  "loss", "gec_applied", "step_time_s"}


def make_trainer(tmp_path, **over):
    cfg = TrainConfig(**{**TINY, "output": str(tmp_path / "run"), **over})
    tr = Trainer(cfg, log=lambda s: None)
    tr.setup()
    return tr


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_advantages_per_estimator_on_one_batch(tmp_path, estimator):
    tr = make_trainer(tmp_path, estimator=estimator, group_size=4)
    B, T = 8, 5
    g = torch.Generator().manual_seed(0)
    rewards = torch.tensor([1., 0., 0., 1., 0., 0., 0., 0.])  # group 2 is entirely incorrect
    old_logp = -torch.rand(B, T, generator=g) * 3
    entropy = torch.rand(B, T, generator=g) * 2 + 0.1
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    est = tr._advantages(rewards, old_logp, entropy, mask)
    adv = est.advantages
    assert not est.rescale_in_loss
    assert adv.shape == ((B, T) if estimator == "ep_grpo" else (B,))
    assert torch.isfinite(adv).all()
    from edge_kernels import advantage_formulas as A

    base = A.grpo_advantages(rewards, group_size=4, scale="none" if estimator == "dr_grpo" else "group")
    if estimator in ("grpo", "dr_grpo"):
        torch.testing.assert_close(adv, base)
    if estimator == "eda":  # EDA only rescales: A * mean_g(P) / P_i
        p = A.seq_mean_entropy(entropy, mask)
        scale = torch.cat([p[:4].mean() / (p[:4] + 1e-6), p[4:].mean() / (p[4:] + 1e-6)])
        torch.testing.assert_close(adv, base * scale)
        assert (adv[4:] == 0).all()
    if estimator == "egpo":  # NSR: the entirely-incorrect group is pushed down
        assert (adv[4:] < 0).all()
    if estimator in ("grpo", "dr_grpo", "eda", "prog_grpo"):
        assert adv[0] > 0 and adv[1] < 0


def test_eda_current_mode(tmp_path):
    tr = make_trainer(tmp_path, eda_entropy_source="current", warmup_steps=0)
    est = tr._advantages(torch.tensor([1., 0., 0., 1.] * 2), torch.zeros(8, 3), torch.ones(8, 3),
                         torch.ones(8, 3, dtype=torch.bool))
    assert est.rescale_in_loss
    rec = tr.rl_step()
    assert all(rec[k] == rec[k] for k in ("loss", "adv_var", "zero_adv_frac"))  # not NaN


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_training_step_changes_the_weights(tmp_path, estimator):
    tr = make_trainer(tmp_path, estimator=estimator, warmup_steps=0)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    rec = tr.rl_step()
    assert REQUIRED - {"step_time_s"} <= set(rec)
    assert rec["step"] == 1 and rec["gec_applied"] > 0  # a random model is always wrong: GEC corrects
    assert rec["gec_applied"] == rec["gec_regenerate"] + rec["gec_inject"] + rec["gec_reference"]
    assert rec["reward_mean"] > rec["reward_mean_rollout"]  # injected answers and references are correct
    changed = [k for k, v in tr.model.state_dict().items() if not torch.equal(v, before[k])]
    assert "model.embed_tokens.weight" in changed and any("layers.0" in k for k in changed)
    for v in rec.values():
        assert v == v  # no NaN


def test_dr_grpo_divides_by_a_fixed_horizon(tmp_path, monkeypatch):
    # Dr.GRPO's seq-mean-token-sum-norm divides by a constant max completion length, not by the width of the
    # batch a step happened to pack (which varies with response and GEC lengths)
    import edge_kernels.losses as L

    seen = []
    real = L.fused_linear_policy_loss

    def spy(hidden, weight, targets, *a, **k):
        seen.append((k["options"].agg, k["options"].max_len, targets.shape[1]))
        return real(hidden, weight, targets, *a, **k)

    monkeypatch.setattr(L, "fused_linear_policy_loss", spy)
    tr = make_trainer(tmp_path, estimator="dr_grpo", warmup_steps=0)
    reflection = len(tr.tokenizer.encode(tr.cfg.gec_reflection, add_special_tokens=False))
    assert tr.regeneration_horizon() == TINY["max_new_tokens"] + reflection + TINY["gec_max_new_tokens"]
    longest_solution = max(len(tr.tokenizer.encode(p.solution, add_special_tokens=False))
                           for p in tr.train_problems)
    assert tr.response_horizon() >= max(tr.regeneration_horizon(), longest_solution + 1)
    tr.rl_step()
    tr.rl_step()
    assert seen and all(agg == "seq-mean-token-sum-norm" for agg, _, _ in seen)
    assert {(agg, max_len) for agg, max_len, _ in seen} == {("seq-mean-token-sum-norm", tr.response_horizon())}
    assert all(width <= tr.response_horizon() for _, _, width in seen)


def test_no_gec_and_mask_injected(tmp_path):
    tr = make_trainer(tmp_path, gec=False, warmup_steps=0)
    rec = tr.rl_step()
    assert rec["gec_applied"] == 0 and rec["reward_mean"] == rec["reward_mean_rollout"]
    tr2 = make_trainer(tmp_path / "b", gec_mask_injected=True, gec_p_regenerate=0.0, gec_p_inject=0.0,
                       gec_p_reference=1.0, warmup_steps=0)
    before = {k: v.clone() for k, v in tr2.model.state_dict().items()}
    rec = tr2.rl_step()
    # every response is replaced by its reference, and every reference token is masked: nothing to learn
    assert rec["gec_reference"] == 8 and rec["loss"] == 0.0
    assert all(torch.equal(v, before[k]) for k, v in tr2.model.state_dict().items())


def test_full_run_outputs(tmp_path):
    out = tmp_path / "run"
    summary = Trainer(TrainConfig(**{**TINY, "output": str(out), "max_steps": 3, "eval_every": 2}),
                      log=lambda s: None).run()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert REQUIRED <= set(r)
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["zero_adv_frac"] <= 1 and r["step_time_s"] > 0
    assert "eval_accuracy" in rows[1]
    assert sorted(os.listdir(out / "plots")) == ["adv_var.png", "entropy.png", "eval.png", "reward_accuracy.png",
                                                "zero_adv_frac.png"]
    assert (out / "config.yaml").exists() and (out / "data" / "eval.jsonl").exists()
    assert {"model", "optimizer.pt", "rng.pt", "trainer_state.json"} <= set(os.listdir(out / "checkpoint"))
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["phase"] == "rl" and state["sampler"]["pos"] == 6
    assert summary["final_eval"]["total"] == TINY["embedded_eval_size"]
    assert summary["warmup_eval"]["total"] == TINY["embedded_eval_size"]
    # greedy and sampled pass@1 and pass@k, after the warm-up and at the end (also in the eval step's line)
    assert json.loads((out / "summary.json").read_text()) == summary
    k = summary["pass_at_k_k"]
    assert k == 8 and summary["final_eval"]["samples"] == 8
    for when in ("warmup", "final"):
        g, s, pk = (summary[f"{m}_{when}"] for m in ("greedy_pass_at_1", "sampled_pass_at_1", "pass_at_k"))
        assert 0 <= g <= 1 and 0 <= s <= 1
        assert s <= pk <= min(1.0, k * s) + 1e-12  # pass@k >= pass@1, and the union bound
        assert summary[f"{when}_eval"]["greedy_pass_at_1"] == g == summary[f"{when}_eval"]["pass_at_1"]
    for m in ("greedy_pass_at_1", "sampled_pass_at_1", "pass_at_k"):
        assert summary[f"{m}_change"] == pytest.approx(summary[f"{m}_final"] - summary[f"{m}_warmup"])
    assert {"eval_greedy_pass_at_1", "eval_sampled_pass_at_1", "eval_pass_at_k", "eval_time_s"} <= set(rows[1])
    assert rows[1]["eval_accuracy"] == rows[1]["eval_greedy_pass_at_1"]
    for r in rows:  # where each step's time went
        assert {"rollout_time_s", "gec_time_s", "scoring_time_s", "update_time_s", "rollout_cpu_time_s",
                "update_cpu_time_s"} <= set(r)
    # a second run into the same directory must not silently mix with the first
    with pytest.raises(TrainError, match="--resume"):
        Trainer(TrainConfig(**{**TINY, "output": str(out)}), log=lambda s: None).setup()


def test_zero_rl_steps_evaluates_once(tmp_path, monkeypatch):
    """``--max-steps 0`` (the fidelity study's cached warm-up): the policy after the warm-up is the final one, so
    the run evaluates it once and reports it as both; a resumed run evaluates again (its policy may differ)."""
    calls = []
    real = Trainer.eval_point
    monkeypatch.setattr(Trainer, "eval_point", lambda self: calls.append(self.step) or real(self))
    out = tmp_path / "run"
    summary = Trainer(TrainConfig(**{**TINY, "output": str(out), "max_steps": 0}), log=lambda s: None).run()
    assert calls == [0] and summary["final_eval"] == summary["warmup_eval"]
    assert summary["greedy_pass_at_1_change"] == 0
    Trainer(TrainConfig(**{**TINY, "output": str(out), "resume": str(out), "max_steps": 1}),
            log=lambda s: None).run()
    assert calls == [0, 1]


def test_out_of_memory_names_the_option_that_helps(tmp_path):
    tr = make_trainer(tmp_path, warmup_steps=0)

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    tr.engine.generate = oom
    with pytest.raises(TrainError, match="out of memory during rollout: lower --rollout-batch-size"):
        tr.rl_step()


def test_run_is_deterministic_under_the_seed(tmp_path):
    a = make_trainer(tmp_path / "a", warmup_steps=0).rl_step()
    b = make_trainer(tmp_path / "b", warmup_steps=0).rl_step()
    c = make_trainer(tmp_path / "c", warmup_steps=0, seed=1).rl_step()
    strip = lambda r: {k: v for k, v in r.items() if not k.endswith("time_s")}  # noqa: E731
    assert strip(a) == strip(b)
    assert strip(a) != strip(c)


def _metrics(path):
    rows = [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in rows]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight") / "run")
    proc = run_cli(["--output", out, *tiny_flags(max_steps=5)])
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("point", ["update", "metrics", "checkpoint"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, straight_run, point):
    out = str(tmp_path / "run")
    killed = run_cli(["--output", out, *tiny_flags(max_steps=5)], kill_at=f"3:{point}")
    assert killed.returncode == -9, killed.stderr  # SIGKILL
    steps_logged = [r["step"] for r in _metrics(out)]
    assert steps_logged == ([1, 2] if point == "update" else [1, 2, 3])
    resumed = run_cli(["--resume", out])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout  # the step in flight is redone
    assert _metrics(out) == _metrics(straight_run)
    assert not os.path.exists(os.path.join(out, "checkpoint.tmp"))


def test_run_n_then_resume_to_2n(tmp_path, straight_run):
    out = str(tmp_path / "run")
    first = run_cli(["--output", out, *tiny_flags(max_steps=2)])
    assert first.returncode == 0, first.stderr
    second = run_cli(["--resume", out, "--max-steps", "5"])  # flags override the saved config
    assert second.returncode == 0, second.stderr
    assert _metrics(out) == _metrics(straight_run)


# ---------------------------------------------------------------------------------------------- GPU-path fixes


def _frac_changed(model, before):
    n = changed = 0
    for k, v in model.state_dict().items():
        n += v.numel()
        changed += int((v != before[k]).sum())
    return changed / n


def test_bf16_compute_updates_fp32_master_weights_at_a_tiny_lr(tmp_path, monkeypatch):
    import edge_kernels.losses as L

    seen = []
    real = L.fused_linear_policy_loss

    def spy(hidden, weight, *a, **k):
        seen.append((hidden.dtype, weight.dtype))
        return real(hidden, weight, *a, **k)

    monkeypatch.setattr(L, "fused_linear_policy_loss", spy)
    logs = []
    cfg = TrainConfig(**{**TINY, "output": str(tmp_path / "run"), "dtype": "bfloat16", "lr": 1e-6,
                         "warmup_steps": 0})
    tr = Trainer(cfg, log=logs.append)
    tr.setup()
    assert tr.autocast_dtype == torch.bfloat16 and not any("warning" in s for s in logs)
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    rec = tr.rl_step()
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}  # the fused kernel ran in bf16
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())  # the master weights stay fp32
    assert all(torch.isfinite(v).all() for v in tr.model.state_dict().values()) and rec["loss"] == rec["loss"]
    assert _frac_changed(tr.model, before) > 0.9  # a 1e-6 AdamW step moves (nearly) every fp32 weight

    # bf16 parameters (--param-dtype bfloat16): the same step is almost entirely rounded away, and it says so
    logs2 = []
    tr2 = Trainer(TrainConfig(**{**cfg.__dict__, "output": str(tmp_path / "run2"), "param_dtype": "bfloat16"}),
                  log=logs2.append)
    tr2.setup()
    assert any("warning: --param-dtype bfloat16" in s and "rounded away" in s for s in logs2)
    assert all(p.dtype == torch.bfloat16 for p in tr2.model.parameters()) and tr2.autocast_dtype is None
    before2 = {k: v.clone() for k, v in tr2.model.state_dict().items()}
    tr2.rl_step()
    assert _frac_changed(tr2.model, before2) < 0.1


class _RecordingEngine:
    """Wraps a rollout engine and records sync_weights calls (a stand-in for vLLM's weight push)."""

    def __init__(self, inner):
        self.inner = inner
        self.synced = []

    def generate(self, *a, **k):
        return self.inner.generate(*a, **k)

    def sync_weights(self, model):
        self.synced.append({k: v.clone() for k, v in model.state_dict().items()})


def test_engine_gets_the_weights_after_warmup_and_after_a_resume(tmp_path):
    tr = make_trainer(tmp_path, warmup_steps=2)
    tr.engine = eng = _RecordingEngine(tr.engine)
    tr.warmup()
    assert len(eng.synced) == 1
    assert all(torch.equal(v, eng.synced[0][k]) for k, v in tr.model.state_dict().items())

    out = tmp_path / "r"
    Trainer(TrainConfig(**{**TINY, "output": str(out), "max_steps": 1, "warmup_steps": 0}), log=lambda s: None).run()
    tr2 = Trainer(TrainConfig(**{**TINY, "output": str(out), "max_steps": 2, "warmup_steps": 0,
                                 "resume": str(out)}), log=lambda s: None)
    tr2.setup()
    tr2.engine = eng2 = _RecordingEngine(tr2.engine)
    tr2.restore()
    assert tr2.step == 1 and len(eng2.synced) == 1
    assert all(torch.equal(v, eng2.synced[0][k]) for k, v in tr2.model.state_dict().items())


def test_rollout_engine_gets_stop_ids_and_a_max_model_len(tmp_path, monkeypatch):
    import edge_kernels.train.rollout as R

    calls = []
    real = R.make_rollout

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(R, "make_rollout", spy)
    tr = make_trainer(tmp_path, warmup_steps=0, max_prompt_tokens=300)
    refl = len(tr.tokenizer.encode(tr.cfg.gec_reflection, add_special_tokens=False))
    k = calls[-1]
    assert k["max_model_len"] == 300 + TINY["max_new_tokens"] + refl + TINY["gec_max_new_tokens"]
    assert k["stop_ids"] == tr.stop_ids == [tr.tokenizer.eos_token_id]
    tr2 = make_trainer(tmp_path / "b", warmup_steps=0, max_prompt_tokens=300, gec=False)
    assert tr2.max_model_len() == 300 + TINY["max_new_tokens"]
    tr2.model.config.max_position_embeddings = 64
    assert tr2.max_model_len() == 64  # capped at the model's context


def test_real_model_path_uses_every_stop_id_and_no_sampling_defaults(tmp_path, monkeypatch):
    from edge_kernels.train import step as step_mod
    from edge_kernels.train.embedded import make_task
    from edge_kernels.train.data import Problem, write_problems
    from train_helpers import save_model_with_sampling_defaults

    _, _, eos_ids = save_model_with_sampling_defaults(tmp_path / "m")
    tr_rows, _ = make_task(0, 8, 0)
    write_problems([Problem(**r) for r in tr_rows], str(tmp_path / "train.jsonl"))
    seen = []
    real_gec = step_mod.apply_gec

    def spy(*a, **k):
        seen.append(k["stop_ids"])
        return real_gec(*a, **k)

    monkeypatch.setattr(step_mod, "apply_gec", spy)
    tr = make_trainer(tmp_path, model=str(tmp_path / "m"), data=str(tmp_path / "train.jsonl"), warmup_steps=0,
                      lr=1e-6)
    assert tr.cfg.save_every == 50 and tr.param_dtype == torch.float32
    assert tr.stop_ids == eos_ids and tr.engine.eos_ids == eos_ids
    gc = tr.model.generation_config
    assert gc.temperature in (None, 1.0) and gc.top_k in (None, 50) and gc.min_p is None
    tr.rl_step()
    assert seen == [eos_ids]
    tr.save()  # the checkpoint keeps the model's own generation_config for use outside edge-train
    saved = json.loads((tmp_path / "run" / "checkpoint" / "model" / "generation_config.json").read_text())
    assert saved["temperature"] == 0.7 and saved["eos_token_id"] == eos_ids
