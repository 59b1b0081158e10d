"""Rollout engines: HF generate; what of vLLM runs without it (its absence, the log-prob alignment and the
rollout-correction options). The real vLLM engine is tested in tests/vllm_rollout."""

import importlib.util
import math

import pytest
import torch

from train_helpers import save_model_with_sampling_defaults, tiny_model_and_tokenizer
from edge_kernels.train.rollout import VLLM_MISSING, HFRollout, _strip, logp_diff, make_rollout, rollout_logp

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_strip_cuts_after_the_first_eos():
    assert _strip([5, 6, 2, 0, 0], [2]) == [5, 6, 2]
    assert _strip([5, 6, 7], [2]) == [5, 6, 7]
    assert _strip([2, 9], [2, 9]) == [2]


def test_hf_rollout_is_seeded_and_batched():
    model, tok = tiny_model_and_tokenizer()
    eng = HFRollout(model, tok, batch_size=3)
    prefixes = [tok.encode("Tom has 3 apples.", add_special_tokens=False)] * 4 + [[5, 6]]
    torch.manual_seed(0)
    a = eng.generate(prefixes, max_new_tokens=6, temperature=1.0)
    torch.manual_seed(0)
    b = eng.generate(prefixes, max_new_tokens=6, temperature=1.0)
    assert a == b and len(a) == 5
    for seq in a:
        assert 1 <= len(seq) <= 6
        assert tok.eos_token_id not in seq[:-1]  # nothing after an EOS
    g1 = eng.generate(prefixes, max_new_tokens=6, greedy=True)
    g2 = HFRollout(model, tok, batch_size=64).generate(prefixes, max_new_tokens=6, greedy=True)
    assert g1 == g2  # batching (and left padding) does not change greedy output
    assert not model.training or True


def test_hf_rollout_ignores_the_models_generation_defaults():
    model, tok = tiny_model_and_tokenizer()
    model.generation_config.top_k = 1  # would make sampling greedy
    model.generation_config.repetition_penalty = 5.0
    eng = HFRollout(model, tok)
    cfg = eng._config(5, 1.0, 1.0, greedy=False)
    assert cfg.top_k in (0, None) and cfg.repetition_penalty == 1.0 and cfg.do_sample


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here")
def test_vllm_missing_is_a_clear_error():
    model, tok = tiny_model_and_tokenizer()
    with pytest.raises(RuntimeError, match="needs the vllm package"):
        make_rollout("vllm", model, tok, model_path="/x", seed=0, batch_size=8, dtype="float32",
                     gpu_memory_utilization=0.3)
    assert "--rollout hf" in VLLM_MISSING


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here")
def test_edge_train_without_vllm_says_so_without_a_traceback(tmp_path):
    from train_helpers import run_cli, tiny_flags

    r = run_cli([*tiny_flags(rollout="vllm"), "--output", str(tmp_path / "run")])
    assert r.returncode == 2 and "edge-train: error: --rollout vllm needs the vllm package" in r.stderr
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------ the model's own defaults


def test_a_models_sampling_defaults_never_reach_generate(tmp_path):
    from edge_kernels.train.model import load_pretrained, stop_token_ids

    _, _, eos_ids = save_model_with_sampling_defaults(tmp_path)
    model, tok = load_pretrained(str(tmp_path), dtype=torch.float32, device=torch.device("cpu"))
    gc = model.generation_config
    assert gc.temperature in (None, 1.0) and gc.top_p in (None, 1.0) and gc.top_k in (None, 50)
    assert gc.repetition_penalty in (None, 1.0) and gc.min_p is None and not gc.do_sample
    assert gc.eos_token_id == eos_ids and gc.pad_token_id == tok.pad_token_id
    assert stop_token_ids(tok, gc) == eos_ids  # the tokenizer's EOS, then the model's second one

    effective = []
    real = model.generate

    def spy(*a, generation_config=None, **k):  # what generate() really uses, after its merge with the model's
        effective.append(model._prepare_generation_config(generation_config)[0])
        return real(*a, generation_config=generation_config, **k)

    model.generate = spy
    eng = HFRollout(model, tok)
    assert eng.eos_ids == eos_ids
    eng.generate([[5, 6, 7]], max_new_tokens=3, temperature=1.0)
    eng.generate([[5, 6, 7]], max_new_tokens=3, greedy=True)
    sample, greedy = effective
    assert sample.do_sample and sample.temperature == 1.0 and sample.top_p == 1.0 and sample.top_k in (0, None)
    assert sample.repetition_penalty == 1.0 and sample.min_p is None and list(sample.eos_token_id) == eos_ids
    assert not greedy.do_sample and greedy.min_p is None and greedy.repetition_penalty == 1.0


def test_hf_rollout_ignores_defaults_of_a_model_it_did_not_load(tmp_path):
    model, tok = tiny_model_and_tokenizer()
    model.generation_config.min_p = 0.9
    model.generation_config.no_repeat_ngram_size = 1
    effective = []
    real = model.generate

    def spy(*a, generation_config=None, **k):
        effective.append(model._prepare_generation_config(generation_config)[0])
        return real(*a, generation_config=generation_config, **k)

    model.generate = spy
    HFRollout(model, tok).generate([[5, 6, 7]], max_new_tokens=3)
    assert effective[0].min_p is None and effective[0].no_repeat_ngram_size in (None, 0)
    assert model.generation_config.min_p == 0.9  # the model's own config is put back


def test_hf_rollout_stops_on_every_stop_id():
    model, tok = tiny_model_and_tokenizer()
    eng = HFRollout(model, tok, stop_ids=[tok.eos_token_id, 7])
    assert eng._config(4, 1.0, 1.0, greedy=False).eos_token_id == [tok.eos_token_id, 7]
    assert _strip([5, 7, 9], eng.eos_ids) == [5, 7]


# ------------------------------------------------------------------------------------------ vLLM's log-probs
# (the engine itself: tests/vllm_rollout, run in CI's second environment against the real CPU build)


def test_rollout_logp_covers_the_sampled_prefix_the_trained_response_keeps():
    from edge_kernels.train.batch import pack

    sampled = [[5, 6, 2], [7, 8], [9, 9, 9]]
    lps = [[-0.1, -0.2, -0.3], [-1.0, -2.0], [-0.5, -0.5, -0.5]]
    # GEC: row 0 untouched, row 1 regenerated (stop token stripped, reflection + continuation appended),
    # row 2 replaced by a reference solution
    trained = [[5, 6, 2], [7, 8, 40, 41, 42], [30, 31]]
    packed = pack([[1, 2]] * 3, trained, 0)
    lp, valid = rollout_logp(lps, sampled, packed.targets, packed.mask)
    assert valid.tolist() == [[True, True, True, False, False], [True, True, False, False, False], [False] * 5]
    assert lp[0, :3].tolist() == pytest.approx([-0.1, -0.2, -0.3]) and lp[1, :2].tolist() == [-1.0, -2.0]
    assert rollout_logp(None, sampled, packed.targets, packed.mask) is None  # hf: no engine log-probs
    old = torch.zeros(3, 5)
    old[0, :3] = torch.tensor([-0.1, -0.2, -0.5])
    old[1, :2] = torch.tensor([-1.0, -2.0])
    assert logp_diff(lp, valid, old) == pytest.approx(0.2 / 5)
    assert math.isnan(logp_diff(lp, torch.zeros_like(valid), old))


def test_rollout_correction_options_are_checked_at_startup():
    from edge_kernels.train.config import ConfigError, TrainConfig, validate

    with pytest.raises(ConfigError, match="rollout_is_max must be >= 1"):
        validate(TrainConfig(rollout="vllm", rollout_is="token_truncate", rollout_is_max=0.5))
    with pytest.raises(ConfigError, match="needs rollout_is_max"):
        validate(TrainConfig(rollout="vllm", rollout_is="token_truncate"))
    with pytest.raises(ConfigError, match="rollout_is_max applies only with rollout_is"):
        validate(TrainConfig(rollout="vllm", rollout_is_max=2.0))
    validate(TrainConfig(rollout="vllm", rollout_is="sequence_mask", rollout_is_min=0.5, rollout_is_max=2.0))


def test_logp_diff_leaves_out_tokens_the_truncated_scoring_pass_cut():
    from edge_kernels.train.rollout import cut_fraction

    lp = torch.tensor([[-0.1, -0.2, -0.3, -0.4]])
    valid = torch.tensor([[True, True, True, False]])
    old = torch.tensor([[-0.1, float("-inf"), -0.5, float("-inf")]])
    assert logp_diff(lp, valid, old) == pytest.approx(0.2 / 2)
    assert cut_fraction(valid, old) == pytest.approx(1 / 3)
    assert cut_fraction(valid, torch.zeros(1, 4)) == 0.0
