"""check_against_config (adapter vs config.json), `lorax inspect` and `lorax convert` through the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from adapter_builders import (
    LAYERS,
    E,
    H,
    per_expert_tensors,
    random_canonical,
    tiny_config,
    tiny_model,
    write_adapter,
)

from lorax.adapters import load_adapter, save_adapter
from lorax.adapters.model_config import check_against_config
from lorax.cli.main import main

peft = pytest.importorskip("peft")

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def peft_adapter(family: str, path: Path, **kwargs: Any) -> Path:
    kwargs.setdefault("target_modules", ATTN)
    kwargs.setdefault("target_parameters", EXPERTS)
    pm = peft.get_peft_model(tiny_model(family), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                 **kwargs))
    pm.save_pretrained(path)
    return path


def config_of(family: str, **overrides: Any) -> dict[str, Any]:
    cfg = tiny_config(family).to_dict()
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def qwen3_fused(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return peft_adapter("qwen3_moe", tmp_path_factory.mktemp("qwen3_fused"))


# (config overrides, expected error fragments; empty = usable)
QWEN3_CHECKS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "matching": ({}, []),
    "fewer layers": ({"num_hidden_layers": 1}, ["layer 1 is past the model's 1 layers"]),
    "more experts": ({"num_experts": 8, "num_local_experts": 8}, ["4 experts, the model has 8"]),
    "hidden size": ({"hidden_size": 64}, ["maps 32 -> 32 but the model's self_attn.q_proj maps 64 -> 32",
                                          "hidden 32 / intermediate 16, the model has 64 / 16"]),
    "moe intermediate": ({"moe_intermediate_size": 24}, ["intermediate 16, the model has 32 / 24"]),
    "mlp_only_layers": ({"mlp_only_layers": [1]}, ["expert LoRA on layer 1, which has no experts"]),
    "decoder_sparse_step": ({"decoder_sparse_step": 2}, ["expert LoRA on layer 0, which has no experts"]),
    "head_dim": ({"head_dim": 16}, ["self_attn.k_proj maps 32 -> 32"]),
}


@pytest.mark.parametrize("case", sorted(QWEN3_CHECKS))
def test_check_qwen3_moe(case: str, qwen3_fused: Path) -> None:
    overrides, fragments = QWEN3_CHECKS[case]
    errors = check_against_config(load_adapter(str(qwen3_fused)), config_of("qwen3_moe", **overrides))
    if not fragments:
        assert errors == []
    for frag in fragments:
        assert any(frag in e for e in errors), (frag, errors)


@pytest.mark.parametrize("family,base,ok", [
    ("qwen2_moe", "qwen2_moe", True),
    ("qwen2_moe", "qwen3_moe", False),  # shared_expert modules the base lacks
    ("mixtral", "mixtral", True),
    ("olmoe", "olmoe", True),
    ("olmoe", "qwen3", False),  # experts on a dense model
])
def test_check_families(family: str, base: str, ok: bool, tmp_path: Path) -> None:
    mlp = ["gate_proj", "up_proj", "down_proj"] if family == "qwen2_moe" else []
    ad = load_adapter(str(peft_adapter(family, tmp_path, target_modules=ATTN + mlp)))
    errors = check_against_config(ad, config_of(base))
    assert (errors == []) == ok, errors
    if base == "qwen3_moe":
        assert any("no mlp.shared_expert.gate_proj in layer 0" in e for e in errors)


def test_check_dense_mlp_and_transposed(tmp_path: Path) -> None:
    ad = load_adapter(str(peft_adapter("qwen3", tmp_path, target_modules=ATTN + ["gate_proj", "down_proj"],
                                       target_parameters=None)))
    assert check_against_config(ad, config_of("qwen3")) == []
    errors = check_against_config(ad, config_of("qwen3_moe"))  # MoE layers have no dense mlp.gate_proj
    assert any("no mlp.gate_proj in layer 0 (an MoE layer" in e for e in errors), errors
    pair = ad.dense[(0, "mlp.down_proj")]
    ad.dense[(0, "mlp.gate_proj")] = type(pair)(pair.A, pair.B)  # down's shapes where gate belongs
    errors = check_against_config(ad, config_of("qwen3"))
    assert any("mlp.gate_proj maps 32 -> 48 (transposed?)" in e for e in errors), errors


# ---- CLI ----------------------------------------------------------------------------------------


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_json(qwen3_fused: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["inspect", str(qwen3_fused), "--json"], capsys)
    info = json.loads(out)
    assert code == 0
    assert info["moe_format"] == "fused"
    assert info["target_modules"] == sorted(["experts.down_proj", "experts.gate_up_proj"] + ATTN)
    assert (info["rank"], info["alpha"], info["use_rslora"], info["scaling"]) == (4, 8.0, False, 2.0)
    assert info["layers"] == list(range(LAYERS)) and info["num_experts"] == E
    n_attn = LAYERS * (4 * (H + H) + 4 * (H + 16) * 2 + 4 * (H + H))  # q, k, v, o: r*(in+out)
    n_exp = LAYERS * (E * 4 * (H + 2 * 16) + E * 4 * (16 + H))
    assert info["num_params"] == n_attn + n_exp
    assert info["errors"] == [] and isinstance(info["warnings"], list)


def test_inspect_base(qwen3_fused: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    tiny_config("qwen3_moe").save_pretrained(good)
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(config_of("qwen3_moe", num_experts=8, num_local_experts=8, num_hidden_layers=1)))
    assert run(["inspect", str(qwen3_fused), "--base", str(good)], capsys)[0] == 0
    code, out, _ = run(["inspect", str(qwen3_fused), "--base", str(bad), "--json"], capsys)
    info = json.loads(out)
    assert code == 1 and not info["usable"]
    assert any("layers.0.mlp.experts" in e and "4 experts, the model has 8" in e for e in info["errors"])
    assert any("layers.1.self_attn.q_proj.lora_A.weight" in e and "past" in e for e in info["errors"])
    code, _, err = run(["inspect", str(qwen3_fused), "--base", str(tmp_path / "missing")], capsys)
    assert code == 1


def test_inspect_text_and_exit_codes(qwen3_fused: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["inspect", str(qwen3_fused)], capsys)
    assert code == 0 and "layout       fused" in out and "scaling      2 (alpha/r)" in out
    assert run(["inspect"], capsys)[0] == 2  # missing argument: usage error
    code, out, _ = run(["inspect", str(tmp_path / "nope")], capsys)
    assert code == 1 and "error: " in out and "no such adapter" in out and "NOT usable" in out
    code, out, _ = run(["inspect", str(tmp_path / "nope"), "--json"], capsys)
    assert code == 1 and "no such adapter" in json.loads(out)["errors"][0]
    write_adapter(tmp_path / "bad", {"base_model.model.model.layers.0.self_attn.zz.lora_A.weight": torch.ones(2, 2),
                                     "base_model.model.model.layers.0.self_attn.zz.lora_B.weight": torch.ones(2, 2)},
                  {"r": 2})
    code, out, _ = run(["inspect", str(tmp_path / "bad")], capsys)
    assert code == 1 and "self_attn.zz.lora_A.weight" in out


@pytest.mark.parametrize("layout", ["per-expert", "fused", "peft"])
def test_convert_cli(layout: str, qwen3_fused: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "out"
    code, out, err = run(["convert", str(qwen3_fused), str(out_dir), "--to", layout], capsys)
    assert code == 0, err
    assert "verified bit-exact" in out
    a, b = load_adapter(str(qwen3_fused)), load_adapter(str(out_dir))
    for layer in a.moe:
        for e in range(E):
            for x, y in zip(a.moe[layer].expert_deltas(e), b.moe[layer].expert_deltas(e), strict=True):
                assert torch.equal(x, y)
    assert run(["inspect", str(out_dir)], capsys)[0] == 0
    assert run(["convert", str(qwen3_fused), str(out_dir)], capsys)[0] == 2  # exists, no --force
    assert run(["convert", str(qwen3_fused), str(out_dir), "--force"], capsys)[0] == 0


def test_convert_usage_and_refusals(qwen3_fused: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["convert", str(qwen3_fused), str(tmp_path / "x"), "--to", "bogus"], capsys)[0] == 2
    assert run(["convert", str(qwen3_fused), str(tmp_path / "x"), "--dtype", "int8"], capsys)[0] == 2
    assert run(["convert", str(qwen3_fused), str(qwen3_fused)], capsys)[0] == 2
    assert run(["inspect", str(qwen3_fused), "--b-packing", "sideways"], capsys)[0] == 2
    # per-expert outer factors differ across experts: shared-outer would need an average -> error, no output
    code, _, err = run(["convert", str(qwen3_fused), str(tmp_path / "so"), "--to", "shared-outer"], capsys)
    assert code == 1 and "differs across experts" in err
    assert not (tmp_path / "so" / "adapter_model.safetensors").exists()


def test_convert_bin_dtype_and_shared_outer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    tensors = per_expert_tensors(("w1", "w3", "w2"), "block_sparse_moe.experts", r=4)
    torch.save(tensors, src / "adapter_model.bin")
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    assert run(["convert", str(src), str(tmp_path / "st"), "--dtype", "bfloat16"], capsys)[0] == 0
    a, b = load_adapter(str(src)), load_adapter(str(tmp_path / "st"))
    assert b.expert_naming == "mixtral" and b.moe[0].gate_up_B.dtype == torch.bfloat16
    assert torch.equal(a.moe[1].down_B.bfloat16(), b.moe[1].down_B)
    # a shared-outer canonical goes through every layout and back unchanged
    so = random_canonical("shared-outer")
    save_adapter(so, tmp_path / "so0", "shared-outer")
    prev = tmp_path / "so0"
    for i, layout in enumerate(["per-expert", "fused", "peft", "shared-outer"], start=1):
        assert run(["convert", str(prev), str(tmp_path / f"so{i}"), "--to", layout], capsys)[0] == 0
        prev = tmp_path / f"so{i}"
    back = load_adapter(str(prev))
    for layer, m in so.moe.items():
        for f in ("gate_up_A", "gate_up_B", "down_A", "down_B"):
            assert torch.equal(getattr(m, f), getattr(back.moe[layer], f)), (layer, f)
