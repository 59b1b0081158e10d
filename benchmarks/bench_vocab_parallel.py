"""Communication of the vocabulary-parallel (sharded LM head) op next to verl's and Megatron's, plus a gloo timing.

Two tables, written as markdown to ``benchmarks/results/vocab_parallel.md`` (and printed):

1. Collectives and bytes per call at the Qwen2.5-7B head shape (D=3584, V=152064; N=8192 tokens per micro-batch)
   for TP = 2, 4, 8, counted from each implementation's code:

   * ours (``edge_kernels.ops.vocab_parallel``): forward one all-gather of ``3N + 6`` fp32 per rank
     (``vocab_start=`` given; without it one more all-gather of W int64); backward one fp32 all-reduce of
     ``d_hidden`` (``N x D``) with ``reduce_hidden_grad=True``, none with False (verl's mode).
   * verl 0.9.1 (``verl/utils/kernel/kernels.py``): forward all-reduce MAX of the per-split maxima
     ``[N, ceil(V_r / 1024)]`` fp32, all-reduce SUM of the target logit ``[N]``, all-reduce SUM of the packed
     ``[2, N]`` statistics; backward none (partial ``d_hidden``, summed by the caller's reduce-scatter).
   * Megatron-core ``vocab_parallel_cross_entropy`` (no entropy): all-reduce MAX ``[N]``, all-reduce SUM of the
     target logit and the exp-sum ``[2N]`` (fused form); backward none in the loss, and the column-parallel
     head's input gradient all-reduce of ``N x D`` in the activation dtype (bf16) in the layer.

   "sent/rank" is what one rank sends in a ring algorithm: all-reduce ``2 (W-1)/W x``, all-gather ``(W-1) x``
   for a payload ``x`` per rank. At these sizes (kilobytes to a megabyte per forward) collectives are latency
   bound, so the count matters more than the bytes; the ``d_hidden`` reduction (59 MB in fp32) dominates the
   bytes wherever it is done.

2. Gloo on this machine's CPU: wall time per forward+backward of the sharded op (PyTorch path, fp32) at a small
   shape for W = 1 (unsharded), 2, 4 processes, and the bytes its collectives were handed (measured by wrapping
   ``torch.distributed``), to check table 1's formula. For the record only: CPU cores are shared.

Run: ``python -m benchmarks.bench_vocab_parallel`` (or ``python benchmarks/bench_vocab_parallel.py``).
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

D_7B, V_7B, N_7B = 3584, 152064, 8192
SPLIT_VERL = 1024  # verl's vocab_per_split


def _ring(kind: str, payload: float, world: int) -> float:
    return 2 * (world - 1) / world * payload if kind == "all_reduce" else (world - 1) * payload


def comm_rows(n: int = N_7B, d: int = D_7B, vocab: int = V_7B, worlds=(2, 4, 8)):
    """``(impl, W, fwd collectives, fwd payload bytes, fwd sent/rank, bwd collectives, bwd sent/rank)``."""
    rows = []
    for w in worlds:
        v_r = math.ceil(vocab / w)
        impls = {
            "edge (vocab_start given; fp32 d_hidden)": ([("all_gather", 4 * (3 * n + 6))], [("all_reduce", 4 * n * d)]),
            "edge (offsets gathered; fp32 d_hidden)": ([("all_gather", 8), ("all_gather", 4 * (3 * n + 6))],
                                        [("all_reduce", 4 * n * d)]),
            "edge, reduce_hidden_grad=False": ([("all_gather", 4 * (3 * n + 6))], []),
            "verl 0.9.1 (partial d_hidden)": ([("all_reduce", 4 * n * math.ceil(v_r / SPLIT_VERL)),
                                               ("all_reduce", 4 * n), ("all_reduce", 8 * n)], []),
            "Megatron CE + head (bf16 d_hidden)": ([("all_reduce", 4 * n), ("all_reduce", 8 * n)],
                                                   [("all_reduce", 2 * n * d)]),
        }
        for name, (fwd, bwd) in impls.items():
            rows.append((name, w, len(fwd), sum(p for _, p in fwd), sum(_ring(k, p, w) for k, p in fwd),
                         len(bwd), sum(_ring(k, p, w) for k, p in bwd)))
    return rows


def _mb(x: float) -> str:
    return f"{x / 1e6:.3f}"


def comm_table() -> str:
    lines = [f"Collectives per call, Qwen2.5-7B head: D={D_7B}, V={V_7B}, N={N_7B} tokens (MB = 1e6 bytes)", "",
             "| impl | TP | fwd collectives | fwd payload/rank MB | fwd sent/rank MB | bwd collectives "
             "| bwd sent/rank MB |", "|---|---|---|---|---|---|---|"]
    for name, w, fc, fp, fs, bc, bs in comm_rows():
        lines.append(f"| {name} | {w} | {fc} | {_mb(fp)} | {_mb(fs)} | {bc} | {_mb(bs)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# gloo timing


def _bytes_counter(log):
    """Wrap the collectives the op calls; ``log`` gets ``(name, bytes handed in)``."""
    saved = {}
    for name in ("all_gather_single", "all_gather_into_tensor", "all_reduce"):
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        saved[name] = fn

        def wrapped(*a, _fn=fn, _name=name, **k):
            t = a[1] if _name != "all_reduce" else a[0]
            log.append((_name, t.numel() * t.element_size()))
            return _fn(*a, **k)
        setattr(dist, name, wrapped)
    return saved


def _time_rank(rank, world, init_file, n, d, vocab, reps, out_file):
    torch.set_num_threads(1)
    from edge_kernels import VocabParallel, linear_logprob_entropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(vocab, d, generator=g) / d ** 0.5
    targets = torch.randint(0, vocab, (n,), generator=g)
    kw = {}
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        v_r = math.ceil(vocab / world)
        lo, hi = rank * v_r, min(vocab, (rank + 1) * v_r)
        weight = weight[lo:hi].contiguous()
        kw = dict(vocab_parallel=VocabParallel(dist.group.WORLD, vocab_start=lo))
    times, log = [], []
    for i in range(reps + 1):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        if world > 1:
            dist.barrier()
        saved = _bytes_counter(log) if (i == 1 and world > 1) else {}
        t0 = time.perf_counter()
        logp, ent = linear_logprob_entropy(h, w, targets, impl="torch", **kw)
        (logp.sum() + ent.sum()).backward()
        times.append(time.perf_counter() - t0)
        for name, fn in saved.items():
            setattr(dist, name, fn)
    if rank == 0:
        Path(out_file).write_text(f"{statistics.median(times[1:])} {sum(b for _, b in log)} {len(log)}")
    if world > 1:
        dist.destroy_process_group()


def gloo_table(n=512, d=256, vocab=8192, reps=5, worlds=(1, 2, 4)) -> str:
    lines = [f"Gloo on CPU (1 thread per rank, PyTorch path, fp32): N={n}, D={d}, V={vocab}; median of {reps} "
             "forward+backward calls, rank 0", "",
             "| W | ms per fwd+bwd | collectives | bytes handed to collectives | formula (3N+6)*4 + N*D*4 |",
             "|---|---|---|---|---|"]
    for world in worlds:
        with tempfile.TemporaryDirectory() as tmp:
            init, out = os.path.join(tmp, "init"), os.path.join(tmp, "out")
            if world == 1:
                _time_rank(0, 1, init, n, d, vocab, reps, out)
            else:
                mp.spawn(_time_rank, args=(world, init, n, d, vocab, reps, out), nprocs=world, join=True)
            sec, nbytes, calls = Path(out).read_text().split()
        formula = (3 * n + 6) * 4 + n * d * 4 if world > 1 else 0
        lines.append(f"| {world} | {float(sec) * 1e3:.1f} | {calls} | {nbytes} | {formula} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    text = "# Vocabulary-parallel LM head: communication\n\n" + comm_table() + "\n\n" + gloo_table() + "\n"
    print(text)
    out = Path(__file__).resolve().parent / "results" / "vocab_parallel.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main(sys.argv[1:])
