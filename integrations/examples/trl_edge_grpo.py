#!/usr/bin/env python
"""EDGE-GRPO (EDA + GEC) with TRL's GRPOTrainer and the edge-kernels fused log-prob / entropy kernel.

The only change from a plain TRL script is the import:

    from edge_kernels.integrations.trl import EdgeGRPOConfig as GRPOConfig, EdgeGRPOTrainer as GRPOTrainer

Run (GPU, a math dataset with ``problem`` / ``answer`` / ``solution`` columns, e.g. DeepScaleR's layout):

    pip install 'edge-kernels[trl,train]'
    python integrations/examples/trl_edge_grpo.py --model Qwen/Qwen2.5-Math-1.5B \\
        --dataset agentica-org/DeepScaleR-Preview-Dataset --estimator eda --gec --use-edge-kernels --bf16

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

    cfg = TrainConfig(output=os.path.join(output_dir, "embedded-warmup"), warmup_steps=warmup_steps,
                      warmup_batch_size=16, embedded_train_size=512, embedded_eval_size=1, embedded_hidden_size=64,
                      embedded_intermediate_size=192, max_new_tokens=32, progress=False, seed=0)
    tr = Trainer(cfg)
    tr.setup()
    tr.warmup()
    rows = [{"problem": p.problem, "answer": p.answer, "solution": p.solution} for p in tr.train_problems]
    return tr.model, tr.tokenizer, datasets.Dataset.from_list(rows)


SMOKE = dict(max_steps=3, num_generations=4, per_device_train_batch_size=16, max_completion_length=32,
             use_cpu=True, gec_max_new_tokens=16, learning_rate=1e-4, temperature=1.0)


def report(trainer) -> None:
    """One line per step: what the estimator and GEC did, and the loss."""
    for h in trainer.state.log_history:
        if "loss" in h:
            print(f"step {h.get('step')}: loss {h['loss']:+.4f} | reward {h.get('reward', float('nan')):.3f} | "
                  f"zero-advantage groups {h.get('edge/zero_adv_group_frac', float('nan')):.2f} | adv var "
                  f"{h.get('edge/adv_group_var', float('nan')):.4f} | GEC regenerated/injected/replaced "
                  f"{h.get('gec/regenerated_frac', 0):.2f}/{h.get('gec/injected_frac', 0):.2f}/"
                  f"{h.get('gec/replaced_frac', 0):.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="Qwen/Qwen2.5-Math-1.5B")
    p.add_argument("--dataset", default="agentica-org/DeepScaleR-Preview-Dataset")
    p.add_argument("--split", default="train")
    p.add_argument("--problem-field", default="problem")
    p.add_argument("--estimator", default="eda", choices=["grpo", "eda", "egpo", "prog_grpo", "ep_grpo"])
    p.add_argument("--gec", action=argparse.BooleanOptionalAction, default=None,
                   help="Guided Error Correction (needs answer/solution columns; default: on with --smoke)")
    p.add_argument("--use-edge-kernels", action="store_true")
    p.add_argument("--output-dir", default="runs/trl-edge-grpo")
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--per-device-batch", type=int, default=8)
    p.add_argument("--max-completion-length", type=int, default=1024)
    p.add_argument("--learning-rate", type=float, default=1e-6)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--use-vllm", action="store_true", help="(not with --gec)")
    p.add_argument("--smoke", action="store_true", help="offline: the embedded warmed-up model and task, a few "
                                                       "steps on the CPU")
    p.add_argument("--smoke-warmup-steps", type=int, default=100, help="supervised warm-up steps of --smoke")
    args = p.parse_args(argv)

    from edge_kernels.integrations.trl import EdgeGRPOConfig as GRPOConfig, EdgeGRPOTrainer as GRPOTrainer

    model, tokenizer, overrides = args.model, None, {}
    if args.smoke:
        model, tokenizer, rows = warmed_up_embedded(args.output_dir, args.smoke_warmup_steps)
        overrides = dict(SMOKE, use_edge_kernels=True)
    else:
        rows = load_rows(args)
    dataset = rows.map(lambda r: to_prompt(r, args.problem_field))
    options = dict(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        num_generations=args.num_generations,
        per_device_train_batch_size=args.per_device_batch,
        max_completion_length=args.max_completion_length,
        learning_rate=args.learning_rate,
        bf16=args.bf16,
        use_vllm=args.use_vllm,
        beta=0.0,
        loss_type="dapo",
        epsilon_high=0.28,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        # edge-kernels options
        advantage_estimator=args.estimator,
        gec=args.smoke if args.gec is None else args.gec,
        use_edge_kernels=args.use_edge_kernels,
    )
    options.update(overrides)
    config = GRPOConfig(**options)
    trainer = GRPOTrainer(model=model, reward_funcs=accuracy_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.train()
    report(trainer)
    return trainer


if __name__ == "__main__":
    main()
