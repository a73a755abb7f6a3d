"""Tiny random transformers models for the engine's parity tests (hidden 32, 2-3 layers, vocab 96).

Every builder returns an HF model whose weights are randomised with a larger std than transformers'
default, so that logits differ clearly between tokens and greedy decoding is not a run of ties.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

VOCAB = 96
# The engine under test: CUDA when there is one (oracles stay on the CPU), fp32, and the torch kernel
# backend unless LORAX_TEST_BACKEND=triton asks for the Triton kernels.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ENGINE = {"device": DEVICE, "dtype": "float32", "kernel_backend": os.environ.get("LORAX_TEST_BACKEND", "torch")}


def _configs() -> dict[str, Any]:
    from transformers import (
        LlamaConfig,
        MixtralConfig,
        OlmoeConfig,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    common: dict[str, Any] = dict(
        vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    return {
        # one dense layer (mlp_only_layers), renormalised top-k
        "qwen3_moe": Qwen3MoeConfig(
            **common, head_dim=8, num_hidden_layers=3, intermediate_size=40, moe_intermediate_size=16,
            num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1], norm_topk_prob=True,
        ),
        "qwen3_moe_nonorm": Qwen3MoeConfig(
            **common, head_dim=8, num_hidden_layers=2, intermediate_size=40, moe_intermediate_size=16,
            num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
        ),
        "qwen2_moe": Qwen2MoeConfig(
            **common, num_hidden_layers=2, intermediate_size=40, moe_intermediate_size=16,
            shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
        ),
        "mixtral": MixtralConfig(
            **common, num_hidden_layers=2, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
        ),
        "olmoe": OlmoeConfig(
            **common, num_hidden_layers=2, intermediate_size=16, num_experts=4, num_experts_per_tok=2,
        ),
        "qwen3": Qwen3Config(**common, head_dim=8, num_hidden_layers=2, intermediate_size=40),
        "llama": LlamaConfig(
            **common, num_hidden_layers=2, intermediate_size=40, tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        ),
    }


ARCHS = ("qwen3_moe", "qwen3_moe_nonorm", "qwen2_moe", "mixtral", "olmoe", "qwen3", "llama")


def build_hf(arch: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = _configs()[arch]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def save(model: torch.nn.Module, path: Path, fused: bool = False) -> Path:
    if fused:
        model.save_pretrained(path, save_original_format=False)
    else:
        model.save_pretrained(path)
    return path


@torch.no_grad()
def hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
        eos_token_id=None, pad_token_id=0,
    )
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def hf_logits(model: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    return model(torch.tensor([prompt])).logits[0].float()
