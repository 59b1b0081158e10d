"""Problem sets: JSONL/Parquet loading, field mapping, bad rows, the chat prompt, the resumable sampler."""

import json

import pytest

from edge_kernels.train.data import DataError, Problem, PromptSampler, load_problems, render_prompt, write_problems


def write_jsonl(path, rows):
    with open(path, "w") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_jsonl_and_field_mapping(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [
        {"problem": "1+1?", "answer": "2", "solution": r"1+1=\boxed{2}"},
        {"problem": "2+2?", "answer": 4},  # numeric answer, no solution
    ])
    probs = load_problems(p)
    assert probs == [Problem("1+1?", "2", r"1+1=\boxed{2}"), Problem("2+2?", "4", None)]
    q = write_jsonl(tmp_path / "e.jsonl", [{"question": "3+3?", "final": "6", "sol": "six"}])
    assert load_problems(q, problem_field="question", answer_field="final", solution_field="sol") == [
        Problem("3+3?", "6", "six")]


def test_answer_from_the_solutions_box(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"problem": "q", "solution": r"so \boxed{\frac{1}{2}}"}])
    assert load_problems(p)[0].answer == r"\frac{1}{2}"


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"problem": ["a?", "b?"], "answer": ["1", "2"], "solution": ["x", "y"]}), path)
    assert [p.answer for p in load_problems(path)] == ["1", "2"]
    pq.write_table(pa.table({"problem": ["a?", "b?"], "answer": ["1", None]}), path)
    with pytest.raises(DataError, match=r"d.parquet:2: missing or empty answer"):
        load_problems(path)


def test_write_then_load_roundtrip(tmp_path):
    probs = [Problem("a", "1", "s"), Problem("b", "2", None)]
    write_problems(probs, str(tmp_path / "x.jsonl"))
    assert load_problems(str(tmp_path / "x.jsonl")) == probs


@pytest.mark.parametrize("row, message", [
    ('{"problem": "q", "answer": "1"', r"d.jsonl:2: invalid JSON"),
    ('["not", "an", "object"]', r"d.jsonl:2: a row must be an object"),
    ('{"question": "q", "answer": "1"}', r"d.jsonl:2: missing field 'problem'.*--problem-field"),
    ('{"problem": "", "answer": "1"}', r"d.jsonl:2: field 'problem' must be a non-empty string"),
    ('{"problem": "q"}', r"d.jsonl:2: missing or empty answer field 'answer'.*--answer-field"),
    ('{"problem": "q", "answer": "  "}', r"d.jsonl:2: missing or empty answer"),
    ('{"problem": "q", "answer": "1", "solution": 5}', None),  # a number is accepted as text
    ('{"problem": "q", "answer": "1", "solution": ["x"]}', r"d.jsonl:2: field 'solution' must be a string"),
])
def test_bad_rows(tmp_path, row, message):
    p = write_jsonl(tmp_path / "d.jsonl", ['{"problem": "ok", "answer": "1"}', row])
    if message is None:
        load_problems(p)
        return
    with pytest.raises(DataError, match=message):
        load_problems(p)


def test_gec_needs_solutions(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"problem": "q", "answer": "1"}])
    load_problems(p)  # fine without GEC
    with pytest.raises(DataError, match=r"d.jsonl:1: missing field 'solution'.*--gec-p-reference 0.*--no-gec"):
        load_problems(p, need_solution=True)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_problems(str(tmp_path / "nope.jsonl"))
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    with pytest.raises(DataError, match="no problems"):
        load_problems(str(p))


def test_render_prompt_uses_chat_template():
    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return "|".join(f"{m['role']}:{m['content']}" for m in messages)

    assert render_prompt(Tok(), "1+1?", "SYS") == "system:SYS|user:1+1?"

    class Plain:
        chat_template = None

    assert render_prompt(Plain(), "1+1?", "SYS") == "SYS\n\n1+1?\n"


def test_sampler_covers_epochs_and_resumes():
    s = PromptSampler(10, seed=3)
    first = s.next(4) + s.next(4) + s.next(4)  # crosses into epoch 1
    assert sorted(first[:10]) == list(range(10))
    assert s.epoch == 1
    state = s.state_dict()
    rest = s.next(7)
    t = PromptSampler(10, seed=3)
    t.load_state_dict(state)
    assert t.next(7) == rest
    assert PromptSampler(10, seed=4).next(10) != PromptSampler(10, seed=3).next(10)
    with pytest.raises(DataError, match="same --data"):
        PromptSampler(11, seed=3).load_state_dict(state)
