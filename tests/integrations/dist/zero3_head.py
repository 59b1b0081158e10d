"""Run by tests/integrations/test_trl_zero3.py under ``torchrun --nproc_per_node 2`` (gloo, DeepSpeed's CPU
accelerator): our fused head against TRL's native one on ZeRO-3 partitioned models. Prints ``CHECK <name> ok`` per
passed check; an assertion error fails the rank (and the test)."""

from __future__ import annotations

import os
import sys

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(1)

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402

import edge_kernels.integrations.trl as et  # noqa: E402

VOCAB, LR = 97, 1e-3
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # partition even tiny tensors
    "zero_allow_untested_optimizer": True, "bf16": {"enabled": False}, "fp16": {"enabled": False},
}


def build(kind, head, seed=0):
    """A tiny model (``qwen_bias``: Qwen2, untied head with a bias; ``gemma_tied``: Gemma-2, tied embeddings and a
    soft-capped head) in a ZeRO-3 engine with torch's AdamW; ``head``: "native" (TRL's) or "edge" (ours)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen2Config, Qwen2ForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    if kind == "qwen_bias":
        m = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
        m.lm_head.bias = torch.nn.Parameter(0.5 * torch.randn(VOCAB))
    else:
        m = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
                                           final_logit_softcapping=3.0, tie_word_embeddings=True,
                                           attn_implementation="eager"))
        assert m.lm_head.weight is m.model.embed_tokens.weight
    with torch.no_grad():
        m.get_output_embeddings().weight.mul_(4.0)  # peaked distributions; the Gemma cap bites
    if head == "native":
        add_fused_lm_head(m, temperature=0.7, outputs=("log_probs", "entropy"))
    else:
        et.install_edge_lm_head(m, temperature=0.7, impl="torch")
    opt = torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=0.01)
    engine, *_ = deepspeed.initialize(model=m, optimizer=opt, config=DS_CONFIG)
    head_w = engine.module.get_output_embeddings().weight
    assert head_w.ds_tensor is not None and head_w.numel() == 0, "the head must be partitioned"
    return engine


def batch(rank, step, all_masked=False):
    g = torch.Generator().manual_seed(100 * step + rank)
    ids = torch.randint(0, VOCAB, (2, 9), generator=g)
    labels = ids.clone()
    labels[:, : 2 + rank] = -100  # a different number of scored tokens per rank
    if all_masked:
        labels[:] = -100
    return ids, labels


def loss_of(out, labels):
    mask = (labels[:, 1:] != -100).float()
    return -(out.log_probs * mask).sum() - 0.1 * (out.entropy * mask).sum()


def step(engine, ids, labels):
    out = engine(input_ids=ids, labels=labels, fused_lm_head=True)
    loss = loss_of(out, labels)
    engine.backward(loss)
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    engine.step()
    weights = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}
    return loss.detach(), out.log_probs.detach(), grads, weights


def check_against_native(rank, kind):
    """Loss, per-token log-probs, full gradients and AdamW-updated weights of ours == TRL's native head, over two
    steps (the second with one rank's micro-batch all masked)."""
    native, edge = build(kind, "native"), build(kind, "edge")
    for s, empty_rank in ((0, None), (1, 1)):
        ids, labels = batch(rank, s, all_masked=rank == empty_rank)
        ln, lpn, gn, wn = step(native, ids, labels)
        le, lpe, ge, we = step(edge, ids, labels)
        torch.testing.assert_close(le, ln, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lpe, lpn, rtol=0, atol=1e-5)
        assert gn.keys() == ge.keys()
        for n in gn:
            assert gn[n] is not None and ge[n] is not None, n
            torch.testing.assert_close(ge[n], gn[n], rtol=1e-4, atol=1e-5, msg=f"grad {n} ({kind}, step {s})")
            torch.testing.assert_close(we[n], wn[n], rtol=0, atol=1e-6, msg=f"weight {n} ({kind}, step {s})")
        head = [n for n in gn if "lm_head" in n or "embed_tokens" in n]
        assert head and all(ge[n].abs().sum() > 0 for n in head)
    print(f"CHECK native_{kind} ok", flush=True)


def check_backward_gather_is_needed(rank):
    """The head is released after the forward; its backward gather is DeepSpeed's: the head, read inside the
    engine's forward, is registered as an external parameter of the top module, whose backward hook gathers it
    again so the kernel's backward sees the full weight and its ``[V, D]`` gradient meets a gathered parameter.
    Dropping that registration after the forward (a head the engine does not track) makes the backward fail (the
    kernel's backward reads an empty ``[0]`` weight)."""
    from deepspeed.runtime.zero.partition_parameters import unregister_external_parameter

    edge = build("qwen_bias", "edge")
    ids, labels = batch(rank, 0)
    out = edge(input_ids=ids, labels=labels, fused_lm_head=True)
    top = edge.module
    assert top.lm_head.weight.numel() == 0 and top.lm_head.bias.numel() == 0  # the gathered copy is released
    assert {id(top.lm_head.weight), id(top.lm_head.bias)} <= set(top._external_params)
    for p in (top.lm_head.weight, top.lm_head.bias):
        unregister_external_parameter(top, p)
    try:
        edge.backward(loss_of(out, labels))
    except Exception as e:  # noqa: BLE001 - the kernel's backward on the empty partition: which error is its own
        assert not isinstance(e, AssertionError), e
        print(f"the backward failed as expected: {type(e).__name__}: {e}", flush=True)
    else:
        raise AssertionError("the backward succeeded without gathering the head")
    print("CHECK no_backward_gather ok", flush=True)


def check_bad_target_fails_everywhere(rank):
    edge = build("qwen_bias", "edge")
    ids, labels = batch(rank, 0)
    if rank == 1:
        labels[0, -1] = VOCAB  # outside the vocabulary, on one rank only
    try:
        edge(input_ids=ids, labels=labels, fused_lm_head=True)
    except ValueError as e:
        assert "outside the vocabulary [0, 97) on rank(s) [1]" in str(e), e
    else:
        raise AssertionError("no error")
    print("CHECK bad_target ok", flush=True)


def check_bad_target_fails_everywhere_ddp(rank):
    """The same under DDP (no DeepSpeed): without the shared check rank 0 would wait in DDP's all-reduce."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    m = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2))
    et.install_edge_lm_head(m, temperature=1.0, impl="torch")
    ddp = torch.nn.parallel.DistributedDataParallel(m)
    ids, labels = batch(rank, 0)
    if rank == 1:
        labels[1, 3] = VOCAB + 5
    try:
        ddp(input_ids=ids, labels=labels, fused_lm_head=True)
    except ValueError as e:
        assert "outside the vocabulary [0, 97) on rank(s) [1]" in str(e), e
    else:
        raise AssertionError("no error")
    print("CHECK bad_target_ddp ok", flush=True)


def main():
    deepspeed.init_distributed(dist_backend="gloo")
    hf_ds = HfDeepSpeedConfig(DS_CONFIG)  # noqa: F841 - TRL's native head keys its gather on this global flag
    rank = dist.get_rank()
    for name in sys.argv[1:]:
        if name.startswith("native_"):
            check_against_native(rank, name[len("native_"):])
        elif name == "no_backward_gather":
            check_backward_gather_is_needed(rank)
        elif name == "bad_target":
            check_bad_target_fails_everywhere(rank)
        elif name == "bad_target_ddp":
            check_bad_target_fails_everywhere_ddp(rank)
        else:
            raise SystemExit(f"unknown check {name}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
