"""The embedded default: an offline tiny model, tokenizer and task, built on the spot (no downloads).

* **Task** - synthetic arithmetic word problems ("Tom has 3 apples. He buys 4 more. ...") with a short
  reference solution ending in ``\\boxed{ANSWER}``, in the DeepScaleR layout (``problem``, ``answer``,
  ``solution``). Train and eval splits are disjoint by problem text and drawn from one seeded generator.
* **Tokenizer** - a byte-level BPE trained with the ``tokenizers`` library on the task's text (digits split
  one per token, as Qwen2's tokenizer does), wrapped as a ``PreTrainedTokenizerFast`` whose chat template
  renders the Qwen2.5-Math prompt of ``docs/algorithms.md`` section 7 in ChatML.
* **Model** - a small randomly initialised ``Qwen2ForCausalLM`` (the real models' architecture), built from a
  ``Qwen2Config``. A short supervised warm-up on the reference solutions (done by the loop) makes rewards
  non-zero before RL starts.
* **Warm-up demonstrations** - the reference solutions with endings that imitate a base model which keeps the
  answer format on short answers and forgets it on longer ones: one-step demonstrations drop the ``\\boxed{}``
  with probability ``--embedded-unboxed-frac`` in one of three phrasings (:data:`UNBOXED_ENDINGS`), so the boxed
  ending stays the greedy choice (with a single unboxed phrasing it was a coin flip, and seed 1 never boxed);
  two-step ones drop it with probability ``--embedded-two-step-unboxed-frac`` (0.65), always as
  :data:`TWO_STEP_UNBOXED_ENDING`, so there the greedy answer starts unboxed (reward 0) while a third of the
  sampled ones are boxed. RL then has two things to learn in the few minutes a CPU allows: boxing sampled
  answers (sampled pass@1) and, once boxing is the more likely ending, greedy two-step answers (greedy pass@1;
  ``docs/edge-train.md``, "The embedded default"). The task's own ``solution`` fields (GEC's reference
  replacement) all keep their box.

Everything is deterministic under the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

# ChatML as Qwen2.5 writes it: system turn, user turn, then the assistant header as the generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"

_NAMES = ["Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Max", "Zoe", "Leo", "Ella", "Jack", "Nina"]
_PRONOUN = {"Tom": "He", "Ben": "He", "Sam": "He", "Max": "He", "Leo": "He", "Jack": "He",
            "Anna": "She", "Mia": "She", "Lily": "She", "Zoe": "She", "Ella": "She", "Nina": "She"}
_ITEMS = ["apples", "pencils", "marbles", "books", "stickers", "cookies", "coins", "cards"]
_ADD_VERBS = ["buys", "finds", "gets"]
_SUB_VERBS = ["gives away", "eats", "loses"]


@dataclass(frozen=True)
class TaskConfig:
    """Difficulty of the synthetic task: operands in ``[1, max_operand]``; ``two_step_frac`` of the problems
    chain an addition and a subtraction. ``hard_frac`` of the problems are hard: two steps with operands in
    ``[1, hard_max_operand]`` (multi-digit sums with carries), where a small warmed-up model is mostly wrong and
    whole groups of rollouts get reward 0 (the advantage collapse GEC and EDA address)."""

    max_operand: int = 9
    two_step_frac: float = 0.5
    hard_frac: float = 0.0
    hard_max_operand: int = 30


def _two_step(rng: random.Random, name: str, item: str, hi: int) -> Dict[str, str]:
    he = _PRONOUN[name]
    a, b = rng.randint(1, hi), rng.randint(1, hi)
    s = a + b
    c = rng.randint(1, s)
    r = s - c
    add, sub = rng.choice(_ADD_VERBS), rng.choice(_SUB_VERBS)
    problem = (f"{name} has {a} {item}. {he} {add} {b} more and then {sub} {c}. "
               f"How many {item} does {name} have now?")
    solution = f"{a} + {b} = {s}. {s} - {c} = {r}. The answer is \\boxed{{{r}}}."
    return {"problem": problem, "answer": str(r), "solution": solution}


def make_problem(rng: random.Random, task: TaskConfig = TaskConfig()) -> Dict[str, str]:
    """One problem as a ``{"problem", "answer", "solution"}`` row."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    he = _PRONOUN[name]
    hi = task.max_operand
    if task.hard_frac > 0 and rng.random() < task.hard_frac:  # no extra draw without a hard part
        return _two_step(rng, name, item, task.hard_max_operand)
    if rng.random() < task.two_step_frac:
        return _two_step(rng, name, item, hi)
    if rng.random() < 0.5:
        a, b = rng.randint(1, hi), rng.randint(1, hi)
        r = a + b
        verb = rng.choice(_ADD_VERBS)
        problem = f"{name} has {a} {item}. {he} {verb} {b} more. How many {item} does {name} have now?"
        solution = f"{a} + {b} = {r}. The answer is \\boxed{{{r}}}."
    else:
        a = rng.randint(2, 2 * hi)
        b = rng.randint(1, a)
        r = a - b
        verb = rng.choice(_SUB_VERBS)
        problem = f"{name} has {a} {item}. {he} {verb} {b}. How many {item} does {name} have now?"
        solution = f"{a} - {b} = {r}. The answer is \\boxed{{{r}}}."
    return {"problem": problem, "answer": str(r), "solution": solution}


def make_task(seed: int, n_train: int, n_eval: int, task: TaskConfig = TaskConfig()):
    """``(train_rows, eval_rows)``: unique problems, the two splits disjoint by problem text."""
    rng = random.Random(f"edge-train-task-{seed}")
    seen: set = set()
    rows: list = []
    attempts = 0
    while len(rows) < n_train + n_eval:
        attempts += 1
        if attempts > 50 * (n_train + n_eval):
            raise ValueError(f"cannot draw {n_train + n_eval} distinct problems; raise max_operand")
        row = make_problem(rng, task)
        if row["problem"] in seen:
            continue
        seen.add(row["problem"])
        rows.append(row)
    return rows[:n_train], rows[n_train:]


# How an unboxed demonstration ends instead of " The answer is \\boxed{r}.": several phrasings whose first
# tokens differ from each other, from the boxed ending's and from GEC's "Wait!", so each holds only
# unboxed_frac / len(...) of the demonstrations at the point where the endings part. With a single unboxed
# phrasing ("The answer is r.") the box was a coin flip there at unboxed_frac 0.5, and greedy decoding after
# the warm-up tipped to one side per seed: seed 1 never boxed (eval pass@1 0.000). Now the boxed ending is the
# greedy choice for any unboxed_frac below len/(len + 1) = 0.75, while sampled rollouts (temperature 1) still
# omit the box about unboxed_frac of the time.
UNBOXED_ENDINGS = (" So we get {r}.", " Hence {r}.", " Thus {r}.")
BOXED_ENDING = " The answer is \\boxed{{{r}}}."


#: the one unboxed ending of two-step demonstrations with ``two_step_unboxed_frac`` set: a single phrasing, so
#: that above 0.5 the unboxed ending is the greedy choice on two-step problems (see :func:`warmup_demonstrations`)
TWO_STEP_UNBOXED_ENDING = UNBOXED_ENDINGS[0]


def is_two_step(solution: str) -> bool:
    """Whether a reference solution of the embedded task has two arithmetic steps (two ``=``)."""
    return solution.count(" = ") >= 2


def warmup_demonstrations(rows: Sequence[Dict[str, str]], unboxed_frac: float, seed: int,
                          two_step_unboxed_frac: Optional[float] = None) -> List[str]:
    """Demonstrations for the supervised warm-up: the reference solutions, of which a seeded ``unboxed_frac``
    end without ``\\boxed{}`` in one of :data:`UNBOXED_ENDINGS` (drawn uniformly), like a base model that
    follows the boxed-answer instruction only some of the time. The reward needs the box, so RL has a real,
    quickly learnable improvement to find on top of the arithmetic; the task's own ``solution`` fields (used by
    GEC's reference replacement) all keep their box.

    With ``two_step_unboxed_frac`` the two-step solutions (the longer ones) drop the box with that probability
    instead, always as :data:`TWO_STEP_UNBOXED_ENDING`: above 0.5 the greedy answer to a two-step problem is
    unboxed (reward 0) while a share of sampled answers is boxed, like a base model that forgets the format in
    longer answers. RL can then move greedy pass@1, not only sampled pass@1: the gap between what the policy
    samples and what it decodes greedily is what GRPO's sharpening closes."""
    rng = random.Random(f"edge-train-demos-{seed}")
    out = []
    for r in rows:
        sol = r["solution"]
        boxed = BOXED_ENDING.format(r=r["answer"])
        endings: Sequence[str]
        if two_step_unboxed_frac is not None and is_two_step(sol):
            drop, endings = rng.random() < two_step_unboxed_frac, (TWO_STEP_UNBOXED_ENDING,)
        else:
            drop, endings = rng.random() < unboxed_frac, UNBOXED_ENDINGS
        if drop:
            if not sol.endswith(boxed):
                raise ValueError(f"solution does not end with {boxed!r}: {sol!r}")
            sol = sol[:-len(boxed)] + rng.choice(endings).format(r=r["answer"])
        out.append(sol)
    return out


def tokenizer_corpus(rows: Sequence[Dict[str, str]], extra: Sequence[str] = ()) -> List[str]:
    """Text the tokenizer is trained on: rendered prompts, solutions and the GEC strings."""
    texts = [SYSTEM_PROMPT, *extra]
    for r in rows:
        texts.append(r["problem"])
        texts.append(r["solution"])
    return texts


def build_tokenizer(texts: Sequence[str], vocab_size: int = 512):
    """A byte-level BPE trained on ``texts``, wrapped with the Qwen2.5-Math chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(texts)
    # the chat markup is part of every sequence: let BPE see it too
    texts += ["<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n"]
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256


def build_model(tokenizer, cfg: ModelConfig = ModelConfig(), seed: int = 0):
    """A randomly initialised ``Qwen2ForCausalLM`` sized by ``cfg`` (fp32, tied embeddings)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model
