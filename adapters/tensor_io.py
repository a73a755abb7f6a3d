"""Lazy tensor sources (safetensors, torch zip read without pickle) and a streaming safetensors writer.

A source lists names, shapes and dtypes without reading data; ``get`` reads one tensor. That lets
`lorax convert` hold one layer at a time and `lorax inspect` read headers first.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from lorax.errors import AdapterError

# safetensors dtype strings <-> torch dtypes (the subset adapters use).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_NAMES: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}


class TensorSource(Protocol):
    path: Path

    def names(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def dtype(self, key: str) -> torch.dtype: ...

    def get(self, key: str) -> torch.Tensor: ...


class SafetensorsSource:
    """A safetensors file read through its header; tensors are read one at a time.

    The header is parsed and checked here (offsets inside the file, contiguous, sizes matching
    shape x dtype) so that a truncated file or a lying header is an AdapterError naming the tensor,
    not a crash or a silent short read.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        self.metadata: dict[str, str] = {}
        self._parse_header()

    def _parse_header(self) -> None:
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise AdapterError(f"{self.path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100_000_000):
                raise AdapterError(f"{self.path}: header length {n} exceeds the file ({size} bytes): truncated?")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise AdapterError(f"{self.path}: unreadable safetensors header ({err})") from None
        if not isinstance(header, dict):
            raise AdapterError(f"{self.path}: safetensors header is not an object")
        data_len = size - 8 - n
        meta = header.pop("__metadata__", None) or {}
        self.metadata = {str(k): str(v) for k, v in meta.items()}
        spans: list[tuple[int, int, str]] = []
        for key, info in header.items():
            try:
                dtype = ST_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise AdapterError(f"{self.path}: tensor {key!r}: bad header entry {info!r}") from None
            numel = 1
            for d in shape:
                if d < 0:
                    raise AdapterError(f"{self.path}: tensor {key!r}: negative dimension in {shape}")
                numel *= d
            want = numel * torch.empty((), dtype=dtype).element_size()
            if end - begin != want or begin < 0:
                raise AdapterError(
                    f"{self.path}: tensor {key!r}: header says {end - begin} bytes at [{begin}, {end}) but "
                    f"{info['dtype']}{list(shape)} needs {want}"
                )
            if end > data_len:
                raise AdapterError(
                    f"{self.path}: tensor {key!r} ends at byte {end} but the data section has {data_len} "
                    "bytes: the file is truncated or its header lies"
                )
            spans.append((begin, end, key))
            self._entries[key] = (dtype, shape, 8 + n + begin, want)
        spans.sort()
        pos = 0
        for begin, end, key in spans:
            if begin != pos:
                raise AdapterError(f"{self.path}: tensor {key!r} starts at {begin}, expected {pos} (overlap/gap)")
            pos = end

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][0]

    def get(self, key: str) -> torch.Tensor:
        dtype, shape, offset, nbytes = self._entries[key]
        with open(self.path, "rb") as f:
            f.seek(offset)
            buf = bytearray(nbytes)
            got = f.readinto(buf)
        if got != nbytes:
            raise AdapterError(f"{self.path}: tensor {key!r}: short read ({got} of {nbytes} bytes)")
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy().data)


class SafetensorsWriter:
    """Writes a safetensors file one tensor at a time, then renames it into place atomically.

    Data goes to a temporary spill file as tensors arrive (memory: one tensor); ``close`` writes the
    header and copies the spill in chunks into a second temporary file next to ``dest`` and renames it.
    A crash leaves ``dest`` untouched.
    """

    def __init__(self, dest: str | Path) -> None:
        self.dest = Path(dest)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        fd, spill = tempfile.mkstemp(prefix=".lorax-spill-", dir=self.dest.parent)
        self._spill_path = Path(spill)
        self._spill = os.fdopen(fd, "wb")
        self._header: dict[str, dict[str, object]] = {}
        self._pos = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._header:
            raise AdapterError(f"{self.dest}: tensor {name!r} written twice")
        if tensor.dtype not in ST_NAMES:
            raise AdapterError(f"{self.dest}: tensor {name!r}: dtype {tensor.dtype} has no safetensors name")
        data = _tensor_bytes(tensor)
        self._spill.write(data)
        n = data.nbytes
        self._header[name] = {
            "dtype": ST_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._pos, self._pos + n],
        }
        self._pos += n

    def close(self, metadata: dict[str, str] | None = None) -> Path:
        self._spill.close()
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        header.update(self._header)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        fd, tmp = tempfile.mkstemp(prefix=".lorax-", suffix=".safetensors", dir=self.dest.parent)
        try:
            with os.fdopen(fd, "wb") as out, open(self._spill_path, "rb") as spill:
                out.write(struct.pack("<Q", len(raw)))
                out.write(raw)
                shutil.copyfileobj(spill, out, 1 << 20)  # small chunks: memory stays at one tensor
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            self._spill_path.unlink(missing_ok=True)
        return self.dest

    def abort(self) -> None:
        self._spill.close()
        self._spill_path.unlink(missing_ok=True)


def write_json_atomic(dest: str | Path, obj: object) -> Path:
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".lorax-", suffix=".json", dir=dest.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def iter_tensors(source: TensorSource) -> Iterator[tuple[str, torch.Tensor]]:
    for key in source.names():
        yield key, source.get(key)
