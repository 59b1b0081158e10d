"""Soft-capped logits (``softcap=c``: ``c * tanh(z / c)`` before the temperature, Gemma 2/3) in both ops and the
fused policy loss, against the float64 oracle with the cap, forward and backward through both outputs, on the
PyTorch path and the Triton interpreter (on a GPU machine the same tests run the compiled Triton kernels on CUDA
tensors; the CUDA op: tests/test_cuda_ext.py).

The inputs are scaled so that logits reach several times the cap (up to ~4c for c = 5, ~2c for c = 30), so the
cap bites: saturated entries (``1 - tanh^2`` tiny) and the linear region both occur.

Tolerances (same reasoning as tests/ops/test_linear_logprob_entropy.py): forward <= 1e-4 absolute, the
library's logp goal. The Triton kernels form tanh from ``exp(-2|u|)`` (a Taylor polynomial for small ``|u|``)
with a relative error of a few fp32 ulps, well inside it. Backward:
``||g - ref|| <= rtol ||ref|| + atol``, rtol 2e-5 for fp32 (fp32 end to end), 1.2e-2 for bf16 (two roundings
to bf16, 3u); atol the fp32 resolution of the softmax statistics, ``1e-6 (1 + max|z|) |g_row|`` per row, as in
the uncapped tests, with ``max|z| <= c / T`` now.
"""

import math

import pytest
import torch

from edge_kernels import fused_linear_policy_loss, linear_logprob_entropy, logprob_entropy
from edge_kernels.oracle import oracle_logprob_entropy, oracle_softcap
from data_builders import make_linear_inputs, make_logits

IMPLS = ["torch", "triton"]
FWD_ATOL = 1e-4
GRAD_RTOL = {torch.float32: 2e-5, torch.bfloat16: 1.2e-2}


def _grads(seed, shape, device):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device)


def _oracle_dlogits(logits, targets, temperature, softcap, g_logp, g_ent):
    """float64 ``(logp, entropy, dlogits, atol_rows)`` through both outputs."""
    x = logits.detach().double().requires_grad_()
    logp, ent = oracle_logprob_entropy(x, targets, temperature, softcap=softcap)
    ((logp * g_logp.double()).sum() + (ent * g_ent.double()).sum()).backward()
    z_max = oracle_softcap(x.detach(), softcap).abs().max() / temperature
    rows = (g_logp.double().abs() + g_ent.double().abs()) * 1e-6 * (1 + z_max)
    return logp, ent, x.grad, rows


def _assert_grad(got, ref, atol, dtype):
    err = (got.double() - ref).norm()
    assert err <= GRAD_RTOL[dtype] * ref.norm() + atol, f"relative error {(err / ref.norm()).item():.3g}"


def _reach(logits_max, softcap):
    assert logits_max > 1.5 * softcap, "the inputs must reach the cap for the test to mean anything"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softcap, temperature", [(5.0, 1.0), (30.0, 0.7), (30.0, 1.0)])
def test_linear_softcap_matches_oracle(impl, dtype, softcap, temperature, device):
    hidden, weight, bias, targets = make_linear_inputs(37, 24, 300, dtype=dtype, bias=True, ignore_frac=0.2,
                                                       seed=int(softcap * 10 + temperature * 3), device=device)
    weight = (weight.float() * (softcap / 3.0)).to(dtype)  # logits up to several times the cap
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    logp, ent = linear_logprob_entropy(h, w, targets, bias=b, temperature=temperature, softcap=softcap, impl=impl)
    g_logp, g_ent = _grads(3, logp.shape, device)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()

    logits = hidden.double() @ weight.double().t() + bias.double()
    _reach(logits.abs().max().item(), softcap)
    r_logp, r_ent, dz, rows = _oracle_dlogits(logits, targets, temperature, softcap, g_logp, g_ent)
    assert (logp.double() - r_logp).abs().max() <= FWD_ATOL
    assert (ent.double() - r_ent).abs().max() <= FWD_ATOL
    w_max = weight.double().norm(dim=1).max()
    _assert_grad(h.grad, dz @ weight.double(), rows.norm() * w_max, dtype)
    _assert_grad(w.grad, dz.t() @ hidden.double(), (rows * hidden.double().norm(dim=1)).norm(), dtype)
    _assert_grad(b.grad, dz.sum(0), rows.norm(), dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softcap, temperature", [(5.0, 1.0), (30.0, 0.8)])
def test_logits_softcap_matches_oracle(impl, dtype, softcap, temperature, device):
    logits, targets = make_logits((3, 11), 257, dtype=torch.float32, seed=int(softcap), device=device)
    logits = (logits * (softcap / 4.0)).to(dtype)
    logits[0, 2, 5] = float("-inf")  # a masked vocabulary entry stays masked under the cap
    _reach(logits.float().abs()[torch.isfinite(logits)].max().item(), softcap)
    x = logits.clone().requires_grad_()
    logp, ent = logprob_entropy(x, targets, temperature=temperature, softcap=softcap, impl=impl)
    g_logp, g_ent = _grads(4, logp.shape, device)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()

    r_logp, r_ent, dz, rows = _oracle_dlogits(logits, targets, temperature, softcap, g_logp, g_ent)
    assert (logp.double() - r_logp).abs().max() <= FWD_ATOL
    assert (ent.double() - r_ent).abs().max() <= FWD_ATOL
    assert x.grad[0, 2, 5] == 0
    _assert_grad(x.grad, dz, rows.norm() * 1.0, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_softcap_changes_the_result_and_none_is_the_uncapped_op(impl, device):
    # the cap is not silently ignored, and a huge cap converges to the uncapped op
    hidden, weight, _, targets = make_linear_inputs(9, 16, 200, seed=5, device=device)
    weight = weight * 4
    plain = linear_logprob_entropy(hidden, weight, targets, impl=impl)
    capped = linear_logprob_entropy(hidden, weight, targets, softcap=5.0, impl=impl)
    # a cap of 1e6 moves these logits (|z| < 60) by z^3 / (3 c^2) < 1e-7: the capped op must agree with the
    # plain one to fp32 accuracy (a tanh with an absolute instead of relative error would be off by c * ulp)
    loose = linear_logprob_entropy(hidden, weight, targets, softcap=1e6, impl=impl)
    assert (plain[0] - capped[0]).abs().max() > 0.1
    assert (plain[0] - loose[0]).abs().max() < 2e-5
    assert (plain[1] - loose[1]).abs().max() < 2e-5


def test_softcap_gradient_through_entropy_only(device):
    # the chain rule through tanh applies to the entropy term too (logp unused: g_logp = 0 on every row)
    logits, targets = make_logits((2, 5), 64, seed=8, ignore_frac=0.0, device=device)
    logits = logits * 3
    for impl in IMPLS:
        x = logits.clone().requires_grad_()
        _, ent = logprob_entropy(x, targets, softcap=5.0, impl=impl)
        ent.sum().backward()
        y = logits.double().requires_grad_()
        oracle_logprob_entropy(y, targets, softcap=5.0)[1].sum().backward()
        assert (x.grad.double() - y.grad).norm() <= 2e-5 * y.grad.norm() + 1e-6 * 6 * math.sqrt(10)


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_policy_loss_passes_softcap(impl, device):
    hidden, weight, _, targets = make_linear_inputs(12, 16, 90, seed=12, lead=(3, 4), device=device)
    weight = weight * 4
    adv = torch.tensor([1.0, -0.5, 0.25], device=device)
    mask = torch.ones(3, 4, device=device)
    losses = []
    for cap in (None, 5.0):
        h = hidden.clone().requires_grad_()
        loss, _ = fused_linear_policy_loss(h, weight, targets, adv, mask, softcap=cap, impl=impl)
        loss.backward()
        x = (hidden.double() @ weight.double().t()).requires_grad_()
        ref_logp, _ = oracle_logprob_entropy(x, targets, softcap=cap)
        ref = -(adv.double()[:, None] * torch.exp(ref_logp - ref_logp.detach())).mean()  # on-policy token-mean
        ref.backward()
        assert abs(loss.item() - ref.item()) < 1e-5
        assert (h.grad.double() - x.grad @ weight.double()).norm() <= 1e-4 * (x.grad @ weight.double()).norm()
        losses.append(h.grad)
    assert (losses[0] - losses[1]).abs().max() > 1e-3


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), -float("inf")])
def test_bad_softcap_raises_naming_it(bad):
    hidden, weight, _, targets = make_linear_inputs(3, 8, 20, seed=1)
    with pytest.raises(ValueError, match="softcap"):
        linear_logprob_entropy(hidden, weight, targets, softcap=bad, impl="torch")
    with pytest.raises(ValueError, match="softcap"):
        logprob_entropy(hidden @ weight.t(), targets, softcap=bad, impl="torch")
    with pytest.raises(ValueError, match="softcap"):
        fused_linear_policy_loss(hidden[None], weight, targets[None], torch.ones(1), torch.ones(1, 3), softcap=bad,
                                 impl="torch")


@pytest.mark.parametrize("bad", ["30", True, [30.0]])
def test_softcap_of_wrong_type_raises(bad):
    hidden, weight, _, targets = make_linear_inputs(3, 8, 20, seed=1)
    with pytest.raises(TypeError, match="softcap"):
        linear_logprob_entropy(hidden, weight, targets, softcap=bad, impl="torch")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_linear_softcap_gpu_tiles(dtype):
    """The compiled kernels with their GPU tiles (128x128x32 for 16-bit, tensor cores), several row blocks and
    vocabulary splits, partial last tiles, Gemma's cap 30."""
    hidden, weight, _, targets = make_linear_inputs(300, 256, 5003, dtype=dtype, ignore_frac=0.1, seed=21,
                                                    device="cuda")
    weight = (weight.float() * 12).to(dtype)
    h = hidden.clone().requires_grad_()
    logp, ent = linear_logprob_entropy(h, weight, targets, temperature=0.9, softcap=30.0, impl="triton")
    g_logp, g_ent = _grads(5, logp.shape, "cuda")
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    logits = hidden.double() @ weight.double().t()
    _reach(logits.abs().max().item(), 30.0)
    r_logp, r_ent, dz, rows = _oracle_dlogits(logits, targets, 0.9, 30.0, g_logp, g_ent)
    assert (logp.double() - r_logp).abs().max() <= FWD_ATOL
    assert (ent.double() - r_ent).abs().max() <= FWD_ATOL
    rtol = {torch.float16: 1.5e-3}.get(dtype, GRAD_RTOL.get(dtype))
    err = (h.grad.double() - dz @ weight.double()).norm()
    ref = (dz @ weight.double()).norm()
    assert err <= rtol * ref + rows.norm() * weight.double().norm(dim=1).max()
