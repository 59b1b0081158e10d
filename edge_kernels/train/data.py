"""Problems in, prompts out: loading JSONL/Parquet problem sets, the chat prompt, and a resumable sampler.

A problem set is DeepScaleR-style: one record per problem with ``problem``, ``answer`` and ``solution`` fields
(other names are mapped by option). Bad rows fail loudly with the file, the row number and what is wrong.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .rewards import last_boxed


class DataError(ValueError):
    """A problem file or row that cannot be used (reported to the user without a traceback)."""


@dataclass(frozen=True)
class Problem:
    problem: str
    answer: str
    solution: Optional[str] = None


def _read_rows(path: str) -> Iterable[Tuple[int, Any]]:
    """``(row_number, record)`` pairs; row numbers are 1-based lines (JSONL) or rows (Parquet)."""
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    lower = path.lower()
    if lower.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:  # pragma: no cover - pyarrow ships with datasets
            raise DataError("reading Parquet needs pyarrow (pip install pyarrow)") from None
        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises many kinds
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        for i, rec in enumerate(table.to_pylist(), start=1):
            yield i, rec
        return
    if lower.endswith(".json"):
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        stripped = text.lstrip()
        if stripped.startswith("["):
            try:
                records = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: invalid JSON ({e})") from None
            for i, rec in enumerate(records, start=1):
                yield i, rec
            return
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


def _text(value: Any) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return value
    return None


def load_problems(path: str, *, problem_field: str = "problem", answer_field: str = "answer",
                  solution_field: str = "solution", need_solution: bool = False) -> List[Problem]:
    """Read a JSONL (or JSON list) or Parquet problem set.

    Every row needs a non-empty string ``problem_field`` and an ``answer_field`` (a string or a number). When
    the answer is missing but the solution has a ``\\boxed{}``, the answer is that box's content.
    ``need_solution`` (GEC's reference replacement) makes ``solution_field`` required too.
    """
    problems: List[Problem] = []
    for row, rec in _read_rows(path):
        where = f"{path}:{row}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: a row must be an object with fields, got {type(rec).__name__}")
        if problem_field not in rec:
            raise DataError(f"{where}: missing field {problem_field!r} (fields: {sorted(rec)}); map another "
                            "field with --problem-field")
        problem = rec[problem_field]
        if not isinstance(problem, str) or not problem.strip():
            raise DataError(f"{where}: field {problem_field!r} must be a non-empty string, got {problem!r}")
        solution = _text(rec.get(solution_field))
        if solution is not None and not solution.strip():
            solution = None
        if solution_field in rec and rec[solution_field] is not None and solution is None:
            raise DataError(f"{where}: field {solution_field!r} must be a string")
        answer = _text(rec.get(answer_field))
        if answer is not None and not answer.strip():
            answer = None
        if answer is None and solution is not None:
            answer = last_boxed(solution)
        if answer is None:
            hint = "" if answer_field in rec else f" (fields: {sorted(rec)}); map another field with --answer-field"
            raise DataError(f"{where}: missing or empty answer field {answer_field!r}{hint}; every problem "
                            "needs a ground-truth answer for the reward")
        if need_solution and solution is None:
            raise DataError(f"{where}: missing field {solution_field!r}: GEC's reference replacement needs a "
                            "reference solution; map it with --solution-field, or pass --gec-p-reference 0 "
                            "or --no-gec")
        problems.append(Problem(problem=problem, answer=answer.strip(), solution=solution))
    if not problems:
        raise DataError(f"{path}: no problems found")
    return problems


def write_problems(problems: Sequence[Problem], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for p in problems:
            fh.write(json.dumps({"problem": p.problem, "answer": p.answer, "solution": p.solution}) + "\n")
    os.replace(tmp, path)


def render_prompt(tokenizer, problem: str, system_prompt: str) -> str:
    """The Qwen2.5-Math prompt (system + user turn, generation prompt) through the tokenizer's chat template;
    a plain ``system\\n\\nproblem\\n`` layout when the tokenizer has none."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": problem}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system_prompt}\n\n{problem}\n"


def encode_prompts(tokenizer, problems: Sequence[Problem], system_prompt: str,
                   max_prompt_tokens: int) -> List[List[int]]:
    texts = [render_prompt(tokenizer, p.problem, system_prompt) for p in problems]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for i, x in enumerate(ids):
        if len(x) > max_prompt_tokens:
            raise DataError(f"problem #{i} has a {len(x)}-token prompt, over --max-prompt-tokens "
                            f"{max_prompt_tokens}: {problems[i].problem[:80]!r}...")
    return [list(x) for x in ids]


class PromptSampler:
    """Epoch-wise shuffled problem indices from a seeded generator; its position is checkpointed.

    The permutation of epoch ``e`` depends only on ``(seed, e)``, so a resumed sampler continues exactly.
    """

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise DataError("the training set is empty")
        self.n, self.seed = n, seed
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> List[int]:
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self, k: int) -> List[int]:
        out: List[int] = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch += 1
                self.pos = 0
                self._perm = self._permutation(self.epoch)
            take = min(k - len(out), self.n - self.pos)
            out.extend(self._perm[self.pos:self.pos + take])
            self.pos += take
        return out

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state.get("n") != self.n:
            raise DataError(f"the checkpoint's data position is for {state.get('n')} problems, but the data has "
                            f"{self.n}; resume with the same --data")
        self.seed = state["seed"]
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._perm = self._permutation(self.epoch)
