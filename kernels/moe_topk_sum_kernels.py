"""The fused MoE's last launch (launcher: kernels/fused_moe.py).

    _topk_sum_kernel  y[t] = sum_j ypair[t, j] (+ shared_down_B u[t]), fixed order: deterministic
"""

from __future__ import annotations

import triton
import triton.language as tl

from lorax.kernels._common import pdl_wait


@triton.jit
def _topk_sum_kernel(
    # pointers
    ypair_ptr,  # [T*k, H] per-pair outputs (rows of sentinel pairs were never written)
    topk_ids_ptr,  # [T, k] int32
    y_ptr,  # [T, H] out
    token_slot_ptr, zdw_ptr, sh_b_ptr,  # HAS_SHARED: [T], [T*k, BLOCK_R] fp32, [S, H, R]
    # sizes
    T, E, H, S, R,
    stride_ym, stride_om, stride_ss, stride_sh, stride_sr,
    # meta
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_SHARED: tl.constexpr, CAST_FP32: tl.constexpr, DOT_PREC: tl.constexpr,
    USE_PDL: tl.constexpr,
    TOPK: tl.constexpr,
    K_P2: tl.constexpr,  # TOPK rounded up to a power of two
):
    # deterministic top-k reduction (fixed j order, fp32), plus the shared-outer down expand once per token
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_t = offs_t < T
    mask_h = offs_h < H
    offs_t64 = offs_t.to(tl.int64)
    # the layer's inputs (ids, slots) are read while the down GEMM still runs; ypair after the wait
    offs_j = tl.arange(0, K_P2)
    ids = tl.load(topk_ids_ptr + offs_t64[:, None] * TOPK + offs_j[None, :],
                  mask=mask_t[:, None] & (offs_j < TOPK)[None, :], other=-1)
    slot = tl.load(token_slot_ptr + offs_t, mask=mask_t, other=-1)  # (without LoRA: any int32 [>= T])
    pdl_wait(USE_PDL)
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    offs_r = tl.arange(0, BLOCK_R)
    u = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
    for j in tl.static_range(TOPK):  # unrolled: the k row loads are independent, all in flight together
        e = tl.sum(tl.where(offs_j[None, :] == j, ids, 0), axis=1)  # column j of the ids tile
        valid = (e >= 0) & (e < E)
        row = offs_t64 * TOPK + j
        acc += tl.load(ypair_ptr + row[:, None] * stride_ym + offs_h[None, :],
                       mask=valid[:, None] & mask_h[None, :], other=0.0, eviction_policy="evict_first").to(tl.float32)
        if HAS_SHARED:
            u += tl.load(zdw_ptr + row[:, None] * BLOCK_R + offs_r[None, :], mask=(valid & (slot >= 0))[:, None],
                         other=0.0)
    if HAS_SHARED:
        b_off = offs_h[None, :] * stride_sh + offs_r[:, None] * stride_sr
        for s in range(0, S):
            in_s = slot == s
            if tl.max(in_s.to(tl.int32), axis=0) > 0:
                sb = tl.load(sh_b_ptr + s * stride_ss + b_off, mask=(offs_r[:, None] < R) & mask_h[None, :],
                             other=0.0)
                us = tl.where(in_s[:, None], u, 0.0)
                if CAST_FP32:
                    sb = sb.to(tl.float32)
                else:
                    us = us.to(sb.dtype)
                acc = tl.dot(us, sb, acc, input_precision=DOT_PREC)
    tl.store(y_ptr + offs_t64[:, None] * stride_om + offs_h[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_t[:, None] & mask_h[None, :])
