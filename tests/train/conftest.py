"""Fixtures of the edge-train tests."""

import pytest
import torch

from train_helpers import TINY


@pytest.fixture
def tiny():
    return dict(TINY)


@pytest.fixture(autouse=True)
def _restore_threads():
    # the trainer pins torch to one CPU thread for the embedded model; give other tests theirs back
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
