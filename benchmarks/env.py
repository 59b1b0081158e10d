"""Device and versions of a benchmark run: the device picked, its name, the environment block of a results
document, synchronisation and freeing memory between rows.
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import os
import platform
import re
import shlex
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch


GIB = float(1 << 30)
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------------------------
# device, versions


def pick_device(name: Optional[str] = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    proc = platform.processor() or platform.machine() or "cpu"
    return f"CPU ({proc}, {os.cpu_count()} cores, torch threads: {torch.get_num_threads()})"


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine() or 'unknown'}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _dist_version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device, argv: Sequence[str], quick: bool) -> Dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover
        triton_version = None
    env: Dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "slug": device_slug(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "command": "python -m benchmarks" + "".join(" " + shlex.quote(a) for a in argv),
        "mode": "quick" if quick else "full",
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "anchors": {d: _dist_version(d) for d in ("trl", "verl", "cut-cross-entropy", "liger-kernel")},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["sms"] = props.multi_processor_count
        env["memory_gib"] = round(props.total_memory / GIB, 1)
    return env


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
