"""The TRL adapter's GEC with ``use_vllm=True`` (colocate mode) on the real engine, through TRL's GRPOTrainer:
the regeneration goes through TRL's vLLM engine, the weight push works on the CPU build (through
``reload_weights``), and TRL's own check of the sampling log-probs (``sampling/sampling_logp_difference``)
stays at fp32 rounding for every token vLLM sampled, GEC's regenerated continuations included."""

import re

import pytest
import torch

datasets = pytest.importorskip("datasets")
pytest.importorskip("trl")

from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from char_tokenizer import make_tokenizer  # noqa: E402

from edge_kernels.integrations.trl import EdgeGRPOConfig, EdgeGRPOTrainer  # noqa: E402

pytestmark = pytest.mark.vllm

G = 4
SAME_WEIGHTS_TOL = 1e-4  # fp32 engine vs TRL's fp32 scoring pass on the same weights (measured ~1e-6)


def _accuracy(completions, answer, **kwargs):
    out = []
    for c, a in zip(completions, answer):
        found = re.findall(r"\\boxed\{([^}]*)\}", c)
        out.append(1.0 if found and found[-1] == a else 0.0)
    return out


def _noise(completions, **kwargs):  # varied rewards below GEC's correctness threshold
    return [(sum(map(ord, c)) % 3) / 4 for c in completions]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    model = Qwen2ForCausalLM(cfg)  # head size 32: supported by vLLM's CPU attention
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), tok


def test_gec_regenerates_through_trls_colocated_vllm(model_dir, tmp_path, monkeypatch):
    import functools

    import trl.generation.vllm_generation as trl_vllm

    # TRL starts vLLM with dtype "auto", which runs a float32 checkpoint in bf16 (a ~5e-3 mean log-prob mismatch
    # that TRL's importance sampling absorbs); the test pins fp32 so that any stale weight or misplaced log-prob
    # stands out against fp32 rounding
    monkeypatch.setattr(trl_vllm, "LLM", functools.partial(trl_vllm.LLM, dtype="float32"))
    path, tok = model_dir
    data = datasets.Dataset.from_dict({"prompt": ["1+1=", "2+3=", "4+4=", "9-3="], "answer": ["2", "5", "8", "6"],
                                       "solution": ["\\boxed{2}", "\\boxed{5}", "\\boxed{8}", "\\boxed{6}"]})
    args = EdgeGRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=G, num_generations=G, max_completion_length=8,
        max_steps=3, learning_rate=1e-2, use_cpu=True, report_to="none", logging_steps=1, save_strategy="no",
        disable_tqdm=True, seed=0, bf16=False, correct_threshold=0.6, advantage_estimator="eda",
        gec=True, gec_p_regenerate=0.5, gec_p_inject=0.25, gec_p_reference=0.25,
        gec_max_new_tokens=6, use_vllm=True, vllm_mode="colocate", vllm_max_model_length=64)
    trainer = EdgeGRPOTrainer(model=path, reward_funcs=[_accuracy, _noise], args=args, train_dataset=data,
                              processing_class=tok)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "sampling/sampling_logp_difference/max" in h]
    assert len(logs) == 3
    assert sum(h["gec/regenerated_frac"] for h in logs) > 0  # regenerations sampled by TRL's vLLM engine
    for h in logs:  # after every update the engine has the new weights; regenerated tokens carry their log-probs
        assert h["sampling/sampling_logp_difference/max"] < SAME_WEIGHTS_TOL, h

    # pushed the final weights (TRL pushes at the next generation), the engine's greedy completions equal the
    # trained model's (lm_head included: a packed copy on CPU, which TRL's own push would leave stale)
    from vllm import SamplingParams

    trainer.vllm_generation.sync_weights()
    prompts = [tok.encode(p) for p in ["1+1=", "9-3="]]
    outs = trainer.vllm_generation.llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)
    model = trainer.model.eval()
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, eos_token_id=1,
                                 pad_token_id=0)[0, len(p):].tolist()
        got = list(o.outputs[0].token_ids)
        assert got == ref[:len(got)]


def test_gec_refuses_server_mode_and_tensor_parallel_vllm(model_dir, tmp_path):
    path, tok = model_dir
    data = datasets.Dataset.from_dict({"prompt": ["1+1="], "answer": ["2"], "solution": ["\\boxed{2}"]})
    for extra, match in (({"vllm_mode": "server"}, "vllm_mode='server'"),
                         ({"vllm_mode": "colocate", "vllm_tensor_parallel_size": 2}, "vllm_tensor_parallel_size=2")):
        args = EdgeGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=G, num_generations=G,
                              use_cpu=True, report_to="none", bf16=False, gec=True, use_vllm=True, **extra)
        with pytest.raises(ValueError, match=match):
            EdgeGRPOTrainer(model=path, reward_funcs=[_accuracy], args=args, train_dataset=data,
                            processing_class=tok)
