"""Test-data builders: LLM-like logits and hidden states (peaked and spread rows, ignored targets) and the
relative error the kernel tests bound. The oracles they are checked against live in :mod:`edge_kernels.oracle`.
"""

from __future__ import annotations

import torch


def make_linear_inputs(n, d, v, *, dtype=torch.float32, bias=False, lead=None, ignore_frac=0.0, peaked_frac=0.5,
                       scale=1.0, seed=0, device="cpu"):
    """LLM-like inputs: a fraction of rows are peaked (the target logit stands out by a random margin, so the
    entropy is near 0), the rest range from flat to moderately spread. Returns hidden, weight, bias, targets."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) / d ** 0.5
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64) * scale * torch.rand(n, 1, generator=g) * 3
    targets = torch.randint(0, v, (n,), generator=g)
    peaked = torch.rand(n, generator=g) < peaked_frac
    if peaked.any():
        w_t = weight[targets[peaked]]
        margin = 5.0 + 20.0 * torch.rand(int(peaked.sum()), 1, generator=g, dtype=torch.float64)
        hidden[peaked] += margin * w_t / (w_t.norm(dim=1, keepdim=True) ** 2 + 1e-12)
    b = (torch.randn(v, generator=g, dtype=torch.float64) * 0.5) if bias else None
    if ignore_frac > 0:
        drop = torch.rand(n, generator=g) < ignore_frac
        targets[drop] = -100
    if lead is not None:
        hidden = hidden.reshape(*lead, d)
        targets = targets.reshape(*lead)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), targets.to(device)


def rel_err(a, b):
    """||a - b|| / max(||b||, tiny) in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_logits(shape, v, *, dtype=torch.float32, seed=0, ignore_frac=0.2, ignore_index=-100, device="cpu"):
    """LLM-like logits ``[*shape, V]`` and targets: 40% of rows peaked (target logit +8..18), scales vary by
    row, ``ignore_frac`` of the targets set to ``ignore_index``."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.tensor(shape).prod())
    logits = torch.randn(n, v, generator=g) * (torch.rand(n, 1, generator=g) * 4)
    targets = torch.randint(0, v, (n,), generator=g)
    peaked = torch.rand(n, generator=g) < 0.4
    logits[peaked, targets[peaked]] += 8 + 10 * torch.rand(int(peaked.sum()), generator=g)
    targets[torch.rand(n, generator=g) < ignore_frac] = ignore_index
    return logits.reshape(*shape, v).to(device=device, dtype=dtype), targets.reshape(shape).to(device)
