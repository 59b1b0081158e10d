"""What a run tells its user (:class:`Reporter`): log lines, ``metrics.jsonl``, the console summary,
``summary.json`` and the plots.

Evaluation points (greedy pass@1, sampled pass@1, pass@k; :mod:`edge_kernels.train.evaluate`) are reported
after the warm-up (as step 0), every ``--eval-every`` steps (in that step's metrics line, ``eval_*``) and at the
end. ``summary.json`` holds ``warmup_eval`` and ``final_eval`` (each the full record) and the flat keys
``{greedy_pass_at_1,sampled_pass_at_1,pass_at_k}_{warmup,final}`` and their ``_change``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

EVAL_KEYS = ("greedy_pass_at_1", "sampled_pass_at_1", "pass_at_k")


class Reporter:
    """Log lines (through ``log`` if given, else stdout, above the progress bars), metrics and the summary."""

    def __init__(self, out: str, progress: bool, log: Optional[Callable[[str], None]] = None):
        self.out = out
        self.progress = progress
        self._log = log
        self.metrics_path = os.path.join(out, "metrics.jsonl")

    def log(self, msg: str) -> None:
        if self._log is not None:
            self._log(msg)
        elif self.progress:
            from tqdm.auto import tqdm

            tqdm.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)

    def write_metrics(self, rec: Dict[str, Any]) -> None:
        """Append one line and fsync it (a kill after this never loses the step)."""
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    @staticmethod
    def line(rec: Dict[str, Any]) -> str:
        s = (f"step {rec['step']:4d} | reward {rec['reward_mean']:.3f} | acc {rec['accuracy']:.3f} | "
             f"H {rec['entropy_mean']:.3f} | adv_var {rec['adv_var']:.3f} | zero_adv {rec['zero_adv_frac']:.2f} | "
             f"loss {rec['loss']:+.4f} | gec {rec['gec_applied']:3d} | {rec['step_time_s']:.2f}s")
        if "eval_accuracy" in rec:
            s += f" | eval greedy {rec['eval_accuracy']:.3f}"
        if "eval_sampled_pass_at_1" in rec:
            s += f" sampled {rec['eval_sampled_pass_at_1']:.3f} pass@{rec['eval_k']} {rec['eval_pass_at_k']:.3f}"
        return s

    @staticmethod
    def eval_line(rec: Dict[str, Any]) -> str:
        parts = [f"greedy pass@1 {rec['correct']}/{rec['total']} = {rec['greedy_pass_at_1']:.4f}"]
        if "sampled_pass_at_1" in rec:
            parts.append(f"sampled pass@1 (mean of {rec['samples']}) {rec['sampled_pass_at_1']:.4f}")
            parts.append(f"pass@{rec['k']} {rec['pass_at_k']:.4f}")
        return ", ".join(parts)

    @staticmethod
    def summary_fields(warm: Optional[Dict[str, Any]], final: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        """The flat ``summary.json`` keys of the two evaluation points and their change."""
        out: Dict[str, Any] = {}
        for key in EVAL_KEYS:
            for name, rec in (("warmup", warm), ("final", final)):
                if rec is not None and key in rec:
                    out[f"{key}_{name}"] = rec[key]
            if f"{key}_warmup" in out and f"{key}_final" in out:
                out[f"{key}_change"] = round(out[f"{key}_final"] - out[f"{key}_warmup"], 6)
        k = (final or warm or {}).get("k")
        if k is not None:
            out["pass_at_k_k"] = k
        return out

    def summary_text(self, summary: Dict[str, Any]) -> str:
        lines = [f"done: {summary['steps']} RL steps in {summary['wall_time_s']:.1f}s wall, "
                 f"{summary['cpu_time_s']:.1f}s CPU; outputs in {self.out}"]
        w, f = summary.get("warmup_eval"), summary.get("final_eval")
        if w is not None:
            lines.append(f"  eval after warm-up: {self.eval_line(w)}")
        if f is not None:
            lines.append(f"  eval after RL:      {self.eval_line(f)}")
        if w is not None and f is not None:
            ch = [f"{name} {summary[key + '_change']:+.4f}" for key, name in
                  zip(EVAL_KEYS, ("greedy pass@1", "sampled pass@1", f"pass@{f.get('k')}"))
                  if key + "_change" in summary]
            lines.append("  change: " + ", ".join(ch))
        return "\n".join(lines)

    def finish(self, summary: Dict[str, Any], evals: List[Tuple[int, Dict[str, Any]]]) -> None:
        """Plots (a failure is a warning, never a lost run), ``summary.json``, the console summary."""
        try:
            from .plots import plot_metrics

            plot_metrics(self.metrics_path, os.path.join(self.out, "plots"), evals=evals)
        except Exception as e:  # noqa: BLE001 - a plotting failure must not lose a finished run
            self.log(f"warning: plots not written ({type(e).__name__}: {e})")
        with open(os.path.join(self.out, "summary.json"), "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=1)
        self.log(self.summary_text(summary))
