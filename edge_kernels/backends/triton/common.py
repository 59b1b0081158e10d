"""Triton building blocks shared by the two ops' kernels: streaming softmax statistics and launch helpers.

The statistics are the ones :mod:`edge_kernels.core.stats` documents: running max ``m``,
``s = sum exp(z - m)`` and ``b = sum exp(z - m) (z - m)``, so that ``lse = m + log s`` and
``entropy = log s - b / s``. Tiles are 2-D ``[rows, cols]``; reductions run over the columns.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from ...core.probes import triton_interpreter_enabled


@triton.jit
def softmax_stats_update(m, s, b, z):
    """Fold the fp32 tile ``z [R, C]`` (masked entries = -inf) into ``(m, s, b)`` of shape ``[R]``."""
    m_new = tl.maximum(m, tl.max(z, 1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - shift)
    d = z - shift[:, None]
    e = tl.exp(d)
    tile_b = tl.sum(tl.where(e > 0, d, 0.0) * e, 1)  # where() before the product: no 0 * -inf
    carried_b = b + tl.where(s > 0, m - shift, 0.0) * s
    return m_new, alpha * s + tl.sum(e, 1), alpha * carried_b + tile_b


@triton.jit
def softmax_stats_finalize(m, s, b):
    """``(lse, entropy)`` from the statistics."""
    shift = tl.where(m == float("-inf"), 0.0, m)
    log_s = tl.log(s)
    return shift + log_s, log_s - b / s


@triton.jit
def load_row_grads(TGT, LSE, ENT, G_LOGP, G_ENT, offs, row_mask, HAS_GRAD_ENTROPY: tl.constexpr):
    """Per-row inputs of the backward: ``(target, lse, entropy, g_logp, g_entropy, active)``; ``active`` is
    False for rows whose upstream gradients are both 0 (their logits gradient is exactly 0, so callers may skip
    them). Without an entropy gradient, ``entropy``/``g_entropy`` are placeholders that ``grad_logits`` ignores."""
    tgt = tl.load(TGT + offs, mask=row_mask, other=-1)
    lse = tl.load(LSE + offs, mask=row_mask, other=0.0)
    g_logp = tl.load(G_LOGP + offs, mask=row_mask, other=0.0)
    if HAS_GRAD_ENTROPY:
        ent = tl.load(ENT + offs, mask=row_mask, other=0.0)
        g_ent = tl.load(G_ENT + offs, mask=row_mask, other=0.0)
        active = (g_logp != 0) | (g_ent != 0)
    else:
        ent = lse
        g_ent = g_logp
        active = g_logp != 0
    return tgt, lse, ent, g_logp, g_ent, active


@triton.jit
def kept_logits(z, tau, log_w, HAS_TRUNC: tl.constexpr):
    """``z'`` of :func:`edge_kernels.core.truncation.kept_logits` for the row thresholds ``tau``/``log_w`` ``[R]``
    (sampling truncation); ``z`` itself without ``HAS_TRUNC``."""
    if HAS_TRUNC:
        t = tau[:, None]
        return tl.where(z > t, z, tl.where(z == t, z + log_w[:, None], float("-inf")))
    else:
        return z


@triton.jit
def grad_logits(z, is_target, lse, ent, g_logp, g_ent, inv_temp, softcap, HAS_GRAD_ENTROPY: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, zk=None, HAS_TRUNC: tl.constexpr = False):
    """Gradient w.r.t. raw logits of a (soft-capped, then) scaled fp32 tile ``z [R, C]``; row vectors are ``[R]``.
    With ``HAS_TRUNC`` (sampling truncation) the probabilities are those of the kept logits ``zk`` (``z'``), the
    entropy term keeps ``z`` itself (``docs/algorithms.md`` section 9).

    With ``HAS_SOFTCAP`` the chain rule's ``1 - tanh^2`` is formed from ``z`` itself (``tanh = z / (inv_temp *
    softcap)``) at the end, so no second tile stays live across the softmax arithmetic (the bf16 backward tile
    kernel is at the register limit on sm_90); clamped at 0, which a ``-inf`` (masked) entry gives."""
    if HAS_TRUNC:
        p = tl.exp(zk - lse[:, None])
    else:
        p = tl.exp(z - lse[:, None])
    dz = g_logp[:, None] * (tl.where(is_target, 1.0, 0.0) - p)
    if HAS_GRAD_ENTROPY:
        ent_term = p * tl.where(z == float("-inf"), 0.0, z - lse[:, None] + ent[:, None])
        dz -= g_ent[:, None] * ent_term
    dz = dz * inv_temp
    if HAS_SOFTCAP:
        th = z * (1.0 / (inv_temp * softcap))
        dz = dz * tl.maximum(1.0 - th * th, 0.0)
    return dz


@triton.jit
def softcap_logits(acc, softcap, HAS_SOFTCAP: tl.constexpr):
    """``softcap * tanh(acc / softcap)`` of a raw fp32 logits tile; ``-inf`` entries (masked vocabulary) stay
    ``-inf``.
    ``tanh(u)`` (libdevice's does not run under the interpreter) is ``(1 - e) / (1 + e)``, ``e = exp(-2|u|) <= 1``
    (no overflow), for ``|u| >= 0.3``, and its odd Taylor polynomial to ``u^9`` below, where ``1 - e`` would
    cancel (the next term is < 2e-8 there): a relative error of a few fp32 ulps everywhere, so a large cap stays
    exact. Without ``HAS_SOFTCAP``: ``acc``."""
    if HAS_SOFTCAP:
        u = acc * (1.0 / softcap)
        e = tl.exp(-2.0 * tl.abs(u))
        th = (1.0 - e) / (1.0 + e)
        th = tl.where(u < 0, -th, th)
        u2 = u * u
        series = u * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0 + u2 * (62.0 / 2835.0)))))
        th = tl.where(tl.abs(u) < 0.3, series, th)
        return tl.where(acc == float("-inf"), acc, softcap * th)
    else:
        return acc


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a nominal 4 under the interpreter)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def on_device(t: torch.Tensor):
    """Context for a launch: Triton launches on the *current* CUDA device and its stream, so make that the
    tensors' device (a reference model on ``cuda:1`` while ``cuda:0`` is current would fault otherwise)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def interpreting() -> bool:
    return triton_interpreter_enabled()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x - 1).bit_length())
