"""The embedded default's task, tokenizer and model."""

import torch

from edge_kernels.train import embedded as E
from edge_kernels.train.rewards import accuracy_reward, last_boxed


def test_task_is_deterministic_disjoint_and_self_consistent():
    tr, ev = E.make_task(0, 300, 50)
    tr2, ev2 = E.make_task(0, 300, 50)
    assert tr == tr2 and ev == ev2
    assert E.make_task(1, 300, 50)[0] != tr
    assert not {r["problem"] for r in tr} & {r["problem"] for r in ev}
    for r in tr + ev:
        assert last_boxed(r["solution"]) == r["answer"]
        assert accuracy_reward(r["solution"], r["answer"]) == 1.0
        assert int(r["answer"]) >= 0


def test_tokenizer_renders_the_qwen_math_prompt():
    tr, _ = E.make_task(0, 200, 0)
    tok = E.build_tokenizer(E.tokenizer_corpus(tr), vocab_size=400)
    msgs = [{"role": "system", "content": E.SYSTEM_PROMPT}, {"role": "user", "content": tr[0]["problem"]}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}."
                    f"<|im_end|>\n<|im_start|>user\n{tr[0]['problem']}<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(tr[0]["solution"], add_special_tokens=False)
    assert tok.decode(ids) == tr[0]["solution"]  # byte-level BPE round-trips
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    digits = [t for t in tok.convert_ids_to_tokens(tok.encode("123 + 45", add_special_tokens=False))]
    assert "1" in digits and "2" in digits  # digits split one per token


def test_model_is_a_small_qwen2():
    tr, _ = E.make_task(0, 100, 0)
    tok = E.build_tokenizer(E.tokenizer_corpus(tr), vocab_size=300)
    cfg = E.ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1)
    m1 = E.build_model(tok, cfg, seed=0)
    m2 = E.build_model(tok, cfg, seed=0)
    assert type(m1).__name__ == "Qwen2ForCausalLM"
    assert m1.config.vocab_size == len(tok)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def _ending_first_tokens(tok, rows, demos):
    """Per row kind (two-step or not): how often each token follows the work ("... = r.") in the demos."""
    from collections import Counter

    first = {True: Counter(), False: Counter()}
    for row, demo in zip(rows, demos):
        work = row["solution"][:-len(E.BOXED_ENDING.format(r=row["answer"]))]
        assert demo.startswith(work) and row["answer"] in demo[len(work):]
        n = len(tok.encode(work, add_special_tokens=False))
        first[E.is_two_step(row["solution"])][tok.encode(demo, add_special_tokens=False)[n]] += 1
    return first


def test_warmup_demos_box_one_step_answers_and_leave_two_step_answers_unboxed():
    """The embedded default's warm-up, per seed: where a one-step demonstration's ending parts from the work
    (the first token after "... = r."), the boxed ending holds a clear plurality (greedy one-step answers are
    boxed: with a single unboxed phrasing it was a coin flip, and seed 1 never boxed), while on two-step
    problems the one unboxed phrasing holds the majority, so greedy two-step answers start unboxed (reward 0)
    and sampled ones are boxed about 35% of the time: the gap between sampled and greedy that RL closes."""
    from edge_kernels.gec import DEFAULT_INJECTION, DEFAULT_REFLECTION
    from edge_kernels.train.config import TrainConfig

    d = TrainConfig()
    task = E.TaskConfig(max_operand=d.embedded_max_operand, two_step_frac=d.embedded_two_step_frac)
    for seed in range(10):
        tr, _ = E.make_task(seed, 1000, 0, task)  # the tokenizer as edge-train builds it
        tok = E.build_tokenizer(E.tokenizer_corpus(tr, extra=[DEFAULT_REFLECTION, DEFAULT_INJECTION,
                                                             E.SYSTEM_PROMPT]), vocab_size=512)
        demos = E.warmup_demonstrations(tr, d.embedded_unboxed_frac, seed, d.embedded_two_step_unboxed_frac)
        two = [E.is_two_step(r["solution"]) for r in tr]
        assert 0.4 < sum(two) / len(tr) < 0.6  # two_step_frac 0.5, before duplicates are dropped
        for kind, frac in ((True, d.embedded_two_step_unboxed_frac), (False, d.embedded_unboxed_frac)):
            rows = [dm for dm, t in zip(demos, two) if t == kind]
            unboxed = sum("\\boxed{" not in dm for dm in rows) / len(rows)
            assert abs(unboxed - frac) < 0.07, (seed, kind, unboxed)  # the format gap RL closes is there
        first = _ending_first_tokens(tok, tr, demos)
        boxed_tok = tok.encode(E.BOXED_ENDING.format(r=7), add_special_tokens=False)[0]
        one = first[False]
        assert one[boxed_tok] > 2 * max(c for t, c in one.items() if t != boxed_tok), (seed, one.most_common(3))
        two_step = first[True]
        assert set(two_step) == {boxed_tok, tok.encode(E.TWO_STEP_UNBOXED_ENDING.format(r=7),
                                                       add_special_tokens=False)[0]}
        assert two_step.most_common(1)[0][0] != boxed_tok, (seed, two_step)


def test_warmup_demos_without_a_two_step_rate_treat_every_row_alike():
    """``two_step_unboxed_frac=None``: every demonstration drops the box at ``unboxed_frac`` in any of the
    three phrasings (the previous default), two-step ones included."""
    tr, _ = E.make_task(0, 2000, 0, E.TaskConfig(two_step_frac=0.5))
    demos = E.warmup_demonstrations(tr, 0.5, 0)
    for kind in (True, False):
        rows = [dm for dm, r in zip(demos, tr) if E.is_two_step(r["solution"]) == kind]
        assert 0.45 < sum("\\boxed{" not in dm for dm in rows) / len(rows) < 0.55
        for ending in E.UNBOXED_ENDINGS:
            assert any(dm.endswith(ending.format(r=r["answer"])) for dm, r in zip(demos, tr)
                       if E.is_two_step(r["solution"]) == kind)
    assert all(r["solution"].endswith(E.BOXED_ENDING.format(r=r["answer"])) for r in tr)  # GEC's references


