"""edge-train: the reference end-to-end EDGE-GRPO loop (``python -m edge_kernels.train`` / ``edge-train``).

Modules: ``cli`` (the command), ``config`` (options, YAML), ``loop`` (the trainer), ``data`` (problem sets,
prompts, sampler), ``rollout`` (hf, vllm), ``gec`` (Guided Error Correction), ``rewards`` (math-verify),
``batch`` (packing, scoring pass), ``evaluate`` (pass@1), ``checkpoint``, ``model`` (loading), ``embedded``
(offline tiny model + task), ``plots``. Heavy imports (transformers, math-verify, matplotlib) happen lazily.
"""


def main(argv=None) -> int:
    """The ``edge-train`` console script."""
    from .cli import main as _main

    return _main(argv)


__all__ = ["main"]
