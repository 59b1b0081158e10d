"""Guided Error Correction (docs/algorithms.md section 3) with a seeded generator: every branch."""

import pytest
import torch

from edge_kernels.gec import GECConfig, GECError, apply_gec, branch_counts, choose_branches, gec_config_from

EOS = 0


class CharTok:
    """Characters as token ids (ord), enough for GEC's encode calls."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def decode(ids):
    return "".join(chr(i) for i in ids if i != EOS)


def fake_generate(prefixes, *, max_new_tokens, temperature=1.0, top_p=1.0, desc=""):
    assert max_new_tokens == 5
    return [[ord(c) for c in " \\boxed{4}"][:max_new_tokens] + [EOS] for _ in prefixes]


def test_branch_probabilities_and_determinism():
    cfg = GECConfig()
    g = torch.Generator().manual_seed(0)
    picks = choose_branches([True] * 4000, g, cfg)
    n = len(picks)
    assert abs(picks.count("regenerate") / n - 0.5) < 0.03
    assert abs(picks.count("inject") / n - 0.25) < 0.03
    assert abs(picks.count("reference") / n - 0.25) < 0.03
    assert picks.count("none") == 0
    again = choose_branches([True] * 4000, torch.Generator().manual_seed(0), cfg)
    assert picks == again
    # correct responses are left alone and draw nothing
    mixed = choose_branches([False, True, False], torch.Generator().manual_seed(0), cfg)
    assert mixed[0] is None and mixed[2] is None and mixed[1] is not None


def test_probabilities_below_one_leave_some_unchanged():
    cfg = GECConfig(p_regenerate=0.0, p_inject=0.1, p_reference=0.1)
    picks = choose_branches([True] * 1000, torch.Generator().manual_seed(1), cfg)
    assert picks.count("regenerate") == 0 and 0 < picks.count("none") < 1000
    with pytest.raises(ValueError):
        GECConfig(p_regenerate=0.6, p_inject=0.3, p_reference=0.3)
    with pytest.raises(ValueError):
        GECConfig(injection="no placeholder")


def _seed_hitting_all_branches(n, cfg):
    for seed in range(100):
        picks = choose_branches([True] * n, torch.Generator().manual_seed(seed), cfg)
        if {"regenerate", "inject", "reference"} <= set(picks):
            return seed, picks
    raise AssertionError("no seed hits every branch")


def test_apply_gec_every_branch():
    cfg = GECConfig(max_new_tokens=5)
    tok = CharTok()
    n = 6
    seed, picks = _seed_hitting_all_branches(n, cfg)
    prompts = [[ord("Q")]] * (n + 1)
    wrong = [ord(c) for c in "so 3"] + [EOS]
    responses = [wrong] * n + [[ord(c) for c in r"ok \boxed{4}"] + [EOS]]
    incorrect = [True] * n + [False]
    out = apply_gec(prompts, responses, incorrect, ["4"] * (n + 1), [r"ref \boxed{4}"] * (n + 1), tokenizer=tok,
                    eos_id=EOS, generate=fake_generate, generator=torch.Generator().manual_seed(seed), cfg=cfg)
    assert [c.branch for c in out[:n]] == picks
    assert out[n].branch is None and out[n].tokens == responses[n] and not any(out[n].injected)
    for c in out[:n]:
        assert len(c.tokens) == len(c.injected)
        text = decode(c.tokens)
        if c.branch == "regenerate":
            # the EOS of the wrong response is dropped, the reflection appended, then the policy continues
            assert text == "so 3 Wait! Something is wrong here. \\box"  # 5 new tokens, then EOS
            n_refl = len(" Wait! Something is wrong here.")
            assert c.injected == [False] * 4 + [True] * n_refl + [False] * 6
        elif c.branch == "inject":
            assert text == "so 3\nWait! Something is wrong here. After verification, the correct answer is \\boxed{4}."
            assert c.tokens[-1] == EOS
            assert c.injected[:4] == [False] * 4 and all(c.injected[4:])
        else:
            assert text == r"ref \boxed{4}" and c.tokens[-1] == EOS and all(c.injected)
    assert branch_counts(out) == (picks.count("regenerate"), picks.count("inject"), picks.count("reference"))


def test_gec_is_reproducible():
    cfg = GECConfig(max_new_tokens=5)
    args = ([[1]] * 8, [[ord("x"), EOS]] * 8, [True] * 8, ["4"] * 8, ["\\boxed{4}"] * 8)
    kw = dict(tokenizer=CharTok(), eos_id=EOS, generate=fake_generate, cfg=cfg)
    a = apply_gec(*args, generator=torch.Generator().manual_seed(5), **kw)
    b = apply_gec(*args, generator=torch.Generator().manual_seed(5), **kw)
    assert [x.tokens for x in a] == [x.tokens for x in b]


def test_missing_answer_or_solution_is_a_clear_error():
    tok = CharTok()
    only_inject = GECConfig(p_regenerate=0, p_inject=1, p_reference=0)
    with pytest.raises(GECError, match="answer"):
        apply_gec([[1]], [[2]], [True], [None], ["s"], tokenizer=tok, eos_id=EOS, generate=fake_generate,
                  generator=torch.Generator().manual_seed(0), cfg=only_inject, problem_ids=[17])
    only_ref = GECConfig(p_regenerate=0, p_inject=0, p_reference=1)
    with pytest.raises(GECError, match=r"reference solution of problem #17") as err:
        apply_gec([[1]], [[2]], [True], ["4"], [None], tokenizer=tok, eos_id=EOS, generate=fake_generate,
                  generator=torch.Generator().manual_seed(0), cfg=only_ref, problem_ids=[17])
    # engine-neutral advice: the option names every engine shares, never one engine's command-line flags
    assert "gec_p_reference" in str(err.value) and "--" not in str(err.value)


def test_every_stop_token_is_stripped_before_correcting():
    # a model whose generation_config stops on two tokens (Qwen2.5-Instruct: <|im_end|>, <|endoftext|>): a
    # response ending with the second one must lose it too, or the corrected text has an EOS in its middle
    OTHER = 1
    cfg = GECConfig(p_regenerate=0.0, p_inject=1.0, p_reference=0.0)
    out = apply_gec([[50]], [[65, 66, OTHER]], [True], ["4"], [None], tokenizer=CharTok(), eos_id=EOS,
                    stop_ids=[EOS, OTHER], generate=fake_generate, generator=torch.Generator().manual_seed(0),
                    cfg=cfg)
    toks = out[0].tokens
    assert toks[:2] == [65, 66] and OTHER not in toks and toks[-1] == EOS and toks.count(EOS) == 1


def test_one_set_of_option_names():
    # edge-train's flags/YAML and EdgeGRPOConfig carry the gec_-prefixed names; the library maps them
    cfg = gec_config_from({"gec_p_inject": 0.5, "gec_p_reference": 0.0, "gec_max_new_tokens": 9, "other": 1})
    assert (cfg.p_inject, cfg.p_reference, cfg.max_new_tokens, cfg.p_regenerate) == (0.5, 0.0, 9, 0.5)
    with pytest.raises(GECError, match="gec_max_new_tokens"):
        GECConfig(max_new_tokens=0)
