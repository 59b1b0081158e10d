"""The scalar settings of one op call, passed as one frozen object to every backend's launchers.

The PyTorch path, the Triton launchers and the CUDA launchers of both ops take their tensors positionally and
everything else through :class:`LaunchParams` (the public functions build it once, after validation), so a new
setting is one field here instead of one more positional argument through every launcher.
This module imports nothing but the standard library: it must load where triton is absent.
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
            :func:`edge_kernels.dispatch.default_chunk_size`).
    """

    inv_temp: float
    ignore_index: int = -100
    softcap: Optional[float] = None
    chunk_size: Optional[int] = None
