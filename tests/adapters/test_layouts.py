"""Round trips canonical -> each on-disk layout -> canonical are exact (same tensors, same dtype)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from adapter_builders import INTER, E, H, assert_same_tensors, random_canonical, write_adapter

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


@pytest.mark.parametrize("how", ["argument", "config"])
def test_expert_major_b_packing(how: str, tmp_path: Path) -> None:
    """Trainers that pack fused B block-wise (column e*r + j) need the override; the file cannot tell."""
    ad = random_canonical("fused", r=3)
    save_adapter(ad, tmp_path / "rank_major", "fused")
    src = SafetensorsSource(tmp_path / "rank_major" / "adapter_model.safetensors")
    tensors = {k: src.get(k) for k in src.names()}
    for key, b in tensors.items():
        if ".mlp.experts." in key and key.endswith("lora_B.weight"):  # [out, r*E] j*E+e -> e*r+j
            out = b.shape[0]
            tensors[key] = b.reshape(out, 3, E).permute(0, 2, 1).reshape(out, E * 3).contiguous()
    cfg = json.loads((tmp_path / "rank_major" / "adapter_config.json").read_text())
    if how == "config":
        cfg["lorax_b_packing"] = "expert-major"
    write_adapter(tmp_path / "em", tensors, cfg)
    packing = "expert-major" if how == "argument" else None
    assert_same_tensors(ad, load_adapter(str(tmp_path / "em"), b_packing=packing))
    if how == "argument":  # read the PEFT way, the same bytes mean a different adapter
        wrong = load_adapter(str(tmp_path / "em"))
        assert not torch.equal(wrong.moe[0].gate_up_B, ad.moe[0].gate_up_B)


def test_hub_repo_id_from_offline_cache(tmp_path: Path) -> None:
    """`org/name` resolves through huggingface_hub's cache with HF_HUB_OFFLINE=1 (no network)."""
    ad = random_canonical("per-expert")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someorg--tiny-adapter"
    save_adapter(ad, repo / "snapshots" / commit, "per-expert")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = ("import sys, json; from lorax.adapters.inspect import inspect_adapter; "
            "print(json.dumps(inspect_adapter(sys.argv[1])))")
    proc = subprocess.run([sys.executable, "-c", code, "someorg/tiny-adapter"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["moe_format"] == "per-expert" and info["usable"] and commit in info["weights"]
    proc = subprocess.run([sys.executable, "-c", code, "someorg/absent"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert not info["usable"] and "someorg/absent: could not fetch" in info["errors"][0]
