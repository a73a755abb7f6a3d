"""Model families: HF model_type -> the class that builds it (imported lazily)."""

from __future__ import annotations

from typing import Any

from lorax.errors import ConfigError

# Every supported family composes the shared decoder; quirks are resolved in ModelConfig.from_hf.
_FAMILIES = {
    "qwen3_moe": "decoder",
    "qwen2_moe": "decoder",
    "mixtral": "decoder",
    "olmoe": "decoder",
    "qwen3": "decoder",
    "qwen2": "decoder",
    "llama": "decoder",
    "mistral": "decoder",
}


def model_class(model_type: str) -> Any:
    if model_type not in _FAMILIES:
        raise ConfigError(f"no model implementation for model_type {model_type!r}")
    from lorax.inference.models.decoder import DecoderLM

    return DecoderLM
