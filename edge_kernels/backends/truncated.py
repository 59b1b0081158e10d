"""The PyTorch backend of the sampling-truncated log-probs (``top_k`` / ``top_p`` / ``min_p``, autograd in
:mod:`edge_kernels.ops.truncated`) and the table of truncated backends.

A backend is ``(tiles, fwd, bwd)``: ``tiles(inputs, params) -> Tiles`` (the threshold search's chunks of fp32
logits, formed by the same code as the backend's own kernels, so every pass sees bit-identical logits);
``fwd(inputs, targets, th, params) -> (z_target, lse, entropy')`` (``entropy'`` of the kept logits ``z'``);
``bwd(inputs, targets, th, lse, entropy, g_logp, g_ent, params, needs) -> grads``. ``inputs`` is ``(x3,)``
(logits in, ``[B, T, V]``) or ``(hidden, weight, bias)``. The Triton backend (:mod:`.triton.truncated`) is
imported on first use.
"""

from __future__ import annotations

import torch

from ..core.params import LaunchParams, default_chunk_size
from ..core.probes import mixed_mm_ok
from ..core.stats import finalize_stats, init_stats, update_stats
from ..core.tiles import local_targets, softcap_grad, softcap_tile
from ..core.truncation import Threshold, grad_kept_tile, kept_logits, row_slices
from .torch import MIN_CHUNK_COLS, TILE_ELEMENTS, logits_tile, mm_into

# ----------------------------------------------------------------------------------------------------------
# PyTorch backend, logits in: inputs = (x3,), x3 [B, T, V] with unit vocabulary stride


def _logits_chunk(params: LaunchParams, n: int, vocab: int) -> int:
    return params.chunk_size or default_chunk_size(n, vocab)


def torch_logits_tiles(inputs, params: LaunchParams):
    (x3,) = inputs
    n, vocab = x3.shape[0] * x3.shape[1], x3.shape[2]
    chunk = _logits_chunk(params, n, vocab)

    def tiles():
        for c0 in range(0, vocab, chunk):
            x = x3[:, :, c0:c0 + chunk].reshape(n, -1).float()
            yield c0, softcap_tile(x, params.softcap) * params.inv_temp  # always a new tensor
    return tiles


def _kept_stats(tiles, n, device, targets, th: Threshold):
    """``(z_target, lse, entropy')`` over the kept logits ``z'`` of every tile."""
    m, s, b = init_stats(n, device)
    zt = torch.zeros(n, device=device)
    for c0, z in tiles():
        for r0, r1 in row_slices(n, z.shape[1]):  # row slices: the temporaries stay slice-sized
            sl = slice(r0, r1)
            th_s = Threshold(th.tau[sl], th.log_w[sl], th.k_tie[sl])
            m[sl], s[sl], b[sl] = update_stats(m[sl], s[sl], b[sl], kept_logits(z[sl], th_s))
        local, inside = local_targets(targets, c0, z.shape[1])
        zt = torch.where(inside, z.gather(1, local[:, None]).squeeze(1), zt)
    lse, ent = finalize_stats(m, s, b)
    return zt, lse, ent


def torch_logits_fwd(inputs, targets, th: Threshold, params: LaunchParams):
    (x3,) = inputs
    return _kept_stats(torch_logits_tiles(inputs, params), x3.shape[0] * x3.shape[1], x3.device, targets, th)


def torch_logits_bwd(inputs, targets, th, lse, entropy, g_logp, g_ent, params: LaunchParams, needs):
    (x3,), (out3,) = inputs, needs
    bsz, t = x3.shape[0], x3.shape[1]
    for c0, z in torch_logits_tiles(inputs, params)():
        dz = grad_kept_tile(z, c0, targets, lse, entropy, g_logp, g_ent, th)
        if params.softcap is not None:
            dz = dz * softcap_grad(z / params.inv_temp, params.softcap)
        out3[:, :, c0:c0 + z.shape[1]] = (dz * params.inv_temp).view(bsz, t, -1).to(out3.dtype)
    return (out3,)


# ----------------------------------------------------------------------------------------------------------
# PyTorch backend, hidden states in: inputs = (hidden [N, D], weight [V, D], bias [V] or None)


def _linear_setup(inputs, params: LaunchParams):
    hidden, weight, bias = inputs
    mixed = mixed_mm_ok(hidden)
    h_op = hidden if mixed else hidden.float()
    # GEMM tiles of about TILE_ELEMENTS fp32 logits (as the plain backward's): each pass holds one tile
    n, vocab = hidden.shape[0], weight.shape[0]
    chunk = params.chunk_size or min(vocab, max(MIN_CHUNK_COLS, TILE_ELEMENTS // n // 256 * 256))
    return h_op, mixed, chunk, (bias.float() if bias is not None else None)


def torch_linear_tiles(inputs, params: LaunchParams):
    hidden, weight, _ = inputs
    h_op, mixed, chunk, bias32 = _linear_setup(inputs, params)
    vocab = weight.shape[0]

    def tiles():
        for c0 in range(0, vocab, chunk):
            c1 = min(vocab, c0 + chunk)
            w = weight[c0:c1] if mixed else weight[c0:c1].float()
            out = torch.empty((hidden.shape[0], c1 - c0), device=hidden.device)
            yield c0, logits_tile(h_op, w, None if bias32 is None else bias32[c0:c1], params.inv_temp,
                                             out, params.softcap)
    return tiles


def torch_linear_fwd(inputs, targets, th: Threshold, params: LaunchParams):
    hidden = inputs[0]
    return _kept_stats(torch_linear_tiles(inputs, params), hidden.shape[0], hidden.device, targets, th)


def torch_linear_bwd(inputs, targets, th, lse, entropy, g_logp, g_ent, params: LaunchParams, needs):
    hidden, weight, bias = inputs
    needs_h, needs_w, needs_b = needs
    h_op, mixed, _, _ = _linear_setup(inputs, params)
    dh = torch.zeros(hidden.shape, device=hidden.device) if needs_h else None
    dw = torch.zeros_like(weight) if needs_w else None
    db = torch.zeros(weight.shape[0], device=weight.device) if needs_b else None
    for c0, z in torch_linear_tiles(inputs, params)():
        c1 = c0 + z.shape[1]
        dz = grad_kept_tile(z, c0, targets, lse, entropy, g_logp, g_ent, th)
        if params.softcap is not None:
            dz = dz * softcap_grad(z / params.inv_temp, params.softcap)
        dz = (dz * params.inv_temp).to(h_op.dtype)
        w = weight[c0:c1] if mixed else weight[c0:c1].float()
        if dh is not None:
            mm_into(dh, dz, w, accumulate=True)
        if dw is not None:
            dw[c0:c1] = mm_into(torch.empty(w.shape, device=w.device), dz.t(), h_op).to(dw.dtype)
        if db is not None:
            db[c0:c1] = dz.float().sum(dim=0)
    return (None if dh is None else dh.to(hidden.dtype)), dw, (None if db is None else db.to(bias.dtype))


KINDS = ("logprob_entropy", "linear_logprob_entropy")
_TABLE = {("logprob_entropy", "torch"): (torch_logits_tiles, torch_logits_fwd, torch_logits_bwd),
          ("linear_logprob_entropy", "torch"): (torch_linear_tiles, torch_linear_fwd, torch_linear_bwd)}


def get(op: str, impl: str):
    """``(tiles, fwd, bwd)`` of the truncated ``op`` on ``impl``; Triton is imported on its first call."""
    if impl == "triton" and (op, impl) not in _TABLE:
        from .triton import truncated as tri

        _TABLE[("logprob_entropy", "triton")] = (tri.logits_tiles, tri.logits_fwd, tri.logits_bwd)
        _TABLE[("linear_logprob_entropy", "triton")] = (tri.linear_tiles, tri.linear_fwd, tri.linear_bwd)
    if (op, impl) not in _TABLE:
        raise NotImplementedError(f"top_k/top_p/min_p have no impl={impl!r} backend for {op}; use impl='torch' "
                                  "or impl='triton'")
    return _TABLE[(op, impl)]
