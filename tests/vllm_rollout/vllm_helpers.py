"""Helpers of the vLLM tests: an embedded model whose head size (32) vLLM's CPU attention supports."""

import torch

from edge_kernels.train.batch import pack, score
from train.train_helpers import TINY

# the edge-train tests' TINY configuration with a head size of 32 (TINY's is 16, which the CPU build refuses)
TINY_VLLM = {**TINY, "embedded_hidden_size": 64, "embedded_intermediate_size": 128, "rollout": "vllm"}


def cli_flags(**over):
    """TINY_VLLM (plus overrides) as edge-train command-line flags."""
    out = []
    for k, v in {**TINY_VLLM, **over}.items():
        flag = k.replace("_", "-")
        out += [f"--{flag}" if v else f"--no-{flag}"] if isinstance(v, bool) else [f"--{flag}", str(v)]
    return out


def model_and_tokenizer(hidden=64, heads=2):
    from edge_kernels.train import embedded as E

    tr, _ = E.make_task(0, 60, 0)
    tok = E.build_tokenizer(E.tokenizer_corpus(tr), vocab_size=300)
    cfg = E.ModelConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                        num_attention_heads=heads, num_key_value_heads=1)
    return E.build_model(tok, cfg, seed=0), tok


def scoring_logp(model, prompts, responses, temperature):
    """The trainer's scoring pass (fused kernel) over ``responses``: ``(logp [B, T], packed)``."""
    packed = pack(prompts, responses, 0)
    logp, _ = score(model, packed, temperature=temperature, impl="torch")
    return logp, packed


def perturb(model, steps=3, lr=1e-2):
    """A few AdamW steps on a next-token loss: weights that differ from the engine's."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    ids = torch.randint(3, 200, (4, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        out = model(input_ids=ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
