"""Guided Error Correction (EDGE-GRPO, docs/algorithms.md section 3), shared by edge-train and the TRL adapter.

Owns GEC's options (one set of names, defaults and one validation: :class:`GECConfig`, whose fields are the
``gec_``-prefixed options of edge-train's flags/YAML and of ``EdgeGRPOConfig``, see :func:`gec_config_from`),
the branch draw and the rewriting of the token sequences. Error messages name those options, never an engine's
flags.

For each incorrect response, independently, a seeded generator picks one branch:

* ``regenerate`` (p = 0.5): append the reflection prompt and let the policy continue from
  prompt + response + reflection (at most ``max_new_tokens`` new tokens);
* ``inject`` (p = 0.25): append the answer-injection text with the ground-truth answer in ``\\boxed{}``;
* ``reference`` (p = 0.25): replace the response with the dataset's reference solution;

or, when the probabilities sum to less than 1, leaves it as it is (``none``). The caller then re-scores every
response, recomputes rewards and advantages, and recomputes the old log-probs of all text (injected included)
with a scoring pass. Text the policy did not sample (the reflection prompt, the injected sentence, a
reference solution) is flagged per token so ``mask_injected`` can keep it out of the loss; by default it is
trained on like sampled text, as in the paper's code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

BRANCHES = ("regenerate", "inject", "reference", "none")
PREFIX = "gec_"

DEFAULT_REFLECTION = " Wait! Something is wrong here."
DEFAULT_INJECTION = ("\nWait! Something is wrong here. After verification, the correct answer is "
                     "\\boxed{ANSWER}.")


class GECError(ValueError):
    """A problem that GEC cannot correct (no answer / no reference solution), or a bad GEC option."""


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class GECConfig:
    """GEC's options; as configuration options they carry the prefix ``gec_`` (``p_inject`` -> ``gec_p_inject``)."""

    p_regenerate: float = _opt(0.5, "P(prompt-and-regenerate) for an incorrect response")
    p_inject: float = _opt(0.25, "P(answer injection)")
    p_reference: float = _opt(0.25, "P(reference-solution replacement)")
    reflection: str = _opt(DEFAULT_REFLECTION, "reflection prompt appended before the policy continues")
    injection: str = _opt(DEFAULT_INJECTION, "answer-injection text (ANSWER is replaced by the ground truth)")
    max_new_tokens: int = _opt(256, "new-token limit of prompt-and-regenerate")
    mask_injected: bool = _opt(False, "mask injected text and reference solutions out of the loss (default: "
                                      "trained on like sampled text)")

    def __post_init__(self):
        probs = (self.p_regenerate, self.p_inject, self.p_reference)
        if any(isinstance(p, bool) or not isinstance(p, (int, float)) for p in probs):
            raise GECError(f"gec_p_regenerate, gec_p_inject and gec_p_reference must be numbers, got {probs}")
        if any(p < 0 for p in probs) or sum(probs) > 1 + 1e-9:
            raise GECError("gec_p_regenerate, gec_p_inject and gec_p_reference must be >= 0 and sum to at most 1, "
                           f"got {probs}")
        if "ANSWER" not in self.injection:
            raise GECError("gec_injection must contain the placeholder ANSWER")
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise GECError(f"gec_max_new_tokens must be an int >= 1, got {n!r}")


OPTION_NAMES = tuple(PREFIX + f.name for f in dataclasses.fields(GECConfig))
DEFAULTS = GECConfig()


def option_help(name: str) -> str:
    """Help text of the option ``name`` (``gec_``-prefixed), shared by edge-train's flags and TRL's fields."""
    return GECConfig.__dataclass_fields__[name[len(PREFIX):]].metadata["help"]


def gec_config_from(source: Any, **overrides) -> GECConfig:
    """:class:`GECConfig` from an object or mapping holding (some of) the ``gec_``-prefixed options."""
    get = source.get if isinstance(source, Mapping) else (lambda k, d: getattr(source, k, d))
    missing = object()
    values = {k[len(PREFIX):]: v for k in OPTION_NAMES if (v := get(k, missing)) is not missing}
    values.update(overrides)
    return GECConfig(**values)


def choose_branches(incorrect: Sequence[bool], generator, cfg: GECConfig) -> List[Optional[str]]:
    """One branch per response: None for correct ones; for each incorrect one, a draw ``u ~ U[0, 1)`` from
    ``generator`` (a ``torch.Generator``) picks regenerate / inject / reference / none by cumulative
    probability. One draw per incorrect response, in order, so the choice is reproducible."""
    import torch

    out: List[Optional[str]] = []
    n_bad = sum(bool(x) for x in incorrect)
    draws = torch.rand(n_bad, generator=generator, dtype=torch.float64).tolist() if n_bad else []
    k = 0
    c1 = cfg.p_regenerate
    c2 = c1 + cfg.p_inject
    c3 = c2 + cfg.p_reference
    for bad in incorrect:
        if not bad:
            out.append(None)
            continue
        u = draws[k]
        k += 1
        out.append("regenerate" if u < c1 else "inject" if u < c2 else "reference" if u < c3 else "none")
    return out


@dataclass
class Corrected:
    """A response after GEC: its tokens, which of them the policy did not sample, and the branch taken."""

    tokens: List[int]
    injected: List[bool]
    branch: Optional[str]


def apply_gec(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    incorrect: Sequence[bool],
    answers: Sequence[Optional[str]],
    solutions: Sequence[Optional[str]],
    *,
    tokenizer,
    eos_id: int,
    generate: Callable[..., List[List[int]]],
    generator,
    cfg: GECConfig,
    temperature: float = 1.0,
    top_p: float = 1.0,
    problem_ids: Optional[Sequence[int]] = None,
    stop_ids: Optional[Sequence[int]] = None,
) -> List[Corrected]:
    """Correct the incorrect responses; returns one :class:`Corrected` per response (unchanged ones included).

    ``prompts[i]`` / ``responses[i]`` are token ids (a response may end with ``eos_id`` or any of ``stop_ids``, the
    tokens the rollout engine stops on); ``generate`` is a rollout engine's ``generate`` (called once, batched,
    for all regenerations). A response being corrected loses its trailing stop tokens; the corrected text ends
    with ``eos_id`` (injection, reference) or with whatever the policy generated (regeneration).
    """
    branches = choose_branches(incorrect, generator, cfg)
    eos_ids = {int(eos_id)} | {int(t) for t in (stop_ids or ())}

    def body(resp: Sequence[int]) -> List[int]:
        r = list(resp)
        while r and r[-1] in eos_ids:
            r.pop()
        return r

    def who(i: int) -> str:
        return f"problem #{problem_ids[i]}" if problem_ids is not None else f"response #{i}"

    out: List[Optional[Corrected]] = [None] * len(responses)
    regen_rows, regen_prefix = [], []
    reflection = tokenizer.encode(cfg.reflection, add_special_tokens=False) if cfg.p_regenerate > 0 else []
    for i, (resp, branch) in enumerate(zip(responses, branches)):
        if branch is None or branch == "none":
            out[i] = Corrected(list(resp), [False] * len(resp), branch)
        elif branch == "regenerate":
            b = body(resp) + reflection
            regen_rows.append(i)
            regen_prefix.append(list(prompts[i]) + b)
            out[i] = Corrected(b, [False] * (len(b) - len(reflection)) + [True] * len(reflection), branch)
        elif branch == "inject":
            ans = answers[i]
            if ans is None or not str(ans).strip():
                raise GECError(f"GEC answer injection needs the ground-truth answer of {who(i)}; it has none "
                               "(set gec_p_inject to 0, or turn GEC off)")
            text = cfg.injection.replace("ANSWER", str(ans))
            extra = tokenizer.encode(text, add_special_tokens=False) + [eos_id]
            b = body(resp)
            out[i] = Corrected(b + extra, [False] * len(b) + [True] * len(extra), branch)
        elif branch == "reference":
            sol = solutions[i]
            if sol is None or not str(sol).strip():
                raise GECError(f"GEC reference replacement needs the reference solution of {who(i)}; it has none "
                               "(map the dataset's solution field, set gec_p_reference to 0, or turn GEC off)")
            toks = tokenizer.encode(sol, add_special_tokens=False) + [eos_id]
            out[i] = Corrected(toks, [True] * len(toks), branch)
        else:  # pragma: no cover
            raise AssertionError(branch)
    if regen_rows:
        conts = generate(regen_prefix, max_new_tokens=cfg.max_new_tokens, temperature=temperature, top_p=top_p,
                         desc="gec")
        for i, cont in zip(regen_rows, conts):
            row = out[i]
            assert row is not None  # every regenerated row got its prefix above
            row.tokens.extend(cont)
            row.injected.extend([False] * len(cont))
    return out  # type: ignore[return-value]


def branch_counts(corrected: Sequence[Corrected]) -> Tuple[int, int, int]:
    """``(regenerate, inject, reference)`` counts."""
    b = [c.branch for c in corrected]
    return b.count("regenerate"), b.count("inject"), b.count("reference")
