"""Fused MoE: grouped GEMMs over tokens aligned by expert, with optional LoRA deltas.

Contract of `fused_moe` (Triton) and `fused_moe_ref`:

    x             [T, H]        activations (bf16/fp16/fp32)
    w13           [E, 2I, H]    gate rows [0, I), up rows [I, 2I)   (transformers' gate_up_proj layout)
    w2            [E, H, I]
    topk_weights  [T, k] float  routing weights (already renormalised if the model does so)
    topk_ids      [T, k] int32  expert ids; negative = sentinel (expert not on this rank): no contribution
    lora          MoELoraArgs | None
    returns       [T, H] = sum_j w[t,j] * (W2[e] silu_and_mul(W13[e] x_t + dgu) + ddown)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorax.kernels.moe_align import virtual_expert_ids_ref
from lorax.kernels.moe_lora import MoELoraArgs, moe_lora_down_ref, moe_lora_gate_up_ref


def silu_and_mul(h: torch.Tensor) -> torch.Tensor:
    inter = h.shape[-1] // 2
    return F.silu(h[..., :inter]) * h[..., inter:]


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    lora: MoELoraArgs | None = None,
) -> torch.Tensor:
    T, k = topk_ids.shape
    E = w13.shape[0]
    flat = topk_ids.reshape(-1).long()
    h = torch.zeros(T * k, w13.shape[1], dtype=x.dtype, device=x.device)
    for e in range(E):
        pairs = (flat == e).nonzero(as_tuple=True)[0]
        if pairs.numel():
            h[pairs] = x[pairs // k] @ w13[e].T
    vid = None
    if lora is not None:
        vid = virtual_expert_ids_ref(topk_ids, lora.token_slot, E)
        moe_lora_gate_up_ref(x, vid, lora, h)
    a = silu_and_mul(h)  # [T*k, I]
    w = topk_weights.reshape(-1, 1).to(torch.float32)
    y = torch.zeros(T, w2.shape[1], dtype=torch.float32, device=x.device)
    for e in range(E):
        pairs = (flat == e).nonzero(as_tuple=True)[0]
        if pairs.numel():
            y.index_add_(0, pairs // k, w[pairs] * (a[pairs] @ w2[e].T).float())
    if lora is not None and vid is not None:
        moe_lora_down_ref(a, vid, topk_weights, lora, y)
    return y.to(x.dtype)
