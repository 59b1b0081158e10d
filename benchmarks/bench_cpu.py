"""CPU side by side: ``python -m benchmarks --only cpu`` (or ``python -m benchmarks.bench_cpu``).

Every row runs in its own process (``--row``), so its peak memory is real: the peak resident set size of
that process (``getrusage(RUSAGE_SELF).ru_maxrss``) minus its resident size just before the timed calls
(torch imported, inputs built). Rows: one matmul ``h @ w.T`` (the yardstick; forward+backward is compared
with three of them), naive PyTorch on full logits, ``edge_kernels`` ``impl="torch"``, TRL's
``ChunkedLogProbFunction`` and verl's ``FusedLinearForPPO`` (their CPU paths), for fp32 and bf16, forward and
forward+backward; then ``fused_linear_policy_loss`` against the naive policy loss on full logits. Errors are
max-abs against float64 (log-prob / entropy, or the loss). Times are medians of ``--reps`` calls after one
warm-up call. The table goes to ``benchmarks/results/cpu_side_by_side.md`` (with machine, date, command).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "cpu_side_by_side.md"
SHAPES = {"small": (2048, 896, 32768), "large": (4096, 1536, 65536), "quick": (64, 32, 512)}
KERNEL_ROWS = ("matmul", "naive", "ours", "trl", "verl")
TRUNC_ROWS = ("ours_top_p", "ours_top_k")  # sampling-aware log-probs, compared with "ours" (--plan, see main)
POLICY_ROWS = ("policy_ours", "policy_ours_4mm", "policy_naive")
TITLES = {
    "matmul": "one matmul `h @ w.T` (fp32 operands)", "naive": "naive (full logits, log_softmax)",
    "ours": "**edge_kernels impl=\"torch\"**", "trl": "TRL `ChunkedLogProbFunction` (chunk 32768)",
    "verl": "verl `FusedLinearForPPO` (torch, chunk 512)",
    "ours_top_p": "edge_kernels impl=\"torch\", top_p=0.9", "ours_top_k": "edge_kernels impl=\"torch\", top_k=50",
    "policy_ours": "**fused_linear_policy_loss** (3-matmul mode)",
    "policy_ours_4mm": "fused_linear_policy_loss, 4-matmul mode (gradient=\"recompute\")",
    "policy_naive": "naive policy loss on full logits",
}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _policy_inputs(torch, n, vocab, g):
    b = max(1, n // 256)
    t = n // b
    mask = torch.arange(t)[None, :] < torch.randint(t // 2, t + 1, (b,), generator=g)[:, None]
    adv = torch.randn(b, generator=g)
    return b, t, mask, adv


def _row_fn(torch, row, h, w, tgt, old, adv, mask, b, t):
    """The callable a row times: returns the outputs whose error is measured."""
    if row == "matmul":
        h32, w32 = h.float(), w.float()
        return lambda: (h32 @ w32.t(),)
    if row == "naive":
        def naive():
            lp = torch.log_softmax((h @ w.t()).float() if h.dtype != torch.float32 else h @ w.t(), dim=-1)
            return lp.gather(1, tgt[:, None]).squeeze(1), -(lp.exp() * lp).sum(-1)
        return naive
    if row == "ours":
        from edge_kernels import linear_logprob_entropy
        return lambda: linear_logprob_entropy(h, w, tgt, impl="torch")
    if row in TRUNC_ROWS:
        from edge_kernels import linear_logprob_entropy
        kw = dict(top_p=0.9) if row == "ours_top_p" else dict(top_k=50)
        return lambda: linear_logprob_entropy(h, w, tgt, impl="torch", **kw)
    if row == "trl":
        from trl.kernels import ChunkedLogProbFunction
        return lambda: ChunkedLogProbFunction.apply(h, w, None, tgt, 1.0, 32768, None, 1.0, ("entropy",))[:2]
    if row == "verl":
        from verl.utils.experimental.torch_functional import FusedLinearForPPO
        mod = FusedLinearForPPO(chunk_size=512, impl_backend="torch")
        return lambda: mod(h, w, tgt)
    from edge_kernels.losses import fused_linear_policy_loss, policy_loss
    h3, t2 = h.view(b, t, -1), tgt.view(b, t)
    if row == "policy_naive":
        def naive_policy():
            z = h3 @ w.t()
            lp = torch.log_softmax(z.float() if z.dtype != torch.float32 else z, dim=-1)
            logp = lp.gather(-1, t2[..., None]).squeeze(-1)
            return (policy_loss(logp, old, adv, mask)[0],)
        return naive_policy
    gradient = "recompute" if row == "policy_ours_4mm" else "auto"
    return lambda: (fused_linear_policy_loss(h3, w, t2, adv, mask, old_logp=old, impl="torch", gradient=gradient)[0],)


def _oracle(torch, h, w, tgt):
    """float64 log-probs and entropies, 256 rows at a time."""
    w64, lps, ents = w.double(), [], []
    for r0 in range(0, h.shape[0], 256):
        lp = torch.log_softmax(h[r0:r0 + 256].double() @ w64.t(), dim=-1)
        lps.append(lp.gather(1, tgt[r0:r0 + 256, None]).squeeze(1))
        ents.append(-(lp.exp() * lp).sum(-1))
    return torch.cat(lps), torch.cat(ents)


def _own_matmul_ms(torch, h, w, reps: int) -> float:
    """The fp32 matmul yardstick timed in the row's own process, right after the row (after its peak was
    read): on a shared machine the load changes between processes, so ratios use this one."""
    h32, w32 = h.detach().float(), w.detach().float()
    out = torch.empty(h.shape[0], w.shape[0])
    torch.mm(h32, w32.t(), out=out)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(h32, w32.t(), out=out)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def run_row(row: str, dtype_name: str, mode: str, shape: str, reps: int) -> dict:
    """Child process: time one row, then measure its peak memory and its error."""
    import torch

    n, d, vocab = SHAPES[shape]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(vocab, d, generator=g) * (2.0 / d ** 0.5)).to(dtype)
    tgt = torch.randint(0, vocab, (n,), generator=g)
    b, t, mask, adv = _policy_inputs(torch, n, vocab, g)
    old = -torch.log(torch.tensor(float(vocab))) - 2.0 + 0.5 * torch.randn(b, t, generator=g)
    if row == "matmul_bf16":
        row_fn = (lambda: (h @ w.t(),))
    else:
        if mode == "fb":
            h.requires_grad_(True)
            w.requires_grad_(True)
        row_fn = _row_fn(torch, row, h, w, tgt, old, adv, mask, b, t)

    def call():
        if mode == "fwd":
            with torch.no_grad():
                return row_fn()
        outs = row_fn()
        sum(o.float().sum() for o in outs).backward()
        h.grad = w.grad = None
        return outs

    base = _rss_mib()
    call()
    times, outs = [], None
    for _ in range(reps):
        outs = None  # the previous call's outputs are not part of this call's peak
        t0 = time.perf_counter()
        outs = call()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    res = {"row": row, "dtype": dtype_name, "mode": mode, "ms": sorted(times)[len(times) // 2],
           "times": [round(x, 1) for x in times], "peak_mib": peak, "mm_ms": _own_matmul_ms(torch, h, w, reps)}
    if mode == "fwd" and row in ("naive", "ours", "trl", "verl"):
        lp64, ent64 = _oracle(torch, h.detach(), w.detach(), tgt)
        res["err"] = [float((outs[0].double() - lp64).abs().max()), float((outs[1].double() - ent64).abs().max())]
    elif mode == "fwd" and row.startswith("policy"):
        from edge_kernels.losses import policy_loss
        lp64, _ = _oracle(torch, h.detach(), w.detach(), tgt)
        ref = policy_loss(lp64.view(b, t), old.double(), adv.double(), mask)[0]
        res["err"] = [abs(float(outs[0].double() - ref))]
    return res


def _plan(quick: bool):
    """(section, dtype, mode, row) in the order they run: the yardsticks first, then kernel, then policy."""
    for dt in ("fp32", "bf16"):
        yield "kernel", dt, "fwd", "matmul"
        if dt == "bf16":
            yield "kernel", dt, "fwd", "matmul_bf16"
        for mode in ("fwd", "fb"):
            for row in KERNEL_ROWS[1:] + TRUNC_ROWS:
                yield "kernel", dt, mode, row
            for row in POLICY_ROWS:
                yield "policy", dt, mode, row


def _spawn(row, dt, mode, shape, reps) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_cpu", "--row", row, "--dtype", dt, "--mode", mode,
           "--shape", shape, "--reps", str(reps)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"row": row, "dtype": dt, "mode": mode, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(x, spec=".0f"):
    return "" if x is None else format(x, spec)


def render(results, shape, command, started) -> str:
    n, d, vocab = SHAPES[shape]
    by = {(r["row"], r["dtype"], r["mode"]): r for r in results}
    load = os.getloadavg()
    lines = [f"# CPU side by side: N={n} D={d} V={vocab}", "",
             f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, torch "
             f"{__import__('torch').__version__}; shared with other jobs (load average at the end "
             f"{load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f} on 2 cores): absolute times are inflated and noisy, "
             "compare the ratios, measured in the same run",
             f"- date: {started} UTC; command: `{command}`",
             "- one process per row; time = median of the timed calls after one warm-up; peak = peak RSS of the "
             "row's process minus its RSS before the first call; error = max |x - float64|; fwd+bwd backward of "
             "sum(logp) + sum(entropy) (kernel) or of the loss (policy); the ratios divide by an fp32 matmul "
             "`h @ w.T` timed in the row's own process right after it (rows measured before that existed: by "
             "the matmul row)", ""]
    for dt in ("fp32", "bf16"):
        mm = by.get(("matmul", dt, "fwd"), {}).get("ms")
        lines += [f"## {dt} inputs", "", "| row | fwd ms | fwd+bwd ms | fwd / 1 mm | fb / 3 mm | peak MiB fwd | "
                  "peak MiB fb | max err |", "|---|---|---|---|---|---|---|---|"]
        for row in ("matmul", "matmul_bf16") + KERNEL_ROWS[1:] + TRUNC_ROWS + POLICY_ROWS:
            f, fb = by.get((row, dt, "fwd")), by.get((row, dt, "fb"))
            if f is None and fb is None:
                continue
            title = TITLES.get(row, "one matmul `h @ w.T` (bf16 operands, bf16 output)")
            if any("error" in r for r in (f, fb) if r):
                lines.append(f"| {title} | failed: {(f or {}).get('error') or fb.get('error')} |||||||")
                continue
            fms, bms = (f or {}).get("ms"), (fb or {}).get("ms")
            fmm, bmm = ((r or {}).get("mm_ms") or mm for r in (f, fb))  # own-process yardstick when measured
            fmm = fms if row == "matmul" else fmm
            err = " / ".join(f"{e:.1e}" for e in (f or {}).get("err", []))
            lines.append(f"| {title} | {_fmt(fms)} | {_fmt(bms)} | {_fmt(fms and fmm and fms / fmm, '.2f')} | "
                         f"{_fmt(bms and bmm and bms / (3 * bmm), '.2f')} | {_fmt((f or {}).get('peak_mib'))} | "
                         f"{_fmt((fb or {}).get('peak_mib'))} | {err} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--mode", default="fwd")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--plan", help="only these rows, comma-separated dtype:mode:row (e.g. fp32:fb:ours)")
    ap.add_argument("--prior", type=Path, help="JSON lines of rows already measured (this driver's stdout)")
    args = ap.parse_args(argv)
    if args.row:
        print(json.dumps(run_row(args.row, args.dtype, args.mode, args.shape, args.reps)))
        return 0
    started = datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M")
    command = "python -m benchmarks.bench_cpu " + " ".join(argv if argv is not None else sys.argv[1:])
    results = [json.loads(x) for x in args.prior.read_text().splitlines() if x.startswith("{")] if args.prior else []
    plan = [tuple(x.split(":")) for x in args.plan.split(",")] if args.plan else \
        [(dt, mode, row) for _, dt, mode, row in _plan(args.shape == "quick")]
    for dt, mode, row in plan:
        results.append(_spawn(row, dt, mode, args.shape, args.reps))
        print(json.dumps(results[-1]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(results, args.shape, command, started) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
