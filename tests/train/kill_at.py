"""Test-only: ``python tests/train/kill_at.py STEP:POINT EDGE_TRAIN_ARGS...`` runs edge-train as the CLI does, but
through :class:`~edge_kernels.train.loop.Trainer`'s ``fault`` seam, which SIGKILLs this process at ``POINT`` of step
``STEP`` (``update``, ``metrics`` or ``checkpoint``; :mod:`edge_kernels.train.checkpointing`). Production code has
no way to reach the seam (no option, no environment variable)."""

import os
import signal
import sys


def main() -> None:
    from edge_kernels.train.cli import train_parser
    from edge_kernels.train.config import build_config
    from edge_kernels.train.loop import Trainer

    where, argv = sys.argv[1], sys.argv[2:]

    def fault(step: int, point: str) -> None:
        if f"{step}:{point}" == where:
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer(build_config(vars(train_parser().parse_args(argv))), fault=fault).run()


if __name__ == "__main__":
    main()
