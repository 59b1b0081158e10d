"""One RL step of edge-train (:class:`RLStep`): rollout, rewards, GEC, scoring pass, advantages, fused update.

1. sample ``prompts_per_step`` problems (resumable sampler) and ``group_size`` responses each (contiguous groups);
2. rewards: math-verify on the last ``\\boxed{}`` (``accuracy`` in the metrics is the policy's own accuracy,
   before GEC);
3. GEC on the incorrect responses (seeded generator), then every response is re-scored (``reward_mean``);
4. scoring pass: old log-probs and full-vocabulary entropies of all response tokens, injected text included,
   from the last hidden state and the LM head with the fused kernel at the sampling temperature;
5. advantages with ``--estimator``;
6. update with :func:`edge_kernels.losses.fused_linear_policy_loss` from the last hidden states (no logits),
   micro-batched by whole groups.

Every step re-seeds torch from ``(seed, step)`` and GEC's generator likewise, so a resumed run replays exactly
the steps an uninterrupted one would have run. The step reads the run's shared objects (config, model,
tokenizer, rollout engine, optimizer, sampler) from the :class:`~edge_kernels.train.loop.Trainer` it belongs to,
so replacing one there (tests wrap the engine) replaces it here. Each phase's wall and CPU time go into the
metrics line (``rollout_time_s``, ``gec_time_s``, ``scoring_time_s``, ``update_time_s``, and ``*_cpu_time_s``).
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch

from edge_kernels import losses as _losses
from edge_kernels.estimators import Estimate, advantage_stats, compute_advantages, sequence_advantages
from edge_kernels.gec import apply_gec, branch_counts

from .config import loss_options
from .batch import decoder_and_head, head_inputs, head_softcap, pack, response_hidden, score
from .data import Problem
from .rewards import score_responses
from .runtime import PhaseTimer, mix_seed, oom_guard


class Rollout(NamedTuple):
    """One step's responses: per row (``group_size`` consecutive rows per problem) the problem, its prompt,
    the response tokens, which tokens GEC injected, the rewards after GEC, and before it (``rewards0``,
    ``correct0``); ``gec_counts`` = (regenerated, injected, replaced); ``sampled``: the engine's responses
    before GEC, with the engine's log-prob of each sampled token (``sampled_logprobs``; None for ``hf``)."""

    problem_ids: List[int]
    problems: List[Problem]
    prompts: List[List[int]]
    responses: List[List[int]]
    injected: Optional[List[List[bool]]]
    rewards: List[float]
    rewards0: List[float]
    correct0: List[bool]
    gec_counts: Tuple[int, int, int]
    sampled: Optional[List[List[int]]] = None
    sampled_logprobs: Optional[List[List[float]]] = None


#: loss metrics of the objectives and the off-policy mask written to metrics.jsonl (besides ``rollout_is_*``)
_OBJECTIVE_METRICS = ("off_policy_mask_frac", "cov_frac", "vespo_phi_mean", "keep_frac")

METRIC_FIELDS = ("step", "reward_mean", "accuracy", "entropy_mean", "adv_var", "zero_adv_frac", "loss",
                 "gec_applied", "step_time_s")


class RLStep:
    """The RL step of one run (see the module docstring); :meth:`__call__` runs step ``trainer.step + 1``."""

    def __init__(self, trainer):
        self.t = trainer
        self._response_horizon: Optional[int] = None

    # ---------------------------------------------------------------------------------------------- phases

    def advantages(self, rewards, old_logp, entropy, mask) -> Estimate:
        """The configured estimator on the scoring pass's outputs (groups: contiguous blocks of ``group_size``
        rows). With ``eda_entropy_source="current"`` the loss rescales :attr:`Estimate.base` itself."""
        c = self.t.cfg
        return compute_advantages(c.estimator, rewards, mask, group_size=c.group_size, old_logp=old_logp,
                                  entropy=entropy, options=self.t.estimator_options)

    def rollout(self, idx: List[int]) -> Rollout:
        """Sample ``group_size`` responses per problem and score them (before GEC)."""
        t, c, G = self.t, self.t.cfg, self.t.cfg.group_size
        problems = [t.train_problems[i] for i in idx for _ in range(G)]
        prompts = [t.train_prompts[i] for i in idx for _ in range(G)]
        with oom_guard("rollout"):
            responses = t.engine.generate(prompts, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                                          top_p=c.top_p, desc="rollout")
            sampled_logprobs = getattr(t.engine, "last_logprobs", None)
        texts = t.tokenizer.batch_decode(responses, skip_special_tokens=True)
        rewards, correct = score_responses(texts, [p.answer for p in problems], c.format_reward)
        return Rollout([i for i in idx for _ in range(G)], problems, prompts, responses, None, rewards, rewards,
                       correct, (0, 0, 0), responses, sampled_logprobs)

    def correct(self, ro: Rollout, step: int) -> Rollout:
        """GEC on the incorrect responses (generator seeded from ``(seed, step)``), then every response is
        re-scored."""
        t, c = self.t, self.t.cfg
        gen = torch.Generator().manual_seed(mix_seed(c.seed, step, 1))
        answers = [p.answer for p in ro.problems]
        with oom_guard("rollout"):
            fixed = apply_gec(ro.prompts, ro.responses, [not x for x in ro.correct0], answers,
                              [p.solution for p in ro.problems], tokenizer=t.tokenizer, eos_id=t.eos_id,
                              stop_ids=t.stop_ids, generate=t.engine.generate, generator=gen, cfg=t.gec_config,
                              temperature=c.temperature, top_p=c.top_p, problem_ids=ro.problem_ids)
        responses = [f.tokens for f in fixed]
        texts = t.tokenizer.batch_decode(responses, skip_special_tokens=True)
        rewards, _ = score_responses(texts, answers, c.format_reward)
        return ro._replace(responses=responses, injected=[f.injected for f in fixed], rewards=rewards,
                           gec_counts=branch_counts(fixed))

    def update(self, packed, loss_mask, old_logp, est: Estimate,
               rollout_lp: Optional[torch.Tensor] = None) -> Tuple[float, Dict[str, float], float]:
        """``ppo_epochs`` optimizer steps with the fused loss, micro-batched by whole groups; returns the loss,
        the loss metrics (weighted like the loss) and the gradient norm."""
        t, c = self.t, self.t.cfg
        _, weight, bias = decoder_and_head(t.model)
        t.model.train()
        B, T = packed.targets.shape
        mb = c.micro_batch_size or B
        n_tok = loss_mask.sum().clamp(min=1)
        opts = loss_options(c, max(self.response_horizon(), T))  # a fixed Dr.GRPO denominator
        assert (opts.eda == "current") == est.rescale_in_loss
        loss_kw = dict(temperature=c.temperature, group_size=c.group_size, impl=c.impl, options=opts,
                       softcap=head_softcap(t.model))
        advantages = est.base if est.rescale_in_loss else est.advantages
        total, grad_norm = 0.0, float("nan")
        acc: Dict[str, float] = {}
        for _ in range(c.ppo_epochs):
            t.optimizer.zero_grad(set_to_none=True)
            for s in range(0, B, mb):
                sl = slice(s, s + mb)
                part = packed.select(sl)
                h, w_, b_ = head_inputs(response_hidden(t.model, part, t.autocast_dtype), weight, bias,
                                        t.autocast_dtype)
                loss, m = _losses.fused_linear_policy_loss(
                    h, w_, part.targets, advantages[sl], loss_mask[sl], bias=b_, old_logp=old_logp[sl],
                    rollout_logp=None if opts.rollout_is == "off" or rollout_lp is None else rollout_lp[sl],
                    **loss_kw)
                w = (loss_mask[sl].sum() / n_tok).item() if c.loss_agg == "token-mean" else part.rows / B
                (loss * w).backward()
                total += loss.item() * w / c.ppo_epochs
                for k, v in m.items():
                    acc[k] = acc.get(k, 0.0) + float(v) * w / c.ppo_epochs
            grad_norm = self._clip_and_step()
        return total, acc, grad_norm

    def _clip_and_step(self) -> float:
        """Clip the gradient (``max_grad_norm``), take the optimizer step, return the gradient norm."""
        t = self.t
        params = [p for p in t.model.parameters() if p.grad is not None]
        if t.cfg.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.cfg.max_grad_norm))
        else:
            grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0
        t.optimizer.step()
        return grad_norm

    def rollout_check(self, ro: Rollout, packed, old_logp) -> Tuple[Dict[str, float], Optional[torch.Tensor]]:
        """``(metrics, engine log-probs)``: the mean |engine log-prob - scoring-pass log-prob| of the sampled
        tokens (``rollout_logp_diff``, a warning above :data:`~edge_kernels.train.rollout.LOGP_DIFF_WARN`: the
        weight push did not take effect, or the engine's numerics differ), and the engine's log-probs ``[B, T]``
        (``NaN`` on text it did not sample) for the loss's rollout correction (``--rollout-is``,
        ``docs/algorithms.md`` section 8). Nothing for an engine without log-probs (``hf``). With ``--top-p < 1``
        the engine's log-probs are of the nucleus (section 9): the check scores the nucleus too, and the
        log-probs handed to the loss are shifted by ``log pi_old - log pi_old^nucleus`` so that its IS ratio
        ``pi_old / mu`` compares like with like."""
        from .rollout import LOGP_DIFF_WARN, cut_fraction, logp_diff, rollout_logp

        t, c = self.t, self.t.cfg
        got = None if ro.sampled is None else rollout_logp(ro.sampled_logprobs, ro.sampled, packed.targets,
                                                           packed.mask)
        if got is None:
            return {}, None
        lp, valid = got
        lp = lp.to(old_logp.dtype)
        rec: Dict[str, float] = {}
        if c.top_p < 1:  # vLLM's processed log-probs are renormalised over the nucleus: score the same way
            nucleus_logp = score(t.model, packed, temperature=c.temperature, micro_batch=c.micro_batch_size,
                                 impl=c.impl, autocast_dtype=t.autocast_dtype, top_p=c.top_p)[0]
            rec["rollout_cut_frac"] = cut_fraction(valid, nucleus_logp)
            diff = logp_diff(lp, valid, nucleus_logp)
            lp = lp + (old_logp - nucleus_logp)  # a token outside the trainer's nucleus: +inf, IS ratio 0
        else:
            diff = logp_diff(lp, valid, old_logp)
        rec["rollout_logp_diff"] = diff
        if diff > LOGP_DIFF_WARN:
            t.log(f"warning: step {t.step + 1}: rollout_logp_diff {diff:.4f} > {LOGP_DIFF_WARN}: the rollout "
                  "engine's log-probs of its samples differ from the scoring pass's (a weight push that did not "
                  "take effect, or a precision mismatch); --rollout-is corrects a small mismatch")
        nan = torch.full_like(old_logp, float("nan"))
        return rec, torch.where(valid, lp, nan)

    # ---------------------------------------------------------------------------------------------- horizons

    def regeneration_horizon(self) -> int:
        """The longest sampled sequence after the prompt: a response, plus (GEC regeneration) the reflection
        prompt and the continuation. What a rollout engine's context must hold beyond the prompt."""
        c = self.t.cfg
        n = c.max_new_tokens
        if c.gec and c.gec_p_regenerate > 0:
            n += len(self.t.tokenizer.encode(c.gec_reflection, add_special_tokens=False)) + c.gec_max_new_tokens
        return n

    def response_horizon(self) -> int:
        """The longest response the loop can train on, a constant of the run: a regenerated response, one with
        the answer injected, or the longest reference solution of the training set (GEC's branches). Dr.GRPO's
        ``seq-mean-token-sum-norm`` divides by it (its fixed ``max_completion_length``), not by the width of
        whichever batch a step happened to pack."""
        if self._response_horizon is None:
            c, t = self.t.cfg, self.t
            enc = lambda texts: [t.tokenizer.encode(x, add_special_tokens=False) for x in texts]  # noqa: E731
            n = self.regeneration_horizon()
            if c.gec and c.gec_p_inject > 0:
                inj = [c.gec_injection.replace("ANSWER", str(p.answer)) for p in t.train_problems]
                n = max(n, c.max_new_tokens + 1 + max(map(len, enc(inj)), default=0))
            if c.gec and c.gec_p_reference > 0:
                sols = [p.solution for p in t.train_problems if p.solution]
                n = max(n, 1 + max(map(len, enc(sols)), default=0))
            self._response_horizon = n
        return self._response_horizon

    # ---------------------------------------------------------------------------------------------- the step

    def __call__(self) -> Dict[str, Any]:
        """One RL step (see the module docstring); returns its metrics line (without ``step_time_s``)."""
        t, c = self.t, self.t.cfg
        step = t.step + 1
        timer = PhaseTimer()
        torch.manual_seed(mix_seed(c.seed, step))
        with timer("rollout"):
            ro = self.rollout(t.sampler.next(c.prompts_per_step))
        if c.gec:
            with timer("gec"):
                ro = self.correct(ro, step)
        packed = pack(ro.prompts, ro.responses, t.pad_id, injected=ro.injected, device=t.device)
        loss_mask = packed.mask & ~packed.injected if c.gec_mask_injected else packed.mask
        with timer("scoring"), oom_guard("scoring"):
            old_logp, entropy = score(t.model, packed, temperature=c.temperature, micro_batch=c.micro_batch_size,
                                      impl=c.impl, autocast_dtype=t.autocast_dtype)
            r = torch.tensor(ro.rewards, dtype=torch.float32, device=t.device)
            est = self.advantages(r, old_logp, entropy, loss_mask)
            check, rollout_lp = self.rollout_check(ro, packed, old_logp)
        with timer("update"):
            with oom_guard("update"):
                loss, loss_metrics, grad_norm = self.update(packed, loss_mask, old_logp, est, rollout_lp)
            t.engine.sync_weights(t.model)
        t.step = step
        rec = self.record(step, ro, packed, loss_mask, entropy, est, loss, loss_metrics, grad_norm)
        rec.update(check)
        rec.update({k: v for k, v in loss_metrics.items() if k.startswith("rollout_is_") or k in _OBJECTIVE_METRICS})
        rec.update(timer.record())
        return rec

    def record(self, step, ro: Rollout, packed, loss_mask, entropy, est: Estimate, loss, m, grad_norm,
               ) -> Dict[str, Any]:
        """The metrics line of a step. With EDA ``"current"`` the rescaled advantages live inside the loss, so
        their statistics come from the loss's metrics."""
        if est.rescale_in_loss:
            adv_var = m.get("adv_group_var", float("nan"))
            zero_frac = m.get("zero_adv_group_frac", float("nan"))
        else:
            stats = advantage_stats(est.advantages, loss_mask, group_size=self.t.cfg.group_size)
            adv_var, zero_frac = float(stats["adv_group_var"]), float(stats["zero_adv_group_frac"])
        lm = loss_mask.to(entropy.dtype)
        n_regen, n_inj, n_ref = ro.gec_counts
        return {
            "step": step,
            "reward_mean": sum(ro.rewards) / len(ro.rewards),
            "accuracy": sum(ro.correct0) / len(ro.correct0),
            "reward_mean_rollout": sum(ro.rewards0) / len(ro.rewards0),
            "entropy_mean": float((entropy * lm).sum() / lm.sum().clamp(min=1)),
            "adv_var": adv_var,
            "zero_adv_frac": zero_frac,
            "adv_abs_mean": float(sequence_advantages(est.advantages, loss_mask).abs().mean()),
            "loss": loss,
            "gec_applied": n_regen + n_inj + n_ref,
            "gec_regenerate": n_regen,
            "gec_inject": n_inj,
            "gec_reference": n_ref,
            "response_len_mean": float(packed.mask.sum(-1).float().mean()),
            "clip_frac": m.get("clip_frac_low", 0.0) + m.get("clip_frac_high", 0.0),
            "approx_kl": m.get("approx_kl", 0.0),
            "grad_norm": grad_norm,
            "lr": self.t.optimizer.param_groups[0]["lr"],
            "epoch": self.t.sampler.epoch,
        }
