"""edge-kernels: fused log-prob / entropy / policy-loss kernels and entropy-aware advantages for GRPO-style RL.

The public API, re-exported; nothing else lives here.
"""

from .advantage_formulas import (
    eda_advantages,
    eda_scale,
    egpo_advantages,
    ep_grpo_token_advantages,
    group_advantage_variance,
    group_mean,
    grpo_advantages,
    masked_mean,
    nll_uncertainty,
    prog_grpo_advantages,
    seq_mean_entropy,
    zero_advantage_group_fraction,
)
from .estimators import EstimatorOptions, compute_advantages
from .losses import fused_linear_policy_loss, policy_loss
from .ops.linear_logprob_entropy import linear_logprob_entropy
from .ops.logprob_entropy import logprob_entropy
from .ops.vocab_parallel import VocabParallel

__version__ = "0.1.0"

__all__ = [
    # kernels
    "linear_logprob_entropy",
    "logprob_entropy",
    "VocabParallel",
    # losses
    "policy_loss",
    "fused_linear_policy_loss",
    # estimators (the layer trainers and adapters call) and the formulas
    "EstimatorOptions",
    "compute_advantages",
    "grpo_advantages",
    "eda_scale",
    "eda_advantages",
    "egpo_advantages",
    "prog_grpo_advantages",
    "ep_grpo_token_advantages",
    "seq_mean_entropy",
    "nll_uncertainty",
    "masked_mean",
    "group_advantage_variance",
    "group_mean",
    "zero_advantage_group_fraction",
]
