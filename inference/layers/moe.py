"""Sparse MoE block: router (top-k, optional renormalisation), fused experts with MoE-LoRA, and the
optional Qwen2-MoE shared expert with its sigmoid gate.

Expert weights live fused: w13 [E, 2I, H] (gate rows first, then up), w2 [E, H, I]. The LoRA pool
attaches this layer's slab (kernels/moe_lora.py MoELoraArgs layout, without token_slot); the per-step
token_slot comes from the ForwardContext.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorax.inference.config import ModelConfig
from lorax.inference.context import get_forward_context
from lorax.inference.layers.mlp import GatedMLP
from lorax.kernels.moe_lora import MoELoraArgs
from lorax.kernels.registry import KernelOps


class MoESlab:
    """References to one layer's MoE-LoRA slab in the pool (allocated once, updated in place)."""

    def __init__(
        self,
        gate_up_A: torch.Tensor,  # [S, E, 2R, H]
        gate_up_B: torch.Tensor,  # [S, E, 2I, R]
        down_A: torch.Tensor,  # [S, E, R, I]
        down_B: torch.Tensor,  # [S, E, H, R]
        shared_gate_up_A: torch.Tensor | None,  # [S, 2R, H]
        shared_down_B: torch.Tensor | None,  # [S, H, R]
    ) -> None:
        self.gate_up_A, self.gate_up_B = gate_up_A, gate_up_B
        self.down_A, self.down_B = down_A, down_B
        self.shared_gate_up_A, self.shared_down_B = shared_gate_up_A, shared_down_B

    def args(self, token_slot: torch.Tensor, shared: bool = True, active_slots: int | None = None) -> MoELoraArgs:
        """The kernels' arguments; shared=False leaves the shared-outer slabs out (exact when no token's
        slot holds a shared-outer adapter: their rows are zero for every other slot). active_slots: the
        distinct slots the step's tokens use, if known (a schedule hint)."""
        return MoELoraArgs(
            token_slot,
            self.gate_up_A,
            self.gate_up_B,
            self.down_A,
            self.down_B,
            self.shared_gate_up_A if shared else None,
            self.shared_down_B if shared else None,
            active_slots,
        )


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.cfg = cfg
        self.ops = ops
        E, H, inter = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.router = nn.Parameter(torch.empty(E, H, dtype=dtype, device=device), requires_grad=False)
        self.w13 = nn.Parameter(torch.empty(E, 2 * inter, H, dtype=dtype, device=device), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(E, H, inter, dtype=dtype, device=device), requires_grad=False)
        self.shared: GatedMLP | None = None
        self.shared_gate: nn.Parameter | None = None
        if cfg.shared_expert_intermediate_size:
            self.shared = GatedMLP(H, cfg.shared_expert_intermediate_size, ops, False, dtype, device)
            self.shared_gate = nn.Parameter(torch.empty(1, H, dtype=dtype, device=device), requires_grad=False)
        self.lora: MoESlab | None = None
        # Mixtral keeps fp32 routing weights; the Qwen/OLMoE routers cast them back to the model dtype.
        self.fp32_weights = cfg.model_type == "mixtral"

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> topk_weights [T, k] fp32, topk_ids [T, k] int32."""
        # softmax, top-k, renormalisation and the weights' round trip through the model dtype: one launch
        return self.ops.router_topk(F.linear(x, self.router), self.cfg.top_k, self.cfg.norm_topk_prob,
                                    not self.fp32_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = get_forward_context()
        weights, ids = self.route(x)
        lora = (self.lora.args(ctx.token_slot, ctx.moe_shared, ctx.active_slots)
                if (ctx.has_lora and self.lora is not None) else None)
        y = self.ops.fused_moe(x, self.w13, self.w2, weights, ids, lora, scratch=ctx.moe_scratch)
        if self.shared is not None and self.shared_gate is not None:
            y = y + torch.sigmoid(F.linear(x, self.shared_gate)) * self.shared(x)
        return y
