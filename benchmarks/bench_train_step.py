"""One policy-update step of edge-train on a small random-initialised Qwen2 model (issue 6): time, tokens/s,
peak memory and the loss, against the same step with materialized logits and through TRL's ``GRPOTrainer``.

A step is ``zero_grad`` + loss + ``backward`` + ``AdamW.step`` on one fixed synthetic batch: ``B`` sequences of
``T`` tokens (a ``T // 4``-token prompt, then a completion of random length, right-padded), per-sequence
advantages, and old log-probs ``= fp64 log-probs of the model + N(0, 0.1^2)`` (so some ratios are clipped).
The loss is the default of docs/algorithms.md section 6: token-level ratio, clip 0.2/0.2, no KL, no entropy
bonus, token-mean over the response mask (TRL: ``loss_type="bnpo"``, ``beta=0``).

Rows:

* ours: edge-train's update path (``edge_kernels.train.loop.Trainer.rl_step``): the decoder body to the last
  hidden state (``edge_kernels.train.batch.response_hidden``), then
  ``edge_kernels.losses.fused_linear_policy_loss`` with the LM head's weight (no ``[B, T, V]`` logits).
* naive: ``model(...).logits`` (all ``T`` positions, the model dtype), the completion slice upcast to fp32,
  ``log_softmax`` + ``gather``, the same clipped loss.
* TRL: ``GRPOTrainer.compute_loss(model, inputs)`` (its native fused LM head, ``trl.trainer.utils.
  add_fused_lm_head``) on the keys ``_compute_loss`` reads: ``prompt_ids``, ``prompt_mask``, ``completion_ids``,
  ``completion_mask``, ``advantages``, ``old_per_token_logps`` (and ``num_items_in_batch``). The trainer is built
  on a copy of the benchmark's model.

The optimizer is ``torch.optim.AdamW`` with ``lr=0``: the step does all of AdamW's work (moments, update) but
leaves the weights unchanged, so every timed rep runs the same batch on the same weights and the rows' losses
can be compared (and against a float64 reference of the same loss).
"""

from __future__ import annotations

import copy
import tempfile
from typing import Any, Callable, Dict, List

import torch

from .bench_logprob_entropy import BenchConfig, log_row, log
from .bench_policy_loss import EPS_HIGH, EPS_LOW, clipped_token_mean
from .data import oracle_linear
from .env import free_memory
from .report import PEAK_COLUMN, Results, dtype_name, shape_tag, table_columns
from .timing import Skip, measure_row, short_reason

# |loss - fp64 reference loss| every row must stay within (the quick test asserts the fp32 one)
LOSS_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}

TRAIN_STEP_COLUMNS = table_columns({"key": "tok_s", "title": "tokens/s"}, PEAK_COLUMN, {"key": "loss", "title": "loss"},
                                   {"key": "err_loss", "title": "abs err loss", "fmt": "err"}, ms_title="ms / step")


def shapes(quick: bool) -> Dict[str, Any]:
    if quick:
        return dict(B=4, T=32, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=192, vocab=1000,
                    dtype=torch.float32)
    return dict(B=8, T=1024, hidden=1024, layers=4, heads=8, kv_heads=2, intermediate=3072, vocab=151936,
                dtype=torch.bfloat16)


def make_model(s: Dict[str, Any], device: torch.device, seed: int = 0):
    """A random-initialised ``Qwen2ForCausalLM`` (untied LM head, as in Qwen2.5 >= 1.5B). Built here rather than
    with ``edge_kernels.train.embedded.build_model``, whose vocabulary is its tokenizer's (512 tokens)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["kv_heads"], max_position_embeddings=max(256, s["T"]),
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model.to(device=device, dtype=s["dtype"]).train()


def make_batch(model, s: Dict[str, Any], device: torch.device, seed: int = 1) -> Dict[str, Any]:
    """The fixed batch, packed the way edge-train packs rollouts (``edge_kernels.train.batch.pack``), plus the
    advantages, the old log-probs and the float64 reference loss."""
    from edge_kernels.train.batch import decoder_and_head, pack, response_hidden

    b, t, vocab = s["B"], s["T"], s["vocab"]
    p = t // 4
    c = t - p
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(c // 2, c + 1, (b,), generator=g)
    lengths[0] = c  # the packed width is the full T
    prompts = [torch.randint(3, vocab, (p,), generator=g).tolist() for _ in range(b)]
    responses = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in lengths]
    packed = pack(prompts, responses, pad_id=0, device=device)
    adv = torch.randn(b, generator=g).to(device)
    with torch.no_grad():
        h = response_hidden(model, packed)
        _, weight, _ = decoder_and_head(model)
        logp64, _ = oracle_linear(h.reshape(-1, h.shape[-1]), weight, packed.targets.reshape(-1))
    logp64 = logp64.view(b, c)
    noise = 0.1 * torch.randn(b, c, generator=g, dtype=torch.float64).to(device)
    old = torch.where(packed.mask, logp64 + noise, torch.zeros_like(logp64)).float()
    ref_loss = float(clipped_token_mean(logp64, old.double(), adv.double()[:, None], packed.mask))
    trl_inputs = {
        "prompt_ids": packed.input_ids[:, :p], "prompt_mask": packed.attention_mask[:, :p],
        "completion_ids": packed.input_ids[:, p:], "completion_mask": packed.attention_mask[:, p:],
        "advantages": adv, "old_per_token_logps": old,
        "num_items_in_batch": packed.mask.sum(),
    }
    return {"packed": packed, "adv": adv, "old": old, "ref_loss": ref_loss, "trl_inputs": trl_inputs,
            "tokens": b * t, "response_tokens": int(packed.mask.sum())}


def _step(params, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], tuple]:
    opt = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0)

    def fn():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return (loss.detach(),)
    return fn


def ours_step(model, batch) -> Callable[[], tuple]:
    from edge_kernels.losses import fused_linear_policy_loss
    from edge_kernels.train.batch import decoder_and_head, response_hidden

    packed, adv, old = batch["packed"], batch["adv"], batch["old"]
    _, weight, bias = decoder_and_head(model)

    def loss_fn():
        h = response_hidden(model, packed)
        loss, _ = fused_linear_policy_loss(h, weight, packed.targets, adv, packed.mask, bias=bias, old_logp=old,
                                           clip_low=EPS_LOW, clip_high=EPS_HIGH, agg="token-mean",
                                           max_len=packed.targets.shape[1])
        return loss
    return _step(model.parameters(), loss_fn)


def naive_step(model, batch) -> Callable[[], tuple]:
    packed, adv, old = batch["packed"], batch["adv"], batch["old"]
    p, c = packed.prompt_width, packed.targets.shape[1]

    def loss_fn():
        logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                       position_ids=packed.position_ids, use_cache=False).logits  # [B, T, V]
        lp = torch.log_softmax(logits[:, p - 1:p - 1 + c].float(), dim=-1)
        logp = lp.gather(-1, packed.targets[..., None]).squeeze(-1)
        return clipped_token_mean(logp, old, adv[:, None], packed.mask)
    return _step(model.parameters(), loss_fn)


def trl_step(model, batch, s: Dict[str, Any], device: torch.device, workdir: str) -> Callable[[], tuple]:
    try:
        import datasets
        from trl import GRPOConfig, GRPOTrainer
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"trl.GRPOTrainer not importable ({short_reason(exc)})") from None
    from edge_kernels.train.embedded import build_tokenizer

    # GRPOTrainer needs a tokenizer, a dataset and a reward function; none of them is used by compute_loss
    tok = build_tokenizer(["1 + 2 = 3. The answer is \\boxed{3}."], vocab_size=300)

    def zero_reward(completions, **kwargs):
        return [0.0] * len(completions)

    b, t = s["B"], s["T"]
    cfg = GRPOConfig(output_dir=workdir, per_device_train_batch_size=b, num_generations=b,
                     max_completion_length=t - t // 4, loss_type="bnpo", beta=0.0, epsilon=EPS_LOW,
                     epsilon_high=EPS_HIGH, temperature=1.0, use_cpu=device.type != "cuda",
                     bf16=s["dtype"] == torch.bfloat16, report_to="none", save_strategy="no", disable_tqdm=True,
                     logging_steps=1, seed=0)
    trainer = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=[zero_reward], args=cfg,
                          train_dataset=datasets.Dataset.from_dict({"prompt": ["1 + 2 ="] * b}),
                          processing_class=tok)
    tmodel = trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); compute_loss is called directly
    inputs = batch["trl_inputs"]
    return _step(tmodel.parameters(), lambda: trainer.compute_loss(tmodel, dict(inputs)))


def run_cases(cfg: BenchConfig) -> Dict[str, Any]:
    """Build the model and batch and measure the three rows; returns the section (also used by the test)."""
    s = shapes(cfg.quick)
    dev = cfg.device
    model = make_model(s, dev)
    batch = make_batch(model, s, dev)
    ref_loss = batch["ref_loss"]

    def check(out):
        loss = float(out[0].double())
        return {"loss": loss, "err_loss": abs(loss - ref_loss)}

    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as workdir:
        builders = [
            ("ours (edge-train: decoder body + fused_linear_policy_loss)", lambda: ours_step(model, batch),
             "no [B, T, V] logits"),
            ("naive PyTorch (model logits + log_softmax gather + same loss)", lambda: naive_step(model, batch),
             "logits in the model dtype, completion slice upcast to fp32"),
            ("TRL GRPOTrainer.compute_loss (native fused LM head)",
             lambda: trl_step(model, batch, s, dev, workdir), "loss_type='bnpo', beta=0"),
        ]
        rows: List[Dict[str, Any]] = []
        for name, build, note in builders:
            row = measure_row(name, build, dev, cfg.timing, check=check, note=note)
            if row["status"] == "ok":
                row["tok_s"] = batch["tokens"] / (row["ms"] / 1e3)
            log_row("train_step", row)
            rows.append(row)
    b, t = s["B"], s["T"]
    tol = LOSS_TOL.get(s["dtype"], 5e-2)
    tag = shape_tag(B=b, T=t, D=s["hidden"], L=s["layers"], V=s["vocab"]) + f"-{dtype_name(s['dtype'])}"
    notes = [
        f"Qwen2ForCausalLM, random init: hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads "
        f"({s['kv_heads']} KV), intermediate {s['intermediate']}, vocab {s['vocab']}, untied LM head, "
        f"{dtype_name(s['dtype'])}",
        f"batch: B={b} sequences x T={t} tokens (prompt {t // 4}, completion up to {t - t // 4}, random lengths; "
        f"{batch['response_tokens']} response tokens); tokens/s = B*T / step time",
        "step = zero_grad + forward + loss + backward + AdamW.step (lr=0: full optimizer work, weights unchanged, "
        "so every rep sees the same model)",
        f"loss: token-level ratio, clip [{1 - EPS_LOW}, {1 + EPS_HIGH}], no KL, no entropy bonus, token-mean; "
        f"abs err loss = |loss - float64 reference| (reference {ref_loss:.6g}); rows must agree within {tol:g}",
        "peak GiB: max_memory_allocated during one step minus memory_allocated before it (weights, optimizer "
        "states and the previous step's gradients excluded); n/a on the CPU",
    ]
    section = {
        "id": f"train_step/{tag}", "group": f"train_step_{tag}", "mode": "train step",
        "group_title": f"one policy-update step, Qwen2 {s['layers']}L D={s['hidden']} V={s['vocab']}, B={b} T={t}",
        "op": "train_step", "title": f"one policy-update step: B={b} T={t}, Qwen2 {s['layers']} layers "
                                     f"D={s['hidden']} V={s['vocab']} {dtype_name(s['dtype'])}",
        "shape": {"B": b, "T": t, "D": s["hidden"], "layers": s["layers"], "V": s["vocab"],
                  "dtype": dtype_name(s["dtype"])},
        "loss_tolerance": tol, "reference_loss": ref_loss,
        "notes": notes, "columns": TRAIN_STEP_COLUMNS, "rows": rows,
    }
    model = batch = None  # free the case before the next (the row builders above close over both)
    free_memory(dev)
    return section


def run_train_step(cfg: BenchConfig, results: Results) -> None:
    section = run_cases(cfg)
    bad = [r["impl"] for r in section["rows"]
           if r["status"] == "ok" and not r["err_loss"] <= section["loss_tolerance"]]
    if bad:
        log(f"train_step: loss outside the tolerance {section['loss_tolerance']:g} for {bad}")
        section["notes"].append(f"**loss outside the tolerance for: {', '.join(bad)}**")
    results.add_section(section)
