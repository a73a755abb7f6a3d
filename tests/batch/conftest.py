"""Batch-run tests: the fake engine and helpers on the import path, and a fake-engine fixture."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from fake_engine import FakeLLM  # noqa: E402


@pytest.fixture
def fake() -> FakeLLM:
    return FakeLLM("fake-model", adapters={"reverse": "r", "upper": "u", "rot13": "x", "swapcase": "s"})
