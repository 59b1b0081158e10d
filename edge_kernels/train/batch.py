"""Packing rollouts into tensors, and the forward passes that never form full logits.

Layout: prompts left-padded to a common width ``P``, responses right-padded to ``T``, so every response
starts at column ``P``. The hidden state at column ``P - 1 + t`` predicts response token ``t``; the scoring
pass and the update both slice ``[P - 1, P - 1 + T)`` out of the decoder's last hidden state and hand it,
with the LM head's weight, to the fused kernels (:func:`edge_kernels.linear_logprob_entropy`,
:func:`edge_kernels.losses.fused_linear_policy_loss`). Position ids follow the attention mask, as in
``generate``.

Mixed precision (``autocast_dtype``, e.g. bf16 compute over fp32 master parameters): the decoder runs under
``torch.autocast`` and the fused kernels get the hidden states and the LM head cast to the compute dtype
(:func:`head_inputs`; the cast is part of the graph, so the gradient reaches the fp32 parameter).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor


@dataclass
class Packed:
    input_ids: Tensor       # [B, P + T]
    attention_mask: Tensor  # [B, P + T]
    position_ids: Tensor    # [B, P + T]
    prompt_width: int       # P
    targets: Tensor         # [B, T] response tokens (pad where masked)
    mask: Tensor            # [B, T] bool, response tokens
    injected: Tensor        # [B, T] bool, response tokens the policy did not sample (GEC)

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: slice) -> "Packed":
        return Packed(self.input_ids[rows], self.attention_mask[rows], self.position_ids[rows], self.prompt_width,
                      self.targets[rows], self.mask[rows], self.injected[rows])


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
         injected: Optional[Sequence[Sequence[bool]]] = None, device=None) -> Packed:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    B = len(prompts)
    P = max(len(p) for p in prompts)
    T = max(1, max(len(r) for r in responses))
    ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    att = torch.zeros((B, P + T), dtype=torch.long)
    inj = torch.zeros((B, T), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p):P] = torch.as_tensor(list(p), dtype=torch.long)
        att[i, P - len(p):P] = 1
        if len(r):
            ids[i, P:P + len(r)] = torch.as_tensor(list(r), dtype=torch.long)
            att[i, P:P + len(r)] = 1
            if injected is not None:
                inj[i, :len(r)] = torch.as_tensor(list(injected[i]), dtype=torch.bool)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    mask = att[:, P:].bool()
    packed = Packed(ids, att, pos, P, ids[:, P:].clone(), mask, inj & mask)
    if device is not None:
        src = packed
        packed = Packed(src.input_ids.to(device), src.attention_mask.to(device), src.position_ids.to(device),
                        src.prompt_width, src.targets.to(device), src.mask.to(device), src.injected.to(device))
    return packed


def decoder_and_head(model) -> Tuple[torch.nn.Module, Tensor, Optional[Tensor]]:
    """``(decoder, lm_head_weight, lm_head_bias)`` of a Hugging Face causal LM: the base model that returns
    the last hidden state (``model.model`` for Qwen2/Llama), and the output projection."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None:
        base = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(model).__name__} does not expose a decoder and an LM head; edge-train needs a "
                        "Hugging Face causal LM (AutoModelForCausalLM)")
    return base, head.weight, getattr(head, "bias", None)


def head_softcap(model) -> Optional[float]:
    """The model's final-logit soft-cap (Gemma 2/3 ``final_logit_softcapping``), None when it has none: the fused
    kernels' ``softcap=``, so that their log-probs are those of the model's own logits."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "final_logit_softcapping", None)


def autocast(device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def head_inputs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], dtype: Optional[torch.dtype]
                ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """The fused kernels' ``hidden``, ``weight`` and ``bias`` in the compute dtype (they must share one; under
    autocast the decoder's last hidden state stays in the residual stream's fp32). No-op when ``dtype`` is None."""
    if dtype is None:
        return hidden, weight, bias
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def response_hidden(model, packed: Packed, autocast_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Last hidden states at the positions that predict the response tokens ``[B, T, D]`` (the decoder under
    autocast to ``autocast_dtype`` when given)."""
    base, _, _ = decoder_and_head(model)
    with autocast(packed.input_ids.device, autocast_dtype):
        out = base(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                   position_ids=packed.position_ids, use_cache=False)
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    P, T = packed.prompt_width, packed.targets.shape[1]
    return h[:, P - 1:P - 1 + T]


def score(model, packed: Packed, *, temperature: float, micro_batch: int = 0, impl: str = "auto",
          mask: Optional[Tensor] = None, autocast_dtype: Optional[torch.dtype] = None,
          top_p: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """The scoring pass: fp32 log-probs and full-vocabulary entropies ``[B, T]`` of the packed responses
    under ``model`` at ``temperature``, with the fused kernel (no logits), in the same precision as the update
    (``autocast_dtype``). Masked positions hold 0. ``top_p``: under the nucleus-truncated distribution instead
    (``docs/algorithms.md`` section 9; a token outside the nucleus gets ``-inf``)."""
    from edge_kernels import linear_logprob_entropy

    _, weight, bias = decoder_and_head(model)
    m = packed.mask if mask is None else mask
    step = micro_batch or packed.rows
    logps, ents = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, packed.rows, step):
                sl = slice(s, s + step)
                part = packed.select(sl)
                h, w, b = head_inputs(response_hidden(model, part, autocast_dtype), weight, bias, autocast_dtype)
                tgt = torch.where(m[sl], part.targets, torch.full_like(part.targets, -100))
                lp, ent = linear_logprob_entropy(h, w, tgt, bias=b, temperature=temperature,
                                                 ignore_index=-100, return_entropy=True,
                                                 softcap=head_softcap(model), impl=impl, top_p=top_p)
                zero = torch.zeros_like(lp)
                logps.append(torch.where(m[sl], lp, zero))
                ents.append(torch.where(m[sl], ent, zero))
    finally:
        model.train(was_training)
    return torch.cat(logps), torch.cat(ents)
