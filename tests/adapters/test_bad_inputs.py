"""Bad adapters are refused with an AdapterError naming the file / tensor / key, never read silently."""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from adapter_builders import INTER, E, H, per_expert_tensors, write_adapter

from lorax.adapters import load_adapter
from lorax.adapters.convert import convert_adapter
from lorax.adapters.inspect import inspect_adapter
from lorax.errors import AdapterError

P = "base_model.model.model.layers"
CFG = {"r": 4, "lora_alpha": 8}


def _dense() -> dict[str, torch.Tensor]:
    return {f"{P}.0.self_attn.q_proj.lora_A.weight": torch.randn(4, H),
            f"{P}.0.self_attn.q_proj.lora_B.weight": torch.randn(H, 4)}


def _with(**extra: torch.Tensor) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        write_adapter(d, {**_dense(), **extra}, CFG)
    return build


def _truncate(d: Path) -> None:
    write_adapter(d, _dense(), CFG)
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])


def _lying_header(d: Path) -> None:
    write_adapter(d, _dense(), CFG)
    f = d / "adapter_model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    key = f"{P}.0.self_attn.q_proj.lora_B.weight"
    header[key]["shape"] = [H, 8]  # claims 8 columns, the bytes hold 4
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def _no_config(d: Path) -> None:
    write_adapter(d, _dense(), None)


def _nan(d: Path) -> None:
    t = _dense()
    t[f"{P}.0.self_attn.q_proj.lora_B.weight"][3, 1] = float("nan")
    write_adapter(d, t, CFG)


def _config(**cfg: object) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        write_adapter(d, _dense(), {**CFG, **cfg})
    return build


def _missing_expert(d: Path) -> None:
    t = per_expert_tensors(("gate_proj", "up_proj", "down_proj"), "mlp.experts", r=4, layers=1)
    del t[f"{P}.0.mlp.experts.2.up_proj.lora_A.weight"], t[f"{P}.0.mlp.experts.2.up_proj.lora_B.weight"]
    write_adapter(d, t, CFG)


def _mixed_layouts(d: Path) -> None:
    t = per_expert_tensors(("gate_proj", "up_proj", "down_proj"), "mlp.experts", r=4, layers=1)
    t[f"{P}.1.mlp.experts.lora_A.weight"] = torch.randn(E * 4, INTER)
    t[f"{P}.1.mlp.experts.lora_B.weight"] = torch.randn(H, E * 4)
    write_adapter(d, t, CFG)


def _ambiguous_fused(d: Path) -> None:
    # one fused pair, no target_parameters and no attention tensors: gate_up or down cannot be told
    write_adapter(d, {f"{P}.0.mlp.experts.lora_A.weight": torch.randn(E * 4, 24),
                      f"{P}.0.mlp.experts.lora_B.weight": torch.randn(32, E * 4)}, CFG)


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated safetensors": (_truncate, "truncated"),
    "header lies about sizes": (_lying_header, r"lora_B.weight'.*header says 512 bytes.*needs 1024"),
    "wrong shapes": (_with(**{f"{P}.1.self_attn.k_proj.lora_A.weight": torch.randn(4, H),
                              f"{P}.1.self_attn.k_proj.lora_B.weight": torch.randn(16, 5)}),
                     r"k_proj.lora_A.weight' \[4, 32\] and .* \[16, 5\] are not LoRA factors"),
    "rank differs from config": (_with(**{f"{P}.1.self_attn.k_proj.lora_A.weight": torch.randn(8, H),
                                          f"{P}.1.self_attn.k_proj.lora_B.weight": torch.randn(16, 8)}),
                                 r"k_proj.lora_A.weight' has rank 8 but adapter_config.json says 4"),
    "missing config": (_no_config, "missing adapter_config.json"),
    "NaN weights": (_nan, r"q_proj.lora_B.weight' contains NaN"),
    "unknown module": (_with(**{f"{P}.0.mlp.foo.lora_A.weight": torch.randn(4, H),
                                f"{P}.0.mlp.foo.lora_B.weight": torch.randn(H, 4)}),
                       r"layers.0.mlp.foo.lora_A.weight'.*'mlp.foo' is not one lorax applies"),
    "unknown key": (_with(**{"something.else": torch.randn(2)}), r"'something.else': not a LoRA tensor"),
    "lonely lora_A": (_with(**{f"{P}.1.self_attn.v_proj.lora_A.weight": torch.randn(4, H)}),
                      r"v_proj.lora_A.weight' has no matching lora_B"),
    "DoRA tensors": (_with(**{f"{P}.0.self_attn.q_proj.lora_magnitude_vector": torch.randn(H)}), "DoRA"),
    "DoRA config": (_config(use_dora=True), "DoRA"),
    "LoRA bias": (_with(**{f"{P}.0.self_attn.q_proj.lora_B.bias": torch.randn(H)}), "LoRA bias"),
    "modules_to_save config": (_config(modules_to_save=["lm_head"]), "modules_to_save"),
    "modules_to_save tensor": (_with(**{"base_model.model.lm_head.modules_to_save.default.weight":
                                        torch.randn(8, H)}), "modules_to_save"),
    "router LoRA": (_with(**{f"{P}.0.mlp.gate.lora_A.weight": torch.randn(4, H),
                             f"{P}.0.mlp.gate.lora_B.weight": torch.randn(E, 4)}), "router"),
    "not LoRA": (_config(peft_type="IA3"), "not LoRA"),
    "missing expert": (_missing_expert, "expert 2 has no up_proj LoRA"),
    "mixed layouts": (_mixed_layouts, "mixes MoE layouts across layers: layer 0: per-expert, layer 1: fused"),
    "ambiguous fused pair": (_ambiguous_fused, "cannot tell whether .* is gate_up or down"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_with_a_named_reason(case: str, tmp_path: Path) -> None:
    build, message = CASES[case]
    build(tmp_path)
    with pytest.raises(AdapterError, match=message):
        load_adapter(str(tmp_path))
    # inspect reports the same problem as an error (same keys as a good report) instead of raising
    info = inspect_adapter(str(tmp_path))
    assert not info["usable"]
    assert any(re.search(message, e) for e in info["errors"]), info["errors"]
    assert {"moe_format", "target_modules", "rank", "alpha", "use_rslora", "scaling", "layers", "num_params",
            "errors", "warnings"} <= set(info)


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="no such adapter"):
        load_adapter(str(tmp_path / "nope"))


def test_stray_adapter_name_in_keys_is_accepted(tmp_path: Path) -> None:
    t = {k.replace(".weight", ".default.weight"): v for k, v in _dense().items()}
    write_adapter(tmp_path, t, CFG)
    ad = load_adapter(str(tmp_path))
    assert torch.equal(ad.dense[(0, "self_attn.q_proj")].B, t[f"{P}.0.self_attn.q_proj.lora_B.default.weight"] * 2)


def test_embed_and_lm_head_lora_kept_in_extra(tmp_path: Path) -> None:
    extra = {"base_model.model.lm_head.lora_A.weight": torch.randn(4, H),
             "base_model.model.lm_head.lora_B.weight": torch.randn(64, 4),
             "base_model.model.model.embed_tokens.lora_embedding_A": torch.randn(4, 64),
             "base_model.model.model.embed_tokens.lora_embedding_B": torch.randn(H, 4)}
    write_adapter(tmp_path, {**_dense(), **extra}, CFG)
    ad = load_adapter(str(tmp_path))
    assert sorted(ad.extra) == sorted(extra)
    info = inspect_adapter(str(tmp_path))
    assert {"embed_tokens", "lm_head"} <= set(info["target_modules"]) and info["usable"]
    assert any("never applied" in w for w in info["warnings"])
    convert_adapter(str(tmp_path), tmp_path / "out", "fused", dtype="bfloat16")  # carried over, verified
    assert sorted(load_adapter(str(tmp_path / "out")).extra) == sorted(extra)
