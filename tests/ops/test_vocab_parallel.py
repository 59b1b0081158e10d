"""Vocabulary-parallel ops (``vocab_parallel=``) in real multi-process gloo groups against the float64 oracle.

Each test spawns one process group (world sizes 2, 3, 4; uneven slices such as V=37 over 3 ranks) and runs a
list of checks in it, to pay the spawn cost once. Every rank compares its outputs with the single-process
float64 oracle on the full vocabulary: forward ``logp``/``entropy`` (replicated on every rank), ``d_hidden``
(reduced, and the rank's partial), the rank's ``d_weight``/``d_bias`` slice and the logits-gradient slice.

Tolerances are the unsharded op's (tests/ops/test_linear_logprob_entropy.py's docstring, same argument): forward
1e-4 absolute; gradients ``||err|| <= rtol ||ref|| + atol`` with rtol 2e-5 (fp32) / 1.2e-2 (bf16: 3 unit
roundoffs; the partial d_hidden is rounded to bf16 once before the fp32 all-reduce and once after, as the
unsharded op rounds its result once, plus the logits-gradient tile) and atol the per-row resolution of fp32
softmax statistics, 1e-6 (1 + max|z|) |g_row| ||W_row||. The merge of the slices' statistics adds a few fp32
operations per row, well inside these bounds.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from edge_kernels import VocabParallel, fused_linear_policy_loss, linear_logprob_entropy, logprob_entropy
from dist_helpers import CountCollectives as _CountCollectives, spawn, split as _split
from edge_kernels.oracle import oracle_logprob_entropy
from data_builders import make_linear_inputs, make_logits

FWD_ATOL = 1e-4
GRAD_RTOL = {torch.float32: 2e-5, torch.bfloat16: 1.2e-2}


# ----------------------------------------------------------------------------------------------------------
# oracle and comparisons


def _linear_oracle(hidden, weight, bias, targets, temperature, g_logp, g_ent, softcap=None):
    h = hidden.double()
    w = weight.double()
    logits = (h @ w.t() + (0 if bias is None else bias.double())).requires_grad_()
    logp, ent = oracle_logprob_entropy(logits, targets, temperature, softcap=softcap)
    ((logp * g_logp.double()).sum() + (ent * g_ent.double()).sum()).backward()
    dz = logits.grad
    g_rows = (g_logp.double().abs() + g_ent.double().abs()) * 1e-6 * (1 + logits.detach().abs().max() / temperature)
    return dict(logp=logp, ent=ent, dz=dz, h=h, w=w, g_rows=g_rows)


def _grad_close(x, ref, atol, dtype, what):
    err = (x.double() - ref).norm()
    bound = GRAD_RTOL[dtype] * ref.norm() + atol
    assert err <= bound, f"{what}: ||err|| {err:.3g} > {bound:.3g} (rel {err / ref.norm():.3g})"


def _fwd_close(logp, ent, ref):
    assert (logp.double() - ref["logp"]).abs().max() <= FWD_ATOL
    assert (ent.double() - ref["ent"]).abs().max() <= FWD_ATOL


def _grads(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g), torch.randn(n, generator=g)


# ----------------------------------------------------------------------------------------------------------
# checks run inside the group (every rank runs the same list)


def check_linear(rank, world, *, n=24, d=16, vocab=37, sizes=None, dtype="float32", impl="torch", bias=True,
                 temperature=0.7, ignore_frac=0.2, scale=1.0, pass_start=True, count=True, seed=0, device="cpu",
                 softcap=None):
    dtype = getattr(torch, dtype)
    starts, sizes = _split(vocab, world, sizes)
    lo, hi = starts[rank], starts[rank] + sizes[rank]
    hidden, weight, b, targets = make_linear_inputs(n, d, vocab, dtype=dtype, bias=bias, ignore_frac=ignore_frac,
                                                    scale=scale, seed=seed)
    g_logp, g_ent = _grads(n)
    ref = _linear_oracle(hidden, weight, b, targets, temperature, g_logp, g_ent, softcap=softcap)
    w_max = ref["w"].norm(dim=1).max()
    for reduce in (True, False):
        h = hidden.to(device, copy=True).requires_grad_()
        w = weight[lo:hi].to(device, copy=True).requires_grad_()
        bb = None if b is None else b[lo:hi].to(device, copy=True).requires_grad_()
        with _CountCollectives() as cc:
            logp, ent = linear_logprob_entropy(h, w, targets.to(device), bias=bb, temperature=temperature, impl=impl,
                                               softcap=softcap,
                                               vocab_parallel=VocabParallel(dist.group.WORLD,
                                                                            lo if pass_start else None, reduce))
            fwd_calls = cc.take()
            ((logp * g_logp.to(device)).sum() + (ent * g_ent.to(device)).sum()).backward()
            bwd_calls = cc.take()
        logp, ent, h, w = logp.cpu(), ent.cpu(), h.grad.cpu(), w.grad.cpu()
        bb = None if bb is None else bb.grad.cpu()
        if count:
            assert fwd_calls == ["all_gather_into_tensor"] * (1 if pass_start else 2), fwd_calls
            assert bwd_calls == (["all_reduce"] if reduce else []), bwd_calls
        _fwd_close(logp, ent, ref)
        atol_h = ref["g_rows"].norm() * w_max
        dz_slice = ref["dz"][:, lo:hi]
        if reduce:
            _grad_close(h, ref["dz"] @ ref["w"], atol_h, dtype, "d_hidden (reduced)")
        else:  # the rank's own share, and the shares summed by the caller give the full gradient
            _grad_close(h, dz_slice @ ref["w"][lo:hi], atol_h, dtype, "d_hidden (partial)")
            total = h.float().clone()
            dist.all_reduce(total)
            _grad_close(total, ref["dz"] @ ref["w"], atol_h, dtype, "sum of partial d_hidden")
        _grad_close(w, dz_slice.t() @ ref["h"], (ref["g_rows"] * ref["h"].norm(dim=1)).norm(), dtype,
                    "d_weight slice")
        if b is not None:
            _grad_close(bb, dz_slice.sum(0), ref["g_rows"].norm(), dtype, "d_bias slice")


def check_logits(rank, world, *, n=20, vocab=37, sizes=None, impl="torch", temperature=1.3, pass_start=True,
                 mask_slice=False, seed=3, device="cpu"):
    starts, sizes = _split(vocab, world, sizes)
    lo, hi = starts[rank], starts[rank] + sizes[rank]
    logits, targets = make_logits((n,), vocab, seed=seed)
    if mask_slice:  # rank 0's slice entirely -inf on some rows (a masked vocabulary part): zero probability
        logits[: n // 2, : sizes[0]] = float("-inf")
        targets[: n // 2] = torch.where(targets[: n // 2] < sizes[0], -100, targets[: n // 2])
    g_logp, g_ent = _grads(n, seed=2)
    x = logits.double().requires_grad_()
    r_logp, r_ent = oracle_logprob_entropy(x, targets, temperature)
    ((r_logp * g_logp.double()).sum() + (r_ent * g_ent.double()).sum()).backward()
    mine = logits[:, lo:hi].to(device, copy=True).requires_grad_()
    with _CountCollectives() as cc:
        logp, ent = logprob_entropy(mine, targets.to(device), temperature=temperature, impl=impl,
                                    vocab_parallel=VocabParallel(dist.group.WORLD, lo if pass_start else None))
        assert cc.take() == ["all_gather_into_tensor"] * (1 if pass_start else 2)
        ((logp * g_logp.to(device)).sum() + (ent * g_ent.to(device)).sum()).backward()
        assert cc.take() == []
    logp, ent = logp.cpu(), ent.cpu()
    assert (logp.double() - r_logp).abs().max() <= FWD_ATOL
    assert (ent.double() - r_ent).abs().max() <= FWD_ATOL
    g_rows = (g_logp.abs() + g_ent.abs()).double() * 1e-6 * (1 + logits[torch.isfinite(logits)].abs().max())
    _grad_close(mine.grad.cpu(), x.grad[:, lo:hi], g_rows.norm(), torch.float32, "logits gradient slice")


def check_policy_loss(rank, world, *, vocab=37, eda="off"):
    starts, sizes = _split(vocab, world)
    lo, hi = starts[rank], starts[rank] + sizes[rank]
    bsz, t, d = 4, 5, 16
    hidden, weight, _, targets = make_linear_inputs(bsz * t, d, vocab, lead=(bsz, t), seed=5)
    g = torch.Generator().manual_seed(6)
    mask = (torch.rand(bsz, t, generator=g) < 0.8).long()
    adv = torch.randn(bsz, generator=g)
    old = -torch.rand(bsz, t, generator=g)
    kw = dict(old_logp=old, eda=eda, group_size=2, entropy_coef=0.01, temperature=0.8, impl="torch")
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_ref, m_ref = fused_linear_policy_loss(h_ref, w_ref, targets, adv, mask, **kw)
    loss_ref.backward()
    h, w = hidden.clone().requires_grad_(), weight[lo:hi].clone().requires_grad_()
    loss, metrics = fused_linear_policy_loss(h, w, targets, adv, mask,
                                             vocab_parallel=VocabParallel(dist.group.WORLD, lo), **kw)
    loss.backward()
    # both are the library's fp32 op; the sharded one merges the slices' statistics in fp32 (a few roundings)
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * (1 + abs(loss_ref.item()))
    for k in m_ref:
        assert torch.allclose(metrics[k], m_ref[k], rtol=1e-5, atol=1e-6), k
    assert torch.allclose(h.grad, h_ref.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(w.grad, w_ref.grad[lo:hi], rtol=1e-4, atol=1e-6)


def check_data_parallel(rank, world, *, d=16, vocab=37, temperature=0.8, scale=0.5):
    """Rows that differ per rank (``N_r`` = 0 on the last rank) with the head sharded by vocabulary: each rank's
    rows, every rank's slice; ``d_weight`` = slice of the gradient of the ranks' summed losses times ``scale``."""
    from edge_kernels.ops.vocab_parallel import linear_logprob_entropy_data_parallel

    starts, sizes = _split(vocab, world)
    lo, hi = starts[rank], starts[rank] + sizes[rank]
    counts = [5 + 3 * r for r in range(world - 1)] + [0]
    n_all = sum(counts)
    hidden, weight, b, targets = make_linear_inputs(n_all, d, vocab, bias=True, ignore_frac=0.2, seed=9)
    g_logp, g_ent = _grads(n_all, seed=4)
    ref = _linear_oracle(hidden, weight, b, targets, temperature, g_logp, g_ent)
    r0 = sum(counts[:rank])
    rows = slice(r0, r0 + counts[rank])
    h = hidden[rows].clone().requires_grad_()
    w = weight[lo:hi].clone().requires_grad_()
    bb = b[lo:hi].clone().requires_grad_()
    with _CountCollectives() as cc:
        logp, ent = linear_logprob_entropy_data_parallel(h, w, targets[rows], bias=bb, process_group=dist.group.WORLD,
                                                         vocab_start=lo, temperature=temperature, impl="torch",
                                                         weight_grad_scale=scale)
        assert cc.take() == ["all_gather_into_tensor"] * 4
        ((logp * g_logp[rows]).sum() + (ent * g_ent[rows]).sum()).backward()
        assert sorted(cc.take()) == ["all_reduce", "all_reduce"]  # upstream grads; d_hidden (gloo: no reduce-scatter)
    assert logp.shape == ent.shape == (counts[rank],)
    assert ((logp.double() - ref["logp"][rows]).abs() <= FWD_ATOL).all()
    assert ((ent.double() - ref["ent"][rows]).abs() <= FWD_ATOL).all()
    atol_h = ref["g_rows"].norm() * ref["w"].norm(dim=1).max()
    if counts[rank]:
        _grad_close(h.grad, (ref["dz"] @ ref["w"])[rows], atol_h, torch.float32, "d_hidden of own rows")
    else:  # no rows: the backward still ran every collective (the other ranks' gradients need them)
        assert h.grad is None or h.grad.numel() == 0
    dz_slice = ref["dz"][:, lo:hi]
    _grad_close(w.grad, scale * dz_slice.t() @ ref["h"], scale * (ref["g_rows"] * ref["h"].norm(dim=1)).norm(),
                torch.float32, "d_weight slice")
    _grad_close(bb.grad, scale * dz_slice.sum(0), scale * ref["g_rows"].norm(), torch.float32, "d_bias slice")


def check_errors(rank, world, *, vocab=37):
    starts, sizes = _split(vocab, world)
    lo, hi = starts[rank], starts[rank] + sizes[rank]
    hidden, weight, _, targets = make_linear_inputs(8, 16, vocab, seed=7)
    pg = dist.group.WORLD
    bad = targets.clone()
    bad[3] = vocab  # inside no slice: every rank raises (they all see the gathered sizes)
    with pytest.raises(ValueError, match=rf"targets must lie in \[0, {vocab}\)"):
        linear_logprob_entropy(hidden, weight[lo:hi], bad, vocab_parallel=VocabParallel(pg), impl="torch")
    bad[3] = -5
    with pytest.raises(ValueError, match="targets must lie in"):
        linear_logprob_entropy(hidden, weight[lo:hi], bad, vocab_parallel=VocabParallel(pg), impl="torch")
    # hidden sizes that differ across ranks (same N): found in the one gather, raised on every rank
    dd = 16 + rank
    h2, w2, _, _ = make_linear_inputs(8, dd, vocab, seed=7)
    with pytest.raises(ValueError, match="hidden sizes differ across the ranks"):
        linear_logprob_entropy(h2, w2[lo:hi], targets, vocab_parallel=VocabParallel(pg), impl="torch")
    with pytest.raises(ValueError, match="vocab_start disagrees"):
        linear_logprob_entropy(hidden, weight[lo:hi], targets, vocab_parallel=VocabParallel(pg, lo + 1), impl="torch")
    # a one-rank group is the unsharded op (no collective)
    singles = [dist.new_group([r]) for r in range(world)]
    with _CountCollectives() as cc:
        logp, _ = linear_logprob_entropy(hidden, weight, targets, vocab_parallel=VocabParallel(singles[rank]),
                                         impl="torch")
        assert cc.take() == []
    ref, _ = linear_logprob_entropy(hidden, weight, targets, impl="torch")
    assert torch.equal(logp, ref)
    with pytest.raises(ValueError, match="VocabParallel.vocab_start=3 needs a process_group of more than one"):
        linear_logprob_entropy(hidden, weight, targets, vocab_parallel=VocabParallel(singles[rank], 3))


# ----------------------------------------------------------------------------------------------------------
# tests: one process group each


def test_world2_torch_fp32_bf16_errors():
    spawn(2, [
        (check_linear, dict()),
        (check_linear, dict(pass_start=False, bias=False, temperature=1.0, seed=1)),
        (check_linear, dict(dtype="bfloat16", seed=2)),
        (check_linear, dict(scale=0.05, ignore_frac=0.0, seed=4)),  # near-flat rows
        (check_linear, dict(scale=4.0, softcap=2.0, seed=5)),  # a soft-cap that bites, through the merge
        (check_logits, dict(mask_slice=True)),
        (check_errors, dict()),
    ])


def test_world3_uneven_torch_and_logits():
    spawn(3, [
        (check_linear, dict()),  # 37 = 13 + 12 + 12
        (check_linear, dict(sizes=[5, 20, 12], pass_start=False, seed=3)),
        (check_linear, dict(sizes=[1, 35, 1], dtype="bfloat16", seed=6)),
        (check_logits, dict(pass_start=False)),
        (check_logits, dict(sizes=[30, 2, 5])),
        (check_data_parallel, dict()),
    ])


def test_world4_torch_and_policy_loss():
    spawn(4, [
        (check_linear, dict(vocab=41, n=33, d=24)),
        (check_linear, dict(vocab=41, dtype="bfloat16", pass_start=False, seed=8)),
        (check_policy_loss, dict()),
        (check_policy_loss, dict(eda="current")),
    ])


@pytest.mark.gpu
def test_world2_gpu_impls():
    """Triton kernels and the CUDA logits-in op on CUDA tensors, ranks sharing one GPU over gloo (NCCL needs
    one GPU per rank)."""
    spawn(2, [
        (check_linear, dict(impl="triton", device="cuda", n=300, d=64, vocab=4099)),
        (check_linear, dict(impl="triton", device="cuda", dtype="bfloat16", n=300, d=64, vocab=4099, seed=2)),
        (check_logits, dict(impl="triton", device="cuda", n=64, vocab=4099)),
        (check_logits, dict(impl="cuda", device="cuda", n=64, vocab=4099, mask_slice=True)),
    ])


def test_world2_triton_interpreter():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("gloo CPU group; the GPU runs this through NCCL in benchmarks/gpu_checks.sh")
    spawn(2, [
        (check_linear, dict(impl="triton", n=20, vocab=37)),
        (check_linear, dict(impl="triton", sizes=[30, 7], pass_start=False, seed=2)),
        (check_logits, dict(impl="triton")),
    ])


def test_vocab_parallel_options_that_cannot_apply_raise_by_name():
    """One options object; what cannot apply is refused, naming it, before any collective."""
    with pytest.raises(ValueError, match="VocabParallel.process_group is required"):
        VocabParallel(None)
    with pytest.raises(ValueError, match="VocabParallel.vocab_start must be a non-negative int"):
        VocabParallel(object(), vocab_start=-1)
    with pytest.raises(TypeError, match="VocabParallel.reduce_hidden_grad must be a bool"):
        VocabParallel(object(), reduce_hidden_grad=1)
    logits, targets = torch.randn(3, 7), torch.randint(0, 7, (3,))
    with pytest.raises(ValueError, match="reduce_hidden_grad=False applies to hidden-states-in ops only"):
        logprob_entropy(logits, targets, vocab_parallel=VocabParallel(object(), reduce_hidden_grad=False))
    with pytest.raises(TypeError, match="vocab_parallel must be an edge_kernels.VocabParallel"):
        linear_logprob_entropy(torch.randn(3, 4), torch.randn(7, 4), targets, vocab_parallel=object())
