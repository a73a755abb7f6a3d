"""The MoE router's top-k: softmax over the experts, the k largest, optional renormalisation, one launch.

`router_topk(logits, top_k, renormalize, round_weights)` -> (weights [T, k] fp32, ids [T, k] int32):
    logits [T, E] (the router GEMM's output, any row stride); probabilities softmax(logits) in fp32; the k
    largest in descending order (ties: the lower expert id first); with renormalize they are divided by
    their sum; with round_weights they pass through logits.dtype and back (the Qwen / OLMoE routers cast
    their weights to the model dtype; Mixtral keeps fp32).
Replaces softmax, topk, sum, div and three casts (seven launches) by one; T programs of E lanes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def router_topk_ref(
    logits: torch.Tensor, top_k: int, renormalize: bool, round_weights: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if round_weights:
        weights = weights.to(logits.dtype).float()
    return weights, ids.to(torch.int32)


@triton.jit
def _router_topk_kernel(
    logits_ptr, w_ptr, ids_ptr,
    E, stride_l,
    K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, RENORM: tl.constexpr, ROUND: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    mask = offs < E
    x = tl.load(logits_ptr + t * stride_l + offs, mask=mask, other=float("-inf")).to(tl.float32)
    e = tl.where(mask, tl.exp(x - tl.max(x, axis=0)), 0.0)
    p = tl.where(mask, e / tl.sum(e, axis=0), -1.0)  # (probabilities are >= 0: -1 is never picked)
    offs_k = tl.arange(0, BLOCK_K)
    wk = tl.zeros([BLOCK_K], dtype=tl.float32)
    ik = tl.zeros([BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.max(p, axis=0)
        idx = tl.min(tl.where(p == best, offs, BLOCK_E), axis=0)
        wk = tl.where(offs_k == j, best, wk)
        ik = tl.where(offs_k == j, idx, ik)
        p = tl.where(offs == idx, -1.0, p)
    if RENORM:
        wk = wk / tl.sum(wk, axis=0)  # (lanes past K hold 0)
    if ROUND:
        wk = wk.to(logits_ptr.dtype.element_ty).to(tl.float32)
    mk = offs_k < K
    tl.store(w_ptr + t * K + offs_k, wk, mask=mk)
    tl.store(ids_ptr + t * K + offs_k, ik, mask=mk)


def router_topk(
    logits: torch.Tensor, top_k: int, renormalize: bool, round_weights: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `router_topk`: one program per token."""
    if logits.dim() != 2 or logits.stride(1) != 1 or not 0 < top_k <= logits.shape[1]:
        raise ValueError(f"router_topk: logits must be [T, E] with unit column stride and 0 < top_k <= E, "
                         f"got {tuple(logits.shape)} strides {logits.stride()}, top_k {top_k}")
    T, E = logits.shape
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=logits.device)
    if T:
        block_e = triton.next_power_of_2(E)
        _router_topk_kernel[(T,)](
            logits, weights, ids, E, logits.stride(0),
            K=top_k, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k), RENORM=renormalize,
            ROUND=round_weights, num_warps=max(1, min(4, block_e // 128)),
        )
    return weights, ids
