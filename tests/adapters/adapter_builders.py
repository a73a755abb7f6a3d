"""Builders shared by the adapter tests: tiny transformers models, PEFT adapters, hand-written files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lorax.adapters.canonical import CanonicalAdapter, LoraPair, MoELora
from lorax.adapters.layers import assemble_moe

H, INTER, E, LAYERS, VOCAB = 32, 16, 4, 2, 64  # hidden, expert intermediate, experts, layers, vocab


def tiny_config(family: str) -> Any:
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, eos_token_id=1, bos_token_id=0, pad_token_id=0)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(moe_intermediate_size=INTER, intermediate_size=48, num_experts=E,
                                 num_experts_per_tok=2, **common)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(moe_intermediate_size=INTER, intermediate_size=48, num_experts=E,
                                 num_experts_per_tok=2, shared_expert_intermediate_size=24, **common)
    if family == "mixtral":
        return tf.MixtralConfig(intermediate_size=INTER, num_local_experts=E, num_experts_per_tok=2, **common)
    if family == "olmoe":
        return tf.OlmoeConfig(intermediate_size=INTER, num_experts=E, num_experts_per_tok=2, **common)
    if family == "qwen3":
        return tf.Qwen3Config(intermediate_size=48, **common)
    raise ValueError(family)


def tiny_model(family: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(family)).float()


def write_adapter(path: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any] | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))
    if config is not None:
        (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    return path


def per_expert_tensors(names: tuple[str, str, str], container: str, r: int,
                       layers: int = LAYERS, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Hand-built legacy per-expert keys; names = (gate, up, down) projection names."""
    out = {}
    for layer in range(layers):
        for e in range(E):
            for n in names:
                fin, fout = (INTER, H) if n == names[2] else (H, INTER)
                base = f"base_model.model.model.layers.{layer}.{container}.{e}.{n}"
                out[f"{base}.lora_A.weight"] = torch.randn(r, fin, dtype=dtype)
                out[f"{base}.lora_B.weight"] = torch.randn(fout, r, dtype=dtype)
    return out


def random_canonical(kind: str, r: int = 4, dtype: torch.dtype = torch.float32,
                     parts: tuple[str, ...] = ("gate", "up", "down")) -> CanonicalAdapter:
    """A random canonical adapter: kind in per-expert / fused (one A for gate and up) / shared-outer."""
    ad = CanonicalAdapter(name=kind, moe_format=kind)
    for layer in range(LAYERS):
        for module, (fin, fout) in {"self_attn.q_proj": (H, H), "self_attn.v_proj": (H, 16)}.items():
            ad.dense[(layer, module)] = LoraPair(torch.randn(r, fin, dtype=dtype), torch.randn(fout, r, dtype=dtype))
        outer = 1 if kind == "shared-outer" else E
        gate_a = torch.randn(outer, r, H, dtype=dtype)
        up_a = gate_a if kind == "fused" else torch.randn(outer, r, H, dtype=dtype)
        all_parts = {
            "gate": (gate_a, torch.randn(E, INTER, r, dtype=dtype)),
            "up": (up_a, torch.randn(E, INTER, r, dtype=dtype)),
            "down": (torch.randn(E, r, INTER, dtype=dtype), torch.randn(outer, H, r, dtype=dtype)),
        }
        ad.moe[layer] = assemble_moe({p: all_parts[p] for p in parts}, "test")
    return ad


def assert_same_tensors(a: CanonicalAdapter, b: CanonicalAdapter) -> None:
    assert sorted(a.dense) == sorted(b.dense)
    for k, pair in a.dense.items():
        assert torch.equal(pair.A, b.dense[k].A), k
        assert torch.equal(pair.B, b.dense[k].B), k
        assert pair.B.dtype == b.dense[k].B.dtype
    assert sorted(a.moe) == sorted(b.moe)
    for layer, m in a.moe.items():
        n: MoELora = b.moe[layer]
        for f in ("gate_up_A", "gate_up_B", "down_A", "down_B"):
            assert torch.equal(getattr(m, f), getattr(n, f)), (layer, f, getattr(m, f).shape, getattr(n, f).shape)
        assert m.parts == n.parts
