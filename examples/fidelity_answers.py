"""What the fidelity study's policies answer: format versus arithmetic, and GEC's "Wait!" pattern.

For each run of ``examples/fidelity_study.py`` (and each seed's warm-up) it runs ``edge-train eval`` on the run's
final checkpoint and the seed's eval split, greedy and sampled at temperature 1 (one sample per problem, the
rollout distribution before GEC), and sorts the answers into: correct; boxed but wrong; unboxed with the right
final number (a format miss); unboxed and wrong. It also counts answers containing "Wait" (GEC's reflection /
injection text, learned by the policy) and more than one ``\\boxed{}``.

    python examples/fidelity_answers.py --out ./fidelity-study --seeds 0 1 2 3 --limit 100 --jobs 2

Writes ``OUT/answers.json`` and ``OUT/answers.md`` (mean over seeds per arm). Resumable like the study.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
CATEGORIES = ("correct", "boxed_wrong", "unboxed_right_number", "unboxed_wrong", "has_wait", "multi_boxed")


def eval_run(run, temperature, limit):
    """Per-problem answers of ``run``'s checkpoint (cached next to the run)."""
    path = f"{run}.answers-T{temperature:g}-n{limit}.json"
    if not os.path.exists(path):
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "edge_kernels.train", "eval", "--model", run, "--data",
               os.path.join(run, "data", "eval.jsonl"), "--max-new-tokens", "48", "--temperature", str(temperature),
               "--limit", str(limit), "--output", path + ".tmp"]
        subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
        os.replace(path + ".tmp", path)
    with open(path) as fh:
        return json.load(fh)["results"]


def categorise(results):
    from edge_kernels.train.rewards import last_boxed

    counts = dict.fromkeys(CATEGORIES, 0)
    for r in results:
        text, boxed = r["response"], last_boxed(r["response"]) is not None
        numbers = re.findall(r"-?\d+", text)
        if r["correct"]:
            counts["correct"] += 1
        elif boxed:
            counts["boxed_wrong"] += 1
        elif numbers and numbers[-1] == r["answer"]:
            counts["unboxed_right_number"] += 1
        else:
            counts["unboxed_wrong"] += 1
        counts["has_wait"] += "Wait" in text
        counts["multi_boxed"] += text.count("\\boxed{") > 1
    return {k: v / len(results) for k, v in counts.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="./fidelity-study")
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    p.add_argument("--arms", nargs="+", default=["warmup", "GRPO", "EDA", "GEC", "EDA+GEC"])
    p.add_argument("--limit", type=int, default=100, help="eval problems per run")
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args(argv)
    out = os.path.abspath(a.out)
    jobs = [(s, arm, t) for s in a.seeds for arm in a.arms for t in (0.0, 1.0)]
    with ThreadPoolExecutor(a.jobs) as pool:
        res = list(pool.map(lambda j: categorise(eval_run(os.path.join(out, f"seed{j[0]}", j[1]), j[2], a.limit)),
                            jobs))
    per_run = [{"seed": s, "arm": arm, "temperature": t, **r} for (s, arm, t), r in zip(jobs, res)]
    lines = [f"Answers of the final policies on {a.limit} eval problems per seed, seeds {a.seeds}: share of "
             "answers per category, mean over seeds", "",
             "| arm | decoding | " + " | ".join(CATEGORIES) + " |", "|---" * (len(CATEGORIES) + 2) + "|"]
    for arm in a.arms:
        for t in (0.0, 1.0):
            rows = [r for r in per_run if r["arm"] == arm and r["temperature"] == t]
            cells = [f"{sum(r[k] for r in rows) / len(rows):.3f}" for k in CATEGORIES]
            lines.append(f"| {arm} | {'greedy' if t == 0 else 'T=1'} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "answers.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(out, "answers.json"), "w") as fh:
        json.dump({"limit": a.limit, "seeds": a.seeds, "runs": per_run}, fh, indent=1)
    print(text)


if __name__ == "__main__":
    main()
