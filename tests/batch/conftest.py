"""Helpers for the batch-run tests: a fake engine on the import path and JSONL readers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from fake_engine import FakeLLM  # noqa: E402


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_lines(path: Path, lines: list[Any]) -> Path:
    """Objects are dumped as JSON; strings are written verbatim (for bad lines)."""
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def key_of(rec: dict[str, Any]) -> str | None:
    key = rec["custom_id"] if "custom_id" in rec else rec.get("id")
    return None if key is None else str(key)


@pytest.fixture
def fake() -> FakeLLM:
    return FakeLLM("fake-model", adapters={"reverse": "r", "upper": "u", "rot13": "x", "swapcase": "s"})
