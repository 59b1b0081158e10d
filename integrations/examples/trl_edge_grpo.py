#!/usr/bin/env python
"""EDGE-GRPO (EDA + GEC) with TRL's GRPOTrainer and the edge-kernels fused log-prob / entropy kernel.

The only change from a plain TRL script is the import:

    from edge_kernels.integrations.trl import EdgeGRPOConfig as GRPOConfig, EdgeGRPOTrainer as GRPOTrainer

Run (GPU, a math dataset with ``problem`` / ``answer`` / ``solution`` columns, e.g. DeepScaleR's layout):

    pip install 'edge-kernels[trl,train]'
    python integrations/examples/trl_edge_grpo.py --model Qwen/Qwen2.5-Math-1.5B \\
        --dataset agentica-org/DeepScaleR-Preview-Dataset --estimator eda --gec --use-edge-kernels --bf16

EDGE-GRPO's training setup on one node of 8 GPUs (accelerate + DeepSpeed ZeRO-3, ``accelerate_zero3.yaml`` and
``ds_zero3.json`` next to this file; run from the repository root). The dataset is the paper's
``train_data/deepscaler_hard-1k.json`` (github.com/ZhangXJ199/EDGE-GRPO: 1,000 DeepScaleR problems with
``problem`` / ``answer`` / ``solution``), downloaded by hand; ``--model Qwen/Qwen2.5-Math-1.5B`` for the smaller
model:

    accelerate launch --config_file integrations/examples/accelerate_zero3.yaml \\
        integrations/examples/trl_edge_grpo.py --paper-setup --model Qwen/Qwen2.5-Math-7B \\
        --dataset deepscaler_hard-1k.json --use-vllm --vllm-mode colocate

``--paper-setup`` (values in :data:`PAPER`) takes the settings of the paper's published launch script
(``train_grpo.sh`` of that repository, commit f82a2e4: 8 GPUs, ZeRO-3, ``per_device_train_batch_size 1``,
``gradient_accumulation_steps 1``, ``max_completion_length 1024``, ``num_train_epochs 1``, ``beta 0``, GEC + EDA)
and, for what the script leaves unset, the defaults of the TRL fork it runs (``trl_edge/trainer/grpo_config.py``,
same commit: ``learning_rate 1e-6``, ``num_generations 8``, ``temperature 1.0``, ``epsilon 0.2`` without a
separate upper bound, ``loss_type "bnpo"``). So one prompt's 8 completions form each global batch, one completion
per GPU: every group spans all 8 processes. Not from the paper: vLLM colocate (the paper's script generates with
``model.generate``; ``--use-vllm`` is this example's choice for speed, drop it to match the paper exactly), the
fork's ``max_prompt_length 512`` (TRL 1.16 has no prompt truncation option), and the paper's reward functions
(``box_format_reward`` + ``box_accuracy_reward``; this example scores the boxed answer only). The learning-rate
schedule and warm-up are TRL's defaults in both.

The same script on 2 CPU processes, a tiny offline model and 2 steps (what CI runs,
``tests/integrations/test_trl_distributed.py``):

    accelerate launch --config_file integrations/examples/accelerate_zero3.yaml --num_processes 2 \\
        integrations/examples/trl_edge_grpo.py --paper-setup --smoke --max-steps 2

Offline smoke run on the CPU (about half a minute): edge-train's embedded tiny Qwen2 and arithmetic task
(``edge_kernels.train.embedded``) after its supervised warm-up, so rewards are mixed within groups; then a few
EDA + GEC steps with our kernel, printing the advantages, the GEC corrections and the loss of each step:

    python integrations/examples/trl_edge_grpo.py --smoke
"""

from __future__ import annotations

import argparse
import os

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def accuracy_reward(completions, answer, **kwargs):
    """1.0 when the last ``\\boxed{}`` of the completion equals the answer per math-verify
    (docs/algorithms.md section 7)."""
    from edge_kernels.train.rewards import accuracy_reward as score

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [score(t, a) for t, a in zip(texts, answer)]


def to_prompt(row, problem_field: str):
    return {"prompt": [{"role": "system", "content": SYSTEM_PROMPT},
                       {"role": "user", "content": row[problem_field]}]}


def load_rows(args):
    import datasets

    if os.path.exists(args.dataset):
        fmt = "json" if args.dataset.endswith((".json", ".jsonl")) else "parquet"
        return datasets.load_dataset(fmt, data_files=args.dataset, split="train")
    return datasets.load_dataset(args.dataset, split=args.split)


def warmed_up_embedded(output_dir: str, warmup_steps: int):
    """edge-train's embedded default after its supervised warm-up (a policy that boxes and computes the answer
    part of the time): ``(model, tokenizer, rows)``."""
    import datasets

    from edge_kernels.train.config import TrainConfig
    from edge_kernels.train.loop import Trainer

    rank = os.environ.get("RANK", "0")  # each process warms up the same model (same seed) in its own directory
    cfg = TrainConfig(output=os.path.join(output_dir, f"embedded-warmup-rank{rank}"), warmup_steps=warmup_steps,
                      warmup_batch_size=16, embedded_train_size=512, embedded_eval_size=1, embedded_hidden_size=64,
                      embedded_intermediate_size=192, max_new_tokens=32, progress=False, seed=0)
    tr = Trainer(cfg)
    tr.setup()
    tr.warmup()
    rows = [{"problem": p.problem, "answer": p.answer, "solution": p.solution} for p in tr.train_problems]
    return tr.model, tr.tokenizer, datasets.Dataset.from_list(rows)


SMOKE = dict(max_steps=3, num_generations=4, per_device_train_batch_size=16, max_completion_length=32,
             use_cpu=True, gec_max_new_tokens=16, learning_rate=1e-4, temperature=1.0)
# EDGE-GRPO's settings (sources in the module docstring): the paper's launch script, then its TRL fork's defaults
PAPER = dict(per_device_train_batch_size=1, gradient_accumulation_steps=1, max_completion_length=1024,
             num_train_epochs=1, beta=0.0, num_generations=8, learning_rate=1e-6, temperature=1.0, epsilon=0.2,
             epsilon_high=0.2, loss_type="bnpo", advantage_estimator="eda", gec=True, use_edge_kernels=True,
             bf16=True)
# --paper-setup --smoke: the paper's layout (one completion per process, G = the number of processes, so a group
# spans every rank) at the smoke run's sizes, in fp32 on the CPU
PAPER_SMOKE = dict(per_device_train_batch_size=1, max_completion_length=16, gec_max_new_tokens=8, bf16=False,
                   learning_rate=1e-4)


def report(trainer) -> None:
    """One line per step: what the estimator and GEC did, and the loss."""
    for h in trainer.state.log_history:
        if "loss" in h:
            print(f"step {h.get('step')}: loss {h['loss']:+.4f} | reward {h.get('reward', float('nan')):.3f} | "
                  f"zero-advantage groups {h.get('edge/zero_adv_group_frac', float('nan')):.2f} | adv var "
                  f"{h.get('edge/adv_group_var', float('nan')):.4f} | GEC regenerated/injected/replaced "
                  f"{h.get('gec/regenerated_frac', 0):.2f}/{h.get('gec/injected_frac', 0):.2f}/"
                  f"{h.get('gec/replaced_frac', 0):.2f}")


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch / torchrun


def run_options(args) -> dict:
    """GRPOConfig's arguments: the defaults, then --paper-setup, then --smoke (both: PAPER_SMOKE), then the flags
    given on the command line."""
    options = dict(max_steps=500, num_generations=8, per_device_train_batch_size=8, max_completion_length=1024,
                   learning_rate=1e-6, bf16=False, beta=0.0, loss_type="dapo", epsilon_high=0.28,
                   advantage_estimator=args.estimator, gec=False, use_edge_kernels=False)
    if args.paper_setup:
        options.update(PAPER, max_steps=-1)  # -1: the epoch
    if args.smoke:
        options.update(SMOKE, gec=True, use_edge_kernels=True)
        if args.paper_setup:  # one completion per process, G = the number of processes (at least 2)
            group = max(2, _world())
            options.update(PAPER_SMOKE, num_generations=group, per_device_train_batch_size=max(1, group // _world()))
    given = dict(max_steps=args.max_steps, num_generations=args.num_generations,
                 per_device_train_batch_size=args.per_device_batch, max_completion_length=args.max_completion_length,
                 learning_rate=args.learning_rate, bf16=args.bf16, gec=args.gec, use_edge_kernels=args.use_edge_kernels)
    options.update({k: v for k, v in given.items() if v is not None})
    if _world() > 1 and options.get("use_cpu"):
        options["ddp_backend"] = "gloo"  # the CPU's collectives
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        options.pop("use_cpu", None)  # DeepSpeed picks its accelerator (DS_ACCELERATOR=cpu on a CPU)
        if args.smoke:
            options["ddp_backend"] = "gloo"  # the smoke run is a CPU run
    options.update(output_dir=args.output_dir, use_vllm=args.use_vllm, vllm_mode=args.vllm_mode, logging_steps=1,
                   report_to="none", save_strategy="no")
    return options


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="Qwen/Qwen2.5-Math-1.5B")
    p.add_argument("--dataset", default="agentica-org/DeepScaleR-Preview-Dataset")
    p.add_argument("--split", default="train")
    p.add_argument("--problem-field", default="problem")
    p.add_argument("--estimator", default="eda", choices=["grpo", "eda", "egpo", "prog_grpo", "ep_grpo"])
    p.add_argument("--gec", action=argparse.BooleanOptionalAction, default=None,
                   help="Guided Error Correction (needs answer/solution columns; default: on with --smoke)")
    p.add_argument("--use-edge-kernels", action="store_true", default=None)
    p.add_argument("--output-dir", default="runs/trl-edge-grpo")
    p.add_argument("--max-steps", type=int, default=None, help="default 500 (with --paper-setup: the epoch)")
    p.add_argument("--num-generations", type=int, default=None, help="default 8")
    p.add_argument("--per-device-batch", type=int, default=None, help="default 8")
    p.add_argument("--max-completion-length", type=int, default=None, help="default 1024")
    p.add_argument("--learning-rate", type=float, default=None, help="default 1e-6")
    p.add_argument("--bf16", action="store_true", default=None)
    p.add_argument("--use-vllm", action="store_true")
    p.add_argument("--vllm-mode", default="colocate", choices=["colocate", "server"],
                   help="with --use-vllm; GEC needs colocate")
    p.add_argument("--paper-setup", action="store_true",
                   help="EDGE-GRPO's training settings (PAPER; see the module docstring for their sources)")
    p.add_argument("--smoke", action="store_true", help="offline: the embedded warmed-up model and task, a few "
                                                       "steps on the CPU")
    p.add_argument("--smoke-warmup-steps", type=int, default=100, help="supervised warm-up steps of --smoke")
    args = p.parse_args(argv)

    from edge_kernels.integrations.trl import EdgeGRPOConfig as GRPOConfig, EdgeGRPOTrainer as GRPOTrainer

    model, tokenizer = args.model, None
    if args.smoke:
        model, tokenizer, rows = warmed_up_embedded(args.output_dir, args.smoke_warmup_steps)
    else:
        rows = load_rows(args)
    dataset = rows.map(lambda r: to_prompt(r, args.problem_field))
    options = run_options(args)
    config = GRPOConfig(**options)
    trainer = GRPOTrainer(model=model, reward_funcs=accuracy_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.train()
    if trainer.accelerator.is_main_process:
        report(trainer)
    # destroys the process group: left to interpreter exit, gloo's worker threads can abort the process after
    # a finished run ("terminate called without an active exception"; pytorch/pytorch#190489)
    trainer.accelerator.end_training()
    return trainer


if __name__ == "__main__":
    main()
