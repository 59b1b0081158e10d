"""Helpers of the edge-train tests: a tiny embedded configuration that runs in seconds on a CPU."""

import os
import subprocess
import sys


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# a model and task small enough that a few RL steps take about a second
TINY = {
    "embedded_train_size": 48,
    "embedded_eval_size": 8,
    "embedded_hidden_size": 32,
    "embedded_intermediate_size": 64,
    "embedded_layers": 1,
    "embedded_heads": 2,
    "embedded_vocab_size": 300,
    "warmup_steps": 3,
    "warmup_batch_size": 8,
    "prompts_per_step": 2,
    "group_size": 4,
    "max_new_tokens": 8,
    "gec_max_new_tokens": 4,
    "max_steps": 2,
    "progress": False,
    "lr": 1e-3,
    "gec": True,  # off on the embedded default; the tests cover the loop with it
}


def tiny_flags(**over):
    """TINY (plus overrides) as command-line flags."""
    d = {**TINY, **over}
    out = []
    for k, v in d.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            out += [flag, str(v)]
    return out


def run_cli(args, env_extra=None, timeout=240, kill_at=None):
    """``python -m edge_kernels.train ARGS`` in a fresh process; returns the CompletedProcess. ``kill_at``
    ("STEP:POINT") runs it through ``kill_at.py`` instead, which SIGKILLs the process at that point."""
    env = dict(os.environ)
    env.update(env_extra or {})
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = ([os.path.join(os.path.dirname(os.path.abspath(__file__)), "kill_at.py"), kill_at] if kill_at
           else ["-m", "edge_kernels.train"])
    return subprocess.run([sys.executable, *cmd, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def tiny_model_and_tokenizer():
    """A one-layer embedded Qwen2 model and its tokenizer, built in well under a second."""
    from edge_kernels.train import embedded as E

    tr, _ = E.make_task(0, 60, 0)
    tok = E.build_tokenizer(E.tokenizer_corpus(tr), vocab_size=300)
    cfg = E.ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1)
    return E.build_model(tok, cfg, seed=0), tok


def save_model_with_sampling_defaults(path):
    """A tiny random Qwen2 model directory whose generation_config carries Qwen2.5-Instruct-like sampling
    defaults and two EOS ids (``<|im_end|>`` and ``<|endoftext|>``); returns ``(model, tokenizer, eos_ids)``."""
    from transformers import GenerationConfig

    model, tok = tiny_model_and_tokenizer()
    eos_ids = [tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")]
    assert eos_ids[0] != eos_ids[1]
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, min_p=0.1,
        eos_token_id=eos_ids, pad_token_id=tok.pad_token_id, bos_token_id=eos_ids[1])
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok, eos_ids
