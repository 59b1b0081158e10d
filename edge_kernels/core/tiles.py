"""Elementwise tiles shared by the PyTorch backend: the soft-cap and its derivative, target columns of a
vocabulary chunk, and the logits gradient of one fp32 tile.

With ``z = logits / T`` and ``p = softmax(z)``, upstream gradients ``g_l`` (log-prob) and ``g_H`` (entropy):
``dz_v = g_l (1[v = target] - p_v) - g_H p_v (log p_v + H)``; w.r.t. the raw logits it is ``dz / T`` (times
``1 - tanh^2`` under a soft-cap). A ``-inf`` logit (a masked vocabulary entry) has ``p = 0`` and contributes
nothing. Torch only; imports nothing else of the package.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def softcap_tile(z: Tensor, softcap: Optional[float]) -> Tensor:
    """``softcap * tanh(z / softcap)`` on a fp32 logits tile (None: ``z`` unchanged); ``-inf`` entries (masked
    vocabulary) stay ``-inf``."""
    if softcap is None:
        return z
    return torch.where(torch.isneginf(z), z, torch.tanh(z / softcap) * softcap)


def softcap_grad(capped: Tensor, softcap: float) -> Tensor:
    """``d capped / d z = 1 - tanh^2 = 1 - (capped / softcap)^2``; 0 on ``-inf`` (masked) entries."""
    t = capped / softcap
    return torch.where(torch.isneginf(capped), torch.zeros_like(t), 1.0 - t * t)


def local_targets(targets: Tensor, col0: int, cols: int) -> Tuple[Tensor, Tensor]:
    """Targets as column indices of the chunk ``[col0, col0 + cols)`` (clamped into it) and which lie inside.
    Masked gathers and scatters instead of ``nonzero``: no host sync per chunk on a GPU."""
    local = targets - col0
    return local.clamp(0, cols - 1), (local >= 0) & (local < cols)


def grad_logits_tile(z: Tensor, col0: int, targets: Tensor, lse: Tensor, entropy: Optional[Tensor],
                     grad_logp: Tensor, grad_entropy: Optional[Tensor], inv_temp: float,
                     softcap: Optional[float] = None) -> Tensor:
    """Gradient w.r.t. the raw logits of the columns ``[col0, col0 + z.shape[1])`` (fp32 ``z`` is soft-capped
    with ``softcap``, then scaled).

    ``grad_logp``/``grad_entropy`` must already be 0 on ignored rows. A row whose upstream gradients are both 0
    gets exactly 0 (not ``0 * NaN`` from NaN logits of a padding row), as the Triton and CUDA kernels, which
    skip such rows, give.
    """
    p = torch.exp(z - lse[:, None])
    dz = -grad_logp[:, None] * p
    active = grad_logp != 0
    if grad_entropy is not None:
        assert entropy is not None, "an entropy gradient needs the forward's entropy"
        ent_term = p * torch.where(torch.isneginf(z), torch.zeros_like(p), z - lse[:, None] + entropy[:, None])
        dz = dz - grad_entropy[:, None] * ent_term
        active = active | (grad_entropy != 0)
    dz = torch.where(active[:, None], dz, torch.zeros_like(dz))
    local, in_chunk = local_targets(targets, col0, z.shape[1])
    dz.scatter_add_(1, local[:, None], torch.where(in_chunk, grad_logp, torch.zeros_like(grad_logp))[:, None])
    if softcap is not None:  # chain rule through the cap: z / inv_temp is the capped logit
        dz = dz * softcap_grad(z / inv_temp, softcap)
    return dz * inv_temp
