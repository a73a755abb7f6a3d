"""Helpers shared by the batch-run tests (a plain module: `conftest` is an ambiguous import name)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


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
