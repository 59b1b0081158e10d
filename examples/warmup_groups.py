"""Where the advantage collapse is at the start of RL: from a warmed-up embedded run (``edge-train --max-steps 0``,
or the fidelity study's ``OUT/seedS/warmup``), sample G responses at temperature 1 for the first N training
problems and report, for one-step and two-step problems apart, the share of all-wrong groups (every response
reward 0: zero advantage under GRPO), of all-right groups, and the sampled accuracy. ``--greedy``: instead, the
greedy answers to the held-out problems of any run directory (its last checkpoint), by kind: correct, boxed but
wrong, unboxed. Offline; one CPU thread.

    python examples/warmup_groups.py /tmp/study/seed0/warmup /tmp/study/seed1/warmup
    python examples/warmup_groups.py --greedy ./edge-train-out
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def _load(run_dir: str, split: str, n: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_kernels.train.data import Problem
    from edge_kernels.train.rollout import make_rollout

    path = os.path.join(run_dir, "checkpoint", "model")
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    with open(os.path.join(run_dir, "data", f"{split}.jsonl")) as fh:
        problems = [Problem(**json.loads(line)) for line in fh][:n]
    engine = make_rollout("hf", model, tok, model_path=None, seed=0, batch_size=256, dtype="float32",
                          gpu_memory_utilization=0.3, progress=None, stop_ids=[tok.eos_token_id],
                          max_model_len=256, autocast_dtype=None)
    return tok, problems, engine


def greedy(run_dir: str, n: int) -> dict:
    """Greedy answers to the held-out problems by kind: shares correct, boxed but wrong, unboxed."""
    from edge_kernels.train.embedded import SYSTEM_PROMPT, is_two_step
    from edge_kernels.train.evaluate import evaluate

    tok, problems, engine = _load(run_dir, "eval", n)
    r = evaluate(engine, tok, problems, system_prompt=SYSTEM_PROMPT, max_new_tokens=48, max_prompt_tokens=1024)
    res = {}
    for kind, two in (("one-step", False), ("two-step", True)):
        idx = [i for i, p in enumerate(problems) if is_two_step(p.solution or "") == two]
        ok = [r.per_problem[i] for i in idx]
        unboxed = [("\\boxed" not in r.responses[i]) for i in idx]
        m = max(len(idx), 1)
        res[kind] = {"problems": len(idx), "correct": sum(ok) / m, "unboxed": sum(unboxed) / m,
                     "boxed_wrong": sum(not o and not u for o, u in zip(ok, unboxed)) / m}
    return res


def groups(run_dir: str, n: int, group_size: int, seed: int) -> dict:
    """Groups of ``group_size`` rollouts at temperature 1 on training problems, by kind: all wrong, all right."""
    from edge_kernels.train.embedded import SYSTEM_PROMPT, is_two_step
    from edge_kernels.train.evaluate import evaluate_sampled

    tok, problems, engine = _load(run_dir, "train", n)
    r = evaluate_sampled(engine, tok, problems, n=group_size, system_prompt=SYSTEM_PROMPT, max_new_tokens=48,
                         temperature=1.0, seed=seed, max_prompt_tokens=1024)
    res = {}
    for kind, two in (("one-step", False), ("two-step", True)):
        counts = [r.counts[i] for i, p in enumerate(problems) if is_two_step(p.solution or "") == two]
        m = max(len(counts), 1)
        res[kind] = {"groups": len(counts), "all_wrong": sum(c == 0 for c in counts) / m,
                     "all_right": sum(c == group_size for c in counts) / m,
                     "accuracy": sum(counts) / (group_size * m)}
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="warmed-up run directories")
    p.add_argument("--problems", type=int, default=200)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--greedy", action="store_true", help="greedy held-out answers by kind instead")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    for run in a.runs:
        if a.greedy:
            g = greedy(run, a.problems)
            print(run, " ".join(f"{k}: correct {v['correct']:.2f} boxed-wrong {v['boxed_wrong']:.2f} unboxed "
                                f"{v['unboxed']:.2f} ({v['problems']});" for k, v in g.items()), flush=True)
            continue
        r = groups(run, a.problems, a.group_size, a.seed)
        print(run, " ".join(f"{k}: all-wrong {v['all_wrong']:.3f} all-right {v['all_right']:.3f} accuracy "
                            f"{v['accuracy']:.3f} ({v['groups']} groups);" for k, v in r.items()), flush=True)


if __name__ == "__main__":
    main()
