"""Backend choice: which implementation (``impl=``) runs an op on the given tensors.

``"auto"`` picks Triton for CUDA tensors (when triton imports) and the PyTorch backend elsewhere; an explicit
``impl`` that cannot run here raises, naming what is missing.
"""

from __future__ import annotations

import torch

from .. import backends
from ..backends import cuda
from ..core.probes import triton_available, triton_interpreter_enabled

IMPLS = ("auto", "triton", "torch", "cuda")


def resolve_impl(impl: str, *tensors: torch.Tensor, op: str) -> str:
    """Map ``impl`` to the backend that will run ``op`` (a name of :data:`edge_kernels.backends.OPS`).

    ``"auto"`` picks Triton for CUDA tensors and the chunked PyTorch path elsewhere. ``"triton"`` on CPU
    tensors runs only under Triton's interpreter (``TRITON_INTERPRET=1``, used by the CPU tests).
    """
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if impl == "auto":
        # Triton, not the csrc/ CUDA extension, even where impl="cuda" exists: no committed GPU benchmark shows
        # the CUDA kernels faster yet (issue 7 asks "auto" to follow that benchmark once it exists).
        return "triton" if on_cuda and triton_available() else "torch"
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' needs the triton package (Linux only); use impl='torch'")
        if not on_cuda and not triton_interpreter_enabled():
            raise ValueError(
                "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before importing edge_kernels "
                "to run Triton's interpreter on the CPU); use impl='torch' or impl='auto' for CPU tensors"
            )
        return "triton"
    if impl == "cuda":
        # The csrc/ CUDA C++ extension (edge_kernels.backends.cuda): only ops with a registered "cuda" backend
        # have it, today logprob_entropy alone
        if not backends.has(op, "cuda"):
            raise NotImplementedError(
                f"impl='cuda' (the csrc/ CUDA C++ kernels) exists only for edge_kernels.logprob_entropy, the "
                f"logits-in op; {op} has none: use impl='triton' or impl='auto'"
            )
        if not on_cuda:
            raise ValueError(
                "impl='cuda' needs CUDA tensors; use impl='torch' or impl='auto' for CPU tensors"
            )
        cuda.load()  # loads, or builds with ninja on first use; a RuntimeError says what is missing
        return "cuda"
    return "torch"
