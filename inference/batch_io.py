"""Files of a batch job: lazy JSONL reading, crash-safe appending, resume scanning, ordered rewrite.

Crash-safety invariant: a record is one `write` of one complete line, flushed to the OS before the
next engine step; fsync happens at intervals and at the end. A SIGKILL can therefore leave at most one
torn line, at the very end of a file, which `scan_jsonl` truncates before anything is appended.
Memory invariant: nothing here holds a file in memory; the id sets cost ~16-32 bytes per id.
"""

from __future__ import annotations

import json
import os
import time
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from lorax.errors import ConfigError


class IdTable:
    """A compact set of string keys (64-bit hashes, open addressing) with an int64 value per key.

    A Python set of a million strings costs ~100 MB; this costs 8 bytes per slot (16 with values) at
    25-50% load (array.array, whose item access is several times cheaper than numpy scalars). Keys are never
    stored: two distinct keys share a 64-bit hash with probability ~n^2 / 2^65 (3e-8 for a million).
    `hash()` is salted per process, which is fine: a table never outlives its process.
    """

    _MASK64 = (1 << 64) - 1

    def __init__(self, capacity: int = 1024, values: bool = True) -> None:
        size = 1
        while size < 2 * capacity:
            size *= 2
        self._keys = array("Q", bytes(8 * size))  # 0 = empty slot
        # A pure set needs no values: 8 bytes per slot instead of 16; get() then returns 0 for members.
        self._vals = array("q", bytes(8 * size)) if values else None
        self._n = 0

    def _slot(self, h: int) -> int:
        keys = self._keys
        mask = len(keys) - 1
        i = h & mask
        while True:
            k = keys[i]
            if k == 0 or k == h:
                return i
            i = (i + 1) & mask

    def add(self, key: str, value: int = 0) -> bool:
        """Insert `key` (keeping an existing value); True if it was new."""
        h = (hash(key) & self._MASK64) or 1
        i = self._slot(h)
        if self._keys[i] == h:
            return False
        self._keys[i] = h
        if self._vals is not None:
            self._vals[i] = value
        self._n += 1
        if 2 * self._n > len(self._keys):
            self._grow()
        return True

    def get(self, key: str) -> int | None:
        h = (hash(key) & self._MASK64) or 1
        i = self._slot(h)
        if self._keys[i] != h:
            return None
        return self._vals[i] if self._vals is not None else 0

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        return self._n

    def _grow(self) -> None:
        old_keys, old_vals = self._keys, self._vals
        self._keys = array("Q", bytes(16 * len(old_keys)))
        self._vals = array("q", bytes(16 * len(old_keys))) if old_vals is not None else None
        for i, h in enumerate(old_keys):
            if h:
                j = self._slot(h)
                self._keys[j] = h
                if self._vals is not None and old_vals is not None:
                    self._vals[j] = old_vals[i]


def record_key(record: Any) -> str | None:
    """The resume key of an output/error record: `custom_id` (OpenAI form) or `id` (simple form)."""
    if not isinstance(record, dict):
        return None
    key = record["custom_id"] if "custom_id" in record else record.get("id")
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        return None
    return str(key)


def iter_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(1-based line number, byte offset, raw line without the newline), read lazily."""
    with open(path, "rb") as f:
        offset = 0
        for n, raw in enumerate(f, start=1):
            yield n, offset, raw.rstrip(b"\r\n")
            offset += len(raw)


def count_lines(path: Path) -> int:
    """Newline-terminated lines plus a final unterminated one, in 1 MiB chunks."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def truncate_torn_tail(path: Path) -> int:
    """Cut an unterminated last line (a write torn by SIGKILL); return the bytes removed."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        # Walk back in blocks to the last newline; a torn line is at most one record long.
        pos, block = size, 1 << 16
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            if start + len(chunk) == size and chunk.endswith(b"\n"):
                return 0
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                break
            pos = start
        else:
            keep = 0
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


def scan_jsonl(path: Path, on_record: Callable[[int, dict[str, Any]], None]) -> int:
    """Truncate a torn tail, then call on_record(line_no, record) per line; return bytes truncated.

    A complete line that is not a JSON object is corruption that lorax did not write: refuse to append
    to such a file rather than guess.
    """
    if not path.exists():
        return 0
    cut = truncate_torn_tail(path)
    for n, _, raw in iter_lines(path):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: line {n} is not JSON ({err}); fix or remove it before resuming") from err
        if not isinstance(record, dict):
            raise ConfigError(f"{path}: line {n} is not a JSON object; fix or remove it before resuming")
        on_record(n, record)
    return cut


class JsonlAppender:
    """Appends one record per line; `flush()` after each group, fsync at most every `fsync_interval_s`."""

    def __init__(self, path: Path, fsync_interval_s: float = 5.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f: IO[bytes] = open(path, "ab")  # noqa: SIM115 - closed in close()
        self._interval = fsync_interval_s
        self._last_sync = time.monotonic()
        self._dirty = False
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        # One write() per complete line: a crash tears at most the line being written.
        self._f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self._dirty = True
        self.count += 1

    def flush(self) -> None:
        if not self._dirty:
            return
        self._f.flush()
        self._dirty = False
        if time.monotonic() - self._last_sync >= self._interval:
            self.sync()

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._f.closed:
            return
        self.sync()
        self._f.close()


def rewrite_in_input_order(output: Path, input_keys: Iterator[str]) -> int:
    """Rewrite `output` so records follow the order of `input_keys`; atomic (tmp file + os.replace).

    Memory: one IdTable of byte offsets (16-32 bytes per record); records are copied by seeking.
    Records whose key the input no longer has keep their relative order at the end. Returns records.
    """
    offsets = IdTable(max(1024, count_lines(output)))  # sized once: no growth copies at the peak
    n_records = 0
    for _, offset, raw in iter_lines(output):
        if raw.strip():
            key = record_key(json.loads(raw))
            if key is not None:
                offsets.add(key, offset)
            n_records += 1
    tmp = output.with_name(output.name + ".ordering.tmp")
    emitted = IdTable(max(1024, n_records), values=False)
    written = 0
    with open(output, "rb") as src, open(tmp, "wb") as dst:
        for key in input_keys:
            off = offsets.get(key)
            if off is None or not emitted.add(key):
                continue
            src.seek(off)
            dst.write(src.readline())
            written += 1
        # Leftovers (and keyless records) in file order.
        for _, offset, raw in iter_lines(output):
            if not raw.strip():
                continue
            key = record_key(json.loads(raw))
            if key is None or (offsets.get(key) == offset and emitted.add(key)):
                dst.write(raw + b"\n")
                written += 1
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, output)
    return written


def same_file(a: Path, b: Path) -> bool:
    """True when two paths name one file (symlinks and hard links included) or one path string."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()
