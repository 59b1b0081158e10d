"""The Triton backend of :mod:`edge_kernels.backends.truncated` (sampling-truncated log-probs): adapters onto the
Triton kernels of both ops, which take the per-row threshold as ``HAS_TRUNC`` arguments, and their tile kernels
for the threshold search. Imported on the first ``impl="triton"`` call with ``top_k``/``top_p``/``min_p``."""

from __future__ import annotations

from ...core.params import LaunchParams, default_chunk_size
from . import linear_logprob_entropy as lin
from . import logprob_entropy as lgt


def logits_tiles(inputs, params: LaunchParams):
    (x3,) = inputs
    n, vocab = x3.shape[0] * x3.shape[1], x3.shape[2]
    return lgt.triton_logits_tiles(x3, params, params.chunk_size or default_chunk_size(n, vocab))


def logits_fwd(inputs, targets, th, params: LaunchParams):
    return lgt.kept_fwd(inputs[0], targets, params, th)


def logits_bwd(inputs, targets, th, lse, entropy, g_logp, g_ent, params: LaunchParams, needs):
    return (lgt.kept_bwd(inputs[0], targets, lse, entropy, g_logp, g_ent, params, needs[0], th),)


def linear_tiles(inputs, params: LaunchParams):
    hidden, weight, bias = inputs
    return lin.triton_logits_tiles(hidden, weight, bias, params)


def linear_fwd(inputs, targets, th, params: LaunchParams):
    hidden, weight, bias = inputs
    return lin.triton_fwd(hidden, weight, bias, targets, params, th=th)


def linear_bwd(inputs, targets, th, lse, entropy, g_logp, g_ent, params: LaunchParams, needs):
    hidden, weight, bias = inputs
    return lin.triton_bwd(hidden, weight, bias, targets, lse, entropy, g_logp, g_ent, params, needs, th=th)
