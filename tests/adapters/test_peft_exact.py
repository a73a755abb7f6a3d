"""PEFT's own adapters, read by lorax, must reproduce PEFT's merge_and_unload weight diffs exactly.

Reference: W_merged - W_base from PEFT on a tiny transformers model built here. Every parameter PEFT
changes must be covered by a canonical delta (no silently dropped experts), and every canonical delta
must match (fp32, rtol/atol 1e-5; both sides compute s * B @ A in fp32, so only summation order differs).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from adapter_builders import INTER, LAYERS, E, H, per_expert_tensors, tiny_model, write_adapter

from lorax.adapters import CanonicalAdapter, load_adapter, save_adapter

peft = pytest.importorskip("peft")

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TOL = dict(rtol=1e-5, atol=1e-5)


def canonical_deltas(ad: CanonicalAdapter) -> dict[str, torch.Tensor]:
    """Model parameter name -> the delta lorax would add, in the transformers 5.x fused layout."""
    out: dict[str, torch.Tensor] = {}
    for (layer, module), pair in ad.dense.items():
        out[f"model.layers.{layer}.{module}.weight"] = pair.delta()
    for layer, moe in ad.moe.items():
        gu, dn = [], []
        for e in range(moe.num_experts):
            g, u, d = moe.expert_deltas(e)
            gu.append(torch.cat([g, u]))
            dn.append(d)
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(gu)  # [E, 2I, H]
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(dn)  # [E, H, INTER]
    return out


def merged_diffs(base_state: dict[str, torch.Tensor], peft_model: Any) -> dict[str, torch.Tensor]:
    merged = peft_model.merge_and_unload().state_dict()
    return {k: merged[k] - v for k, v in base_state.items() if not torch.equal(merged[k], v)}


def check(base_state: dict[str, torch.Tensor], peft_model: Any, ad: CanonicalAdapter,
          gate_up_factor: float = 1.0) -> None:
    diffs = merged_diffs(base_state, peft_model)
    ours = canonical_deltas(ad)
    for name in ours:
        if name.endswith("gate_up_proj"):
            ours[name] = ours[name] * gate_up_factor
    assert diffs, "PEFT changed nothing: the test adapter is degenerate"
    assert set(diffs) <= set(ours), f"lorax misses PEFT-changed parameters: {sorted(set(diffs) - set(ours))}"
    for name, delta in ours.items():
        torch.testing.assert_close(delta, diffs.get(name, torch.zeros_like(delta)), **TOL, msg=name)


# (family, LoraConfig kwargs) — init_lora_weights=False makes B random so every delta is non-zero.
CASES = {
    "qwen3moe-attn+experts": ("qwen3_moe", dict(r=4, lora_alpha=8, target_modules=ATTN, target_parameters=EXPERTS)),
    "qwen3moe-rslora": ("qwen3_moe", dict(r=4, lora_alpha=6, use_rslora=True, target_modules=ATTN,
                                          target_parameters=EXPERTS)),
    "qwen3moe-patterns": ("qwen3_moe", dict(
        r=4, lora_alpha=8, target_modules=ATTN, target_parameters=EXPERTS,
        rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.o_proj": 6, "down_proj": 3},
        alpha_pattern={"v_proj": 3.0, r".*\.gate_up_proj": 5.0})),
    "qwen3moe-down-only": ("qwen3_moe", dict(r=4, lora_alpha=8, target_modules=[],
                                             target_parameters=["mlp.experts.down_proj"])),
    "qwen3moe-gate-up-only": ("qwen3_moe", dict(r=2, lora_alpha=8, target_modules=["q_proj"],
                                                target_parameters=["mlp.experts.gate_up_proj"])),
    "qwen3moe-reversed-target-order": ("qwen3_moe", dict(r=4, lora_alpha=8, target_modules=ATTN,
                                                         target_parameters=EXPERTS[::-1])),
    "qwen2moe-shared-expert": ("qwen2_moe", dict(r=4, lora_alpha=16, target_modules=ATTN + ["gate_proj", "up_proj",
                                                 "down_proj"], target_parameters=EXPERTS)),
    "mixtral-fused": ("mixtral", dict(r=4, lora_alpha=8, target_modules=ATTN, target_parameters=EXPERTS)),
    "olmoe-fused": ("olmoe", dict(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS)),
    "qwen3-dense-mlp": ("qwen3", dict(r=4, lora_alpha=8, target_modules=ATTN + ["gate_proj", "up_proj",
                                                                                  "down_proj"])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_adapter_equals_merge(case: str, tmp_path: Path) -> None:
    family, kwargs = CASES[case]
    model = tiny_model(family)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **kwargs))
    pm.save_pretrained(tmp_path)
    ad = load_adapter(str(tmp_path))
    expect_moe = "fused" if kwargs.get("target_parameters") else "none"
    assert ad.moe_format == expect_moe
    check(base_state, pm, ad)


@pytest.mark.parametrize("family,names,container", [
    ("qwen3_moe", ("gate_proj", "up_proj", "down_proj"), "mlp.experts"),
    ("mixtral", ("w1", "w3", "w2"), "block_sparse_moe.experts"),
])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_legacy_per_expert_equals_peft_conversion(family: str, names: tuple[str, str, str], container: str,
                                                  use_rslora: bool, tmp_path: Path) -> None:
    """PEFT rewrites a legacy per-expert file into fused rank 2r on load; both routes must agree.

    Except one PEFT 0.21 quirk: the rewrite doubles r and alpha for gate_up, which keeps alpha/r but not
    alpha/sqrt(r), so with rsLoRA PEFT's merged gate/up deltas are sqrt(2) times what the per-expert
    file means (alpha/sqrt(r) per expert, as transformers 4.x + PEFT applied it). lorax keeps the
    file's meaning; the test pins PEFT's factor so a fix upstream shows up here.
    """
    cfg = dict(r=4, lora_alpha=8, use_rslora=use_rslora, target_modules=list(names))
    write_adapter(tmp_path, per_expert_tensors(names, container, r=4), cfg)
    ad = load_adapter(str(tmp_path))
    assert ad.moe_format == "per-expert"
    assert ad.moe[0].gate_up_A.shape == (E, 8, H) and ad.moe[0].gate_up_B.shape == (E, 2 * INTER, 4)
    assert ad.expert_naming == ("mixtral" if family == "mixtral" else "qwen")
    model = tiny_model(family)
    base_state = copy.deepcopy(model.state_dict())
    pm = peft.PeftModel.from_pretrained(model, str(tmp_path))
    check(base_state, pm, ad, gate_up_factor=math.sqrt(2) if use_rslora else 1.0)
    assert sorted(ad.moe) == list(range(LAYERS))


@pytest.mark.parametrize("layout", ["peft", "fused"])
@pytest.mark.parametrize("case", ["qwen3moe-patterns", "qwen3moe-rslora", "mixtral-fused"])
def test_written_adapter_loads_in_peft(case: str, layout: str, tmp_path: Path) -> None:
    """lorax's output (alpha == r, scaling folded into B) is a PEFT adapter with the same merge."""
    family, kwargs = CASES[case]
    pm = peft.get_peft_model(tiny_model(family), peft.LoraConfig(init_lora_weights=False, **kwargs))
    pm.save_pretrained(tmp_path / "src")
    ad = load_adapter(str(tmp_path / "src"))
    save_adapter(ad, tmp_path / "out", layout)
    model = tiny_model(family)
    base_state = copy.deepcopy(model.state_dict())
    check(base_state, peft.PeftModel.from_pretrained(model, str(tmp_path / "out")), ad)


@pytest.mark.parametrize("family,names,container", [
    ("qwen3_moe", ("gate_proj", "up_proj", "down_proj"), "mlp.experts"),
    ("mixtral", ("w1", "w3", "w2"), "block_sparse_moe.experts"),
])
def test_peft_resaved_legacy_adapter(family: str, names: tuple[str, str, str], container: str,
                                     tmp_path: Path) -> None:
    """PEFT re-saves a converted legacy adapter as fused rank 2r with rank/alpha patterns for gate_up:
    lorax reads the patterns, splits the block-diagonal B back to rank r, and matches the merge."""
    write_adapter(tmp_path / "legacy", per_expert_tensors(names, container, r=4),
                  dict(r=4, lora_alpha=8, target_modules=list(names)))
    pm = peft.PeftModel.from_pretrained(tiny_model(family), str(tmp_path / "legacy"))
    pm.save_pretrained(tmp_path / "resaved")
    cfg = json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {r".*\.gate_up_proj": 8} and cfg["alpha_pattern"] == {r".*\.gate_up_proj": 16}
    ad = load_adapter(str(tmp_path / "resaved"))
    assert ad.moe_format == "fused" and ad.moe[0].gate_up_B.shape[2] == 4  # compacted back to rank r
    legacy = load_adapter(str(tmp_path / "legacy"))
    for layer in legacy.moe:
        for f in ("gate_up_A", "gate_up_B", "down_A", "down_B"):
            assert torch.equal(getattr(legacy.moe[layer], f), getattr(ad.moe[layer], f)), (layer, f)
    model = tiny_model(family)
    base_state = copy.deepcopy(model.state_dict())
    check(base_state, peft.PeftModel.from_pretrained(model, str(tmp_path / "resaved")), ad)
