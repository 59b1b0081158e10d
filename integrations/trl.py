"""TRL adapter: ``EdgeGRPOConfig`` / ``EdgeGRPOTrainer`` and our kernel in place of TRL's fused LM head.

The one-line change for a TRL user::

    from edge_kernels.integrations.trl import EdgeGRPOConfig as GRPOConfig, EdgeGRPOTrainer as GRPOTrainer

Everything ``GRPOConfig`` offers keeps its meaning (loss types, clip-higher, KL, sequence-level importance
sampling, entropy masking and bonus, vLLM, PEFT, ...); the new fields are below. With the defaults
(``advantage_estimator="grpo"``, ``use_edge_kernels=False``, ``gec=False``) the trainer *is* TRL's.

Supported TRL versions: ``>=1.15,<1.17`` (tested: 1.16.0). TRL 1.15 made every log-prob pass go through a fused
LM head patched onto the model (``trl.trainer.utils.add_fused_lm_head``, called as
``model(..., labels=..., fused_lm_head=True)``); :func:`install_edge_lm_head` replaces that head with
:func:`edge_kernels.linear_logprob_entropy` (same call convention, same ``FusedCausalLMOutput``), so TRL's own
``_get_per_token_logps_and_entropies`` and ``_compute_loss`` run unchanged on top of our kernel. Older TRL has
no fused head and is refused at import. Under FSDP2 a head sharded by vocabulary runs on its slices without
being gathered (:func:`edge_kernels.ops.vocab_parallel.linear_logprob_entropy_data_parallel`); other FSDP2
layouts gather it per call, its gradient averaged and reduce-scattered back as FSDP2 does.

Extension points used (all of ``trl/trainer/grpo_trainer.py``):

* ``_generate`` (GEC: rewrite incorrect completions right after sampling, before TRL scores them),
* ``_calculate_rewards`` (keep the gathered per-function rewards),
* ``_generate_and_score_completions`` (replace TRL's advantages by the chosen estimator's, per group and over
  the whole gathered generation batch, before ``_prepare_inputs`` shuffles it),
* ``_get_per_token_logps_and_entropies`` and ``_compute_loss`` (EDA with the *current* policy's entropy).

The estimator is the library's (:func:`edge_kernels.estimators.compute_advantages`); the config's estimator
options carry the names, defaults and validation of :class:`edge_kernels.estimators.EstimatorOptions`, the same
as edge-train's flags and verl's ``algorithm.edge.*`` (the GRPO scale is TRL's own ``scale_rewards``).
GEC is the library's own (:func:`edge_kernels.gec.apply_gec`, shared with ``edge-train``, options ``gec_*`` of
:class:`edge_kernels.gec.GECConfig`): branches drawn
from a seeded generator, injected text flagged per token (``gec_mask_injected`` maps it to TRL's tool mask),
corrected completions re-scored by TRL, old log-probs of all text from TRL's scoring pass.

Refused with a clear error, never silently ignored (see :func:`_check_arguments`, ``_edge_validate``):

* a non-``"grpo"`` estimator with ``multi_objective_aggregation="normalize_then_sum"`` (our estimators take one
  scalar reward per completion) or with completions that every reward function scored ``None``;
* ``prog_baseline="prompt"`` (TRL does not score prompt tokens);
* ``eda_entropy_source="current"`` with another estimator, or with loss micro-batches that can split a group
  (``steps_per_generation != 1``, or ``per_device_train_batch_size`` not a multiple of ``num_generations``):
  the group mean of ``P`` comes from the policy being updated (docs/algorithms.md section 2);
* ``use_edge_kernels`` with DeepSpeed ZeRO-3 (our backward does not re-gather the partitioned LM head), with a
  non-positive logit scale, or an MoE router auxiliary loss (a final-logit soft-cap, Gemma 2/3's
  ``final_logit_softcapping``, is passed to the kernel);
* GEC with vLLM in server mode or with tensor parallelism (colocate mode, one engine per process, is supported:
  the regeneration goes through TRL's engine), tools / environments / ``rollout_func``, vision-language
  processors, a dataset without the
  needed ``answer`` / ``solution`` columns, or DeepSpeed ZeRO-3 with ``ds3_gather_for_generation=False``.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import types
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import torch

try:
    import trl
    from trl import GRPOConfig, GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without TRL
    raise ImportError(
        "edge_kernels.integrations.trl needs TRL: pip install 'edge-kernels[trl]' (trl>=1.15,<1.17)"
    ) from exc

from packaging.version import Version

from edge_kernels.advantage_formulas import eda_scale, seq_mean_entropy
from edge_kernels.estimators import DEFAULTS as _EST_DEFAULTS
from edge_kernels.estimators import (EstimatorOptions, advantage_stats, compute_advantages, needed_inputs,
                                     option_help, options_from, sequence_advantages)
from edge_kernels.gec import DEFAULTS as _GEC_DEFAULTS
from edge_kernels.gec import GECConfig, GECError, apply_gec, branch_counts, choose_branches, gec_config_from
from edge_kernels.gec import option_help as gec_option_help
from edge_kernels.ops.validation import check_softcap
from edge_kernels.ops.linear_logprob_entropy import linear_logprob_entropy

SUPPORTED_TRL = (Version("1.15.0"), Version("1.17.0"))  # [min, max)
TESTED_TRL = "1.16.0"



def _parse_version(v) -> Optional[Version]:
    try:
        return Version(str(v).split("+")[0])
    except Exception:  # "unknown" (TRL without package metadata)
        return None


_trl_version = _parse_version(getattr(trl, "__version__", None))
if _trl_version is not None and _trl_version < SUPPORTED_TRL[0]:
    raise ImportError(
        f"edge_kernels.integrations.trl supports TRL >=1.15,<1.17 (tested {TESTED_TRL}); found trl {trl.__version__}, "
        "which has no fused LM head (trl.trainer.utils.add_fused_lm_head) for our kernel to replace. "
        "Upgrade: pip install 'trl>=1.15,<1.17'"
    )
if _trl_version is not None and _trl_version >= SUPPORTED_TRL[1]:
    warnings.warn(
        f"edge_kernels.integrations.trl is tested with TRL {TESTED_TRL} (supported >=1.15,<1.17); found trl "
        f"{trl.__version__}. It relies on GRPOTrainer's private extension points, which may have changed.",
        stacklevel=2,
    )

from trl.data_utils import is_conversational  # noqa: E402
from trl.models import unwrap_model_for_generation  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402
from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx  # noqa: E402

__all__ = [
    "EdgeGRPOConfig",
    "EdgeGRPOTrainer",
    "install_edge_lm_head",
    "ESTIMATORS",
    "SUPPORTED_TRL",
]

ESTIMATORS = ("grpo", "eda", "egpo", "prog_grpo", "ep_grpo")
# Inputs of the policy forward that TRL keeps in the batch for multimodal models (see GRPOTrainer._compute_loss).
_FORWARD_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                 "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


# ----------------------------------------------------------------------------------------------------------
# our kernel in place of TRL's fused LM head


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
    """The fused head on a whole (or gathered) ``lm_head`` for the unmasked positions."""
    if not bool(mask.any()):
        # an all-masked micro-batch: a differentiable zero, connected to the backbone and the head
        zero = (hidden.float().sum() + weight.float().sum()) * 0.0
        log_probs = zero.expand(mask.shape)
        return FusedCausalLMOutput(loss=zero, log_probs=log_probs, entropy=log_probs, label_mask=mask)
    with torch.autocast(hidden.device.type, enabled=False), maybe_gather_lm_head_ctx(weight, bias):
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
# config


def _est_field(name: str):
    """An estimator option of :class:`edge_kernels.estimators.EstimatorOptions` (its default and help)."""
    return field(default=getattr(_EST_DEFAULTS, name), metadata={"help": option_help(name)})


def _gec_field(name: str):
    """A GEC option of :class:`edge_kernels.gec.GECConfig` (its default and help)."""
    return field(default=getattr(_GEC_DEFAULTS, name[len("gec_"):]), metadata={"help": gec_option_help(name)})


@dataclass
class EdgeGRPOConfig(GRPOConfig):
    """TRL's ``GRPOConfig`` plus the entropy-aware estimators, GEC and the fused kernel switch.

    Formulas: ``docs/algorithms.md`` (EDA section 2, GEC section 3, EGPO section 4, ProGRPO / EP-GRPO
    section 5, the latter two being this library's reading of papers without code).
    """

    advantage_estimator: str = field(default="grpo", metadata={
        "help": "'grpo' (TRL's own advantages, untouched), 'eda' (EDGE-GRPO entropy-driven advantage), 'egpo' "
                "(EGPO calibration + NSR), 'prog_grpo' (ProGRPO re-weighting) or 'ep_grpo' (EP-GRPO token-level)."})
    adv_eps: float = _est_field("adv_eps")
    correct_threshold: float = _est_field("correct_threshold")
    eda_entropy_source: str = _est_field("eda_entropy_source")
    eda_clamp: Optional[list[float]] = _est_field("eda_clamp")
    eda_eps: float = _est_field("eda_eps")
    egpo_uncertainty: str = _est_field("egpo_uncertainty")
    egpo_w_min: float = _est_field("egpo_w_min")
    egpo_w_max: float = _est_field("egpo_w_max")
    egpo_mode: str = _est_field("egpo_mode")
    egpo_renorm: bool = _est_field("egpo_renorm")
    egpo_nsr_value: float = _est_field("egpo_nsr_value")
    egpo_eps: float = _est_field("egpo_eps")
    prog_alpha: float = _est_field("prog_alpha")
    prog_low_frac: float = _est_field("prog_low_frac")
    prog_baseline: str = _est_field("prog_baseline")
    ep_g_min: float = _est_field("ep_g_min")
    ep_g_max: float = _est_field("ep_g_max")
    ep_num_buckets: int = _est_field("ep_num_buckets")
    ep_lambda: float = _est_field("ep_lambda")
    ep_eps: float = _est_field("ep_eps")
    gec: bool = field(default=False, metadata={
        "help": "EDGE-GRPO Guided Error Correction on incorrect completions (training only)."})
    gec_p_regenerate: float = _gec_field("gec_p_regenerate")
    gec_p_inject: float = _gec_field("gec_p_inject")
    gec_p_reference: float = _gec_field("gec_p_reference")
    gec_reflection: str = _gec_field("gec_reflection")
    gec_injection: str = _gec_field("gec_injection")
    gec_max_new_tokens: int = _gec_field("gec_max_new_tokens")
    gec_mask_injected: bool = _gec_field("gec_mask_injected")
    gec_correct_reward: float = field(default=1.0, metadata={
        "help": "A completion whose weighted reward is below this is incorrect and gets corrected."})
    gec_answer_column: str = field(default="answer", metadata={"help": "Dataset column with the final answer."})
    gec_solution_column: str = field(default="solution", metadata={"help": "Dataset column with the reference."})
    gec_seed: int = field(default=0, metadata={"help": "Seed of the generator drawing the correction type."})
    use_edge_kernels: bool = field(default=False, metadata={
        "help": "Compute log-probs and entropies with edge_kernels.linear_logprob_entropy (in place of TRL's fused "
                "LM head) for the policy and the reference model."})
    edge_kernels_impl: str = field(default="auto", metadata={"help": "'auto', 'triton' or 'torch'."})
    edge_kernels_chunk_size: Optional[int] = field(default=None, metadata={
        "help": "Vocabulary chunk of the kernel's backward (default: automatic)."})

    def __post_init__(self):
        super().__post_init__()
        _choice("advantage_estimator", self.advantage_estimator, ESTIMATORS)
        _choice("edge_kernels_impl", self.edge_kernels_impl, ("auto", "triton", "torch"))
        if self.prog_baseline != "group":
            raise ValueError(
                f"prog_baseline={self.prog_baseline!r} is not available in the TRL adapter: the 'prompt' baseline "
                "needs the prompt tokens' log-probs, which TRL never computes. Use prog_baseline='group'."
            )
        options = self.estimator_options()  # the one validation of every estimator option
        self.eda_clamp = None if options.eda_clamp is None else list(options.eda_clamp)
        gec_config_from(self)  # the one validation of every GEC option
        if self.edge_kernels_chunk_size is not None and self.edge_kernels_chunk_size < 1:
            raise ValueError(f"edge_kernels_chunk_size must be >= 1, got {self.edge_kernels_chunk_size}")

    def estimator_options(self) -> EstimatorOptions:
        """The estimator options (names as in edge-train and verl); the GRPO scale is TRL's ``scale_rewards``."""
        scale = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        return options_from(self, adv_scale=scale).check_for(self.advantage_estimator)


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


# ----------------------------------------------------------------------------------------------------------
# trainer


class EdgeGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with the edge-kernels estimators, GEC and fused kernel (see the module docstring).

    Takes exactly ``GRPOTrainer``'s arguments; ``args`` must be an :class:`EdgeGRPOConfig`.
    """

    _tag_names = [*getattr(GRPOTrainer, "_tag_names", ["trl", "grpo"]), "edge-kernels"]

    def __init__(self, *args, **kwargs):
        bound = inspect.signature(GRPOTrainer.__init__).bind(None, *args, **kwargs)
        params = {k: v for k, v in bound.arguments.items() if k != "self"}
        config = params.get("args")
        if config is None:
            model = params["model"]
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            config = params["args"] = EdgeGRPOConfig(f"{str(name).split('/')[-1] or 'model'}-EdgeGRPO")
        if not isinstance(config, EdgeGRPOConfig):
            raise TypeError(
                f"EdgeGRPOTrainer needs args=EdgeGRPOConfig(...), got {type(config).__name__}; "
                "EdgeGRPOConfig accepts every GRPOConfig field"
            )
        _check_dataset_columns(config, params.get("train_dataset"))
        _check_arguments(config, params)  # fail before TRL builds models / vLLM
        super().__init__(**params)
        self._edge_validate()
        if config.use_edge_kernels:
            target = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            install_edge_lm_head(target, temperature=self.temperature,
                                 cast_lm_head_to_fp32=config.cast_lm_head_to_fp32,
                                 impl=config.edge_kernels_impl, chunk_size=config.edge_kernels_chunk_size)
            if self.ref_model is not None:
                # TRL has already wrapped the reference model (FSDP1, DeepSpeed, DDP); the head goes on the model
                # inside, so the wrapper's own forward (unsharding the weights first) still runs around it
                install_edge_lm_head(_unwrap_parallel(self.ref_model), temperature=self.temperature,
                                     cast_lm_head_to_fp32=config.cast_lm_head_to_fp32,
                                     impl=config.edge_kernels_impl, chunk_size=config.edge_kernels_chunk_size)
        if getattr(self, "use_vllm", False):
            _push_through_reload_weights_on_cpu(self.vllm_generation)
        self._gec_generator = torch.Generator().manual_seed(int(config.gec_seed) + self.accelerator.process_index)
        self._gec_regen_logprobs = None
        self._edge_batch_inputs = None
        self._edge_rewards_per_func = None
        self._edge_eda_loss_inputs = None

    # ------------------------------------------------------------------------------------------------------
    # validation

    def _edge_validate(self) -> None:
        """Checks that need the built trainer (the construction arguments are checked before, see
        :func:`_check_arguments`)."""
        a = self.args
        if a.use_edge_kernels and getattr(self, "aux_loss_enabled", False):
            raise ValueError(
                "use_edge_kernels=True does not compute the MoE router auxiliary loss; set "
                "router_aux_loss_coef=0.0 or use_edge_kernels=False"
            )
        if a.eda_entropy_source == "current":
            G = self.num_generations
            if a.steps_per_generation != 1 or a.per_device_train_batch_size % G:
                raise ValueError(
                    "eda_entropy_source='current' takes the group mean of P from the policy being updated, so each "
                    "loss micro-batch must hold whole groups: set steps_per_generation=1 (TRL shuffles the "
                    "generation batch across its steps) and per_device_train_batch_size to a multiple of "
                    f"num_generations={G} (got steps_per_generation={a.steps_per_generation}, "
                    f"per_device_train_batch_size={a.per_device_train_batch_size})"
                )
        if a.gec and getattr(self, "_is_vlm", False):
            raise ValueError("gec=True is not supported with a vision-language processor (text-only "
                             "corrections)")

    # ------------------------------------------------------------------------------------------------------
    # rewards and advantages

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._edge_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        self._edge_batch_inputs = inputs
        self._edge_rewards_per_func = None
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._edge_batch_inputs = None
        if self.args.advantage_estimator == "grpo":
            return output
        return self._edge_advantages(output)

    def _edge_scoring_pass(self, output, mode):
        """Old-policy per-token log-probs and entropies ``[B, T]`` of the local batch (no gradient)."""
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        extra = {k: output[k] for k in _FORWARD_KEYS if k in output}
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            logps, entropies, _ = self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, output["completion_ids"].size(1), batch_size=batch_size,
                compute_entropy=True, **extra)
        return logps.float(), entropies.float()

    def _gather_tokens(self, x: torch.Tensor, pad_value=0) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return x
        x = self.accelerator.pad_across_processes(x, dim=1, pad_index=pad_value)
        return self.accelerator.gather(x)

    def _edge_rewards(self, device) -> torch.Tensor:
        """One scalar reward per gathered completion: TRL's reward functions, weighted and summed."""
        rpf = self._edge_rewards_per_func
        if rpf is None:  # pragma: no cover - TRL always scores
            raise RuntimeError("edge estimators: TRL did not call _calculate_rewards")
        unscorable = torch.isnan(rpf).all(dim=1)
        if bool(unscorable.any()):
            raise ValueError(
                f"advantage_estimator={self.args.advantage_estimator!r}: every reward function returned None for "
                f"{int(unscorable.sum())} completion(s); the edge estimators need a reward for every completion "
                "(TRL's 'grpo' drops them)"
            )
        return (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1).float().to(device)

    def _edge_token_inputs(self, output: dict, mode: str, options: EstimatorOptions):
        """The gathered response mask, old log-probs and (when the estimator reads them) entropies ``[B, T]``."""
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        logp = output.get("old_per_token_logps")
        ent = None
        if "entropy" in needed_inputs(self.args.advantage_estimator, options) or logp is None:
            logp_s, ent = self._edge_scoring_pass(output, mode)
            logp = logp_s if logp is None else logp
        mask_g = self._gather_tokens(mask.float()).bool()
        ent_g = self._gather_tokens(ent) if ent is not None else None
        return mask_g, self._gather_tokens(logp.float()), ent_g

    def _edge_advantages(self, output: dict) -> dict:
        """Replace TRL's advantages by the estimator's (:func:`edge_kernels.estimators.compute_advantages` on the
        whole gathered generation batch, groups of ``num_generations`` consecutive rows)."""
        a = self.args
        mode = "train" if self.model.training else "eval"
        device = output["completion_ids"].device
        G = self.num_generations if mode == "train" else self.num_generations_eval
        options = a.estimator_options()
        rewards = self._edge_rewards(device)
        mask_g, logp_g, ent_g = self._edge_token_inputs(output, mode, options)
        if mask_g.shape[0] != rewards.shape[0]:  # pragma: no cover
            raise RuntimeError(f"edge estimators: {mask_g.shape[0]} gathered rows but {rewards.shape[0]} rewards")
        est = compute_advantages(a.advantage_estimator, rewards, mask_g, group_size=G, old_logp=logp_g,
                                 entropy=ent_g, options=options)
        B, T = output["completion_mask"].shape
        rows = slice(self.accelerator.process_index * B, (self.accelerator.process_index + 1) * B)
        if est.rescale_in_loss and mode == "train":  # the loss rescales with the current policy's entropy
            output["edge_base_advantages"] = est.base[rows]
            output["edge_group_ids"] = torch.arange(rewards.shape[0], device=device)[rows] // G
        self._edge_log(est, mask_g, G, mode)
        local = est.advantages[rows]
        output["advantages"] = (local[:, :T] if local.dim() == 2 else local).to(device)
        return output

    def _edge_log(self, est, mask, G: int, mode: str) -> None:
        """The estimator's metrics, and the advantages actually trained on in the completions table."""
        metrics = {**est.stats, **advantage_stats(est.advantages, mask, group_size=G)}
        for k, v in metrics.items():
            self._metrics[mode][f"edge/{k}"].append(float(v))
        seq_adv = sequence_advantages(est.advantages, mask)
        logged = self._logs.get("advantages") if isinstance(self._logs, dict) else None
        if logged is not None:
            for _ in range(min(len(logged), seq_adv.shape[0])):
                logged.pop()
            logged.extend(seq_adv.tolist())

    # ------------------------------------------------------------------------------------------------------
    # EDA with the current policy's entropy (docs/algorithms.md section 2)

    def _compute_loss(self, model, inputs):
        if "edge_base_advantages" in inputs:
            inputs = dict(inputs)  # the buffered batch is reused across iterations: never mutate it
            self._edge_eda_loss_inputs = inputs
            try:
                return super()._compute_loss(model, inputs)
            finally:
                self._edge_eda_loss_inputs = None
        return super()._compute_loss(model, inputs)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        target = self._edge_eda_loss_inputs
        compute_entropy = kwargs.get("compute_entropy", args[1] if len(args) > 1 else False)
        if target is not None and compute_entropy:
            self._edge_eda_loss_inputs = None  # the loss's own pass only
            target["advantages"] = self._edge_eda_current(target, entropies)
        return logps, entropies, aux

    def _edge_eda_current(self, target: dict, entropies: torch.Tensor) -> torch.Tensor:
        """``A_i * eda_scale(P)`` with ``P`` the masked mean entropy of the policy being updated (gradient
        through ``1 / P_i``, group mean detached): the micro-batch holds whole groups (see ``_edge_validate``)."""
        mask = target["completion_mask"]
        if "tool_mask" in target:
            mask = mask * target["tool_mask"]
        ids = target["edge_group_ids"]
        sizes = torch.bincount(ids - ids.min())
        if bool((sizes[sizes > 0] != self.num_generations).any()):
            raise RuntimeError("eda_entropy_source='current': a loss micro-batch holds part of a group; "
                               "see EdgeGRPOTrainer._edge_validate")
        o = self.args.estimator_options()
        p = seq_mean_entropy(entropies, mask)
        scale = eda_scale(p, group_ids=ids, eps=o.eda_eps, clamp=o.eda_clamp, valid=(mask != 0).any(-1))
        return target["edge_base_advantages"].to(scale.dtype) * scale

    # ------------------------------------------------------------------------------------------------------
    # GEC

    def _generate(self, prompts):
        result = super()._generate(prompts)
        if not (self.args.gec and self.model.training):
            return result
        return self._gec_correct(prompts, *result)

    def _gec_config(self) -> GECConfig:
        return gec_config_from(self.args)

    def _gec_correct(self, prompts, prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields,
                     images, tool_images):
        """GEC on the sampled batch through :func:`edge_kernels.gec.apply_gec` (the library's GEC, shared
        with ``edge-train``); TRL then re-scores every completion and recomputes the old log-probs (scoring
        pass) and the advantages of the corrected batch."""
        a = self.args
        cfg = self._gec_config()
        inputs = self._edge_batch_inputs
        if inputs is None or len(inputs) != len(completion_ids):  # pragma: no cover
            raise RuntimeError("GEC: the batch's dataset rows are not available")
        # Score the sampled completions. Reward functions' log_extra / log_metric calls of this extra pass are
        # dropped so the completions table stays aligned (TRL re-scores the corrected batch right after).
        saved = (copy.deepcopy(self._pending_extra_logs), copy.deepcopy(self._pending_metrics))
        rpf = GRPOTrainer._calculate_rewards(self, inputs, prompts, completions, completion_ids)
        self._pending_extra_logs.clear()
        self._pending_extra_logs.update(saved[0])
        self._pending_metrics.clear()
        self._pending_metrics.update(saved[1])
        n = len(completion_ids)
        pi = self.accelerator.process_index
        rewards = (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1)[pi * n:(pi + 1) * n]
        incorrect = (rewards < a.gec_correct_reward).tolist()

        # Every process must generate when any does (generation runs collectives under FSDP): look ahead at the
        # branches on a copy of the generator, apply_gec then draws the same ones.
        probe = torch.Generator().manual_seed(0)
        probe.set_state(self._gec_generator.get_state())
        n_regen = sum(b == "regenerate" for b in choose_branches(incorrect, probe, cfg))
        any_regen = n_regen
        if self.accelerator.num_processes > 1:
            any_regen = int(self.accelerator.gather(torch.tensor([n_regen], device=self.accelerator.device)).sum())

        tok = self._tokenizer
        eos_id = tok.eos_token_id if tok.eos_token_id is not None else self.eos_token_ids[0]
        try:
            corrected = apply_gec(
                prompt_ids, completion_ids, incorrect,
                [_field(r, a.gec_answer_column) for r in inputs], [_field(r, a.gec_solution_column) for r in inputs],
                tokenizer=tok, eos_id=eos_id, stop_ids=list(self.eos_token_ids), generate=self._gec_generate,
                generator=self._gec_generator, cfg=cfg,
            )
        except GECError as exc:
            raise ValueError(f"{exc}; the dataset columns are {a.gec_answer_column!r} / {a.gec_solution_column!r} "
                             "(gec_answer_column / gec_solution_column)") from exc
        if n_regen == 0 and any_regen > 0:
            self._gec_generate([list(prompt_ids[0])], max_new_tokens=cfg.max_new_tokens)  # collective partner

        new_ids = [c.tokens for c in corrected]
        changed = [i for i, c in enumerate(corrected) if c.branch not in (None, "none")]
        if changed:
            texts = self.processing_class.batch_decode([new_ids[i] for i in changed], skip_special_tokens=True)
            completions = list(completions)
            conv = is_conversational({"prompt": prompts[0]})
            for i, text in zip(changed, texts):
                completions[i] = [{"role": "assistant", "content": text}] if conv else text
        if a.gec_mask_injected:  # TRL's tool mask: 1 = trained on, 0 = excluded from the loss
            tool_mask = [[0 if inj else 1 for inj in c.injected] for c in corrected]
        counts = torch.tensor([sum(incorrect), *branch_counts(corrected), n], dtype=torch.float32,
                              device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.gather(counts.unsqueeze(0)).sum(0)
        total = counts[-1].clamp(min=1)
        for k, v in zip(("incorrect_frac", "regenerated_frac", "injected_frac", "replaced_frac"), counts[:-1]):
            self._metrics["train"][f"gec/{k}"].append((v / total).item())
        new_logprobs = None
        if logprobs is not None:  # vLLM: TRL's importance sampling needs the sampling log-prob of every token
            new_logprobs = _gec_sampling_logprobs(corrected, completion_ids, logprobs, self._gec_regen_logprobs)
        self._gec_regen_logprobs = None
        return prompt_ids, new_ids, tool_mask, completions, new_logprobs, extra_fields, images, tool_images

    def _gec_generate(self, prefixes, max_new_tokens, **_ignored):
        """The policy's continuations of ``prefixes`` (token lists), each cut after its first EOS; sampling
        follows the trainer's generation config (temperature, top-p/k, ...) with ``max_new_tokens``. With
        ``use_vllm=True`` through TRL's own vLLM engine (:meth:`_gec_generate_vllm`)."""
        if self.use_vllm:
            return self._gec_generate_vllm(prefixes, max_new_tokens)
        a = self.args
        pad_id = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        width = max(len(c) for c in prefixes)
        device = self.accelerator.device
        input_ids = torch.tensor([[pad_id] * (width - len(c)) + list(c) for c in prefixes], device=device)
        attention = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in prefixes], device=device)
        gen_config = copy.deepcopy(self.generation_config)
        gen_config.max_new_tokens = max_new_tokens
        summon = self._dist.summon_full_params if hasattr(self, "_dist") else None
        with (
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=a.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=a.gradient_checkpointing_kwargs,
            ) as unwrapped,
            torch.no_grad(),
            summon(self.model_wrapped, recurse=False) if summon is not None else nullcontext(),
        ):
            out = unwrapped.generate(input_ids=input_ids, attention_mask=attention, generation_config=gen_config)
        eos = set(self.eos_token_ids)
        conts = []
        for row in out[:, width:].tolist():
            cont = []
            for t in row:
                cont.append(t)
                if t in eos:
                    break
            conts.append(cont)
        return conts

    def _gec_generate_vllm(self, prefixes, max_new_tokens):
        """GEC's regeneration through TRL's own vLLM engine (colocate mode), with the trainer's sampling settings
        and ``max_new_tokens``: TRL's ``generate`` with its completion limit swapped for the call. Keeps the
        continuations' sampling log-probs (cut like the tokens) for :func:`_gec_sampling_logprobs`."""
        gen = self.vllm_generation
        saved = gen.max_completion_length
        gen.max_completion_length = int(max_new_tokens)
        try:
            _, completion_ids, logprobs, _ = gen.generate(prompts=[list(p) for p in prefixes], images=None,
                                                          num_generations=1)
        finally:
            gen.max_completion_length = saved
        eos = set(self.eos_token_ids)
        conts, lps = [], []
        for i, row in enumerate(completion_ids):
            cont = []
            for t in row:
                cont.append(int(t))
                if t in eos:
                    break
            conts.append(cont)
            lps.append([lp[0] for lp in logprobs[i][:len(cont)]] if logprobs is not None else [None] * len(cont))
        self._gec_regen_logprobs = lps
        return conts


def _gec_sampling_logprobs(corrected, completion_ids, logprobs, regen_logprobs):
    """The vLLM sampling log-probs of GEC's corrected completions, one per token, for TRL's importance-sampling
    correction: a kept prefix of the sampled completion keeps its log-probs, a regenerated continuation gets the
    regeneration's (in order, one list per ``"regenerate"`` row), text vLLM did not sample (reflection,
    injection, reference) gets ``None``, which TRL maps to NaN and then to an importance ratio of 1."""
    regen = iter(regen_logprobs or [])
    out = []
    for c, old_ids, old_lp in zip(corrected, completion_ids, logprobs):
        if c.branch in (None, "none"):
            out.append(list(old_lp))
            continue
        n_keep = 0
        while (n_keep < min(len(old_ids), len(c.tokens)) and not c.injected[n_keep]
               and c.tokens[n_keep] == old_ids[n_keep]):
            n_keep += 1
        lps = list(old_lp[:n_keep])
        lps += [None] * sum(c.injected[n_keep:])
        if c.branch == "regenerate":
            cont = next(regen)
            lps += list(cont)
        if len(lps) != len(c.tokens):  # pragma: no cover - apply_gec's layout: prefix, injected text, continuation
            raise RuntimeError(f"GEC: {len(lps)} sampling log-probs for a {len(c.tokens)}-token corrected completion")
        out.append(lps)
    return out


def _push_through_reload_weights_on_cpu(generation) -> None:
    """On vLLM's CPU build, TRL's colocate weight push (the model's ``load_weights``, one parameter at a time)
    fails on the prepacked Linear weights (``'Parameter' object has no attribute 'weight_loader'``) and would
    leave the packed copy of ``lm_head`` stale. There the push goes through the worker's ``reload_weights`` with
    TRL's own parameter iterator (names mapped, gathered one at a time), which re-runs vLLM's weight processing.
    GPU builds keep TRL's push."""
    if getattr(generation, "mode", None) != "colocate":
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return

    def sync_weights():
        if generation.enable_sleep_mode:
            generation.llm.wake_up(tags=["weights"])
            generation._llm_weights_sleeping = False
        # in-process engine (TRL's external_launcher executor): the iterator is consumed where it is made
        generation.llm.collective_rpc("reload_weights", kwargs=dict(
            weights_iterator=generation._iter_named_params(), is_checkpoint_format=True))
        generation.llm.reset_prefix_cache()

    generation.sync_weights = sync_weights


def _field(row: dict, column: str):
    value = row.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value):
        return None
    return value


def _check_arguments(config: EdgeGRPOConfig, params: dict) -> None:
    """Refuse the combinations the adapter cannot honor, from the config and GRPOTrainer's arguments."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    a = config
    if a.advantage_estimator != "grpo" and a.multi_objective_aggregation != "sum_then_normalize":
        raise ValueError(
            f"advantage_estimator={a.advantage_estimator!r} needs one scalar reward per completion: use "
            f"multi_objective_aggregation='sum_then_normalize' (got {a.multi_objective_aggregation!r})"
        )
    if a.use_edge_kernels and is_deepspeed_zero3_enabled():
        raise ValueError(
            "use_edge_kernels=True is not supported under DeepSpeed ZeRO-3: the kernel's backward reads "
            "lm_head.weight outside the module, where ZeRO-3 has partitioned it. Use ZeRO-2/FSDP, or "
            "use_edge_kernels=False (TRL's fused head re-gathers the head)."
        )
    if a.gec:
        reasons = []
        if a.use_vllm and a.vllm_mode != "colocate":
            reasons.append(f"use_vllm=True with vllm_mode={a.vllm_mode!r} (each process regenerates a different "
                           "number of completions, which TRL's server round trip cannot split back; use "
                           "vllm_mode='colocate')")
        if a.use_vllm and a.vllm_mode == "colocate" and a.vllm_tensor_parallel_size > 1:
            reasons.append(f"use_vllm=True with vllm_tensor_parallel_size={a.vllm_tensor_parallel_size} (the "
                           "tensor-parallel group gathers equal-sized batches; GEC's regenerations differ in "
                           "number per process)")
        if params.get("tools") or params.get("environment_factory") is not None:
            reasons.append("tools / environment_factory (tool masks and corrections would collide)")
        if params.get("rollout_func") is not None:
            reasons.append("rollout_func (the custom rollout owns generation)")
        if is_deepspeed_zero3_enabled() and not a.ds3_gather_for_generation:
            reasons.append("DeepSpeed ZeRO-3 with ds3_gather_for_generation=False")
        if reasons:
            raise ValueError("gec=True is not supported with " + "; ".join(reasons))


def _check_dataset_columns(config: EdgeGRPOConfig, dataset) -> None:
    if not config.gec:
        return
    needed = []
    if config.gec_p_inject > 0:
        needed.append(config.gec_answer_column)
    if config.gec_p_reference > 0:
        needed.append(config.gec_solution_column)
    datasets = dataset.values() if isinstance(dataset, dict) else [dataset]
    for ds in datasets:
        columns = getattr(ds, "column_names", None)
        if columns is None:
            continue  # an iterable dataset without declared features: checked row by row at run time
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ValueError(
                f"gec=True needs the dataset column(s) {missing} (answer injection needs "
                f"{config.gec_answer_column!r} with the final answer, reference replacement needs "
                f"{config.gec_solution_column!r} with a reference solution); the dataset has {list(columns)}. "
                "Rename your columns, set gec_answer_column / gec_solution_column, or set the matching "
                "probability to 0."
            )
