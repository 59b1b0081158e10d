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


# ------------------------------------------------------------------------------- sampled pass@1 and pass@k

from itertools import combinations  # noqa: E402

from edge_kernels.train.evaluate import SampledResult, eval_record, evaluate_sampled, pass_at_k  # noqa: E402


def test_pass_at_k_hand_counted():
    # n=5 samples, c=2 correct, k=2: of the C(5,2)=10 pairs, C(3,2)=3 hold no correct one -> 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # pass@1 is c/n
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0 and pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(8, 3, 6) == 1.0  # n - c = 5 < k: every 6-subset holds a correct sample
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(4, 5, 1)


@pytest.mark.parametrize("n,c,k", [(6, 2, 3), (7, 1, 4), (8, 3, 2), (5, 0, 1)])
def test_pass_at_k_equals_enumerating_the_subsets(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(samples, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_sampled_eval_counts_per_problem():
    # 3 problems x 4 samples; correct samples hand-counted: problem 0: 2, problem 1: 0, problem 2: 4
    probs = [Problem("a", "1"), Problem("b", "2"), Problem("c", "3")]
    responses = [r"\boxed{1}", "1", r"\boxed{1}", r"\boxed{7}",
                 r"\boxed{1}", "2", r"\boxed{}", "",
                 r"\boxed{3}", r"\boxed{3.0}", r"\boxed{3}", r"\boxed{3}"]
    eng = Engine(responses)
    res = evaluate_sampled(eng, Tok(), probs, n=4, system_prompt="S", max_new_tokens=4, temperature=1.0)
    assert eng.calls == [(12, False)]  # each prompt 4 times, sampled
    assert res.counts == [2, 0, 4] and res.total == 3
    assert res.pass_at_1 == pytest.approx(6 / 12)
    assert res.pass_at(4) == pytest.approx(2 / 3)  # problems 0 and 2 have a correct sample
    assert res.pass_at(2) == pytest.approx((1 - 1 / 6 + 0 + 1) / 3)  # problem 0: 1 - C(2,2)/C(4,2)
    rec = eval_record(EvalResult(1, 3), res, 4)
    assert rec["greedy_pass_at_1"] == pytest.approx(1 / 3) and rec["sampled_pass_at_1"] == 0.5
    assert rec["pass_at_k"] == pytest.approx(2 / 3) and rec["k"] == 4 and rec["samples"] == 4
    with pytest.raises(ValueError, match="temperature > 0"):
        evaluate_sampled(eng, Tok(), probs, n=4, system_prompt="S", max_new_tokens=4, temperature=0.0)
    assert SampledResult(4, []).pass_at_1 == 0.0
