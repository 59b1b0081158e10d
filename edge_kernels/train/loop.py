"""edge-train's :class:`Trainer`: builds a run (data, model, tokenizer, rollout engine) and drives it.

The parts, each its own object a reader can take in alone:

* :class:`~edge_kernels.train.step.RLStep` (``step.py``) - one RL step: rollout, rewards, GEC, scoring pass,
  advantages, fused policy update, the step's metrics line with per-phase wall and CPU times;
* :func:`~edge_kernels.train.warmup.supervised_warmup` (``warmup.py``) - the supervised warm-up;
* :class:`~edge_kernels.train.checkpointing.Checkpointer` (``checkpointing.py``) - saving and restoring the run;
* :class:`~edge_kernels.train.report.Reporter` (``report.py``) - log lines, ``metrics.jsonl``, summary, plots;
* :mod:`~edge_kernels.train.evaluate` - greedy pass@1, sampled pass@1 and pass@k on held-out problems.

:meth:`Trainer.run`: setup (or resume), warm-up and its evaluation (then a checkpoint), RL steps (each: the step,
an evaluation every ``--eval-every`` steps, the metrics line, a checkpoint every ``--save-every`` steps: the
metrics line first, so a kill never loses a logged step), the final evaluation, plots and ``summary.json``.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

import torch

from . import checkpoint as ckpt
from .batch import decoder_and_head
from .checkpointing import Checkpointer, FaultHook
from .config import TrainConfig, estimator_options, gec_options, resolve, save_yaml
from .data import DataError, Problem, PromptSampler, encode_prompts, load_problems, write_problems
from .evaluate import EvalResult, eval_record, evaluate, evaluate_sampled
from .report import Reporter
from .runtime import TrainError, mix_seed, oom_guard, progress
from .step import METRIC_FIELDS, Rollout, RLStep

__all__ = ["Trainer", "TrainError", "train", "METRIC_FIELDS", "Rollout"]

_progress = progress  # the name edge-train eval imports
_T = TypeVar("_T")


def _auto(value: Optional[_T]) -> _T:
    """A config field that :func:`~edge_kernels.train.config.resolve` fills ("auto"), or ``--model`` where only
    its branch reads it: never None where it is read."""
    assert value is not None, "resolve() leaves no auto field unset"
    return value


class Trainer:
    """Runs edge-train from a :class:`TrainConfig` (see :mod:`edge_kernels.train.config`). ``fault`` is the
    tests' kill seam (:mod:`edge_kernels.train.checkpointing`)."""

    def __init__(self, cfg: TrainConfig, log: Optional[Callable[[str], None]] = None,
                 fault: Optional[FaultHook] = None):
        self.cfg = resolve(cfg)
        self.estimator_options = estimator_options(self.cfg)
        self.gec_config = gec_options(self.cfg)
        self.embedded = self.cfg.model is None
        self.out = os.path.abspath(self.cfg.output)
        self.reporter = Reporter(self.out, self.cfg.progress, log)
        self.metrics_path = self.reporter.metrics_path
        self.checkpointer = Checkpointer(self, fault)
        self.rl_step = RLStep(self)
        self.step = 0
        self.warmup_eval: Optional[Dict[str, Any]] = None
        self.final_eval: Optional[Dict[str, Any]] = None

    def log(self, msg: str) -> None:
        self.reporter.log(msg)

    # the parts' entry points, under the names the tests and integrations use
    def _advantages(self, rewards, old_logp, entropy, mask):
        return self.rl_step.advantages(rewards, old_logp, entropy, mask)

    def regeneration_horizon(self) -> int:
        return self.rl_step.regeneration_horizon()

    def response_horizon(self) -> int:
        return self.rl_step.response_horizon()

    def save(self) -> None:
        self.checkpointer.save()

    def restore(self) -> None:
        self.checkpointer.restore()

    def warmup(self) -> None:
        from .warmup import timed_warmup

        timed_warmup(self)

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
        self.resume_from = ckpt.find(self.out) if c.resume else None
        if c.resume and self.resume_from is None:
            self.log(f"--resume {self.out}: no checkpoint yet; starting from the beginning")
        if not c.resume and (ckpt.find(self.out) or os.path.exists(self.metrics_path)):
            raise TrainError(f"{self.out} already holds a run; pass --resume {self.out} to continue it, or choose "
                             "another --output")
        self._setup_data()
        self._setup_model()
        self._setup_engine()
        save_yaml(c, os.path.join(self.out, "config.yaml"))

    def _setup_data(self) -> None:
        c = self.cfg
        need_solution = bool(c.gec) and c.gec_p_reference > 0
        self.embedded_task = c.data is None
        # data
        if c.data is None:
            from .embedded import TaskConfig, make_task

            task = TaskConfig(max_operand=c.embedded_max_operand, two_step_frac=c.embedded_two_step_frac,
                              hard_frac=c.embedded_hard_frac, hard_max_operand=c.embedded_hard_max_operand)
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


    def _setup_model(self) -> None:
        c = self.cfg
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
                               max_position_embeddings=max(256, 2 * (c.max_prompt_tokens + _auto(c.max_new_tokens))))
            self.model = build_model(self.tokenizer, mcfg, seed=c.seed).to(self.device, self.param_dtype)
        else:
            self.model, self.tokenizer = load_pretrained(_auto(c.model), dtype=self.param_dtype, device=self.device)
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


    def _setup_engine(self) -> None:
        c = self.cfg
        self.train_prompts = encode_prompts(self.tokenizer, self.train_problems, c.system_prompt,
                                            c.max_prompt_tokens)
        from .rollout import make_rollout

        model_path = self._rollout_model_path()
        self.engine = make_rollout(c.rollout, self.model, self.tokenizer, model_path=model_path, seed=c.seed,
                                   batch_size=c.rollout_batch_size, dtype=str(self.dtype).replace("torch.", ""),
                                   gpu_memory_utilization=c.vllm_gpu_memory_utilization,
                                   progress=progress(c.progress), stop_ids=self.stop_ids,
                                   max_model_len=self.max_model_len(), autocast_dtype=self.autocast_dtype)
        self.sampler = PromptSampler(len(self.train_problems), c.seed)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=_auto(c.lr), weight_decay=c.weight_decay)
        self.phase = "warmup" if _auto(c.warmup_steps) > 0 else "rl"

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

    def max_model_len(self) -> int:
        """The longest sequence a rollout engine is asked for: a prompt (at most --max-prompt-tokens), a response,
        and, with GEC regeneration, the reflection prompt and its continuation; capped at the model's context
        (vLLM would otherwise size its KV cache for the model's full context)."""
        n = self.cfg.max_prompt_tokens + self.regeneration_horizon()
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return min(n, int(limit)) if isinstance(limit, int) and limit > 0 else n

    # ------------------------------------------------------------------------------------------ eval

    def evaluate(self) -> Optional[EvalResult]:
        """Greedy pass@1 (``--eval-temperature`` 0) on the held-out problems, or None without any."""
        if not self.eval_problems:
            return None
        c = self.cfg
        with oom_guard("eval"):
            return evaluate(self.engine, self.tokenizer, self.eval_problems, system_prompt=c.system_prompt,
                            max_new_tokens=_auto(c.max_new_tokens), temperature=c.eval_temperature, top_p=c.top_p,
                            seed=mix_seed(c.seed, 11), max_prompt_tokens=c.max_prompt_tokens)

    def eval_point(self) -> Optional[Dict[str, Any]]:
        """One evaluation point: :meth:`evaluate`, and with ``--eval-samples N`` N responses per problem at the
        rollout temperature (sampled pass@1, pass@N); None without held-out problems."""
        res = self.evaluate()
        if res is None:
            return None
        c, sampled = self.cfg, None
        if c.eval_samples:
            with oom_guard("eval"):
                sampled = evaluate_sampled(self.engine, self.tokenizer, self.eval_problems, n=c.eval_samples,
                                           system_prompt=c.system_prompt, max_new_tokens=_auto(c.max_new_tokens),
                                           temperature=c.temperature, top_p=c.top_p, seed=mix_seed(c.seed, 13),
                                           max_prompt_tokens=c.max_prompt_tokens)
        return eval_record(res, sampled, c.eval_samples)

    # ------------------------------------------------------------------------------------------ run

    def _start(self) -> None:
        c = self.cfg
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

    def _warmup_phase(self) -> None:
        self.warmup()
        self.warmup_eval = self.eval_point()
        if self.warmup_eval is not None:
            self.log(f"eval after warm-up: {Reporter.eval_line(self.warmup_eval)}")
        self.phase = "rl"
        self.save()

    def _rl_phase(self) -> None:
        c, fault = self.cfg, self.checkpointer.point
        max_steps, save_every = _auto(c.max_steps), _auto(c.save_every)
        bar_f = progress(c.progress)
        bar = bar_f(total=max_steps, initial=self.step, desc="RL steps") if bar_f else None
        try:
            while self.step < max_steps:
                t0 = time.time()
                rec = self.rl_step()
                if c.eval_every and self.step % c.eval_every == 0 and self.step < max_steps:
                    w, cpu = time.perf_counter(), time.process_time()
                    ev = self.eval_point()
                    if ev is not None:
                        rec["eval_accuracy"] = ev["greedy_pass_at_1"]
                        rec.update({f"eval_{k}": v for k, v in ev.items() if k not in ("correct", "total",
                                                                                       "pass_at_1")})
                        rec["eval_time_s"] = round(time.perf_counter() - w, 4)
                        rec["eval_cpu_time_s"] = round(time.process_time() - cpu, 4)
                rec["step_time_s"] = round(time.time() - t0, 4)
                fault(self.step, "update")
                self.reporter.write_metrics(rec)
                fault(self.step, "metrics")
                if self.step % save_every == 0 or self.step == max_steps:
                    self.save()
                self.log(Reporter.line(rec))
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()

    def _eval_curve(self) -> List[Tuple[int, Dict[str, Any]]]:
        """Every evaluation point of the run as ``(step, record)``: warm-up at step 0, the logged ones, final."""
        from .plots import read_metrics

        pts = [(0, self.warmup_eval)] if self.warmup_eval is not None else []
        if os.path.exists(self.metrics_path):
            for r in read_metrics(self.metrics_path):
                if "eval_greedy_pass_at_1" in r:
                    pts.append((r["step"], {k[5:]: v for k, v in r.items() if k.startswith("eval_")}))
        if self.final_eval is not None:
            pts.append((self.step, self.final_eval))
        return pts

    def run(self) -> Dict[str, Any]:
        t_start, cpu_start = time.time(), time.process_time()
        self._start()
        warmed_up_now = self.phase == "warmup"
        if warmed_up_now:
            self._warmup_phase()
        self._rl_phase()
        # no RL step since the warm-up's eval (--max-steps 0): the same policy, so the same eval
        self.final_eval = self.warmup_eval if warmed_up_now and self.step == 0 else self.eval_point()
        summary: Dict[str, Any] = {"steps": self.step, "wall_time_s": round(time.time() - t_start, 2),
                                   "cpu_time_s": round(time.process_time() - cpu_start, 2),
                                   "threads": torch.get_num_threads()}
        if self.final_eval is not None:
            summary["final_eval"] = self.final_eval
        if self.warmup_eval is not None:
            summary["warmup_eval"] = self.warmup_eval
        summary.update(Reporter.summary_fields(self.warmup_eval, self.final_eval))
        self.reporter.finish(summary, self._eval_curve())
        return summary


def train(cfg: TrainConfig, log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Run edge-train with ``cfg``; returns the summary (also written to ``summary.json``)."""
    return Trainer(cfg, log=log).run()
