"""Dense SwiGLU MLP (dense layers, dense models, and the Qwen2-MoE shared expert), with LoRA hooks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorax.inference.layers.linear import LoraLinear
from lorax.kernels.registry import KernelOps


class GatedMLP(nn.Module):
    def __init__(
        self,
        hidden: int,
        inter: int,
        ops: KernelOps,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.inter = inter
        self.gate_up = LoraLinear(hidden, (inter, inter), ops, bias, dtype, device)  # gate rows first
        self.down = LoraLinear(inter, (hidden,), ops, bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up(x)
        return self.down(F.silu(h[:, : self.inter]) * h[:, self.inter :])
