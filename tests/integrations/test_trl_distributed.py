"""TRL's GRPOTrainer through EdgeGRPOTrainer on 2 CPU processes: ``accelerate launch`` with the example's
DeepSpeed ZeRO-3 config (``integrations/examples/accelerate_zero3.yaml``), and ``torchrun`` (DDP over gloo).

``dist/trl_grpo.py`` trains a tiny Qwen2 3 steps with EDA + GEC, once with TRL's fused head and once with ours, and
saves what it saw (see its docstring). Checked here:

* the per-step loss and grad-norm history with our head equals TRL's (both fp32; the runs sample the same
  completions, so the only difference is the head's summation order: rtol 1e-5, atol 1e-6; observed: 1.1e-7
  relative on the grad norm, 9e-8 on the loss, DDP run on the 2-core CPU);
* the first batch's EDA advantages, concatenated over the ranks, equal a single-process trainer's on the same
  global batch (same initial model; its own scoring pass), atol 1e-5 (fp32 entropies from different batch shapes);
* groups split across ranks: each prompt's 4 completions sit 2 + 2 on the two ranks, and the EDA and EGPO
  advantages are the estimator layer's on the whole gathered group (equal to ``compute_advantages`` on the
  gathered inputs, exactly), not per rank (which gives different values).

Each launch has a hard time limit; its process group is killed when it ends or fails.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

pytest.importorskip("trl")

from dist_helpers import free_port, launch, torchrun  # noqa: E402

HERE = os.path.dirname(__file__)
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
SCRIPT = os.path.join(HERE, "dist", "trl_grpo.py")
ACCELERATE_CONFIG = os.path.join(ROOT, "integrations", "examples", "accelerate_zero3.yaml")


def _script():
    spec = importlib.util.spec_from_file_location("trl_grpo_dist", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _load(out):
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]


def _pad_cat(tensors, left):
    width = max(t.shape[1] for t in tensors)
    pads = [(width - t.shape[1], 0) if left else (0, width - t.shape[1]) for t in tensors]
    return torch.cat([torch.nn.functional.pad(t, p) for t, p in zip(tensors, pads)])


def _single_process_advantages(mod, ranks, tmp_path):
    """EDA advantages of the first global batch from one process: a world-1 trainer, same model and config."""
    from char_tokenizer import make_tokenizer
    from tiny_qwen2 import tiny_qwen2
    from edge_kernels.integrations.trl import EdgeGRPOTrainer

    tok = make_tokenizer()
    cfg = mod.config(str(tmp_path / "single"), True, ddp=False, single=True)
    trainer = EdgeGRPOTrainer(model=tiny_qwen2(tok), reward_funcs=[mod.accuracy_reward, mod.noise_reward],
                              args=cfg, train_dataset=mod.dataset(), processing_class=tok)
    assert trainer.accelerator.num_processes == 1
    calls = [r[True]["calls"][0] for r in ranks]
    batch = {k: _pad_cat([c["local"][k] for c in calls], left=k.startswith("prompt")) for k in calls[0]["local"]}
    trainer.model.train()
    trainer._edge_rewards_per_func = calls[0]["rewards_per_func"]
    return trainer._edge_advantages(batch)["advantages"]


def _check_runs(ranks, mod, tmp_path):
    from edge_kernels.estimators import compute_advantages

    for r in ranks:
        native, edge = r[False], r[True]
        assert native["world"] == edge["world"] == 2
        assert len(native["logs"]) == len(edge["logs"]) == mod.STEPS
        torch.testing.assert_close(torch.tensor(edge["logs"]), torch.tensor(native["logs"]), rtol=1e-5, atol=1e-6)
        assert any(g > 0 for _, g in edge["logs"])
    # one group across both ranks: the rewards of the gathered batch are one prompt's G completions
    call0 = [r[True]["calls"][0] for r in ranks]
    assert call0[0]["local"]["completion_ids"].shape[0] == mod.PER_DEVICE
    assert call0[0]["rewards_per_func"].shape[0] == mod.G
    local = torch.cat([c["advantages"] for c in call0])
    torch.testing.assert_close(local, _single_process_advantages(mod, ranks, tmp_path), rtol=0, atol=1e-5)

    for name, rank_advs, gathered in (
        ("eda", local, call0[0]["gathered"]),
        ("egpo", torch.cat([r[True]["egpo"]["advantages"] for r in ranks]), ranks[0][True]["egpo"]["gathered"]),
    ):
        rewards = call0[0]["rewards_per_func"].sum(1)
        mask, logp, ent = gathered
        opts = mod.config(str(tmp_path / "opts"), True, ddp=False, single=True)
        opts.advantage_estimator, opts.egpo_uncertainty = name, "entropy"
        options = opts.estimator_options()
        whole = compute_advantages(name, rewards, mask, group_size=mod.G, old_logp=logp, entropy=ent, options=options)
        torch.testing.assert_close(rank_advs, whole.advantages, rtol=0, atol=0, msg=name)
        half = mod.PER_DEVICE  # what per-rank groups (2 completions each) would give instead
        per_rank = torch.cat([compute_advantages(name, rewards[s:s + half], mask[s:s + half], group_size=half,
                                                 old_logp=logp[s:s + half], entropy=ent[s:s + half],
                                                 options=options).advantages for s in (0, half)])
        assert not torch.allclose(per_rank, whole.advantages, atol=1e-3), name


def test_grpo_trainer_ddp_torchrun(tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    torchrun(SCRIPT, "--out", out, "--ddp", timeout=480)
    _check_runs(_load(out), _script(), tmp_path)


def test_grpo_trainer_zero3_accelerate_launch(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero3"
    out.mkdir()
    launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", ACCELERATE_CONFIG,
            "--num_processes", "2", "--main_process_port", str(free_port()), SCRIPT, "--out", str(out)],
           timeout=480, cwd=ROOT)
    _check_runs(_load(out), _script(), tmp_path)


def test_example_paper_setup_on_two_cpu_processes(tmp_path):
    """The example's 8-GPU command (accelerate + ZeRO-3, --paper-setup) as CI runs it: 2 CPU processes, the
    embedded tiny model (a short warm-up), 2 steps; a group of 2 completions spans both processes."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("math_verify")
    script = os.path.join(ROOT, "integrations", "examples", "trl_edge_grpo.py")
    out = launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", ACCELERATE_CONFIG,
                  "--num_processes", "2", "--main_process_port", str(free_port()), script, "--paper-setup", "--smoke",
                  "--max-steps", "2", "--smoke-warmup-steps", "20", "--output-dir", str(tmp_path / "run")],
                 timeout=480, cwd=ROOT)
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in steps] == ["step 1", "step 2"], out[-3000:]
    assert all("GEC regenerated/injected/replaced" in line for line in steps)
