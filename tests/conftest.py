"""Shared test setup: the `gpu` marker skips unless a Hopper (sm_90) GPU is present."""
import pytest
import torch


def hopper_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def pytest_collection_modifyitems(config, items):
    if hopper_available():
        return
    skip = pytest.mark.skip(reason="needs a Hopper (sm_90) GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen():
    """A seeded generator: fresh random data per test, reproducible per test."""
    return torch.Generator().manual_seed(1234)
