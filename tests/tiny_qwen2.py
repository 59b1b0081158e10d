"""The tiny randomly initialised Qwen2 that the TRL adapter's tests train, in one process or several (offline;
sized for ``char_tokenizer.make_tokenizer``)."""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def tiny_qwen2(tokenizer, seed: int = 0) -> Qwen2ForCausalLM:
    """Hidden 32, 2 layers, untied head scaled by 8: the next-token distributions are far from uniform, so the
    entropies the estimators read are non-trivial."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def save_tiny_qwen2(path, tokenizer) -> str:
    """``tiny_qwen2`` and the tokenizer saved to ``path`` for ``from_pretrained``; returns ``str(path)``."""
    tiny_qwen2(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
