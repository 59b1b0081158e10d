"""Timing and peak memory of one row: ``bench`` (CUDA: ``triton.testing.do_bench``; CPU: a
``perf_counter`` loop), ``run_with_peak``, the run deadline, ``Skip`` and ``measure_row`` (time + peak +
error of one implementation, or the reason it was skipped).

Conventions (also in README.md):

* Time: on CUDA, ``triton.testing.do_bench`` (L2 flushed before every rep), median and the p20/p80 quantiles
  in ms; the warmup/rep windows are stretched so that at least ``min_reps`` reps are timed. On the CPU, a
  ``time.perf_counter`` loop (median, p20, p80) after one warmup call.
* Peak memory: on CUDA, ``max_memory_allocated`` during one call minus ``memory_allocated`` before it (GiB,
  after ``reset_peak_memory_stats``), so it counts the call's outputs and gradients but not its inputs.
  On the CPU: n/a.
* Errors: max |x - x_oracle| over all rows, the oracle being float64 math on the (already rounded) inputs,
  computed in row chunks on the same device.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

from .env import GIB, free_memory, sync


# ----------------------------------------------------------------------------------------------------------
# timing and memory


@dataclass
class Timing:
    median: float  # ms
    p20: float
    p80: float


def _quantile(sorted_vals: List[float], q: float) -> float:
    pos = q * (len(sorted_vals) - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


@dataclass
class TimingConfig:
    min_reps: int = 10  # CUDA: do_bench's rep window is stretched to fit at least this many reps
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cpu_max_s: float = 1.0  # CPU: stop after this long (at least cpu_min_reps reps)
    cpu_min_reps: int = 3
    cpu_max_reps: int = 20
    cpu_warmup: bool = True  # one untimed call first (off for rows whose calls are very slow, e.g. the interpreter)


def bench(fn: Callable[[], Any], device: torch.device, cfg: Optional[TimingConfig] = None) -> Timing:
    """Median / p20 / p80 of ``fn()`` in ms (``cfg``: the defaults of :class:`TimingConfig` when None)."""
    cfg = TimingConfig() if cfg is None else cfg
    if device.type == "cuda":
        from triton.testing import do_bench

        fn()
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        est = max(start.elapsed_time(end), 1e-3)
        q = do_bench(fn, warmup=max(cfg.warmup_ms, 2 * est), rep=max(cfg.rep_ms, cfg.min_reps * est),
                     quantiles=[0.5, 0.2, 0.8])
        return Timing(float(q[0]), float(q[1]), float(q[2]))
    if cfg.cpu_warmup:
        fn()
    times: List[float] = []
    t_start = time.perf_counter()
    while len(times) < cfg.cpu_max_reps and (
        len(times) < cfg.cpu_min_reps or time.perf_counter() - t_start < cfg.cpu_max_s
    ):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return Timing(_quantile(times, 0.5), _quantile(times, 0.2), _quantile(times, 0.8))


def run_with_peak(fn: Callable[[], Any], device: torch.device):
    """``(fn(), peak incremental GiB or None on CPU)``."""
    if device.type != "cuda":
        return fn(), None
    free_memory(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    return out, (torch.cuda.max_memory_allocated(device) - before) / GIB


_DEADLINE: Optional[float] = None  # time.perf_counter() value after which rows are skipped (--budget-s)


def set_deadline(seconds_from_now: Optional[float]) -> None:
    global _DEADLINE
    _DEADLINE = None if seconds_from_now is None else time.perf_counter() + seconds_from_now


def past_deadline() -> bool:
    return _DEADLINE is not None and time.perf_counter() > _DEADLINE


class Skip(Exception):
    """Raised by a row builder: the row is reported as ``skipped: <reason>``."""


def is_oom(exc: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch.cuda, "OutOfMemoryError", None),
                                  getattr(torch, "OutOfMemoryError", None)) if t is not None)
    return isinstance(exc, oom_types) or "out of memory" in str(exc).lower()


def short_reason(exc: BaseException, limit: int = 160) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def max_abs_err(x: Optional[torch.Tensor], ref: Optional[torch.Tensor]) -> Optional[float]:
    if x is None or ref is None:
        return None
    return float((x.detach().double().reshape(-1) - ref.reshape(-1)).abs().max().item())


def measure_row(name: str, build: Callable[[], Callable[[], Any]], device: torch.device, timing: TimingConfig, *,
                oracle: Optional[tuple] = None, check: Optional[Callable[[Any], Dict[str, Any]]] = None,
                warmup_first: bool = True, note: str = "") -> Dict[str, Any]:
    """Build and measure one table row; never raises.

    ``build()`` returns ``fn`` (or raises :class:`Skip`); ``fn()`` returns a tuple whose first two entries are
    ``(logp, entropy_or_None)``. Order: one warmup call (unless ``warmup_first=False``: for rows that mutate
    their inputs, whose first call must see fresh data), one call under the peak-memory probe whose outputs
    are checked against ``oracle = (logp64, entropy64)`` (or passed to ``check(out) -> dict of row fields``),
    then the timing loop.
    """
    row: Dict[str, Any] = {"impl": name, "status": "ok", "note": note}
    fn = out = None
    t_row = time.perf_counter()
    try:
        if past_deadline():
            raise Skip("time budget (--budget-s) used up")
        fn = build()
        if warmup_first:
            fn()
            sync(device)
        out, peak = run_with_peak(fn, device)
        row["peak_gib"] = peak
        if oracle is not None:
            row["err_logp"] = max_abs_err(out[0], oracle[0])
            row["err_entropy"] = max_abs_err(out[1], oracle[1])
        if check is not None:
            row.update(check(out))
        out = None
        t = bench(fn, device, timing)
        row.update(ms=t.median, p20=t.p20, p80=t.p80)
    except Skip as exc:
        row.update(status="skipped", reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - a failing row must never take the run down
        if is_oom(exc):
            row.update(status="oom", reason="out of memory")
        else:
            row.update(status="skipped", reason=f"raised {short_reason(exc)}")
    finally:
        fn = out = None
        free_memory(device)
        row["wall_s"] = round(time.perf_counter() - t_row, 2)  # build + all calls: where a run's time goes
    return row
