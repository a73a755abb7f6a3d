"""The fused MoE's down GEMM (launcher, configs and contract: kernels/fused_moe.py).

    _down_kernel   ypair = w * (act W2^T + down_B z_d), z_d summed from the gate_up kernel's partials, or
                   (LORA_K) K steps over the stacked z_d in act's extra columns
Blocks past the device-side num_padded, and padding rows (pair id == N), do nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lorax.kernels._common import here, pdl_trigger, pdl_wait, wait_count
from lorax.kernels.fused_moe_kernels import _block_rows
from lorax.kernels.moe_lora_tiles import (
    _first_group,
    _k_step_columns,
    _load_b,
    _present,
    _stack,
    _stacked_b,
)


@triton.jit
def _sum_partials(ptrs, row_mask, offs_t, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr, STRIDE_T: tl.constexpr,
                  NT: tl.constexpr, NT_CHUNK: tl.constexpr):
    """sum over t < NT of ptrs[:, t, :] ([BLOCK_M, NT_CHUNK, WIDTH] pointers at t = 0..NT_CHUNK-1).

    Few chunks: unrolled, so the loads are independent and in flight together (a runtime loop would
    pay one memory latency per chunk); many chunks (wide I, e.g. Mixtral): a loop, to bound code size
    and registers.
    """
    acc = tl.zeros([BLOCK_M, WIDTH], dtype=tl.float32)
    if NT <= 8 * NT_CHUNK:
        for t0 in tl.static_range(0, NT, NT_CHUNK):
            m = row_mask & ((t0 + offs_t) < NT)[None, :, None]
            acc += tl.sum(tl.load(ptrs + t0 * STRIDE_T, mask=m, other=0.0), axis=1)
    else:
        for t0 in range(0, NT, NT_CHUNK):
            m = row_mask & ((t0 + offs_t) < NT)[None, :, None]
            acc += tl.sum(tl.load(ptrs + t0 * STRIDE_T, mask=m, other=0.0), axis=1)
    return acc


@triton.jit
def _down_expand_group(acc, zs, sel, db, CAST_FP32: tl.constexpr, DOT_PREC: tl.constexpr):
    """One slot group of the down expand: acc += z_d(stacked: zs masked to each row's own column block by sel)
    down_B(stacked, db: [SG*BLOCK_R, BLOCK_N])."""
    if CAST_FP32:
        db = db.to(tl.float32)
    return tl.dot(tl.where(sel, zs, 0.0).to(db.dtype), db, acc, input_precision=DOT_PREC)


@triton.jit
def _down_kernel(
    # pointers
    act_ptr,  # [N, I]
    w2_ptr,  # [E, H, I]
    ypair_ptr,  # [N, H] out: w * (W2 a + down_B z_d) per pair, summed over k later
    topk_w_ptr,  # [N] routing weights
    sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
    row_slot_ptr,  # [max_padded] int32 (LoRA): the adapter slot of each aligned row
    zdp_ptr,  # [N, NT_GU, BLOCK_R] fp32 down-shrink partials (LoRA)
    d_b_ptr,  # [S, E, H, R] (LoRA)
    zdw_ptr,  # [N, BLOCK_R] fp32 out: w * z_d, for the shared-outer expand (HAS_SHARED)
    act_ready_ptr, zd_ready_ptr,  # [max_blocks] int32 (WAIT_READY): I tiles of act, down-shrink parts of z_d stored
    # sizes
    N, TOPK, H, I, S, R,
    nt_gu, shrink_parts,  # (WAIT_READY) the counts at which a block's act and z_d are complete
    # strides
    stride_am, stride_we, stride_wn, stride_wk, stride_ym,
    stride_bs, stride_be, stride_bn, stride_br,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_SHARED: tl.constexpr, BLOCK_R: tl.constexpr,
    NT_GU: tl.constexpr,  # I tiles of the gate_up kernel = down-shrink partials per pair
    NT_CHUNK: tl.constexpr,  # partials per vector load (the loop over chunks is unrolled)
    SG: tl.constexpr,
    EVEN_K: tl.constexpr, CAST_FP32: tl.constexpr, DOT_PREC: tl.constexpr,
    USE_PDL: tl.constexpr,
    LORA_K: tl.constexpr = False,  # LoRA K step mode: act's columns [I, I + width*BLOCK_R) hold z_d stacked
    PREFETCH: tl.constexpr = False,  # epilogue path: slot group 0's down_B tiles issued before the main loop
    ONE_GROUP: tl.constexpr = False,  # epilogue path, S <= SG: the slots take one group (no loop)
    HOIST_Z: tl.constexpr = 0,  # epilogue path: NT_GU rounded up to a power of two when the z_d partials are
    # issued before the main loop (held in registers across it), else 0
    WAIT_READY: tl.constexpr = False,  # LORA_K with PDL: wait per block on the counters, not for the grids
    COMPACT: tl.constexpr = False,  # the slots grouped (epilogue) or z_d stacked (LORA_K) by the block's own slots
    SP: tl.constexpr = 1,  # COMPACT: a power of two >= S
):
    # the alignment (and the token slots) were written two or more launches back: read before the wait
    num_pid_n = tl.cdiv(H, BLOCK_N)
    ok, expert, rows, pid_n, slot, pid_m = _block_rows(tl.program_id(0), sorted_ids_ptr, block_expert_ptr,
                                                       num_padded_ptr, row_slot_ptr, num_pid_n, N, GROUP_M, BLOCK_M,
                                                       HAS_LORA)
    mask_m = rows < N
    rows64 = rows.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < H
    if HAS_LORA and not LORA_K:
        # the epilogue stacks SG slots per dot: a block whose slots fit the first group takes it alone
        # (moe_lora_tiles._first_group), the others (past one group) take one slot at a time. With PREFETCH,
        # the first group's down_B tiles are issued while the gate_up kernel still runs (they do not come
        # from it)
        has = slot >= 0
        offs_q = tl.arange(0, SG * BLOCK_R)
        q_s = offs_q // BLOCK_R
        q_r = offs_q % BLOCK_R
        key0, n0, s_q0 = _first_group(slot, S, BLOCK_M, SG, BLOCK_R, SP, COMPACT)
        if PREFETCH:
            db0 = _load_b(d_b_ptr, expert, offs_n, s_q0, q_r, _present(key0[:, None] == q_s[None, :], q_r, R),
                          mask_n & ok, stride_bs, stride_be, stride_bn, stride_br)
    if WAIT_READY:
        # the block's act is complete once the gate_up kernel counted all its I tiles (this launch starts when
        # every down-shrink program, hence every gate_up program, has started: the counts will come)
        pdl_trigger(USE_PDL)
        if ok:
            wait_count(act_ready_ptr + pid_m, nt_gu)
    else:
        pdl_wait(USE_PDL)
        pdl_trigger(USE_PDL)
    if ok:
        offs_k = tl.arange(0, BLOCK_K)
        if HAS_LORA and not LORA_K and HOIST_Z > 0:
            # the rows' own z_d partials (narrow: [BLOCK_M, NT_GU, BLOCK_R]), in flight during the main loop
            offs_t = tl.arange(0, HOIST_Z)
            offs_r = tl.arange(0, BLOCK_R)
            z_parts = tl.load(zdp_ptr + rows64[:, None, None] * (NT_GU * BLOCK_R) + offs_t[None, :, None] * BLOCK_R
                              + offs_r[None, None, :], mask=has[:, None, None] & (offs_t < NT_GU)[None, :, None],
                              other=0.0)
        a_ptrs = act_ptr + rows64[:, None] * stride_am + offs_k[None, :]
        w_ptrs = (w2_ptr + expert.to(tl.int64) * stride_we
                  + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk)  # [BLOCK_K, BLOCK_N]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            if EVEN_K:
                at = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
                wt = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
            else:
                mask_k = offs_k < I - k0
                at = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                wt = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if CAST_FP32:
                at = at.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(at, wt, acc, input_precision=DOT_PREC)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
        w = tl.load(topk_w_ptr + rows, mask=mask_m, other=0.0).to(tl.float32)
        if HAS_LORA and LORA_K:
            # LoRA K step: y += z_d(stacked by slot) down_B(stacked by slot), S*BLOCK_R more K columns
            if tl.max((slot >= 0).to(tl.int32), axis=0) > 0:
                if WAIT_READY:  # every down-shrink part of this block has stored its z_d
                    wait_count(zd_ready_ptr + pid_m, shrink_parts)
                cslot, KW = _k_step_columns(slot, S, BLOCK_M, BLOCK_R, SP, COMPACT)
                z_rows = act_ptr + rows64[:, None] * stride_am + I
                b_cols = d_b_ptr + expert.to(tl.int64) * stride_be + offs_n[None, :] * stride_bn
                for j0 in range(0, KW, BLOCK_K):
                    j = j0 + offs_k
                    zt = tl.load(z_rows + j[None, :], mask=mask_m[:, None] & (j < KW)[None, :], other=0.0,
                                 cache_modifier=".cg")  # (written by a launch still running: not from L1)
                    db_ptrs, m_db = _stacked_b(b_cols, j, KW, R, mask_n, stride_bs, stride_br, BLOCK_R, cslot, COMPACT)
                    db = tl.load(db_ptrs, mask=m_db, other=0.0)
                    if CAST_FP32:
                        zt = zt.to(tl.float32)
                        db = db.to(tl.float32)
                    acc = tl.dot(zt, db, acc, input_precision=DOT_PREC)
        elif HAS_LORA:  # noqa: SIM102 - a constexpr test, then a runtime one
            if tl.max(has.to(tl.int32), axis=0) > 0:  # blocks without adapter rows skip it all
                # z_d: each row's own partials summed (narrow), then stacked by key in registers, one dot per
                # slot group
                offs_r = tl.arange(0, BLOCK_R)
                if HOIST_Z > 0:
                    zd = tl.sum(z_parts, axis=1)
                else:
                    offs_t = tl.arange(0, NT_CHUNK)
                    zd = _sum_partials(zdp_ptr + rows64[:, None, None] * (NT_GU * BLOCK_R)
                                       + offs_t[None, :, None] * BLOCK_R + offs_r[None, None, :],
                                       has[:, None, None], offs_t, BLOCK_M, BLOCK_R, BLOCK_R, NT_GU, NT_CHUNK)
                zs = _stack(zd, BLOCK_M, SG, BLOCK_R)
                if ONE_GROUP:
                    first = True
                else:
                    first = n0 <= SG
                if first:  # the one group (ONE_GROUP), or the block's own slots in one group
                    sel = key0[:, None] == q_s[None, :]
                    if PREFETCH:
                        db = here(db0, not CAST_FP32)  # (its copy to shared memory here, not at the load)
                    else:
                        db = _load_b(d_b_ptr, expert, offs_n, s_q0, q_r, _present(sel, q_r, R), mask_n, stride_bs,
                                     stride_be, stride_bn, stride_br)
                    acc = _down_expand_group(acc, zs, sel, db, CAST_FP32, DOT_PREC)
                if not ONE_GROUP:
                    # the blocks whose slots do not fit one group (rare): one slot at a time, whose narrow tiles
                    # keep this loop's registers below the rest of the kernel's (stacked groups here spilled)
                    offs_rr = tl.arange(0, BLOCK_R)
                    for s in range(0, tl.where(first, 0, S)):
                        own = slot == s
                        if tl.max(own.to(tl.int32), axis=0) > 0:
                            db = _load_b(d_b_ptr, expert, offs_n, offs_rr * 0 + s, offs_rr, offs_rr < R, mask_n,
                                         stride_bs, stride_be, stride_bn, stride_br)
                            acc = _down_expand_group(acc, zd, own[:, None], db, CAST_FP32, DOT_PREC)
                if HAS_SHARED:  # noqa: SIM102 - a constexpr test, then a runtime one
                    if pid_n == 0:  # w * z_d per pair for the shared-outer expand in the top-k sum
                        tl.store(zdw_ptr + rows64[:, None] * BLOCK_R + offs_r[None, :], zd * w[:, None],
                                 mask=has[:, None])
        acc = acc * w[:, None]
        # the top-k sum reads these rows right after this kernel (and marks them evict_first as it reads them)
        tl.store(ypair_ptr + rows64[:, None] * stride_ym + offs_n[None, :], acc.to(ypair_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :], eviction_policy="evict_last")
    if WAIT_READY:
        pdl_wait(USE_PDL)  # this grid ends after the down shrink's (and so the gate_up kernel's): the top-k sum
        # waits only for this launch
