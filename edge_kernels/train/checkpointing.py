"""The run's checkpoints (:class:`Checkpointer`): what a resumable run saves, and putting it back on resume.

A checkpoint (:mod:`edge_kernels.train.checkpoint`, atomic) holds the model and tokenizer, AdamW's state (in the
RL phase), the RNG states and the loop state: step, phase (``warmup`` or ``rl``), the sampler's position, the
warm-up evaluation and the seed. On resume the metric lines after the checkpoint's step (the step in flight, or
a half-written line) are dropped, so the resumed run appends exactly what an uninterrupted one would have.

``fault`` (tests only; no option or environment variable reaches it) is called as ``fault(step, point)`` at the
points where a kill must not lose or duplicate a step: ``update`` (after the update, before the metrics line),
``metrics`` (after the metrics line, before the checkpoint) and ``checkpoint`` (the new checkpoint written, not
yet swapped in).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Dict, Optional

from . import checkpoint as ckpt
from .runtime import TrainError

FaultHook = Callable[[int, str], None]


class Checkpointer:
    """Saves and restores the run state of ``trainer`` in its output directory."""

    def __init__(self, trainer, fault: Optional[FaultHook] = None):
        self.t = trainer
        self.fault = fault

    def point(self, step: int, point: str) -> None:
        if self.fault is not None:
            self.fault(step, point)

    def state(self) -> Dict[str, Any]:
        t = self.t
        return {"step": t.step, "phase": t.phase, "sampler": t.sampler.state_dict(), "warmup_eval": t.warmup_eval,
                "seed": t.cfg.seed}

    def save(self) -> None:
        t = self.t
        ckpt.save(t.out, model=t.model, tokenizer=t.tokenizer, optimizer=t.optimizer if t.phase == "rl" else None,
                  state=self.state(), before_swap=lambda: self.point(t.step, "checkpoint"))

    def restore(self) -> None:
        t = self.t
        path = t.resume_from
        state = ckpt.load_state(path)
        if state.get("seed") != t.cfg.seed:
            raise TrainError(f"the checkpoint was written with --seed {state.get('seed')}, not {t.cfg.seed}")
        t.step = int(state["step"])
        t.phase = state["phase"]
        t.warmup_eval = state.get("warmup_eval")
        t.sampler.load_state_dict(state["sampler"])
        if t.phase == "rl":
            ckpt.load_optimizer(path, t.optimizer)
            for g in t.optimizer.param_groups:  # the config, not the checkpoint, sets the hyper-parameters
                g["lr"], g["weight_decay"] = t.cfg.lr, t.cfg.weight_decay
        ckpt.load_rng(path)
        t.engine.sync_weights(t.model)  # the policy's weights changed outside the RL step
        truncate_metrics(t.metrics_path, t.step)
        t.log(f"resumed from {path} at step {t.step} ({t.phase})")


def truncate_metrics(metrics_path: str, last_step: int) -> None:
    """Drop metric lines after ``last_step`` (the step in flight, or a half-written line)."""
    if not os.path.exists(metrics_path):
        return
    keep = []
    with open(metrics_path, encoding="utf-8") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("step", math.inf) <= last_step:
                keep.append(json.dumps(rec) + "\n")
    tmp = metrics_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(keep)
    os.replace(tmp, metrics_path)
