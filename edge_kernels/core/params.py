"""The scalar settings of one op call (one frozen object passed to every backend's launchers) and the default
vocabulary chunk of the chunked paths.

The PyTorch path, the Triton launchers and the CUDA launchers of both ops take their tensors positionally and
everything else through :class:`LaunchParams` (the public functions build it once, after validation), so a new
setting is one field here instead of one more positional argument through every launcher.
Imports nothing but the standard library: it must load where triton is absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class LaunchParams:
    """Validated settings of a call.

    Attributes:
        inv_temp: ``1 / temperature``; logits are multiplied by it (after the soft-cap).
        ignore_index: targets equal to it mark rows with zero outputs and no gradient.
        softcap: ``c`` of the soft-cap ``c * tanh(z / c)`` applied to the fp32 logits before the temperature
            (Gemma 2/3's ``final_logit_softcapping``), or None for none.
        chunk_size: vocabulary columns per chunk of the chunked paths (None: the default of
            :func:`default_chunk_size`).
    """

    inv_temp: float
    ignore_index: int = -100
    softcap: Optional[float] = None
    chunk_size: Optional[int] = None


# Workspace budget of the chunked paths: a chunk holds N x chunk_size elements (the gradient tile, and
# on the PyTorch path also an fp32 logits tile). 2**25 elements = 128 MiB in fp32, 64 MiB in bf16.
DEFAULT_WORKSPACE_ELEMENTS = 1 << 25
MIN_CHUNK = 256


def default_chunk_size(n_rows: int, vocab: int) -> int:
    """Vocabulary columns per chunk: the largest multiple of 256 (at least 256) with
    ``n_rows * chunk <= DEFAULT_WORKSPACE_ELEMENTS``, capped at ``vocab``."""
    chunk = DEFAULT_WORKSPACE_ELEMENTS // max(int(n_rows), 1)
    chunk = max(MIN_CHUNK, (chunk // MIN_CHUNK) * MIN_CHUNK)
    return int(min(chunk, vocab))
