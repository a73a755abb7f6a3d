"""Round trips canonical -> each on-disk layout -> canonical are exact (same tensors, same dtype)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapter_builders import INTER, E, H, assert_same_tensors, random_canonical

from lorax.adapters import LAYOUTS, load_adapter, save_adapter
from lorax.adapters.tensor_io import SafetensorsSource
from lorax.errors import AdapterError

KINDS = ("per-expert", "fused", "shared-outer")
# Which layouts can hold which canonical kind without changing it (shared-outer needs shared factors).
HOLDS = {(k, layout) for k in KINDS for layout in LAYOUTS} - {("per-expert", "shared-outer"),
                                                             ("fused", "shared-outer")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_exact(kind: str, layout: str, dtype: torch.dtype, tmp_path: Path) -> None:
    ad = random_canonical(kind, dtype=dtype)
    if (kind, layout) not in HOLDS:
        with pytest.raises(AdapterError, match="differs across experts"):
            save_adapter(ad, tmp_path / "out", layout)
        assert not (tmp_path / "out" / "adapter_model.safetensors").exists()  # nothing half-written
        return
    save_adapter(ad, tmp_path / "out", layout)
    back = load_adapter(str(tmp_path / "out"))
    assert_same_tensors(ad, back)
    expect = {"peft": "per-expert", "per-expert": "per-expert", "fused": "fused", "shared-outer": "shared-outer"}
    assert back.moe_format == expect[layout]
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] and not cfg["use_rslora"]  # scaling folded: exactly 1


@pytest.mark.parametrize("parts", [("down",), ("gate", "up"), ("gate", "down")])
@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_partial_expert_targets_round_trip(parts: tuple[str, ...], layout: str, tmp_path: Path) -> None:
    ad = random_canonical("per-expert", parts=parts)
    save_adapter(ad, tmp_path, layout)
    back = load_adapter(str(tmp_path))
    if layout == "fused" and parts == ("gate", "down"):
        # fused gate_up always covers both halves: the zero up half is written, deltas are unchanged
        for e in range(E):
            for x, y in zip(ad.moe[0].expert_deltas(e), back.moe[0].expert_deltas(e), strict=True):
                assert torch.equal(x, y)
        return
    assert_same_tensors(ad, back)


def test_fused_keys_and_packing(tmp_path: Path) -> None:
    """The fused writer emits PEFT's key nesting, A rows expert-major and B columns rank-major."""
    ad = random_canonical("fused", r=3)
    save_adapter(ad, tmp_path, "fused")
    src = SafetensorsSource(tmp_path / "adapter_model.safetensors")
    p = "base_model.model.model.layers.0.mlp.experts"
    a, b = src.get(f"{p}.base_layer.lora_A.weight"), src.get(f"{p}.base_layer.lora_B.weight")
    assert a.shape == (E * 3, H) and b.shape == (2 * INTER, E * 3)
    m = ad.moe[0]
    for e in range(E):
        for j in range(3):
            assert torch.equal(a[e * 3 + j], m.gate_up_A[e, j])
            assert torch.equal(b[:, j * E + e], m.gate_up_B[e, :, j])
    assert src.shape(f"{p}.lora_A.weight") == (E * 3, INTER)
    assert src.shape(f"{p}.lora_B.weight") == (H, E * 3)


def test_shared_outer_is_stored_once(tmp_path: Path) -> None:
    ad = random_canonical("shared-outer")
    save_adapter(ad, tmp_path, "shared-outer")
    src = SafetensorsSource(tmp_path / "adapter_model.safetensors")
    p = "base_model.model.model.layers.1.mlp.experts"
    assert src.shape(f"{p}.w1.lora_A.weight") == (1, 4, H)
    assert src.shape(f"{p}.w1.lora_B.weight") == (E, INTER, 4)
    assert src.shape(f"{p}.w2.lora_A.weight") == (E, 4, INTER)
    assert src.shape(f"{p}.w2.lora_B.weight") == (1, H, 4)
    back = load_adapter(str(tmp_path))
    assert back.moe[1].shared_gate_up_A and back.moe[1].shared_down_B
