"""Linear layers with a multi-LoRA hook (fused projections: qkv, gate_up, and single ones: o, down).

A `LoraLinear` holds one fused weight `[out_total, in]` made of `slices` side by side (q|k|v or
gate|up) and, once the LoRA pool attaches it, references to this layer's slab in the pool:

    lora_A  [S, n_slices * R, in]   slice i's A in rows [i*R, (i+1)*R), zero past the adapter's rank
    lora_B  [S, out_total, R]       slice i's B in rows [offsets[i], offsets[i+1])

(the `lora_linear` contract in kernels/lora_sgemm.py). The slab is allocated once (`alloc_lora`) and
updated in place by the pool, so a captured graph keeps seeing the right adapters. When the pool's A rows
are small beside the weight (`stacked_rows`), A lives under the weight in one buffer
[out_total + S * n_slices * R, in] (`weight` and `lora_A` are views of it) and one GEMM computes the base
output and the shrink together (`linear_stacked`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorax.inference.context import get_forward_context
from lorax.kernels.lora_stacked import linear_stacked, stacked_rows
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
        # [W; A] and [bias; 0] when A is stacked under the weight (alloc_lora), else None
        self._w_cat: torch.Tensor | None = None
        self._b_cat: torch.Tensor | None = None

    def alloc_lora(self, S: int, R: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Allocate (zeroed) and attach this layer's pool slab; returns (lora_A, lora_B).

        A is stacked under the weight when `stacked_rows` says so: the weight (and bias) move into one
        buffer with A's rows below them, and `self.weight` / `lora_A` become views of it, so weights
        loaded later with `weight.copy_` land in the right place.
        """
        w = self.weight
        n = len(self.slices)
        dt, dev = w.dtype, w.device
        B = torch.zeros(S, self.out_features, R, dtype=dt, device=dev)
        rows = stacked_rows(self.out_features, S, n, R)
        if not rows:
            self._w_cat = self._b_cat = None
            A = torch.zeros(S, n * R, self.in_features, dtype=dt, device=dev)
        else:
            w_cat = torch.zeros(self.out_features + rows, self.in_features, dtype=dt, device=dev)
            w_cat[: self.out_features].copy_(w.data)
            w.data = w_cat[: self.out_features]
            self._w_cat = w_cat
            if self.bias is not None:
                b_cat = torch.zeros(self.out_features + rows, dtype=dt, device=dev)
                b_cat[: self.out_features].copy_(self.bias.data)
                self.bias.data = b_cat[: self.out_features]
                self._b_cat = b_cat
            A = w_cat[self.out_features :].view(S, n * R, self.in_features)
        self.lora_A, self.lora_B = A, B
        return A, B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_A is None or self.lora_B is None:
            return F.linear(x, self.weight, self.bias)
        ctx = get_forward_context()
        if not ctx.has_lora:
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, self.in_features)  # [T, in]: one row per token of the step
        if self._w_cat is not None:
            y = linear_stacked(
                self.ops.lora_linear, x2, self._w_cat, self.lora_B, self.slice_offsets, ctx.token_slot,
                bias_cat=self._b_cat, batch=ctx.lora_batch, slot_rank=ctx.slot_rank,
            )
            return y.view(*x.shape[:-1], self.out_features)
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
