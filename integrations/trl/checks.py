"""The refusals made from the config and ``GRPOTrainer``'s arguments, before TRL builds models or vLLM."""

from __future__ import annotations

from .config import EdgeGRPOConfig


def _check_arguments(config: EdgeGRPOConfig, params: dict) -> None:
    """Refuse the combinations the adapter cannot honor, from the config and GRPOTrainer's arguments."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    a = config
    if a.advantage_estimator != "grpo" and a.multi_objective_aggregation != "sum_then_normalize":
        raise ValueError(
            f"advantage_estimator={a.advantage_estimator!r} needs one scalar reward per completion: use "
            f"multi_objective_aggregation='sum_then_normalize' (got {a.multi_objective_aggregation!r})"
        )
    if a.gec:
        reasons = []
        if a.use_vllm and a.vllm_mode != "colocate":
            reasons.append(f"use_vllm=True with vllm_mode={a.vllm_mode!r} (each process regenerates a different "
                           "number of completions, which TRL's server round trip cannot split back; use "
                           "vllm_mode='colocate')")
        if a.use_vllm and a.vllm_mode == "colocate" and a.vllm_tensor_parallel_size > 1:
            reasons.append(f"use_vllm=True with vllm_tensor_parallel_size={a.vllm_tensor_parallel_size} (the "
                           "tensor-parallel group gathers equal-sized batches; GEC's regenerations differ in "
                           "number per process)")
        if params.get("tools") or params.get("environment_factory") is not None:
            reasons.append("tools / environment_factory (tool masks and corrections would collide)")
        if params.get("rollout_func") is not None:
            reasons.append("rollout_func (the custom rollout owns generation)")
        if is_deepspeed_zero3_enabled() and not a.ds3_gather_for_generation:
            reasons.append("DeepSpeed ZeRO-3 with ds3_gather_for_generation=False")
        if reasons:
            raise ValueError("gec=True is not supported with " + "; ".join(reasons))


def _check_dataset_columns(config: EdgeGRPOConfig, dataset) -> None:
    if not config.gec:
        return
    needed = []
    if config.gec_p_inject > 0:
        needed.append(config.gec_answer_column)
    if config.gec_p_reference > 0:
        needed.append(config.gec_solution_column)
    datasets = dataset.values() if isinstance(dataset, dict) else [dataset]
    for ds in datasets:
        columns = getattr(ds, "column_names", None)
        if columns is None:
            continue  # an iterable dataset without declared features: checked row by row at run time
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ValueError(
                f"gec=True needs the dataset column(s) {missing} (answer injection needs "
                f"{config.gec_answer_column!r} with the final answer, reference replacement needs "
                f"{config.gec_solution_column!r} with a reference solution); the dataset has {list(columns)}. "
                "Rename your columns, set gec_answer_column / gec_solution_column, or set the matching "
                "probability to 0."
            )
