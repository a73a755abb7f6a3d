"""Stream safetensors checkpoints into the engine's fused in-memory layout (or fill dummy weights).

HF keys map onto (parameter, index) pairs of models/decoder.py's names:
    self_attn.q_proj|k_proj|v_proj        -> attn.qkv rows [0,q) | [q,q+kv) | [q+kv,q+2kv)
    mlp.gate_proj|up_proj                 -> mlp.gate_up rows [0,I) | [I,2I)      (dense layers)
    mlp.experts.{e}.gate_proj|up_proj     -> mlp.w13[e] rows [0,I) | [I,2I)       (per-expert on disk)
    block_sparse_moe.experts.{e}.w1|w3|w2 -> the same, Mixtral naming
    mlp.experts.gate_up_proj [E,2I,H], mlp.experts.down_proj [E,H,I] -> mlp.w13, mlp.w2 (fused on disk)
    mlp.gate / block_sparse_moe.gate      -> mlp.router
Tensors are read one at a time (sharded checkpoints through model.safetensors.index.json). A key that
maps nowhere, a shape that does not fit, or a parameter left (partly) unfilled is a ConfigError naming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from lorax.errors import ConfigError
from lorax.inference.config import ModelConfig

Index = tuple[int | slice, ...]  # an index into the destination parameter

_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
# Keys some checkpoints carry that hold nothing to load.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.rotary_emb\.|_extra_state)$")


def map_key(key: str, cfg: ModelConfig) -> tuple[str, Index] | None:
    """HF checkpoint key -> (lorax parameter name, index into it); None = not a key of this model."""
    if key in ("model.embed_tokens.weight", "embed_tokens.weight"):
        return "embed.weight", ()
    if key in ("model.norm.weight", "norm.weight"):
        return "norm.weight", ()
    if key == "lm_head.weight":
        return "lm_head.weight", ()
    m = _LAYER.match(key)
    if m is None:
        return None
    i, rest = int(m.group(1)), m.group(2)
    if i >= cfg.num_layers:
        return None
    p = f"layers.{i}."
    q, kv = cfg.q_size, cfg.kv_size
    simple = {
        "input_layernorm.weight": "input_norm.weight",
        "post_attention_layernorm.weight": "post_norm.weight",
        "self_attn.o_proj.weight": "attn.o.weight",
        "self_attn.o_proj.bias": "attn.o.bias",
        "self_attn.q_norm.weight": "attn.q_norm.weight",
        "self_attn.k_norm.weight": "attn.k_norm.weight",
    }
    if rest in simple:
        return p + simple[rest], ()
    qkv = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
    for name, (lo, hi) in qkv.items():
        for kind in ("weight", "bias"):
            if rest == f"self_attn.{name}.{kind}":
                return f"{p}attn.qkv.{kind}", (slice(lo, hi),)
    if cfg.layer_is_moe[i]:
        return _map_moe(rest, p, cfg)
    return _map_mlp(rest, p + "mlp.", cfg.intermediate_size)


def _map_mlp(rest: str, p: str, inter: int) -> tuple[str, Index] | None:
    """A dense SwiGLU MLP's keys (`rest` relative to its module) -> fused gate_up / down."""
    for kind in ("weight", "bias"):
        if rest == f"mlp.gate_proj.{kind}":
            return f"{p}gate_up.{kind}", (slice(0, inter),)
        if rest == f"mlp.up_proj.{kind}":
            return f"{p}gate_up.{kind}", (slice(inter, 2 * inter),)
        if rest == f"mlp.down_proj.{kind}":
            return f"{p}down.{kind}", ()
    return None


def _map_moe(rest: str, p: str, cfg: ModelConfig) -> tuple[str, Index] | None:
    inter = cfg.moe_intermediate_size
    if rest in ("mlp.gate.weight", "block_sparse_moe.gate.weight"):
        return p + "mlp.router", ()
    if rest == "mlp.experts.gate_up_proj":
        return p + "mlp.w13", ()
    if rest == "mlp.experts.down_proj":
        return p + "mlp.w2", ()
    if rest == "mlp.shared_expert_gate.weight" and cfg.shared_expert_intermediate_size:
        return p + "mlp.shared_gate", ()
    if rest.startswith("mlp.shared_expert.") and cfg.shared_expert_intermediate_size:
        return _map_mlp("mlp." + rest[len("mlp.shared_expert.") :], p + "mlp.shared.", cfg.shared_expert_intermediate_size)
    m = _EXPERT.match(rest)
    if m is None:
        return None
    e, proj = int(m.group(1)), m.group(2)
    if e >= cfg.num_experts:
        return None
    if proj in ("gate_proj", "w1"):
        return p + "mlp.w13", (e, slice(0, inter))
    if proj in ("up_proj", "w3"):
        return p + "mlp.w13", (e, slice(inter, 2 * inter))
    if proj in ("down_proj", "w2"):
        return p + "mlp.w2", (e,)
    return None


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, through the shard index when there is one."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ConfigError(f"{index}: not a valid shard index ({exc})") from exc
        files = sorted({model_dir / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ConfigError(f"{index}: shard file(s) {missing} are missing")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in model_dir.glob("*.bin"))
        extra = f" (found {bins}; lorax loads safetensors only)" if bins else ""
        raise ConfigError(f"{model_dir}: no *.safetensors weights{extra}")
    return files


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, Path, torch.Tensor]]:
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield key, path, f.get_tensor(key)


def load_weights(params: dict[str, torch.Tensor], model_dir: Path, cfg: ModelConfig) -> None:
    """Copy every checkpoint tensor into its place in `params` (named as models/decoder.py names them)."""
    filled = {name: 0 for name in params}
    seen: set[tuple[str, str]] = set()
    for key, path, tensor in _iter_tensors(checkpoint_files(model_dir)):
        if _IGNORED.search(key):
            continue
        mapped = map_key(key, cfg)
        if mapped is None:
            raise ConfigError(f"{path.name}: tensor {key!r} {tuple(tensor.shape)} is not a weight of this {cfg.model_type} model")
        name, index = mapped
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: the embedding is the head
        if name not in params:
            raise ConfigError(f"{path.name}: tensor {key!r} maps to {name}, which this model does not have")
        dest = params[name][index] if index else params[name]
        if tuple(dest.shape) != tuple(tensor.shape):
            raise ConfigError(
                f"{path.name}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)} "
                f"(from config.json)"
            )
        if (name, repr(index)) in seen:
            raise ConfigError(f"{path.name}: tensor {key!r} is given twice")
        seen.add((name, repr(index)))
        with torch.no_grad():
            dest.copy_(tensor)
        filled[name] += dest.numel()
    missing = [name for name, n in filled.items() if n != params[name].numel()]
    if missing:
        raise ConfigError(f"{model_dir}: checkpoint lacks weights for {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def dummy_weights(params: dict[str, torch.Tensor], seed: int) -> None:
    """Random weights (never zeros) from a fixed seed: norms near 1, everything else ~N(0, 0.02)."""
    gens: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, p in params.items():
            # generated on the parameter's device: a 30B checkpoint never passes through host memory
            gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
            p.normal_(0.0, 0.02, generator=gen)
            if name.endswith("norm.weight"):
                p.add_(1.0)
