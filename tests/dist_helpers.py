"""Multi-process ``torch.distributed`` (gloo) plumbing for tests: spawn a group, run checks, count collectives.

Each spawned rank runs the same list of ``(function, kwargs)`` checks (module-level functions, so spawn can
pickle them by name) as ``function(rank, world, **kwargs)``; an assertion in any rank fails the test with that
rank's traceback. One group per test amortises the spawn cost over many checks.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, init_file, checks):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for fn, kwargs in checks:
            fn(rank, world, **kwargs)
    finally:
        dist.destroy_process_group()


def spawn(world, checks):
    """Run ``checks`` on every rank of a fresh ``world``-rank gloo group (file rendezvous: no ports)."""
    fd, path = tempfile.mkstemp(prefix="edge_dist_")
    os.close(fd)
    os.unlink(path)  # the file store creates it
    try:
        mp.spawn(_worker, args=(world, path, checks), nprocs=world, join=True)
    finally:
        if os.path.exists(path):
            os.unlink(path)


def split(vocab, world, sizes=None):
    """Contiguous vocabulary slices in rank order: ``(starts, sizes)``, even unless ``sizes`` is given (the
    first ``vocab % world`` ranks get one more)."""
    if sizes is None:
        sizes = [vocab // world + (r < vocab % world) for r in range(world)]
    assert sum(sizes) == vocab and len(sizes) == world
    return [sum(sizes[:r]) for r in range(world)], sizes


class CountCollectives:
    """Wraps the ``torch.distributed`` collectives and records each call (``all_gather_single``, the torch 2.13
    name, is recorded as ``all_gather_into_tensor``)."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast",
             "reduce_scatter_tensor", "all_to_all_single", "gather", "scatter", "reduce", "all_gather_object",
             "broadcast_object_list")

    def __enter__(self):
        self.calls = []
        self.saved = {n: getattr(dist, n) for n in self.NAMES if hasattr(dist, n)}
        for n, fn in self.saved.items():
            setattr(dist, n, self._wrap(n, fn))
        return self

    def _wrap(self, name, fn):
        name = "all_gather_into_tensor" if name == "all_gather_single" else name

        def wrapped(*a, **k):
            self.calls.append(name)
            return fn(*a, **k)
        return wrapped

    def __exit__(self, *exc):
        for n, fn in self.saved.items():
            setattr(dist, n, fn)

    def take(self):
        out, self.calls = self.calls, []
        return out
