"""The TRL adapter's fused head under DeepSpeed ZeRO-3 (DeepSpeed's CPU accelerator, gloo, 2 processes).

``dist/zero3_head.py`` runs under ``torchrun --nproc_per_node 2``: tiny models in ZeRO-3 engines
(``stage3_param_persistence_threshold: 0``, so even their tiny tensors are partitioned; the head's local numel is
0), TRL's native fused head against ours on the same model and per-rank batches. Checked on every rank: loss,
per-token log-probs, full gradients (``deepspeed.utils.safe_get_full_grad``) and the weights after a torch AdamW
step, over two steps, the second with one rank's micro-batch all masked; an untied Qwen2 head with a bias, and a
tied, soft-capped Gemma-2 head. Tolerances: both sides are fp32 computations of the same quantities in different
orders (TRL: vocabulary tiles of ``torch.mm``; ours: the chunked PyTorch path): 1e-5 on log-probs and the loss,
rtol 1e-4 / atol 1e-5 on gradients (as the FSDP2 test), 1e-6 absolute on weights after an AdamW step of lr 1e-3
(a step moves each weight by at most ~lr). Also: the backward fails when the head is not gathered for it, and a target
outside the vocabulary on one rank stops every rank with the same named error, under ZeRO-3 and under DDP (no
hang: the launch has a time limit and its process group is killed on failure).
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("trl")
pytest.importorskip("deepspeed")

from dist_helpers import torchrun  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "dist", "zero3_head.py")
CHECKS = ["native_qwen_bias", "native_gemma_tied", "no_backward_gather", "bad_target", "bad_target_ddp"]


def test_zero3_head_matches_trl_native_head():
    out = torchrun(SCRIPT, *CHECKS, timeout=420)
    for name in CHECKS:
        assert out.count(f"CHECK {name} ok") == 2, f"{name} did not pass on both ranks:\n{out[-3000:]}"
