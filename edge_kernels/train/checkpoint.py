"""Atomic checkpoints: model (+ tokenizer), optimizer, RNG states, data position and loop state.

A checkpoint is written into ``checkpoint.tmp/`` (every file fsync'ed), then swapped in with renames:
``checkpoint/ -> checkpoint.old/``, ``checkpoint.tmp/ -> checkpoint/``, then ``checkpoint.old/`` is removed.
A kill at any moment leaves either ``checkpoint/`` or ``checkpoint.old/`` complete; :func:`find` returns
whichever is there. ``checkpoint/model/`` is a Hugging Face model directory (``edge-train eval --model`` takes
it, or the output directory itself).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any, Callable, Dict, Optional

import torch

STATE_FILE = "trainer_state.json"


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(output_dir: str, *, model, tokenizer, optimizer, state: Dict[str, Any],
         before_swap: Optional[Callable[[], None]] = None) -> str:
    """Write a checkpoint atomically; returns its path. ``before_swap`` (tests) runs between writing
    ``checkpoint.tmp/`` and the renames."""
    final = os.path.join(output_dir, "checkpoint")
    tmp = os.path.join(output_dir, "checkpoint.tmp")
    old = os.path.join(output_dir, "checkpoint.old")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    model.save_pretrained(os.path.join(tmp, "model"), safe_serialization=True)
    tokenizer.save_pretrained(os.path.join(tmp, "model"))
    from .model import SOURCE_GENERATION_CONFIG

    source_gc = getattr(model, SOURCE_GENERATION_CONFIG, None)
    if source_gc is not None:  # the model's own sampling defaults, not the clean config edge-train samples with
        try:  # written as loaded (save_pretrained would re-validate it); never fails a checkpoint
            source_gc.to_json_file(os.path.join(tmp, "model", "generation_config.json"), use_diff=True)
        except Exception:  # noqa: BLE001 - the clean config save_pretrained wrote stays
            pass
    if optimizer is not None:
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save(rng_state(), os.path.join(tmp, "rng.pt"))
    with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as fh:
        json.dump(state, fh, indent=1)
    _fsync_tree(tmp)
    if before_swap is not None:
        before_swap()
    if os.path.exists(final):
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if os.path.exists(old):
        shutil.rmtree(old)
    try:  # make the renames durable
        fd = os.open(output_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - not every filesystem allows fsync on a directory
        pass
    return final


def find(output_dir: str) -> Optional[str]:
    """The complete checkpoint in ``output_dir`` (``checkpoint/``, else ``checkpoint.old/``), or None."""
    for name in ("checkpoint", "checkpoint.old"):
        path = os.path.join(output_dir, name)
        if os.path.isfile(os.path.join(path, STATE_FILE)):
            return path
    return None


def load_state(path: str) -> Dict[str, Any]:
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as fh:
        return json.load(fh)


def load_optimizer(path: str, optimizer) -> None:
    f = os.path.join(path, "optimizer.pt")
    if os.path.isfile(f):
        optimizer.load_state_dict(torch.load(f, map_location="cpu", weights_only=False))


def load_rng(path: str) -> None:
    f = os.path.join(path, "rng.pt")
    if os.path.isfile(f):
        set_rng_state(torch.load(f, map_location="cpu", weights_only=False))
