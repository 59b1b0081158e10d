"""The backends of every op and the one registry that names them: ``(op, impl) -> (forward, backward)``.

Backends: ``"torch"`` (:mod:`.torch`, the CPU path and the fallback), ``"triton"`` (:mod:`.triton`, loaded on
first use so the package works without triton) and ``"cuda"`` (:mod:`.cuda`, the csrc/ C++ extension, logits-in
op only). The op front-ends (:mod:`edge_kernels.ops`) look their backend up here at call time, and the
vocabulary-parallel wrapper is handed what they looked up.

Signatures, per op (``params`` a :class:`~edge_kernels.core.params.LaunchParams`):

* ``"linear_logprob_entropy"``: ``fwd(hidden, weight, bias, targets, params) -> (logp, entropy, lse)`` and
  ``bwd(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, params, needs) -> (dh, dw, db)``,
  ``needs`` the ``(hidden, weight, bias)`` gradient flags.
* ``"logprob_entropy"``: ``fwd(x3, targets, params) -> (logp, entropy, lse)`` and
  ``bwd(x3, targets, lse, entropy, grad_logp, grad_entropy, params, out3) -> out3``, ``x3`` the ``[B, T, V]``
  logits (unit vocabulary stride).
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

from . import cuda
from . import torch as torch_backend

OPS = ("linear_logprob_entropy", "logprob_entropy")

Pair = Tuple[Callable, Callable]

REGISTRY: Dict[Tuple[str, str], Pair] = {
    ("linear_logprob_entropy", "torch"): (torch_backend.linear_forward, torch_backend.linear_backward),
    ("logprob_entropy", "torch"): (torch_backend.logits_forward, torch_backend.logits_backward),
    # the extension itself is built or loaded on the first call (cuda.load), never here
    ("logprob_entropy", "cuda"): (cuda.logprob_entropy_fwd, cuda.logprob_entropy_bwd),
}

# the ops whose Triton kernels _load_triton registers
_TRITON_OPS = ("linear_logprob_entropy", "logprob_entropy")


def has(op: str, impl: str) -> bool:
    """Whether ``op`` has an ``impl`` backend (without loading it)."""
    return (op, impl) in REGISTRY or (impl == "triton" and op in _TRITON_OPS)


def get(op: str, impl: str) -> Pair:
    """``(forward, backward)`` of ``op`` on ``impl``; the Triton modules are imported on the first Triton call."""
    if impl == "triton" and (op, impl) not in REGISTRY:
        _load_triton()
    try:
        return REGISTRY[(op, impl)]
    except KeyError:
        raise NotImplementedError(f"{op} has no {impl!r} backend") from None


def _load_triton() -> None:
    # imports triton (optional third-party: Linux only), so only on the first impl="triton" call
    from .triton import linear_logprob_entropy as tri_linear
    from .triton import logprob_entropy as tri_logits

    REGISTRY[("linear_logprob_entropy", "triton")] = (tri_linear.triton_fwd, tri_linear.triton_bwd)
    REGISTRY[("logprob_entropy", "triton")] = (tri_logits.triton_fwd, tri_logits.triton_bwd)
