"""The parts of adapter_config.json that decide how tensors are scaled and read (PEFT semantics)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from lorax.errors import AdapterError, UsageError

B_PACKINGS = ("rank-major", "expert-major")


def match_pattern(patterns: dict[str, Any], module_path: str) -> str | None:
    """PEFT's rule: a pattern key k applies when ``(.*\\.)?(k)$`` matches the module path.

    So a key may be a plain suffix (``q_proj``, ``layers.0.self_attn.q_proj``) or a regex
    (``.*\\.gate_up_proj``); the first matching key in file order wins, as in PEFT.
    """
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module_path):
                return key
        except re.error as err:
            raise AdapterError(f"adapter_config.json: pattern {key!r} is not a valid regex ({err})") from None
    return None


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_parameters: tuple[str, ...] = ()
    b_packing: str = "rank-major"

    @classmethod
    def from_config(cls, config: dict[str, Any], b_packing: str | None, where: str) -> LoraSettings:
        peft_type = str(config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise AdapterError(f"{where}: peft_type {peft_type!r} is not LoRA; lorax reads LoRA adapters only")
        if config.get("use_dora"):
            raise AdapterError(f"{where}: DoRA adapters (use_dora) are not supported")
        try:
            r = int(config["r"])
            alpha = float(config.get("lora_alpha", r))
        except (KeyError, TypeError, ValueError):
            raise AdapterError(f"{where}: needs an integer 'r' (and a numeric 'lora_alpha')") from None
        if r <= 0:
            raise AdapterError(f"{where}: r must be positive, got {r}")
        if b_packing is not None and b_packing not in B_PACKINGS:
            raise UsageError(f"--b-packing must be one of {', '.join(B_PACKINGS)}, got {b_packing!r}")
        packing = b_packing or config.get("lorax_b_packing") or "rank-major"
        if packing not in B_PACKINGS:
            raise AdapterError(f"{where}: lorax_b_packing must be one of {B_PACKINGS}, got {packing!r}")
        tp = config.get("target_parameters") or ()
        return cls(
            r=r,
            alpha=alpha,
            use_rslora=bool(config.get("use_rslora", False)),
            rank_pattern={str(k): int(v) for k, v in (config.get("rank_pattern") or {}).items()},
            alpha_pattern={str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()},
            target_parameters=tuple(str(t) for t in tp),
            b_packing=packing,
        )

    def rank_alpha(self, module_path: str) -> tuple[int, float]:
        rk = match_pattern(self.rank_pattern, module_path)
        ak = match_pattern(self.alpha_pattern, module_path)
        r = self.rank_pattern[rk] if rk is not None else self.r
        alpha = self.alpha_pattern[ak] if ak is not None else self.alpha
        return r, alpha

    def scaling(self, module_path: str) -> float:
        r, alpha = self.rank_alpha(module_path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets_parameter(self, name: str) -> bool:
        """Whether target_parameters names ``name`` (e.g. "gate_up_proj") as a suffix."""
        return any(t == name or t.endswith("." + name) for t in self.target_parameters)
