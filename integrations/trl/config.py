"""``EdgeGRPOConfig``: TRL's ``GRPOConfig`` plus the estimator, GEC and kernel options (names, defaults and
validation are the library's: :class:`edge_kernels.estimators.EstimatorOptions`, :class:`edge_kernels.gec.GECConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from trl import GRPOConfig

from edge_kernels.estimators import DEFAULTS as _EST_DEFAULTS
from edge_kernels.estimators import EstimatorOptions, option_help, options_from
from edge_kernels.gec import DEFAULTS as _GEC_DEFAULTS
from edge_kernels.gec import gec_config_from
from edge_kernels.gec import option_help as gec_option_help

ESTIMATORS = ("grpo", "eda", "egpo", "prog_grpo", "ep_grpo")


def _est_field(name: str):
    """An estimator option of :class:`edge_kernels.estimators.EstimatorOptions` (its default and help)."""
    return field(default=getattr(_EST_DEFAULTS, name), metadata={"help": option_help(name)})


def _gec_field(name: str):
    """A GEC option of :class:`edge_kernels.gec.GECConfig` (its default and help)."""
    return field(default=getattr(_GEC_DEFAULTS, name[len("gec_"):]), metadata={"help": gec_option_help(name)})


@dataclass
class EdgeGRPOConfig(GRPOConfig):
    """TRL's ``GRPOConfig`` plus the entropy-aware estimators, GEC and the fused kernel switch.

    Formulas: ``docs/algorithms.md`` (EDA section 2, GEC section 3, EGPO section 4, ProGRPO / EP-GRPO
    section 5, the latter two being this library's reading of papers without code).
    """

    advantage_estimator: str = field(default="grpo", metadata={
        "help": "'grpo' (TRL's own advantages, untouched), 'eda' (EDGE-GRPO entropy-driven advantage), 'egpo' "
                "(EGPO calibration + NSR), 'prog_grpo' (ProGRPO re-weighting) or 'ep_grpo' (EP-GRPO token-level)."})
    adv_eps: float = _est_field("adv_eps")
    correct_threshold: float = _est_field("correct_threshold")
    eda_entropy_source: str = _est_field("eda_entropy_source")
    eda_clamp: Optional[list[float]] = _est_field("eda_clamp")
    eda_eps: float = _est_field("eda_eps")
    egpo_uncertainty: str = _est_field("egpo_uncertainty")
    egpo_w_min: float = _est_field("egpo_w_min")
    egpo_w_max: float = _est_field("egpo_w_max")
    egpo_mode: str = _est_field("egpo_mode")
    egpo_renorm: bool = _est_field("egpo_renorm")
    egpo_nsr_value: float = _est_field("egpo_nsr_value")
    egpo_eps: float = _est_field("egpo_eps")
    prog_alpha: float = _est_field("prog_alpha")
    prog_low_frac: float = _est_field("prog_low_frac")
    prog_baseline: str = _est_field("prog_baseline")
    ep_g_min: float = _est_field("ep_g_min")
    ep_g_max: float = _est_field("ep_g_max")
    ep_num_buckets: int = _est_field("ep_num_buckets")
    ep_lambda: float = _est_field("ep_lambda")
    ep_eps: float = _est_field("ep_eps")
    gec: bool = field(default=False, metadata={
        "help": "EDGE-GRPO Guided Error Correction on incorrect completions (training only)."})
    gec_p_regenerate: float = _gec_field("gec_p_regenerate")
    gec_p_inject: float = _gec_field("gec_p_inject")
    gec_p_reference: float = _gec_field("gec_p_reference")
    gec_reflection: str = _gec_field("gec_reflection")
    gec_injection: str = _gec_field("gec_injection")
    gec_max_new_tokens: int = _gec_field("gec_max_new_tokens")
    gec_mask_injected: bool = _gec_field("gec_mask_injected")
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
        _choice("edge_kernels_impl", self.edge_kernels_impl, ("auto", "triton", "torch"))
        if self.prog_baseline != "group":
            raise ValueError(
                f"prog_baseline={self.prog_baseline!r} is not available in the TRL adapter: the 'prompt' baseline "
                "needs the prompt tokens' log-probs, which TRL never computes. Use prog_baseline='group'."
            )
        options = self.estimator_options()  # the one validation of every estimator option
        self.eda_clamp = None if options.eda_clamp is None else list(options.eda_clamp)
        gec_config_from(self)  # the one validation of every GEC option
        if self.edge_kernels_chunk_size is not None and self.edge_kernels_chunk_size < 1:
            raise ValueError(f"edge_kernels_chunk_size must be >= 1, got {self.edge_kernels_chunk_size}")

    def estimator_options(self) -> EstimatorOptions:
        """The estimator options (names as in edge-train and verl); the GRPO scale is TRL's ``scale_rewards``."""
        scale = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        return options_from(self, adv_scale=scale).check_for(self.advantage_estimator)


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

