"""Input validation of every op, in one place.

Backends assume validated, flattened inputs; the public functions call the ``check_*``/``validate_*`` helpers
here first, so a bad call fails with a ``ValueError``/``TypeError`` that names the argument instead of a shape
error deep inside a launcher.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch

from ..core.truncation import Truncation

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_floating(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_targets(targets: torch.Tensor, expected_shape: torch.Size, vocab: int, ignore_index: int,
                  name: str = "targets") -> None:
    """Integer targets shaped ``expected_shape`` with every entry in [0, vocab) or equal to ``ignore_index``."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {targets.dtype}")
    if tuple(targets.shape) != tuple(expected_shape):
        raise ValueError(f"{name} has shape {tuple(targets.shape)}, expected {tuple(expected_shape)}")
    if targets.numel() == 0:
        return
    if targets.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # the range check needs a host sync, which CUDA-graph capture forbids: checked on eager calls
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):  # one device sync: cheap next to the kernels, and a clear error beats garbage
        first = targets[bad].flatten()[0].item()
        raise ValueError(
            f"{name} must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {first}"
        )


def check_temperature(temperature: float) -> float:
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise TypeError(f"temperature must be a positive number, got {temperature!r}") from None
    if not t > 0 or t != t or t == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if 1.0 / t > _FLOAT32_MAX:  # the kernels scale logits by 1/temperature in fp32
        raise ValueError(f"temperature must be >= {1.0 / _FLOAT32_MAX:.3g} (1/temperature is used in float32), "
                         f"got {temperature!r}")
    return t


_FLOAT32_MAX = 3.4028234663852886e38


def check_softcap(softcap: Optional[float]) -> Optional[float]:
    """``softcap`` as a float, or None: a finite number > 0 (``c`` of ``c * tanh(z / c)``)."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a positive number or None, got {softcap!r}")
    c = float(softcap)
    if not c > 0 or c == float("inf"):  # also catches NaN
        raise ValueError(f"softcap must be a finite number > 0 or None, got {softcap!r}")
    if 1.0 / c > _FLOAT32_MAX:  # the kernels multiply by 1/softcap in float32
        raise ValueError(f"softcap must be >= {1.0 / _FLOAT32_MAX:.3g} (1/softcap is used in float32), "
                         f"got {softcap!r}")
    return c


def check_chunk_size(chunk_size: Optional[int]) -> Optional[int]:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {desc}")


def validate_linear_inputs(hidden, weight, targets, bias, temperature, chunk_size, ignore_index,
                           target_vocab: Optional[int] = None):
    """Validate the fused linear op's inputs; returns the float temperature. ``target_vocab``: the bound of the
    targets when it is not ``weight.shape[0]`` (a vocabulary-parallel call, which checks the global bound later)."""
    check_floating("hidden", hidden)
    check_floating("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, D], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., D], got a 0-d tensor")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dim ({hidden.shape[-1]}) must equal weight's D = weight.shape[1] ({weight.shape[1]})"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must have V > 0 and D > 0, got shape {tuple(weight.shape)}")
    if bias is not None:
        check_floating("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    if hidden.numel() == 0 and hidden.shape[:-1].numel() == 0:
        raise ValueError("hidden is empty: the batch has no tokens")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_targets(targets, hidden.shape[:-1], weight.shape[0] if target_vocab is None else target_vocab,
                  ignore_index)
    check_chunk_size(chunk_size)
    return check_temperature(temperature)


def validate_logits_inputs(logits, targets, temperature, ignore_index, target_vocab: Optional[int] = None):
    check_floating("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V > 0, got {tuple(logits.shape)}")
    if logits.shape[:-1].numel() == 0:
        raise ValueError("logits is empty: the batch has no tokens")
    check_same_device(logits=logits, targets=targets)
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_targets(targets, logits.shape[:-1], logits.shape[-1] if target_vocab is None else target_vocab,
                  ignore_index)
    return check_temperature(temperature)


def check_truncation(top_k=None, top_p=None, min_p=None) -> Optional[Truncation]:
    """Validate ``top_k`` (int >= 1), ``top_p`` (in (0, 1]) and ``min_p`` (in [0, 1]); None or a no-op value
    (``top_p=1``, ``min_p=0``) turns a filter off. Returns None when no filter is on."""
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
            raise TypeError(f"top_k must be an int >= 1 or None, got {top_k!r}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k!r}")
        top_k = int(top_k)
    for name, val, lo_open in (("top_p", top_p, True), ("min_p", min_p, False)):
        if val is None:
            continue
        if isinstance(val, bool) or not isinstance(val, numbers.Real):
            raise TypeError(f"{name} must be a number or None, got {val!r}")
        v = float(val)
        ok = (0 < v <= 1) if lo_open else (0 <= v <= 1)
        if not ok:  # also catches NaN
            raise ValueError(f"{name} must lie in {'(0, 1]' if lo_open else '[0, 1]'} or be None, got {val!r}")
    top_p = None if top_p is None or float(top_p) == 1.0 else float(top_p)
    min_p = None if min_p is None or float(min_p) == 0.0 else float(min_p)
    if top_k is None and top_p is None and min_p is None:
        return None
    return Truncation(top_k, top_p, min_p)
