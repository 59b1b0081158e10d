"""The real vLLM engine behind ``--rollout vllm``: sampling, per-request seeds, the weight push (checked through
the sampled tokens' log-probs against the scoring pass), GEC's regeneration, and the start-up errors."""

import pytest
import torch

from vllm_helpers import model_and_tokenizer, perturb, scoring_logp
from edge_kernels.gec import GECConfig, apply_gec
from edge_kernels.train.rollout import LOGP_DIFF_WARN, HFRollout, VLLMRollout, logp_diff, rollout_logp

pytestmark = pytest.mark.vllm

# fp32 engine vs fp32 scoring pass on the same weights: different kernels and summation orders only; measured
# ~3e-7 on this model, so 1e-4 leaves a wide margin while a stale weight gives > LOGP_DIFF_WARN
SAME_WEIGHTS_TOL = 1e-4
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [20, 21]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    model, tok = model_and_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    eng = VLLMRollout(str(path), tok, seed=0, dtype="float32", max_model_len=128, stop_ids=[tok.eos_token_id])
    return model, tok, eng


def _diff(eng, model, temperature=0.8):
    torch.manual_seed(0)
    prompts = PROMPTS * 2
    out = eng.generate(prompts, max_new_tokens=10, temperature=temperature)
    lps = eng.last_logprobs
    logp, packed = scoring_logp(model, prompts, out, temperature)
    lp, valid = rollout_logp(lps, out, packed.targets, packed.mask)
    assert valid.sum() == sum(map(len, out)) > 0
    return logp_diff(lp, valid, logp)


def test_greedy_equals_hf_generate(setup):
    model, tok, eng = setup
    hf = HFRollout(model, tok, stop_ids=[tok.eos_token_id]).generate(PROMPTS, max_new_tokens=10, greedy=True)
    assert eng.generate(PROMPTS, max_new_tokens=10, greedy=True) == hf


def test_each_request_has_its_own_seed_and_the_torch_seed_replays_them(setup):
    _, _, eng = setup
    group = [PROMPTS[0]] * 4
    torch.manual_seed(3)
    a = eng.generate(group, max_new_tokens=10, temperature=1.0)
    assert len({tuple(x) for x in a}) > 1  # a group's G identical prompts get different samples
    torch.manual_seed(3)
    assert eng.generate(group, max_new_tokens=10, temperature=1.0) == a
    torch.manual_seed(4)
    assert eng.generate(group, max_new_tokens=10, temperature=1.0) != a


def test_pushed_weights_take_effect_and_a_skipped_push_shows(setup):
    model, tok, eng = setup
    assert _diff(eng, model) < SAME_WEIGHTS_TOL  # the engine's log-probs are at the sampling temperature
    perturb(model)
    stale = _diff(eng, model)
    assert stale > LOGP_DIFF_WARN  # no push: the check fails
    eng.sync_weights(model)
    assert _diff(eng, model) < SAME_WEIGHTS_TOL
    assert _diff(eng, model, temperature=1.3) < SAME_WEIGHTS_TOL
    hf = HFRollout(model, tok, stop_ids=[tok.eos_token_id]).generate(PROMPTS, max_new_tokens=10, greedy=True)
    assert eng.generate(PROMPTS, max_new_tokens=10, greedy=True) == hf  # lm_head too (a packed copy on CPU)


def test_gec_regenerates_through_vllm(setup):
    model, tok, eng = setup
    eos = tok.eos_token_id
    prompts = [PROMPTS[0], PROMPTS[1]]
    responses = [[30, 31, eos], [32, 33]]
    cfg = GECConfig(p_regenerate=1.0, p_inject=0.0, p_reference=0.0, max_new_tokens=6)
    fixed = apply_gec(prompts, responses, [True, True], ["1", "2"], [None, None], tokenizer=tok, eos_id=eos,
                      stop_ids=[eos], generate=eng.generate, generator=torch.Generator().manual_seed(0), cfg=cfg,
                      temperature=1.0, top_p=1.0)
    refl = tok.encode(cfg.reflection, add_special_tokens=False)
    assert [f.branch for f in fixed] == ["regenerate"] * 2
    conts = eng.last_logprobs  # the regeneration's samples, with their log-probs
    for f, r, lp in zip(fixed, responses, conts):
        body = [t for t in r if t != eos]
        assert f.tokens[:len(body) + len(refl)] == body + refl
        cont = f.tokens[len(body) + len(refl):]
        assert 1 <= len(cont) <= 6 and len(lp) == len(cont)


def test_head_size_dtype_environment_and_path_errors(tmp_path, monkeypatch):
    model, tok = model_and_tokenizer(hidden=32, heads=2)  # head size 16
    model.save_pretrained(tmp_path / "h16")
    with pytest.raises(RuntimeError, match="head size 16 .*not supported by vLLM's CPU attention"):
        VLLMRollout(str(tmp_path / "h16"), tok, seed=0, dtype="float32")
    with pytest.raises(RuntimeError, match="--dtype float16 is not supported by vLLM's CPU build"):
        VLLMRollout(str(tmp_path / "h16"), tok, seed=0, dtype="float16")
    with pytest.raises(RuntimeError, match="cannot load .*no config.json"):
        VLLMRollout(str(tmp_path / "nowhere"), tok, seed=0, dtype="float32")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "qwen2", "hidden_size": 64, '
                                                     '"num_attention_heads": 2}')
    with pytest.raises(RuntimeError, match="vLLM could not load .*broken"):
        VLLMRollout(str(tmp_path / "broken"), tok, seed=0, dtype="float32", max_model_len=64)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(RuntimeError, match="VLLM_ENABLE_V1_MULTIPROCESSING=1.*in this process"):
        VLLMRollout(str(tmp_path / "h16"), tok, seed=0, dtype="float32")


def test_top_p_log_probs_match_the_truncated_scoring_pass(setup):
    """With top_p=0.9 vLLM returns log-probs renormalised over the nucleus: the full-softmax scoring pass is off
    by log S (S = the nucleus mass) on every token, the top_p-aware one (docs/algorithms.md section 9) is not."""
    from edge_kernels.train.batch import score
    from edge_kernels.train.rollout import cut_fraction

    model, _, eng = setup
    eng.sync_weights(model)
    torch.manual_seed(0)
    prompts, temperature = PROMPTS * 2, 0.8
    out = eng.generate(prompts, max_new_tokens=10, temperature=temperature, top_p=0.9)
    full, packed = scoring_logp(model, prompts, out, temperature)
    lp, valid = rollout_logp(eng.last_logprobs, out, packed.targets, packed.mask)
    trunc, _ = score(model, packed, temperature=temperature, impl="torch", top_p=0.9)
    assert cut_fraction(valid, trunc) == 0.0  # every sampled token is in our nucleus too
    log_s = ((trunc - full) * valid).sum() / valid.sum()  # mean -log S over the sampled tokens
    assert log_s > 10 * SAME_WEIGHTS_TOL  # the truncation matters on this model
    assert logp_diff(lp, valid, trunc) < SAME_WEIGHTS_TOL  # with the option: fp32 rounding only
    assert abs(logp_diff(lp, valid, full) - float(log_s)) < SAME_WEIGHTS_TOL  # without: off by log S
