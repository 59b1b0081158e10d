"""The TRL adapter's fused head under FSDP2 (``fully_shard``, gloo on CPU), against the same model's native head.

A tiny Qwen2 whose ``lm_head`` is its own ``fully_shard`` unit holds ``lm_head.weight`` as dim-0 shards, i.e.
vocabulary slices: :func:`install_edge_lm_head` then runs the kernel on the slices (the rows are gathered, the
head never is) and the head's gradient must equal what FSDP2 gives the native head: the average over ranks of
each rank's gradient, reduce-scattered. Ranks hold different micro-batches with different numbers of unmasked
tokens (one rank none at all). The gathering fallback (a head not sharded by vocabulary) is checked the same
way: before it passed ``grad_placements``, a plain ``full_tensor()`` kept only each rank's own share of its own
slice (max error 1.7 on gradients of size 2.4). Tolerances: both sides are fp32 computations of the same
quantities in different orders: 1e-5 on log-probs, rtol 1e-4 / atol 1e-5 on gradients.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from dist_helpers import CountCollectives, spawn  # noqa: E402

VOCAB = 97


def _model(world, vocab=VOCAB):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    m = Qwen2ForCausalLM(cfg)
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(m.lm_head, mesh=mesh)
    fully_shard(m, mesh=mesh)
    return m


def _loss(log_probs, entropy, mask):
    return -(log_probs * mask).sum() - 0.1 * (entropy * mask).sum()


def check_fsdp2_head(rank, world, *, gather=False, empty_rank=None, temperature=0.7):
    import edge_kernels.integrations.trl as et
    import edge_kernels.integrations.trl.head as eh
    from torch.distributed.tensor import DTensor

    g = torch.Generator().manual_seed(10 + rank)
    ids = torch.randint(0, VOCAB, (2, 7), generator=g)
    labels = ids.clone()
    labels[:, : 1 + rank] = -100  # a different number of scored tokens per rank
    if rank == empty_rank:
        labels[:] = -100

    ref = _model(world)
    logits = ref(input_ids=ids).logits[:, :-1].float() / temperature
    logsm = torch.log_softmax(logits, -1)
    tgt = labels[:, 1:]
    mask = (tgt != -100).float()
    r_lp = logsm.gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1) * mask
    r_ent = -(logsm.exp() * logsm).sum(-1) * mask
    _loss(r_lp, r_ent, mask).backward()

    ours = _model(world)
    et.install_edge_lm_head(ours, temperature=temperature, impl="torch")
    saved = eh._fsdp2_vocab_slice, DTensor.full_tensor, eh._fsdp2_sharded_head
    calls = []

    def counted_head(*a, **k):  # the head's own collectives (FSDP2's backbone gathers also use dist.*)
        with CountCollectives() as cc:
            res = saved[2](*a, **k)
            calls.append(cc.take())
        return res
    eh._fsdp2_sharded_head = counted_head
    if gather:
        eh._fsdp2_vocab_slice = lambda *a: None
    else:  # the vocabulary-slice path never gathers the head
        def no_gather(*a, **k):
            raise AssertionError("the head was gathered")
        DTensor.full_tensor = no_gather
    try:
        out = ours(input_ids=ids, labels=labels, fused_lm_head=True)
    finally:
        eh._fsdp2_vocab_slice, DTensor.full_tensor, eh._fsdp2_sharded_head = saved
    # sizes, rows, targets, statistics; none on the gathering fallback
    assert calls == ([] if gather else [["all_gather_into_tensor"] * 4]), calls
    _loss(out.log_probs, out.entropy, mask).backward()
    torch.testing.assert_close(out.log_probs, r_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.entropy, r_ent, rtol=0, atol=1e-5)
    for name in ("lm_head.weight", "model.norm.weight", "model.layers.1.mlp.down_proj.weight"):
        a = dict(ours.named_parameters())[name].grad.full_tensor()
        b = dict(ref.named_parameters())[name].grad.full_tensor()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{name} (rank {rank})")


def test_fsdp2_vocab_sharded_head():
    # V=97 over 2 ranks: slices of 49 and 48; one group for all checks (model builds dominate the time)
    spawn(2, [(check_fsdp2_head, dict()), (check_fsdp2_head, dict(empty_rank=1)),
              (check_fsdp2_head, dict(gather=True))])
