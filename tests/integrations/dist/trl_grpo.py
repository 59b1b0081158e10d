"""Run by tests/integrations/test_trl_distributed.py on 2 CPU processes, under ``accelerate launch`` with the
example's DeepSpeed ZeRO-3 config or under ``torchrun`` (DDP over gloo): TRL's GRPOTrainer through
EdgeGRPOTrainer, EDA + GEC, the same tiny model and data trained twice from the same seed, with TRL's head
(``use_edge_kernels=False``) and with ours. Each rank saves, per run, the (loss, grad_norm) history and what the
estimator saw at each generation step (its local batch, the gathered estimator inputs, its local advantages), plus
EGPO's advantages of the first batch. ``per_device_train_batch_size=2`` with ``num_generations=4`` puts each
prompt's group across both ranks (2 + 2 completions)."""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # tests/: the offline tokenizer

G, PER_DEVICE, STEPS = 4, 2, 3


def accuracy_reward(completions, answer, **kwargs):
    out = []
    for c, a in zip(completions, answer):
        found = re.findall(r"\\boxed\{([^}]*)\}", c)
        out.append(1.0 if found and found[-1] == a else 0.0)
    return out


def noise_reward(completions, **kwargs):
    return [(sum(map(ord, c)) % 3) / 4 for c in completions]


def dataset():
    import datasets

    return datasets.Dataset.from_dict({
        "prompt": ["1+1=", "2+3=", "4+4=", "9-3="], "answer": ["2", "5", "8", "6"],
        "solution": ["1+1=2 so \\boxed{2}", "\\boxed{5}", "4+4 is \\boxed{8}", "\\boxed{6}"]})


def config(out_dir, use_edge, ddp, single=False):
    """The runs' config; ``single``: for one process (the test's reference), with the global batch per device."""
    from edge_kernels.integrations.trl import EdgeGRPOConfig

    extra = dict(use_cpu=True) if ddp or single else {}
    if single:
        extra["per_device_train_batch_size"] = 2 * PER_DEVICE
    else:
        extra["ddp_backend"] = "gloo"
    extra.setdefault("per_device_train_batch_size", PER_DEVICE)
    return EdgeGRPOConfig(
        output_dir=out_dir, num_generations=G, max_completion_length=8,
        max_steps=STEPS, learning_rate=1e-2, report_to="none", logging_steps=1,
        save_strategy="no", disable_tqdm=True, seed=0, bf16=False, advantage_estimator="eda", gec=True,
        gec_max_new_tokens=6, correct_threshold=0.6, use_edge_kernels=use_edge, **extra)


def record(trainer):
    """Wrap the estimator step to keep, per call, the local batch, the gathered inputs and the advantages."""
    calls = []
    token_inputs, advantages = trainer._edge_token_inputs, trainer._edge_advantages

    def inputs(output, mode, options):
        res = token_inputs(output, mode, options)
        calls[-1]["gathered"] = [t.detach().clone() for t in res]
        return res

    def adv(output):
        keep = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
        calls.append({"local": {k: output[k].clone() for k in keep},
                      "rewards_per_func": trainer._edge_rewards_per_func.clone()})
        res = advantages(output)
        calls[-1]["advantages"] = res["advantages"].detach().clone()
        return res
    trainer._edge_token_inputs, trainer._edge_advantages = inputs, adv
    return calls


def egpo_on(trainer, call):
    """EGPO's advantages of a recorded batch, through the same trainer step (the whole group's statistics)."""
    trainer.args.advantage_estimator, trainer.args.egpo_uncertainty = "egpo", "entropy"
    trainer._edge_rewards_per_func = call["rewards_per_func"]
    out = trainer._edge_advantages(dict(call["local"]))
    trainer.args.advantage_estimator = "eda"
    return {"advantages": out["advantages"], "gathered": trainer_calls_last(trainer)}


def trainer_calls_last(trainer):
    return trainer._edge_recorded[-1]["gathered"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--ddp", action="store_true")
    args = p.parse_args()
    from char_tokenizer import make_tokenizer
    from tiny_qwen2 import tiny_qwen2
    from edge_kernels.integrations.trl import EdgeGRPOTrainer

    tok = make_tokenizer()
    result = {}
    for use_edge in (False, True):
        trainer = EdgeGRPOTrainer(model=tiny_qwen2(tok), reward_funcs=[accuracy_reward, noise_reward],
                                  args=config(os.path.join(args.out, f"run-{use_edge}"), use_edge, args.ddp),
                                  train_dataset=dataset(), processing_class=tok)
        trainer._edge_recorded = record(trainer)
        trainer.train()
        wrapper = type(trainer.model_wrapped).__name__
        assert wrapper == ("DistributedDataParallel" if args.ddp else "DeepSpeedEngine"), wrapper
        w = trainer.model.lm_head.weight
        assert args.ddp or (hasattr(w, "ds_id") and w.numel() == 0), "the head must be ZeRO-3 partitioned"
        logs = [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]
        res = {"logs": logs, "calls": trainer._edge_recorded, "world": trainer.accelerator.num_processes}
        if use_edge:
            res["egpo"] = egpo_on(trainer, trainer._edge_recorded[0])
        result[use_edge] = res
    rank = trainer.accelerator.process_index
    torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))
    print(f"DONE rank {rank}", flush=True)
    trainer.accelerator.end_training()  # the process group, before interpreter exit (see the example's main)


if __name__ == "__main__":
    main()
