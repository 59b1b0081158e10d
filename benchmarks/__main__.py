"""``python -m benchmarks [--quick] [--only NAME[,NAME...]] [--out DIR] [--compile | --no-compile]``;
``python -m benchmarks --only cpu``: the CPU side-by-side table (:mod:`benchmarks.bench_cpu`).
``python -m benchmarks --merge DIR [DIR ...] --out DIR``

Runs the benchmarks and writes ``results.md`` (Markdown tables), ``results.json`` and PNG plots to
``benchmarks/results/<device-slug>-<YYYY-MM-DD>/`` (``...-quick`` for ``--quick``) or ``--out DIR``. When the
directory already holds a ``results.json`` of the same device and mode, the new sections replace those with
the same id and the others are kept, so ``--only`` runs accumulate. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional

# (benchmarks/__init__.py, which runs first, sets TRITON_INTERPRET=1 on machines without CUDA)
from .env import RESULTS_DIR, environment, pick_device
from .report import Results, load_results
from .roofline import copy_bandwidth
from .timing import TimingConfig, set_deadline

# name -> (description, "module:function"); a runner is ``run(cfg: BenchConfig, results: Results) -> None`` and
# adds sections (tables) or sweeps to ``results``. A new op: write bench_<op>.py with such a runner, add it here.
BENCHMARKS = {
    "linear": ("fused linear log-prob + entropy, forward and forward+backward (issue 2)",
               "bench_logprob_entropy:run_linear"),
    "logits": ("logits-in log-prob + entropy, TB/s vs copy bandwidth (issue 2)", "bench_logprob_entropy:run_logits"),
    "sweep_n": ("time and peak memory vs N (issue 6)", "bench_logprob_entropy:run_sweep_n"),
    "sweep_v": ("time and peak memory vs V (issue 6)", "bench_logprob_entropy:run_sweep_v"),
    "policy": ("fused linear policy loss (when edge_kernels.losses.fused_linear_policy_loss exists)",
               "bench_policy_loss:run_policy"),
    "train_step": ("one policy-update step on a small Qwen2: edge-train vs naive logits vs TRL GRPOTrainer (issue 6)",
                   "bench_train_step:run_train_step"),
}


def _runner(name: str):
    import importlib

    module, func = BENCHMARKS[name][1].split(":")
    return getattr(importlib.import_module(f"{__package__ or 'benchmarks'}.{module}"), func)


def _parse(argv: List[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes (CPU smoke test, < 1 min); on a GPU: a quick smoke test of every row")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help=f"run only these (comma-separated or repeated): {', '.join(BENCHMARKS)}")
    ap.add_argument("--out", type=Path, help="output directory (default benchmarks/results/<device>-<date>)")
    ap.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    grp = ap.add_mutually_exclusive_group()
    grp.add_argument("--compile", dest="compile", action="store_true", default=None,
                     help="include torch.compile rows (default in full mode)")
    grp.add_argument("--no-compile", dest="compile", action="store_false",
                     help="leave torch.compile rows out (default with --quick: compiling takes ~20 s on a CPU)")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="DIR",
                    help="merge the results.json of these directories into --out and re-render; runs nothing")
    ap.add_argument("--budget-s", type=float, metavar="S",
                    help="wall-clock budget: rows that would start after S seconds are reported as skipped (so a "
                         "run under an external time limit still writes its results; e.g. 480 under a 600 s limit)")
    ap.add_argument("--list", action="store_true", help="list the benchmark names and exit")
    return ap.parse_args(argv)


def _merge(dirs: List[Path], out: Optional[Path]) -> int:
    docs = [load_results(d / "results.json" if d.is_dir() else d) for d in dirs]
    merged = docs[0]
    for doc in docs[1:]:
        merged.merge(doc)
    out = out or RESULTS_DIR / f"{merged.env['slug']}-{merged.env['date']}"
    for p in merged.write(out):
        print(p)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    if args.list:
        for name, (what, _) in BENCHMARKS.items():
            print(f"{name:8s} {what}")
        return 0
    if args.merge:
        return _merge(args.merge, args.out)

    only = [x.strip() for item in args.only for x in item.split(",") if x.strip()] or list(BENCHMARKS)
    if only == ["cpu"]:  # the CPU side-by-side table: its own driver, one process per row (bench_cpu.py)
        from .bench_cpu import main as cpu_main

        return cpu_main(["--shape", "quick"] if args.quick else [])
    unknown = [x for x in only if x not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}", file=sys.stderr)
        return 2

    import torch

    from .bench_logprob_entropy import BenchConfig, log

    torch.manual_seed(0)
    device = pick_device(args.device)
    if device.type != "cuda" and args.quick:
        # quick CPU times only exercise the code; one thread avoids OpenMP barrier stalls (100x slowdowns of
        # millisecond ops) when the cores are shared with other processes, e.g. a parallel test run
        torch.set_num_threads(1)
    if device.type != "cuda" and not args.quick:
        print("the full benchmarks use GPU-sized shapes (a [8192, 152064] logits tensor is 2.5 GB in bf16); "
              "on a machine without CUDA run `python -m benchmarks --quick`", file=sys.stderr)
        return 2
    if args.quick:
        timing = TimingConfig(min_reps=5, rep_ms=50, cpu_max_s=0.2, cpu_min_reps=3, cpu_max_reps=10)
        sweep_timing = TimingConfig(min_reps=3, rep_ms=25, cpu_max_s=0.1, cpu_min_reps=2, cpu_max_reps=5)
    else:
        timing = TimingConfig(min_reps=10, rep_ms=100)
        sweep_timing = TimingConfig(min_reps=5, rep_ms=50)
    cfg = BenchConfig(device=device, quick=args.quick,
                      compile=(not args.quick) if args.compile is None else args.compile,
                      timing=timing, sweep_timing=sweep_timing)
    env = environment(device, argv, args.quick)
    out_dir = args.out or RESULTS_DIR / (f"{env['slug']}-{env['date']}" + ("-quick" if args.quick else ""))
    results = Results(env)
    prev_path = out_dir / "results.json"
    if prev_path.exists():  # accumulate --only runs: same ids are replaced, the rest kept
        try:
            prev = load_results(prev_path)
            if prev.env.get("slug") == env["slug"] and prev.env.get("mode") == env["mode"]:
                prev.merge(results)
                results = prev
                log(f"adding to the earlier results in {out_dir}")
        except Exception as exc:  # noqa: BLE001
            log(f"could not read {prev_path} ({exc}); overwriting it")
    results.autosave_dir = out_dir  # tables are saved as they are finished, plots after every benchmark
    if args.budget_s:
        set_deadline(args.budget_s)
    t0 = time.perf_counter()
    log(f"{env['device']}; torch {env['torch']}, triton {env['triton']}; running {only} -> {out_dir}")
    results.rooflines["copy"] = copy_bandwidth(device, timing)
    paths = []
    for name in only:
        t1 = time.perf_counter()
        errors = [e for e in results.env.get("errors", []) if not e.startswith(f"{name} ")]
        try:
            _runner(name)(cfg, results)
        except Exception as exc:  # noqa: BLE001 - keep what the other benchmarks measured
            traceback.print_exc()
            errors.append(f"{name} crashed: {type(exc).__name__}: {exc}")
        results.env["errors"] = errors
        results.env["wall_s"] = round(time.perf_counter() - t0, 1)
        paths = results.write(out_dir)  # after every benchmark: a later crash or kill keeps what was measured
        log(f"{name} done in {time.perf_counter() - t1:.1f} s")
    for p in paths:
        print(p)
    log(f"total {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
