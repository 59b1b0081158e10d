"""Fidelity check: vanilla GRPO vs EDGE-GRPO (EDA + GEC) on edge-train's embedded task, 3 seeds each.

The analogue of EDGE-GRPO's Figure 5 (arXiv 2507.21848): intra-group advantage variance and accuracy over
training steps, side by side. For each seed the supervised warm-up runs once (``--max-steps 0``); the warmed-up
run directory is copied and resumed twice, once as vanilla GRPO (``--estimator grpo --no-gec``) and once as
EDGE-GRPO (``--estimator eda --gec``, the default), so both methods start from the same weights.

    python examples/fidelity_eda_vs_grpo.py --out ./fidelity-out            # 3 seeds x 2 methods, 80 steps
    python examples/fidelity_eda_vs_grpo.py --seeds 0 --steps 20 --jobs 1   # a quick look

Writes ``OUT/fidelity.png`` (advantage variance | rollout accuracy, mean over seeds with the min-max band),
``OUT/results.json`` and a table on stdout. Not run in CI (about 15-30 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {
    "GRPO": ["--estimator", "grpo", "--no-gec"],
    "EDGE-GRPO": ["--estimator", "eda", "--gec"],
}


def edge_train(args, log_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "edge_kernels.train", "--no-progress", *args], cwd=REPO,
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"edge-train {' '.join(args)} failed; see {log_path}")


def read_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_summary(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as fh:
        return json.load(fh)


def run_seed(seed, out, steps, eval_every, extra):
    base = os.path.join(out, f"seed{seed}")
    warm = os.path.join(base, "warmup")
    if not os.path.exists(os.path.join(warm, "summary.json")):
        shutil.rmtree(warm, ignore_errors=True)
        edge_train(["--output", warm, "--seed", str(seed), "--max-steps", "0", *extra], warm + ".log")
    return warm


def run_method(seed, method, out, steps, eval_every):
    base = os.path.join(out, f"seed{seed}")
    run = os.path.join(base, method)
    if os.path.exists(os.path.join(run, "summary.json")) and read_summary(run)["steps"] == steps:
        return run
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(os.path.join(base, "warmup"), run)
    edge_train(["--resume", run, "--max-steps", str(steps), "--eval-every", str(eval_every), *METHODS[method]],
               run + ".log")
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="./fidelity-out")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (each uses one CPU thread)")
    p.add_argument("extra", nargs="*", help="more edge-train flags for every run (after --)")
    a = p.parse_args(argv)
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)

    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(lambda s: run_seed(s, out, a.steps, a.eval_every, a.extra), a.seeds))
        jobs = [(s, m) for s in a.seeds for m in METHODS]
        list(pool.map(lambda sm: run_method(sm[0], sm[1], out, a.steps, a.eval_every), jobs))

    from edge_kernels.train.plots import plot_comparison

    runs = {m: [read_rows(os.path.join(out, f"seed{s}", m)) for s in a.seeds] for m in METHODS}
    fig = plot_comparison(runs, os.path.join(out, "fidelity.png"), keys=("adv_var", "accuracy"),
                          titles=("intra-group advantage variance", "rollout accuracy (before GEC)"))

    results = {}
    for m in METHODS:
        per_seed = []
        for s, rows in zip(a.seeds, runs[m]):
            summ = read_summary(os.path.join(out, f"seed{s}", m))
            tail = rows[-20:]
            per_seed.append({
                "seed": s,
                "adv_var_mean": sum(r["adv_var"] for r in rows) / len(rows),
                "zero_adv_frac_mean": sum(r["zero_adv_frac"] for r in rows) / len(rows),
                "rollout_accuracy_last20": sum(r["accuracy"] for r in tail) / len(tail),
                "eval_warmup": summ["warmup_eval"]["pass_at_1"],
                "eval_final": summ["final_eval"]["pass_at_1"],
                "eval_curve": [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r],
                "wall_time_s": summ["wall_time_s"],
            })
        results[m] = per_seed
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump({"steps": a.steps, "seeds": a.seeds, "results": results}, fh, indent=1)

    print(f"{'method':<10} {'seed':>4} {'adv_var':>8} {'zero_adv':>8} {'acc(last20)':>11} {'eval warm-up':>12} "
          f"{'eval final':>10}")
    for m, per_seed in results.items():
        for r in per_seed:
            print(f"{m:<10} {r['seed']:>4} {r['adv_var_mean']:>8.3f} {r['zero_adv_frac_mean']:>8.3f} "
                  f"{r['rollout_accuracy_last20']:>11.3f} {r['eval_warmup']:>12.3f} {r['eval_final']:>10.3f}")
        mean = lambda k: sum(r[k] for r in per_seed) / len(per_seed)  # noqa: E731
        print(f"{m:<10} {'mean':>4} {mean('adv_var_mean'):>8.3f} {mean('zero_adv_frac_mean'):>8.3f} "
              f"{mean('rollout_accuracy_last20'):>11.3f} {mean('eval_warmup'):>12.3f} {mean('eval_final'):>10.3f}")
    print(f"figure: {fig}")


if __name__ == "__main__":
    main()
