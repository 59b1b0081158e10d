"""PNG plots of a run's ``metrics.jsonl`` (matplotlib, headless Agg backend).

``plots/``: ``reward_accuracy.png`` (reward and policy accuracy, greedy eval pass@1), ``entropy.png``,
``adv_var.png`` (intra-group advantage variance, EDGE-GRPO's Figure 5 quantity), ``zero_adv_frac.png`` (fraction
of zero-advantage groups), each over steps, and ``eval.png``: greedy pass@1, sampled pass@1 and pass@k at every
evaluation point, the warm-up as step 0.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

PLOTS = {
    "reward_accuracy.png": (("reward_mean", "reward (after GEC)"), ("accuracy", "accuracy (rollouts, before GEC)")),
    "entropy.png": (("entropy_mean", "mean token entropy"),),
    "adv_var.png": (("adv_var", "intra-group advantage variance"),),
    "zero_adv_frac.png": (("zero_adv_frac", "zero-advantage group fraction"),),
    # --rollout vllm only (written when a row has it)
    "rollout_logp_diff.png": (("rollout_logp_diff", "mean |vLLM logp - scoring logp| of sampled tokens"),),
}
OPTIONAL_PLOTS = ("rollout_logp_diff.png",)


def read_metrics(path: str) -> List[Dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def smooth(values: Sequence[float], window: int) -> List[float]:
    """Trailing moving average (window clipped at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_eval(evals: Sequence[Tuple[int, Dict[str, Any]]], path: str) -> Optional[str]:
    """``eval.png``: each evaluation point's greedy pass@1, sampled pass@1 and pass@k over steps."""
    if not evals:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    k = next((r["k"] for _, r in evals if "k" in r), None)
    for key, label in (("greedy_pass_at_1", "greedy pass@1"), ("sampled_pass_at_1", "sampled pass@1"),
                       ("pass_at_k", f"pass@{k}")):
        pts = [(s, r[key]) for s, r in evals if key in r]
        if pts:
            ax.plot(*zip(*pts), "o-", label=label)
    ax.set_xlabel("RL step (0: after the warm-up)")
    ax.set_ylabel("held-out")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_metrics(metrics_path: str, out_dir: str,
                 evals: Optional[Sequence[Tuple[int, Dict[str, Any]]]] = None) -> List[str]:
    """Write the PNGs of :data:`PLOTS` for ``metrics_path`` into ``out_dir``, and ``eval.png`` from ``evals``
    (``(step, evaluation record)``, the warm-up at step 0); returns their paths."""
    if not os.path.exists(metrics_path):
        return []
    rows = read_metrics(metrics_path)
    os.makedirs(out_dir, exist_ok=True)
    if not rows:
        return []
    plt = _pyplot()
    steps = [r["step"] for r in rows]
    window = max(1, len(rows) // 20)
    written = []
    for name, series in PLOTS.items():
        if name in OPTIONAL_PLOTS and not any(k in r for r in rows for k, _ in series):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for key, label in series:
            vals = [float(r.get(key, float("nan"))) for r in rows]
            line, = ax.plot(steps, vals, alpha=0.3 if window > 1 else 1.0)
            if window > 1:
                ax.plot(steps, smooth(vals, window), color=line.get_color(), label=f"{label} (avg {window})")
            else:
                line.set_label(label)
        if name == "reward_accuracy.png":
            ev = ([(s, r["greedy_pass_at_1"]) for s, r in evals if "greedy_pass_at_1" in r] if evals else
                  [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r])
            if ev:
                ax.plot(*zip(*ev), "o-", label="eval greedy pass@1")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    ev_path = plot_eval(evals or [], os.path.join(out_dir, "eval.png"))
    return written + ([ev_path] if ev_path else [])


def plot_comparison(runs: Dict[str, List[List[Dict]]], out_path: str, keys=("adv_var", "accuracy"),
                    titles=("intra-group advantage variance", "rollout accuracy")) -> str:
    """Side-by-side panels (one per key) of several methods, each a list of seeds' metric rows: the mean over
    seeds as a line, min-max over seeds shaded (the fidelity script's figure)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.8))
    axes = list(axes) if len(keys) > 1 else [axes]
    for ax, key, title in zip(axes, keys, titles):
        for label, seeds in runs.items():
            n = min(len(s) for s in seeds)
            steps = [seeds[0][i]["step"] for i in range(n)]
            window = max(1, n // 15)
            curves = [smooth([float(s[i][key]) for i in range(n)], window) for s in seeds]
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
            lo = [min(c[i] for c in curves) for i in range(n)]
            hi = [max(c[i] for c in curves) for i in range(n)]
            line, = ax.plot(steps, mean, label=f"{label} (mean of {len(seeds)} seeds)")
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
