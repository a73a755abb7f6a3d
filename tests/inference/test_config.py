"""ModelConfig.from_hf: every family quirk read from config.json, checked against transformers' own
config objects (the to_dict() of a transformers config is what save_pretrained writes)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lorax.errors import ConfigError
from lorax.inference.config import EngineConfig, ModelConfig
from lorax.inference.layers.norm_rope import rope_inv_freq


def _hf(kind: str, **kw: Any) -> dict[str, Any]:
    import transformers

    cls = getattr(transformers, kind)
    base = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4)
    return dict(cls(**{**base, **kw}).to_dict())


# (transformers config class, kwargs, expected ModelConfig fields)
CASES = [
    ("Qwen3MoeConfig", dict(num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0], decoder_sparse_step=1,
                            moe_intermediate_size=16, norm_topk_prob=True, head_dim=16),
     dict(num_experts=8, top_k=2, layer_is_moe=(False, True, True, True), norm_topk_prob=True, qk_norm="head",
          head_dim=16, moe_intermediate_size=16, qkv_bias=False)),
    ("Qwen3MoeConfig", dict(num_experts=8, num_experts_per_tok=2, decoder_sparse_step=2),
     dict(layer_is_moe=(False, True, False, True), norm_topk_prob=False)),
    ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=24),
     dict(shared_expert_intermediate_size=24, qkv_bias=True, o_bias=False, qk_norm="none", sliding_window=None)),
    ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=20),
     dict(num_experts=4, moe_intermediate_size=20, norm_topk_prob=True, layer_is_moe=(True,) * 4)),
    ("MixtralConfig", dict(num_local_experts=4, sliding_window=128), dict(sliding_window=128)),
    ("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2, clip_qkv=3.0),
     dict(qk_norm="full", clip_qkv=3.0, norm_topk_prob=False)),
    ("Qwen3Config", dict(head_dim=16), dict(num_experts=0, layer_is_moe=(False,) * 4, qk_norm="head")),
    ("LlamaConfig", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
     dict(qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=True, head_dim=8, rope_scaling=None)),
]


@pytest.mark.parametrize(("kind", "kw", "want"), CASES)
def test_from_hf_reads_family_quirks(kind: str, kw: dict, want: dict) -> None:
    cfg = ModelConfig.from_hf(_hf(kind, **kw))
    for field, value in want.items():
        assert getattr(cfg, field) == value, field


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64},
    ],
)
def test_rope_scaling_matches_transformers(rope: dict) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = LlamaConfig(hidden_size=64, num_attention_heads=2, rope_scaling=rope, max_position_embeddings=1024)
    ref, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg, None)
    cfg = ModelConfig.from_hf(hf_cfg.to_dict())
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == rope["rope_type"]
    ours = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert torch.allclose(ours, ref.float(), rtol=1e-6)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"model_type": "gpt2"}, "not supported"),
        ({"model_type": "llama", "vocab_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1}, "hidden_size"),
        ({**_hf("LlamaConfig"), "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "yarn"),
        ({**_hf("MixtralConfig"), "num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({**_hf("Qwen3MoeConfig"), "quantization_config": {"quant_method": "fp8"}}, "quantized checkpoints"),
    ],
)
def test_from_hf_errors(raw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf(raw)


def test_engine_config_from_options_names_unknown_keys() -> None:
    assert EngineConfig.from_options({"max_loras": 2}).max_loras == 2
    with pytest.raises(ConfigError, match="max_lora"):
        EngineConfig.from_options({"max_lora": 2})
