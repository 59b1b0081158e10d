"""Held-out evaluation (``docs/algorithms.md`` section 7): greedy pass@1, sampled pass@1 and pass@k.

* **greedy pass@1** - one greedy response per problem; total correct / total problems.
* **sampled pass@1** - ``n`` responses per problem at the rollout temperature; the mean over problems of
  ``c_i / n`` (``c_i`` correct of ``n``), the unbiased pass@1 estimator. This is what RL optimizes: the
  probability that one sample from the policy is right.
* **pass@k** - the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code",
  arXiv:2107.03374, eq. 1): per problem ``1 - C(n - c, k) / C(n, k)``, averaged over problems; with ``k = n``
  it is the share of problems with at least one correct sample.

The Qwen2.5-Math prompt goes through the tokenizer's chat template; the reward is section 7's accuracy reward.
Sampling draws from a torch RNG seeded with ``seed`` in a forked RNG scope, so an evaluation neither depends on
nor disturbs the training RNG.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import comb
from typing import Dict, List, Optional, Sequence

import torch

from .data import Problem, encode_prompts
from .rewards import accuracy_reward


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one problem from ``n`` samples of which ``c`` are correct (Chen et al. 2021, eq. 1):
    ``1 - C(n - c, k) / C(n, k)``, the probability that ``k`` of the ``n`` samples drawn without replacement hold
    at least one correct one."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


@dataclass
class EvalResult:
    """One-sample evaluation (``correct`` of ``total``; greedy at temperature 0)."""

    correct: int
    total: int
    responses: List[str] = field(default_factory=list, repr=False)
    per_problem: List[bool] = field(default_factory=list, repr=False)

    @property
    def pass_at_1(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def summary(self) -> str:
        return f"pass@1 = {self.correct}/{self.total} = {self.pass_at_1:.4f}"


@dataclass
class SampledResult:
    """``n`` samples per problem: ``counts[i]`` of them correct on problem ``i``."""

    n: int
    counts: List[int]

    @property
    def total(self) -> int:
        return len(self.counts)

    @property
    def pass_at_1(self) -> float:
        return sum(self.counts) / (self.n * len(self.counts)) if self.counts else 0.0

    def pass_at(self, k: int) -> float:
        if not self.counts:
            return 0.0
        return sum(pass_at_k(self.n, c, k) for c in self.counts) / len(self.counts)


def _generate(engine, prompts, *, seed: int, max_new_tokens: int, temperature: float, top_p: float,
              greedy: bool, desc: str) -> List[List[int]]:
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return engine.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature or 1.0,
                               top_p=top_p, greedy=greedy, desc=desc)


def evaluate(engine, tokenizer, problems: Sequence[Problem], *, system_prompt: str, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, max_prompt_tokens: int = 4096,
             ) -> EvalResult:
    """pass@1 of the policy behind ``engine`` (a rollout engine) on ``problems``: one response per problem,
    greedy when ``temperature`` is 0."""
    if not problems:
        return EvalResult(0, 0)
    prompts = encode_prompts(tokenizer, problems, system_prompt, max_prompt_tokens)
    outs = _generate(engine, prompts, seed=seed, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_p=top_p, greedy=temperature == 0, desc="eval")
    texts = tokenizer.batch_decode(outs, skip_special_tokens=True)
    flags = [accuracy_reward(t, p.answer) >= 1.0 for t, p in zip(texts, problems)]
    return EvalResult(sum(flags), len(problems), texts, flags)


def evaluate_sampled(engine, tokenizer, problems: Sequence[Problem], *, n: int, system_prompt: str,
                     max_new_tokens: int, temperature: float, top_p: float = 1.0, seed: int = 0,
                     max_prompt_tokens: int = 4096) -> SampledResult:
    """``n`` responses per problem sampled at ``temperature`` (> 0): per-problem correct counts."""
    if n < 1 or not temperature > 0:
        raise ValueError(f"evaluate_sampled needs n >= 1 and temperature > 0; got n={n}, temperature={temperature}")
    if not problems:
        return SampledResult(n, [])
    prompts = encode_prompts(tokenizer, problems, system_prompt, max_prompt_tokens)
    outs = _generate(engine, [p for p in prompts for _ in range(n)], seed=seed, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_p=top_p, greedy=False, desc="eval (sampled)")
    texts = tokenizer.batch_decode(outs, skip_special_tokens=True)
    ok = [accuracy_reward(t, problems[i // n].answer) >= 1.0 for i, t in enumerate(texts)]
    return SampledResult(n, [sum(ok[i * n:(i + 1) * n]) for i in range(len(problems))])


def eval_record(greedy: Optional[EvalResult], sampled: Optional[SampledResult], k: int) -> Dict[str, float]:
    """The summary/metrics fields of one evaluation point: greedy pass@1 (with its counts, under the names
    earlier versions wrote), sampled pass@1 and pass@k."""
    rec: Dict[str, float] = {}
    if greedy is not None:
        rec.update(correct=greedy.correct, total=greedy.total, pass_at_1=greedy.pass_at_1,
                   greedy_pass_at_1=greedy.pass_at_1)
    if sampled is not None:
        rec.update(sampled_pass_at_1=sampled.pass_at_1, samples=sampled.n, k=k, pass_at_k=sampled.pass_at(k))
    return rec
