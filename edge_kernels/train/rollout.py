"""Rollout engines: sample continuations of token prefixes.

Both engines take token-id prefixes and return the sampled continuation of each (its EOS included when one
was generated, padding removed). Log-probs and entropies are never taken from the engine: the loop's scoring
pass recomputes them with the fused kernel at the same temperature, so the two engines are interchangeable.

* :class:`HFRollout` - ``model.generate`` with sampling at the configured temperature over the full
  distribution (``top_k=0``), left-padded batches, the torch RNG (seeded by the loop every step).
* :class:`VLLMRollout` - vLLM colocated on the same GPU; the policy's weights are pushed to it after every
  update. A thin wrapper, imported lazily; vLLM is CUDA-only and cannot be installed on CPU CI, so this class is
  not exercised by the CPU test-suite.
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
    """Sampling with ``model.generate`` (``--rollout hf``)."""

    name = "hf"

    def __init__(self, model, tokenizer, *, batch_size: int = 64, progress: Optional[Callable] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]

    def generate(self, prefixes: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, greedy: bool = False, desc: str = "rollout") -> List[List[int]]:
        import torch

        model = self.model
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
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
                with torch.no_grad():
                    gen = model.generate(input_ids=ids.to(device), attention_mask=att.to(device),
                                         generation_config=self._config(max_new_tokens, temperature, top_p, greedy))
                for row in gen[:, width:].tolist():
                    out.append(_strip(row, self.eos_ids))
        finally:
            model.train(was_training)
        return out

    def _config(self, max_new_tokens: int, temperature: float, top_p: float, greedy: bool):
        """A fresh generation config: the model's own defaults (top_k, repetition penalty, ...) would sample from
        a different distribution than the one the scoring pass and the loss use."""
        from transformers import GenerationConfig

        kw = dict(max_new_tokens=int(max_new_tokens), pad_token_id=self.pad_id, eos_token_id=self.eos_ids,
                  bos_token_id=None, use_cache=True, repetition_penalty=1.0)
        if greedy:
            return GenerationConfig(do_sample=False, **kw)
        return GenerationConfig(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0, **kw)

    def sync_weights(self, model) -> None:
        """Nothing to do: ``generate`` runs on the policy itself."""


class VLLMRollout:  # pragma: no cover - needs CUDA and vllm, neither available on CPU CI
    """Sampling with vLLM colocated on the policy's GPU (``--rollout vllm``).

    The engine loads the policy from ``model_path`` once; :meth:`sync_weights` pushes the current policy
    weights into it after every update.
    """

    name = "vllm"

    def __init__(self, model_path: str, tokenizer, *, seed: int, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.3, max_model_len: Optional[int] = None):
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise RuntimeError(VLLM_MISSING) from None
        from vllm import LLM

        self.tokenizer = tokenizer
        self.llm = LLM(model=model_path, tokenizer=model_path, dtype=dtype, seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       enable_prefix_caching=True)
        self._seed = seed
        self._calls = 0

    def generate(self, prefixes: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, greedy: bool = False, desc: str = "rollout") -> List[List[int]]:
        from vllm import SamplingParams

        self._calls += 1
        params = SamplingParams(n=1, temperature=0.0 if greedy else float(temperature), top_p=float(top_p),
                                top_k=-1 if not greedy else 1, max_tokens=int(max_new_tokens),
                                seed=self._seed * 1_000_003 + self._calls)
        prompts = [{"prompt_token_ids": list(p)} for p in prefixes]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def sync_weights(self, model) -> None:
        """Push the policy's weights into the colocated vLLM engine (no disk round trip)."""
        state = model.state_dict()
        items = [(name, t.detach()) for name, t in state.items()]
        engine = self.llm.llm_engine
        # vLLM's in-process model handle moved between versions; try the known locations
        for path in ("model_executor.driver_worker.worker.model_runner.model",
                     "model_executor.driver_worker.model_runner.model"):
            obj = engine
            try:
                for attr in path.split("."):
                    obj = getattr(obj, attr)
            except AttributeError:
                continue
            obj.load_weights(items)
            self.llm.reset_prefix_cache()
            return
        if hasattr(self.llm, "collective_rpc"):
            def _load(worker, weights=items):
                worker.model_runner.model.load_weights(weights)
            self.llm.collective_rpc(_load)
            self.llm.reset_prefix_cache()
            return
        raise RuntimeError("cannot locate the vLLM model to push weights into (unsupported vLLM version); "
                           "use --rollout hf")


def make_rollout(kind: str, model, tokenizer, *, model_path: Optional[str], seed: int, batch_size: int,
                 dtype: str, gpu_memory_utilization: float, progress=None):
    """The engine ``--rollout`` names. vLLM needs a model directory it can load (``--model``) and CUDA."""
    if kind == "hf":
        return HFRollout(model, tokenizer, batch_size=batch_size, progress=progress)
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
                           gpu_memory_utilization=gpu_memory_utilization)
    raise ValueError(f"unknown rollout engine {kind!r}; use hf or vllm")
