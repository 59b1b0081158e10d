"""Rollout engines: sample continuations of token prefixes.

Both engines take token-id prefixes and return the sampled continuation of each (its EOS included when one
was generated, padding removed). Log-probs and entropies are never taken from the engine: the loop's scoring
pass recomputes them with the fused kernel at the same temperature, so the two engines are interchangeable.

* :class:`HFRollout` - ``model.generate`` with sampling at the configured temperature over the full
  distribution (``top_k=0``), left-padded batches, the torch RNG (seeded by the loop every step).
* :class:`VLLMRollout` - vLLM colocated on the same GPU, its engine in this process; the policy's weights are
  pushed to it whenever they change. A thin wrapper, imported lazily; vLLM is CUDA-only and cannot be installed
  on CPU CI, so the CPU test-suite checks this code against a fake ``vllm`` module.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

VLLM_MISSING = (
    "--rollout vllm needs the vllm package (pip install 'edge-kernels[vllm]'); vLLM is CUDA-only and pins its own "
    "torch version. Use --rollout hf (model.generate) instead."
)


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


# where vLLM keeps the model in the engine process: V1 in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0),
# then the older V0 layout
_VLLM_MODEL_PATHS = ("model_executor.driver_worker.worker.model_runner.model",
                     "model_executor.driver_worker.model_runner.model")


class VLLMRollout:
    """Sampling with vLLM colocated on the policy's GPU (``--rollout vllm``).

    The engine loads the policy from ``model_path`` once, in this process; :meth:`sync_weights` pushes the
    current policy weights into it (after every update, after the warm-up and after a resume). Needs CUDA and
    the vllm package; the CPU test-suite runs this code against a fake ``vllm`` module.
    """

    name = "vllm"

    def __init__(self, model_path: str, tokenizer, *, seed: int, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.3, max_model_len: Optional[int] = None,
                 stop_ids: Optional[Sequence[int]] = None):
        import os

        # the weight push reaches into the engine's model, which needs the engine in this process: vLLM runs its
        # engine core in a separate process by default (and refuses to pickle a function for collective_rpc).
        # Set before vLLM reads it; a value the user set wins (and makes sync_weights fail with a clear error).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise RuntimeError(VLLM_MISSING) from None
        from vllm import LLM

        from .model import stop_token_ids

        self.tokenizer = tokenizer
        self.stop_ids = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer)
        self.dtype = dtype
        self.llm = LLM(model=model_path, tokenizer=model_path, dtype=dtype, seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       enable_prefix_caching=True)

    def sampling_params(self, n: int, *, max_new_tokens: int, temperature: float, top_p: float, greedy: bool):
        """One ``SamplingParams`` per request, each with its own seed: vLLM seeds a request's generator from its
        ``seed``, so one shared seed would give the G identical prompts of a group identical samples. The base
        seed comes from the torch RNG, which the loop re-seeds from ``(--seed, step)``: runs (and resumed runs)
        are reproducible."""
        import torch
        from vllm import SamplingParams

        base = int(torch.randint(0, 2 ** 62, (1,)).item())
        return [SamplingParams(n=1, temperature=0.0 if greedy else float(temperature),
                               top_p=1.0 if greedy else float(top_p), top_k=1 if greedy else -1,
                               max_tokens=int(max_new_tokens), seed=base + i, stop_token_ids=list(self.stop_ids))
                for i in range(n)]

    def generate(self, prefixes: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, greedy: bool = False, desc: str = "rollout") -> List[List[int]]:
        if not prefixes:
            return []
        params = self.sampling_params(len(prefixes), max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_p=top_p, greedy=greedy)
        prompts = [{"prompt_token_ids": [int(t) for t in p]} for p in prefixes]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [_strip(o.outputs[0].token_ids, self.stop_ids) for o in outs]

    def sync_weights(self, model) -> None:
        """Push the policy's weights into the colocated vLLM engine (in memory, no disk round trip), cast one
        tensor at a time to the engine's dtype."""
        import torch

        engine = self.llm.llm_engine
        target = None
        for path in _VLLM_MODEL_PATHS:
            obj = engine
            try:
                for attr in path.split("."):
                    obj = getattr(obj, attr)
            except AttributeError:
                continue
            target = obj
            break
        if target is None:
            import os

            raise RuntimeError(
                "cannot reach the vLLM engine's model to push the policy's weights into: the engine is not running "
                "in this process (VLLM_ENABLE_V1_MULTIPROCESSING="
                f"{os.environ.get('VLLM_ENABLE_V1_MULTIPROCESSING', 'unset')}; edge-train needs 0) or this vLLM "
                "version keeps its model elsewhere; use --rollout hf")
        dt = getattr(torch, self.dtype, None) if isinstance(self.dtype, str) else None
        dt = dt if isinstance(dt, torch.dtype) else None
        weights = ((name, t.detach() if dt is None else t.detach().to(dt)) for name, t in model.state_dict().items())
        target.load_weights(weights)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights


def make_rollout(kind: str, model, tokenizer, *, model_path: Optional[str], seed: int, batch_size: int,
                 dtype: str, gpu_memory_utilization: float, progress=None, stop_ids: Optional[Sequence[int]] = None,
                 max_model_len: Optional[int] = None, autocast_dtype=None):
    """The engine ``--rollout`` names. vLLM needs a model directory it can load (``--model``) and CUDA.
    ``max_model_len`` (vLLM) sizes the KV cache for the longest sequence the loop can ask for, not for the model's
    full context."""
    if kind == "hf":
        return HFRollout(model, tokenizer, batch_size=batch_size, progress=progress, stop_ids=stop_ids,
                         autocast_dtype=autocast_dtype)
    if kind == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise RuntimeError(VLLM_MISSING) from None
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("--rollout vllm needs a CUDA GPU; use --rollout hf on this machine")
        if model_path is None:
            raise RuntimeError("--rollout vllm needs --model PATH (vLLM loads the model from disk); the embedded "
                               "default uses --rollout hf")
        return VLLMRollout(model_path, tokenizer, seed=seed, dtype=dtype,
                           gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                           stop_ids=stop_ids)
    raise ValueError(f"unknown rollout engine {kind!r}; use hf or vllm")
