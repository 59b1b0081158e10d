"""TRL adapter: ``EdgeGRPOConfig`` / ``EdgeGRPOTrainer`` and our kernel in place of TRL's fused LM head.

The one-line change for a TRL user::

    from edge_kernels.integrations.trl import EdgeGRPOConfig as GRPOConfig, EdgeGRPOTrainer as GRPOTrainer

Everything ``GRPOConfig`` offers keeps its meaning (loss types, clip-higher, KL, sequence-level importance
sampling, entropy masking and bonus, vLLM, PEFT, ...); the new fields are below. With the defaults
(``advantage_estimator="grpo"``, ``use_edge_kernels=False``, ``gec_enable=False``) the trainer *is* TRL's.

Supported TRL versions: ``>=1.15,<1.17`` (tested: 1.16.0). TRL 1.15 made every log-prob pass go through a fused
LM head patched onto the model (``trl.trainer.utils.add_fused_lm_head``, called as
``model(..., labels=..., fused_lm_head=True)``); :func:`install_edge_lm_head` replaces that head with
:func:`edge_kernels.linear_logprob_entropy` (same call convention, same ``FusedCausalLMOutput``), so TRL's own
``_get_per_token_logps_and_entropies`` and ``_compute_loss`` run unchanged on top of our kernel. Older TRL has
no fused head and is refused at import.

Extension points used (all of ``trl/trainer/grpo_trainer.py``):

* ``_generate`` (GEC: rewrite incorrect completions right after sampling, before TRL scores them),
* ``_calculate_rewards`` (keep the gathered per-function rewards),
* ``_generate_and_score_completions`` (replace TRL's advantages by the chosen estimator's, per group and over
  the whole gathered generation batch, before ``_prepare_inputs`` shuffles it),
* ``_get_per_token_logps_and_entropies`` and ``_compute_loss`` (EDA with the *current* policy's entropy).

GEC is the library's own (:func:`edge_kernels.train.gec.apply_gec`, shared with ``edge-train``): branches drawn
from a seeded generator, injected text flagged per token (``gec_mask_injected`` maps it to TRL's tool mask),
corrected completions re-scored by TRL, old log-probs of all text from TRL's scoring pass.

Refused with a clear error, never silently ignored (see :func:`_check_arguments`, ``_edge_validate``):

* a non-``"grpo"`` estimator with ``multi_objective_aggregation="normalize_then_sum"`` (our estimators take one
  scalar reward per completion) or with completions that every reward function scored ``None``;
* ``prog_baseline="prompt"`` (TRL does not score prompt tokens);
* ``eda_entropy_source="current"`` with another estimator;
* ``use_edge_kernels`` with DeepSpeed ZeRO-3 (our backward does not re-gather the partitioned LM head), with a
  final-logit soft-capping model (Gemma-2 style; the kernel has no soft-cap), a non-positive logit scale, or an
  MoE router auxiliary loss;
* GEC with vLLM in server mode or with tensor parallelism (colocate mode, one engine per process, is supported:
  the regeneration goes through TRL's engine), tools / environments / ``rollout_func``, vision-language processors, a dataset without the
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

from edge_kernels import advantages as _adv
from edge_kernels.ops.linear_logprob_entropy import linear_logprob_entropy
from edge_kernels.train.gec import GECConfig, GECError, apply_gec, branch_counts, choose_branches

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
_EDA_SOURCES = ("old", "current")
_EGPO_UNCERTAINTY = ("nll", "entropy")
_EGPO_MODES = ("asymmetric", "symmetric", "lock_one")
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
    ``logit_scale * (h @ W.T + b) / temperature`` with the model config's logit scale folded into the temperature.
    The projection runs in the autocast dtype when autocast is on (fp32 with ``cast_lm_head_to_fp32``), else in the
    LM head's dtype; the kernel accumulates in fp32 either way.

    Raises:
        ValueError: the model soft-caps its final logits (no soft-cap in the kernel) or has a logit scale <= 0.
    """
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    text_config = model.config.get_text_config()
    if getattr(text_config, "final_logit_softcapping", None) is not None:
        raise ValueError(
            f"use_edge_kernels: {type(model).__name__} soft-caps its final logits (final_logit_softcapping="
            f"{text_config.final_logit_softcapping}); edge_kernels.linear_logprob_entropy has no soft-cap, so the "
            "log-probs would be wrong. Set use_edge_kernels=False (TRL's fused head supports soft-capping)."
        )
    scale = _logit_scale(text_config)
    if not scale > 0:
        raise ValueError(f"use_edge_kernels: the model's logit scale is {scale}; only a positive scale can be "
                         "folded into the temperature")
    eff_temperature = float(temperature) / scale
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
        if DTensor and isinstance(weight, DTensor):  # FSDP2: gather the sharded head once
            weight = weight.full_tensor()
            bias = bias.full_tensor() if isinstance(bias, DTensor) else bias
        if not bool(mask.any()):
            # an all-masked micro-batch: a differentiable zero, connected to the backbone and the head
            zero = (hidden.float().sum() + weight.float().sum()) * 0.0
            log_probs = zero.expand(mask.shape)
            return FusedCausalLMOutput(loss=zero, log_probs=log_probs, entropy=log_probs, label_mask=mask)
        with torch.autocast(device_type, enabled=False), maybe_gather_lm_head_ctx(weight, bias):
            logp, ent = linear_logprob_entropy(
                hidden[mask].to(dtype), weight.to(dtype), tgt[mask],
                bias=None if bias is None else bias.to(dtype), temperature=eff_temperature,
                return_entropy=True, chunk_size=chunk_size, impl=impl,
            )
        # masked_scatter keeps an all-masked micro-batch connected to the graph (a differentiable zero)
        log_probs = logp.new_zeros(mask.shape).masked_scatter(mask, logp)
        entropy = ent.new_zeros(mask.shape).masked_scatter(mask, ent)
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / denom, log_probs=log_probs, entropy=entropy,
                                   label_mask=mask)

    model.forward = types.MethodType(_edge_fused_forward, model)
    model._edge_kernels_lm_head = True


# ----------------------------------------------------------------------------------------------------------
# config


@dataclass
class EdgeGRPOConfig(GRPOConfig):
    """TRL's ``GRPOConfig`` plus the entropy-aware estimators, GEC and the fused kernel switch.

    Formulas and defaults: ``algorithms.md`` (EDA section 2, GEC section 3, EGPO section 4, ProGRPO / EP-GRPO
    section 5, the latter two being this library's reading of papers without code).
    """

    advantage_estimator: str = field(default="grpo", metadata={
        "help": "'grpo' (TRL's own advantages, untouched), 'eda' (EDGE-GRPO entropy-driven advantage), 'egpo' "
                "(EGPO calibration + NSR), 'prog_grpo' (ProGRPO re-weighting) or 'ep_grpo' (EP-GRPO token-level)."})
    advantage_eps: float = field(default=1e-6, metadata={
        "help": "eps of the GRPO std normalisation inside the edge estimators (TRL's 'grpo' keeps its 1e-4)."})
    correct_threshold: float = field(default=0.0, metadata={
        "help": "A completion is correct when its (weighted) reward is > this (EGPO, ProGRPO, EP-GRPO)."})
    eda_entropy_source: str = field(default="old", metadata={
        "help": "'old': P_i from the scoring pass (detached); 'current': from the policy being updated, with "
                "gradient through 1/P_i (the group mean comes from the scoring pass, detached)."})
    eda_clamp: Optional[list[float]] = field(default=None, metadata={
        "help": "Optional [s_min, s_max] clamp of the EDA scale mean_g(P)/P_i (off by default)."})
    eda_eps: float = field(default=1e-6, metadata={"help": "eps in mean_g(P) / (P_i + eps)."})
    egpo_uncertainty: str = field(default="nll", metadata={
        "help": "'nll': U_i = mean_t[-log p_old]; 'entropy': U_i = mean_t[H] of the scoring pass."})
    egpo_w_min: float = field(default=0.5, metadata={"help": "EGPO lower weight bound (authors' runs: 0.8)."})
    egpo_w_max: float = field(default=2.0, metadata={"help": "EGPO upper weight bound."})
    egpo_mode: str = field(default="asymmetric", metadata={"help": "'asymmetric', 'symmetric' or 'lock_one'."})
    egpo_renorm: bool = field(default=False, metadata={"help": "Divide the weights by their group mean."})
    egpo_nsr_value: float = field(default=-1.0, metadata={
        "help": "Base advantage (< 0) of every row of an entirely incorrect group (negative-sample reinforcement)."})
    egpo_eps: float = field(default=1e-6, metadata={"help": "eps in mean_g(U) / (U_i + eps)."})
    prog_alpha: float = field(default=0.3, metadata={"help": "ProGRPO re-weighting strength alpha."})
    prog_low_frac: float = field(default=0.2, metadata={"help": "ProGRPO: fraction of lowest-log-prob tokens."})
    prog_baseline: str = field(default="group", metadata={
        "help": "ProGRPO baseline; only 'group' is available in TRL (it does not score prompt tokens)."})
    ep_g_min: float = field(default=0.5, metadata={"help": "EP-GRPO entropy gate lower bound."})
    ep_g_max: float = field(default=2.0, metadata={"help": "EP-GRPO entropy gate upper bound."})
    ep_num_buckets: int = field(default=10, metadata={"help": "EP-GRPO progress buckets K."})
    ep_lambda: float = field(default=0.1, metadata={"help": "EP-GRPO progress-signal scale lambda."})
    ep_eps: float = field(default=1e-6, metadata={"help": "EP-GRPO eps."})
    gec_enable: bool = field(default=False, metadata={
        "help": "EDGE-GRPO Guided Error Correction on incorrect completions (training only)."})
    gec_regenerate_prob: float = field(default=0.5, metadata={"help": "P(prompt-and-regenerate)."})
    gec_inject_prob: float = field(default=0.25, metadata={"help": "P(answer injection)."})
    gec_replace_prob: float = field(default=0.25, metadata={"help": "P(reference-solution replacement)."})
    gec_reflection_prompt: str = field(default=" Wait! Something is wrong here.", metadata={
        "help": "Appended to an incorrect completion before the policy continues it."})
    gec_injection_template: str = field(default=(
        "\nWait! Something is wrong here. After verification, the correct answer is \\boxed{ANSWER}."),
        metadata={"help": "Appended by answer injection; 'ANSWER' is replaced by the ground-truth answer."})
    gec_max_new_tokens: int = field(default=256, metadata={"help": "New-token limit of prompt-and-regenerate."})
    gec_mask_injected: bool = field(default=False, metadata={
        "help": "Mask injected text and reference solutions out of the loss (default: trained on like sampled text)."})
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
        _choice("eda_entropy_source", self.eda_entropy_source, _EDA_SOURCES)
        _choice("egpo_uncertainty", self.egpo_uncertainty, _EGPO_UNCERTAINTY)
        _choice("egpo_mode", self.egpo_mode, _EGPO_MODES)
        _choice("edge_kernels_impl", self.edge_kernels_impl, ("auto", "triton", "torch"))
        if self.prog_baseline != "group":
            raise ValueError(
                f"prog_baseline={self.prog_baseline!r} is not available in the TRL adapter: the 'prompt' baseline "
                "needs the prompt tokens' log-probs, which TRL never computes. Use prog_baseline='group'."
            )
        if self.eda_entropy_source == "current" and self.advantage_estimator != "eda":
            raise ValueError("eda_entropy_source='current' applies to advantage_estimator='eda' only, got "
                             f"advantage_estimator={self.advantage_estimator!r}")
        if self.eda_clamp is not None:
            if len(self.eda_clamp) != 2 or not 0 <= self.eda_clamp[0] <= self.eda_clamp[1]:
                raise ValueError(f"eda_clamp must be [s_min, s_max] with 0 <= s_min <= s_max, got {self.eda_clamp}")
            self.eda_clamp = [float(x) for x in self.eda_clamp]
        probs = (self.gec_regenerate_prob, self.gec_inject_prob, self.gec_replace_prob)
        if any(p < 0 for p in probs) or sum(probs) > 1 + 1e-9:
            raise ValueError(f"the GEC probabilities must be >= 0 and sum to <= 1, got {probs}")
        if self.gec_max_new_tokens < 1:
            raise ValueError(f"gec_max_new_tokens must be >= 1, got {self.gec_max_new_tokens}")
        if "ANSWER" not in self.gec_injection_template:
            raise ValueError("gec_injection_template must contain the placeholder ANSWER")
        if self.edge_kernels_chunk_size is not None and self.edge_kernels_chunk_size < 1:
            raise ValueError(f"edge_kernels_chunk_size must be >= 1, got {self.edge_kernels_chunk_size}")


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
        if a.gec_enable and getattr(self, "_is_vlm", False):
            raise ValueError("gec_enable=True is not supported with a vision-language processor (text-only "
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

    def _edge_advantages(self, output: dict) -> dict:
        a = self.args
        mode = "train" if self.model.training else "eval"
        est = a.advantage_estimator
        device = output["completion_ids"].device
        G = self.num_generations if mode == "train" else self.num_generations_eval
        rpf = self._edge_rewards_per_func
        if rpf is None:  # pragma: no cover - TRL always scores
            raise RuntimeError("edge estimators: TRL did not call _calculate_rewards")
        unscorable = torch.isnan(rpf).all(dim=1)
        if bool(unscorable.any()):
            raise ValueError(
                f"advantage_estimator={est!r}: every reward function returned None for {int(unscorable.sum())} "
                "completion(s); the edge estimators need a reward for every completion (TRL's 'grpo' drops them)"
            )
        rewards = (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1).float().to(device)

        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        B, T = mask.shape
        need_entropy = est in ("eda", "ep_grpo") or (est == "egpo" and a.egpo_uncertainty == "entropy")
        logp = output.get("old_per_token_logps")
        ent = None
        if need_entropy or logp is None:
            logp_s, ent = self._edge_scoring_pass(output, mode)
            logp = logp_s if logp is None else logp
        mask_g = self._gather_tokens(mask.float()).bool()
        logp_g = self._gather_tokens(logp.float())
        ent_g = self._gather_tokens(ent) if ent is not None else None
        if mask_g.shape[0] != rewards.shape[0]:  # pragma: no cover
            raise RuntimeError(f"edge estimators: {mask_g.shape[0]} gathered rows but {rewards.shape[0]} rewards")

        base = _adv.grpo_advantages(rewards, group_size=G, scale=self.scale_rewards, eps=a.advantage_eps)
        metrics = {}
        if est == "eda":
            p = _adv.seq_mean_entropy(ent_g, mask_g)
            valid = (mask_g != 0).any(-1)  # completions with no token left are left out of the group means
            clamp = None if a.eda_clamp is None else tuple(a.eda_clamp)
            adv = _adv.eda_advantages(base, p, group_size=G, eps=a.eda_eps, clamp=clamp, valid=valid)
            group_mean = _adv.group_mean(p.clamp_min(0), group_size=G, valid=valid)
            scale = _adv.eda_advantages(torch.ones_like(p), p, group_size=G, eps=a.eda_eps, clamp=clamp,
                                        valid=valid)
            metrics["edge/eda_scale_mean"] = scale.mean().item()
            metrics["edge/seq_entropy_mean"] = p.mean().item()
            if a.eda_entropy_source == "current":
                pi = self.accelerator.process_index
                rows = slice(pi * B, (pi + 1) * B)
                output["edge_base_advantages"] = base[rows]
                output["edge_eda_group_mean"] = group_mean[rows]
        elif est == "egpo":
            u = (_adv.nll_uncertainty(logp_g, mask_g) if a.egpo_uncertainty == "nll"
                 else _adv.seq_mean_entropy(ent_g, mask_g))
            adv = _adv.egpo_advantages(rewards, u, group_size=G, w_min=a.egpo_w_min, w_max=a.egpo_w_max,
                                       mode=a.egpo_mode, renorm=a.egpo_renorm, nsr_value=a.egpo_nsr_value,
                                       eps=a.egpo_eps, scale=self.scale_rewards, correct_threshold=a.correct_threshold,
                                       valid=(mask_g != 0).any(-1))
            metrics["edge/seq_uncertainty_mean"] = u.mean().item()
        elif est == "prog_grpo":
            adv = _adv.prog_grpo_advantages(base, logp_g, mask_g, rewards, group_size=G, alpha=a.prog_alpha,
                                            low_frac=a.prog_low_frac, baseline="group",
                                            correct_threshold=a.correct_threshold)
        elif est == "ep_grpo":
            adv = _adv.ep_grpo_token_advantages(base, ent_g, mask_g, rewards, group_size=G, g_min=a.ep_g_min,
                                                g_max=a.ep_g_max, num_buckets=a.ep_num_buckets, lam=a.ep_lambda,
                                                eps=a.ep_eps, correct_threshold=a.correct_threshold)
        else:  # pragma: no cover - validated in the config
            raise ValueError(est)

        seq_adv = adv if adv.dim() == 1 else _adv.masked_mean(adv, mask_g)
        metrics["edge/adv_group_var"] = _adv.group_advantage_variance(seq_adv, group_size=G).item()
        metrics["edge/zero_adv_group_frac"] = _adv.zero_advantage_group_fraction(seq_adv, group_size=G).item()
        for k, v in metrics.items():
            self._metrics[mode][k].append(v)
        # the completions table shows the advantages actually trained on
        logged = self._logs.get("advantages") if isinstance(self._logs, dict) else None
        if logged is not None:
            for _ in range(min(len(logged), seq_adv.shape[0])):
                logged.pop()
            logged.extend(seq_adv.tolist())

        pi = self.accelerator.process_index
        local = adv[pi * B:(pi + 1) * B]
        if local.dim() == 2:
            local = local[:, :T]
        output["advantages"] = local.to(device)
        return output

    # ------------------------------------------------------------------------------------------------------
    # EDA with the current policy's entropy

    def _compute_loss(self, model, inputs):
        if self.args.eda_entropy_source == "current" and "edge_base_advantages" in inputs:
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
            mask = target["completion_mask"]
            if "tool_mask" in target:
                mask = mask * target["tool_mask"]
            p = _adv.seq_mean_entropy(entropies, mask).clamp_min(0)  # gradient flows through 1 / P_i
            group_mean = target["edge_eda_group_mean"]
            # as eda_advantages: a group with mean 0 keeps scale 1, a row without tokens keeps scale 1
            scale = torch.where(group_mean > 0, group_mean / (p + self.args.eda_eps), torch.ones_like(p))
            if self.args.eda_clamp is not None:
                scale = scale.clamp(*self.args.eda_clamp)
            scale = torch.where((mask != 0).any(-1), scale, torch.ones_like(scale))
            target["advantages"] = target["edge_base_advantages"].to(scale.dtype) * scale
        return logps, entropies, aux

    # ------------------------------------------------------------------------------------------------------
    # GEC

    def _generate(self, prompts):
        result = super()._generate(prompts)
        if not (self.args.gec_enable and self.model.training):
            return result
        return self._gec_correct(prompts, *result)

    def _gec_config(self) -> GECConfig:
        a = self.args
        return GECConfig(p_regenerate=a.gec_regenerate_prob, p_inject=a.gec_inject_prob,
                         p_reference=a.gec_replace_prob, reflection=a.gec_reflection_prompt,
                         injection=a.gec_injection_template, max_new_tokens=a.gec_max_new_tokens,
                         mask_injected=a.gec_mask_injected)

    def _gec_correct(self, prompts, prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields,
                     images, tool_images):
        """GEC on the sampled batch through :func:`edge_kernels.train.gec.apply_gec` (the library's GEC, shared
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
            raise ValueError(
                f"GEC: {exc}. In the TRL adapter: fill the {a.gec_answer_column!r} / {a.gec_solution_column!r} "
                "columns, or set gec_inject_prob / gec_replace_prob to 0."
            ) from exc
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
    if a.gec_enable:
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
            raise ValueError("gec_enable=True is not supported with " + "; ".join(reasons))


def _check_dataset_columns(config: EdgeGRPOConfig, dataset) -> None:
    if not config.gec_enable:
        return
    needed = []
    if config.gec_inject_prob > 0:
        needed.append(config.gec_answer_column)
    if config.gec_replace_prob > 0:
        needed.append(config.gec_solution_column)
    datasets = dataset.values() if isinstance(dataset, dict) else [dataset]
    for ds in datasets:
        columns = getattr(ds, "column_names", None)
        if columns is None:
            continue  # an iterable dataset without declared features: checked row by row at run time
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ValueError(
                f"gec_enable=True needs the dataset column(s) {missing} (answer injection needs "
                f"{config.gec_answer_column!r} with the final answer, reference replacement needs "
                f"{config.gec_solution_column!r} with a reference solution); the dataset has {list(columns)}. "
                "Rename your columns, set gec_answer_column / gec_solution_column, or set the matching "
                "probability to 0."
            )
