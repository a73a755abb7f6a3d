"""Linear layers with a multi-LoRA hook (fused projections: qkv, gate_up, and single ones: o, down).

A `LoraLinear` holds one fused weight `[out_total, in]` made of `slices` side by side (q|k|v or
gate|up) and, once the LoRA pool attaches it, references to this layer's slab in the pool:

    lora_A  [S, n_slices * R, in]   slice i's A in rows [i*R, (i+1)*R), zero past the adapter's rank
    lora_B  [S, out_total, R]       slice i's B in rows [offsets[i], offsets[i+1])

(the `lora_linear` contract in kernels/lora_sgemm.py). The slab is allocated once and updated in place
by the pool, so a captured graph keeps seeing the right adapters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorax.inference.context import get_forward_context
from lorax.kernels.registry import KernelOps


class LoraLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        slices: tuple[int, ...],
        ops: KernelOps,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.slices = slices
        offsets = [0]
        for size in slices:
            offsets.append(offsets[-1] + size)
        self.slice_offsets: tuple[int, ...] = tuple(offsets)
        self.out_features = offsets[-1]
        self.ops = ops
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features, dtype=dtype, device=device), False)
        self.bias = (
            nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device), False) if bias else None
        )
        self.lora_A: torch.Tensor | None = None  # [S, n_slices * R, in]
        self.lora_B: torch.Tensor | None = None  # [S, out_total, R]

    def set_lora(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        self.lora_A, self.lora_B = lora_A, lora_B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_A is None or self.lora_B is None:
            return F.linear(x, self.weight, self.bias)
        ctx = get_forward_context()
        if not ctx.has_lora:
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, self.in_features)  # [T, in]: one row per token of the step
        y = x2.new_empty(x2.shape[0], self.out_features)
        # the base GEMM goes to the op as a callable, so that the Triton op can run the LoRA shrink beside it
        self.ops.lora_linear(
            x2, y, self.lora_A, self.lora_B, self.slice_offsets, ctx.token_slot,
            batch=ctx.lora_batch, slot_rank=ctx.slot_rank, base=lambda: self._base(x2, y),
        )
        return y.view(*x.shape[:-1], self.out_features)

    def _base(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.bias is None:
            torch.mm(x, self.weight.t(), out=y)
        else:
            torch.addmm(self.bias, x, self.weight.t(), out=y)
