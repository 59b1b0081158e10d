"""edge-train: the reference end-to-end EDGE-GRPO loop (``python -m edge_kernels.train`` / ``edge-train``).

Modules: ``cli`` (the command), ``config`` (options, YAML), ``loop`` (the trainer: setup and the run), ``step``
(one RL step), ``warmup`` (supervised warm-up), ``checkpointing`` (the run's checkpoints) on ``checkpoint``
(atomic files), ``report`` (logs, metrics, summary), ``runtime`` (errors, OOM guard, seeds, timers), ``data``
(problem sets, prompts, sampler), ``rollout`` (hf, vllm), ``rewards`` (math-verify), ``batch`` (packing, scoring
pass), ``evaluate`` (greedy/sampled pass@1, pass@k), ``model`` (loading), ``embedded`` (offline tiny model +
task), ``plots``; GEC lives in :mod:`edge_kernels.gec`. Heavy imports (transformers, math-verify,
matplotlib) happen lazily.
"""


def main(argv=None) -> int:
    """The ``edge-train`` console script."""
    from .cli import main as _main

    return _main(argv)


__all__ = ["main"]
