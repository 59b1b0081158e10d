"""Policy losses: the objectives on ``[B, T]`` log-probs (:mod:`.objectives`) and the fused hidden-states-in
loss (:mod:`.fused`, with its three-matmul path in :mod:`.three_matmul`)."""

from .fused import fused_linear_policy_loss
from .objectives import AGG_MODES, EDA_MODES, IS_LEVELS, KL_TYPES, aggregate, policy_loss

__all__ = ["policy_loss", "fused_linear_policy_loss", "aggregate", "AGG_MODES", "KL_TYPES", "IS_LEVELS",
           "EDA_MODES"]
