"""verl adapter: ``edge_``-prefixed policy losses and advantage estimators, and our fused kernel in verl.

Importing this module (which ``import verl`` does by itself once edge-kernels is installed, through the
``verl.plugins`` entry point) registers, with verl 0.9's calling conventions, and does nothing else:

* policy losses (``actor_rollout_ref.actor.policy_loss.loss_mode=...``), built on
  :func:`edge_kernels.losses.policy_loss` and normalised over the global batch exactly like verl's ``agg_loss``:

  - ``edge_vanilla``: token-level clipped surrogate with verl's dual clip (``clip_ratio_c``), the same loss as
    verl's ``vanilla``;
  - ``edge_gspo``: sequence-level importance ratio (GSPO); forward equal to verl's ``gspo`` (while the sequence
    log-ratio is <= 10), gradient through the masked mean as in the GSPO paper (verl uses a straight-through
    estimator), see :mod:`edge_kernels.losses`.

* advantage estimators (``algorithm.adv_estimator=...``): ``edge_grpo``, ``edge_eda``, ``edge_egpo``,
  ``edge_prog_grpo``, ``edge_ep_grpo`` (``docs/algorithms.md`` sections 1, 2, 4, 5). Their options live under
  ``algorithm.edge`` (``+algorithm.edge.eda_clamp=[0.5,2.0]``, see :data:`EDGE_OPTIONS`): the options of
  :class:`edge_kernels.estimators.EstimatorOptions`, with the names edge-train and the TRL adapter use; an
  unknown key raises. The advantages are :func:`edge_kernels.estimators.compute_advantages`'s.

verl's ``compute_advantage`` passes estimators only the rewards, the response mask and the group ids: the old
log-probs and entropies it computed are not forwarded (the legacy trainer even pops the entropies). The hook
that keeps them is the smallest possible: a wrapper of ``PPOTrainer._compute_advantage`` (v1 trainer, the
default ``trainer.use_v1=True``) that reads ``old_log_probs`` and ``entropy`` back from the TransferQueue, and a
wrapper of ``RayPPOTrainer._compute_old_log_prob`` (legacy trainer) that copies them before they are dropped.
Both hand them to our estimators through :func:`side_inputs` and do nothing for any other estimator. Importing
this module (``import verl``) installs nothing: the hooks are installed by :func:`install_hooks`, which
``EDGE_KERNELS_VERL_HOOKS=1`` in the driver's environment calls on import (verl's ``main_ppo`` runs no user code
before the trainer, so the variable is the way to ask from the command line). A trainer module verl has not
imported yet is patched right after it is (a one-shot ``sys.meta_path`` finder); a hook that cannot be installed
raises with the reason. ``edge_grpo`` needs no hook; the estimators that need the inputs raise a clear error
without them (also in ``rollout_correction.bypass_mode``, where verl computes no entropies).

Fused kernels: with ``EDGE_KERNELS_VERL_FUSED_KERNELS=1`` in the workers' environment (or
:func:`patch_verl_fused_kernels` called in them), verl's ``use_fused_kernels`` path (both
``fused_kernel_options.impl_backend=triton``, i.e. ``verl.utils.kernel.linear_cross_entropy``, and the
``torch``/``liger`` backends' ``FusedLinearForPPO``) calls :func:`edge_kernels.linear_logprob_entropy`.
Megatron tensor-parallel (vocabulary-parallel) heads run the vocabulary-parallel op with verl's contract
(partial ``d_hidden``; see :func:`edge_linear_cross_entropy`).

If the entry point is not installed (e.g. running from a source tree), ``VERL_USE_EXTERNAL_MODULES=
edge_kernels.integrations.verl`` makes verl import this module the same way.

Tested with verl 0.9.1.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.abc
import logging
import os
import sys
import threading
from typing import Any, Dict, Optional

import numpy as np
import torch

from edge_kernels.estimators import DEFAULTS as _EST_DEFAULTS
from edge_kernels.estimators import compute_advantages, needed_inputs, options_from
from edge_kernels.losses import policy_loss as _policy_loss
from edge_kernels.ops.linear_logprob_entropy import linear_logprob_entropy
from edge_kernels.ops.vocab_parallel import VocabParallel

logger = logging.getLogger(__name__)

SUPPORTED_VERL = "0.9.1"
POLICY_LOSSES = ("edge_vanilla", "edge_gspo")
ESTIMATORS = ("edge_grpo", "edge_eda", "edge_egpo", "edge_prog_grpo", "edge_ep_grpo")

#: ``algorithm.edge.*`` keys and defaults: the estimator options of :class:`edge_kernels.estimators.EstimatorOptions`
#: (the same names as edge-train's flags and ``EdgeGRPOConfig``), except that ``adv_scale`` defaults to verl's
#: ``norm_adv_by_std_in_grpo`` ("group" when True, "none" = Dr.GRPO when False).
EDGE_OPTIONS = {**dataclasses.asdict(_EST_DEFAULTS), "adv_scale": None}

__all__ = [
    "POLICY_LOSSES",
    "ESTIMATORS",
    "EDGE_OPTIONS",
    "register",
    "side_inputs",
    "stash_side_inputs",
    "needed_side_inputs",
    "install_hooks",
    "patch_verl_fused_kernels",
    "edge_linear_cross_entropy",
]


# ----------------------------------------------------------------------------------------------------------
# policy losses


def _global_factor(agg: str, mask: torch.Tensor, gbi: dict) -> tuple[str, float]:
    """The aggregation to run in :func:`edge_kernels.losses.policy_loss` and the factor that turns its local
    normalisation into verl's ``agg_loss`` normalisation over the global batch (``config.global_batch_info``)."""
    dp = int(gbi.get("dp_size") or 1)
    n_tok = float(mask.sum())
    rows = float((mask.sum(-1) > 0).sum())
    if agg in ("token-mean", "token-sum"):
        if agg == "token-sum":
            return "token-mean", n_tok * dp
        btok = gbi.get("batch_num_tokens")
        if btok is None:
            if dp > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            return "token-mean", 1.0
        return "token-mean", n_tok / float(btok) * dp
    if agg in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        gbs = gbi.get("global_batch_size")
        if gbs is None and dp > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        if agg == "seq-mean-token-sum-norm":  # ours: sum / (B * max_len); verl: sum / gbs * dp / max_len
            denom = rows if gbs is None else float(gbs)
            return agg, (mask.shape[0] / denom * dp) if denom > 0 else 0.0
        return agg, 1.0 if gbs is None else rows / float(gbs) * dp
    raise ValueError(f"Invalid loss_agg_mode: {agg}")


def _make_policy_loss(is_level: str, dual_clip: bool):
    def edge_policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                         response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                         rollout_is_weights: Optional[torch.Tensor] = None):
        if config is None:
            raise ValueError("edge policy losses need the actor config (verl passes ActorConfig as `config`)")
        clip = config.clip_ratio
        low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
        high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
        c = config.get("clip_ratio_c", 3.0) if dual_clip else None
        if c is not None and not c > 1.0:
            raise ValueError(f"clip_ratio_c must be > 1.0 for dual-clip PPO, got {c}")
        mask = response_mask.bool()
        adv = advantages
        if rollout_is_weights is not None:
            # w >= 0 scales the whole clipped term: w * max(-A r, -A clip(r)) == max(-(wA) r, -(wA) clip(r)), and
            # likewise for the dual clip; moving w into the advantage keeps the denominators verl's.
            adv = (adv * rollout_is_weights).expand_as(log_prob)
        gbi = dict(getattr(config, "global_batch_info", None) or {})
        agg, factor = _global_factor(loss_agg_mode, mask, gbi)
        lsf = gbi.get("loss_scale_factor")
        loss, m = _policy_loss(log_prob, old_log_prob, adv, mask, clip_low=low, clip_high=high, dual_clip=c,
                               is_level=is_level, agg=agg, max_len=None if lsf is None else int(lsf))
        with torch.no_grad():
            if rollout_is_weights is not None:  # clip fractions of the advantages themselves, as verl reports
                _, m = _policy_loss(log_prob.detach(), old_log_prob, advantages.expand_as(log_prob), mask,
                                    clip_low=low, clip_high=high, dual_clip=c, is_level=is_level, agg=agg)
            # verl clamps the token log-ratio to +-20 before its ppo_kl metric
            log_ratio = (log_prob - old_log_prob).detach().clamp(-20.0, 20.0)
            ppo_kl = (-log_ratio * mask).sum() / mask.sum().clamp(min=1)
            metrics = {
                "actor/pg_clipfrac": float(m["clip_frac_low"] + m["clip_frac_high"]),
                "actor/ppo_kl": float(ppo_kl),
                "actor/pg_clipfrac_lower": float(m.get("clip_frac_dual", torch.tensor(0.0))),
                "actor/edge_ratio_mean": float(m["ratio_mean"]),
                "actor/edge_approx_kl_k3": float(m["approx_kl"]),
            }
        return loss * factor, metrics

    edge_policy_loss.__name__ = f"edge_policy_loss_{is_level}"
    return edge_policy_loss


edge_vanilla_policy_loss = _make_policy_loss("token", dual_clip=True)
edge_gspo_policy_loss = _make_policy_loss("sequence", dual_clip=False)


# ----------------------------------------------------------------------------------------------------------
# side inputs (old log-probs, entropies) for the estimators

_SIDE_LOCK = threading.Lock()
_PENDING: Optional[dict] = None

_SIDE_NAMES = {"old_logp": "old_log_probs", "entropy": "entropys"}  # ours -> verl's batch keys


def needed_side_inputs(adv_estimator, config=None) -> tuple:
    """Which of ``old_log_probs`` / ``entropys`` the estimator needs (``()`` for any non-edge estimator)."""
    name = str(getattr(adv_estimator, "value", adv_estimator))
    if name not in ESTIMATORS:
        return ()
    return tuple(sorted(_SIDE_NAMES[k] for k in needed_inputs(name[len("edge_"):], _options(config))))


def stash_side_inputs(**tensors) -> None:
    """Hand ``old_log_probs`` / ``entropys`` (``[B, T]``, verl's padded response layout) to the next edge
    estimator call, which consumes them. Used by the trainer hooks; callers of the estimators may also pass them
    as keyword arguments."""
    global _PENDING
    with _SIDE_LOCK:
        _PENDING = {k: v for k, v in tensors.items() if v is not None}


class side_inputs:
    """Context manager form of :func:`stash_side_inputs` (cleared on exit)."""

    def __init__(self, **tensors):
        self.tensors = tensors

    def __enter__(self):
        stash_side_inputs(**self.tensors)
        return self

    def __exit__(self, *exc):
        global _PENDING
        with _SIDE_LOCK:
            _PENDING = None
        return False


def _take_side_inputs() -> dict:
    global _PENDING
    with _SIDE_LOCK:
        side, _PENDING = (_PENDING or {}), None
    return side


# ----------------------------------------------------------------------------------------------------------
# advantage estimators


def _options(config):
    """:class:`edge_kernels.estimators.EstimatorOptions` from ``algorithm.edge`` (an unknown key raises)."""
    edge = None
    if config is not None:
        edge = config.get("edge", None) if hasattr(config, "get") else getattr(config, "edge", None)
    opts = dict(EDGE_OPTIONS)
    if edge is not None:
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(edge, DictConfig):
                edge = OmegaConf.to_container(edge, resolve=True)
        except ImportError:  # pragma: no cover
            pass
        if not isinstance(edge, dict):
            raise ValueError(f"algorithm.edge must be a mapping of options, got {type(edge).__name__}")
        unknown = sorted(set(edge) - set(EDGE_OPTIONS))
        if unknown:
            raise ValueError(f"unknown algorithm.edge option(s) {unknown}; known: {sorted(EDGE_OPTIONS)}")
        opts.update(edge)
    if opts["adv_scale"] is None:
        norm = config.get("norm_adv_by_std_in_grpo", True) if hasattr(config, "get") else True
        opts["adv_scale"] = "group" if norm else "none"
    if opts["eda_entropy_source"] != "old":
        raise ValueError(
            "algorithm.edge.eda_entropy_source must be 'old' in verl: the entropy of the policy being updated is "
            "not available to verl's policy-loss functions (they receive no entropies)"
        )
    if opts["prog_baseline"] != "group":
        raise ValueError("algorithm.edge.prog_baseline must be 'group' in verl: verl computes no prompt log-probs")
    try:
        return options_from(opts)
    except (TypeError, ValueError) as e:
        raise ValueError(f"algorithm.edge: {e}") from None


def _group_ids(index, batch: int, device) -> torch.Tensor:
    if index is None:
        raise ValueError("edge estimators need the group index (verl's `uid` non-tensor batch column)")
    index = np.asarray(index)
    if index.shape != (batch,):
        raise ValueError(f"index has shape {index.shape}, expected ({batch},)")
    uids, inverse, counts = np.unique(index.astype(str), return_inverse=True, return_counts=True)
    if counts.min() < 2:
        raise ValueError(
            f"edge estimators are group-relative, but group {str(uids[counts.argmin()])!r} has a single response "
            "(actor_rollout_ref.rollout.n must be >= 2); verl's own 'grpo' would train on the raw score there"
        )
    return torch.as_tensor(inverse, dtype=torch.int64, device=device)


def _side(name: str, explicit: Optional[torch.Tensor], side: dict, shape, estimator: str) -> torch.Tensor:
    x = explicit if explicit is not None else side.get(name)
    if x is None:
        raise ValueError(
            f"{estimator} needs the old policy's per-token {name} ([B, T]), which verl's compute_advantage does not "
            "pass to estimators. edge_kernels.integrations.verl keeps them once its trainer hooks are installed "
            "(EDGE_KERNELS_VERL_HOOKS=1 in the driver's environment, or edge_kernels.integrations.verl."
            "install_hooks() before the trainer runs), and when old log-probs are recomputed: "
            "rollout_correction.bypass_mode computes no entropies."
        )
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{estimator}: {name} has shape {tuple(x.shape)}, expected the response mask's {tuple(shape)}")
    return x


def _make_estimator(name: str):
    def edge_estimator(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, config=None, index=None,
                       old_log_probs: Optional[torch.Tensor] = None, entropys: Optional[torch.Tensor] = None,
                       **kwargs):
        side = _take_side_inputs()
        unexpected = sorted(k for k, v in kwargs.items() if v is not None)
        if unexpected:
            raise TypeError(f"{name} does not use {unexpected}")
        opts = _options(config)
        mask = response_mask.bool()
        scores = token_level_rewards.sum(dim=-1).float()
        gid = _group_ids(index, scores.shape[0], scores.device)
        given = {"old_logp": old_log_probs, "entropy": entropys}
        inputs: Dict[str, Any] = {k: _side(_SIDE_NAMES[k], given[k], side, mask.shape, name).float()
                                  for k in needed_inputs(name[len("edge_"):], opts)}
        with torch.no_grad():
            adv = compute_advantages(name[len("edge_"):], scores, mask, group_ids=gid, options=opts,
                                     **inputs).advantages
        adv = adv[:, None] if adv.dim() == 1 else adv
        adv = (adv * response_mask).to(token_level_rewards.dtype)
        return adv, adv

    edge_estimator.__name__ = f"compute_{name}_advantage"
    return edge_estimator


_ESTIMATOR_FNS = {name: _make_estimator(name) for name in ESTIMATORS}
_LOSS_FNS = {"edge_vanilla": edge_vanilla_policy_loss, "edge_gspo": edge_gspo_policy_loss}


def register() -> None:
    """Register the ``edge_`` policy losses and advantage estimators in verl's registries (idempotent)."""
    from verl.trainer.ppo import core_algos

    for name, fn in _LOSS_FNS.items():
        core_algos.register_policy_loss(name)(fn)
    for name, fn in _ESTIMATOR_FNS.items():
        existing = core_algos.ADV_ESTIMATOR_REGISTRY.get(name)
        if existing is not None and existing is not fn and _is_ours(existing):
            core_algos.ADV_ESTIMATOR_REGISTRY[name] = fn  # this module imported again (reload / second name)
        else:
            core_algos.register_adv_est(name)(fn)  # raises if another package owns the name


def _is_ours(fn) -> bool:
    return getattr(fn, "__module__", "").endswith("integrations.verl") and fn.__name__.startswith("compute_edge_")


# ----------------------------------------------------------------------------------------------------------
# trainer hooks that keep old log-probs and entropies


def _refuse_multi_output_sessions(estimator, keys) -> None:
    """verl's v1 trainer keys rows ``{uid}_{session}_{index}``; an agent loop that returns several outputs per
    session gets, for ``grpo`` only, its group statistics from each session's final output (broadcast to the
    others). The edge estimators would count every output as a group member: refuse rather than skew."""
    seen = set()
    for key in keys:
        fields = str(key).rsplit("_", 2)
        if len(fields) != 3:
            return  # not the v1 key format: nothing to check
        session = (fields[0], fields[1])
        if session in seen:
            raise NotImplementedError(
                f"{estimator}: the agent loop returned several outputs for session {fields[0]}_{fields[1]}; the edge "
                "estimators support one output per session (verl's final-output selection applies to 'grpo' only)"
            )
        seen.add(session)


def _wrap_v1_compute_advantage(orig):
    @functools.wraps(orig)
    def _compute_advantage(self, batch, metrics):
        est = self.config.algorithm.adv_estimator
        if str(est) in ESTIMATORS:
            _refuse_multi_output_sessions(est, batch.keys)
        needs = needed_side_inputs(est, self.config.algorithm)
        if not needs:
            return orig(self, batch, metrics)
        tq = sys.modules[orig.__module__].tq
        fields = {"old_log_probs": "old_log_probs", "entropys": "entropy"}
        try:
            data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                                   select_fields=[fields[n] for n in needs] + ["response_mask"])
        except Exception as exc:
            raise ValueError(
                f"{self.config.algorithm.adv_estimator} needs {list(needs)} of the old policy, which are not in the "
                "TransferQueue (rollout_correction.bypass_mode computes no entropies)"
            ) from exc
        padded = data.to_padded_tensor()
        with side_inputs(**{n: padded[fields[n]] for n in needs}):
            return orig(self, batch, metrics)

    _OURS.add(_compute_advantage)
    return _compute_advantage


def _wrap_legacy_compute_old_log_prob(orig):
    @functools.wraps(orig)
    def _compute_old_log_prob(self, batch):
        old_log_prob, mfu = orig(self, batch)
        needs = needed_side_inputs(self.config.algorithm.adv_estimator, self.config.algorithm)
        if needs:  # verl pops "entropys" right after this returns; keep references for the estimator
            stash_side_inputs(old_log_probs=old_log_prob.batch["old_log_probs"],
                              entropys=old_log_prob.batch["entropys"])
        return old_log_prob, mfu

    _OURS.add(_compute_old_log_prob)
    return _compute_old_log_prob


# the wrappers and guards this module installed (so a second install is a no-op)
_OURS: set = set()


def hooked(fn) -> bool:
    """Whether ``fn`` is one of this module's trainer wrappers or guards."""
    return fn in _OURS


def _patch(module, cls_name: str, method: str, wrap) -> None:
    cls = getattr(module, cls_name, None)
    orig = getattr(cls, method, None)
    if cls is None or orig is None:
        raise RuntimeError(f"edge_kernels: cannot install the verl trainer hook: {module.__name__}.{cls_name}."
                           f"{method} does not exist in this verl (tested with {SUPPORTED_VERL})")
    if not hooked(orig):
        setattr(cls, method, wrap(orig))


def _patch_v1(module) -> None:
    _patch(module, "PPOTrainer", "_compute_advantage", _wrap_v1_compute_advantage)


def _patch_legacy(module) -> None:
    _patch(module, "RayPPOTrainer", "_compute_old_log_prob", _wrap_legacy_compute_old_log_prob)


_TRAINER_HOOKS = {
    "verl.trainer.ppo.v1.trainer_base": _patch_v1,
    "verl.trainer.ppo.ray_trainer": _patch_legacy,
}


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Runs ``callback(module)`` right after the module ``name`` is executed (once)."""

    def __init__(self, name: str, callback):
        self.name = name
        self.callback = callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        orig_exec = loader.exec_module
        hook = self

        def exec_module(module):
            orig_exec(module)
            if hook in sys.meta_path:
                sys.meta_path.remove(hook)
            _run_hook(hook.callback, module)

        setattr(loader, "exec_module", exec_module)
        return spec


def _run_hook(callback, module) -> None:
    # a hook that cannot be installed fails the import of that trainer module, with the reason
    callback(module)


def install_hooks() -> None:
    """Install the side-input hooks on verl's trainers (idempotent): now for the trainer modules already
    imported, else right after verl imports them. Raises ``RuntimeError`` naming what is missing when a hook
    cannot be installed (a verl whose trainer differs from the tested one)."""
    for name, patch in _TRAINER_HOOKS.items():
        module = sys.modules.get(name)
        if module is not None:
            _run_hook(patch, module)
        elif not any(isinstance(f, _PostImportHook) and f.name == name for f in sys.meta_path):
            sys.meta_path.insert(0, _PostImportHook(name, patch))


# ----------------------------------------------------------------------------------------------------------
# our kernel on verl's use_fused_kernels path


def _kernel_impl() -> str:
    return os.environ.get("EDGE_KERNELS_VERL_IMPL", "auto")


def edge_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              temperature: float = 1.0, reduction: str = "none", dist_process_group=None):
    """Drop-in for ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy``: ``(log_probs, entropy)``,
    both flat ``[N]`` (verl's layout), from ``hidden [..., D]`` and ``weight [V, D]`` at ``temperature``.

    With verl's Megatron tensor-parallel group (``dist_process_group`` of W > 1 ranks) ``weight`` is this rank's
    vocabulary slice and the call follows verl's kernel's contract: equal slices, rank r's starting at
    ``r * V_r``, global ``labels``, full-vocabulary outputs on every rank, and a PARTIAL ``d_hidden`` (verl's
    sequence-parallel reduce-scatter sums it), computed by the vocabulary-parallel op (one all-gather forward,
    no collective backward)."""
    if reduction != "none":
        raise NotImplementedError(f"edge_linear_cross_entropy supports reduction='none' only, got {reduction!r}")
    sharded = None
    if dist_process_group is not None and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size(dist_process_group) > 1:
        sharded = VocabParallel(dist_process_group, reduce_hidden_grad=False,
                                vocab_start=torch.distributed.get_rank(dist_process_group) * weight.shape[0])
    _announce_fused_kernel()
    h = hidden.reshape(-1, hidden.shape[-1])
    if h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    logp, ent = linear_logprob_entropy(h, weight, labels.reshape(-1), temperature=float(temperature),
                                       impl=_kernel_impl(), vocab_parallel=sharded)
    return logp, ent


@functools.lru_cache(maxsize=None)
def _announce_fused_kernel() -> None:
    """Say once per process that verl's fused path runs our kernel: engines that never call verl's fused path
    (veomni, automodel, use_fused_kernels=False) leave EDGE_KERNELS_VERL_FUSED_KERNELS without effect, and the
    absence of this line is how a user can tell."""
    logger.warning("edge_kernels: verl's fused LM-head path runs edge_kernels.linear_logprob_entropy "
                   "(impl=%s)", _kernel_impl())


def _edge_fused_linear_for_ppo_forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
    _announce_fused_kernel()
    h = hidden_states if hidden_states.dtype == vocab_weights.dtype else hidden_states.to(vocab_weights.dtype)
    return linear_logprob_entropy(h, vocab_weights, input_ids.to(torch.int64), temperature=float(temperature),
                                  impl=_kernel_impl())


def _refuse_soft_capped_models(patch_forward):
    """Wrap verl's ``patch_forward_with_backends``: its fused forward hands the kernel the hidden states, the LM
    head weight and the temperature only, never the model's ``final_logit_softcapping`` (Gemma 2/3), so the
    log-probs would silently be those of uncapped logits; such a model is refused with the way out."""

    @functools.wraps(patch_forward)
    def guarded(model, use_fused_kernels=False, fused_kernels_backend=None):
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        cap = getattr(config, "final_logit_softcapping", None)
        if use_fused_kernels and cap is not None:
            raise NotImplementedError(
                f"edge_kernels: {type(model).__name__} soft-caps its final logits (final_logit_softcapping={cap}), "
                "and verl's fused LM-head path passes no soft-cap to the kernel; set "
                "actor_rollout_ref.model.use_fused_kernels=False (verl then takes the model's own, capped logits)"
            )
        return patch_forward(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend)

    _OURS.add(guarded)
    return guarded


def patch_verl_fused_kernels() -> None:
    """Route verl's ``use_fused_kernels`` path to :func:`edge_kernels.linear_logprob_entropy` in this process.

    Must run in every worker process before the model is built; setting ``EDGE_KERNELS_VERL_FUSED_KERNELS=1``
    in the workers' environment does it on ``import verl``. Still enable verl's path as usual
    (``actor_rollout_ref.model.use_fused_kernels=True``). A model with a final-logit soft-cap is refused on that
    path (verl's fused forward does not pass the cap): see :func:`_refuse_soft_capped_models`.
    """
    from verl.utils.kernel import linear_cross_entropy as lce

    setattr(lce, "linear_cross_entropy", edge_linear_cross_entropy)
    # modules that bound the name at import (Megatron forward) are rebound too
    for mod_name in ("verl.models.mcore.model_forward_fused", "verl.models.mcore.model_forward_1f1b_overlap"):
        mod = sys.modules.get(mod_name)
        if mod is not None and hasattr(mod, "linear_cross_entropy"):
            setattr(mod, "linear_cross_entropy", edge_linear_cross_entropy)
    try:
        from verl.utils.experimental import torch_functional as tf

        setattr(tf.FusedLinearForPPO, "forward", _edge_fused_linear_for_ppo_forward)
    except ImportError:  # pragma: no cover
        pass
    try:
        from verl.models.transformers import monkey_patch as mp

        if not hooked(mp.patch_forward_with_backends):
            mp.patch_forward_with_backends = _refuse_soft_capped_models(mp.patch_forward_with_backends)
    except ImportError:  # pragma: no cover
        pass


def _env_flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


register()
# the two explicit opt-ins below are the only work on import beyond the registration
if _env_flag("EDGE_KERNELS_VERL_HOOKS", "0"):
    install_hooks()
if _env_flag("EDGE_KERNELS_VERL_FUSED_KERNELS", "0"):
    patch_verl_fused_kernels()
