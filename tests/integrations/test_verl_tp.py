"""verl's Megatron tensor-parallel fused path through our kernel, in a real gloo group.

megatron-core is not installed here (and its parallel state needs it), so the test makes the exact call verl's
Megatron fused forward makes (``verl/models/mcore/model_forward_fused.py``):
``linear_cross_entropy(hidden, weight_shard, labels, temperature, "none", tp_group)`` after
``patch_verl_fused_kernels()``, with Megatron's layout: equal vocabulary slices, rank r's starting at
``r * V_r``, hidden ``[s, b, h]`` replicated (gathered from the sequence-parallel region), global labels.
verl's contract: full-vocabulary outputs on every rank, this rank's ``d_weight`` slice, and a PARTIAL
``d_hidden`` that the backward of ``gather_from_sequence_parallel_region`` (a reduce-scatter) sums; here the
partials are summed with an all-reduce and compared with the float64 oracle (tolerances as in
tests/ops/test_vocab_parallel.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("verl")

from dist_helpers import CountCollectives, spawn  # noqa: E402
from oracle import oracle_logprob_entropy  # noqa: E402


def check_verl_tp_call(rank, world, *, v_per_rank=11, s=6, b=2, h=16, temperature=0.7):
    import edge_kernels.integrations.verl as ev
    from verl.utils.kernel import linear_cross_entropy as lce

    ev.patch_verl_fused_kernels()
    g = torch.Generator().manual_seed(0)
    vocab = v_per_rank * world
    hidden = torch.randn(s, b, h, generator=g)
    weight = torch.randn(vocab, h, generator=g) / h ** 0.5
    labels = torch.randint(0, vocab, (s, b), generator=g)
    g_lp, g_ent = torch.randn(s * b, generator=g), torch.randn(s * b, generator=g)
    lo, hi = rank * v_per_rank, (rank + 1) * v_per_rank

    hid = hidden.clone().requires_grad_()
    w = weight[lo:hi].clone().requires_grad_()
    with CountCollectives() as cc:
        logp, ent = lce.linear_cross_entropy(hid, w, labels, temperature, "none", dist.group.WORLD)
        fwd = cc.take()
        ((logp * g_lp).sum() + (ent * g_ent).sum()).backward()
        bwd = cc.take()
    assert fwd == ["all_gather_into_tensor"], fwd  # vocab_start = rank * V_r: no size gather
    assert bwd == [], bwd  # partial d_hidden: verl's own collective sums it
    assert logp.shape == (s * b,) and ent.shape == (s * b,)

    x = (hidden.reshape(-1, h).double() @ weight.double().t()).requires_grad_()
    r_lp, r_ent = oracle_logprob_entropy(x, labels.reshape(-1), temperature)
    ((r_lp * g_lp.double()).sum() + (r_ent * g_ent.double()).sum()).backward()
    assert (logp.double() - r_lp).abs().max() <= 1e-4
    assert (ent.double() - r_ent).abs().max() <= 1e-4
    dz = x.grad
    partial = dz[:, lo:hi] @ weight[lo:hi].double()
    torch.testing.assert_close(hid.grad.reshape(-1, h).double(), partial, rtol=2e-5, atol=1e-6)
    total = hid.grad.clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total.reshape(-1, h).double(), dz @ weight.double(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), dz[:, lo:hi].t() @ hidden.reshape(-1, h).double(),
                               rtol=2e-5, atol=1e-6)
    # verl's layout is equal slices: a rank with a different slice size is refused on every rank
    w_bad = weight[: v_per_rank + (1 if rank == 0 else 0)]
    with pytest.raises(ValueError, match="vocab_start disagrees"):
        lce.linear_cross_entropy(hidden, w_bad, labels, temperature, "none", dist.group.WORLD)


def test_verl_megatron_tp_call():
    # one group (importing verl in each spawned rank dominates the time); world sizes 2-4 of the op itself are
    # covered by tests/ops/test_vocab_parallel.py
    spawn(3, [(check_verl_tp_call, dict(v_per_rank=7))])
