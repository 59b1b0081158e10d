"""TRL's loss names mapped onto :class:`edge_kernels.losses.options.PolicyLossOptions` (names only, no math).

:func:`policy_loss_options` reads a TRL 1.16 ``GRPOConfig`` (``loss_type``, ``epsilon``/``epsilon_high``,
``importance_sampling_level``, ``beta``, ``use_bias_correction_kl``, ``top_entropy_quantile``, ``entropy_coef``,
``sapo_temperature_*``, ``vespo_*``, ``off_policy_mask_threshold``, ``vllm_importance_sampling_*``) and returns
the options under which :func:`edge_kernels.losses.policy_loss` computes TRL's ``GRPOTrainer._compute_loss``
(tests/integrations/test_trl_losses.py checks loss and gradient on a real trainer). ``loss_type``:

* ``grpo`` -> clip, ``seq-mean-token-mean``; ``bnpo`` -> clip, ``token-mean`` (the micro-batch's tokens);
  ``dr_grpo`` -> clip, ``seq-mean-token-sum-norm`` with ``max_len = max_completion_length``;
* ``dapo`` -> clip, ``cispo`` -> cispo, ``vespo`` -> vespo, each ``token-mean``: TRL divides by the token count
  of the whole accumulated generation batch (``num_items_in_batch``), which is the micro-batch's own count when
  one micro-batch holds the generation batch, as in the tests; otherwise the two differ by that constant factor;
* ``sapo`` -> sapo, ``seq-mean-token-mean``; ``luspo`` -> luspo (needs ``importance_sampling_level="sequence"``).

CISPO: TRL's weight is ``sg[min(rho, epsilon_high)]`` (an absolute cap, no lower bound), i.e. ``clip_low=1``
(lower bound 0, never active) and ``clip_high = epsilon_high - 1``. Refused, naming the option: an unknown
``loss_type``, ``delta`` (INTELLECT-2's two-sided clip, not implemented), ``use_adaptive_entropy``, an
``entropy_coef`` with an aggregation other than ``token-mean`` (TRL's bonus is a token mean whatever the loss
type), ``top_entropy_quantile < 1`` (TRL keeps the filtered tokens in the denominators and the KL) and ``luspo``
at token level (TRL only warns).
"""

from __future__ import annotations

from typing import Any, Dict

from edge_kernels.losses.options import PolicyLossOptions

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
_OBJECTIVE = {"cispo": "cispo", "sapo": "sapo", "luspo": "luspo", "vespo": "vespo"}
_AGG = {"grpo": "seq-mean-token-mean", "sapo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm"}

__all__ = ["LOSS_TYPES", "policy_loss_options"]


def policy_loss_options(args: Any) -> PolicyLossOptions:
    """The :class:`PolicyLossOptions` of TRL's loss under ``args`` (a ``GRPOConfig``); see the module docstring."""
    lt = args.loss_type
    if lt not in LOSS_TYPES:
        raise ValueError(f"loss_type={lt!r} has no edge-kernels equivalent (supported: {list(LOSS_TYPES)})")
    if getattr(args, "delta", None) is not None:
        raise ValueError("delta (INTELLECT-2's two-sided clip) has no edge-kernels equivalent")
    if getattr(args, "use_adaptive_entropy", False):
        raise ValueError("use_adaptive_entropy has no edge-kernels equivalent (the coefficient is fixed)")
    if args.top_entropy_quantile < 1.0:
        raise ValueError("top_entropy_quantile < 1: TRL zeroes the filtered tokens' policy term but keeps them in "
                         "the denominators (and in the KL); edge-kernels removes them from the loss")
    objective = _OBJECTIVE.get(lt, "clip")
    kw: Dict[str, Any] = dict(objective=objective, is_level=args.importance_sampling_level)
    if objective != "luspo":
        kw["agg"] = _AGG.get(lt, "token-mean")
    if lt == "dr_grpo":
        kw["max_len"] = int(args.max_completion_length)
    high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    if objective == "cispo":
        if not high >= 1.0:
            raise ValueError(f"epsilon_high is CISPO's absolute cap of the IS weight; it must be >= 1, got {high}")
        kw.update(clip_low=1.0, clip_high=high - 1.0)
    elif objective in ("clip", "luspo"):
        kw.update(clip_low=args.epsilon, clip_high=high)
    elif objective == "sapo":
        kw.update(sapo_tau_pos=args.sapo_temperature_pos, sapo_tau_neg=args.sapo_temperature_neg)
    else:
        kw.update(vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
                  vespo_lambda_neg=args.vespo_lambda_neg)
    if args.beta != 0.0:
        kw.update(kl_coef=args.beta, kl_type="k3", kl_bias_correction=bool(args.use_bias_correction_kl))
    if args.entropy_coef != 0.0:
        if kw.get("agg", "seq-mean-token-sum") != "token-mean":
            raise ValueError(f"entropy_coef with loss_type={lt!r}: TRL's bonus is a token mean apart from the "
                             "loss's own aggregation; edge-kernels adds it per token (equal for token-mean only)")
        kw["entropy_coef"] = args.entropy_coef
    kw["off_policy_mask_threshold"] = args.off_policy_mask_threshold
    if getattr(args, "use_vllm", False) and args.vllm_importance_sampling_correction:
        kw.update(rollout_is=args.vllm_importance_sampling_mode, rollout_is_min=args.vllm_importance_sampling_clip_min,
                  rollout_is_max=args.vllm_importance_sampling_clip_max)
    try:
        return PolicyLossOptions(**kw)
    except ValueError as e:
        raise ValueError(f"loss_type={lt!r}: {e}") from None
