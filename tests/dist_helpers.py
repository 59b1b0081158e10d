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


# ----------------------------------------------------------------------------------------------------------
# launchers (torchrun, accelerate launch) as bounded subprocesses


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, timeout: float, env=None, cwd=None) -> str:
    """Run a launcher command line (``python -m torch.distributed.run ...``, ``accelerate launch ...``) in its own
    process group with a hard time limit; the whole group is killed when it ends, fails or times out, so no rank
    outlives the test. Returns the combined output; a non-zero exit or the time limit fails with its tail.
    One thread per process and DeepSpeed's CPU accelerator unless ``env`` says otherwise."""
    import signal
    import subprocess

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
                **(env or {})}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                            cwd=cwd, start_new_session=True)
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of a finished or failed launcher
        except ProcessLookupError:
            pass
    tail = "\n".join(out.splitlines()[-80:])
    if timed_out:
        raise AssertionError(f"{args[:4]}... ran past its {timeout:.0f} s limit (killed):\n{tail}")
    if proc.returncode != 0:
        raise AssertionError(f"{args[:4]}... exited with {proc.returncode}:\n{tail}")
    return out


def torchrun(script, *script_args, nproc=2, timeout=300.0, env=None) -> str:
    """``python -m torch.distributed.run --nproc_per_node nproc script ...`` through :func:`launch`."""
    import sys

    return launch([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   f"--master_port={free_port()}", str(script), *map(str, script_args)], timeout, env=env)
