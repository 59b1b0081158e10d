"""Rewards (``docs/algorithms.md`` section 7): math-verify on the last brace-matched ``\\boxed{}``.

* :func:`last_boxed` finds the last ``\\boxed{...}`` of a response and returns its content, braces matched
  (so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``).
* :func:`accuracy_reward` compares that content with the ground truth using math-verify's ``parse`` and
  ``verify`` (``\\frac{1}{2}`` equals ``0.5``); 1.0 if equivalent, else 0.0. No hand-written LaTeX comparison.
* :func:`format_reward` is 1.0 when a ``\\boxed{}`` exists; it is separate and optional (weight
  ``--format-reward``, 0 by default).
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

_BOXED = "\\boxed"


def last_boxed(text: str) -> Optional[str]:
    """Content of the last brace-matched ``\\boxed{...}`` in ``text``, or None if there is none. A last box that
    is unclosed (a response cut off mid-answer) or not followed by a brace is skipped for the one before it.
    ``\\boxed {x}`` (a space before the brace) is accepted."""
    start = text.rfind(_BOXED)
    while start != -1:
        i = start + len(_BOXED)
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                c = text[j]
                if c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j]
                j += 1
        # unclosed or not followed by a brace: look at an earlier one
        start = text.rfind(_BOXED, 0, start)
    return None


@lru_cache(maxsize=65536)
def _parse_boxed(content: str):
    from math_verify import parse

    return parse("\\boxed{" + content + "}")


@lru_cache(maxsize=65536)
def answers_match(predicted: str, truth: str) -> bool:
    """Whether the boxed contents ``predicted`` and ``truth`` are mathematically equal, per math-verify."""
    from math_verify import verify

    gold = _parse_boxed(truth)
    pred = _parse_boxed(predicted)
    if not gold or not pred:
        return predicted.strip() == truth.strip() and predicted.strip() != ""
    try:
        return bool(verify(gold, pred))
    except Exception:  # noqa: BLE001 - math-verify can raise on odd input; a reward must not crash a run
        return False


def accuracy_reward(response: str, answer: str) -> float:
    """1.0 if the response's last ``\\boxed{}`` equals ``answer`` per math-verify, else 0.0."""
    content = last_boxed(response)
    if content is None:
        return 0.0
    return 1.0 if answers_match(content, str(answer)) else 0.0


def format_reward(response: str) -> float:
    """1.0 if the response has a (closed) ``\\boxed{}``, else 0.0."""
    return 0.0 if last_boxed(response) is None else 1.0


def score_responses(responses: Sequence[str], answers: Sequence[str],
                    format_weight: float = 0.0) -> Tuple[List[float], List[bool]]:
    """``(rewards, correct)``: reward = accuracy + ``format_weight`` * format; correct = accuracy == 1."""
    rewards, correct = [], []
    for text, ans in zip(responses, answers):
        acc = accuracy_reward(text, ans)
        r = acc + (format_weight * format_reward(text) if format_weight else 0.0)
        rewards.append(r)
        correct.append(acc >= 1.0)
    return rewards, correct
