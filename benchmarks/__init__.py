"""edge-kernels benchmarks: ``python -m benchmarks [--quick] [--only NAME] [--out DIR]`` (see README.md).

Not part of the installed package. On a machine without a CUDA GPU, Triton kernels only run under Triton's
interpreter, which must be switched on before any kernel module is imported; this is done here, before
``edge_kernels`` is imported by any benchmark module.
"""

import os

try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except Exception:  # pragma: no cover - torch missing: nothing below can run anyway
    pass
