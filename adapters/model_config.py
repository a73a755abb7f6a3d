"""The little of a model's config.json adapters need, and ``check_against_config``.

Kept apart from the engine's ModelConfig on purpose (adapters never import inference). Families:
Qwen3-MoE / Qwen2-MoE (``num_experts``, ``moe_intermediate_size``, ``decoder_sparse_step``,
``mlp_only_layers``; Qwen2-MoE adds ``shared_expert_intermediate_size``), Mixtral
(``num_local_experts``; experts use ``intermediate_size``), OLMoE (``num_experts``; experts use
``intermediate_size``), and dense Qwen3 / Llama.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorax.adapters.canonical import (
    ATTENTION_MODULES,
    DENSE_MLP_MODULES,
    SHARED_EXPERT_MODULES,
    CanonicalAdapter,
)
from lorax.errors import ConfigError


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden: int
    num_layers: int
    q_dim: int  # num_attention_heads * head_dim
    kv_dim: int  # num_key_value_heads * head_dim
    intermediate: int  # dense MLP width (dense layers)
    num_experts: int  # 0 for a dense model
    expert_intermediate: int
    shared_expert_intermediate: int  # 0 when the model has no shared expert
    sparse_layers: frozenset[int]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        cfg = config.get("text_config") or config
        try:
            hidden = int(cfg["hidden_size"])
            layers = int(cfg["num_hidden_layers"])
            heads = int(cfg["num_attention_heads"])
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"config.json: missing or bad {err} (hidden_size, num_hidden_layers, "
                              "num_attention_heads are required)") from None
        kv = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        mt = str(cfg.get("model_type", ""))
        inter = int(cfg.get("intermediate_size") or 0)
        experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
        if mt in ("mixtral", "olmoe") or "moe_intermediate_size" not in cfg:
            expert_inter = inter
        else:
            expert_inter = int(cfg["moe_intermediate_size"])
        sparse: set[int] = set()
        if experts:
            step = int(cfg.get("decoder_sparse_step") or 1)
            dense_only = {int(i) for i in cfg.get("mlp_only_layers") or []}
            sparse = {i for i in range(layers) if i not in dense_only and (i + 1) % step == 0}
        return cls(mt, hidden, layers, heads * head_dim, kv * head_dim, inter, experts, expert_inter,
                   int(cfg.get("shared_expert_intermediate_size") or 0), frozenset(sparse))

    def dense_shapes(self, layer: int) -> dict[str, tuple[int, int]]:
        """module -> (in, out) of every dense Linear lorax can adapt in this layer."""
        h = self.hidden
        out = {
            "self_attn.q_proj": (h, self.q_dim),
            "self_attn.k_proj": (h, self.kv_dim),
            "self_attn.v_proj": (h, self.kv_dim),
            "self_attn.o_proj": (self.q_dim, h),
        }
        if layer in self.sparse_layers:
            if self.shared_expert_intermediate:
                s = self.shared_expert_intermediate
                out.update(dict(zip(SHARED_EXPERT_MODULES, [(h, s), (h, s), (s, h)], strict=True)))
        else:
            i = self.intermediate
            out.update(dict(zip(DENSE_MLP_MODULES, [(h, i), (h, i), (i, h)], strict=True)))
        assert set(ATTENTION_MODULES) <= set(out)
        return out


def read_model_config(source: str, revision: str | None = None) -> dict[str, Any]:
    """config.json from a model directory, a config.json path, or a Hub repo id (no weights needed)."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "config.json"
    elif not path.is_file():
        if source.count("/") != 1:
            raise ConfigError(f"{source}: no such model directory or config.json")
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, "config.json", revision=revision))
        except Exception as err:  # any hub failure means the same to the user
            raise ConfigError(f"{source}: cannot get config.json ({type(err).__name__}: {err})") from None
    if not path.is_file():
        raise ConfigError(f"{path}: missing")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: unreadable JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return cfg


def _default_name(adapter: CanonicalAdapter, layer: int, module: str) -> str:
    return f"{adapter.key_prefix}{layer}.{module}"


def check_against_config(adapter: CanonicalAdapter, config: dict[str, Any],
                         name_of: Callable[[int, str], str] | None = None) -> list[str]:
    """Every reason the engine could not apply ``adapter`` to this model (empty list: usable).

    ``name_of(layer, module)`` names the tensor in messages (default: the canonical key path).
    """
    try:
        shape = ModelShape.from_config(config)
    except ConfigError as err:
        return [str(err)]
    name = name_of or (lambda layer, module: _default_name(adapter, layer, module))
    errors: list[str] = []
    for (layer, module), pair in sorted(adapter.dense.items()):
        where = name(layer, module)
        if layer >= shape.num_layers:
            errors.append(f"{where}: layer {layer} is past the model's {shape.num_layers} layers")
            continue
        dims = shape.dense_shapes(layer).get(module)
        if dims is None:
            kind = "an MoE layer" if layer in shape.sparse_layers else "a dense layer"
            errors.append(f"{where}: the model has no {module} in layer {layer} ({kind} of {shape.model_type})")
            continue
        fin, fout = dims
        got = (pair.A.shape[1], pair.B.shape[0])
        if got != (fin, fout):
            hint = " (transposed?)" if got == (fout, fin) else ""
            errors.append(f"{where}: LoRA maps {got[0]} -> {got[1]} but the model's {module} maps "
                          f"{fin} -> {fout}{hint}")
    for layer, moe in sorted(adapter.moe.items()):
        where = name(layer, "experts")
        if layer >= shape.num_layers:
            errors.append(f"{where}: layer {layer} is past the model's {shape.num_layers} layers")
            continue
        if layer not in shape.sparse_layers:
            errors.append(f"{where}: expert LoRA on layer {layer}, which has no experts in this model")
            continue
        h, i = moe.gate_up_A.shape[2], moe.down_A.shape[2]
        if moe.num_experts != shape.num_experts:
            errors.append(f"{where}: {moe.num_experts} experts, the model has {shape.num_experts}")
        if (h, i) != (shape.hidden, shape.expert_intermediate):
            hint = " (gate_up/down swapped?)" if (i, h) == (shape.hidden, shape.expert_intermediate) else ""
            errors.append(f"{where}: expert LoRA implies hidden {h} / intermediate {i}, the model has "
                          f"{shape.hidden} / {shape.expert_intermediate}{hint}")
    for key in sorted(adapter.extra):
        errors.append(f"{key}: LoRA on embed_tokens / lm_head is not applied by the engine")
    return errors
