"""Inputs of `lorax bench throughput` (inference/bench_throughput.py): the standard model's config, the
workload, a config-only model directory, random prompts and adapters, and the copy-bandwidth yardstick."""

from __future__ import annotations

import gc
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorax.adapters.canonical import ATTENTION_MODULES, CanonicalAdapter, LoraPair, MoELora
from lorax.errors import ConfigError
from lorax.inference.config import ModelConfig

# Qwen3-30B-A3B's shape (../shared/BENCHMARKS.md "The standard workload"), written as config.json.
STANDARD_MODEL: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "dtype": "bfloat16",
    "output_router_logits": False,
}

@dataclass(frozen=True)
class Workload:
    num_prompts: int = 256
    input_len: int = 512
    output_len: int = 256
    adapters: int = 8  # prompt i uses adapter i % adapters
    rank: int = 16
    seed: int = 0

    def adapter_of(self, i: int) -> str:
        return adapter_name(i % self.adapters)


def adapter_name(j: int) -> str:
    return f"bench{j}"


# ---- inputs ------------------------------------------------------------------------------------------
def write_model_dir(config: dict[str, Any], dest: Path, layers: int | None = None) -> Path:
    """A model directory holding only config.json (enough for load_format=dummy), cut to `layers`."""
    cfg = dict(config)
    if layers is not None:
        full = int(cfg["num_hidden_layers"])
        if not 1 <= layers <= full:
            raise ConfigError(f"--layers {layers}: the model has {full} layers")
        cfg["num_hidden_layers"] = layers
        cfg["mlp_only_layers"] = [i for i in cfg.get("mlp_only_layers") or [] if i < layers]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(cfg, indent=1))
    return dest


def make_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Random token ids, fixed length (no tokenizer needed)."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(num)]


def random_adapter(mcfg: ModelConfig, name: str, rank: int, seed: int, dtype: torch.dtype,
                   device: torch.device) -> CanonicalAdapter:
    """Rank-r LoRA on q/k/v/o of every layer and on every expert's gate/up/down of every MoE layer.

    Values are small and random (never zeros, so no kernel can skip work). They are drawn on `device`
    (fast for 30B shapes) and handed to the engine on the host, where adapters live.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    H, E, inter, r = mcfg.hidden_size, mcfg.num_experts, mcfg.moe_intermediate_size, rank

    def rand(*shape: int, std: float) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).mul_(std)
        return t.to(dtype).cpu()

    dims = {"self_attn.q_proj": (H, mcfg.q_size), "self_attn.k_proj": (H, mcfg.kv_size),
            "self_attn.v_proj": (H, mcfg.kv_size), "self_attn.o_proj": (mcfg.q_size, H)}
    dense: dict[tuple[int, str], LoraPair] = {}
    moe: dict[int, MoELora] = {}
    for layer in range(mcfg.num_layers):
        for module in ATTENTION_MODULES:
            fin, fout = dims[module]
            dense[(layer, module)] = LoraPair(A=rand(r, fin, std=fin**-0.5), B=rand(fout, r, std=0.01))
        if mcfg.layer_is_moe[layer]:
            moe[layer] = MoELora(
                gate_up_A=rand(E, 2 * r, H, std=H**-0.5), gate_up_B=rand(E, 2 * inter, r, std=0.01),
                down_A=rand(E, r, inter, std=inter**-0.5), down_B=rand(E, H, r, std=0.01),
            )
    return CanonicalAdapter(name=name, moe_format="fused", dense=dense, moe=moe, alpha=float(r))


def copy_bandwidth_gbs(device: torch.device, nbytes: int, reps: int = 10) -> float:
    """Copy bandwidth in GB/s (bytes read + written) of `dst.copy_(src)` on one `nbytes` tensor, median."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times: list[float] = []
    for i in range(reps + 2):  # two warm-up copies
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t0
        if i >= 2:
            times.append(seconds)
    del src, dst
    free_device(device)
    return 2 * nbytes / statistics.median(times) / 1e9


def free_device(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
