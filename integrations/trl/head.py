"""Our kernel in place of TRL's fused LM head: :func:`install_edge_lm_head` and the head's distributed paths.

``model(..., labels=..., fused_lm_head=True)`` (TRL's call convention since 1.15) runs the backbone, then
:func:`edge_kernels.linear_logprob_entropy` on the last hidden state and ``lm_head.weight``. Distributed paths:

* FSDP2: a head sharded by vocabulary runs on its slices without being gathered; other layouts are gathered per
  call, the gradient averaged and reduce-scattered back as FSDP2 does.
* DeepSpeed ZeRO-3: the partitioned head (tied embedding, bias) is gathered for the kernel's forward and
  released after it (:func:`_zero3_gather`). The backward needs it gathered again, and its ``[V, D]`` gradient
  must arrive while it is: both come from DeepSpeed itself, because the head is read inside the engine's forward
  (the model's own forward, which TRL calls through the engine): DeepSpeed then registers it as an external
  parameter of the top module, re-gathers it in that module's backward hook, and reduce-scatters its gradient
  into the partitions (``tests/integrations/test_trl_zero3.py`` drops that registration and the backward fails).
  A gather inside the kernel's own backward would not replace it: released again before the gradient reaches
  the parameter, it fails the same way (tried with DeepSpeed 0.19.8 on the CPU).
* Any multi-process run: the targets are checked on every rank together (:func:`_check_targets_on_every_rank`), so
  a bad target on one rank is an error on all of them rather than a hang in the next collective.
"""

from __future__ import annotations

import functools
import types
from contextlib import nullcontext
from typing import Optional

import torch
from packaging.version import Version
from trl.trainer.utils import FusedCausalLMOutput

from edge_kernels import linear_logprob_entropy
from edge_kernels.ops.validation import check_softcap


def _logit_scale(text_config) -> float:
    """The multiplier TRL's fused head applies to the logits (same lookup as ``add_fused_lm_head``)."""
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        s = text_config.logits_scaling
        scale = s if getattr(text_config, "model_type", None) == "hyperclovax" else 1 / s
    return 1.0 if scale is None else float(scale)


_PARALLEL_WRAPPERS = ("FullyShardedDataParallel", "DistributedDataParallel", "DataParallel", "DeepSpeedEngine")


def _unwrap_parallel(model):
    """The model inside FSDP1 / DDP / DeepSpeed wrappers (each keeps it as ``.module``); others as they are."""
    while type(model).__name__ in _PARALLEL_WRAPPERS and isinstance(getattr(model, "module", None),
                                                                    torch.nn.Module):
        model = model.module
    return model


def install_edge_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                         impl: str = "auto", chunk_size: Optional[int] = None) -> None:
    """Make ``model(..., labels=..., fused_lm_head=True)`` compute log-probs and entropies with
    :func:`edge_kernels.linear_logprob_entropy` from the last hidden state and ``lm_head.weight`` (no logits).

    The call convention and the returned :class:`trl.trainer.utils.FusedCausalLMOutput` are those of TRL's
    ``add_fused_lm_head`` (only ``log_probs``, ``entropy``, ``loss`` and ``label_mask`` are filled), so it can be
    applied to a model that already carries TRL's head, e.g. after building a plain ``GRPOTrainer``::

        trainer = GRPOTrainer(...)
        install_edge_lm_head(trainer.model, temperature=trainer.temperature)

    Without ``fused_lm_head=True`` (generation) the previous forward runs unchanged. Logits are
    ``softcap(logit_scale * (h @ W.T + b)) / temperature``, ``softcap(y) = c * tanh(y / c)`` with the model config's
    ``final_logit_softcapping`` ``c`` (Gemma 2/3; none when it is None), the logit scale ``s`` folded into the
    temperature and the cap: ``c tanh(s y / c) / T = (c/s) tanh(y / (c/s)) / (T/s)``.
    The projection runs in the autocast dtype when autocast is on (fp32 with ``cast_lm_head_to_fp32``), else in the
    LM head's dtype; the kernel accumulates in fp32 either way.

    Raises:
        ValueError: the model has a logit scale <= 0, or a ``final_logit_softcapping`` that is not > 0.
    """
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    text_config = model.config.get_text_config()
    scale = _logit_scale(text_config)
    if not scale > 0:
        raise ValueError(f"use_edge_kernels: the model's logit scale is {scale}; only a positive scale can be "
                         "folded into the temperature")
    eff_temperature = float(temperature) / scale
    softcap = getattr(text_config, "final_logit_softcapping", None)
    try:
        eff_softcap = None if softcap is None else check_softcap(softcap) / scale
    except (TypeError, ValueError) as e:
        raise ValueError(f"use_edge_kernels: the model's final_logit_softcapping is unusable: {e}") from None
    import transformers

    backbone_attr = "base_model"
    if text_config is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        backbone_attr = "model"
    prev_forward = model.forward
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover
        DTensor = ()

    @functools.wraps(type(model).forward)
    def _edge_fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                            num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            kwargs.update({k: v for k, v in extra.items() if v is not None})
            return prev_forward(*args, **kwargs)
        if kwargs.get("output_router_logits"):
            raise NotImplementedError(
                "use_edge_kernels does not compute the MoE router auxiliary loss; set use_edge_kernels=False or "
                "router_aux_loss_coef=0"
            )
        kwargs["use_cache"] = False
        backbone_out = getattr(self, backbone_attr)(*args, **kwargs)
        if shift_labels is None:
            hidden = backbone_out.last_hidden_state[:, :-1]
            tgt = labels[:, 1:]
        else:
            hidden = backbone_out.last_hidden_state
            tgt = shift_labels
        lm_head = self.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        hidden = hidden.to(weight.device)
        tgt = tgt.to(weight.device)
        mask = tgt != -100
        device_type = hidden.device.type
        if cast_lm_head_to_fp32:
            dtype = torch.float32
        elif torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = weight.dtype
        _check_targets_on_every_rank(tgt, mask, weight)
        if DTensor and isinstance(weight, DTensor):
            vocab_slice = _fsdp2_vocab_slice(weight, bias)
            if vocab_slice is not None:  # FSDP2 shards the head by vocabulary: run on the slices, no gather
                return _fsdp2_sharded_head(hidden, tgt, mask, weight, bias, vocab_slice, dtype, eff_temperature,
                                           eff_softcap, chunk_size, impl, num_items_in_batch)
            weight, bias = _gather_fsdp2_head(weight, bias)
        return _dense_head(hidden, tgt, mask, weight, bias, dtype, eff_temperature, eff_softcap, chunk_size, impl,
                           num_items_in_batch)

    model.forward = types.MethodType(_edge_fused_forward, model)
    model._edge_kernels_lm_head = True


def _fused_output(mask, logp, ent, num_items_in_batch):
    """TRL's ``FusedCausalLMOutput`` from the kernel's outputs on the unmasked positions (``masked_scatter`` keeps
    an all-masked micro-batch connected to the graph: a differentiable zero)."""
    log_probs = logp.new_zeros(mask.shape).masked_scatter(mask, logp)
    entropy = ent.new_zeros(mask.shape).masked_scatter(mask, ent)
    denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(loss=-log_probs.sum() / denom, log_probs=log_probs, entropy=entropy,
                               label_mask=mask)


def _dense_head(hidden, tgt, mask, weight, bias, dtype, temperature, softcap, chunk_size, impl,
                num_items_in_batch):
    """The fused head on a whole (or gathered) ``lm_head`` for the unmasked positions; a DeepSpeed ZeRO-3
    partitioned head is gathered for the call (:func:`_zero3_gather`)."""
    with _zero3_gather(weight, bias):
        if not bool(mask.any()):
            # an all-masked micro-batch: a differentiable zero, connected to the backbone and the (gathered) head,
            # bias included (under ZeRO-3 every rank must produce the same gradients, in the same order)
            zero = (hidden.float().sum() + weight.float().sum() + (0.0 if bias is None else bias.float().sum())) * 0.0
            log_probs = zero.expand(mask.shape)
            return FusedCausalLMOutput(loss=zero, log_probs=log_probs, entropy=log_probs, label_mask=mask)
        with torch.autocast(hidden.device.type, enabled=False):
            logp, ent = linear_logprob_entropy(
                hidden[mask].to(dtype), weight.to(dtype), tgt[mask], bias=None if bias is None else bias.to(dtype),
                temperature=temperature, return_entropy=True, chunk_size=chunk_size, softcap=softcap, impl=impl,
            )
    return _fused_output(mask, logp, ent, num_items_in_batch)


def _gather_fsdp2_head(weight, bias):
    """An FSDP2 head sharded other than by vocabulary, gathered for the call. Its gradient is a partial sum
    (this rank's micro-batch), so it goes back averaged and reduce-scattered (``Partial("avg")``), as FSDP2's
    own reduce-scatter does; a plain ``full_tensor()`` would keep only this rank's share of its own slice."""
    from torch.distributed.tensor import DTensor, Partial

    def gather(t):
        if not isinstance(t, DTensor):
            return t
        return t.full_tensor(grad_placements=[Partial("avg")] * t.device_mesh.ndim)
    return gather(weight), gather(bias)


def _fsdp2_vocab_slice(weight, bias):
    """``(group, vocab_start)`` when FSDP2 holds ``lm_head.weight`` (and bias) as dim-0 shards over a 1-D mesh,
    i.e. each rank has a contiguous vocabulary slice, none empty; None otherwise (the head is then gathered)."""
    from torch.distributed.tensor import DTensor, Shard

    mesh = weight.device_mesh
    if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        return None
    if bias is not None and (not isinstance(bias, DTensor) or tuple(bias.placements) != (Shard(0),)):
        return None
    world, vocab = mesh.size(), weight.shape[0]
    chunk = -(-vocab // world)  # torch.chunk's sizes, which FSDP2 shards with
    start = mesh.get_local_rank() * chunk
    if chunk * (world - 1) >= vocab or weight.to_local().shape[0] != min(chunk, vocab - start):
        return None
    return mesh.get_group(), start


def _fsdp2_sharded_head(hidden, tgt, mask, weight, bias, vocab_slice, dtype, temperature, softcap, chunk_size,
                        impl, num_items_in_batch):
    """The fused head on FSDP2's vocabulary slices (:func:`linear_logprob_entropy_data_parallel`): this rank's
    rows, every rank's slice, never the whole head; its gradient is averaged over the ranks like FSDP2's."""
    from edge_kernels.ops.vocab_parallel import linear_logprob_entropy_data_parallel

    group, start = vocab_slice
    w = weight.to_local()
    b = None if bias is None else bias.to_local()
    with torch.autocast(hidden.device.type, enabled=False):
        logp, ent = linear_logprob_entropy_data_parallel(
            hidden[mask].to(dtype), w.to(dtype), tgt[mask], bias=None if b is None else b.to(dtype),
            process_group=group, vocab_start=start, temperature=temperature, softcap=softcap, chunk_size=chunk_size,
            impl=impl,
            weight_grad_scale=1.0 / torch.distributed.get_world_size(group))
    return _fused_output(mask, logp, ent, num_items_in_batch)


# ----------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3

def _is_zero3(param) -> bool:
    """A parameter partitioned by DeepSpeed ZeRO-3 (it carries ``ds_id``; its ``.data`` is empty outside a gather)."""
    return param is not None and hasattr(param, "ds_id")


def _zero3_gather(*params):
    """DeepSpeed's ``GatheredParameters`` over the ZeRO-3 parameters not already available (with tied embeddings
    ``embed_tokens`` may hold the weight gathered; re-partitioning it on exit would break its module's tracking).
    TRL's ``maybe_gather_lm_head_ctx`` does the same keyed on transformers' global ZeRO-3 flag; this keys on the
    parameters, so a head partitioned without that flag (an engine built by hand) is gathered too."""
    if not any(_is_zero3(p) for p in params):
        return nullcontext()  # also: no DeepSpeed import where it is not installed
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    todo = {id(p): p for p in params if _is_zero3(p) and p.ds_status != ZeroParamStatus.AVAILABLE}
    if not todo:
        return nullcontext()

    return deepspeed.zero.GatheredParameters(list(todo.values()))


# ----------------------------------------------------------------------------------------------------------
# every rank fails together


def _check_targets_on_every_rank(tgt, mask, weight) -> None:
    """In a multi-process run, every rank learns whether any rank has a target outside ``[0, V)`` and all raise
    the same ValueError: one rank raising alone would leave the others blocked in the next collective (the ZeRO-3
    gather, the FSDP2 all-gather, DDP's gradient all-reduce) until the backend's timeout. One small all-gather per
    head call, so every rank must call the fused head together (TRL's trainer does)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    vocab = int(weight.ds_shape[0]) if _is_zero3(weight) else int(weight.shape[0])  # a DTensor's shape is global
    t = tgt[mask]
    bad = ((t < 0) | (t >= vocab)).any().to(torch.int32).reshape(1)
    flags = [torch.zeros_like(bad) for _ in range(dist.get_world_size())]
    dist.all_gather(flags, bad)
    ranks = [r for r, f in enumerate(flags) if int(f)]
    if ranks:
        raise ValueError(f"use_edge_kernels: targets outside the vocabulary [0, {vocab}) on rank(s) {ranks} (a "
                         "tokenizer with more ids than the model's lm_head rows?); every rank stops here")
