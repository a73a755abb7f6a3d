"""File primitives of the batch job: the id table against a dict, torn-tail truncation, line counting."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lorax.inference.batch_io import IdTable, count_lines, rewrite_in_input_order, truncate_torn_tail


@pytest.mark.parametrize("values", [True, False])
def test_id_table_matches_a_dict(values: bool) -> None:
    rng = random.Random(0)
    table, ref = IdTable(capacity=4, values=values), {}
    keys = [f"id-{rng.randrange(3000)}" for _ in range(5000)] + ["", "é", "x" * 1000]
    for i, key in enumerate(keys):
        assert table.add(key, i) == (key not in ref)  # True only the first time; the first value is kept
        ref.setdefault(key, i)
    assert len(table) == len(ref)
    for key, value in ref.items():
        assert table.get(key) == (value if values else 0) and key in table
    for miss in ("id-3000", "id--1", "nope"):
        assert table.get(miss) is None and miss not in table


# (file bytes, bytes kept): only an unterminated last line is cut.
TAILS = [
    (b"", 0),
    (b'{"a": 1}\n', 9),
    (b'{"a": 1}\n{"b": 2}\n', 18),
    (b'{"a": 1}\n{"b": ', 9),
    (b'{"torn": tru', 0),
    (b'{"a": 1}\n' + b"x" * 200_000, 9),  # a torn line longer than the 64 KiB read-back block
    (b'{"a": 1}\n\n{"b"', 10),
]


@pytest.mark.parametrize(("data", "kept"), TAILS)
def test_truncate_torn_tail(tmp_path: Path, data: bytes, kept: int) -> None:
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    assert truncate_torn_tail(path) == len(data) - kept
    assert path.read_bytes() == data[:kept]


@pytest.mark.parametrize(("data", "n"), [(b"", 0), (b"a\n", 1), (b"a\nb", 2), (b"a\n\nb\n", 3), (b"\n" * 3_000_000, 3_000_000)])
def test_count_lines(tmp_path: Path, data: bytes, n: int) -> None:
    path = tmp_path / "f"
    path.write_bytes(data)
    assert count_lines(path) == n


def test_rewrite_in_input_order_keeps_strays_at_the_end(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "c"}\n{"custom_id": "a", "x": 1}\n{"id": "stray"}\n{"id": "b"}\n')
    assert rewrite_in_input_order(out, iter(["a", "b", "missing", "c", "a"])) == 4
    assert out.read_text() == '{"custom_id": "a", "x": 1}\n{"id": "b"}\n{"id": "c"}\n{"id": "stray"}\n'
