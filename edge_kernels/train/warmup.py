"""The supervised warm-up: next-token NLL on reference solutions through the fused kernel, before RL.

It makes rewards non-zero before RL starts (the embedded default's policy is randomly initialised). For the
embedded task the demonstrations are :func:`~edge_kernels.train.embedded.warmup_demonstrations` (some end
without ``\\boxed{}``); otherwise the problems' own solutions. Its own AdamW, thrown away afterwards; the
learning rate ramps up over 20 steps, then decays on a cosine to 10%.
"""

from __future__ import annotations

import math
import time
from typing import Callable, List, Optional, Sequence

import torch

from .batch import decoder_and_head, head_inputs, head_softcap, pack, response_hidden
from .runtime import mix_seed, oom_guard


def demonstrations(cfg, problems, embedded_task: bool) -> List[str]:
    """The warm-up's target texts, one per training problem."""
    if embedded_task:
        from .embedded import warmup_demonstrations

        return warmup_demonstrations([{"solution": p.solution, "answer": p.answer} for p in problems],
                                     cfg.embedded_unboxed_frac, cfg.seed,
                                     cfg.embedded_two_step_unboxed_frac)
    return [p.solution for p in problems]


def lr_at(base_lr: float, step: int, total: int) -> float:
    """20 steps of linear ramp, then cosine decay to 10%."""
    cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total))
    return base_lr * min(1.0, (step + 1) / 20) * cosine


def supervised_warmup(model, tokenizer, prompts: Sequence[List[int]], demos: Sequence[str], *, cfg, pad_id: int,
                      eos_id: int, device, autocast_dtype=None, bar: Optional[Callable] = None) -> float:
    """``cfg.warmup_steps`` AdamW steps of NLL on ``demos`` (after their prompts), batches drawn epoch-wise from
    a generator seeded by ``cfg.seed``; returns the last logged loss."""
    from edge_kernels import linear_logprob_entropy

    c = cfg
    targets = [tokenizer.encode(d, add_special_tokens=False) + [eos_id] for d in demos]
    opt = torch.optim.AdamW(model.parameters(), lr=c.warmup_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(mix_seed(c.seed, 7))
    _, weight, bias = decoder_and_head(model)
    model.train()
    n = len(targets)
    order: List[int] = []
    steps = range(c.warmup_steps)
    it = bar(steps, desc="warm-up") if bar else steps
    loss_v = float("nan")
    for s in it:
        if len(order) < c.warmup_batch_size:
            order += torch.randperm(n, generator=gen).tolist()
        idx, order = order[:c.warmup_batch_size], order[c.warmup_batch_size:]
        for g in opt.param_groups:
            g["lr"] = lr_at(c.warmup_lr, s, c.warmup_steps)
        packed = pack([prompts[i] for i in idx], [targets[i] for i in idx], pad_id, device=device)
        with oom_guard("warmup"):
            h, w, b = head_inputs(response_hidden(model, packed, autocast_dtype), weight, bias, autocast_dtype)
            tgt = torch.where(packed.mask, packed.targets, torch.full_like(packed.targets, -100))
            logp, _ = linear_logprob_entropy(h, w, tgt, bias=b, return_entropy=False, softcap=head_softcap(model),
                                             impl=c.impl)
            m = packed.mask.to(logp.dtype)
            loss = -(logp * m).sum() / m.sum().clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if c.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), c.max_grad_norm)
            opt.step()
        if (s + 1) % 100 == 0 or s + 1 == c.warmup_steps:
            loss_v = loss.item()
            if bar and hasattr(it, "set_postfix"):
                it.set_postfix(loss=f"{loss_v:.3f}")
    return loss_v


def timed_warmup(trainer) -> None:
    """The warm-up of ``trainer``'s policy, logged, and the new weights pushed to its rollout engine."""
    from .runtime import progress

    c = trainer.cfg
    t0 = time.time()
    demos = demonstrations(c, trainer.train_problems, trainer.embedded_task)
    loss = supervised_warmup(trainer.model, trainer.tokenizer, trainer.train_prompts, demos, cfg=c,
                             pad_id=trainer.pad_id, eos_id=trainer.eos_id, device=trainer.device,
                             autocast_dtype=trainer.autocast_dtype, bar=progress(c.progress))
    trainer.log(f"warm-up: {c.warmup_steps} supervised steps, final loss {loss:.4f}, {time.time() - t0:.1f}s")
    trainer.engine.sync_weights(trainer.model)  # the policy's weights changed outside the RL step
