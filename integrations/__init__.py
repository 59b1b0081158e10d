"""Drop-in adapters of edge-kernels for RL trainers.

* :mod:`edge_kernels.integrations.trl`: ``EdgeGRPOConfig`` / ``EdgeGRPOTrainer`` (subclasses of TRL's
  ``GRPOConfig`` / ``GRPOTrainer``) and ``install_edge_lm_head`` (our kernel in place of TRL's fused LM head).
* :mod:`edge_kernels.integrations.verl`: ``edge_``-prefixed policy losses and advantage estimators registered in
  verl's registries on import (loaded automatically through the ``verl.plugins`` entry point), the hook that keeps
  old log-probs and entropies for the entropy-aware estimators, and the switch routing verl's
  ``use_fused_kernels`` path to our kernel.

Each adapter imports its trainer library lazily: importing this package needs neither TRL nor verl.
"""

__all__ = ["trl", "verl"]
