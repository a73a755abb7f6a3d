"""The MoE-LoRA inference engine.

`LLM` is imported lazily so that `lorax.inference.types` (and the CLI's --help) never pay for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorax.inference.types import GenerateRequest, RequestOutput, SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from lorax.inference.engine import LLM

__all__ = ["LLM", "GenerateRequest", "RequestOutput", "SamplingParams", "TokenLogprob"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from lorax.inference.engine import LLM

        return LLM
    raise AttributeError(f"module 'lorax.inference' has no attribute {name!r}")
