"""Shared benchmark machinery: timing, peak memory, LLM-like data, the float64 oracle, rooflines, and the
results document (JSON -> Markdown + PNG).

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

import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

GIB = float(1 << 30)
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------------------------
# device, versions


def pick_device(name: Optional[str] = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    proc = platform.processor() or platform.machine() or "cpu"
    return f"CPU ({proc}, {os.cpu_count()} cores, torch threads: {torch.get_num_threads()})"


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine() or 'unknown'}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _dist_version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device, argv: Sequence[str], quick: bool) -> Dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover
        triton_version = None
    env: Dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "slug": device_slug(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "command": "python -m benchmarks" + "".join(" " + shlex.quote(a) for a in argv),
        "mode": "quick" if quick else "full",
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "anchors": {d: _dist_version(d) for d in ("trl", "verl", "cut-cross-entropy", "liger-kernel")},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["sms"] = props.multi_processor_count
        env["memory_gib"] = round(props.total_memory / GIB, 1)
    return env


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


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


def bench(fn: Callable[[], Any], device: torch.device, cfg: TimingConfig = TimingConfig()) -> Timing:
    """Median / p20 / p80 of ``fn()`` in ms."""
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


# ----------------------------------------------------------------------------------------------------------
# LLM-like data


@dataclass
class LinearData:
    hidden: torch.Tensor  # [N, D]
    weight: torch.Tensor  # [V, D]
    targets: torch.Tensor  # [N] int64


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _target_logits(n: int, vocab: int, logit_std: float, margin_lo: float, margin_hi: float, g, device):
    """Target logit per row: the non-target logits are ~N(0, logit_std^2), whose logsumexp is about
    ``log V + logit_std^2 / 2``; the target sits a uniform random ``[margin_lo, margin_hi]`` above that, so
    ``p_target`` ranges from a few percent (entropy of several nats) to ~1 (entropy ~0)."""
    base = math.log(vocab) + 0.5 * logit_std ** 2
    u = torch.rand(n, generator=g, device=device) * (margin_hi - margin_lo) + margin_lo
    return base + u


def make_linear_data(n: int, d: int, vocab: int, dtype: torch.dtype, device: torch.device, *, seed: int = 0,
                     logit_std: float = 3.0, margin: tuple = (-4.0, 12.0)) -> LinearData:
    """``hidden [N, D]``, ``weight [V, D]``, ``targets [N]`` with LLM-like logits ``hidden @ weight.T``.

    ``weight ~ N(0, logit_std^2 / D)`` and ``hidden ~ N(0, 1)`` give non-target logits of std ``logit_std``;
    each row's hidden state is then moved along ``w_target / |w_target|^2`` so that its target logit equals a
    per-row value drawn by :func:`_target_logits`. Generated in fp32 on ``device``, rounded to ``dtype`` last.
    """
    g = _generator(device, seed)
    weight = (torch.randn(vocab, d, generator=g, device=device) * (logit_std / math.sqrt(d))).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g, device=device)
    hidden = torch.randn(n, d, generator=g, device=device)
    want = _target_logits(n, vocab, logit_std, margin[0], margin[1], g, device)
    w_t = weight[targets].float()
    have = (hidden * w_t).sum(-1)
    hidden += ((want - have) / (w_t * w_t).sum(-1).clamp_min(1e-12))[:, None] * w_t
    return LinearData(hidden.to(dtype), weight, targets)


def make_logits_data(n: int, vocab: int, dtype: torch.dtype, device: torch.device, *, seed: int = 0,
                     logit_std: float = 3.0, margin: tuple = (-4.0, 12.0)):
    """``(logits [N, V], targets [N])``: Gaussian non-target logits and a target logit per row as in
    :func:`make_linear_data` (no matmul needed)."""
    g = _generator(device, seed)
    logits = torch.empty(n, vocab, device=device, dtype=dtype)
    targets = torch.randint(0, vocab, (n,), generator=g, device=device)
    want = _target_logits(n, vocab, logit_std, margin[0], margin[1], g, device)
    rows = max(1, (1 << 26) // vocab)  # fill in fp32 slabs of <= 256 MiB
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        slab = torch.randn(r1 - r0, vocab, generator=g, device=device) * logit_std
        slab[torch.arange(r1 - r0, device=device), targets[r0:r1]] = want[r0:r1]
        logits[r0:r1] = slab.to(dtype)
    return logits, targets


# ----------------------------------------------------------------------------------------------------------
# float64 oracle


def _oracle_rows(z: torch.Tensor, t: torch.Tensor):
    """fp64 ``z [r, V]`` (consumed) -> ``(logp, entropy)``."""
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, t[:, None]).squeeze(1) - lse
    z.sub_(lse[:, None])  # log p
    p = z.exp()
    ent = -(p * torch.where(p > 0, z, torch.zeros_like(z))).sum(-1)
    return logp, ent


@torch.no_grad()
def oracle_linear(hidden, weight, targets, *, bias=None, temperature: float = 1.0, chunk_elems: int = 1 << 27):
    """float64 ``(logp, entropy)`` of ``(hidden @ weight.T + bias) / temperature``, ``chunk_elems`` logits
    (1 GiB of fp64) at a time, on the inputs' device. The weight is upcast once (``V * D * 8`` bytes)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    w64 = weight.double()
    b64 = None if bias is None else bias.double()
    logp = torch.empty(n, dtype=torch.float64, device=hidden.device)
    ent = torch.empty_like(logp)
    rows = max(1, chunk_elems // vocab)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        z = hidden[r0:r1].double() @ w64.t()
        if b64 is not None:
            z += b64
        if temperature != 1.0:
            z /= temperature
        logp[r0:r1], ent[r0:r1] = _oracle_rows(z, targets[r0:r1])
        del z
    return logp, ent


@torch.no_grad()
def oracle_logits(logits, targets, *, temperature: float = 1.0, chunk_elems: int = 1 << 27):
    n, vocab = logits.shape
    logp = torch.empty(n, dtype=torch.float64, device=logits.device)
    ent = torch.empty_like(logp)
    rows = max(1, chunk_elems // vocab)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        z = logits[r0:r1].double()
        if temperature != 1.0:
            z /= temperature
        logp[r0:r1], ent[r0:r1] = _oracle_rows(z, targets[r0:r1])
        del z
    return logp, ent


def entropy_stats(ent64: torch.Tensor, logp64: Optional[torch.Tensor] = None) -> Dict[str, float]:
    e = ent64.float()
    out = {"mean": float(e.mean()), "min": float(e.min()), "median": float(e.median()), "max": float(e.max())}
    if logp64 is not None:
        out["mean_p_target"] = float(logp64.exp().mean())
    return out


def describe_entropy(stats: Dict[str, float]) -> str:
    s = (f"entropy (fp64 oracle) mean {stats['mean']:.2f} nats, median {stats['median']:.2f}, "
         f"range [{stats['min']:.3g}, {stats['max']:.2f}]")
    if "mean_p_target" in stats:
        s += f"; mean p(target) {stats['mean_p_target']:.2f}"
    return s


# ----------------------------------------------------------------------------------------------------------
# rooflines


def matmul_roofline(hidden: torch.Tensor, weight: torch.Tensor, timing: TimingConfig) -> Dict[str, Any]:
    """One cuBLAS (or CPU BLAS) ``hidden @ weight.T`` into a preallocated output, in the inputs' dtype."""
    n, d = hidden.shape
    vocab = weight.shape[0]
    try:
        out = torch.empty(n, vocab, device=hidden.device, dtype=hidden.dtype)
        t = bench(lambda: torch.mm(hidden, weight.t(), out=out), hidden.device, timing)
    except Exception as exc:  # noqa: BLE001
        return {"status": "oom" if is_oom(exc) else "skipped", "reason": short_reason(exc)}
    finally:
        out = None
        free_memory(hidden.device)
    return {"status": "ok", "ms": t.median, "p20": t.p20, "p80": t.p80, "tflops": 2.0 * n * d * vocab / t.median / 1e9}


def copy_bandwidth(device: torch.device, timing: TimingConfig, nbytes: Optional[int] = None) -> Dict[str, Any]:
    """Device-to-device copy of an ``nbytes`` buffer; TB/s counts the read and the write (2 * nbytes)."""
    nbytes = nbytes or ((2 << 30) if device.type == "cuda" else (64 << 20))
    try:
        src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
        dst = torch.empty_like(src)
        t = bench(lambda: dst.copy_(src), device, timing)
    except Exception as exc:  # noqa: BLE001
        return {"status": "skipped", "reason": short_reason(exc)}
    finally:
        src = dst = None
        free_memory(device)
    return {"status": "ok", "bytes": nbytes, "ms": t.median, "tbps": 2.0 * nbytes / t.median / 1e9}


# ----------------------------------------------------------------------------------------------------------
# formatting


def table_columns(*measures: Dict[str, Any], ms_title: str = "ms") -> List[Dict[str, Any]]:
    """A results table's columns: impl, median ms and spread, then ``measures`` (rates, ratios, memory, errors),
    then the note."""
    return [{"key": "impl", "title": "impl"}, {"key": "ms", "title": ms_title},
            {"key": "spread", "title": "p20-p80 ms"}, *measures, {"key": "note", "title": "note"}]


PEAK_COLUMN = {"key": "peak_gib", "title": "peak GiB", "fmt": "gib"}


def fmt_num(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) >= 10 ** digits or abs(x) < 10 ** -(digits - 1):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def fmt_err(x: Optional[float]) -> str:
    if x is None:
        return "n/a"
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return f"{x:.1e}"


def fmt_gib(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def shape_tag(**dims) -> str:
    return "-".join(f"{k}{v}" for k, v in dims.items())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------------------
# results document


class Results:
    """Sections (tables) and sweeps, saved as JSON and rendered to Markdown + PNG from the JSON alone, so that
    documents from several runs (``--only``) can be merged and re-rendered (``--merge``)."""

    def __init__(self, env: Dict[str, Any]):
        self.env = env
        self.rooflines: Dict[str, Any] = {}
        self.sections: List[Dict[str, Any]] = []
        self.sweeps: List[Dict[str, Any]] = []
        # when set, results.json and results.md (no plots) are rewritten there after every added section or sweep
        # point, so that a run killed by an external time limit in the middle of a benchmark keeps its tables
        self.autosave_dir: Optional[Path] = None

    # building
    def add_section(self, section: Dict[str, Any]) -> None:
        self.sections = [s for s in self.sections if s["id"] != section["id"]] + [section]
        self._autosave()

    def remove_section(self, section_id: str) -> None:
        self.sections = [s for s in self.sections if s["id"] != section_id]

    def add_sweep(self, sweep: Dict[str, Any]) -> None:
        self.sweeps = [s for s in self.sweeps if s["id"] != sweep["id"]] + [sweep]
        self._autosave()

    def _autosave(self) -> None:
        if self.autosave_dir is None:
            return
        try:
            self.autosave_dir.mkdir(parents=True, exist_ok=True)
            (self.autosave_dir / "results.json").write_text(json.dumps(self.to_json(), indent=1,
                                                                       default=_json_default))
            (self.autosave_dir / "results.md").write_text(self.markdown())
        except Exception as exc:  # noqa: BLE001 - a failed checkpoint must not stop the run
            print(f"[benchmarks] checkpoint to {self.autosave_dir} failed: {short_reason(exc)}", file=sys.stderr)

    def to_json(self) -> Dict[str, Any]:
        return {"env": self.env, "rooflines": self.rooflines, "sections": self.sections, "sweeps": self.sweeps}

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "Results":
        r = cls(data["env"])
        r.rooflines = data.get("rooflines", {})
        r.sections = data.get("sections", [])
        r.sweeps = data.get("sweeps", [])
        return r

    def merge(self, other: "Results") -> None:
        """Add ``other``'s sections and sweeps (``other`` wins on equal ids); commands are concatenated."""
        for s in other.sections:
            self.add_section(s)
        for s in other.sweeps:
            self.add_sweep(s)
        self.rooflines.update(other.rooflines)
        cmds = list(self.env.get("commands", [self.env.get("command")]))
        for c in other.env.get("commands", [other.env.get("command")]):
            if c not in cmds:
                cmds.append(c)
        errors = self.env.get("errors", []) + other.env.get("errors", [])
        self.env = {**self.env, **other.env, "commands": cmds, "errors": errors}

    # output
    def _prune(self) -> None:
        """Drop "skipped" placeholder sections of a group that has real sections (from a merged run)."""
        real = {s.get("group") for s in self.sections if not s.get("placeholder")}
        self.sections = [s for s in self.sections if not (s.get("placeholder") and s.get("group") in real)]

    def write(self, out_dir: Path) -> List[Path]:
        self._prune()
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(self.to_json(), indent=1, default=_json_default))
        pngs = self.plot(out_dir)
        (out_dir / "results.md").write_text(self.markdown(pngs))
        return [out_dir / "results.md", out_dir / "results.json", *pngs]

    def markdown(self, pngs: Sequence[Path] = ()) -> str:
        e = self.env
        lines = ["# edge-kernels benchmark results", ""]
        dev = e["device"]
        if e.get("sms"):
            dev += f" ({e['sms']} SMs, {e['memory_gib']} GiB)"
        lines.append(f"- device: {dev}")
        lines.append(f"- torch {e['torch']}, triton {e['triton']}, CUDA {e['cuda']}, python {e['python']}")
        anchors = ", ".join(f"{k} {v}" for k, v in e.get("anchors", {}).items() if v) or "none installed"
        lines.append(f"- anchors installed: {anchors}")
        lines.append(f"- date: {e['date']}")
        for c in e.get("commands", [e.get("command")]):
            lines.append(f"- command: `{c}`")
        lines.append(f"- mode: {e['mode']}" + (" (TRITON_INTERPRET=1: Triton rows run in the interpreter, their "
                                              "times are not kernel times)" if e.get("triton_interpret") == "1"
                                              else ""))
        copy = self.rooflines.get("copy")
        if copy and copy.get("status") == "ok":
            lines.append(f"- roofline, memory: device-to-device copy of {copy['bytes'] / GIB:.2f} GiB, "
                         f"{fmt_num(copy['ms'])} ms = **{fmt_num(copy['tbps'])} TB/s** (read + write)")
        for err in e.get("errors", []):
            lines.append(f"- **error**: {err}")
        lines.append("")
        lines.append("Columns: see benchmarks/README.md. `ms` = median, `p20-p80` = spread; peak GiB = incremental "
                     "peak of one call (outputs and gradients included, inputs not); errors are max |x - x_fp64| "
                     "over all rows against a float64 oracle on the same (rounded) inputs.")
        lines.append("")
        for s in self.sections:
            lines += _section_md(s)
        for sw in self.sweeps:
            lines += _sweep_md(sw)
        if pngs:
            lines.append("## Plots")
            lines.append("")
            for p in pngs:
                lines.append(f"![{p.stem}]({p.name})")
            lines.append("")
        return "\n".join(lines)

    def plot(self, out_dir: Path) -> List[Path]:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            print(f"[benchmarks] plots skipped: matplotlib unavailable ({short_reason(exc)})", file=sys.stderr)
            return []
        paths = []
        groups: Dict[str, List[Dict[str, Any]]] = {}
        for s in self.sections:
            groups.setdefault(s.get("group", s["id"]), []).append(s)
        for group, secs in groups.items():
            p = _plot_bars(group, secs, out_dir)
            if p:
                paths.append(p)
        for sw in self.sweeps:
            p = _plot_sweep(sw, out_dir, self.env)
            if p:
                paths.append(p)
        return paths


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    raise TypeError(type(o).__name__)


def load_results(path: Path) -> Results:
    return Results.from_json(json.loads(Path(path).read_text()))


def _status_note(row: Dict[str, Any]) -> str:
    if row["status"] == "ok":
        return row.get("note", "")
    head = "OOM" if row["status"] == "oom" else f"skipped: {row.get('reason', '')}"
    return head + (f" ({row['note']})" if row.get("note") else "")


def _cell(row: Dict[str, Any], col: Dict[str, Any]) -> str:
    key = col["key"]
    if key == "impl":
        return row["impl"]
    if key == "note":
        return _status_note(row).replace("|", "/")
    if row["status"] != "ok":
        return "-"
    if key == "spread":
        return f"{fmt_num(row.get('p20'))}-{fmt_num(row.get('p80'))}"
    v = row.get(key)
    kind = col.get("fmt", "num")
    if kind == "err":
        return fmt_err(v)
    if kind == "gib":
        return fmt_gib(v)
    return fmt_num(v)


def _section_md(s: Dict[str, Any]) -> List[str]:
    lines = [f"## {s['title']}", ""]
    for note in s.get("notes", []):
        lines.append(f"- {note}")
    if s.get("notes"):
        lines.append("")
    cols = s["columns"]
    lines.append("| " + " | ".join(c["title"] for c in cols) + " |")
    lines.append("|" + "|".join("---" if c["key"] in ("impl", "note") else "---:" for c in cols) + "|")
    for row in s["rows"]:
        lines.append("| " + " | ".join(_cell(row, c) for c in cols) + " |")
    lines.append("")
    return lines


def _sweep_md(sw: Dict[str, Any]) -> List[str]:
    lines = [f"## {sw['title']}", ""]
    for note in sw.get("notes", []):
        lines.append(f"- {note}")
    lines.append("")
    xs = sw["xs"]
    for mode in sw["modes"]:
        lines.append(f"**{mode}**: median ms / peak GiB per {sw['x_name']}")
        lines.append("")
        lines.append("| impl | " + " | ".join(f"{sw['x_name']}={x}" for x in xs) + " |")
        lines.append("|---|" + "---:|" * len(xs))
        for impl, per_mode in sw["series"].items():
            cells = []
            for pt in per_mode.get(mode, []):
                if pt["status"] == "ok":
                    cells.append(f"{fmt_num(pt['ms'])} / {fmt_gib(pt.get('peak_gib'))}")
                elif pt["status"] == "oom":
                    cells.append("OOM")
                else:
                    cells.append("skipped")
            reasons = sorted({pt.get("reason", "") for pt in per_mode.get(mode, []) if pt["status"] == "skipped"})
            label = impl + (f" (skipped: {'; '.join(reasons)})" if reasons else "")
            lines.append(f"| {label.replace('|', '/')} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _plot_bars(group: str, secs: List[Dict[str, Any]], out_dir: Path) -> Optional[Path]:
    import matplotlib.pyplot as plt

    def plotted(r):  # interpreter rows check results; their times would only distort the axis
        return r["status"] == "ok" and "interpreter" not in r["impl"]

    secs = [s for s in secs if any(plotted(r) for r in s["rows"])]
    if not secs:
        return None
    fig, axes = plt.subplots(1, len(secs), figsize=(6.5 * len(secs), 0.5 * max(len(s["rows"]) for s in secs) + 2.0),
                             squeeze=False)
    for ax, s in zip(axes[0], secs):
        rows = [r for r in s["rows"] if plotted(r)]
        names = [r["impl"] for r in rows]
        ms = [r["ms"] for r in rows]
        colors = ["tab:green" if n.startswith("ours") else "tab:gray" for n in names]
        y = range(len(rows))
        ax.barh(list(y), ms, color=colors,
                xerr=[[r["ms"] - r["p20"] for r in rows], [r["p80"] - r["ms"] for r in rows]])
        ax.set_yticks(list(y))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("ms (median, p20-p80 bars); lower is better")
        ax.set_title(s.get("mode", s["id"]), fontsize=10)
        for yi, r in zip(y, rows):  # label right of the p80 whisker, so the two never overlap
            ax.text(max(r["ms"], r["p80"]), yi, f"  {fmt_num(r['ms'])} ms", va="center", fontsize=7)
        ax.set_xlim(0, 1.18 * max(max(r["p80"], r["ms"]) for r in rows))
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(secs[0].get("group_title", group), fontsize=11)
    fig.tight_layout()
    path = out_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", group) + ".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short_int(x: int) -> str:
    if x >= 1024 and x % 1024 == 0:
        return f"{x // 1024}k"
    if x >= 1000:
        return f"{x / 1024:.1f}k".replace(".0k", "k")
    return str(x)


def _plot_sweep(sw: Dict[str, Any], out_dir: Path, env: Dict[str, Any]) -> Optional[Path]:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    modes = sw["modes"]
    fig, axes = plt.subplots(2, len(modes), figsize=(6.0 * len(modes), 8.0), squeeze=False)
    markers = "osD^v<>px*"
    impls = list(sw["series"])
    for j, mode in enumerate(modes):
        ax_t, ax_m = axes[0][j], axes[1][j]
        any_mem = False
        for impl in impls:
            pts = sw["series"][impl].get(mode, [])
            ok = [p for p in pts if p["status"] == "ok"]
            oom = [p["x"] for p in pts if p["status"] == "oom"]
            if not ok:
                continue
            label = impl + (f" (OOM at {sw['x_name']}>={_short_int(min(oom))})" if oom else "")
            k = impls.index(impl)  # same marker/colour for an impl in every panel
            style = dict(marker=markers[k % len(markers)], color=f"C{k % 10}", label=label,
                         linewidth=2.4 if impl.startswith("ours") else 1.3)
            ax_t.plot([p["x"] for p in ok], [p["ms"] for p in ok], **style)
            mem = [p for p in ok if p.get("peak_gib") is not None]
            if mem:
                any_mem = True
                ax_m.plot([p["x"] for p in mem], [max(p["peak_gib"], 1e-4) for p in mem], **style)
        ax_t.set_title(f"{mode}: time", fontsize=10)
        ax_m.set_title(f"{mode}: peak memory", fontsize=10)
        for ax, ylabel, has_data in ((ax_t, "median ms", True), (ax_m, "peak incremental GiB", any_mem)):
            ax.set_ylabel(ylabel)
            ax.set_xlabel(sw["x_name"])
            if not has_data:
                ax.set_xticks([])
                ax.set_yticks([])
                ax.text(0.5, 0.5, f"peak memory: n/a on {env.get('device_type', 'this device')}",
                        ha="center", va="center", transform=ax.transAxes)
                continue
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(FixedLocator(sw["xs"]))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: _short_int(int(round(x)))))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(f"{sw['title']}\n{env['device']}, {env['date']}", fontsize=10)
    fig.tight_layout()
    path = out_dir / f"{sw['id']}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
