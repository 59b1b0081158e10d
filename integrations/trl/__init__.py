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
layouts gather it per call, its gradient averaged and reduce-scattered back as FSDP2 does. Under DeepSpeed
ZeRO-3 the partitioned head is gathered for the call (see :mod:`.head`). Distributed use: ``docs/trl.md``.

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
* ``use_edge_kernels`` with a non-positive logit scale, or an MoE router auxiliary loss (a final-logit soft-cap,
  Gemma 2/3's ``final_logit_softcapping``, is passed to the kernel);
* GEC with vLLM in server mode or with tensor parallelism (colocate mode, one engine per process, is supported:
  the regeneration goes through TRL's engine), tools / environments / ``rollout_func``, vision-language
  processors, a dataset without the
  needed ``answer`` / ``solution`` columns, or DeepSpeed ZeRO-3 with ``ds3_gather_for_generation=False``.

Layout (one module per concern): :mod:`.head` (our kernel in place of TRL's fused LM head, with its FSDP2 and
DeepSpeed ZeRO-3 paths), :mod:`.config` (``EdgeGRPOConfig``), :mod:`.trainer` (``EdgeGRPOTrainer``: validation,
advantages, EDA with the current entropy), :mod:`.gec` (GEC, including the vLLM CPU weight push) and
:mod:`.checks` (the refusals made before TRL builds anything). The TRL version check runs here, before any of them
imports TRL's internals.
"""

from __future__ import annotations

import warnings
from typing import Optional

try:
    import trl
except ImportError as exc:  # pragma: no cover - exercised only without TRL
    raise ImportError(
        "edge_kernels.integrations.trl needs TRL: pip install 'edge-kernels[trl]' (trl>=1.15,<1.17)"
    ) from exc

from packaging.version import Version

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

from .config import ESTIMATORS, EdgeGRPOConfig  # noqa: E402
from .head import _unwrap_parallel, install_edge_lm_head  # noqa: E402,F401
from .trainer import EdgeGRPOTrainer  # noqa: E402

__all__ = [
    "EdgeGRPOConfig",
    "EdgeGRPOTrainer",
    "install_edge_lm_head",
    "ESTIMATORS",
    "SUPPORTED_TRL",
]
