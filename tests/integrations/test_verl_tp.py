"""verl's Megatron tensor-parallel fused path through our kernel, in a real gloo group.

Two levels. Where megatron-core is installed (0.16.1, the newest for Python 3.11, sets up its parallel state on
CPU with gloo), verl's own Megatron output processor (``model_forward_fused.fused_output_processor``) runs with
megatron's tensor-parallel group, without sequence parallelism (megatron's sequence-parallel gather allocates on
CUDA). Everywhere, the test makes the exact call verl's Megatron fused forward makes:
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
from edge_kernels.oracle import oracle_logprob_entropy  # noqa: E402


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


def check_verl_megatron_output_processor(rank, world, *, v_per_rank=7, s=6, b=2, h=16, temperature=0.7):
    import types

    from megatron.core import parallel_state

    import edge_kernels.integrations.verl as ev

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        ev.patch_verl_fused_kernels()
        from verl.models.mcore import model_forward_fused as mff

        g = torch.Generator().manual_seed(1)
        vocab = v_per_rank * world
        hidden = torch.randn(s, b, h, generator=g)
        weight = torch.randn(vocab, h, generator=g) / h ** 0.5
        labels = torch.randint(0, vocab, (s, b), generator=g)
        lo, hi = rank * v_per_rank, (rank + 1) * v_per_rank
        hid, w = hidden.clone().requires_grad_(), weight[lo:hi].clone().requires_grad_()
        out = mff.fused_output_processor(hidden_states=hid, output_layer=None, output_weight=w, labels=labels,
                                         context=mff.FusedOutputProcessorContext(temperature=temperature),
                                         config=types.SimpleNamespace(sequence_parallel=False))
        (out.log_probs.sum() + 0.5 * out.entropy.sum()).backward()
        x = (hidden.reshape(-1, h).double() @ weight.double().t()).requires_grad_()
        r_lp, r_ent = oracle_logprob_entropy(x, labels.reshape(-1), temperature)
        (r_lp.sum() + 0.5 * r_ent.sum()).backward()
        assert (out.log_probs.double() - r_lp).abs().max() <= 1e-4
        assert (out.entropy.double() - r_ent).abs().max() <= 1e-4
        total = hid.grad.clone()
        dist.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
        torch.testing.assert_close(total.reshape(-1, h).double(), x.grad @ weight.double(), rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(w.grad.double(), x.grad[:, lo:hi].t() @ hidden.reshape(-1, h).double(),
                                   rtol=2e-5, atol=1e-6)
    finally:
        parallel_state.destroy_model_parallel()


def test_verl_megatron_tp():
    # one group for both levels (importing verl in each spawned rank dominates the time); world sizes 2-4 of the
    # op itself are covered by tests/ops/test_vocab_parallel.py
    checks = [(check_verl_tp_call, dict(v_per_rank=7))]
    try:
        import megatron.core  # noqa: F401
    except ImportError:  # megatron-core is not a test dependency: the exact-call check still runs
        pass
    else:
        checks.append((check_verl_megatron_output_processor, dict()))
    spawn(2, checks)
