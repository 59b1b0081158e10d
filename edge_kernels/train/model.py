"""Loading the policy: a local Hugging Face causal LM (``--model PATH``), with errors that say what is wrong."""

from __future__ import annotations

import os
from typing import Tuple

import torch


class ModelError(ValueError):
    """A model path that edge-train cannot train (reported to the user without a traceback)."""


# encoder families that AutoModelForCausalLM accepts only when configured as a decoder
_ENCODER_FAMILIES = {"bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "electra", "ernie",
                     "megatron-bert", "rembert", "roberta-prelayernorm", "xmod", "data2vec-text", "big_bird",
                     "bert-generation"}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ModelError(f"--device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device, embedded: bool) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and not embedded and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return _DTYPES[dtype]


def model_dir(path: str) -> str:
    """Accept a model directory, an edge-train output directory or its ``checkpoint/``."""
    for cand in (path, os.path.join(path, "model"), os.path.join(path, "checkpoint", "model"),
                 os.path.join(path, "checkpoint.old", "model")):
        if os.path.isfile(os.path.join(cand, "config.json")):
            return cand
    if not os.path.exists(path):
        raise ModelError(f"--model {path}: no such directory (edge-train loads local models only; no downloads)")
    raise ModelError(f"--model {path}: no config.json there; expected a Hugging Face model directory (as written "
                     "by save_pretrained) or an edge-train output directory")


def load_pretrained(path: str, *, dtype: torch.dtype, device: torch.device) -> Tuple[object, object]:
    """``(model, tokenizer)`` from a local directory; a model that is not a causal LM is a :class:`ModelError`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = model_dir(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"--model {path}: cannot read its config.json ({e})") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    encoder_only = config.model_type in _ENCODER_FAMILIES and not getattr(config, "is_decoder", False)
    if (getattr(config, "is_encoder_decoder", False) or encoder_only
            or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        archs = ", ".join(getattr(config, "architectures", None) or []) or "unknown architecture"
        raise ModelError(f"--model {path} holds a {config.model_type!r} model ({archs}), which is not a causal "
                         "(decoder-only) language model; edge-train needs a model that AutoModelForCausalLM loads, "
                         "e.g. a Qwen2.5-Math checkpoint")
    if getattr(config, "final_logit_softcapping", None):
        raise ModelError(f"--model {path}: final-logit soft-capping ({config.model_type}) is not supported by the "
                         "fused log-prob kernels")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"--model {path}: AutoModelForCausalLM cannot load it ({type(e).__name__}: {e})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"--model {path}: no usable tokenizer in the directory ({e})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer
