"""GEC (EDGE-GRPO Guided Error Correction) inside TRL's generation step, and the vLLM CPU weight push.

:class:`GECMixin` overrides ``GRPOTrainer._generate``: right after sampling, incorrect completions are corrected
by the library's :func:`edge_kernels.gec.apply_gec` (shared with ``edge-train``); TRL then re-scores every
completion and recomputes the old log-probs of the corrected batch.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext

import torch
from trl import GRPOTrainer
from trl.data_utils import is_conversational
from trl.models import unwrap_model_for_generation

from edge_kernels.gec import GECConfig, GECError, apply_gec, branch_counts, choose_branches, gec_config_from


class GECMixin:
    """GEC methods of :class:`~edge_kernels.integrations.trl.EdgeGRPOTrainer` (mixed in before ``GRPOTrainer``)."""


    def _generate(self, prompts):
        result = super()._generate(prompts)
        if not (self.args.gec and self.model.training):
            return result
        return self._gec_correct(prompts, *result)

    def _gec_config(self) -> GECConfig:
        return gec_config_from(self.args)

    def _gec_correct(self, prompts, prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields,
                     images, tool_images):
        """GEC on the sampled batch through :func:`edge_kernels.gec.apply_gec` (the library's GEC, shared
        with ``edge-train``); TRL then re-scores every completion and recomputes the old log-probs (scoring
        pass) and the advantages of the corrected batch."""
        a = self.args
        cfg = self._gec_config()
        inputs = self._edge_batch_inputs
        if inputs is None or len(inputs) != len(completion_ids):  # pragma: no cover
            raise RuntimeError("GEC: the batch's dataset rows are not available")
        # Score the sampled completions. Reward functions' log_extra / log_metric calls of this extra pass are
        # dropped so the completions table stays aligned (TRL re-scores the corrected batch right after).
        saved = (copy.deepcopy(self._pending_extra_logs), copy.deepcopy(self._pending_metrics))
        rpf = GRPOTrainer._calculate_rewards(self, inputs, prompts, completions, completion_ids)
        self._pending_extra_logs.clear()
        self._pending_extra_logs.update(saved[0])
        self._pending_metrics.clear()
        self._pending_metrics.update(saved[1])
        n = len(completion_ids)
        pi = self.accelerator.process_index
        rewards = (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1)[pi * n:(pi + 1) * n]
        incorrect = (rewards < a.gec_correct_reward).tolist()

        # Every process must generate when any does (generation runs collectives under FSDP): look ahead at the
        # branches on a copy of the generator, apply_gec then draws the same ones.
        probe = torch.Generator().manual_seed(0)
        probe.set_state(self._gec_generator.get_state())
        n_regen = sum(b == "regenerate" for b in choose_branches(incorrect, probe, cfg))
        any_regen = n_regen
        if self.accelerator.num_processes > 1:
            any_regen = int(self.accelerator.gather(torch.tensor([n_regen], device=self.accelerator.device)).sum())

        tok = self._tokenizer
        eos_id = tok.eos_token_id if tok.eos_token_id is not None else self.eos_token_ids[0]
        try:
            corrected = apply_gec(
                prompt_ids, completion_ids, incorrect,
                [_field(r, a.gec_answer_column) for r in inputs], [_field(r, a.gec_solution_column) for r in inputs],
                tokenizer=tok, eos_id=eos_id, stop_ids=list(self.eos_token_ids), generate=self._gec_generate,
                generator=self._gec_generator, cfg=cfg,
            )
        except GECError as exc:
            raise ValueError(f"{exc}; the dataset columns are {a.gec_answer_column!r} / {a.gec_solution_column!r} "
                             "(gec_answer_column / gec_solution_column)") from exc
        if n_regen == 0 and any_regen > 0:
            self._gec_generate([list(prompt_ids[0])], max_new_tokens=cfg.max_new_tokens)  # collective partner

        new_ids = [c.tokens for c in corrected]
        changed = [i for i, c in enumerate(corrected) if c.branch not in (None, "none")]
        if changed:
            texts = self.processing_class.batch_decode([new_ids[i] for i in changed], skip_special_tokens=True)
            completions = list(completions)
            conv = is_conversational({"prompt": prompts[0]})
            for i, text in zip(changed, texts):
                completions[i] = [{"role": "assistant", "content": text}] if conv else text
        if a.gec_mask_injected:  # TRL's tool mask: 1 = trained on, 0 = excluded from the loss
            tool_mask = [[0 if inj else 1 for inj in c.injected] for c in corrected]
        counts = torch.tensor([sum(incorrect), *branch_counts(corrected), n], dtype=torch.float32,
                              device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.gather(counts.unsqueeze(0)).sum(0)
        total = counts[-1].clamp(min=1)
        for k, v in zip(("incorrect_frac", "regenerated_frac", "injected_frac", "replaced_frac"), counts[:-1]):
            self._metrics["train"][f"gec/{k}"].append((v / total).item())
        new_logprobs = None
        if logprobs is not None:  # vLLM: TRL's importance sampling needs the sampling log-prob of every token
            new_logprobs = _gec_sampling_logprobs(corrected, completion_ids, logprobs, self._gec_regen_logprobs)
        self._gec_regen_logprobs = None
        return prompt_ids, new_ids, tool_mask, completions, new_logprobs, extra_fields, images, tool_images

    def _gec_generate(self, prefixes, max_new_tokens, **_ignored):
        """The policy's continuations of ``prefixes`` (token lists), each cut after its first EOS; sampling
        follows the trainer's generation config (temperature, top-p/k, ...) with ``max_new_tokens``. With
        ``use_vllm=True`` through TRL's own vLLM engine (:meth:`_gec_generate_vllm`)."""
        if self.use_vllm:
            return self._gec_generate_vllm(prefixes, max_new_tokens)
        a = self.args
        pad_id = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        width = max(len(c) for c in prefixes)
        device = self.accelerator.device
        input_ids = torch.tensor([[pad_id] * (width - len(c)) + list(c) for c in prefixes], device=device)
        attention = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in prefixes], device=device)
        gen_config = copy.deepcopy(self.generation_config)
        gen_config.max_new_tokens = max_new_tokens
        summon = self._dist.summon_full_params if hasattr(self, "_dist") else None
        with (
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=a.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=a.gradient_checkpointing_kwargs,
            ) as unwrapped,
            torch.no_grad(),
            summon(self.model_wrapped, recurse=False) if summon is not None else nullcontext(),
        ):
            out = unwrapped.generate(input_ids=input_ids, attention_mask=attention, generation_config=gen_config)
        eos = set(self.eos_token_ids)
        conts = []
        for row in out[:, width:].tolist():
            cont = []
            for t in row:
                cont.append(t)
                if t in eos:
                    break
            conts.append(cont)
        return conts

    def _gec_generate_vllm(self, prefixes, max_new_tokens):
        """GEC's regeneration through TRL's own vLLM engine (colocate mode), with the trainer's sampling settings
        and ``max_new_tokens``: TRL's ``generate`` with its completion limit swapped for the call. Keeps the
        continuations' sampling log-probs (cut like the tokens) for :func:`_gec_sampling_logprobs`."""
        gen = self.vllm_generation
        saved = gen.max_completion_length
        gen.max_completion_length = int(max_new_tokens)
        try:
            _, completion_ids, logprobs, _ = gen.generate(prompts=[list(p) for p in prefixes], images=None,
                                                          num_generations=1)
        finally:
            gen.max_completion_length = saved
        eos = set(self.eos_token_ids)
        conts, lps = [], []
        for i, row in enumerate(completion_ids):
            cont = []
            for t in row:
                cont.append(int(t))
                if t in eos:
                    break
            conts.append(cont)
            lps.append([lp[0] for lp in logprobs[i][:len(cont)]] if logprobs is not None else [None] * len(cont))
        self._gec_regen_logprobs = lps
        return conts


def _gec_sampling_logprobs(corrected, completion_ids, logprobs, regen_logprobs):
    """The vLLM sampling log-probs of GEC's corrected completions, one per token, for TRL's importance-sampling
    correction: a kept prefix of the sampled completion keeps its log-probs, a regenerated continuation gets the
    regeneration's (in order, one list per ``"regenerate"`` row), text vLLM did not sample (reflection,
    injection, reference) gets ``None``, which TRL maps to NaN and then to an importance ratio of 1."""
    regen = iter(regen_logprobs or [])
    out = []
    for c, old_ids, old_lp in zip(corrected, completion_ids, logprobs):
        if c.branch in (None, "none"):
            out.append(list(old_lp))
            continue
        n_keep = 0
        while (n_keep < min(len(old_ids), len(c.tokens)) and not c.injected[n_keep]
               and c.tokens[n_keep] == old_ids[n_keep]):
            n_keep += 1
        lps = list(old_lp[:n_keep])
        lps += [None] * sum(c.injected[n_keep:])
        if c.branch == "regenerate":
            cont = next(regen)
            lps += list(cont)
        if len(lps) != len(c.tokens):  # pragma: no cover - apply_gec's layout: prefix, injected text, continuation
            raise RuntimeError(f"GEC: {len(lps)} sampling log-probs for a {len(c.tokens)}-token corrected completion")
        out.append(lps)
    return out


def _push_through_reload_weights_on_cpu(generation) -> None:
    """On vLLM's CPU build, TRL's colocate weight push (the model's ``load_weights``, one parameter at a time)
    fails on the prepacked Linear weights (``'Parameter' object has no attribute 'weight_loader'``) and would
    leave the packed copy of ``lm_head`` stale. There the push goes through the worker's ``reload_weights`` with
    TRL's own parameter iterator (names mapped, gathered one at a time), which re-runs vLLM's weight processing.
    GPU builds keep TRL's push."""
    if getattr(generation, "mode", None) != "colocate":
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return

    def sync_weights():
        if generation.enable_sleep_mode:
            generation.llm.wake_up(tags=["weights"])
            generation._llm_weights_sleeping = False
        # in-process engine (TRL's external_launcher executor): the iterator is consumed where it is made
        generation.llm.collective_rpc("reload_weights", kwargs=dict(
            weights_iterator=generation._iter_named_params(), is_checkpoint_format=True))
        generation.llm.reset_prefix_cache()

    generation.sync_weights = sync_weights


def _field(row: dict, column: str):
    value = row.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value):
        return None
    return value

