"""The Triton kernels behind kernels/attention.py (contracts, launchers and references live there)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _cache_row(slot, block_size, stride_cb, stride_co):
    """Offset of a paged cache's row for token slot `slot` (int64): block slot // block_size, row slot % block_size."""
    return (slot // block_size) * stride_cb + (slot % block_size) * stride_co


@triton.jit
def _store_kv_kernel(
    # pointers
    k_ptr, v_ptr,  # [T, n_kv, D]
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, n_kv, D], same strides
    slot_ptr,  # [T] int64, -1 = skip
    # sizes
    n_kv, D, block_size,
    # strides
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_cb, stride_co, stride_ch, stride_cd,
    # meta
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < n_kv)[:, None] & (offs_d < D)[None, :]
    cache_offs = (_cache_row(slot, block_size, stride_cb, stride_co) + offs_h[:, None] * stride_ch
                  + offs_d[None, :] * stride_cd)
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd, mask=mask)
    tl.store(k_cache_ptr + cache_offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd, mask=mask)
    tl.store(v_cache_ptr + cache_offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)



@triton.jit
def _attend_step(q, acc, m_i, l_i, n0, q_pos, kv_end, k_base, v_base, head_off, table_row, offs_d, mask_d,
                 qk_scale, block_size, stride_kb, stride_ko, stride_vo, stride_d,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, PAGED: tl.constexpr, CAST_FP32: tl.constexpr,
                 DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr):
    """One BLOCK_N step of keys n0.. of the online softmax, for the query rows q (prefill: positions of one head;
    decode: the heads of one KV head). PAGED: k_base / v_base are the caches, key n of this KV head (offset
    head_off) sits in block table_row[n // block_size] (block stride stride_kb, row stride stride_ko for both
    caches); else they are a contiguous run of rows of this sequence at this KV head (key n at row n, row strides
    stride_ko / stride_vo; head_off unused). MASKED: keys from kv_end on are masked, and with CAUSAL those past
    each row's position q_pos too; without MASKED every key of the step is visible to every row (no masks on the
    scores or the loads but past D)."""
    k_pos = n0 + tl.arange(0, BLOCK_N)
    mask_n = k_pos < kv_end
    k_ptrs = k_base + offs_d[:, None] * stride_d  # [BLOCK_D, BLOCK_N] after the row offsets below
    v_ptrs = v_base + offs_d[None, :] * stride_d  # [BLOCK_N, BLOCK_D]
    if PAGED:
        if MASKED:
            blk = tl.load(table_row + k_pos // block_size, mask=mask_n, other=0).to(tl.int64)
        else:
            blk = tl.load(table_row + k_pos // block_size).to(tl.int64)
        k_off = blk * stride_kb + (k_pos % block_size) * stride_ko + head_off  # [BLOCK_N]
        v_off = k_off
    else:
        k_off = k_pos.to(tl.int64) * stride_ko
        v_off = k_pos.to(tl.int64) * stride_vo
    if MASKED:
        kt = tl.load(k_ptrs + k_off[None, :], mask=mask_n[None, :] & mask_d[:, None], other=0.0)
        vb = tl.load(v_ptrs + v_off[:, None], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    elif EVEN_D:  # every key of the step is in the context: masks only past D
        kt = tl.load(k_ptrs + k_off[None, :])
        vb = tl.load(v_ptrs + v_off[:, None])
    else:
        kt = tl.load(k_ptrs + k_off[None, :], mask=mask_d[:, None], other=0.0)
        vb = tl.load(v_ptrs + v_off[:, None], mask=mask_d[None, :], other=0.0)
    if CAST_FP32:
        kt = kt.to(tl.float32)
        vb = vb.to(tl.float32)
    s = tl.dot(q, kt, input_precision=DOT_PREC)  # unscaled: the scale rides on the exponent's FMA below
    if MASKED:
        keep = mask_n[None, :]
        if CAUSAL:
            keep = keep & (k_pos[None, :] <= q_pos[:, None])
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # running max in scaled (base-2) units; qk_scale > 0
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    # pointers
    q_ptr,  # [T, n_h, D]
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, n_kv, D], same strides
    out_ptr,  # [T, n_h, D]
    tables_ptr,  # [B, max_blocks] int32
    ctx_ptr,  # [B] int32 cached tokens including this step's
    qsl_ptr,  # [B + 1] int32 query_start_loc
    knew_ptr, vnew_ptr,  # [T, n_kv, D] this step's keys / values, row i beside query row i (NEW_KV)
    # sizes
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    block_size,
    GROUP,  # n_h // n_kv
    D,
    # strides
    stride_qt, stride_qh, stride_qd,
    stride_cb, stride_co, stride_ch, stride_cd,
    stride_ot, stride_oh, stride_od,
    stride_tb,
    stride_knt, stride_knh, stride_vnt, stride_vnh, stride_nd,
    # meta
    NEW_KV: tl.constexpr,  # this step's keys from knew / vnew, only the earlier ones through the block table
    CAST_FP32: tl.constexpr,
    DOT_PREC: tl.constexpr,  # \"ieee\" for fp32 inputs (no silent tf32), else \"tf32\" (unused by bf16/fp16)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr = False,  # BLOCK_D == D: no masks on the head dim
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    # the last query tiles see the most keys: they are dispatched first, so the short ones fill the tail
    pid_m = tl.num_programs(2) - 1 - tl.program_id(2)
    q0 = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q0
    if pid_m * BLOCK_M >= q_len:
        return  # tiles past this sequence's queries (grid is sized from the host bound)
    ctx = tl.load(ctx_ptr + b)
    kvh = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < q_len
    q_first = ctx - q_len + pid_m * BLOCK_M  # causal position of the tile's first query row
    q_pos = q_first + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    rows = (q0 + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if CAST_FP32:
        q = q.to(tl.float32)

    # Finite start for the running max: fully masked rows then give exp2(-inf) = 0, never NaN.
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    kv_head_off = kvh.to(tl.int64) * stride_ch
    table_row = tables_ptr + b.to(tl.int64) * stride_tb
    if NEW_KV:
        # The cached prefix [0, ctx - q_len) precedes every query row: through the block table, unmasked but for
        # a last partial step. This step's keys are the rows beside the queries: a causal attention of the
        # sequence's new rows with itself, in their own index j (position ctx - q_len + j), no table.
        prefix = ctx - q_len
        full = prefix // BLOCK_N * BLOCK_N
        for n0 in range(0, full, BLOCK_N):
            acc, m_i, l_i = _attend_step(q, acc, m_i, l_i, n0, q_pos, prefix, k_cache_ptr, v_cache_ptr, kv_head_off,
                                         table_row, offs_d, mask_d, qk_scale, block_size, stride_cb, stride_co,
                                         stride_co, stride_cd,
                                         False, False, True, CAST_FP32, DOT_PREC, BLOCK_N, EVEN_D)
        for n0 in range(full, prefix, BLOCK_N):  # at most one step
            acc, m_i, l_i = _attend_step(q, acc, m_i, l_i, n0, q_pos, prefix, k_cache_ptr, v_cache_ptr, kv_head_off,
                                         table_row, offs_d, mask_d, qk_scale, block_size, stride_cb, stride_co,
                                         stride_co, stride_cd,
                                         True, False, True, CAST_FP32, DOT_PREC, BLOCK_N, EVEN_D)
        k_new = knew_ptr + q0.to(tl.int64) * stride_knt + kvh * stride_knh
        v_new = vnew_ptr + q0.to(tl.int64) * stride_vnt + kvh * stride_vnh
        i_first = pid_m * BLOCK_M
        lo = (i_first + 1) // BLOCK_N * BLOCK_N
        hi = tl.minimum(q_len, i_first + BLOCK_M)
        for n0 in range(0, lo, BLOCK_N):
            acc, m_i, l_i = _attend_step(q, acc, m_i, l_i, n0, offs_m, q_len, k_new, v_new, 0, table_row, offs_d,
                                         mask_d, qk_scale, block_size, 0, stride_knt, stride_vnt, stride_nd,
                                         False, False, False, CAST_FP32, DOT_PREC, BLOCK_N, EVEN_D)
        for n0 in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _attend_step(q, acc, m_i, l_i, n0, offs_m, q_len, k_new, v_new, 0, table_row, offs_d,
                                         mask_d, qk_scale, block_size, 0, stride_knt, stride_vnt, stride_nd,
                                         True, True, False, CAST_FP32, DOT_PREC, BLOCK_N, EVEN_D)
    else:
        # keys [0, lo) precede every query row of the tile (no masks); [lo, hi) cross the diagonal, and keys past
        # the tile's last query row are masked anyway, so the loop stops there
        lo = (q_first + 1) // BLOCK_N * BLOCK_N
        hi = tl.minimum(ctx, q_first + BLOCK_M)
        for n0 in range(0, lo, BLOCK_N):
            acc, m_i, l_i = _attend_step(q, acc, m_i, l_i, n0, q_pos, ctx, k_cache_ptr, v_cache_ptr, kv_head_off,
                                         table_row, offs_d, mask_d, qk_scale, block_size, stride_cb, stride_co,
                                         stride_co, stride_cd,
                                         False, False, True, CAST_FP32, DOT_PREC, BLOCK_N, EVEN_D)
        for n0 in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _attend_step(q, acc, m_i, l_i, n0, q_pos, ctx, k_cache_ptr, v_cache_ptr, kv_head_off,
                                         table_row, offs_d, mask_d, qk_scale, block_size, stride_cb, stride_co,
                                         stride_co, stride_cd,
                                         True, True, True, CAST_FP32, DOT_PREC, BLOCK_N, EVEN_D)

    l_safe = tl.where(l_i > 0, l_i, 1.0)  # ctx 0: no keys, output 0 like the reference
    o = acc / l_safe[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :] * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _decode_kernel(
    # pointers
    q_ptr,  # [T, n_h, D]
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, n_kv, D], same strides
    out_ptr,  # [T, n_h, D] (written when not SPLIT)
    part_o_ptr,  # [B, n_h, num_splits, D] fp32 normalised partial outputs (SPLIT)
    part_ml_ptr,  # [B, n_h, num_splits, 2] fp32 (running max, sum of exp) per split (SPLIT)
    tables_ptr, ctx_ptr, qsl_ptr,
    # sizes
    qk_scale,
    block_size,
    GROUP,
    D,
    n_h,
    num_splits,
    min_partition,  # fewest keys a split takes, a multiple of BLOCK_N
    # strides
    stride_qt, stride_qh, stride_qd,
    stride_cb, stride_co, stride_ch, stride_cd,
    stride_ot, stride_oh, stride_od,
    stride_tb,
    # meta
    SPLIT: tl.constexpr,
    CAST_FP32: tl.constexpr,
    DOT_PREC: tl.constexpr,  # \"ieee\" for fp32 inputs (no silent tf32), else \"tf32\" (unused by bf16/fp16)
    BLOCK_G: tl.constexpr,  # >= GROUP and >= 16 (tl.dot's minimum)
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q0 = tl.load(qsl_ptr + b)
    if tl.load(qsl_ptr + b + 1) == q0:
        return  # q_len 0: this sequence has no query this step
    ctx = tl.load(ctx_ptr + b)
    # Keys per split from this sequence's own context (not the host bound a CUDA graph was captured
    # with), so a short context still spreads over several splits.
    partition = tl.maximum(tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N, min_partition)
    start = split * partition
    if split > 0 and start >= ctx:
        return  # the reduce reads only splits that hold keys

    offs_g = tl.arange(0, BLOCK_G)
    mask_g = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q = tl.load(q_ptr + q0.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    if CAST_FP32:
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_G,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    kv_head_off = kvh.to(tl.int64) * stride_ch
    table_row = tables_ptr + b.to(tl.int64) * stride_tb
    end = tl.minimum(ctx, start + partition)
    # the decode query is the last position: every key of this split below ctx is visible (no causal mask)
    for n0 in range(start, end, BLOCK_N):
        acc, m_i, l_i = _attend_step(q, acc, m_i, l_i, n0, None, end, k_cache_ptr, v_cache_ptr, kv_head_off, table_row,
                                     offs_d, mask_d, qk_scale, block_size, stride_cb, stride_co, stride_co, stride_cd,
                                     True, False, True, CAST_FP32, DOT_PREC, BLOCK_N, False)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if SPLIT:
        row = (b.to(tl.int64) * n_h + heads) * num_splits + split  # [BLOCK_G]
        tl.store(part_o_ptr + row[:, None] * D + offs_d[None, :], o, mask=mask_g[:, None] & mask_d[None, :])
        tl.store(part_ml_ptr + row * 2, m_i, mask=mask_g)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=mask_g)
    else:
        tl.store(out_ptr + q0.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])



@triton.jit
def _decode_reduce_kernel(
    part_o_ptr, part_ml_ptr,  # as written by _decode_kernel
    out_ptr, ctx_ptr, qsl_ptr,
    D, n_h, num_splits, block_n, min_partition,  # as given to _decode_kernel
    stride_ot, stride_oh, stride_od,
    BLOCK_S: tl.constexpr,  # >= num_splits
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    q0 = tl.load(qsl_ptr + b)
    if tl.load(qsl_ptr + b + 1) == q0:
        return
    ctx = tl.load(ctx_ptr + b)
    partition = tl.maximum(tl.cdiv(tl.cdiv(ctx, num_splits), block_n) * block_n, min_partition)
    n_valid = tl.maximum(tl.cdiv(ctx, partition), 1)  # split 0 always wrote (zeros when ctx is 0)
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < n_valid
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    row = (b.to(tl.int64) * n_h + h) * num_splits + offs_s
    m = tl.load(part_ml_ptr + row * 2, mask=mask_s, other=-1.0e30)
    l = tl.load(part_ml_ptr + row * 2 + 1, mask=mask_s, other=0.0)
    o = tl.load(part_o_ptr + row[:, None] * D + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    w = l * tl.exp2(m - tl.max(m, 0))  # each split's share of the softmax denominator
    total = tl.sum(w, 0)
    res = tl.sum(w[:, None] * o, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + q0.to(tl.int64) * stride_ot + h * stride_oh + offs_d * stride_od,
             res.to(out_ptr.dtype.element_ty), mask=mask_d)
