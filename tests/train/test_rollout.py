"""Rollout engines: HF generate; vLLM's thin wrapper against a fake ``vllm`` module (the real one needs CUDA)."""

import importlib.util
import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from train_helpers import save_model_with_sampling_defaults, tiny_model_and_tokenizer
from edge_kernels.train.rollout import VLLM_MISSING, HFRollout, VLLMRollout, _strip, make_rollout

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


# ------------------------------------------------------------------------------------------ vLLM (fake module)


class FakeSamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class FakeLLM:
    """Records what edge-train asks of vLLM; its outputs depend on each request's seed."""

    in_process = True

    def __init__(self, **kw):
        self.kw = kw
        self.env = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        self.loaded, self.resets, self.rpc = [], 0, []
        executor = SimpleNamespace(driver_worker=SimpleNamespace(worker=SimpleNamespace(model_runner=SimpleNamespace(
            model=SimpleNamespace(load_weights=lambda ws: self.loaded.append(list(ws)))))))
        self.llm_engine = SimpleNamespace(model_executor=executor) if self.in_process else SimpleNamespace()

    def generate(self, prompts, params, use_tqdm=True):
        assert isinstance(params, list) and len(params) == len(prompts)
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[10 + p.seed % 50, 11, p.stop_token_ids[-1], 12])])
                for p in params]

    def reset_prefix_cache(self):
        self.resets += 1

    def collective_rpc(self, fn, *a, **k):
        self.rpc.append(fn)


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "unset-by-the-test")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
    return mod


def test_vllm_samples_each_request_with_its_own_seed(fake_vllm):
    _, tok = tiny_model_and_tokenizer()
    eng = VLLMRollout("/m", tok, seed=0, dtype="bfloat16", max_model_len=99, stop_ids=[2, 5])
    seen = []
    real = eng.llm.generate
    eng.llm.generate = lambda prompts, params, **k: seen.append(params) or real(prompts, params, **k)
    torch.manual_seed(3)
    out = eng.generate([[1, 2, 3]] * 4, max_new_tokens=6, temperature=0.9, top_p=0.95)
    params = seen[-1]
    assert len({p.seed for p in params}) == 4  # a group's G identical prompts get G different samples
    assert len({tuple(o) for o in out}) > 1 and all(o[-1] == 5 and len(o) == 3 for o in out)  # cut at the stop
    p = params[0]
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens, p.stop_token_ids) == (1, 0.9, 0.95, -1, 6, [2, 5])
    torch.manual_seed(3)  # the loop re-seeds torch from (--seed, step): the same seeds again
    assert eng.generate([[1, 2, 3]] * 4, max_new_tokens=6, temperature=0.9, top_p=0.95) == out
    assert [q.seed for q in seen[-1]] == [q.seed for q in params]
    torch.manual_seed(4)
    eng.generate([[1, 2, 3]] * 4, max_new_tokens=6)
    assert {q.seed for q in seen[-1]}.isdisjoint(q.seed for q in params)
    eng.generate([[1]], max_new_tokens=2, greedy=True)
    assert seen[-1][0].temperature == 0.0


def test_vllm_engine_in_process_with_a_bounded_context_and_an_in_memory_weight_push(fake_vllm):
    model, tok = tiny_model_and_tokenizer()
    eng = VLLMRollout("/m", tok, seed=0, dtype="bfloat16", max_model_len=1234, stop_ids=[tok.eos_token_id])
    assert eng.llm.env == "0"  # set before the engine was built: its model lives in this process
    assert eng.llm.kw["max_model_len"] == 1234 and eng.llm.kw["dtype"] == "bfloat16"
    eng.sync_weights(model)
    (weights,) = eng.llm.loaded
    assert [n for n, _ in weights] == list(model.state_dict())
    assert all(t.dtype == torch.bfloat16 for _, t in weights) and eng.llm.resets == 1
    assert eng.llm.rpc == []


def test_vllm_weight_push_without_an_in_process_engine_is_a_clear_error(fake_vllm, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # the user's choice wins
    monkeypatch.setattr(FakeLLM, "in_process", False)
    model, tok = tiny_model_and_tokenizer()
    eng = VLLMRollout("/m", tok, seed=0)
    assert eng.llm.env == "1"
    with pytest.raises(RuntimeError, match=r"VLLM_ENABLE_V1_MULTIPROCESSING=1.*--rollout hf"):
        eng.sync_weights(model)
    assert eng.llm.rpc == []  # no pickled closure / state dict through collective_rpc


def test_make_rollout_passes_max_model_len_and_stop_ids_to_vllm(fake_vllm, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model, tok = tiny_model_and_tokenizer()
    eng = make_rollout("vllm", model, tok, model_path="/m", seed=1, batch_size=8, dtype="bfloat16",
                       gpu_memory_utilization=0.3, stop_ids=[2, 9], max_model_len=777)
    assert isinstance(eng, VLLMRollout) and eng.stop_ids == [2, 9]
    assert eng.llm.kw["max_model_len"] == 777 and eng.llm.kw["gpu_memory_utilization"] == 0.3
