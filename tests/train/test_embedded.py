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


def test_warmup_demos_make_the_boxed_ending_the_greedy_choice():
    """Where a demonstration's ending parts from the work (the first token after "... = r."), the boxed ending
    must hold a clear plurality at the default unboxed_frac 0.5 on every seed, so greedy decoding after the
    warm-up boxes its answers (with one unboxed phrasing it was a coin flip, and seed 1 never boxed)."""
    from collections import Counter

    from edge_kernels.gec import DEFAULT_INJECTION, DEFAULT_REFLECTION

    for seed in range(10):
        tr, _ = E.make_task(seed, 1000, 0)  # the tokenizer as edge-train builds it
        tok = E.build_tokenizer(E.tokenizer_corpus(tr, extra=[DEFAULT_REFLECTION, DEFAULT_INJECTION,
                                                             E.SYSTEM_PROMPT]), vocab_size=512)
        demos = E.warmup_demonstrations(tr, 0.5, seed)
        unboxed = sum("\\boxed{" not in d for d in demos) / len(demos)
        assert 0.45 < unboxed < 0.55  # the format gap RL closes is still there
        first = Counter()
        for row, demo in zip(tr, demos):
            work = row["solution"][:-len(E.BOXED_ENDING.format(r=row["answer"]))]
            assert demo.startswith(work) and row["answer"] in demo[len(work):]
            n = len(tok.encode(work, add_special_tokens=False))
            first[tok.encode(demo, add_special_tokens=False)[n]] += 1
        boxed_tok = tok.encode(E.BOXED_ENDING.format(r=7), add_special_tokens=False)[0]
        top_other = max(c for t, c in first.items() if t != boxed_tok)
        assert first[boxed_tok] > 2 * top_other, (seed, first.most_common(3))
