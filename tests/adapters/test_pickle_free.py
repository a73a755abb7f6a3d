"""The pickle-free reader: equal to torch.load(weights_only=True) on real torch.save files, and it
never runs a malicious pickle (each payload would create a marker file if it were executed)."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import subprocess
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from adapter_builders import write_adapter

from lorax.adapters import load_adapter
from lorax.adapters.pickle_free import PickleRefused, TorchZipSource, walk_pickle
from lorax.errors import AdapterError


def _state(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    big = torch.randn(6, 8).to(dtype)
    return OrderedDict(
        plain=torch.randn(4, 5).to(dtype),
        shared_full=big,
        shared_rows=big[2:5],  # view with an offset into the same storage
        shared_cols=big[:, 1::3],  # strided, non-contiguous
        transposed=torch.randn(3, 7).to(dtype).t(),
        param=torch.nn.Parameter(torch.randn(5).to(dtype)),
        scalar=torch.tensor(3.5, dtype=dtype),
        empty=torch.empty(0, 4, dtype=dtype),
    )


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_torch_load(protocol: int, dtype: torch.dtype, tmp_path: Path) -> None:
    state = _state(dtype)
    path = tmp_path / "w.bin"
    torch.save(state, path, pickle_protocol=protocol)
    src = TorchZipSource(path)
    assert src.names() == list(state)
    try:
        reference = torch.load(path, weights_only=True)
    except Exception:  # torch's weights-only unpickler refuses some protocols; compare with the originals
        reference = state
    for key, want in state.items():
        got = src.get(key)
        assert got.dtype == want.dtype and got.shape == want.shape and src.shape(key) == tuple(want.shape), key
        assert torch.equal(got, want.detach()), key
        assert torch.equal(got, reference[key].detach()), key


def test_bin_adapter_loads_like_safetensors(tmp_path: Path) -> None:
    tensors = {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight": torch.randn(*s)
               for i in range(2) for ab, s in (("A", (4, 32)), ("B", (32, 4)))}
    cfg = {"r": 4, "lora_alpha": 8}
    write_adapter(tmp_path / "st", tensors, cfg)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_text((tmp_path / "st" / "adapter_config.json").read_text())
    torch.save(tensors, tmp_path / "bin" / "adapter_model.bin")
    a, b = load_adapter(str(tmp_path / "st")), load_adapter(str(tmp_path / "bin"))
    for k in a.dense:
        assert torch.equal(a.dense[k].A, b.dense[k].A) and torch.equal(a.dense[k].B, b.dense[k].B)


# ---- malicious payloads -------------------------------------------------------------------------


class _Reduce:
    def __init__(self, fn: Any, args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.fn, self.args


def _payloads(marker: Path) -> dict[str, bytes]:
    m = str(marker)
    calls = {
        "os.system": (os.system, (f"touch {m}",)),
        "eval": (builtins.eval, (f"open({m!r}, 'w')",)),
        "exec": (builtins.exec, (f"open({m!r}, 'w').close()",)),
        "subprocess.call": (subprocess.call, (["touch", m],)),
        "subprocess.Popen": (subprocess.Popen, (["touch", m],)),
        "builtins.open": (builtins.open, (m, "w")),
    }
    out = {}
    for name, (fn, args) in calls.items():
        for proto in range(6):  # 0-3 use GLOBAL, 4-5 STACK_GLOBAL
            out[f"{name}-p{proto}"] = pickle.dumps(_Reduce(fn, args), protocol=proto)
    # Hand-written opcode streams: the dangerous forms, then each forbidden opcode on an *allowed* global
    # (so the opcode check itself is exercised, not just the global allowlist).
    od = b"ccollections\nOrderedDict\n"
    out["INST"] = b"(S'touch " + m.encode() + b"'\nios\nsystem\n."
    out["OBJ"] = b"(cos\nsystem\nS'touch " + m.encode() + b"'\no."
    out["NEWOBJ"] = b"\x80\x02cos\nsystem\nX\x05\x00\x00\x00touch\x85\x81."
    out["rebuild-with-call"] = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(cos\nsystem\nX\x05\x00\x00\x00"
                                b"touch\x85RK\x00)))}tR.")
    out["torch-other-global"] = b"\x80\x02ctorch\nload\nX\x01\x00\x00\x00x\x85R."
    out["OBJ-allowed"] = b"(" + od + b"o."
    out["NEWOBJ-allowed"] = b"\x80\x02" + od + b")\x81."
    out["BUILD-on-global"] = b"\x80\x02" + od + b"}b."
    out["REDUCE-args"] = b"\x80\x02" + od + b"X\x01\x00\x00\x00x\x85R."
    out["REDUCE-storage"] = b"\x80\x02ctorch\nFloatStorage\n)R."
    out["EXT1"] = b"\x80\x02\x82\x01."
    return out


def _torch_zip(payload: bytes, path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return path


@pytest.mark.parametrize("wrapper", ["zip", "raw"])
def test_malicious_payloads_are_refused_and_never_run(wrapper: str, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    payloads = _payloads(marker)
    assert len(payloads) == 6 * 6 + 11
    for name, payload in payloads.items():
        path = tmp_path / f"{name}.bin"
        if wrapper == "zip":
            _torch_zip(payload, path)
            with pytest.raises(PickleRefused, match=r"(global|opcode|calling|BUILD on) .* not allowed|OrderedDict with"):
                TorchZipSource(path)
        else:
            path.write_bytes(payload)
            with pytest.raises(AdapterError, match="legacy|not a torch zip"):
                TorchZipSource(path)
        assert not marker.exists(), f"payload {name} ran"


@pytest.mark.parametrize("proto", range(6))
def test_refusal_names_the_global(proto: int, tmp_path: Path) -> None:
    payload = pickle.dumps(_Reduce(os.system, ("true",)), protocol=proto)
    with pytest.raises(PickleRefused, match=r"global (posix|os)\.system is not allowed"):
        walk_pickle(payload, "test")


def test_adapter_dir_with_malicious_bin(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    _torch_zip(_payloads(marker)["os.system-p2"], tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    with pytest.raises(AdapterError, match="posix.system"):
        load_adapter(str(tmp_path))
    assert not marker.exists()


def test_legacy_non_zip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.bin"
    torch.save({"w": torch.randn(2, 2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(AdapterError, match="legacy .*pre-1.6"):
        TorchZipSource(path)


# ---- crafted torch zips with bad views ----------------------------------------------------------


class _Storage:
    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.args = (storage, offset, size, stride, False, OrderedDict())

    def __reduce__(self) -> tuple[Any, ...]:
        return torch._utils._rebuild_tensor_v2, self.args


def _crafted(path: Path, storage_numel: int, data_numel: int, offset: int, size: tuple[int, ...],
             stride: tuple[int, ...]) -> Path:
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=2)
    pickler.persistent_id = lambda o: (  # type: ignore[method-assign]
        ("storage", torch.FloatStorage, o.key, "cpu", o.numel) if isinstance(o, _Storage) else None
    )
    pickler.dump(OrderedDict(w=_Tensor(_Storage("0", storage_numel), offset, size, stride)))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/data/0", torch.arange(data_numel, dtype=torch.float32).numpy().tobytes())
    return path


@pytest.mark.parametrize("case,storage_numel,data_numel,offset,size,stride,error", [
    ("ok", 12, 12, 2, (2, 3), (4, 1), None),
    ("past-end", 12, 12, 4, (3, 4), (4, 1), "reaches element 15"),
    ("negative-offset", 12, 12, -1, (2,), (1,), "negative storage offset"),
    ("overlapping-expand", 4, 4, 0, (1000, 4), (0, 1), "4000 elements over a storage of 4"),
    ("short-storage-file", 12, 10, 0, (3, 4), (4, 1), "has 40 bytes, its reference says 48"),
    ("rank-mismatch", 12, 12, 0, (3, 4), (4,), "bad tensor view"),
])
def test_views_are_checked_against_storage(case: str, storage_numel: int, data_numel: int, offset: int,
                                           size: tuple[int, ...], stride: tuple[int, ...], error: str | None,
                                           tmp_path: Path) -> None:
    path = _crafted(tmp_path / f"{case}.bin", storage_numel, data_numel, offset, size, stride)
    if error is None:
        want = torch.arange(12, dtype=torch.float32).as_strided(size, stride, offset)
        assert torch.equal(TorchZipSource(path).get("w"), want)
        return
    with pytest.raises(AdapterError, match=error):
        TorchZipSource(path)
