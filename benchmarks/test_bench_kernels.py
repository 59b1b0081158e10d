"""pytest-benchmark entries for regression tracking (not collected by the default ``pytest`` run, whose
``testpaths`` is ``tests/``).

    python -m pytest benchmarks --benchmark-only --benchmark-autosave          # store a baseline
    python -m pytest benchmarks --benchmark-only --benchmark-compare           # compare with the latest one
    python -m pytest benchmarks --benchmark-only --benchmark-compare=0001 --benchmark-compare-fail=median:10%

Shapes: on CUDA the issue's N=8192 D=3584 V=152064 bf16 (logits in: N=8192 V=152064 bf16); on the CPU tiny
fp32 shapes with the PyTorch path (a smoke test, not a measurement). Each entry synchronizes the device before
returning and is called once untimed first (Triton JIT, autotuning).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from benchmarks.bench_logprob_entropy import (  # noqa: E402
    Impl,
    _grad_outputs,
    _linear_builder,
    _logits_builder,
    naive_linear,
    naive_logits,
)
from benchmarks.data import make_linear_data, make_logits_data  # noqa: E402
from benchmarks.env import pick_device, sync  # noqa: E402

DEVICE = pick_device()
if DEVICE.type == "cuda":
    LINEAR_SHAPE = (8192, 3584, 152064, torch.bfloat16)
    LOGITS_SHAPE = (8192, 152064, torch.bfloat16)
else:
    LINEAR_SHAPE = (64, 128, 1000, torch.float32)
    LOGITS_SHAPE = (64, 1000, torch.float32)
MODES = ["fwd", "fwd+bwd"]


@pytest.fixture(scope="module")
def linear_data():
    n, d, vocab, dtype = LINEAR_SHAPE
    data = make_linear_data(n, d, vocab, dtype, DEVICE)
    return data, _grad_outputs(n, DEVICE)


@pytest.fixture(scope="module")
def logits_data():
    n, vocab, dtype = LOGITS_SHAPE
    logits, targets = make_logits_data(n, vocab, dtype, DEVICE)
    return logits, targets, _grad_outputs(n, DEVICE)


def _ours_linear():
    from edge_kernels import linear_logprob_entropy

    return lambda h, w, t: linear_logprob_entropy(h, w, t)


def _ours_logits():
    from edge_kernels import logprob_entropy

    return lambda x, t: logprob_entropy(x, t)


def _run(benchmark, fn, group: str, **info):
    def call():
        out = fn()
        sync(DEVICE)
        return out

    call()  # untimed: JIT compilation, autotuning, allocator warmup
    benchmark.group = group
    benchmark.extra_info.update(device=str(DEVICE), **info)
    out = benchmark(call)
    assert torch.isfinite(out[0]).all()
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["ours", "naive"])
def test_linear_logprob_entropy(benchmark, linear_data, impl, mode):
    data, (g_logp, g_ent) = linear_data
    make = _ours_linear if impl == "ours" else (lambda: naive_linear)
    fn = _linear_builder(Impl(impl, make), mode, data.hidden, data.weight, data.targets, g_logp, g_ent)()
    n, d, vocab, dtype = LINEAR_SHAPE
    _run(benchmark, fn, f"linear_logprob_entropy {mode}", shape=f"N={n} D={d} V={vocab} {dtype}",
         model_flops=(2 if mode == "fwd" else 6) * n * d * vocab)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["ours", "naive"])
def test_logprob_entropy(benchmark, logits_data, impl, mode):
    logits, targets, (g_logp, g_ent) = logits_data
    make = _ours_logits if impl == "ours" else (lambda: naive_logits)
    fn = _logits_builder(Impl(impl, make), mode, logits, targets, g_logp, g_ent)()
    n, vocab, dtype = LOGITS_SHAPE
    _run(benchmark, fn, f"logprob_entropy {mode}", shape=f"N={n} V={vocab} {dtype}",
         min_bytes=(1 if mode == "fwd" else 3) * n * vocab * logits.element_size())


@pytest.mark.parametrize("impl", ["ours", "naive"])
def test_fused_linear_policy_loss(benchmark, linear_data, impl):
    """Forward+backward of the policy loss (edge_kernels.losses.fused_linear_policy_loss)."""
    from benchmarks.bench_policy_loss import naive_policy, policy_impls, row_builder
    from benchmarks.bench_logprob_entropy import BenchConfig
    from benchmarks.timing import Skip

    data, _ = linear_data
    n, d, vocab, dtype = LINEAR_SHAPE
    b = 16 if n % 16 == 0 else 1
    t = n // b
    g = torch.Generator(device=DEVICE)
    g.manual_seed(0)
    old = -torch.rand(b, t, generator=g, device=DEVICE)
    adv = torch.randn(b, 1, generator=g, device=DEVICE).expand(b, t).contiguous()
    mask = torch.ones(b, t, dtype=torch.bool, device=DEVICE)
    args = (data.hidden.view(b, t, d), data.weight, data.targets.view(b, t), old, adv, mask)
    if impl == "ours":
        spec = policy_impls(BenchConfig(device=DEVICE, quick=True, compile=False))[0]
    else:
        spec = Impl("naive", lambda: naive_policy)
    try:
        fn = row_builder(spec, "fwd+bwd", args)()
    except Skip as exc:
        pytest.skip(str(exc))
    _run(benchmark, fn, "fused_linear_policy_loss fwd+bwd", shape=f"B={b} T={t} D={d} V={vocab} {dtype}",
         model_flops=6 * n * d * vocab)
