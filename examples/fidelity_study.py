"""Fidelity study: GRPO vs EDA, GEC, EDA + GEC (EDGE-GRPO), EGPO, ProGRPO and EP-GRPO on edge-train's embedded
default, paired by seed, with bootstrap 95% intervals.

For each seed the supervised warm-up runs once (``--max-steps 0``) and is cached; every arm resumes a copy of
it, so all arms of a seed start from the same weights. Arms (edge-train flags):

    GRPO      --estimator grpo --no-gec        EDA       --estimator eda --no-gec
    GEC       --estimator grpo --gec           EDA+GEC   --estimator eda --gec      (EDGE-GRPO)
    EGPO      --estimator egpo --no-gec        ProGRPO   --estimator prog_grpo --no-gec
    EP-GRPO   --estimator ep_grpo --no-gec     GEC-mask  --estimator grpo --gec --gec-mask-injected

Per run it records the change from the warm-up of greedy and of sampled eval pass@1 (held-out problems; sampled:
the mean over ``--eval-samples`` responses at the rollout temperature), the mean of the last 20 rollout
accuracies (before GEC), and the run means of the intra-group advantage variance and the zero-advantage group
fraction; per arm the mean over seeds with a percentile-bootstrap 95% interval (resampling seeds), and per arm
the paired difference to GRPO (same seed) with its interval and the seeds higher / lower. Resumable: a run
whose ``OUT/seedS/ARM.json`` exists is skipped, and a killed run continues from its last checkpoint (edge-train saves
every step). Prints the total wall time.

    python examples/fidelity_study.py --out ./fidelity-study --seeds 0 1 2 3 4 5 6 7 --jobs 2
    python examples/fidelity_study.py --out /tmp/probe --seeds 0 --arms GRPO --steps 10   # a timing probe

Writes ``OUT/results.json``, ``OUT/table.md``, ``OUT/fidelity_intervals.png`` (per-seed values, paired lines,
mean and interval per arm) and ``OUT/fidelity_curves.png`` (advantage variance and rollout accuracy over steps).
Runs are deterministic per machine (same code, same seed, same machine), not across machines.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = {
    "GRPO": ["--estimator", "grpo", "--no-gec"],
    "EDA": ["--estimator", "eda", "--no-gec"],
    "GEC": ["--estimator", "grpo", "--gec"],
    "EDA+GEC": ["--estimator", "eda", "--gec"],
    "EGPO": ["--estimator", "egpo", "--no-gec"],
    "ProGRPO": ["--estimator", "prog_grpo", "--no-gec"],
    "EP-GRPO": ["--estimator", "ep_grpo", "--no-gec"],
    "GEC-mask": ["--estimator", "grpo", "--gec", "--gec-mask-injected"],
}
METRICS = {  # key in a run's record: label
    "greedy_change": "greedy eval pass@1, change from warm-up",
    "sampled_change": "sampled eval pass@1, change from warm-up",
    "rollout_acc_last20": "rollout accuracy, last 20 steps (before GEC)",
    "adv_var": "intra-group advantage variance (run mean)",
    "zero_adv_frac": "zero-advantage group fraction (run mean)",
}
# logged per step, averaged over the run for the investigation of where the arms differ
EXTRA = ("reward_mean", "accuracy", "entropy_mean", "gec_applied", "gec_regenerate", "gec_inject",
         "gec_reference", "response_len_mean", "adv_abs_mean", "clip_frac")

SECONDARY = {  # label: value of a run's record
    "greedy eval pass@1 (final)": lambda r: r["eval_final"],
    "sampled eval pass@1 (final)": lambda r: r["sampled_final"],
    "pass@8 change from warm-up": lambda r: r["pass_k_final"] - r["pass_k_warmup"],
    "reward, last 20 steps": lambda r: r["reward_last20"],
    "entropy (run mean)": lambda r: r["run_means"]["entropy_mean"],
    "GEC-modified responses per step (of 64)": lambda r: r["run_means"]["gec_applied"],
    "trained length (tokens)": lambda r: r["run_means"]["response_len_mean"],
}


def edge_train(args, log_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log_path, "a") as log:
        proc = subprocess.run([sys.executable, "-m", "edge_kernels.train", "--no-progress", *args], cwd=REPO,
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"edge-train {' '.join(args)} failed; see {log_path}")


def read_json(path):
    with open(path) as fh:
        return json.load(fh)


def read_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


_LOCKS = collections.defaultdict(threading.Lock)


def warmup(seed, out, extra):
    """The seed's warmed-up run directory (built once, under a per-seed lock; its summary holds the warm-up
    eval)."""
    warm = os.path.join(out, f"seed{seed}", "warmup")
    with _LOCKS[seed]:
        _warmup(seed, warm, extra)
    return warm


def _warmup(seed, warm, extra):
    if not os.path.exists(os.path.join(warm, "summary.json")):
        shutil.rmtree(warm, ignore_errors=True)
        os.makedirs(os.path.dirname(warm), exist_ok=True)
        edge_train(["--output", warm, "--seed", str(seed), "--max-steps", "0", *extra], warm + ".log")


def run_arm(seed, arm, out, steps, eval_every):
    """Train one arm from the seed's warm-up; returns its record (cached in ``OUT/seedS/ARM.json``)."""
    base = os.path.join(out, f"seed{seed}")
    record_path = os.path.join(base, f"{arm}.json")
    if os.path.exists(record_path):
        return read_json(record_path)
    run = os.path.join(base, arm)
    if not os.path.exists(os.path.join(run, "config.yaml")):  # not started (or the copy was cut short)
        shutil.rmtree(run + ".tmp", ignore_errors=True)
        shutil.copytree(os.path.join(base, "warmup"), run + ".tmp")
        shutil.rmtree(run, ignore_errors=True)
        os.replace(run + ".tmp", run)
    edge_train(["--resume", run, "--max-steps", str(steps), "--eval-every", str(eval_every), *ARMS[arm]],
               run + ".log")
    record = summarise(seed, arm, run, steps)
    with open(record_path + ".tmp", "w") as fh:
        json.dump(record, fh, indent=1)
    os.replace(record_path + ".tmp", record_path)
    return record


def summarise(seed, arm, run, steps):
    summ = read_json(os.path.join(run, "summary.json"))
    rows = [r for r in read_rows(run) if "adv_var" in r]
    if summ["steps"] != steps or len(rows) != steps:
        raise RuntimeError(f"{run}: {summ['steps']} steps in summary, {len(rows)} logged, expected {steps}")
    mean = lambda k: sum(float(r[k]) for r in rows) / len(rows)  # noqa: E731
    tail = rows[-20:]
    return {
        "seed": seed, "arm": arm, "steps": steps,
        "eval_warmup": summ["greedy_pass_at_1_warmup"],
        "eval_final": summ["greedy_pass_at_1_final"],
        "sampled_warmup": summ["sampled_pass_at_1_warmup"],
        "sampled_final": summ["sampled_pass_at_1_final"],
        "pass_k_warmup": summ["pass_at_k_warmup"],
        "pass_k_final": summ["pass_at_k_final"],
        "greedy_change": summ["greedy_pass_at_1_change"],
        "sampled_change": summ["sampled_pass_at_1_change"],
        "rollout_acc_last20": sum(r["accuracy"] for r in tail) / len(tail),
        "reward_last20": sum(r["reward_mean"] for r in tail) / len(tail),
        "adv_var": mean("adv_var"),
        "zero_adv_frac": mean("zero_adv_frac"),
        "run_means": {k: mean(k) for k in EXTRA if k in rows[0]},
        "curves": {k: [r[k] for r in rows] for k in ("adv_var", "accuracy", "reward_mean", "entropy_mean")},
        "eval_curve": [(r["step"], r["eval_accuracy"]) for r in read_rows(run) if "eval_accuracy" in r],
        "wall_time_s": summ["wall_time_s"],
        "cpu_time_s": summ.get("cpu_time_s"),
    }


def bootstrap_ci(values, n_boot=10000, seed=0):
    """Mean and percentile-bootstrap 95% interval of ``values`` (resampled with replacement)."""
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choice(values) for _ in range(n)) / n for _ in range(n_boot))
    return {"mean": sum(values) / n, "lo": means[int(0.025 * n_boot)], "hi": means[int(0.975 * n_boot) - 1],
            "n": n}


def analyse(records, arms, seeds):
    """Per-arm means and paired differences to GRPO, each with a bootstrap 95% interval (over the seeds where
    every arm finished)."""
    by = {(r["seed"], r["arm"]): r for r in records}
    seeds = [s for s in seeds if all((s, a) in by for a in arms)]
    stats = {}
    for arm in arms:
        stats[arm] = {}
        for key in METRICS:
            vals = [by[(s, arm)][key] for s in seeds]
            entry = {"per_seed": vals, **bootstrap_ci(vals)}
            if arm != "GRPO" and "GRPO" in arms:
                diffs = [by[(s, arm)][key] - by[(s, "GRPO")][key] for s in seeds]
                entry["diff_to_grpo"] = {"per_seed": diffs, **bootstrap_ci(diffs),
                                         "wins": sum(d > 0 for d in diffs), "losses": sum(d < 0 for d in diffs)}
            stats[arm][key] = entry
        rs = [by[(s, arm)] for s in seeds]
        stats[arm]["secondary"] = {k: bootstrap_ci([f(r) for r in rs]) for k, f in SECONDARY.items()}
    return stats


def fmt(e):
    return f"{e['mean']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}]"


def table(stats, arms, warm, steps, seeds):
    lines = [f"{len(seeds)} seeds ({' '.join(map(str, seeds))}), {steps} RL steps per run; mean over seeds "
             "[bootstrap 95% interval]", "",
             "| arm | " + " | ".join(METRICS.values()) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for arm in arms:
        lines.append(f"| {arm} | " + " | ".join(fmt(stats[arm][k]) for k in METRICS) + " |")
    lines += ["", "Paired difference to GRPO (same seed, same warm-up), mean [95% interval] (seeds higher / lower):",
              "", "| arm | " + " | ".join(METRICS.values()) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for arm in arms:
        if arm != "GRPO":
            cells = [f"{fmt(stats[arm][k]['diff_to_grpo'])} ({stats[arm][k]['diff_to_grpo']['wins']}/"
                     f"{stats[arm][k]['diff_to_grpo']['losses']})" for k in METRICS]
            lines.append(f"| {arm} - GRPO | " + " | ".join(cells) + " |")
    lines += ["", "Logged during training, mean over seeds [95% interval] (reward after GEC; entropy and length "
              "over the trained batch, GEC's added text included):", "", "| arm | " + " | ".join(SECONDARY) + " |",
              "|---" * (len(SECONDARY) + 1) + "|"]
    for arm in arms:
        lines.append(f"| {arm} | " + " | ".join(fmt(stats[arm]['secondary'][k]) for k in SECONDARY) + " |")
    lines += ["", "Warm-up eval (greedy / sampled pass@1) per seed: " + ", ".join(
        f"{s}: {warm[s][0]:.3f} / {warm[s][1]:.3f}" for s in seeds)]
    return "\n".join(lines) + "\n"


def plot_intervals(stats, arms, path):
    from edge_kernels.train.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 4.2))
    for ax, (key, label) in zip(axes, METRICS.items()):
        per_seed = [stats[a][key]["per_seed"] for a in arms]
        for i in range(len(per_seed[0])):
            ax.plot(range(len(arms)), [p[i] for p in per_seed], color="0.75", lw=0.8, marker="o", ms=3)
        for j, a in enumerate(arms):
            e = stats[a][key]
            ax.errorbar([j + 0.15], [e["mean"]], yerr=[[e["mean"] - e["lo"]], [e["hi"] - e["mean"]]],
                        fmt="s", color="k", capsize=4)
        ax.set_xticks(range(len(arms)), arms, rotation=45, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(out, records, arms, seeds, steps, wall_s):
    from edge_kernels.train.plots import plot_comparison

    warm = {r["seed"]: (r["eval_warmup"], r["sampled_warmup"]) for r in records}
    by = {(r["seed"], r["arm"]) for r in records}
    seeds = [s for s in seeds if all((s, a) in by for a in arms)]  # whole seeds only
    records = [r for r in records if r["seed"] in seeds]
    stats = analyse(records, arms, seeds)
    text = table(stats, arms, warm, steps, seeds)
    with open(os.path.join(out, "table.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump({"steps": steps, "seeds": seeds, "arms": {a: ARMS[a] for a in arms}, "metrics": METRICS,
                   "stats": stats, "warmup_eval": warm, "wall_time_s_this_invocation": round(wall_s, 1),
                   "wall_time_s_sum_of_runs": round(sum(r["wall_time_s"] for r in records), 1),
                   "runs": records}, fh, indent=1)
    plot_intervals(stats, arms, os.path.join(out, "fidelity_intervals.png"))
    runs = {a: [[{"step": i + 1, **{k: r["curves"][k][i] for k in r["curves"]}} for i in range(steps)]
                for r in records if r["arm"] == a] for a in arms}
    plot_comparison(runs, os.path.join(out, "fidelity_curves.png"), keys=("adv_var", "accuracy"),
                    titles=("intra-group advantage variance", "rollout accuracy (before GEC)"))
    print(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="./fidelity-study")
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    p.add_argument("--arms", nargs="+", default=[a for a in ARMS if a != "GEC-mask"], choices=list(ARMS))
    p.add_argument("--steps", type=int, default=None, help="RL steps per run (default: the embedded default's)")
    p.add_argument("--eval-every", type=int, default=0, help="0: eval after warm-up and at the end only")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (each uses one CPU thread)")
    p.add_argument("extra", nargs="*", help="more edge-train flags for the warm-up run (after --); the arms "
                                            "inherit them through the copied config.yaml")
    p.add_argument("--report-only", action="store_true", help="no runs: report the finished ones (whole seeds)")
    a = p.parse_args(argv)
    if a.steps is None:
        sys.path.insert(0, REPO)
        from edge_kernels.train.config import TrainConfig, resolve

        a.steps = resolve(TrainConfig()).max_steps
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    jobs = [(s, arm) for s in a.seeds for arm in a.arms]
    if a.report_only:
        paths = [os.path.join(out, f"seed{s}", f"{arm}.json") for s, arm in jobs]
        records = [read_json(q) for q in paths if os.path.exists(q)]
    else:
        with ThreadPoolExecutor(a.jobs) as pool:
            # seed-major (warm-up, then its arms), so a cut-short study has whole seeds
            def one(sa):
                warmup(sa[0], out, a.extra)
                return run_arm(sa[0], sa[1], out, a.steps, a.eval_every)

            records = list(pool.map(one, jobs))
    wall = time.time() - t0
    report(out, records, a.arms, a.seeds, a.steps, wall)
    print(f"total wall time: {wall:.0f} s ({len(records)} runs, --jobs {a.jobs})")


if __name__ == "__main__":
    main()
