"""The Triton kernels behind kernels/lora_sgemm.py (contracts, launchers and references live there)."""

from __future__ import annotations

import triton
import triton.language as tl

from lorax.kernels._common import pdl_trigger, pdl_wait


@triton.jit
def _shrink_rows(x_ptr, a_ptr, tok, slot, slice_idx, mask_m, mask_r, k_lo, k_hi, R,
                 stride_xt, stride_xk, stride_as, stride_ar, stride_ak,
                 CAST_FP32: tl.constexpr, DOT_PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """x[tok, k_lo:k_hi] @ A[slot, slice rows, k_lo:k_hi]^T in fp32: [BLOCK_M, BLOCK_R]."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    x_ptrs = x_ptr + tok[:, None] * stride_xt + (k_lo + offs_k)[None, :] * stride_xk
    a_rows = (slice_idx * R + offs_r).to(tl.int64)
    a_ptrs = (a_ptr + slot.to(tl.int64) * stride_as + a_rows[None, :] * stride_ar
              + (k_lo + offs_k)[:, None] * stride_ak)  # [BLOCK_K, BLOCK_R]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        mask_k = offs_k < k_hi - k0
        xb = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        ab = tl.load(a_ptrs, mask=mask_r[None, :] & mask_k[:, None], other=0.0)
        if CAST_FP32:
            xb = xb.to(tl.float32)
            ab = ab.to(tl.float32)
        acc += tl.dot(xb, ab, input_precision=DOT_PREC)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    return acc


@triton.jit
def _lora_shrink_kernel(
    # pointers
    x_ptr,  # [T, K] activations
    a_ptr,  # [S, N_SLICES * R, K] LoRA A slab
    z_ptr,  # [SPLIT_K, T, N_SLICES * R] fp32 partial sums, row = position in sorted order
    sorted_ptr,  # [T] int32 token rows sorted by slot
    seg_start_ptr,  # [S] int32
    seg_len_ptr,  # [S] int32
    slot_rank_ptr,  # [S] int32 (read only when HAS_RANK)
    # sizes
    K,
    R,  # rank stride between slices (the slab's max rank)
    k_per_split,  # K columns per split, a multiple of BLOCK_K
    # strides
    stride_xt, stride_xk,
    stride_as, stride_ar, stride_ak,
    stride_zs, stride_zt, stride_zr,
    # meta
    SPLIT_K: tl.constexpr,  # K is cut into SPLIT_K ranges, each written to its own z slab (no atomics)
    HAS_RANK: tl.constexpr,
    CAST_FP32: tl.constexpr,  # interpreter: bf16 tl.dot is wrong there
    DOT_PREC: tl.constexpr,  # "ieee" for fp32 inputs (no silent tf32), else "tf32" (unused by bf16/fp16)
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,  # next power of two >= R, >= 16
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # the launch before (the base GEMM writing y) is finished before any program lets the expand in
    pdl_wait(USE_PDL)
    pdl_trigger(USE_PDL)
    slot = tl.program_id(0)
    pid_m = tl.program_id(1)
    slice_idx = tl.program_id(2) // SPLIT_K
    split = tl.program_id(2) % SPLIT_K
    seg_len = tl.load(seg_len_ptr + slot)
    seg_start = tl.load(seg_start_ptr + slot)  # beside seg_len: one round trip for both
    rank = R
    if HAS_RANK:
        rank = tl.minimum(tl.load(slot_rank_ptr + slot), R)
    if pid_m * BLOCK_M >= seg_len:
        return  # empty segment or rows past it: exit before loading any tile

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seg_len
    tok = tl.load(sorted_ptr + seg_start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank

    k_lo = split * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    acc = _shrink_rows(x_ptr, a_ptr, tok, slot, slice_idx, mask_m, mask_r, k_lo, k_hi, R,
                       stride_xt, stride_xk, stride_as, stride_ar, stride_ak,
                       CAST_FP32, DOT_PREC, BLOCK_M, BLOCK_R, BLOCK_K)

    pos = (seg_start + offs_m).to(tl.int64)
    z_ptrs = z_ptr + split * stride_zs + pos[:, None] * stride_zt + (slice_idx * R + offs_r)[None, :] * stride_zr
    tl.store(z_ptrs, acc, mask=mask_m[:, None] & (offs_r < R)[None, :])



@triton.jit
def _lora_expand_kernel(
    # pointers
    x_ptr,  # [T, K] activations (read only when SHRINK_INLINE)
    a_ptr,  # [S, N_SLICES * R, K] (read only when SHRINK_INLINE)
    z_ptr,  # [SPLIT_K, T, N_SLICES * R] fp32 from the shrink launch, or (Z_BY_TOKEN) the caller's z
    b_ptr,  # [S, N_out, R] LoRA B slab
    y_ptr,  # [T, N_out] updated in place (ACCUMULATE), else out: the delta alone, adapter rows only
    tiles_ptr,  # [n_tiles, 3] int32: (slice, first column, slice end column)
    sorted_ptr, seg_start_ptr, seg_len_ptr, slot_rank_ptr,
    # sizes
    K,
    R,
    z_slot_cols,  # z columns per slot: 0 for the shrink's z (one block per slice), N_SLICES * R for a given z
    # strides
    stride_xt, stride_xk,
    stride_as, stride_ar, stride_ak,
    stride_zs, stride_zt, stride_zr,
    stride_bs, stride_bn, stride_br,
    stride_yt, stride_yn,
    # meta
    SPLIT_K: tl.constexpr,  # z slabs to sum (deterministic split-K of the shrink)
    SHRINK_INLINE: tl.constexpr,
    Z_BY_TOKEN: tl.constexpr,  # z rows are token rows (a z the caller computed), else sorted positions
    HAS_RANK: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    CAST_FP32: tl.constexpr,
    DOT_PREC: tl.constexpr,  # "ieee" for fp32 inputs (no silent tf32), else "tf32" (unused by bf16/fp16)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,  # split schedule: the shrink may still run until pdl_wait (before z is read)
):
    slot = tl.program_id(0)
    pid_m = tl.program_id(1)
    tile = tl.program_id(2)
    # every scalar in one round trip (none depends on another), then the token rows, then z and y together:
    # at decode sizes this kernel is a chain of dependent loads, not work
    seg_len = tl.load(seg_len_ptr + slot)
    seg_start = tl.load(seg_start_ptr + slot)
    slice_idx = tl.load(tiles_ptr + tile * 3)
    n0 = tl.load(tiles_ptr + tile * 3 + 1)
    n_end = tl.load(tiles_ptr + tile * 3 + 2)
    rank = R
    if HAS_RANK:
        rank = tl.minimum(tl.load(slot_rank_ptr + slot), R)
    if pid_m * BLOCK_M >= seg_len:
        return
    slot64 = slot.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seg_len
    tok = tl.load(sorted_ptr + seg_start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank

    # z [BLOCK_M, BLOCK_R] fp32: this slice's shrink for the tile's rows (read from the shrink launch below)
    if SHRINK_INLINE:
        z = _shrink_rows(x_ptr, a_ptr, tok, slot, slice_idx, mask_m, mask_r, 0, K, R,
                         stride_xt, stride_xk, stride_as, stride_ar, stride_ak,
                         CAST_FP32, DOT_PREC, BLOCK_M, BLOCK_R, BLOCK_K)
    # B [BLOCK_R, BLOCK_N] first: it does not depend on the shrink, so with PDL it loads while that runs
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_end
    b_ptrs = b_ptr + slot64 * stride_bs + offs_n[None, :].to(tl.int64) * stride_bn + offs_r[:, None] * stride_br
    bt = tl.load(b_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    y_ptrs = y_ptr + tok[:, None] * stride_yt + offs_n[None, :] * stride_yn
    mask = mask_m[:, None] & mask_n[None, :]
    if not SHRINK_INLINE:
        pdl_wait(USE_PDL)
        if Z_BY_TOKEN:
            row = tok
        else:
            row = (seg_start + offs_m).to(tl.int64)
        z_cols = slot64 * z_slot_cols + slice_idx * R + offs_r
        z_ptrs = z_ptr + row[:, None] * stride_zt + z_cols[None, :] * stride_zr
        z = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for ks in tl.static_range(SPLIT_K):
            z += tl.load(z_ptrs + ks * stride_zs, mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
    if ACCUMULATE:  # y (written by the launch before) is read beside z, before the dot that needs z
        y_old = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    z = tl.where(mask_r[None, :], z, 0.0)  # ranks past slot_rank contribute nothing
    if CAST_FP32:
        delta = tl.dot(z, bt.to(tl.float32), input_precision=DOT_PREC)
    else:
        delta = tl.dot(z.to(bt.dtype), bt, input_precision=DOT_PREC)
    if ACCUMULATE:
        delta += y_old
    tl.store(y_ptrs, delta.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lora_add_kernel(
    y_ptr,  # [T, N] updated in place on adapter rows
    d_ptr,  # [T, N] delta, defined on adapter rows only
    token_slot_ptr,  # [T] int32; rows with slot outside [0, S) are left untouched
    T, N, S,
    stride_yt, stride_yn, stride_dt,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(token_slot_ptr + offs_t, mask=offs_t < T, other=-1)
    rows = (offs_t < T) & (slot >= 0) & (slot < S)
    mask = rows[:, None] & (offs_n < N)[None, :]
    t64 = offs_t.to(tl.int64)[:, None]
    y_ptrs = y_ptr + t64 * stride_yt + offs_n[None, :] * stride_yn
    d = tl.load(d_ptr + t64 * stride_dt + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + d).to(y_ptr.dtype.element_ty), mask=mask)
