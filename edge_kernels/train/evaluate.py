"""pass@1 on held-out problems (``docs/algorithms.md`` section 7).

One sample per problem (greedy when the temperature is 0), the Qwen2.5-Math prompt through the tokenizer's
chat template, the reward of section 7; the overall score is total correct / total problems.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence

import torch

from .data import Problem, encode_prompts
from .rewards import accuracy_reward


@dataclass
class EvalResult:
    correct: int
    total: int
    responses: List[str] = field(default_factory=list, repr=False)
    per_problem: List[bool] = field(default_factory=list, repr=False)

    @property
    def pass_at_1(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def summary(self) -> str:
        return f"pass@1 = {self.correct}/{self.total} = {self.pass_at_1:.4f}"


def evaluate(engine, tokenizer, problems: Sequence[Problem], *, system_prompt: str, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, max_prompt_tokens: int = 4096,
             ) -> EvalResult:
    """pass@1 of the policy behind ``engine`` (a rollout engine) on ``problems``.

    Sampling (``temperature > 0``) draws from a torch RNG seeded with ``seed`` inside a forked RNG scope, so an
    evaluation neither depends on nor disturbs the training RNG.
    """
    if not problems:
        return EvalResult(0, 0)
    prompts = encode_prompts(tokenizer, problems, system_prompt, max_prompt_tokens)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        outs = engine.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature or 1.0,
                               top_p=top_p, greedy=temperature == 0, desc="eval")
    texts = tokenizer.batch_decode(outs, skip_special_tokens=True)
    flags = [accuracy_reward(t, p.answer) >= 1.0 for t, p in zip(texts, problems)]
    return EvalResult(sum(flags), len(problems), texts, flags)
