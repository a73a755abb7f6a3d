"""Reading torch zip checkpoints (.bin / .pt) without ever executing pickle.

``data.pkl`` is walked opcode by opcode (``pickletools.genops``) on our own stack. The only globals
accepted are ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``,
``torch._utils._rebuild_parameter`` and the ``torch.<T>Storage`` types; the only persistent id is
``('storage', <storage type>, key, location, numel)``. Nothing is imported and nothing is called: an
allowed global is a name on our stack, and REDUCE on it builds a plain description (``TensorRef``).
Any other global, or an opcode that constructs or mutates objects in other ways (INST, OBJ, NEWOBJ,
BUILD on anything but a dict, EXT*), is refused with a message naming it.

Tensor data stays in the zip until ``get`` reads the one storage a tensor needs, so peak memory while
converting is one storage, not the whole checkpoint. Every view is checked against its storage size.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from lorax.errors import AdapterError

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
} | {("torch", name) for name in STORAGE_DTYPES}

# Opcodes that only push constants or shuffle our own stack / memo.
_CONST = {
    "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4",
    "FLOAT", "BINFLOAT", "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
    "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
}
MAX_MEMO = 1_000_000


class _Mark:
    pass


_MARK = _Mark()


@dataclass(frozen=True)
class _Global:
    module: str
    name: str


@dataclass(frozen=True)
class StorageRef:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class TensorRef:
    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class PickleRefused(AdapterError):
    """The pickle asks for something a weights file never needs; it was not executed."""


def _ints(x: Any, what: str) -> tuple[int, ...]:
    if not isinstance(x, tuple) or not all(type(v) is int for v in x):
        raise PickleRefused(f"{what} must be a tuple of ints, got {x!r}")
    return x


def _reduce(fn: Any, args: Any, where: str) -> Any:
    if not isinstance(fn, _Global) or not isinstance(args, tuple):
        raise PickleRefused(f"{where}: REDUCE on {fn!r} is not allowed")
    name = f"{fn.module}.{fn.name}"
    if name == "collections.OrderedDict":
        if args not in ((), ([],)):
            raise PickleRefused(f"{where}: OrderedDict with arguments {args!r}")
        return {}
    if name == "torch._utils._rebuild_tensor_v2":
        if len(args) not in (6, 7) or not isinstance(args[0], StorageRef) or type(args[1]) is not int:
            raise PickleRefused(f"{where}: unexpected _rebuild_tensor_v2 arguments")
        if args[5] not in ({}, None) or (len(args) == 7 and args[6] not in ({}, None)):
            raise PickleRefused(f"{where}: tensors with backward hooks or metadata are not accepted")
        ref = TensorRef(args[0], args[1], _ints(args[2], "size"), _ints(args[3], "stride"))
        _check_view(ref, where)
        return ref
    if name == "torch._utils._rebuild_parameter":
        if len(args) != 3 or not isinstance(args[0], TensorRef) or args[2] not in ({}, None):
            raise PickleRefused(f"{where}: unexpected _rebuild_parameter arguments")
        return args[0]
    raise PickleRefused(f"{where}: calling {name} is not allowed")  # storage types are never called


def _check_view(ref: TensorRef, where: str) -> None:
    if len(ref.size) != len(ref.stride) or any(s < 0 for s in ref.size) or any(s < 0 for s in ref.stride):
        raise PickleRefused(f"{where}: bad tensor view size={ref.size} stride={ref.stride}")
    if ref.offset < 0:
        raise PickleRefused(f"{where}: negative storage offset {ref.offset}")
    if 0 in ref.size:
        return
    numel = 1
    for n in ref.size:
        numel *= n
    if numel > ref.storage.numel:  # only overlapping (stride-0) views can be larger; never in a weights file
        raise PickleRefused(f"{where}: view of {numel} elements over a storage of {ref.storage.numel}")
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if last >= ref.storage.numel:
        raise PickleRefused(f"{where}: view size={ref.size} stride={ref.stride} offset={ref.offset} reaches "
                            f"element {last} of storage {ref.storage.key!r} with {ref.storage.numel} elements")


def _persistent(pid: Any, where: str) -> StorageRef:
    ok = isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Global)
    if not ok or (pid[1].module, pid[1].name) not in ALLOWED_GLOBALS or pid[1].name not in STORAGE_DTYPES:
        raise PickleRefused(f"{where}: persistent id {pid!r} is not a torch storage reference")
    if not isinstance(pid[2], str) or type(pid[4]) is not int or pid[4] < 0:
        raise PickleRefused(f"{where}: malformed storage reference {pid!r}")
    return StorageRef(pid[2], STORAGE_DTYPES[pid[1].name], pid[4])


def _pop_mark(stack: list[Any], where: str) -> list[Any]:
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is _MARK:
            items = stack[i + 1 :]
            del stack[i:]
            return items
    raise PickleRefused(f"{where}: missing MARK")


def walk_pickle(data: bytes, where: str) -> Any:
    """Evaluate ``data`` as a torch weights pickle on our own stack; never imports or calls anything."""
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    try:
        ops: Iterator[tuple[pickletools.OpcodeInfo, Any, int | None]] = pickletools.genops(data)
        for op, arg, pos in ops:
            at = f"{where}: byte {pos} {op.name}"
            name = op.name
            if name in _CONST:
                stack.append(arg)
            elif name in ("PROTO", "FRAME"):
                pass
            elif name == "STOP":
                if len(stack) != 1:
                    raise PickleRefused(f"{at}: stack holds {len(stack)} items at STOP")
                return stack[0]
            elif name == "MARK":
                stack.append(_MARK)
            elif name == "POP":
                stack.pop()
            elif name == "POP_MARK":
                _pop_mark(stack, at)
            elif name == "DUP":
                stack.append(stack[-1])
            elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                if len(memo) >= MAX_MEMO:
                    raise PickleRefused(f"{at}: memo too large")
                memo[len(memo) if name == "MEMOIZE" else int(arg)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if int(arg) not in memo:
                    raise PickleRefused(f"{at}: memo key {arg} was never stored")
                stack.append(memo[int(arg)])
            elif name == "EMPTY_LIST":
                stack.append([])
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items = stack[-n:]
                del stack[-n:]
                stack.append(tuple(items))
            elif name == "TUPLE":
                stack.append(tuple(_pop_mark(stack, at)))
            elif name == "LIST":
                stack.append(_pop_mark(stack, at))
            elif name == "DICT":
                items = _pop_mark(stack, at)
                stack.append(_pairs_to_dict({}, items, at))
            elif name == "APPEND":
                value = stack.pop()
                _as(stack[-1], list, at).append(value)
            elif name == "APPENDS":
                items = _pop_mark(stack, at)
                _as(stack[-1], list, at).extend(items)
            elif name == "SETITEM":
                value, key = stack.pop(), stack.pop()
                _pairs_to_dict(_as(stack[-1], dict, at), [key, value], at)
            elif name == "SETITEMS":
                items = _pop_mark(stack, at)
                _pairs_to_dict(_as(stack[-1], dict, at), items, at)
            elif name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                stack.append(_allowed(module, attr, at))
            elif name == "STACK_GLOBAL":
                attr, module = stack.pop(), stack.pop()
                if not isinstance(module, str) or not isinstance(attr, str):
                    raise PickleRefused(f"{at}: STACK_GLOBAL needs two strings")
                stack.append(_allowed(module, attr, at))
            elif name == "REDUCE":
                args, fn = stack.pop(), stack.pop()
                stack.append(_reduce(fn, args, at))
            elif name in ("BINPERSID", "PERSID"):
                pid = stack.pop() if name == "BINPERSID" else arg
                stack.append(_persistent(pid, at))
            elif name == "BUILD":
                state = stack.pop()
                # torch pickles an OrderedDict's __dict__ (its `_metadata`) this way; nothing to apply.
                if not isinstance(stack[-1], dict) or not isinstance(state, dict | type(None)):
                    raise PickleRefused(f"{at}: BUILD on {type(stack[-1]).__name__} is not allowed")
            else:
                raise PickleRefused(f"{at}: opcode {name} is not allowed in a weights file")
    except PickleRefused:
        raise
    except (ValueError, IndexError, TypeError, KeyError) as err:
        raise PickleRefused(f"{where}: malformed pickle ({type(err).__name__}: {err})") from None
    raise PickleRefused(f"{where}: pickle has no STOP")


def _allowed(module: str, attr: str, at: str) -> _Global:
    if (module, attr) not in ALLOWED_GLOBALS:
        raise PickleRefused(f"{at}: global {module}.{attr} is not allowed (only tensor rebuild functions and "
                            "torch storage types are)")
    return _Global(module, attr)


def _as(obj: Any, kind: type, at: str) -> Any:
    if not isinstance(obj, kind) or isinstance(obj, _Global):
        raise PickleRefused(f"{at}: expected a {kind.__name__} on the stack, found {type(obj).__name__}")
    return obj


def _pairs_to_dict(d: dict[Any, Any], items: list[Any], at: str) -> dict[Any, Any]:
    if len(items) % 2:
        raise PickleRefused(f"{at}: odd number of dict items")
    for k, v in zip(items[::2], items[1::2], strict=True):
        if not isinstance(k, str | int):
            raise PickleRefused(f"{at}: dict key of type {type(k).__name__}")
        d[k] = v
    return d


class TorchZipSource:
    """A torch zip checkpoint holding a flat {name: tensor} dict, read without pickle."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not zipfile.is_zipfile(self.path):
            with open(self.path, "rb") as f:
                head = f.read(2)
            kind = "a legacy (pre-1.6, non-zip) torch file" if head[:1] == b"\x80" else "not a torch zip file"
            raise AdapterError(f"{self.path}: {kind}; lorax reads only the zip format that torch>=1.6 "
                               "writes (re-save it there, or use safetensors)")
        self._zip = zipfile.ZipFile(self.path)
        pkl = [n for n in self._zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise AdapterError(f"{self.path}: expected exactly one <archive>/data.pkl, found {pkl}")
        self._archive = pkl[0][: -len("data.pkl")]
        order = self._archive + "byteorder"
        if order in self._zip.namelist() and self._zip.read(order).strip() != b"little":
            raise AdapterError(f"{self.path}: big-endian checkpoints are not supported")
        obj = walk_pickle(self._zip.read(pkl[0]), f"{self.path}:{pkl[0]}")
        if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, TensorRef)
                                                for k, v in obj.items()):
            raise AdapterError(f"{self.path}: expected a flat dict of name -> tensor")
        self._refs: dict[str, TensorRef] = obj
        for key, ref in obj.items():
            info = self._member(ref.storage, key)
            want = ref.storage.numel * _itemsize(ref.storage.dtype)
            if info.file_size != want:
                raise AdapterError(f"{self.path}: tensor {key!r}: storage {ref.storage.key!r} has "
                                   f"{info.file_size} bytes, its reference says {want}")

    def _member(self, storage: StorageRef, key: str) -> zipfile.ZipInfo:
        try:
            return self._zip.getinfo(f"{self._archive}data/{storage.key}")
        except KeyError:
            raise AdapterError(f"{self.path}: tensor {key!r}: storage {storage.key!r} is missing") from None

    def names(self) -> list[str]:
        return list(self._refs)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._refs[key].size

    def dtype(self, key: str) -> torch.dtype:
        return self._refs[key].storage.dtype

    def get(self, key: str) -> torch.Tensor:
        ref = self._refs[key]
        info = self._member(ref.storage, key)
        raw = bytearray(info.file_size)  # the one storage this tensor needs, read straight into place
        with self._zip.open(info) as f:
            if cast(io.BufferedIOBase, f).readinto(raw) != info.file_size:
                raise AdapterError(f"{self.path}: tensor {key!r}: short read of storage {ref.storage.key!r}")
        flat = torch.frombuffer(raw, dtype=ref.storage.dtype) if raw else torch.empty(0, dtype=ref.storage.dtype)
        view = flat.as_strided(ref.size, ref.stride, ref.offset)
        whole = ref.offset == 0 and view.numel() == flat.numel() and view.is_contiguous()
        return view if whole else view.clone()  # a view of part of a storage must not pin all of it


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
