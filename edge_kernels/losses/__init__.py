"""Policy losses: the options (:mod:`.options`, one frozen :class:`PolicyLossOptions`), the objectives on
``[B, T]`` log-probs (:mod:`.objectives`) and the fused hidden-states-in loss (:mod:`.fused`, with its
three-matmul path in :mod:`.three_matmul`)."""

from .fused import GRADIENT_STRATEGIES, fused_linear_policy_loss
from .objectives import aggregate, policy_loss
from .options import AGG_MODES, EDA_MODES, IS_LEVELS, KL_TYPES, OBJECTIVES, ROLLOUT_IS_MODES, PolicyLossOptions

__all__ = ["policy_loss", "fused_linear_policy_loss", "aggregate", "PolicyLossOptions", "AGG_MODES", "KL_TYPES",
           "IS_LEVELS", "EDA_MODES", "OBJECTIVES", "ROLLOUT_IS_MODES", "GRADIENT_STRATEGIES"]
