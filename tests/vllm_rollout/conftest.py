"""The vLLM tests: the real engine (the CPU build, ``vllm-cpu``, in CI's second environment; see README, Tests).

Skipped as a directory where vllm is not installed (the main environment: verl and vllm-cpu need different
transformers versions). vLLM reads its environment when imported, so it is set here, before any test imports it:
the engine in this process (the weight push needs it) and a 1 GiB KV cache on CPU.
"""

import importlib.util
import os

import pytest

HAS_VLLM = importlib.util.find_spec("vllm") is not None
collect_ignore_glob = [] if HAS_VLLM else ["test_*.py"]

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(autouse=True)
def _restore_threads():
    import torch

    n = torch.get_num_threads()
    yield
    try:
        torch.set_num_threads(n)
    except Exception:  # pragma: no cover - vLLM's CPU worker may pin the threads
        pass
