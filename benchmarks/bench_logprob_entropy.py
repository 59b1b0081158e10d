"""Benchmarks of the log-prob + entropy ops (issue 2) and their scaling sweeps (issue 6).

* ``linear``: ``edge_kernels.linear_logprob_entropy`` (hidden states in) vs naive PyTorch (``[N, V]`` logits in
  the input dtype, ``log_softmax``, gather, entropy, autograd backward), ``torch.compile`` of the naive code,
  TRL's ``ChunkedLogProbFunction``, verl's ``linear_cross_entropy`` and cut-cross-entropy's
  ``linear_cross_entropy`` (log-prob only), forward and forward+backward.
* ``logits``: ``edge_kernels.logprob_entropy`` (logits in) vs naive, ``torch.compile`` and TRL's Triton
  ``selective_log_softmax_and_entropy``; memory-bound, reported in TB/s next to the copy bandwidth.
* ``sweep_n`` / ``sweep_v``: time and peak memory vs N and vs V (log-log plots).

Every anchor is imported inside its row builder; an import failure, an unsupported device or an exception in
a call becomes a ``skipped: <reason>`` row, an out-of-memory an ``OOM`` row.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .data import describe_entropy, entropy_stats, make_linear_data, make_logits_data, oracle_linear, oracle_logits
from .env import free_memory
from .report import PEAK_COLUMN, Results, dtype_name, fmt_num, shape_tag, table_columns
from .roofline import matmul_roofline
from .timing import Skip, TimingConfig, measure_row, short_reason

# TRL's default vocabulary chunk for ChunkedLogProbFunction (``_CHUNKED_LOGPROB_CHUNK_SIZE`` in
# trl/trainer/utils.py, trl 1.16); hard-coded so that the forward does not import trl.trainer (slow).
TRL_CHUNK_SIZE = 32768


@dataclass
class BenchConfig:
    device: torch.device
    quick: bool
    compile: bool  # include torch.compile rows
    timing: TimingConfig = field(default_factory=TimingConfig)
    sweep_timing: TimingConfig = field(default_factory=TimingConfig)

    @property
    def interpreter(self) -> bool:
        from edge_kernels.core.probes import triton_interpreter_enabled

        return self.device.type != "cuda" and triton_interpreter_enabled()


def log(msg: str) -> None:
    print(f"[benchmarks] {msg}", file=sys.stderr, flush=True)


def log_row(prefix: str, row: Dict[str, Any]) -> None:
    if row["status"] == "ok":
        extra = ""
        if row.get("err_logp") is not None:
            extra = f", err logp {row['err_logp']:.1e}"
        if row.get("err_entropy") is not None:
            extra += f", err H {row['err_entropy']:.1e}"
        mem = "" if row.get("peak_gib") is None else f", {row['peak_gib']:.2f} GiB"
        log(f"{prefix} {row['impl']}: {row['ms']:.3f} ms{mem}{extra} [{row.get('wall_s', 0):.1f} s]")
    else:
        log(f"{prefix} {row['impl']}: {row['status']} ({row.get('reason', '')}) [{row.get('wall_s', 0):.1f} s]")


# ----------------------------------------------------------------------------------------------------------
# implementations: each ``make()`` returns ``f(...) -> (logp, entropy or None)`` or raises Skip


@dataclass
class Impl:
    name: str
    make: Callable[[], Callable]
    note: str = ""
    modes: Tuple[str, ...] = ("fwd", "fwd+bwd")
    skip_modes: Dict[str, str] = field(default_factory=dict)  # mode -> reason
    warmup_first: bool = True
    mutates_input: bool = False  # logits-in in-place backward: gets a private copy of the logits
    timing: Optional[TimingConfig] = None  # overrides the run's timing config (interpreter rows)


# Triton-interpreter rows check results; their time means nothing, so they are called as few times as possible
INTERPRETER_TIMING = TimingConfig(cpu_min_reps=1, cpu_max_reps=1, cpu_max_s=0.0, cpu_warmup=False)


def naive_linear(hidden, weight, targets):
    """The unfused baseline: ``[N, V]`` logits in the input dtype, then log_softmax, gather and entropy."""
    logits = hidden @ weight.t()
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp.float(), entropy.float()


def naive_logits(logits, targets):
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp.float(), entropy.float()


def _need_cuda(device: torch.device, what: str) -> None:
    if device.type != "cuda":
        raise Skip(f"{what} needs CUDA tensors")


def compiled(fn: Callable, cfg: BenchConfig) -> Callable:
    if not cfg.compile:
        raise Skip("torch.compile rows off (--no-compile, or --quick without --compile)")
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"torch.compile unavailable ({short_reason(exc)})") from None


_VERL_LCE: Dict[str, Any] = {}  # the loaded verl linear_cross_entropy (one load per process)
_VERL_PKG = "_benchmarks_verl_kernel"  # the package name verl's two kernel files are loaded under, standalone


def _verl_device_stub():
    """The four ``verl.utils.device`` names verl's ``kernels.py`` imports, for CUDA."""
    import types

    stub = types.ModuleType("verl.utils.device")
    stub.is_cuda_available = torch.cuda.is_available()
    stub.get_device_capability = (lambda device_id=0: torch.cuda.get_device_capability(device_id)
                                  if torch.cuda.is_available() else (None, None))
    stub.get_device_name = lambda: "cuda"
    stub.get_torch_device = lambda: torch.cuda
    return stub


def _load_verl_standalone(kernel_dir) -> Callable:
    """verl's ``utils/kernel/{kernels,linear_cross_entropy}.py`` loaded on their own, under ``_VERL_PKG``: they
    need torch and triton, and from verl itself only four names of ``verl.utils.device`` (stubbed for the time
    of the load, then removed again from ``sys.modules``)."""
    import importlib.util
    import types
    from pathlib import Path

    kernel_dir = Path(kernel_dir)
    pkg = types.ModuleType(_VERL_PKG)
    pkg.__path__ = [str(kernel_dir)]
    stubs = {"verl": types.ModuleType("verl"), "verl.utils": types.ModuleType("verl.utils"),
             "verl.utils.device": _verl_device_stub()}
    stubs["verl"].utils = stubs["verl.utils"]
    stubs["verl.utils"].device = stubs["verl.utils.device"]
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules[_VERL_PKG] = pkg
    try:
        sys.modules.update(stubs)
        mods = {}
        for name in ("kernels", "linear_cross_entropy"):
            spec = importlib.util.spec_from_file_location(f"{_VERL_PKG}.{name}", kernel_dir / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
            setattr(pkg, name, mod)  # ``from . import kernels`` (inside forward/backward) finds it here
            mods[name] = mod
    except BaseException:
        for k in [k for k in sys.modules if k == _VERL_PKG or k.startswith(_VERL_PKG + ".")]:
            del sys.modules[k]
        raise
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return mods["linear_cross_entropy"].linear_cross_entropy


def verl_linear_cross_entropy() -> Callable:
    """verl's fused ``linear_cross_entropy`` (raises :class:`Skip` when verl is not installed).

    The ordinary import runs ``verl/__init__.py``, which needs ray, tensordict, omegaconf and more: on a GPU
    image where verl travelled as a ``--no-deps`` wheel (benchmarks/gpu_checks.sh) that import fails although
    the kernel itself needs only torch and triton, so its two files are then loaded on their own."""
    if "fn" in _VERL_LCE:
        return _VERL_LCE["fn"]
    try:
        from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy as fn
    except Exception as exc:  # noqa: BLE001
        import importlib.util
        from pathlib import Path

        try:
            spec = importlib.util.find_spec("verl")  # locates the package without running its __init__
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise Skip(f"verl.utils.kernel.linear_cross_entropy not importable ({short_reason(exc)})") from None
        kernel_dir = Path(list(spec.submodule_search_locations)[0]) / "utils" / "kernel"
        try:
            fn = _load_verl_standalone(kernel_dir)
        except Exception as exc2:  # noqa: BLE001
            raise Skip(f"verl.utils.kernel.linear_cross_entropy not importable ({short_reason(exc)}), nor its "
                       f"kernel files on their own ({short_reason(exc2)})") from None
        log(f"verl: package import failed ({short_reason(exc)}); loaded {kernel_dir}/linear_cross_entropy.py "
            "on its own")
    _VERL_LCE["fn"] = fn
    return fn


def linear_impls(cfg: BenchConfig, n: int, d: int, vocab: int, *, sweep: bool = False) -> List[Impl]:
    dev = cfg.device
    impls: List[Impl] = []

    def ours(impl: str):
        def make():
            from edge_kernels import linear_logprob_entropy

            return lambda h, w, t: linear_logprob_entropy(h, w, t, impl=impl)
        return make

    if dev.type == "cuda":
        impls.append(Impl("ours (impl=auto -> triton)", ours("auto")))
        if cfg.quick:
            impls.append(Impl("ours (impl=torch, chunked PyTorch)", ours("torch")))
    else:
        impls.append(Impl("ours (impl=torch, chunked PyTorch)", ours("torch"),
                          note="CPU: the Triton kernels need CUDA"))
        if cfg.interpreter and not sweep and n * vocab <= 1 << 17:
            impls.append(Impl("ours (impl=triton, interpreter)", ours("triton"), warmup_first=False,
                              timing=INTERPRETER_TIMING,
                              note="Triton interpreter: checks results, time is not kernel time"))
    impls.append(Impl("naive PyTorch (materialized logits)", lambda: naive_linear))
    if not sweep:
        impls.append(Impl("torch.compile(naive)", lambda: compiled(naive_linear, cfg)))

    def trl_make():
        try:
            from trl.kernels import ChunkedLogProbFunction
        except Exception as exc:  # noqa: BLE001
            raise Skip(f"trl.kernels.ChunkedLogProbFunction not importable ({short_reason(exc)})") from None

        def f(h, w, t):
            out = ChunkedLogProbFunction.apply(h, w, None, t, 1.0, TRL_CHUNK_SIZE, None, 1.0, ("entropy",))
            return out[0], out[1]
        return f

    trl_skip = {}
    if dev.type != "cuda" and cfg.quick:
        trl_skip["fwd+bwd"] = "--quick on CPU: TRL's backward imports trl.trainer.utils (~15 s)"
    impls.append(Impl(f"TRL ChunkedLogProbFunction (chunk {TRL_CHUNK_SIZE})", trl_make, skip_modes=trl_skip,
                      note="" if dev.type == "cuda" else "CPU: TRL's torch fallback"))

    def verl_make():
        _need_cuda(dev, "verl's linear_cross_entropy (Triton kernels assert hidden.is_cuda)")
        if d % 128:
            raise Skip(f"verl's kernel needs D % 128 == 0 (D={d})")
        linear_cross_entropy = verl_linear_cross_entropy()
        # (hidden [N, D], weight [V, D], labels [N], temperature: float, reduction) -> (logp, entropy), fp32 [N];
        # its backward asserts that both upstream gradients are given and contiguous (always true here)
        return lambda h, w, t: tuple(linear_cross_entropy(h, w, t, 1.0, "none"))

    impls.append(Impl("verl linear_cross_entropy", verl_make))

    def cce_make():
        _need_cuda(dev, "cut-cross-entropy's Triton kernels")
        try:
            from cut_cross_entropy import linear_cross_entropy
        except Exception as exc:  # noqa: BLE001
            raise Skip(f"cut_cross_entropy not importable ({short_reason(exc)})") from None

        def f(h, w, t):
            nll = linear_cross_entropy(h, w, t, reduction="none")
            return -nll.float(), None
        return f

    # its backward asserts 16-bit inputs ("Backwards requires embeddings to be bf16 or fp16"); --quick is fp32
    cce_skip = {"fwd+bwd": "cut-cross-entropy's backward needs bf16/fp16 inputs (--quick is fp32)"} if cfg.quick else {}
    impls.append(Impl("cut-cross-entropy linear_cross_entropy", cce_make, skip_modes=cce_skip,
                      note="log-prob only (no entropy); default gradient filtering"))
    return impls


def logits_impls(cfg: BenchConfig, n: int, vocab: int) -> List[Impl]:
    dev = cfg.device
    impls: List[Impl] = []

    def ours(impl: str, inplace: bool = False):
        def make():
            from edge_kernels import logprob_entropy

            return lambda x, t: logprob_entropy(x, t, impl=impl, inplace_backward=inplace)
        return make

    def ours_cuda():
        def make():
            _need_cuda(dev, "impl='cuda' (the csrc/ extension)")
            try:
                from edge_kernels.backends import cuda as _cuda
            except Exception as exc:  # noqa: BLE001
                raise Skip(f"edge_kernels.backends.cuda not importable ({short_reason(exc)})") from None
            reason = _cuda.unavailable_reason() if hasattr(_cuda, "unavailable_reason") else None
            if reason:
                raise Skip(f"CUDA extension unavailable: {reason}")
            return ours("cuda")()
        return make

    if dev.type == "cuda":
        impls.append(Impl("ours (impl=auto -> triton)", ours("auto")))
        impls.append(Impl("ours (impl=auto, inplace_backward=True)", ours("auto", True), modes=("fwd+bwd",),
                          warmup_first=False, mutates_input=True,
                          note="gradient overwrites the logits; later reps run on the overwritten values"))
        impls.append(Impl("ours (impl=cuda, csrc/ C++ extension)", ours_cuda(),
                          note="first call may build the extension with ninja (warmup, untimed)"))
        if cfg.quick:
            impls.append(Impl("ours (impl=torch, chunked PyTorch)", ours("torch")))
    else:
        impls.append(Impl("ours (impl=torch, chunked PyTorch)", ours("torch"),
                          note="CPU: the Triton kernels need CUDA"))
        impls.append(Impl("ours (impl=cuda, csrc/ C++ extension)", ours_cuda()))
        if cfg.interpreter and n * vocab <= 1 << 17:
            impls.append(Impl("ours (impl=triton, interpreter)", ours("triton"), warmup_first=False,
                              timing=INTERPRETER_TIMING,
                              note="Triton interpreter: checks results, time is not kernel time"))
    impls.append(Impl("naive PyTorch (log_softmax in input dtype)", lambda: naive_logits))
    impls.append(Impl("torch.compile(naive)", lambda: compiled(naive_logits, cfg)))

    def trl_make():
        _need_cuda(dev, "TRL's Triton selective_log_softmax_and_entropy")
        try:
            from trl.kernels import selective_log_softmax_and_entropy
        except Exception as exc:  # noqa: BLE001
            raise Skip(f"trl.kernels.selective_log_softmax_and_entropy not importable ({short_reason(exc)})") \
                from None
        return lambda x, t: tuple(selective_log_softmax_and_entropy(x, t, 1.0))

    impls.append(Impl("TRL selective_log_softmax_and_entropy (Triton)", trl_make))
    return impls


# ----------------------------------------------------------------------------------------------------------
# row builders: forward under no_grad; forward+backward = autograd.grad of (logp, entropy) with fixed random
# upstream gradients (no .grad accumulation inside the timed region)


def _grad_outputs(n: int, device, seed: int = 1):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return torch.randn(n, generator=g, device=device), 0.1 * torch.randn(n, generator=g, device=device)


def _linear_builder(impl: Impl, mode: str, hidden, weight, targets, g_logp, g_ent):
    def build():
        if mode in impl.skip_modes:
            raise Skip(impl.skip_modes[mode])
        f = impl.make()
        if mode == "fwd":
            def fn():
                with torch.no_grad():
                    return f(hidden, weight, targets)
            return fn
        hg = hidden.detach().requires_grad_()
        wg = weight.detach().requires_grad_()

        def fn():
            logp, ent = f(hg, wg, targets)
            outs, gouts = [logp], [g_logp]
            if ent is not None:
                outs.append(ent)
                gouts.append(g_ent)
            grads = torch.autograd.grad(outs, [hg, wg], gouts)
            return logp, ent, grads
        return fn
    return build


def _logits_builder(impl: Impl, mode: str, logits, targets, g_logp, g_ent):
    def build():
        if mode in impl.skip_modes:
            raise Skip(impl.skip_modes[mode])
        f = impl.make()
        if mode == "fwd":
            def fn():
                with torch.no_grad():
                    return f(logits, targets)
            return fn
        x = (logits.clone() if impl.mutates_input else logits.detach()).requires_grad_()

        def fn():
            logp, ent = f(x, targets)
            outs, gouts = [logp], [g_logp]
            if ent is not None:
                outs.append(ent)
                gouts.append(g_ent)
            (gx,) = torch.autograd.grad(outs, [x], gouts)
            return logp, ent, gx
        return fn
    return build


# ----------------------------------------------------------------------------------------------------------
# linear op tables

_ERROR_COLUMNS = ({"key": "err_logp", "title": "max err logp", "fmt": "err"},
                  {"key": "err_entropy", "title": "max err H", "fmt": "err"})
LINEAR_COLUMNS = table_columns({"key": "tflops", "title": "model TFLOP/s"}, {"key": "x_mm", "title": "x mm"},
                               PEAK_COLUMN, *_ERROR_COLUMNS)
LOGITS_COLUMNS = table_columns({"key": "tbps", "title": "TB/s"}, {"key": "x_copy", "title": "x copy"},
                               PEAK_COLUMN, *_ERROR_COLUMNS)


def linear_shapes(cfg: BenchConfig):
    if cfg.quick:
        return [(64, 128, 1000, torch.float32)]
    return [(8192, 3584, 152064, torch.bfloat16), (16384, 1536, 151936, torch.bfloat16)]


def run_linear(cfg: BenchConfig, results: Results) -> None:
    for n, d, vocab, dtype in linear_shapes(cfg):
        tag = shape_tag(N=n, D=d, V=vocab) + f"-{dtype_name(dtype)}"
        log(f"linear {tag}: data + fp64 oracle + matmul roofline")
        data = make_linear_data(n, d, vocab, dtype, cfg.device)
        ref = oracle_linear(data.hidden, data.weight, data.targets)
        stats = entropy_stats(ref[1], ref[0])
        mm = matmul_roofline(data.hidden, data.weight, cfg.timing)
        g_logp, g_ent = _grad_outputs(n, cfg.device)
        flops_unit = 2.0 * n * d * vocab
        blas = "cuBLAS" if cfg.device.type == "cuda" else "CPU BLAS"
        for mode in ("fwd", "fwd+bwd"):
            mult = 1 if mode == "fwd" else 3
            rows = []
            for impl in linear_impls(cfg, n, d, vocab):
                if mode not in impl.modes:
                    continue
                row = measure_row(impl.name, _linear_builder(impl, mode, data.hidden, data.weight, data.targets,
                                                             g_logp, g_ent),
                                  cfg.device, impl.timing or cfg.timing, oracle=ref, warmup_first=impl.warmup_first,
                                  note=impl.note)
                if row["status"] == "ok":
                    row["tflops"] = mult * flops_unit / row["ms"] / 1e9
                    if mm.get("status") == "ok":
                        row["x_mm"] = row["ms"] / (mult * mm["ms"])
                log_row(f"linear {mode} {tag}", row)
                rows.append(row)
            notes = [
                f"{describe_entropy(stats)}; temperature 1, no ignored rows",
                "FLOP convention (all rows): model FLOPs = 2NDV forward, 6NDV forward+backward "
                f"= {fmt_num(mult * flops_unit / 1e12)} TFLOP here; ours executes 2NDV forward and 8NDV "
                "forward+backward (the backward recomputes the logits), TRL/verl likewise recompute",
                "x mm = time / (time of " + ("one" if mult == 1 else "three") + f" {blas} `hidden @ weight.T` of "
                "this shape); 1.0 = as fast as the bare matmul(s)",
            ]
            if mm.get("status") == "ok":
                notes.append(f"roofline, compute: `hidden @ weight.T` ({dtype_name(dtype)}, [{n}x{d}] x "
                             f"[{d}x{vocab}]) {fmt_num(mm['ms'])} ms = **{fmt_num(mm['tflops'])} TFLOP/s**")
            else:
                notes.append(f"roofline matmul: {mm.get('status')} ({mm.get('reason')})")
            if mode == "fwd+bwd":
                notes.append("forward+backward = autograd.grad of (logp, entropy) w.r.t. (hidden, weight) with fixed "
                             "random upstream gradients; rows without entropy backpropagate logp only")
            results.add_section({
                "id": f"linear/{mode}/{tag}", "group": f"linear_{tag}",
                "group_title": f"linear_logprob_entropy, N={n} D={d} V={vocab} {dtype_name(dtype)}",
                "mode": mode, "op": "linear_logprob_entropy",
                "title": f"linear_logprob_entropy, {mode}: N={n} D={d} V={vocab} {dtype_name(dtype)}",
                "shape": {"N": n, "D": d, "V": vocab, "dtype": dtype_name(dtype)},
                "entropy": stats, "roofline_mm": mm, "notes": notes, "columns": LINEAR_COLUMNS, "rows": rows,
            })
        del data, ref
        free_memory(cfg.device)


# ----------------------------------------------------------------------------------------------------------
# logits-in tables


def logits_shapes(cfg: BenchConfig):
    if cfg.quick:
        return [(64, 1000, torch.float32)]
    return [(8192, 152064, torch.bfloat16)]


def run_logits(cfg: BenchConfig, results: Results) -> None:
    copy = results.rooflines.get("copy") or {}
    for n, vocab, dtype in logits_shapes(cfg):
        tag = shape_tag(N=n, V=vocab) + f"-{dtype_name(dtype)}"
        log(f"logits {tag}: data + fp64 oracle")
        logits, targets = make_logits_data(n, vocab, dtype, cfg.device)
        ref = oracle_logits(logits, targets)
        stats = entropy_stats(ref[1], ref[0])
        g_logp, g_ent = _grad_outputs(n, cfg.device)
        nv_bytes = float(n) * vocab * logits.element_size()
        for mode in ("fwd", "fwd+bwd"):
            nbytes = nv_bytes * (1 if mode == "fwd" else 3)
            rows = []
            for impl in logits_impls(cfg, n, vocab):
                if mode not in impl.modes:
                    continue
                row = measure_row(impl.name, _logits_builder(impl, mode, logits, targets, g_logp, g_ent),
                                  cfg.device, impl.timing or cfg.timing, oracle=ref, warmup_first=impl.warmup_first,
                                  note=impl.note)
                if row["status"] == "ok":
                    row["tbps"] = nbytes / row["ms"] / 1e9
                    if copy.get("status") == "ok":
                        row["x_copy"] = row["ms"] / (nbytes / (copy["tbps"] * 1e9))
                log_row(f"logits {mode} {tag}", row)
                rows.append(row)
            notes = [
                f"{describe_entropy(stats)}; temperature 1, no ignored rows",
                "byte convention (all rows): the minimum traffic, "
                + ("read the logits once = NV x elt" if mode == "fwd" else
                   "forward read + backward read + gradient write = 3 NV x elt")
                + f" = {fmt_num(nbytes / 1e9)} GB here; TB/s = that / time (the naive rows move several times more)",
            ]
            if copy.get("status") == "ok":
                notes.append("x copy = time / (bytes / copy bandwidth); roofline, memory: copy "
                             f"**{fmt_num(copy['tbps'])} TB/s** (read + write)")
            if mode == "fwd+bwd":
                notes.append("forward+backward = autograd.grad of (logp, entropy) w.r.t. the logits (a new [N, V] "
                             "gradient unless inplace_backward)")
            results.add_section({
                "id": f"logits/{mode}/{tag}", "group": f"logits_{tag}",
                "group_title": f"logprob_entropy (logits in), N={n} V={vocab} {dtype_name(dtype)}",
                "mode": mode, "op": "logprob_entropy",
                "title": f"logprob_entropy (logits in), {mode}: N={n} V={vocab} {dtype_name(dtype)}",
                "shape": {"N": n, "V": vocab, "dtype": dtype_name(dtype)},
                "entropy": stats, "notes": notes, "columns": LOGITS_COLUMNS, "rows": rows,
            })
        del logits, ref
        free_memory(cfg.device)


# ----------------------------------------------------------------------------------------------------------
# scaling sweeps (issue 6)


def _sweep(cfg: BenchConfig, results: Results, sweep_id: str, x_name: str, xs: List[int],
           shape_at: Callable[[int], Tuple[int, int, int]], data_at: Callable[[int], Any], fixed: str) -> None:
    dtype = torch.float32 if cfg.quick else torch.bfloat16
    series: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}

    def publish(done: List[int]) -> None:  # after every size: a run killed mid-sweep keeps the sizes it finished
        results.add_sweep({
            "id": sweep_id, "x_name": x_name, "xs": list(done), "modes": ["fwd", "fwd+bwd"], "series": series,
            "title": f"linear_logprob_entropy scaling vs {x_name} ({fixed}, {dtype_name(dtype)})",
            "notes": ["no torch.compile rows (one compile per shape); errors are not checked here",
                      "OOM after an OOM at a smaller size is assumed, not re-run"],
        })

    for i, x in enumerate(xs):
        n, d, vocab = shape_at(x)
        log(f"{sweep_id}: {x_name}={x}")
        try:
            data = data_at(x)
        except Exception as exc:  # noqa: BLE001
            log(f"{sweep_id}: data for {x_name}={x} failed: {short_reason(exc)}")
            for s in series.values():
                for pts in s.values():
                    pts.append({"x": x, "status": "skipped", "reason": "data generation failed"})
            free_memory(cfg.device)
            publish(xs[: i + 1])
            continue
        g_logp, g_ent = _grad_outputs(n, cfg.device)
        for impl in linear_impls(cfg, n, d, vocab, sweep=True):
            per_mode = series.setdefault(impl.name, {})
            for mode in ("fwd", "fwd+bwd"):
                pts = per_mode.setdefault(mode, [])
                prev = pts[-1] if pts else None
                if prev is not None and prev["status"] == "oom" and x > prev["x"]:
                    pts.append({"x": x, "status": "oom", "reason": "OOM at a smaller size"})
                    continue
                row = measure_row(impl.name, _linear_builder(impl, mode, data.hidden, data.weight, data.targets,
                                                             g_logp, g_ent),
                                  cfg.device, cfg.sweep_timing, warmup_first=impl.warmup_first)
                log_row(f"{sweep_id} {mode} {x_name}={x}", row)
                pt = {"x": x, "status": row["status"]}
                for k in ("ms", "p20", "p80", "peak_gib", "reason"):
                    if k in row:
                        pt[k] = row[k]
                pts.append(pt)
        del data
        free_memory(cfg.device)
        publish(xs[: i + 1])


def run_sweep_n(cfg: BenchConfig, results: Results) -> None:
    if cfg.quick:
        xs, d, vocab, dtype = [32, 64], 128, 1000, torch.float32
    else:
        xs, d, vocab, dtype = [1024, 2048, 4096, 8192, 16384, 32768, 65536], 3584, 152064, torch.bfloat16
    full = {}

    def data_at(n):
        if "data" not in full:  # one draw at the largest N, sliced
            full["data"] = make_linear_data(max(xs), d, vocab, dtype, cfg.device)
        dd = full["data"]
        return type(dd)(dd.hidden[:n], dd.weight, dd.targets[:n])

    _sweep(cfg, results, "sweep_n", "N", xs, lambda n: (n, d, vocab), data_at, f"D={d} V={vocab}")
    full.clear()
    free_memory(cfg.device)


def run_sweep_v(cfg: BenchConfig, results: Results) -> None:
    if cfg.quick:
        xs, n, d, dtype = [500, 1000], 64, 128, torch.float32
    else:
        xs, n, d, dtype = [32768, 65536, 131072, 152064, 262144], 8192, 3584, torch.bfloat16
    _sweep(cfg, results, "sweep_v", "V", xs, lambda v: (n, d, v),
           lambda v: make_linear_data(n, d, v, dtype, cfg.device), f"N={n} D={d}")
