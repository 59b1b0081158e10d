"""pass@1 = total correct / total problems (not a mean of per-set means)."""

import pytest

from edge_kernels.train.data import Problem
from edge_kernels.train.evaluate import EvalResult, evaluate


class Tok:
    chat_template = None

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[1, 2, 3] for _ in texts]}

    def batch_decode(self, outs, skip_special_tokens=True):
        return list(outs)


class Engine:
    def __init__(self, responses):
        self.responses = responses
        self.calls = []

    def generate(self, prompts, *, max_new_tokens, temperature, top_p, greedy, desc):
        self.calls.append((len(prompts), greedy))
        return self.responses[:len(prompts)]


def test_pass_at_1_is_total_correct_over_total():
    probs = [Problem(f"q{i}", str(i)) for i in range(7)]
    responses = [r"\boxed{0}", r"\boxed{1}", "1", r"\boxed{2}", r"\boxed{\frac{8}{2}}", "x", r"\boxed{6.0}"]
    eng = Engine(responses)
    res = evaluate(eng, Tok(), probs, system_prompt="S", max_new_tokens=4)
    assert res.per_problem == [True, True, False, False, True, False, True]
    assert (res.correct, res.total) == (4, 7)
    assert res.pass_at_1 == pytest.approx(4 / 7)
    assert res.summary() == "pass@1 = 4/7 = 0.5714"
    assert eng.calls == [(7, True)]  # one sample per problem, greedy at temperature 0


def test_sampled_eval_and_empty():
    eng = Engine([r"\boxed{0}"])
    res = evaluate(eng, Tok(), [Problem("q", "0")], system_prompt="S", max_new_tokens=4, temperature=0.7)
    assert eng.calls == [(1, False)] and res.correct == 1
    assert EvalResult(0, 0).pass_at_1 == 0.0
    assert evaluate(eng, Tok(), [], system_prompt="S", max_new_tokens=4).total == 0
