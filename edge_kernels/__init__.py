"""edge-kernels: fused log-prob / entropy / policy-loss kernels and entropy-aware advantages for GRPO-style RL.

The public API, re-exported; nothing else lives here.
"""

from .ops.linear_logprob_entropy import linear_logprob_entropy
from .ops.logprob_entropy import logprob_entropy

__version__ = "0.1.0"

__all__ = [
    "linear_logprob_entropy",
    "logprob_entropy",
]
