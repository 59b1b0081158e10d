"""Loading the policy: a local Hugging Face causal LM (``--model PATH``), with errors that say what is wrong."""

from __future__ import annotations

import os
from typing import Any, List, Tuple

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


def resolve_dtype(dtype: str, device: torch.device, embedded: bool, param_dtype: str = "float32") -> torch.dtype:
    """The compute dtype ``--dtype`` names (``edge-train eval``: also the dtype the weights are loaded in)."""
    if dtype == "auto":
        if param_dtype == "bfloat16":
            return torch.bfloat16
        if device.type == "cuda" and not embedded and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return _DTYPES[dtype]


def _ids(x) -> List[int]:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return [int(t) for t in x if t is not None]
    return [int(x)]


def stop_token_ids(tokenizer, generation_config=None) -> List[int]:
    """The token ids that end a response, shared by every rollout engine, GEC and the scoring of responses: the
    tokenizer's EOS first (what GEC appends), then the model's ``generation_config.eos_token_id`` (an id or a
    list: Qwen2.5-Instruct stops on ``<|im_end|>`` and ``<|endoftext|>``), then the chat template's end-of-turn
    token ``<|im_end|>`` when the tokenizer has one."""
    out: List[int] = []
    for t in _ids(tokenizer.eos_token_id) + _ids(getattr(generation_config, "eos_token_id", None)):
        if t not in out:
            out.append(t)
    try:
        tid = tokenizer.convert_tokens_to_ids("<|im_end|>")
        ok = isinstance(tid, int) and tokenizer.convert_ids_to_tokens(tid) == "<|im_end|>"
    except Exception:  # noqa: BLE001 - a tokenizer without that token
        ok = False
    if ok and tid not in out:
        out.append(tid)
    return out


def clean_generation_config(generation_config, tokenizer):
    """A ``GenerationConfig`` holding only the special-token ids of ``generation_config``. A model's own sampling
    defaults (Qwen2.5-Instruct: temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05) would make
    ``generate`` sample from another distribution than the one the scoring pass and the loss assume, and greedy
    evaluation sample; transformers fills every field a ``generate(generation_config=...)`` leaves unset from
    ``model.generation_config``, so the model's must hold none of them."""
    from transformers import GenerationConfig

    eos = getattr(generation_config, "eos_token_id", None)
    pad = getattr(generation_config, "pad_token_id", None)
    bos = getattr(generation_config, "bos_token_id", None)
    return GenerationConfig(eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
                            pad_token_id=pad if pad is not None else tokenizer.pad_token_id,
                            bos_token_id=bos)


# the model's own generation_config as loaded: checkpoint.save writes it back into the checkpoint's model
# directory, so a trained model keeps its recommended sampling settings for use outside edge-train
SOURCE_GENERATION_CONFIG = "edge_train_source_generation_config"


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


def load_pretrained(path: str, *, dtype: torch.dtype, device: torch.device) -> Tuple[Any, Any]:
    """``(model, tokenizer)`` from a local directory, the parameters in ``dtype``; a model that is not a causal LM
    is a :class:`ModelError`. The model's ``generation_config`` is replaced by :func:`clean_generation_config`."""
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
    source = getattr(model, "generation_config", None)
    model.generation_config = clean_generation_config(source, tokenizer)
    if source is not None:
        setattr(model, SOURCE_GENERATION_CONFIG, source)
    return model.to(device), tokenizer  # type: ignore[arg-type]  # transformers types .to() for its own models only
