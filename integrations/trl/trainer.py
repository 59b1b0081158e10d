"""``EdgeGRPOTrainer``: TRL's ``GRPOTrainer`` with the library's advantage estimators, GEC and fused head.

Hooks (all of ``trl/trainer/grpo_trainer.py``): ``_calculate_rewards`` (keep the gathered per-function rewards),
``_generate_and_score_completions`` (the estimator's advantages over the whole gathered generation batch),
``_compute_loss`` / ``_get_per_token_logps_and_entropies`` (EDA with the current policy's entropy); GEC's
``_generate`` comes from :class:`.gec.GECMixin`.
"""

from __future__ import annotations

import inspect

import torch
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from edge_kernels import eda_scale, seq_mean_entropy
from edge_kernels.estimators import (
    EstimatorOptions,
    advantage_stats,
    compute_advantages,
    needed_inputs,
    sequence_advantages,
)

from .checks import _check_arguments, _check_dataset_columns
from .config import EdgeGRPOConfig
from .gec import GECMixin, _push_through_reload_weights_on_cpu
from .head import _unwrap_parallel, install_edge_lm_head

# Inputs of the policy forward that TRL keeps in the batch for multimodal models (see GRPOTrainer._compute_loss).
_FORWARD_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                 "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


class EdgeGRPOTrainer(GECMixin, GRPOTrainer):
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

