"""Shared test setup: seeded RNGs, the `gpu` marker, and the Triton interpreter on CPU-only machines."""

from __future__ import annotations

import os
import random

import pytest

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    HAS_CUDA = False

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before lorax.kernels loads.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"
