"""What every part of the loop shares: the user-facing :class:`TrainError`, the OOM guard that names the option
that helps, stable seed mixing, progress bars, and per-phase wall and CPU timers."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Dict

import torch


class TrainError(RuntimeError):
    """A run that cannot go on, with what to do about it (reported without a traceback)."""


_OOM_HINTS = {
    "rollout": "lower --rollout-batch-size, --max-new-tokens or --gec-max-new-tokens",
    "scoring": "set --micro-batch-size (a multiple of --group-size), or lower --max-new-tokens",
    "update": "set --micro-batch-size (a multiple of --group-size) or pass --gradient-checkpointing",
    "warmup": "lower --warmup-batch-size",
    "eval": "lower --rollout-batch-size or --max-new-tokens",
}


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike hash())."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


@contextmanager
def oom_guard(phase: str):
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - re-raised unless it is an OOM
        if _is_oom(e):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise TrainError(f"out of memory during {phase}: {_OOM_HINTS[phase]}") from e
        raise


def progress(enabled: bool):
    """A tqdm factory writing to stderr, or None."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    def make(iterable=None, **kw):
        return tqdm(iterable, leave=False, dynamic_ncols=True, file=sys.stderr, **kw)

    return make


class PhaseTimer:
    """Wall and process-CPU seconds per named phase (``with timer("rollout"): ...``). CPU time is what a shared
    machine cannot inflate: on an idle machine wall time is about CPU time / threads in use."""

    def __init__(self):
        self.wall: Dict[str, float] = {}
        self.cpu: Dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[phase] = self.wall.get(phase, 0.0) + time.perf_counter() - w
            self.cpu[phase] = self.cpu.get(phase, 0.0) + time.process_time() - c

    def record(self) -> Dict[str, float]:
        out = {f"{k}_time_s": round(v, 4) for k, v in self.wall.items()}
        out.update({f"{k}_cpu_time_s": round(v, 4) for k, v in self.cpu.items()})
        return out
