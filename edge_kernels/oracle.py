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


# ----------------------------------------------------------------------------------------------------------
# the truncated sampling distribution (top-k / top-p / min-p; docs/algorithms.md section 9)
#
# A sorting oracle that follows vLLM's PyTorch sampler literally, on the full [N, V] rows: z = logits / T; min-p
# masks softmax(z) < min_p * max; top-k sorts ascending and masks z < the k-th largest; top-p takes the softmax
# of what is left, its ascending cumulative sum, masks cumsum <= 1 - top_p and always keeps the last (largest).
# From that mask it counts, for every value, how many of the tokens holding it survived, and gives each token the
# weight kept / tied (1 or 0 without a partial tie at the top-p boundary): logp = z_t - log sum_v w_v e^{z_v} for
# a target with w_t > 0 (-inf otherwise), H = -sum_v w_v q_v log q_v with q_v = e^{z_v} / S. Differentiable
# w.r.t. the logits (the weights are constants).


def oracle_kept_weights(z, top_k=None, top_p=None, min_p=None):
    """float64 per-token weights ``[N, V]`` of vLLM's kept set (see the module docstring); ``z`` detached."""
    z = z.detach().double().clone()
    if min_p is not None and min_p > 0:
        p = torch.softmax(z, dim=-1)
        z = z.masked_fill(p < min_p * p.amax(dim=-1, keepdim=True), float("-inf"))
    srt, idx = z.sort(dim=-1, descending=False, stable=True)
    if top_k is not None and top_k < z.shape[-1]:
        kth = srt[:, z.shape[-1] - top_k][:, None]
        srt = srt.masked_fill(srt < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        cum = torch.softmax(srt, dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False
        srt = srt.masked_fill(drop, float("-inf"))
    kept = torch.zeros_like(z).scatter(-1, idx, (srt > float("-inf")).double())
    zz = z.detach()
    w = torch.zeros_like(kept)
    for r in range(z.shape[0]):  # weight = kept / tied, per distinct value of the row
        vals, inv = torch.unique(zz[r], return_inverse=True)
        tied = torch.zeros(len(vals), dtype=torch.float64).index_add_(0, inv, torch.ones_like(kept[r]))
        surv = torch.zeros(len(vals), dtype=torch.float64).index_add_(0, inv, kept[r])
        w[r] = (surv / tied)[inv]
    return torch.where(torch.isneginf(zz), 0.0, w)


def oracle_truncated_logprob_entropy(logits, targets, temperature=1.0, ignore_index=-100, softcap=None,
                                     top_k=None, top_p=None, min_p=None):
    """float64 ``(logp, entropy)`` under the truncated distribution; ``logits [..., V]``."""
    v = logits.shape[-1]
    z = (oracle_softcap(logits.double(), softcap) / temperature).reshape(-1, v)
    tgt = targets.reshape(-1)
    w = oracle_kept_weights(z, top_k, top_p, min_p)
    zm = torch.where(w > 0, z, float("-inf"))
    lse = torch.logsumexp(zm + torch.log(w.clamp_min(1e-300)), dim=-1)
    q = torch.exp(zm - lse[:, None])
    entropy = -(w * q * torch.where(w > 0, z - lse[:, None], 0.0)).sum(-1)
    valid = tgt != ignore_index
    t0 = torch.where(valid, tgt, 0)
    zt = z.gather(1, t0[:, None]).squeeze(1)
    kept_t = w.gather(1, t0[:, None]).squeeze(1) > 0
    logp = torch.where(kept_t, zt - lse, float("-inf"))
    zero = torch.zeros_like(lse)
    logp, entropy = torch.where(valid, logp, zero), torch.where(valid, entropy, zero)
    return logp.reshape(targets.shape), entropy.reshape(targets.shape)
