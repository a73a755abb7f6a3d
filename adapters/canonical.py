"""The one in-memory form every on-disk adapter layout is read into (and written back from).

Shapes use: r rank, H hidden size, I expert intermediate size, E experts, in/out a dense module's
feature sizes. Scaling (alpha/r, alpha/sqrt(r) with rsLoRA, per-module rank/alpha patterns) is already
folded into every B, so a delta is always plain ``B @ A``.

MoE experts of one layer (``MoELora``)::

    gate_up_A  [E|1, 2r, H]   rows [0, r) are the gate projection's A, rows [r, 2r) the up projection's
    gate_up_B  [E, 2I, r]     rows [0, I) take z[:r] (gate), rows [I, 2I) take z[r:] (up)
    down_A     [E, r, I]
    down_B     [E|1, H, r]

A leading dimension of 1 marks the *shared-outer* side (one factor for all experts); it is stored once,
never expanded to E copies. So for expert e and a token x:

    gate = W_gate[e] x + gate_up_B[e, :I]  @ (gate_up_A[e or 0, :r] @ x)
    up   = W_up[e]   x + gate_up_B[e, I:]  @ (gate_up_A[e or 0, r:] @ x)
    y    = W_down[e] a + down_B[e or 0]    @ (down_A[e] @ a)

A PEFT fused adapter (one A [r, H] for the whole gate_up parameter) is represented with that A in both
halves; the writer folds identical halves back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# Dense module names lorax understands inside a decoder layer (HF naming, relative to `layers.{i}.`).
ATTENTION_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
DENSE_MLP_MODULES = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SHARED_EXPERT_MODULES = (
    "mlp.shared_expert.gate_proj",
    "mlp.shared_expert.up_proj",
    "mlp.shared_expert.down_proj",
)
DENSE_MODULES = ATTENTION_MODULES + DENSE_MLP_MODULES + SHARED_EXPERT_MODULES

MOE_FORMATS = ("none", "per-expert", "fused", "shared-outer")


@dataclass
class LoraPair:
    """One dense module's adapter: delta W = B @ A (scaling folded into B)."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> torch.Tensor:  # [out, in]
        return self.B.float() @ self.A.float()


@dataclass
class MoELora:
    """One MoE layer's expert adapters (see the module docstring for the layout)."""

    gate_up_A: torch.Tensor  # [E|1, 2r, H]
    gate_up_B: torch.Tensor  # [E, 2I, r]
    down_A: torch.Tensor  # [E, r, I]
    down_B: torch.Tensor  # [E|1, H, r]
    # Projections the source adapter really had; the others are stored as zeros (writers skip them).
    parts: tuple[str, ...] = ("gate", "up", "down")

    @property
    def rank(self) -> int:
        return int(self.down_A.shape[1])

    @property
    def num_experts(self) -> int:
        return int(self.gate_up_B.shape[0])

    @property
    def shared_gate_up_A(self) -> bool:
        return self.gate_up_A.shape[0] == 1 and self.num_experts > 1

    @property
    def shared_down_B(self) -> bool:
        return self.down_B.shape[0] == 1 and self.num_experts > 1

    def expert_deltas(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Deltas (gate [I, H], up [I, H], down [H, I]) of expert e, in fp32."""
        r = self.rank
        inter = self.gate_up_B.shape[1] // 2
        a = self.gate_up_A[0 if self.shared_gate_up_A else e].float()
        b = self.gate_up_B[e].float()
        gate = b[:inter] @ a[:r]
        up = b[inter:] @ a[r:]
        down = self.down_B[0 if self.shared_down_B else e].float() @ self.down_A[e].float()
        return gate, up, down


@dataclass
class CanonicalAdapter:
    """An adapter in lorax's canonical form.

    ``dense`` is keyed by (layer index, module name from DENSE_MODULES); ``moe`` by layer index.
    ``extra`` keeps tensors lorax reads but does not apply (embed_tokens / lm_head LoRA, modules_to_save),
    so that `inspect` can report them and the engine can refuse them by name.
    """

    name: str
    moe_format: str  # one of MOE_FORMATS
    dense: dict[tuple[int, str], LoraPair] = field(default_factory=dict)
    moe: dict[int, MoELora] = field(default_factory=dict)
    base_model: str | None = None
    alpha: float | None = None
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    source_config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    # How per-expert keys were (and will be) spelled: "qwen" (mlp.experts.{e}.gate_proj/up_proj/down_proj)
    # or "mixtral" (block_sparse_moe.experts.{e}.w1/w3/w2); and the text before the layer index in keys.
    expert_naming: str = "qwen"
    key_prefix: str = "base_model.model.model.layers."

    @property
    def rank(self) -> int:
        """The largest rank of any module (the slot size an engine needs)."""
        ranks = [p.rank for p in self.dense.values()] + [m.rank for m in self.moe.values()]
        return max(ranks, default=0)

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.dense} | set(self.moe))

    def num_params(self) -> int:
        n = sum(p.A.numel() + p.B.numel() for p in self.dense.values())
        for m in self.moe.values():
            n += m.gate_up_A.numel() + m.gate_up_B.numel() + m.down_A.numel() + m.down_B.numel()
        return n
