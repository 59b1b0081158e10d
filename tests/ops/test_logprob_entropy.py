"""logprob_entropy (logits in -> log-prob, entropy) against the float64 oracle, forward and backward.

Tolerances: statistics run in fp32 on logits read exactly, so forward errors are ~u32 * |z| (<= 1e-4
asserted, the library's accuracy goal). The logits gradient is computed in fp32 and rounded once to the
logits' dtype: elementwise |err| <= u_dtype * |ref| + 1e-6 * |g_row| (u: fp32 2**-24, fp16 2**-11,
bf16 2**-8, but 2**-7 under Triton's interpreter, whose fp32 -> bf16 cast truncates instead of rounding
to nearest: measured on triton 3.9, half of all values differ from torch's cast); the absolute term is the fp32
resolution of p for very peaked rows, see
test_linear_logprob_entropy).
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from edge_kernels import logprob_entropy
from edge_kernels.oracle import oracle_logprob_entropy
from data_builders import make_logits

IMPLS = ["torch", "triton"]
UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _check(impl, logits, targets, temperature, seed=0, inplace=False):
    x = logits.clone().requires_grad_()
    logp, ent = logprob_entropy(x if not inplace else x * 1, targets, temperature=temperature, impl=impl,
                                inplace_backward=inplace)
    g = torch.Generator().manual_seed(seed + 1)  # CPU generator (reproducible everywhere), then the logits' device
    g_logp, g_ent = (torch.randn(logp.shape, generator=g).to(logits.device) for _ in range(2))
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()

    x64 = logits.double().requires_grad_()
    r_logp, r_ent = oracle_logprob_entropy(x64, targets, temperature)
    ((r_logp * g_logp.double()).sum() + (r_ent * g_ent.double()).sum()).backward()

    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    assert (logp.double() - r_logp).abs().max() <= 1e-4
    assert (ent.double() - r_ent).abs().max() <= 1e-4
    assert x.grad.dtype == logits.dtype
    row_atol = 1e-6 * (g_logp.abs() + g_ent.abs()).double()[..., None] \
        * (1 + logits.double().nan_to_num(0.0, 0.0, 0.0).abs().max())
    err = (x.grad.double() - x64.grad).abs()
    unit = UNIT[logits.dtype]
    if impl == "triton" and logits.dtype == torch.bfloat16 and not logits.is_cuda:
        unit = 2.0**-7  # the interpreter truncates fp32 -> bf16 (see the module docstring)
    assert (err <= unit * x64.grad.abs() + row_atol).all(), err.max()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, v, temperature", [((1,), 1, 1.0), ((7,), 13, 0.6), ((3, 5), 127, 1.7),
                                                    ((64,), 1000, 1.0), ((2, 3, 4), 4099, 0.6)])
def test_matches_float64_oracle(shape, v, temperature, dtype, impl):
    logits, targets = make_logits(shape, v, dtype=dtype, seed=v)
    _check(impl, logits, targets, temperature, seed=v)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_rows_are_read_in_place(impl):
    full, targets = make_logits((3, 9), 211, seed=1)
    view = full[:, :-1]  # the usual "drop the last position" slice: rows are strided, not contiguous
    assert not view.is_contiguous()
    _check(impl, view, targets[:, :-1], 0.9, seed=1)


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_backward_writes_gradient_over_logits(impl):
    logits, targets = make_logits((6,), 300, seed=2)
    x = logits.clone().requires_grad_()
    buf = x * 1.0  # a non-leaf buffer the op may overwrite
    logp, ent = logprob_entropy(buf, targets, impl=impl, inplace_backward=True)
    (logp.sum() + ent.sum()).backward()
    x64 = logits.double().requires_grad_()
    r_logp, r_ent = oracle_logprob_entropy(x64, targets)
    (r_logp.sum() + r_ent.sum()).backward()
    assert torch.allclose(x.grad.double(), x64.grad, atol=1e-5)
    assert torch.allclose(buf.detach().double(), x64.grad, atol=1e-5)  # buf now holds the gradient


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_backward_on_overlapping_rows_gets_a_new_buffer(impl):
    # an expand()-ed view: every row is the same memory, so writing the gradient over it would race
    logits, targets = make_logits((1,), 300, seed=12, ignore_frac=0.0)
    x = logits.clone().requires_grad_()
    view = (x * 1.0).expand(5, 300)
    t5 = torch.randint(0, 300, (5,), generator=torch.Generator().manual_seed(0))
    logp, ent = logprob_entropy(view, t5, impl=impl, inplace_backward=True)
    (logp.sum() + 0.5 * ent.sum()).backward()
    x64 = logits.double().expand(5, 300).clone().requires_grad_()
    r_logp, r_ent = oracle_logprob_entropy(x64, t5)
    (r_logp.sum() + 0.5 * r_ent.sum()).backward()
    assert torch.allclose(x.grad.double(), x64.grad.sum(0, keepdim=True), atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_rows_are_never_read(impl):
    # padding rows (ignored targets) full of NaN: outputs 0, gradient exactly 0 there, nothing leaks elsewhere;
    # rows 0-15 are all padding (a whole interpreter block), row 20 is padding inside a block of real rows
    logits, targets = make_logits((40,), 300, seed=13, ignore_frac=0.0)
    targets = targets.clone()
    targets[:16] = -100
    targets[20] = -100
    logits[:16] = float("nan")
    logits[20] = float("nan")
    x = logits.clone().requires_grad_()
    logp, ent = logprob_entropy(x, targets, temperature=0.9, impl=impl)
    (logp.sum() + 0.5 * ent.sum()).backward()
    pad = targets == -100
    assert bool((logp[pad] == 0).all() and (ent[pad] == 0).all() and (x.grad[pad] == 0).all())
    keep = ~pad
    x64 = logits[keep].double().requires_grad_()
    r_logp, r_ent = oracle_logprob_entropy(x64, targets[keep], 0.9)
    (r_logp.sum() + 0.5 * r_ent.sum()).backward()
    assert (logp[keep].double() - r_logp).abs().max() <= 1e-5
    assert (ent[keep].double() - r_ent).abs().max() <= 1e-5
    assert torch.allclose(x.grad[keep].double(), x64.grad, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_vocabulary_entries(impl):
    logits, targets = make_logits((10,), 50, seed=3, ignore_frac=0.0)
    logits[:, ::4] = float("-inf")  # a vocabulary mask
    targets = torch.where(targets % 4 == 0, targets + 1, targets)
    _check(impl, logits, targets, 1.0, seed=3)


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_propagates(impl):
    logits, targets = make_logits((4,), 30, seed=4, ignore_frac=0.0)
    logits[1, 5] = float("nan")
    logits[2, 7] = float("inf")
    logp, ent = logprob_entropy(logits, targets, impl=impl)
    assert torch.isnan(logp[1]) and torch.isnan(ent[1]) and torch.isnan(logp[2]) and torch.isnan(ent[2])
    assert torch.isfinite(logp[[0, 3]]).all()


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 40), v=st.integers(1, 700), temperature=st.sampled_from([0.7, 1.0, 1.9]),
       dtype=st.sampled_from([torch.float32, torch.float16]), impl=st.sampled_from(IMPLS), seed=st.integers(0, 999))
def test_fuzz_against_oracle(n, v, temperature, dtype, impl, seed):
    logits, targets = make_logits((n,), v, dtype=dtype, seed=seed)
    _check(impl, logits, targets, temperature, seed=seed)


@pytest.mark.parametrize(
    "logits, targets, kw, exc, match",
    [
        (torch.randn(4, 10), torch.zeros(4), {}, TypeError, "targets must be an integer"),
        (torch.randn(4, 10), torch.zeros(3, dtype=torch.long), {}, ValueError, "targets has shape"),
        (torch.randn(4, 10), torch.full((4,), 10), {}, ValueError, r"\[0, 10\)"),
        (torch.randn(4, 10).double(), torch.zeros(4, dtype=torch.long), {}, TypeError, "logits must be float32"),
        (torch.randn(0, 10), torch.zeros(0, dtype=torch.long), {}, ValueError, "empty"),
        (torch.randn(4, 10), torch.zeros(4, dtype=torch.long), dict(temperature=0), ValueError, "temperature"),
        (torch.randn(4, 10), torch.zeros(4, dtype=torch.long), dict(temperature=1e-39), ValueError,
         "temperature must be >= "),
        (torch.randn(4, 10), torch.zeros(4, dtype=torch.long), dict(impl="x"), ValueError, "impl"),
    ],
)
def test_bad_input(logits, targets, kw, exc, match):
    with pytest.raises(exc, match=match):
        logprob_entropy(logits, targets, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_real_shape(dtype):
    logits, targets = make_logits((1024,), 151936, dtype=dtype, seed=5)
    _check("triton", logits.cuda(), targets.cuda(), 0.9, seed=5)


@pytest.mark.gpu
def test_gpu_offsets_beyond_int32():
    n, v = 14200, 151936  # N * V > 2**31 elements (4.3 GB of bf16)
    assert n * v > 2**31
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, v, (n,), device="cuda")
    x = logits.requires_grad_()
    logp, ent = logprob_entropy(x, targets, impl="triton", inplace_backward=False)
    idx = torch.tensor([0, n // 2, n - 1], device="cuda")
    r_logp, r_ent = oracle_logprob_entropy(logits[idx].detach(), targets[idx])
    assert (logp[idx].double() - r_logp).abs().max() <= 1e-4
    assert (ent[idx].double() - r_ent).abs().max() <= 1e-4
    logp.sum().backward()
    assert torch.isfinite(x.grad[n - 1]).all() and x.grad[n - 1].abs().sum() > 0
