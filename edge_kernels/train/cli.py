"""The ``edge-train`` command (also ``python -m edge_kernels.train``).

``edge-train [OPTIONS]`` trains (with no options: the embedded default into ``./edge-train-out``);
``edge-train eval --model PATH --data PATH`` reports pass@1 = total correct / total problems.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .config import ConfigError, DEFAULT_SYSTEM_PROMPT, add_arguments, build_config, loss_help

DESCRIPTION = """\
EDGE-GRPO end to end: sample G responses per problem, reward them with math-verify, apply Guided Error
Correction to the incorrect ones, score them with the fused log-prob/entropy kernel, compute advantages
(--estimator) and update the policy with the fused clipped policy loss; evaluate pass@1 on held-out problems.
With no options it runs the embedded default (a tiny Qwen2 model and a synthetic arithmetic task built on
the spot, no downloads) and writes ./edge-train-out.

subcommand:
  edge-train eval --model PATH --data PATH   pass@1 of a model on a problem set
"""


def _user_errors():
    from .data import DataError
    from edge_kernels.gec import GECError
    from .loop import TrainError
    from .model import ModelError
    from .rollout import RolloutError

    return (ConfigError, DataError, GECError, TrainError, ModelError, RolloutError)


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-train", description=DESCRIPTION, epilog=loss_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-train eval",
                                description="pass@1 (one sample per problem; greedy by default) with the "
                                            "Qwen2.5-Math prompt: total correct / total problems.")
    p.add_argument("--model", required=True, help="Hugging Face model directory, or an edge-train output "
                                                  "directory (its checkpoint/model)")
    p.add_argument("--data", required=True, help="problems, JSONL or Parquet (problem/answer fields)")
    p.add_argument("--problem-field", default="problem")
    p.add_argument("--answer-field", default="answer")
    p.add_argument("--solution-field", default="solution")
    p.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--max-prompt-tokens", type=int, default=4096)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy [default: 0]")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=64, help="sequences per generate() call")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N problems only (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--output", default=None, help="write per-problem results (JSON) here")
    return p


def run_eval(argv: List[str]) -> int:
    from .data import load_problems
    from .evaluate import evaluate
    from .model import load_pretrained, resolve_device, resolve_dtype
    from .rollout import HFRollout

    a = eval_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if a.max_new_tokens <= 0 or a.batch_size <= 0 or a.temperature < 0:
        raise ConfigError("--max-new-tokens and --batch-size must be > 0 and --temperature >= 0")
    device = resolve_device(a.device)
    model, tok = load_pretrained(a.model, dtype=resolve_dtype(a.dtype, device, embedded=False), device=device)
    problems = load_problems(a.data, problem_field=a.problem_field, answer_field=a.answer_field,
                             solution_field=a.solution_field)
    if a.limit:
        problems = problems[:a.limit]
    from .loop import _progress

    engine = HFRollout(model, tok, batch_size=a.batch_size, progress=_progress(sys.stderr.isatty()))
    res = evaluate(engine, tok, problems, system_prompt=a.system_prompt, max_new_tokens=a.max_new_tokens,
                   temperature=a.temperature, top_p=a.top_p, seed=a.seed, max_prompt_tokens=a.max_prompt_tokens)
    print(res.summary())
    if a.output:
        with open(a.output, "w", encoding="utf-8") as fh:
            json.dump({"correct": res.correct, "total": res.total, "pass_at_1": res.pass_at_1,
                       "results": [{"problem": p.problem, "answer": p.answer, "response": r, "correct": ok}
                                   for p, r, ok in zip(problems, res.responses, res.per_problem)]}, fh, indent=1)
    return 0


def run_train(argv: List[str]) -> int:
    from .loop import train

    ns = train_parser().parse_args(argv)
    cfg = build_config(vars(ns))
    train(cfg)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``edge-train`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "eval":
            return run_eval(argv[1:])
        if argv and argv[0] == "train":
            argv = argv[1:]
        return run_train(argv)
    except _user_errors() as e:
        print(f"edge-train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edge-train: interrupted (resume with --resume OUTPUT_DIR)", file=sys.stderr)
        return 130
