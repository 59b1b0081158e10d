"""The EDGE-GRPO loop: rollouts, rewards, GEC, scoring pass, advantages, fused policy update, eval, checkpoints.

One RL step (``Trainer.rl_step``):

1. sample ``prompts_per_step`` problems (resumable sampler) and ``group_size`` responses each (contiguous groups);
2. rewards: math-verify on the last ``\\boxed{}`` (``accuracy`` in the metrics is the policy's own accuracy,
   before GEC);
3. GEC on the incorrect responses (seeded generator), then every response is re-scored (``reward_mean``);
4. scoring pass: old log-probs and full-vocabulary entropies of all response tokens, injected text included,
   from the last hidden state and the LM head with the fused kernel at the sampling temperature;
5. advantages with ``--estimator``;
6. update with :func:`edge_kernels.losses.fused_linear_policy_loss` from the last hidden states (no logits),
   micro-batched by whole groups;
7. one line of metrics to ``metrics.jsonl`` (then the checkpoint, so a kill never loses a logged step).

Every step re-seeds torch from ``(seed, step)`` and GEC's generator likewise, so a resumed run replays exactly
the steps an uninterrupted one would have run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from edge_kernels.estimators import Estimate, advantage_stats, compute_advantages, sequence_advantages
from edge_kernels.gec import apply_gec, branch_counts
from edge_kernels import losses as _losses

from . import checkpoint as ckpt
from .batch import decoder_and_head, head_inputs, head_softcap, pack, response_hidden, score
from .config import TrainConfig, estimator_options, gec_options, loss_options, resolve, save_yaml
from .data import DataError, Problem, PromptSampler, encode_prompts, load_problems, write_problems
from .evaluate import EvalResult, evaluate
from .rewards import score_responses


class TrainError(RuntimeError):
    """A run that cannot go on, with what to do about it (reported without a traceback)."""


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


METRIC_FIELDS = ("step", "reward_mean", "accuracy", "entropy_mean", "adv_var", "zero_adv_frac", "loss",
                 "gec_applied", "step_time_s")

#: loss metrics of the objectives and the off-policy mask written to metrics.jsonl (besides ``rollout_is_*``)
_OBJECTIVE_METRICS = ("off_policy_mask_frac", "cov_frac", "vespo_phi_mean", "keep_frac")

_OOM_HINTS = {
    "rollout": "lower --rollout-batch-size, --max-new-tokens or --gec-max-new-tokens",
    "scoring": "set --micro-batch-size (a multiple of --group-size), or lower --max-new-tokens",
    "update": "set --micro-batch-size (a multiple of --group-size) or pass --gradient-checkpointing",
    "warmup": "lower --warmup-batch-size",
    "eval": "lower --rollout-batch-size or --max-new-tokens",
}


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike hash())."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def _fault_point(step: int, point: str) -> None:
    """Fault injection for the resume tests: ``EDGE_TRAIN_KILL_AT=STEP:POINT`` SIGKILLs this process at
    ``POINT`` (``update``: after the update, before the metrics line; ``metrics``: after the metrics line, before
    the checkpoint; ``checkpoint``: with the new checkpoint written but not yet swapped in) of step ``STEP``."""
    spec = os.environ.get("EDGE_TRAIN_KILL_AT")
    if spec and spec == f"{step}:{point}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


@contextmanager
def oom_guard(phase: str):
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - re-raised unless it is an OOM
        if _is_oom(e):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise TrainError(f"out of memory during {phase}: {_OOM_HINTS[phase]}") from e
        raise


def _progress(enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    def make(iterable=None, **kw):
        return tqdm(iterable, leave=False, dynamic_ncols=True, file=sys.stderr, **kw)

    return make


class Trainer:
    """Runs edge-train from a :class:`TrainConfig` (see :mod:`edge_kernels.train.config`)."""

    def __init__(self, cfg: TrainConfig, log: Optional[Callable[[str], None]] = None):
        self.cfg = resolve(cfg)
        self.estimator_options = estimator_options(self.cfg)
        self.gec_config = gec_options(self.cfg)
        self._log = log
        self.embedded = self.cfg.model is None
        self.out = os.path.abspath(self.cfg.output)
        self.step = 0
        self.warmup_eval: Optional[Dict[str, Any]] = None
        self.final_eval: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------------------------------ helpers

    def log(self, msg: str) -> None:
        if self._log is not None:
            self._log(msg)
            return
        if self.cfg.progress:
            from tqdm.auto import tqdm

            tqdm.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)


    # ------------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        from .model import resolve_device, resolve_dtype

        c = self.cfg
        if c.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.device = resolve_device(c.device)
        try:  # an impl the device cannot run fails here, not deep inside the first step
            from edge_kernels.ops.backend_choice import resolve_impl

            resolve_impl(c.impl, torch.empty(0, device=self.device), op="linear_logprob_entropy")
        except (ValueError, RuntimeError, NotImplementedError) as e:
            raise TrainError(f"--impl {c.impl}: {e}") from None
        if c.cpu_threads:
            torch.set_num_threads(c.cpu_threads)
        elif self.embedded and self.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass
        # mixed precision: the parameters (and AdamW's state) in --param-dtype, the forward passes in --dtype
        self.dtype = resolve_dtype(c.dtype, self.device, self.embedded, c.param_dtype)
        self.param_dtype = torch.bfloat16 if c.param_dtype == "bfloat16" else torch.float32
        if self.dtype == torch.float16:  # pragma: no cover - validate() refuses it first
            raise TrainError("--dtype float16 cannot train (no loss scaling); use --dtype bfloat16")
        self.autocast_dtype = self.dtype if self.dtype != self.param_dtype else None
        if self.param_dtype == torch.bfloat16:
            self.log("warning: --param-dtype bfloat16: the weights and AdamW's state are bf16, and AdamW updates "
                     "smaller than bf16's resolution (about 0.4% of a weight's magnitude) are rounded away: at "
                     f"--lr {c.lr:g} most updates are lost. Use --param-dtype float32 (fp32 master weights, about 16 "
                     "bytes/parameter with AdamW) unless memory forbids it.")
        os.makedirs(self.out, exist_ok=True)
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        self.resume_from = ckpt.find(self.out) if c.resume else None
        if c.resume and self.resume_from is None:
            self.log(f"--resume {self.out}: no checkpoint yet; starting from the beginning")
        if not c.resume and (ckpt.find(self.out) or os.path.exists(self.metrics_path)):
            raise TrainError(f"{self.out} already holds a run; pass --resume {self.out} to continue it, or choose "
                             "another --output")
        self._setup_data_and_model()
        save_yaml(c, os.path.join(self.out, "config.yaml"))

    def _setup_data_and_model(self) -> None:
        c = self.cfg
        need_solution = c.gec and c.gec_p_reference > 0
        self.embedded_task = c.data is None
        # data
        if c.data is None:
            from .embedded import TaskConfig, make_task

            task = TaskConfig(max_operand=c.embedded_max_operand, two_step_frac=c.embedded_two_step_frac)
            tr, ev = make_task(c.seed, c.embedded_train_size, c.embedded_eval_size, task)
            self.train_problems = [Problem(**r) for r in tr]
            self.eval_problems = [Problem(**r) for r in ev]
            os.makedirs(os.path.join(self.out, "data"), exist_ok=True)
            write_problems(self.train_problems, os.path.join(self.out, "data", "train.jsonl"))
            write_problems(self.eval_problems, os.path.join(self.out, "data", "eval.jsonl"))
        else:
            self.train_problems = load_problems(c.data, problem_field=c.problem_field, answer_field=c.answer_field,
                                                solution_field=c.solution_field, need_solution=need_solution)
            self.eval_problems = []
        if c.eval_data is not None:
            self.eval_problems = load_problems(c.eval_data, problem_field=c.problem_field,
                                               answer_field=c.answer_field, solution_field=c.solution_field)
        if c.max_eval_problems:
            self.eval_problems = self.eval_problems[:c.max_eval_problems]
        if c.warmup_steps and not self.resume_from:
            missing = [i for i, p in enumerate(self.train_problems) if not p.solution]
            if missing:
                raise DataError(f"--warmup-steps {c.warmup_steps} trains on reference solutions, but problem "
                                f"#{missing[0]} (and {len(missing) - 1} more) has none; pass --warmup-steps 0")

        # model and tokenizer
        from .model import load_pretrained

        if self.resume_from is not None:
            self.model, self.tokenizer = load_pretrained(os.path.join(self.resume_from, "model"),
                                                         dtype=self.param_dtype, device=self.device)
        elif self.embedded:
            from .embedded import ModelConfig, build_model, build_tokenizer, tokenizer_corpus

            rows = [{"problem": p.problem, "solution": p.solution or ""} for p in self.train_problems]
            self.tokenizer = build_tokenizer(
                tokenizer_corpus(rows, extra=[c.gec_reflection, c.gec_injection, c.system_prompt]),
                vocab_size=c.embedded_vocab_size)
            mcfg = ModelConfig(hidden_size=c.embedded_hidden_size, intermediate_size=c.embedded_intermediate_size,
                               num_hidden_layers=c.embedded_layers, num_attention_heads=c.embedded_heads,
                               num_key_value_heads=max(1, c.embedded_heads // 2),
                               max_position_embeddings=max(256, 2 * (c.max_prompt_tokens + c.max_new_tokens)))
            self.model = build_model(self.tokenizer, mcfg, seed=c.seed).to(self.device, self.param_dtype)
        else:
            self.model, self.tokenizer = load_pretrained(c.model, dtype=self.param_dtype, device=self.device)
        decoder_and_head(self.model)  # fails early on a model without a decoder / LM head
        if c.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.pad_id = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise TrainError("the tokenizer has no EOS token; responses could never end")
        self.eos_id = eos
        from .model import stop_token_ids

        # the tokens that end a response, for every engine, GEC and the scoring (tokenizer EOS first)
        self.stop_ids = stop_token_ids(self.tokenizer, getattr(self.model, "generation_config", None))

        self.train_prompts = encode_prompts(self.tokenizer, self.train_problems, c.system_prompt,
                                            c.max_prompt_tokens)
        from .rollout import make_rollout

        model_path = self._rollout_model_path()
        self.engine = make_rollout(c.rollout, self.model, self.tokenizer, model_path=model_path, seed=c.seed,
                                   batch_size=c.rollout_batch_size, dtype=str(self.dtype).replace("torch.", ""),
                                   gpu_memory_utilization=c.vllm_gpu_memory_utilization,
                                   progress=_progress(c.progress), stop_ids=self.stop_ids,
                                   max_model_len=self.max_model_len(), autocast_dtype=self.autocast_dtype)
        self.sampler = PromptSampler(len(self.train_problems), c.seed)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        self.phase = "warmup" if c.warmup_steps > 0 else "rl"

    def _rollout_model_path(self) -> Optional[str]:
        """The directory a rollout engine that loads from disk (vLLM) starts from: --model, or the resumed
        checkpoint's model; the embedded model and its tokenizer are saved into the run directory for it
        (``vllm-model/``). The weights it starts with matter little: the loop pushes the policy's after the
        warm-up, after a resume and after every update."""
        c = self.cfg
        from .model import model_dir

        if self.resume_from is not None:
            return model_dir(os.path.join(self.resume_from, "model"))
        if c.model is not None:
            return model_dir(c.model)
        if c.rollout != "vllm":
            return None
        path = os.path.join(self.out, "vllm-model")
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path

    def _rollout_check(self, ro: Rollout, packed, old_logp) -> Tuple[Dict[str, float], Optional[torch.Tensor]]:
        """``(metrics, engine log-probs)``: the mean |engine log-prob - scoring-pass log-prob| of the sampled
        tokens (``rollout_logp_diff``, a warning above :data:`~edge_kernels.train.rollout.LOGP_DIFF_WARN`: the
        weight push did not take effect, or the engine's numerics differ), and the engine's log-probs ``[B, T]``
        (``NaN`` on text it did not sample) for the loss's rollout correction (``--rollout-is``,
        ``docs/algorithms.md`` section 8). Nothing for an engine without log-probs (``hf``). With ``--top-p < 1``
        the engine's log-probs are of the nucleus (section 9): the check scores the nucleus too, and the
        log-probs handed to the loss are shifted by ``log pi_old - log pi_old^nucleus`` so that its IS ratio
        ``pi_old / mu`` compares like with like."""
        from .rollout import LOGP_DIFF_WARN, cut_fraction, logp_diff, rollout_logp

        c = self.cfg
        got = rollout_logp(ro.sampled_logprobs, ro.sampled, packed.targets, packed.mask)
        if got is None:
            return {}, None
        lp, valid = got
        lp = lp.to(old_logp.dtype)
        rec: Dict[str, float] = {}
        if c.top_p < 1:  # vLLM's processed log-probs are renormalised over the nucleus: score the same way
            nucleus_logp = score(self.model, packed, temperature=c.temperature, micro_batch=c.micro_batch_size,
                                 impl=c.impl, autocast_dtype=self.autocast_dtype, top_p=c.top_p)[0]
            rec["rollout_cut_frac"] = cut_fraction(valid, nucleus_logp)
            diff = logp_diff(lp, valid, nucleus_logp)
            lp = lp + (old_logp - nucleus_logp)  # a token outside the trainer's nucleus: +inf, IS ratio 0
        else:
            diff = logp_diff(lp, valid, old_logp)
        rec["rollout_logp_diff"] = diff
        if diff > LOGP_DIFF_WARN:
            self.log(f"warning: step {self.step + 1}: rollout_logp_diff {diff:.4f} > {LOGP_DIFF_WARN}: the rollout "
                     "engine's log-probs of its samples differ from the scoring pass's (a weight push that did not "
                     "take effect, or a precision mismatch); --rollout-is corrects a small mismatch")
        nan = torch.full_like(old_logp, float("nan"))
        return rec, torch.where(valid, lp, nan)

    def regeneration_horizon(self) -> int:
        """The longest sampled sequence after the prompt: a response, plus (GEC regeneration) the reflection
        prompt and the continuation. What a rollout engine's context must hold beyond the prompt."""
        c = self.cfg
        n = c.max_new_tokens
        if c.gec and c.gec_p_regenerate > 0:
            n += len(self.tokenizer.encode(c.gec_reflection, add_special_tokens=False)) + c.gec_max_new_tokens
        return n

    def response_horizon(self) -> int:
        """The longest response the loop can train on, a constant of the run: a regenerated response, one with
        the answer injected, or the longest reference solution of the training set (GEC's branches). Dr.GRPO's
        ``seq-mean-token-sum-norm`` divides by it (its fixed ``max_completion_length``), not by the width of
        whichever batch a step happened to pack."""
        if getattr(self, "_response_horizon", None) is None:
            c = self.cfg
            n = self.regeneration_horizon()
            if c.gec and c.gec_p_inject > 0:
                inj = [c.gec_injection.replace("ANSWER", str(p.answer)) for p in self.train_problems]
                n = max(n, c.max_new_tokens + 1 + max(map(len, self._encode_texts(inj)), default=0))
            if c.gec and c.gec_p_reference > 0:
                sols = [p.solution for p in self.train_problems if p.solution]
                n = max(n, 1 + max(map(len, self._encode_texts(sols)), default=0))
            self._response_horizon = n
        return self._response_horizon

    def _encode_texts(self, texts):
        return [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]

    def max_model_len(self) -> int:
        """The longest sequence a rollout engine is asked for: a prompt (at most --max-prompt-tokens), a response,
        and, with GEC regeneration, the reflection prompt and its continuation; capped at the model's context
        (vLLM would otherwise size its KV cache for the model's full context)."""
        c = self.cfg
        n = c.max_prompt_tokens + self.regeneration_horizon()
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return min(n, int(limit)) if isinstance(limit, int) and limit > 0 else n

    # ------------------------------------------------------------------------------------------ checkpoints

    def _state(self) -> Dict[str, Any]:
        return {"step": self.step, "phase": self.phase, "sampler": self.sampler.state_dict(),
                "warmup_eval": self.warmup_eval, "seed": self.cfg.seed}

    def save(self) -> None:
        ckpt.save(self.out, model=self.model, tokenizer=self.tokenizer,
                  optimizer=self.optimizer if self.phase == "rl" else None, state=self._state(),
                  before_swap=lambda: _fault_point(self.step, "checkpoint"))

    def restore(self) -> None:
        path = self.resume_from
        state = ckpt.load_state(path)
        if state.get("seed") != self.cfg.seed:
            raise TrainError(f"the checkpoint was written with --seed {state.get('seed')}, not {self.cfg.seed}")
        self.step = int(state["step"])
        self.phase = state["phase"]
        self.warmup_eval = state.get("warmup_eval")
        self.sampler.load_state_dict(state["sampler"])
        if self.phase == "rl":
            ckpt.load_optimizer(path, self.optimizer)
            for g in self.optimizer.param_groups:  # the config, not the checkpoint, sets the hyper-parameters
                g["lr"], g["weight_decay"] = self.cfg.lr, self.cfg.weight_decay
        ckpt.load_rng(path)
        self.engine.sync_weights(self.model)  # the policy's weights changed outside rl_step
        self._truncate_metrics(self.step)
        self.log(f"resumed from {path} at step {self.step} ({self.phase})")

    def _truncate_metrics(self, last_step: int) -> None:
        """Drop metric lines after the checkpoint (the step in flight, or a half-written line)."""
        if not os.path.exists(self.metrics_path):
            return
        keep = []
        with open(self.metrics_path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and rec.get("step", math.inf) <= last_step:
                    keep.append(json.dumps(rec) + "\n")
        tmp = self.metrics_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(keep)
        os.replace(tmp, self.metrics_path)

    def _write_metrics(self, rec: Dict[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    # ------------------------------------------------------------------------------------------ warm-up

    def warmup(self) -> None:
        """Supervised warm-up on reference solutions (NLL through the fused kernel), cosine-decayed lr."""
        from edge_kernels import linear_logprob_entropy

        c = self.cfg
        if self.embedded_task:
            from .embedded import warmup_demonstrations

            demos = warmup_demonstrations([{"solution": p.solution, "answer": p.answer} for p in self.train_problems],
                                          c.embedded_unboxed_frac, c.seed)
        else:
            demos = [p.solution for p in self.train_problems]
        targets = [self.tokenizer.encode(d, add_special_tokens=False) + [self.eos_id] for d in demos]
        opt = torch.optim.AdamW(self.model.parameters(), lr=c.warmup_lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(_mix(c.seed, 7))
        _, weight, bias = decoder_and_head(self.model)
        self.model.train()
        n = len(self.train_problems)
        order: List[int] = []
        steps = range(c.warmup_steps)
        bar = _progress(c.progress)
        it = bar(steps, desc="warm-up") if bar else steps
        t0 = time.time()
        loss_v = float("nan")
        for s in it:
            if len(order) < c.warmup_batch_size:
                order += torch.randperm(n, generator=gen).tolist()
            idx, order = order[:c.warmup_batch_size], order[c.warmup_batch_size:]
            # 20 steps of linear ramp, then cosine decay to 10%
            cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / c.warmup_steps))
            lr = c.warmup_lr * min(1.0, (s + 1) / 20) * cosine
            for g in opt.param_groups:
                g["lr"] = lr
            packed = pack([self.train_prompts[i] for i in idx], [targets[i] for i in idx], self.pad_id,
                          device=self.device)
            with oom_guard("warmup"):
                h, w, b = head_inputs(response_hidden(self.model, packed, self.autocast_dtype), weight, bias,
                                      self.autocast_dtype)
                tgt = torch.where(packed.mask, packed.targets, torch.full_like(packed.targets, -100))
                logp, _ = linear_logprob_entropy(h, w, tgt, bias=b, return_entropy=False,
                                                 softcap=head_softcap(self.model), impl=c.impl)
                m = packed.mask.to(logp.dtype)
                loss = -(logp * m).sum() / m.sum().clamp(min=1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if c.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.max_grad_norm)
                opt.step()
            if (s + 1) % 100 == 0 or s + 1 == c.warmup_steps:
                loss_v = loss.item()
                if bar:
                    it.set_postfix(loss=f"{loss_v:.3f}")
        self.log(f"warm-up: {c.warmup_steps} supervised steps, final loss {loss_v:.4f}, {time.time() - t0:.1f}s")
        del opt
        self.engine.sync_weights(self.model)  # the policy's weights changed outside rl_step

    # ------------------------------------------------------------------------------------------ eval

    def evaluate(self) -> Optional[EvalResult]:
        if not self.eval_problems:
            return None
        c = self.cfg
        with oom_guard("eval"):
            return evaluate(self.engine, self.tokenizer, self.eval_problems, system_prompt=c.system_prompt,
                            max_new_tokens=c.max_new_tokens, temperature=c.eval_temperature, top_p=c.top_p,
                            seed=_mix(c.seed, 11), max_prompt_tokens=c.max_prompt_tokens)

    # ------------------------------------------------------------------------------------------ RL step

    def _advantages(self, rewards, old_logp, entropy, mask) -> Estimate:
        """The configured estimator on the scoring pass's outputs (groups: contiguous blocks of ``group_size``
        rows). With ``eda_entropy_source="current"`` the loss rescales :attr:`Estimate.base` itself."""
        c = self.cfg
        return compute_advantages(c.estimator, rewards, mask, group_size=c.group_size, old_logp=old_logp,
                                  entropy=entropy, options=self.estimator_options)

    def _rollout(self, idx: List[int]) -> Rollout:
        """Sample ``group_size`` responses per problem and score them (before GEC)."""
        c, G = self.cfg, self.cfg.group_size
        problems = [self.train_problems[i] for i in idx for _ in range(G)]
        prompts = [self.train_prompts[i] for i in idx for _ in range(G)]
        with oom_guard("rollout"):
            responses = self.engine.generate(prompts, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                                             top_p=c.top_p, desc="rollout")
            sampled_logprobs = getattr(self.engine, "last_logprobs", None)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        rewards, correct = score_responses(texts, [p.answer for p in problems], c.format_reward)
        return Rollout([i for i in idx for _ in range(G)], problems, prompts, responses, None, rewards, rewards,
                       correct, (0, 0, 0), responses, sampled_logprobs)

    def _correct(self, ro: Rollout, step: int) -> Rollout:
        """GEC on the incorrect responses (generator seeded from ``(seed, step)``), then every response is
        re-scored."""
        c = self.cfg
        gen = torch.Generator().manual_seed(_mix(c.seed, step, 1))
        answers = [p.answer for p in ro.problems]
        with oom_guard("rollout"):
            fixed = apply_gec(ro.prompts, ro.responses, [not x for x in ro.correct0], answers,
                              [p.solution for p in ro.problems], tokenizer=self.tokenizer, eos_id=self.eos_id,
                              stop_ids=self.stop_ids, generate=self.engine.generate, generator=gen,
                              cfg=self.gec_config, temperature=c.temperature, top_p=c.top_p,
                              problem_ids=ro.problem_ids)
        responses = [f.tokens for f in fixed]
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        rewards, _ = score_responses(texts, answers, c.format_reward)
        return ro._replace(responses=responses, injected=[f.injected for f in fixed], rewards=rewards,
                           gec_counts=branch_counts(fixed))

    def _update(self, packed, loss_mask, old_logp, est: Estimate,
                rollout_lp: Optional[torch.Tensor] = None) -> Tuple[float, Dict[str, float], float]:
        """``ppo_epochs`` optimizer steps with the fused loss, micro-batched by whole groups; returns the loss,
        the loss metrics (weighted like the loss) and the gradient norm."""
        c = self.cfg
        _, weight, bias = decoder_and_head(self.model)
        self.model.train()
        B, T = packed.targets.shape
        mb = c.micro_batch_size or B
        n_tok = loss_mask.sum().clamp(min=1)
        opts = loss_options(c, max(self.response_horizon(), T))  # a fixed Dr.GRPO denominator
        assert (opts.eda == "current") == est.rescale_in_loss
        loss_kw = dict(temperature=c.temperature, group_size=c.group_size, impl=c.impl, options=opts,
                       softcap=head_softcap(self.model))
        advantages = est.base if est.rescale_in_loss else est.advantages
        total, acc, grad_norm = 0.0, {}, float("nan")
        for _ in range(c.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            for s in range(0, B, mb):
                sl = slice(s, s + mb)
                part = packed.select(sl)
                h, w_, b_ = head_inputs(response_hidden(self.model, part, self.autocast_dtype), weight, bias,
                                        self.autocast_dtype)
                loss, m = _losses.fused_linear_policy_loss(
                    h, w_, part.targets, advantages[sl], loss_mask[sl], bias=b_, old_logp=old_logp[sl],
                    rollout_logp=None if opts.rollout_is == "off" else rollout_lp[sl], **loss_kw)
                w = (loss_mask[sl].sum() / n_tok).item() if c.loss_agg == "token-mean" else part.rows / B
                (loss * w).backward()
                total += loss.item() * w / c.ppo_epochs
                for k, v in m.items():
                    acc[k] = acc.get(k, 0.0) + float(v) * w / c.ppo_epochs
            grad_norm = self._clip_and_step()
        return total, acc, grad_norm

    def _clip_and_step(self) -> float:
        """Clip the gradient (``max_grad_norm``), take the optimizer step, return the gradient norm."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        else:
            grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0
        self.optimizer.step()
        return grad_norm

    def rl_step(self) -> Dict[str, Any]:
        """One RL step (see the module docstring); returns its metrics line."""
        c = self.cfg
        step = self.step + 1
        t0 = time.time()
        torch.manual_seed(_mix(c.seed, step))
        ro = self._rollout(self.sampler.next(c.prompts_per_step))
        t_rollout = time.time() - t0
        if c.gec:
            ro = self._correct(ro, step)

        packed = pack(ro.prompts, ro.responses, self.pad_id, injected=ro.injected, device=self.device)
        loss_mask = packed.mask & ~packed.injected if c.gec_mask_injected else packed.mask
        with oom_guard("scoring"):
            old_logp, entropy = score(self.model, packed, temperature=c.temperature, micro_batch=c.micro_batch_size,
                                      impl=c.impl, autocast_dtype=self.autocast_dtype)
        r = torch.tensor(ro.rewards, dtype=torch.float32, device=self.device)
        est = self._advantages(r, old_logp, entropy, loss_mask)
        check, rollout_lp = self._rollout_check(ro, packed, old_logp)

        t1 = time.time()
        with oom_guard("update"):
            loss, loss_metrics, grad_norm = self._update(packed, loss_mask, old_logp, est, rollout_lp)
        self.engine.sync_weights(self.model)
        t_update = time.time() - t1
        self.step = step
        return self._record(step, ro, packed, loss_mask, entropy, est, loss, loss_metrics, grad_norm,
                            (round(t_rollout, 4), round(t_update, 4)), check)

    def _record(self, step, ro: Rollout, packed, loss_mask, entropy, est: Estimate, loss, m, grad_norm,
                times, check: Dict[str, float]) -> Dict[str, Any]:
        """The metrics line of a step. With EDA ``"current"`` the rescaled advantages live inside the loss, so
        their statistics come from the loss's metrics."""
        if est.rescale_in_loss:
            adv_var = m.get("adv_group_var", float("nan"))
            zero_frac = m.get("zero_adv_group_frac", float("nan"))
        else:
            stats = advantage_stats(est.advantages, loss_mask, group_size=self.cfg.group_size)
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
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch": self.sampler.epoch,
            "rollout_time_s": times[0],
            "update_time_s": times[1],
            **check,
            **{k: v for k, v in m.items() if k.startswith("rollout_is_") or k in _OBJECTIVE_METRICS},
        }

    # ------------------------------------------------------------------------------------------ run

    def run(self) -> Dict[str, Any]:
        c = self.cfg
        t_start = time.time()
        self.setup()
        if self.resume_from is not None:
            self.restore()
        where = "embedded tiny Qwen2 + synthetic arithmetic task" if self.embedded else c.model
        n_params = sum(p.numel() for p in self.model.parameters())
        prec = (str(self.dtype) if self.autocast_dtype is None else f"{self.param_dtype} params, {self.dtype} compute"
                ).replace("torch.", "")
        self.log(f"edge-train: {where} ({n_params / 1e6:.2f}M params, {self.device}, {prec}), "
                 f"{len(self.train_problems)} train / {len(self.eval_problems)} eval problems, estimator "
                 f"{c.estimator}, GEC {'on' if c.gec else 'off'}, G={c.group_size}, output {self.out}")

        if self.phase == "warmup":
            self.warmup()
            res = self.evaluate()
            if res is not None:
                self.warmup_eval = {"correct": res.correct, "total": res.total, "pass_at_1": res.pass_at_1}
                self.log(f"eval after warm-up: {res.summary()}")
            self.phase = "rl"
            self.save()

        bar_f = _progress(c.progress)
        bar = bar_f(total=c.max_steps, initial=self.step, desc="RL steps") if bar_f else None
        try:
            while self.step < c.max_steps:
                t0 = time.time()
                rec = self.rl_step()
                if c.eval_every and self.step % c.eval_every == 0 and self.step < c.max_steps:
                    res = self.evaluate()
                    if res is not None:
                        rec["eval_accuracy"] = res.pass_at_1
                rec["step_time_s"] = round(time.time() - t0, 4)
                _fault_point(self.step, "update")
                self._write_metrics(rec)
                _fault_point(self.step, "metrics")
                if self.step % c.save_every == 0 or self.step == c.max_steps:
                    self.save()
                self.log(self._line(rec))
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()

        res = self.evaluate()
        summary: Dict[str, Any] = {"steps": self.step, "wall_time_s": round(time.time() - t_start, 2)}
        if res is not None:
            self.final_eval = {"correct": res.correct, "total": res.total, "pass_at_1": res.pass_at_1}
            summary["final_eval"] = self.final_eval
        if self.warmup_eval is not None:
            summary["warmup_eval"] = self.warmup_eval
        try:
            from .plots import plot_metrics

            plot_metrics(self.metrics_path, os.path.join(self.out, "plots"))
        except Exception as e:  # noqa: BLE001 - a plotting failure must not lose a finished run
            self.log(f"warning: plots not written ({type(e).__name__}: {e})")
        with open(os.path.join(self.out, "summary.json"), "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=1)
        self.log(self._summary(summary))
        return summary

    @staticmethod
    def _line(rec: Dict[str, Any]) -> str:
        s = (f"step {rec['step']:4d} | reward {rec['reward_mean']:.3f} | acc {rec['accuracy']:.3f} | "
             f"H {rec['entropy_mean']:.3f} | adv_var {rec['adv_var']:.3f} | zero_adv {rec['zero_adv_frac']:.2f} | "
             f"loss {rec['loss']:+.4f} | gec {rec['gec_applied']:3d} | {rec['step_time_s']:.2f}s")
        if "eval_accuracy" in rec:
            s += f" | eval {rec['eval_accuracy']:.3f}"
        return s

    def _summary(self, summary: Dict[str, Any]) -> str:
        lines = [f"done: {summary['steps']} RL steps in {summary['wall_time_s']:.1f}s; outputs in {self.out}"]
        w, f = summary.get("warmup_eval"), summary.get("final_eval")
        if w is not None:
            lines.append(f"  eval pass@1 after warm-up: {w['correct']}/{w['total']} = {w['pass_at_1']:.4f}")
        if f is not None:
            lines.append(f"  eval pass@1 after RL:      {f['correct']}/{f['total']} = {f['pass_at_1']:.4f}")
        if w is not None and f is not None:
            lines.append(f"  change: {f['pass_at_1'] - w['pass_at_1']:+.4f}")
        return "\n".join(lines)


def train(cfg: TrainConfig, log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Run edge-train with ``cfg``; returns the summary (also written to ``summary.json``)."""
    return Trainer(cfg, log=log).run()
