"""The readable spec of every op: float64 oracles, the definition every backend is tested against.

The oracles materialize ``[N, V]`` logits in float64 on purpose: they are the slow, obviously-correct
definition (``docs/algorithms.md``, notation) the kernels are checked against, on inputs already rounded to the
kernel's dtype. Shipped with the package (the tests and benchmarks import it; no backend does).
Torch only; imports nothing else of the package.
"""

from __future__ import annotations

import torch


def oracle_softcap(logits, softcap):
    """float64 ``softcap * tanh(logits / softcap)`` (None: unchanged); ``-inf`` (masked entries) stays ``-inf``."""
    if softcap is None:
        return logits
    z = logits.double()
    return torch.where(torch.isneginf(z), z, softcap * torch.tanh(torch.where(torch.isneginf(z), 0.0, z) / softcap))


def oracle_logprob_entropy(logits, targets, temperature=1.0, ignore_index=-100, softcap=None):
    """float64 ``(logp, entropy)`` from ``logits [..., V]`` (soft-capped first when ``softcap`` is given);
    differentiable w.r.t. ``logits``."""
    z = oracle_softcap(logits.double(), softcap) / temperature
    logsm = torch.log_softmax(z, dim=-1)
    p = logsm.exp()
    valid = targets != ignore_index
    logp = logsm.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    # -inf logits (masked vocabulary): p = 0 contributes 0; mask before the product so no 0 * inf gradient
    plogp = p * torch.where(p > 0, logsm, torch.zeros_like(logsm))
    entropy = -plogp.sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)


def oracle_linear_logprob_entropy(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100,
                                  softcap=None):
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    return oracle_logprob_entropy(logits, targets, temperature, ignore_index, softcap)
