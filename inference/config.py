"""Engine options (EngineConfig) and the model description (ModelConfig.from_hf).

`ModelConfig.from_hf` is the one place that reads a Hugging Face config.json: every family quirk
(expert counts under three names, dense layers inside MoE models, q/k norms per head or over the whole
projection, shared experts, router renormalisation, rope scaling) is turned into plain typed fields here,
so models/ and layers/ never look at the raw dict.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorax.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "qwen3", "qwen2", "llama", "mistral")


@dataclass(frozen=True)
class EngineConfig:
    """Options of one engine (names shared with recipes and CLI flags). Validated on construction."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    kernel_backend: str = "auto"  # auto | torch | triton
    max_loras: int = 4  # adapter slots on the device
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # None: keep every registered adapter on the host
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None  # override the KV sizing
    load_format: str = "auto"  # auto | safetensors | dummy
    enforce_eager: bool = False
    seed: int = 0
    revision: str | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"engine option {name}={getattr(self, name)!r}: {why}")

        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise bad("device", "expected auto, cpu, cuda or cuda:N")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise bad("dtype", "expected auto, float32, bfloat16 or float16")
        if self.kernel_backend not in ("auto", "torch", "triton"):
            raise bad("kernel_backend", "expected auto, torch or triton")
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise bad("load_format", "expected auto, safetensors or dummy")
        for name in ("max_loras", "max_lora_rank", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, "expected an integer >= 1")
        for name in ("max_cpu_loras", "max_model_len", "num_kv_blocks"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise bad(name, "expected an integer >= 1 or None")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise bad("num_kv_blocks", "needs at least 2 (one is the reserved padding block)")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise bad("gpu_memory_utilization", "expected a fraction in (0, 1]")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise bad("max_cpu_loras", f"must be >= max_loras ({self.max_loras})")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> EngineConfig:
        """Build from keyword options, naming any unknown key."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ConfigError(f"unknown engine option(s) {unknown}; known: {sorted(names)}")
        return cls(**options)


@dataclass(frozen=True)
class ModelConfig:
    """Everything the engine needs to know about a decoder-only model, family quirks resolved."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP layers
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # None = default rope
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: str = "none"  # none | head (per head, Qwen3) | full (over the whole projection, OLMoE)
    clip_qkv: float | None = None
    # MoE (num_experts == 0 for dense models)
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0  # > 0: Qwen2-MoE shared expert with a sigmoid gate
    layer_is_moe: tuple[bool, ...] = field(default_factory=tuple)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    sliding_window: int | None = None  # the engine keeps max_model_len <= this (full attention inside it)
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return any(self.layer_is_moe)

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> ModelConfig:
        cfg_path = Path(path) / "config.json"
        try:
            raw = json.loads(cfg_path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"{cfg_path}: no config.json (is this a model directory?)") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{cfg_path}: invalid JSON: {exc}") from exc
        return cls.from_hf(raw, source=str(cfg_path))

    @classmethod
    def from_hf(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Read a transformers config.json dict. Unknown families and unsupported options are errors."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )

        quant = raw.get("quantization_config")
        if quant:
            method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
            raise ConfigError(f"{source}: quantized checkpoints ({method}) are not supported; use bf16/fp16/fp32 weights")

        def need(key: str) -> Any:
            if raw.get(key) is None:
                raise ConfigError(f"{source}: missing required field {key!r} for model_type {model_type}")
            return raw[key]

        hidden = int(need("hidden_size"))
        num_heads = int(need("num_attention_heads"))
        num_kv = int(raw.get("num_key_value_heads") or num_heads)
        head_dim = int(raw.get("head_dim") or hidden // num_heads)
        num_layers = int(need("num_hidden_layers"))
        # Sliding-window attention equals full attention while the context fits in the window, so the
        # engine caps max_model_len at the window instead of implementing it. Qwen families carry a
        # window that is off unless use_sliding_window; Mistral/Mixtral apply it whenever it is set.
        window = raw.get("sliding_window")
        if model_type in ("qwen3_moe", "qwen2_moe", "qwen3", "qwen2") and not raw.get("use_sliding_window"):
            window = None
        sliding_window = int(window) if window else None

        # Experts are named three ways across families and transformers versions.
        num_experts = int(raw.get("num_experts") or raw.get("num_local_experts") or 0)
        if model_type in ("qwen3", "qwen2", "llama", "mistral"):
            num_experts = 0
        top_k = int(raw.get("num_experts_per_tok") or 0) if num_experts else 0
        if num_experts and not 0 < top_k <= num_experts:
            raise ConfigError(f"{source}: num_experts_per_tok={top_k} must be in [1, {num_experts}]")

        if model_type in ("qwen3_moe", "qwen2_moe"):
            sparse_step = int(raw.get("decoder_sparse_step") or 1)
            mlp_only = set(raw.get("mlp_only_layers") or [])
            is_moe = tuple(
                i not in mlp_only and num_experts > 0 and (i + 1) % sparse_step == 0 for i in range(num_layers)
            )
        else:
            is_moe = tuple(num_experts > 0 for _ in range(num_layers))

        if model_type == "mixtral":
            moe_inter = int(need("intermediate_size"))
            norm_topk = True  # Mixtral always renormalises the top-k
        else:
            moe_inter = int(raw.get("moe_intermediate_size") or raw.get("intermediate_size") or 0)
            norm_topk = bool(raw.get("norm_topk_prob", False))

        qkv_bias = o_bias = False
        if model_type == "qwen2_moe":
            qkv_bias = bool(raw.get("qkv_bias", True))
        elif model_type == "qwen2":
            qkv_bias = True  # Qwen2 always has q/k/v biases and no o bias
        elif raw.get("attention_bias"):
            qkv_bias = o_bias = True
        qk_norm = {"qwen3_moe": "head", "qwen3": "head", "olmoe": "full"}.get(model_type, "none")

        eos = raw.get("eos_token_id")
        eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else ((int(eos),) if eos is not None else ())
        rope_theta, rope_scaling = _rope_params(raw, source)
        max_pos = int(raw.get("max_position_embeddings") or 2048)
        return cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=head_dim,
            intermediate_size=int(raw.get("intermediate_size") or 0),
            rms_norm_eps=float(raw.get("rms_norm_eps") or 1e-6),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=qk_norm,
            clip_qkv=float(raw["clip_qkv"]) if raw.get("clip_qkv") is not None else None,
            num_experts=num_experts,
            top_k=top_k,
            moe_intermediate_size=moe_inter if num_experts else 0,
            norm_topk_prob=norm_topk,
            shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size") or 0)
            if model_type == "qwen2_moe"
            else 0,
            layer_is_moe=is_moe,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=raw.get("pad_token_id"),
            torch_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
            sliding_window=sliding_window,
            hf_config=raw,
        )


def _rope_params(raw: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from transformers 5 `rope_parameters` or the older rope_theta/rope_scaling."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = dict(params)
    else:
        theta = float(raw.get("rope_theta") or 10000.0)
        scaling = dict(raw.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        return theta, None
    if rope_type not in ("linear", "llama3"):
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (default, linear, llama3)")
    scaling["rope_type"] = rope_type
    if "partial_rotary_factor" in scaling and not math.isclose(float(scaling["partial_rotary_factor"]), 1.0):
        raise ConfigError(f"{source}: partial_rotary_factor is not supported")
    return theta, scaling
