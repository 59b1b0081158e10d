"""linear_logprob_entropy (hidden, W -> log-prob, entropy) against the float64 oracle, forward and backward.

Tolerances (inputs are rounded to the tested dtype first; the oracle then runs in float64 on those exact
values, so only the kernel's own arithmetic is measured):

* Forward: logits are accumulated in fp32 from exact products (fp16/bf16 products are exact in fp32), so the
  log-prob and entropy errors are ~D * 2**-24 * |logit| (~1e-6 here). We assert <= 1e-4 absolute, the
  library's stated accuracy goal for logp (entropy goal 3e-4 at real shapes).
* Backward: ||grad - ref|| <= rtol * ||ref|| + atol. ``atol`` is what fp32 softmax statistics can resolve:
  a logit or log-sum-exp carries an absolute error ~u32 * (1 + max|z|) (u32 = 6e-8), which moves a row's
  logits gradient by |g| times that; we allow 16x, i.e. 1e-6 * (1 + max|z|) * |g_row| * ||W_row|| (or
  ||hidden_row|| for d_weight). It matters only for very peaked rows (p_target = 1 - 1e-7), whose tiny
  gradient 1 - p_target is a cancellation no fp32 softmax resolves to full relative precision. rtol: fp32
  inputs run in fp32 end to end -> 2e-5.
  16-bit inputs round the logits-gradient tile (Triton path) and the returned gradient to the input dtype:
  two roundings of unit roundoff u (fp16 2**-11 = 4.9e-4, bf16 2**-8 = 3.9e-3) give a relative norm error of
  about u; we allow 3u (fp16 1.5e-3, bf16 1.2e-2). Measured: fp16 ~3e-4, bf16 ~3e-3.
"""

import math
import zlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

from edge_kernels import linear_logprob_entropy
from edge_kernels import backends
from edge_kernels.core.params import LaunchParams
from edge_kernels.oracle import oracle_linear_logprob_entropy, oracle_logprob_entropy
from data_builders import make_linear_inputs, rel_err

FWD_ATOL = 1e-4
GRAD_RTOL = {torch.float32: 2e-5, torch.float16: 1.5e-3, torch.bfloat16: 1.2e-2}
IMPLS = ["torch", "triton"]

# (N, D, V, temperature, bias, lead): every value of the grid appears; V never only powers of two.
CASES = [
    (1, 16, 1, 1.0, False, None),
    (1, 40, 4099, 0.6, True, None),
    (7, 16, 13, 1.7, True, None),
    (7, 96, 127, 1.0, False, (7,)),
    (64, 40, 1000, 0.6, False, (4, 16)),
    (64, 96, 13, 1.7, True, None),
    (300, 40, 127, 1.0, True, (3, 100)),
    (300, 16, 4099, 1.7, False, None),
]


def _run(impl, hidden, weight, bias, targets, temperature, grad_seed=1, use_entropy=True, **kw):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    logp, ent = linear_logprob_entropy(h, w, targets, bias=b, temperature=temperature, impl=impl,
                                       return_entropy=use_entropy, **kw)
    g = torch.Generator().manual_seed(grad_seed)
    g_logp = torch.randn(logp.shape, generator=g)
    g_ent = torch.randn(logp.shape, generator=g)
    loss = (logp * g_logp).sum() + ((ent * g_ent).sum() if use_entropy else 0.0)
    loss.backward()
    return logp, ent, h.grad, w.grad, (None if b is None else b.grad), g_logp, g_ent


def _oracle(hidden, weight, bias, targets, temperature, g_logp, g_ent, use_entropy=True):
    h = hidden.detach().double().reshape(-1, hidden.shape[-1])
    w = weight.detach().double()
    b = None if bias is None else bias.detach().double()
    logits = (h @ w.t() + (0 if b is None else b)).requires_grad_()
    logp, ent = oracle_logprob_entropy(logits, targets.reshape(-1), temperature)
    loss = (logp * g_logp.double().reshape(-1)).sum()
    if use_entropy:
        loss = loss + (ent * g_ent.double().reshape(-1)).sum()
    loss.backward()
    dz = logits.grad
    # per-row absolute resolution of fp32 softmax statistics (see the module docstring)
    g_rows = g_logp.double().reshape(-1).abs() + (g_ent.double().reshape(-1).abs() if use_entropy else 0.0)
    g_rows = g_rows * 1e-6 * (1 + logits.detach().abs().max() / temperature)
    w_max = w.norm(dim=1).max()
    grads = dict(dh=(dz @ w, g_rows.norm() * w_max), dw=(dz.t() @ h, (g_rows * h.norm(dim=1)).norm()),
                 db=None if b is None else (dz.sum(0), g_rows.norm()))
    return logp.view(targets.shape), ent.view(targets.shape), grads


def _grad_ok(x, ref, dtype):
    value, atol = ref
    err = (x.double().reshape(value.shape) - value).norm()
    return err <= GRAD_RTOL[dtype] * value.norm() + atol, (err / value.norm()).item()


def _check(out, ref, dtype, use_entropy=True):
    logp, ent, dh, dw, db = out[:5]
    r_logp, r_ent, grads = ref
    assert logp.dtype == torch.float32
    assert torch.isfinite(logp).all()
    assert (logp.double() - r_logp).abs().max().item() <= FWD_ATOL
    if use_entropy:
        assert (ent.double() - r_ent).abs().max().item() <= FWD_ATOL
    else:
        assert ent is None
    assert dh.dtype == dtype and dw.dtype == dtype
    for name, got in (("dh", dh), ("dw", dw), ("db", db)):
        if grads[name] is not None:
            assert got.dtype == dtype
            ok, rel = _grad_ok(got, grads[name], dtype)
            assert ok, f"{name}: relative error {rel:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}-D{}-V{}-T{}-bias{}-lead{}".format(*c))
def test_matches_float64_oracle(case, dtype, impl):
    n, d, v, temperature, bias, lead = case
    seed = zlib.crc32(repr((case, str(dtype), impl)).encode())  # fresh inputs per case, reproducible
    hidden, weight, b, targets = make_linear_inputs(n, d, v, dtype=dtype, bias=bias, lead=lead, ignore_frac=0.2,
                                                    seed=seed)
    out = _run(impl, hidden, weight, b, targets, temperature)
    ref = _oracle(hidden, weight, b, targets, temperature, out[5], out[6])
    _check(out, ref, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_peaked_and_flat_rows(impl):
    # entropies must span ~0 (peaked) to ~log V (flat): the shifted streaming form keeps both exact
    hidden, weight, _, targets = make_linear_inputs(64, 40, 1000, peaked_frac=1.0, seed=3)
    hidden[:8] *= 1e-4  # near-uniform rows
    hidden[8:16] *= 30.0  # extremely peaked rows
    out = _run(impl, hidden, weight, None, targets, 1.0)
    ref = _oracle(hidden, weight, None, targets, 1.0, out[5], out[6])
    _check(out, ref, torch.float32)
    assert ref[1][:8].min() > math.log(1000) - 0.01
    assert ref[1][8:16].max() < 1e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_logp_only_matches_oracle(impl):
    hidden, weight, b, targets = make_linear_inputs(33, 40, 300, bias=True, ignore_frac=0.3, seed=4)
    out = _run(impl, hidden, weight, b, targets, 0.8, use_entropy=False)
    ref = _oracle(hidden, weight, b, targets, 0.8, out[5], out[6], use_entropy=False)
    _check(out, ref, torch.float32, use_entropy=False)


@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_rows_are_zero_and_get_no_gradient(impl):
    hidden, weight, _, targets = make_linear_inputs(20, 16, 50, seed=5)
    targets[::3] = -1
    h = hidden.clone().requires_grad_()
    logp, ent = linear_logprob_entropy(h, weight, targets, ignore_index=-1, impl=impl)
    assert (logp[::3] == 0).all() and (ent[::3] == 0).all()
    assert (logp[1::3] < 0).all() and (ent[1::3] > 0).all()
    (logp.sum() + ent.sum()).backward()
    assert (h.grad[::3] == 0).all()
    assert (h.grad[1::3].abs().sum(dim=1) > 0).all()


@pytest.mark.parametrize("impl, chunk_size", [("torch", 1), ("torch", 7), ("torch", 256), ("torch", 5000),
                                               ("triton", 96), ("triton", 300), ("triton", 5000)])
def test_chunk_size_does_not_change_results(impl, chunk_size):
    # 150 rows: several row blocks, so per-block partial sums (the bias gradient) are exercised too;
    # chunk sizes that do not divide V (1000) nor the Triton tile (128)
    hidden, weight, b, targets = make_linear_inputs(150, 24, 1000, bias=True, seed=6)
    out = _run(impl, hidden, weight, b, targets, 1.3, chunk_size=chunk_size)
    ref = _oracle(hidden, weight, b, targets, 1.3, out[5], out[6])
    _check(out, ref, torch.float32)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
def test_triton_vocab_split_merge(num_splits):
    hidden, weight, b, targets = make_linear_inputs(20, 16, 1000, bias=True, seed=7)
    from edge_kernels.backends.triton import linear_logprob_entropy as tri

    logp, ent, lse = tri.triton_fwd(hidden, weight, b, targets, LaunchParams(1 / 0.7, -100), num_splits=num_splits)
    r_logp, r_ent = oracle_linear_logprob_entropy(hidden, weight, targets, b, 0.7)
    assert (logp.double() - r_logp).abs().max() <= FWD_ATOL
    assert (ent.double() - r_ent).abs().max() <= FWD_ATOL


@pytest.mark.parametrize("group_n", [1, 2, 3])
def test_triton_backward_grouped_program_order(monkeypatch, group_n):
    # 300 rows -> 5 row blocks under the interpreter: groups of 2 or 3 leave a short last group, so every
    # (row block, column tile) must still be visited exactly once by the grouped 1-D program order
    from edge_kernels.backends.triton import linear_logprob_entropy as tri

    monkeypatch.setattr(tri, "GROUP_N", group_n)
    hidden, weight, b, targets = make_linear_inputs(300, 24, 1000, bias=True, seed=16)
    out = _run("triton", hidden, weight, b, targets, 0.8, chunk_size=300)
    ref = _oracle(hidden, weight, b, targets, 0.8, out[5], out[6])
    _check(out, ref, torch.float32)


def test_triton_skips_blocks_with_nothing_to_do_exactly():
    # 150 rows = row blocks [0, 64), [64, 128), [128, 150) under the interpreter. Block 1 is all padding
    # (ignore_index): the forward skips it. Block 0 has valid targets but zero upstream gradient (loss-masked
    # tokens): the backward skips it. Block 2 mixes zero and non-zero gradients, so it must not be skipped.
    hidden, weight, b, targets = make_linear_inputs(150, 24, 700, bias=True, seed=21, ignore_frac=0.0)
    targets = targets.clone()
    targets[64:128] = -100
    gen = torch.Generator().manual_seed(4)
    g_logp, g_ent = torch.randn(150, generator=gen), torch.randn(150, generator=gen)
    g_logp[:64] = g_ent[:64] = 0.0
    g_logp[128:140] = g_ent[128:140] = 0.0
    h, w, bb = (t.clone().requires_grad_() for t in (hidden, weight, b))
    logp, ent = linear_logprob_entropy(h, w, targets, bias=bb, temperature=0.8, impl="triton")
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    h64, w64, b64 = (t.double().requires_grad_() for t in (hidden, weight, b))
    r_logp, r_ent = oracle_linear_logprob_entropy(h64, w64, targets, b64, 0.8)
    ((r_logp * g_logp.double()).sum() + (r_ent * g_ent.double()).sum()).backward()
    assert (logp.double() - r_logp).abs().max() <= FWD_ATOL
    assert (ent.double() - r_ent).abs().max() <= FWD_ATOL
    assert bool((logp[64:128] == 0).all() and (ent[64:128] == 0).all())
    for got, ref in ((h.grad, h64.grad), (w.grad, w64.grad), (bb.grad, b64.grad)):
        assert rel_err(got, ref) <= 1e-5
    assert bool((h.grad[:128] == 0).all())


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_bias_and_transposed_weight(impl):
    # a bias that is a strided view and a weight stored [D, V] and transposed: the kernels index both with
    # unit stride, so the op must lay them out first (and route the gradients back to the views)
    hidden, weight, b, targets = make_linear_inputs(40, 24, 300, bias=True, seed=17)
    bias_store = torch.zeros(300, 2)
    bias_store[:, 0] = b
    w_store = weight.t().contiguous().requires_grad_()
    bias_store.requires_grad_()
    logp, ent = linear_logprob_entropy(hidden, w_store.t(), targets, bias=bias_store[:, 0], temperature=0.9,
                                       impl=impl)
    (logp.sum() + 0.3 * ent.sum()).backward()
    w64 = weight.double().requires_grad_()
    b64 = b.double().requires_grad_()
    r_logp, r_ent = oracle_linear_logprob_entropy(hidden, w64, targets, b64, 0.9)
    (r_logp.sum() + 0.3 * r_ent.sum()).backward()
    assert (logp.double() - r_logp).abs().max() <= FWD_ATOL
    assert (ent.double() - r_ent).abs().max() <= FWD_ATOL
    assert rel_err(w_store.grad.t(), w64.grad) <= 1e-5
    assert rel_err(bias_store.grad[:, 0], b64.grad) <= 1e-5
    assert bool((bias_store.grad[:, 1] == 0).all())


@pytest.mark.parametrize("impl", IMPLS)
def test_weight_gradient_accumulates_in_fp32(impl):
    # 512 tokens share 40 vocabulary rows, so every dW row is a sum of ~500 contributions. Summed in bf16
    # (a running bf16 accumulator, as chunk-by-chunk accumulation in the parameter dtype does) the error
    # grows with the number of additions; with fp32 accumulation only the operands' and the result's bf16
    # roundings remain (relative norm error ~u = 2**-9 .. 2**-8).
    hidden, weight, _, targets = make_linear_inputs(512, 16, 40, dtype=torch.bfloat16, seed=8)
    w = weight.clone().requires_grad_()
    logp, ent = linear_logprob_entropy(hidden, w, targets, impl=impl, chunk_size=8)
    (logp.sum() + ent.sum()).backward()
    h64 = hidden.double()
    logits = (h64 @ weight.double().t()).requires_grad_()
    r_logp, r_ent = oracle_logprob_entropy(logits, targets)
    (r_logp.sum() + r_ent.sum()).backward()
    ref = logits.grad.t() @ h64
    bf16_running = torch.zeros_like(ref, dtype=torch.bfloat16)
    for r in range(512):  # what bf16 accumulation over tokens would give
        bf16_running += (logits.grad[r][:, None] * h64[r][None, :]).to(torch.bfloat16)
    assert w.grad.dtype == torch.bfloat16
    ours = rel_err(w.grad, ref)
    assert ours <= 2 ** -8, ours
    assert rel_err(bf16_running, ref) > 2 * ours, (rel_err(bf16_running, ref), ours)  # the test tells them apart


def test_no_grad_needed_saves_nothing():
    hidden, weight, _, targets = make_linear_inputs(8, 16, 30, seed=9)
    logp, ent = linear_logprob_entropy(hidden, weight, targets, impl="torch")
    assert logp.grad_fn is None and ent.grad_fn is None
    h = hidden.clone().requires_grad_()
    with torch.no_grad():
        logp, _ = linear_logprob_entropy(h, weight, targets, impl="torch")
    assert logp.grad_fn is None


def test_entropy_gradient_skipped_when_entropy_unused(monkeypatch):
    seen = {}
    real = backends.REGISTRY[("linear_logprob_entropy", "torch")]

    def spy_bwd(*args):
        seen["grad_entropy"] = args[7]
        return real[1](*args)

    monkeypatch.setitem(backends.REGISTRY, ("linear_logprob_entropy", "torch"), (real[0], spy_bwd))
    hidden, weight, _, targets = make_linear_inputs(8, 16, 30, seed=10)
    h = hidden.clone().requires_grad_()
    logp, ent = linear_logprob_entropy(h, weight, targets, impl="torch")
    logp.sum().backward()
    assert seen["grad_entropy"] is None


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_and_inf_propagate(impl):
    hidden, weight, _, targets = make_linear_inputs(6, 16, 50, seed=11)
    hidden[2, 3] = float("nan")
    hidden[4, 0] = float("inf")
    logp, ent = linear_logprob_entropy(hidden, weight, targets, impl=impl)
    assert torch.isnan(logp[2]) and torch.isnan(ent[2])
    assert torch.isnan(logp[4]) and torch.isnan(ent[4])
    assert torch.isfinite(logp[[0, 1, 3, 5]]).all()
    w = weight.clone()
    w[7, 1] = float("nan")
    logp, ent = linear_logprob_entropy(hidden[:2].nan_to_num(0.0), w, targets[:2], impl=impl)
    assert torch.isnan(logp).all() and torch.isnan(ent).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_hidden(impl):
    hidden, weight, _, targets = make_linear_inputs(10, 32, 77, seed=12)
    wide = torch.randn(10, 64)
    wide[:, ::2] = hidden
    strided = wide[:, ::2]
    assert not strided.is_contiguous()
    logp, ent = linear_logprob_entropy(strided, weight, targets, impl=impl)
    r_logp, r_ent = oracle_linear_logprob_entropy(hidden, weight, targets)
    assert (logp.double() - r_logp).abs().max() <= FWD_ATOL
    assert (ent.double() - r_ent).abs().max() <= FWD_ATOL


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 70),
    d=st.integers(1, 70),
    v=st.integers(1, 600),
    temperature=st.sampled_from([0.5, 1.0, 2.3]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    impl=st.sampled_from(IMPLS),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz_against_oracle(n, d, v, temperature, dtype, impl, bias, seed):
    hidden, weight, b, targets = make_linear_inputs(n, d, v, dtype=dtype, bias=bias, ignore_frac=0.1, seed=seed)
    out = _run(impl, hidden, weight, b, targets, temperature, grad_seed=seed)
    ref = _oracle(hidden, weight, b, targets, temperature, out[5], out[6])
    _check(out, ref, dtype)


# ---------------------------------------------------------------------------------------------- bad input


def _ok():
    hidden, weight, b, targets = make_linear_inputs(4, 8, 10, bias=True, seed=13)
    return dict(hidden=hidden, weight=weight, targets=targets, bias=b)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(weight=torch.randn(10, 9)), ValueError, "D = weight.shape"),
        (dict(weight=torch.randn(10)), ValueError, "weight must be 2-D"),
        (dict(weight=torch.randn(10, 8, dtype=torch.float16)), TypeError, "share a dtype"),
        (dict(hidden=torch.randint(0, 3, (4, 8))), TypeError, "hidden must be float32"),
        (dict(targets=torch.zeros(4)), TypeError, "targets must be an integer"),
        (dict(targets=torch.zeros(5, dtype=torch.long)), ValueError, "targets has shape"),
        (dict(targets=torch.tensor([0, 1, 10, 2])), ValueError, r"targets must lie in \[0, 10\)"),
        (dict(targets=torch.tensor([0, -5, 1, 2])), ValueError, "targets must lie in"),
        (dict(bias=torch.randn(11)), ValueError, "bias must have shape"),
        (dict(hidden=torch.randn(0, 8), targets=torch.zeros(0, dtype=torch.long)), ValueError, "empty"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature=1e-39), ValueError, "1/temperature is used in float32"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(impl="cublas"), ValueError, "impl must be one of"),
        (dict(weight=torch.randn(10, 8, device="meta")), ValueError, "one device"),
    ],
)
def test_bad_input_names_the_argument(change, exc, match):
    kw = _ok()
    kw.update(change)
    args = [kw.pop("hidden"), kw.pop("weight"), kw.pop("targets")]
    with pytest.raises(exc, match=match):
        linear_logprob_entropy(*args, **kw)


def test_impl_resolution(monkeypatch):
    hidden, weight, _, targets = make_linear_inputs(4, 8, 10, seed=14)
    with pytest.raises(NotImplementedError, match="impl='cuda'"):
        linear_logprob_entropy(hidden, weight, targets, impl="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        linear_logprob_entropy(hidden, weight, targets, impl="triton")
    # auto on CPU tensors runs the PyTorch path
    logp, _ = linear_logprob_entropy(hidden, weight, targets, impl="auto")
    assert torch.isfinite(logp).all()


# ------------------------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("n, d, v", [(4096, 3584, 152064), (2048, 1536, 151936), (1, 896, 151936)])
def test_gpu_bf16_real_shapes(n, d, v):
    hidden, weight, _, targets = make_linear_inputs(n, d, v, dtype=torch.bfloat16, ignore_frac=0.05, seed=15,
                                                    device="cuda")
    logp, ent = linear_logprob_entropy(hidden, weight, targets, temperature=0.9, impl="triton")
    ref_logp, ref_ent = [], []
    for i in range(0, n, 256):  # chunked float64 oracle
        lp, en = oracle_linear_logprob_entropy(hidden[i:i + 256], weight, targets[i:i + 256], None, 0.9)
        ref_logp.append(lp)
        ref_ent.append(en)
    logp_err = (logp.double() - torch.cat(ref_logp)).abs().max().item()
    ent_err = (ent.double() - torch.cat(ref_ent)).abs().max().item()
    assert logp_err <= 1e-4 and ent_err <= 3e-4, (logp_err, ent_err)  # both printed: the GPU run is rare


@pytest.mark.gpu
def test_gpu_offsets_beyond_int32():
    # N * V > 2**31 logits (never materialized): offsets must be 64-bit
    n, d, v = 16384, 64, 151936
    hidden, weight, _, targets = make_linear_inputs(n, d, v, dtype=torch.bfloat16, seed=16, device="cuda")
    assert n * v > 2**31
    h = hidden.clone().requires_grad_()
    logp, ent = linear_logprob_entropy(h, weight, targets, impl="triton")
    (logp.sum() + ent.sum()).backward()
    idx = torch.tensor([0, n // 2, n - 1], device="cuda")
    r_logp, r_ent = oracle_linear_logprob_entropy(hidden[idx], weight, targets[idx])
    assert (logp[idx].double() - r_logp).abs().max() <= 1e-4
    assert (ent[idx].double() - r_ent).abs().max() <= 3e-4
    assert torch.isfinite(h.grad).all() and h.grad[n - 1].abs().sum() > 0


@pytest.mark.gpu
def test_gpu_torch_path_bf16_uses_fp32_output_matmul():
    """impl="torch" on CUDA bf16: where torch offers ``mm(..., out_dtype=float32)`` the logits come from it
    (bf16 tensor cores, fp32 output, never rounded to 16 bits): values as exact as the fp32 upcast, and
    gradients within the Triton backward's bound (its dz is rounded to bf16 for the GEMMs as well)."""
    from edge_kernels.core.probes import mixed_mm_ok, mixed_mm_support

    n, d, v = 1024, 896, 32768
    hidden, weight, bias, targets = make_linear_inputs(n, d, v, dtype=torch.bfloat16, bias=True, ignore_frac=0.05,
                                                       seed=17, device="cuda")
    assert mixed_mm_ok(hidden) == (mixed_mm_support(hidden.device) in ("addmm", "mm"))
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, ent = linear_logprob_entropy(h, w, targets, bias=bias, temperature=0.9, impl="torch")
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    r_logp, r_ent = oracle_linear_logprob_entropy(h64, w64, targets, bias.double(), 0.9)
    assert (logp.double() - r_logp).abs().max().item() <= 1e-4  # fp32 logits: the bound of the fp32 path
    assert (ent.double() - r_ent).abs().max().item() <= 3e-4
    g = torch.randn(n, device="cuda")
    dh, dw = torch.autograd.grad((logp * g).sum() + ent.sum(), (h, w))
    r_dh, r_dw = torch.autograd.grad((r_logp * g.double()).sum() + r_ent.sum(), (h64, w64))
    for got, want in ((dh, r_dh), (dw, r_dw)):
        assert rel_err(got.double(), want) <= 2e-2  # bf16 gradients (dz rounded to bf16, as Triton's)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_many_row_blocks_and_slices(dtype, monkeypatch):
    """The PyTorch path with tiny tiles: several row blocks per call, several cache slices per block, rows of
    one slice split across vocabulary chunks in the backward; against the float64 oracle, with ignored rows,
    a -inf bias entry and both upstream gradients."""
    from edge_kernels.backends import torch as torch_backend

    monkeypatch.setattr(torch_backend, "TILE_ELEMENTS", 7 * 61)
    monkeypatch.setattr(torch_backend, "MIN_TILE_ROWS", 5)
    monkeypatch.setattr(torch_backend, "CACHE_ELEMENTS", 2 * 61)
    n, d, v = 37, 24, 61
    hidden, weight, bias, targets = make_linear_inputs(n, d, v, dtype=dtype, bias=True, ignore_frac=0.2, seed=21)
    bias = bias.clone()
    bias[5] = float("-inf")
    targets = torch.where(targets == 5, torch.full_like(targets, 6), targets)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, ent = linear_logprob_entropy(h, w, targets, bias=bias, temperature=0.8, impl="torch")
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    r_logp, r_ent = oracle_linear_logprob_entropy(h64, w64, targets, bias.double(), 0.8)
    assert (logp.double() - r_logp).abs().max().item() <= 1e-5  # fp32 logits of exact (bf16-valued) inputs
    assert (ent.double() - r_ent).abs().max().item() <= 1e-5
    g1, g2 = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    dh, dw = torch.autograd.grad((logp * g1.float()).sum() + (ent * g2.float()).sum(), (h, w))
    r_dh, r_dw = torch.autograd.grad((r_logp * g1).sum() + (r_ent * g2).sum(), (h64, w64))
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the gradients themselves are rounded to bf16
    assert rel_err(dh, r_dh) <= tol and rel_err(dw, r_dw) <= tol
