"""Sampling-aware log-probs (``top_k`` / ``top_p`` / ``min_p`` on both ops) against the float64 sorting oracle
(``edge_kernels/oracle.py``, vLLM's sampler followed literally on full rows), forward and backward, on the
PyTorch path and the Triton kernels (interpreter on CPU).

Tolerances are those of the plain ops (``test_logprob_entropy``, ``test_linear_logprob_entropy``): the truncated
statistics are the same fp32 streaming sums over fewer tokens. Forward <= 1e-4 absolute; logits gradient
elementwise ``<= u_dtype |ref| + 1e-6 |g_row| (1 + max|z|)``; hidden/weight gradients in norm, ``rtol`` 2e-5
(fp32) / 1.2e-2 (bf16) plus the same fp32-statistics ``atol``. The kept sets must agree exactly: the same
positions are ``-inf``. Inputs are drawn so no token sits within rounding of a top-p or min-p boundary, except
in the tie tests, whose values are exact in fp32.
"""

import math

import pytest
import torch

from edge_kernels import linear_logprob_entropy, logprob_entropy
from edge_kernels.core.truncation import TOPK_MERGE_MAX
from edge_kernels.ops.validation import check_truncation
from data_builders import make_linear_inputs, make_logits
from edge_kernels.oracle import oracle_kept_weights, oracle_truncated_logprob_entropy

IMPLS = ["torch", "triton"]
UNIT = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}
GRAD_RTOL = {torch.float32: 2e-5, torch.bfloat16: 1.2e-2}
TRUNCS = [dict(top_p=0.9), dict(top_k=7), dict(min_p=0.05), dict(top_k=40, top_p=0.8, min_p=0.02),
          dict(top_p=0.5, min_p=0.3)]


def _assert_fwd(logp, ent, r_logp, r_ent, targets=None):
    assert logp.dtype == torch.float32 and not torch.isnan(logp).any() and not torch.isnan(ent).any()
    cut = torch.isneginf(r_logp)
    assert torch.equal(torch.isneginf(logp), cut)  # the same kept sets
    assert (logp[~cut].double() - r_logp[~cut]).abs().max() <= 1e-4 if (~cut).any() else True
    assert (ent.double() - r_ent).abs().max() <= 1e-4


def _loss(logp, ent, g_logp, g_ent):
    # a cut target's log-prob is the constant -inf: the loss uses it through a mask (its gradient is 0)
    return (torch.where(torch.isfinite(logp), logp, 0.0) * g_logp).sum() + (ent * g_ent).sum()


def _check_logits(impl, logits, targets, temperature, softcap=None, **trunc):
    x = logits.clone().requires_grad_()
    logp, ent = logprob_entropy(x, targets, temperature=temperature, softcap=softcap, impl=impl, **trunc)
    g = torch.Generator().manual_seed(7)
    g_logp, g_ent = (torch.randn(logp.shape, generator=g) for _ in range(2))
    _loss(logp, ent, g_logp, g_ent).backward()
    x64 = logits.double().requires_grad_()
    r_logp, r_ent = oracle_truncated_logprob_entropy(x64, targets, temperature, softcap=softcap, **trunc)
    _loss(r_logp, r_ent, g_logp.double(), g_ent.double()).backward()
    _assert_fwd(logp, ent, r_logp, r_ent)
    unit = UNIT[logits.dtype] * (2 if impl == "triton" and logits.dtype == torch.bfloat16 else 1)  # interp. cast
    zmax = 1 + logits.double().abs().max() / temperature
    row_atol = 1e-6 * (g_logp.abs() + g_ent.abs()).double()[..., None] * zmax
    err = (x.grad.double() - x64.grad).abs()
    assert (err <= unit * x64.grad.abs() + row_atol).all(), err.max()
    return logp, r_logp


def _check_linear(impl, n, d, v, dtype, temperature, bias, trunc, seed=0, lead=None, chunk_size=None, data=None):
    hidden, weight, b, targets = data or make_linear_inputs(n, d, v, dtype=dtype, bias=bias, lead=lead,
                                                            ignore_frac=0.2, seed=seed)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    logp, ent = linear_logprob_entropy(leaves[0], leaves[1], targets, bias=leaves[2], temperature=temperature,
                                       impl=impl, chunk_size=chunk_size, **trunc)
    g = torch.Generator().manual_seed(seed + 3)
    g_logp, g_ent = (torch.randn(logp.shape, generator=g) for _ in range(2))
    _loss(logp, ent, g_logp, g_ent).backward()
    h64 = hidden.double().reshape(-1, d).requires_grad_()
    w64 = weight.double().requires_grad_()
    b64 = None if b is None else b.double().requires_grad_()
    logits = h64 @ w64.t() + (0 if b64 is None else b64)
    r_logp, r_ent = oracle_truncated_logprob_entropy(logits, targets.reshape(-1), temperature, **trunc)
    _loss(r_logp, r_ent, g_logp.double().reshape(-1), g_ent.double().reshape(-1)).backward()
    _assert_fwd(logp.reshape(-1), ent.reshape(-1), r_logp, r_ent)
    g_rows = (g_logp.abs() + g_ent.abs()).double().reshape(-1) * 1e-6 * (1 + logits.detach().abs().max() / temperature)
    pairs = [(leaves[0].grad.reshape(-1, d), h64.grad, g_rows.norm() * w64.detach().norm(dim=1).max()),
             (leaves[1].grad, w64.grad, (g_rows * h64.detach().norm(dim=1)).norm())]
    if b is not None:
        pairs.append((leaves[2].grad, b64.grad, g_rows.norm()))
    for got, ref, atol in pairs:
        assert got.dtype == dtype
        assert (got.double() - ref).norm() <= GRAD_RTOL[dtype] * ref.norm() + atol
    return logp, r_logp


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("trunc", TRUNCS, ids=lambda t: ",".join(f"{k}={v}" for k, v in t.items()))
@pytest.mark.parametrize("shape, v, temperature", [((1,), 5, 1.0), ((3, 5), 127, 0.7), ((2, 9), 1031, 1.3)])
def test_logits_in_matches_sorting_oracle(impl, dtype, trunc, shape, v, temperature):
    logits, targets = make_logits(shape, v, dtype=dtype, seed=v)
    _check_logits(impl, logits, targets, temperature, **trunc)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("trunc", TRUNCS, ids=lambda t: ",".join(f"{k}={v}" for k, v in t.items()))
@pytest.mark.parametrize("n, d, v, temperature, bias, lead", [(1, 40, 300, 1.0, True, None),
                                                             (7, 24, 1031, 0.6, False, (7,)),
                                                             (30, 40, 515, 1.7, True, (3, 10))])
def test_linear_matches_sorting_oracle(impl, dtype, trunc, n, d, v, temperature, bias, lead):
    _check_linear(impl, n, d, v, dtype, temperature, bias, trunc, seed=v, lead=lead)


@pytest.mark.parametrize("impl", IMPLS)
def test_vocabulary_chunks_and_radix_top_k(impl):
    """chunk_size not dividing V walks several chunks per pass; a top_k above TOPK_MERGE_MAX goes through the
    radix select instead of the top-k merge."""
    v = 2 * TOPK_MERGE_MAX + 77
    _check_linear(impl, 5, 24, v, torch.float32, 0.8, True, dict(top_k=TOPK_MERGE_MAX + 300), seed=1,
                  chunk_size=300)
    _check_linear(impl, 5, 24, v, torch.float32, 0.8, False, dict(top_p=0.95, min_p=0.001), seed=2,
                  chunk_size=300)
    logits, targets = make_logits((4,), v, seed=3)
    _check_logits(impl, logits, targets, 1.1, top_k=TOPK_MERGE_MAX + 1)


@pytest.mark.parametrize("impl", IMPLS)
def test_softcap_then_temperature_then_truncation(impl):
    logits, targets = make_logits((3, 4), 257, seed=5)
    _check_logits(impl, logits * 4, targets, 0.7, softcap=5.0, top_p=0.8, top_k=30)


def _tie_rows():
    """Rows (fp32-exact values) with ties where each filter cuts: top-p's boundary inside a tie group (vLLM keeps
    only some of the tied tokens), top-k's k-th value tied (all kept), min-p's threshold on a tied value."""
    base = torch.full((4, 24), -4.0)
    base[:, 0] = 3.0
    base[:, 1:7] = 1.0  # six tokens tied at 1.0
    base[:, 7:10] = 0.5
    targets = torch.tensor([3, 0, 8, 12])  # tied at the boundary, top token, below, far below
    return base, targets


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_at_the_threshold(impl):
    logits, targets = _tie_rows()
    # top_p: mass above the tie group ~0.53, each tied token ~0.072: the boundary falls inside the group
    w = oracle_kept_weights(logits, top_p=0.7)
    kept_ties = w[0, 1:7]
    assert 0 < kept_ties[0] < 1 and torch.allclose(kept_ties, kept_ties[0].expand(6))  # partial, symmetric
    logp, r_logp = _check_logits(impl, logits, targets, 1.0, top_p=0.7)
    assert torch.isfinite(logp[0]) and torch.isneginf(logp[2]) and torch.isneginf(logp[3])
    _check_logits(impl, logits, targets, 1.0, top_k=3)  # k-th value 1.0 is tied: all six kept
    assert (oracle_kept_weights(logits, top_k=3)[0, :7] == 1).all()
    _check_logits(impl, logits, targets, 1.0, min_p=math.exp(-2.0) * 0.999)  # keeps 1.0, drops 0.5
    _check_logits(impl, logits, targets, 0.5, top_k=2, top_p=0.95)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_ties_at_the_threshold(impl):
    """Duplicate weight rows with small-integer hidden states: exactly tied fp32 logits in any GEMM order."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randint(-2, 3, (40, 8), generator=g).float()
    weight[5:11] = weight[4]  # seven tokens tied
    hidden = torch.randint(-1, 2, (6, 8), generator=g).float()
    hidden[:, :] = hidden[:, :] + 0.0
    hidden[0] = weight[4] / 4  # makes token 4's group the top logits for row 0
    targets = torch.tensor([6, 4, 0, 39, -100, 11])
    for trunc in (dict(top_p=0.6), dict(top_k=3), dict(top_p=0.3, top_k=9)):
        _check_linear(impl, 6, 8, 40, torch.float32, 1.0, False, trunc, data=(hidden, weight, None, targets))


@pytest.mark.parametrize("impl", IMPLS)
def test_cut_target_is_minus_inf_without_nan(impl):
    logits, targets = make_logits((16,), 200, seed=9, ignore_frac=0.0)
    x = logits.clone().requires_grad_()
    logp, ent = logprob_entropy(x, targets, impl=impl, top_k=1)
    cut = targets != logits.argmax(-1)
    assert cut.any() and torch.isneginf(logp[cut]).all() and (logp[~cut] == 0).all()
    assert (ent.abs() < 1e-6).all()  # one token kept: zero entropy
    logp.sum().backward()  # -inf upstream of nothing: the gradient is 0, never NaN
    assert torch.isfinite(x.grad).all() and (x.grad == 0).all()


def test_ignored_rows_and_no_op_values():
    logits, targets = make_logits((5, 3), 64, seed=2, ignore_frac=0.5)
    logp, ent = logprob_entropy(logits, targets, impl="torch", top_p=0.9)
    ign = targets == -100
    assert ign.any() and (logp[ign] == 0).all() and (ent[ign] == 0).all()
    plain = logprob_entropy(logits, targets, impl="torch")
    same = logprob_entropy(logits, targets, impl="torch", top_p=1.0, min_p=0.0, top_k=64)
    assert torch.allclose(plain[0], same[0], atol=1e-6) and torch.allclose(plain[1], same[1], atol=1e-6)
    assert check_truncation(None, 1.0, 0.0) is None


@pytest.mark.parametrize("kw, name", [(dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                                      (dict(top_p=float("nan")), "top_p"), (dict(top_k=0), "top_k"),
                                      (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"),
                                      (dict(min_p=-0.1), "min_p"), (dict(min_p=1.1), "min_p"),
                                      (dict(min_p="0.1"), "min_p")])
def test_bad_values_name_the_argument(kw, name):
    logits, targets = make_logits((2,), 16, seed=0)
    h, w, _, t = make_linear_inputs(2, 8, 16)
    with pytest.raises((ValueError, TypeError), match=name):
        logprob_entropy(logits, targets, **kw)
    with pytest.raises((ValueError, TypeError), match=name):
        linear_logprob_entropy(h, w, t, **kw)


def test_cuda_impl_and_sharding_refused_by_name():
    logits, targets = make_logits((2,), 16, seed=0)
    with pytest.raises(NotImplementedError, match="impl='cuda'"):
        logprob_entropy(logits, targets, top_p=0.9, impl="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_on_gpu_matches_the_oracle(dtype):
    """The compiled kernels (not the interpreter): the kept sets and values on a GPU, at a vocabulary of many
    chunks and tiles."""
    hidden, weight, b, targets = make_linear_inputs(64, 96, 4099, dtype=dtype, bias=True, ignore_frac=0.1, seed=4)
    for trunc in (dict(top_p=0.9), dict(top_k=50, min_p=0.01)):
        logp, ent = linear_logprob_entropy(hidden.cuda(), weight.cuda(), targets.cuda(), bias=b.cuda(),
                                           temperature=0.8, impl="triton", **trunc)
        logits = hidden.double() @ weight.double().t() + b.double()
        r_logp, r_ent = oracle_truncated_logprob_entropy(logits, targets, 0.8, **trunc)
        _assert_fwd(logp.cpu(), ent.cpu(), r_logp, r_ent)


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_backward_and_strided_rows(impl):
    full, targets = make_logits((3, 9), 211, seed=1)
    view = full[:, :-1]  # strided rows, read in place
    ref = _check_logits(impl, view, targets[:, :-1], 0.9, top_p=0.85)[0]
    x = (view.clone() * 1.0).requires_grad_()
    y = x * 1  # a non-leaf the backward may overwrite
    logp, ent = logprob_entropy(y, targets[:, :-1], temperature=0.9, impl=impl, top_p=0.85, inplace_backward=True)
    assert torch.equal(torch.isneginf(logp), torch.isneginf(ref))
    _loss(logp, ent, torch.ones_like(logp), torch.ones_like(ent)).backward()
    x2 = view.clone().requires_grad_()
    lp2, en2 = logprob_entropy(x2, targets[:, :-1], temperature=0.9, impl=impl, top_p=0.85)
    _loss(lp2, en2, torch.ones_like(lp2), torch.ones_like(en2)).backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-7, rtol=0)
