"""Test setup shared by every test file.

On a machine without a CUDA GPU, Triton kernels run through Triton's interpreter: ``TRITON_INTERPRET=1`` must be
set before any kernel module is imported, which is why this happens at the top of conftest, before
``edge_kernels`` is imported anywhere.
"""

import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

try:  # CI replays the same fuzz examples every run (no flaky submissions); elsewhere each run explores anew
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        _hyp_settings.load_profile("ci")
except ImportError:  # pragma: no cover
    pass

DEVICE = "cuda" if _HAS_CUDA else "cpu"


@pytest.fixture
def device():
    return DEVICE


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; CI is CPU-only (run on a lent GPU)")
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)
