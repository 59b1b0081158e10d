"""Fused linear policy loss benchmark: ``edge_kernels.losses.fused_linear_policy_loss``.

Rows: ours, naive (``[N, V]`` logits in the input dtype + the same clipped-surrogate loss), ``torch.compile`` of
the naive code, and Liger's ``LigerFusedLinearGRPOLoss`` when importable. The loss compared is the default
of docs/algorithms.md section 6: token-level ratio, clip 0.2/0.2, no KL, no entropy bonus, "token-mean"
aggregation over the response mask (on the PyTorch path, the three-matmul mode).
"""

from __future__ import annotations

from typing import List

import torch

from .bench_logprob_entropy import BenchConfig, Impl, compiled, log_row
from .data import make_linear_data, oracle_linear
from .env import free_memory
from .report import PEAK_COLUMN, Results, dtype_name, fmt_num, shape_tag, table_columns
from .roofline import matmul_roofline
from .timing import Skip, measure_row, short_reason

EPS_LOW = EPS_HIGH = 0.2

POLICY_COLUMNS = table_columns({"key": "tflops", "title": "model TFLOP/s"}, {"key": "x_mm", "title": "x mm"},
                               PEAK_COLUMN, {"key": "err_loss", "title": "abs err loss", "fmt": "err"})


def clipped_token_mean(logp, old_logp, adv_tok, mask):
    """Token-level clipped surrogate, "token-mean" aggregation; any float dtype, ``[B, T]`` or ``[N]``."""
    ratio = torch.exp(logp - old_logp)
    per_tok = -torch.minimum(ratio * adv_tok, torch.clamp(ratio, 1 - EPS_LOW, 1 + EPS_HIGH) * adv_tok)
    m = mask.to(per_tok.dtype)
    return (per_tok * m).sum() / m.sum().clamp_min(1)


def naive_policy(hidden3, weight, targets, old_logp, adv_tok, mask):
    logits = hidden3 @ weight.t()  # [B, T, V] in the input dtype
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1).float()
    return clipped_token_mean(logp, old_logp, adv_tok, mask)


def _loss_of(out) -> torch.Tensor:
    """Liger returns ``(loss, metrics...)``; ours returns ``(loss, metrics)``."""
    return out[0] if isinstance(out, (tuple, list)) else out


def policy_impls(cfg: BenchConfig) -> List[Impl]:
    dev = cfg.device

    def ours_make():
        from edge_kernels.losses import fused_linear_policy_loss

        def f(h3, w, t, old, adv, mask):
            return fused_linear_policy_loss(h3, w, t, adv, mask, old_logp=old, clip_low=EPS_LOW,
                                            clip_high=EPS_HIGH)[0]
        return f

    def liger_make():
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except Exception as exc:  # noqa: BLE001
            raise Skip(f"liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss not importable ({short_reason(exc)})") \
                from None
        kwargs = dict(beta=0.0, use_ref_model=False, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                      loss_type="bnpo", temperature=1.0)
        try:
            mod = LigerFusedLinearGRPOLoss(**kwargs)
        except TypeError:  # older Liger: fewer options
            mod = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False)

        def f(h3, w, t, old, adv, mask):
            return _loss_of(mod(h3, w, t, mask, adv[:, 0].contiguous(), old_per_token_logps=old))
        return f

    impls = [Impl("ours (fused_linear_policy_loss)", ours_make),
             Impl("naive PyTorch (materialized logits + same loss)", lambda: naive_policy),
             Impl("torch.compile(naive)", lambda: compiled(naive_policy, cfg))]
    # Liger's autograd.Function runs each chunk's backward inside its forward (the gradients are stored for
    # backward), so even under no_grad its fwd row does the input-gradient work too
    liger_note = "loss_type='bnpo' (= token-mean), beta=0; computes its gradients in the forward (fwd row too)"
    if dev.type != "cuda":
        impls.append(Impl("Liger LigerFusedLinearGRPOLoss", liger_make, note=liger_note,
                          skip_modes={m: "CPU run (Liger targets CUDA)" for m in ("fwd", "fwd+bwd")}))
    else:
        impls.append(Impl("Liger LigerFusedLinearGRPOLoss", liger_make, note=liger_note))
    return impls


def row_builder(impl: Impl, mode: str, args):
    hidden3, weight, targets, old, adv, mask = args

    def build():
        if mode in impl.skip_modes:
            raise Skip(impl.skip_modes[mode])
        f = impl.make()
        if mode == "fwd":
            def fn():
                with torch.no_grad():
                    return (f(hidden3, weight, targets, old, adv, mask),)
            return fn
        hg = hidden3.detach().requires_grad_()
        wg = weight.detach().requires_grad_()

        def fn():
            loss = f(hg, wg, targets, old, adv, mask)
            return (loss, torch.autograd.grad(loss, [hg, wg]))
        return fn
    return build


def run_policy(cfg: BenchConfig, results: Results) -> None:
    if cfg.quick:
        b, t, d, vocab, dtype = 4, 16, 128, 1000, torch.float32
    else:
        b, t, d, vocab, dtype = 16, 512, 3584, 152064, torch.bfloat16
    n = b * t
    tag = shape_tag(B=b, T=t, D=d, V=vocab) + f"-{dtype_name(dtype)}"
    title = f"fused_linear_policy_loss, %s: B={b} T={t} (N={n}) D={d} V={vocab} {dtype_name(dtype)}"


    results.remove_section(f"policy/{tag}")  # a "skipped" placeholder from an earlier, merged run
    data = make_linear_data(n, d, vocab, dtype, cfg.device, seed=2)
    ref_logp, _ = oracle_linear(data.hidden, data.weight, data.targets)
    g = torch.Generator(device=cfg.device)
    g.manual_seed(3)
    old = (ref_logp + 0.1 * torch.randn(n, generator=g, device=cfg.device, dtype=torch.float64)).float().view(b, t)
    adv = torch.randn(b, 1, generator=g, device=cfg.device).expand(b, t).contiguous()
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g, device=cfg.device)
    mask = (torch.arange(t, device=cfg.device)[None, :] < lengths[:, None])
    ref_loss = float(clipped_token_mean(ref_logp.view(b, t), old.double(), adv.double(), mask))
    args = (data.hidden.view(b, t, d), data.weight, data.targets.view(b, t), old, adv, mask)
    mm = matmul_roofline(data.hidden, data.weight, cfg.timing)
    flops_unit = 2.0 * n * d * vocab

    def check(out):
        return {"err_loss": abs(float(out[0].detach().double()) - ref_loss)}

    for mode in ("fwd", "fwd+bwd"):
        mult = 1 if mode == "fwd" else 3
        rows = []
        for impl in policy_impls(cfg):
            row = measure_row(impl.name, row_builder(impl, mode, args), cfg.device, cfg.timing, check=check,
                              warmup_first=impl.warmup_first, note=impl.note)
            if row["status"] == "ok":
                row["tflops"] = mult * flops_unit / row["ms"] / 1e9
                if mm.get("status") == "ok":
                    row["x_mm"] = row["ms"] / (mult * mm["ms"])
            log_row(f"policy {mode} {tag}", row)
            rows.append(row)
        notes = [
            f"loss: token-level ratio exp(logp - old), clip [{1 - EPS_LOW}, {1 + EPS_HIGH}], no KL, no entropy "
            "bonus, token-mean over a random-length response mask; old logp = fp64 logp + N(0, 0.1^2)",
            f"abs err loss = |loss - loss computed in float64 from fp64 log-probs| (reference loss {ref_loss:.6g})",
            "model FLOPs = 2NDV forward, 6NDV forward+backward (same convention as linear_logprob_entropy)",
        ]
        if mm.get("status") == "ok":
            notes.append(f"roofline, compute: `hidden @ weight.T` {fmt_num(mm['ms'])} ms = "
                         f"**{fmt_num(mm['tflops'])} TFLOP/s**")
        results.add_section({
            "id": f"policy/{mode}/{tag}", "group": f"policy_{tag}",
            "group_title": f"fused_linear_policy_loss, N={n} D={d} V={vocab} {dtype_name(dtype)}",
            "mode": mode, "op": "fused_linear_policy_loss", "title": title % mode,
            "shape": {"B": b, "T": t, "D": d, "V": vocab, "dtype": dtype_name(dtype)},
            "roofline_mm": mm, "notes": notes, "columns": POLICY_COLUMNS, "rows": rows,
        })
    del data, args
    free_memory(cfg.device)
