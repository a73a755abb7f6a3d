"""The Triton kernels behind kernels/moe_lora.py (slab layout, math, schedule and launchers live there):

    _moe_lora_shrink_kernel       launch 1: z of the gate_up A per expert block (and the shared-outer A per
                                  token), K-split partials or, in the K step mode, stacked by slot
    _moe_lora_down_shrink_kernel  K step mode, between the GEMMs: z_d of the down A into act's extra columns
and the helpers they share (`_shrink_rows`, `_block_slots`, `_sub_block_compaction`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from lorax.kernels._common import pdl_trigger, pdl_wait, wait_count
from lorax.kernels.moe_lora_tiles import _column_slots, _compact_slots, _stack_width


@triton.jit
def _shrink_rows(
    x_ptr, a_ptr, out_ptr, token_slot_ptr,
    rows, mask_m, token, xrow,  # [BLOCK_M] output row ids, their validity, each row's token and x row
    H, S, R, k_chunk, stride_out,
    stride_xt, stride_xh, stride_a_s, stride_a_r, stride_a_h,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr,
    SG: tl.constexpr, CAST_FP32: tl.constexpr, DOT_PREC: tl.constexpr,
    PARTS: tl.constexpr = 2,  # 2: A rows [0, R) gate and [R, 2R) up; 1: one z per row (the down shrink)
    STACKED: tl.constexpr = False,
    cidx=None, cslot=None, n_c=0,  # COMPACT: the rows' indices into the block's slots, those slots, their number
    COMPACT: tl.constexpr = False,
):
    """z of A[slot(row)] x[xrow] over this program's K chunk, for every row of the block.

    Slots are stacked SG at a time along the dot's N axis (column g*BLOCK_R + r = row r of slot s0 + g's
    A, zero when that slot is absent from the block), so one K loop serves every slot of a group. With
    COMPACT the stacking runs over the block's own slots instead (`_compact_slots`: column block c holds the
    block's c-th distinct slot), so the groups follow the slots present, not every registered one.
    Output layouts:
      STACKED False  out[row, pid_k, part, :BLOCK_R] fp32: each row keeps its own slot's column block
                     (rows whose slot is -1 are not written)
      STACKED True   out[row * stride_out + part * stride_out/PARTS + c*BLOCK_R + r], out's dtype, SPLIT 1: the
                     row's z in its own column block c (its slot, or with COMPACT its slot's index in the
                     block) and zeros in every other (rows whose slot is -1 get zeros), i.e. the extra K
                     columns the GEMMs' LoRA K step reads (COMPACT: only the first n_c blocks are written)
    """
    pid_k = tl.program_id(1)
    if COMPACT:  # keys: the rows' indices into the block's slots
        slot = cidx
        n_keys = n_c
    else:
        slot = tl.load(token_slot_ptr + token, mask=mask_m, other=-1)
        n_keys = S
    offs_r = tl.arange(0, BLOCK_R)
    offs_q = tl.arange(0, SG * BLOCK_R)
    q_s = offs_q // BLOCK_R
    q_r = offs_q % BLOCK_R
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = pid_k * k_chunk
    k_hi = tl.minimum(H, k_lo + k_chunk)
    x_rows = x_ptr + xrow.to(tl.int64)[:, None] * stride_xt
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * (SPLIT * PARTS * BLOCK_R) + pid_k * PARTS * BLOCK_R + offs_r[None, :]
    st_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out + offs_q[None, :]
    for s0 in range(0, n_keys, SG):
        sel = slot[:, None] == (s0 + q_s)[None, :]  # [BLOCK_M, SG*BLOCK_R]
        present = tl.max(sel.to(tl.int32), axis=0) > 0  # [SG*BLOCK_R]
        acc_g = tl.zeros([BLOCK_M, SG * BLOCK_R], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, SG * BLOCK_R], dtype=tl.float32)
        rows_in = tl.max(sel.to(tl.int32), axis=1) > 0  # rows whose slot is in the group
        if tl.max(present.to(tl.int32), axis=0) > 0:  # some slot of the group is in this block
            # A rows [0, R) gate, [R, 2R) up, read transposed and stacked: [BLOCK_K, SG*BLOCK_R]
            a_cols = (a_ptr + _column_slots(cslot, s0 + q_s, COMPACT).to(tl.int64)[None, :] * stride_a_s
                      + q_r[None, :] * stride_a_r)
            m_q = (present & (q_r < R))[None, :]
            for k0 in range(k_lo, k_hi, BLOCK_K):
                ks = k0 + offs_k
                mask_k = ks < k_hi
                xt = tl.load(x_rows + ks[None, :] * stride_xh, mask=rows_in[:, None] & mask_k[None, :], other=0.0)
                ag_ptrs = a_cols + ks[:, None] * stride_a_h
                m_a = mask_k[:, None] & m_q
                ag = tl.load(ag_ptrs, mask=m_a, other=0.0)
                if CAST_FP32:
                    xt = xt.to(tl.float32)
                    ag = ag.to(tl.float32)
                acc_g = tl.dot(xt, ag, acc_g, input_precision=DOT_PREC)
                if PARTS == 2:
                    au = tl.load(ag_ptrs + R * stride_a_r, mask=m_a, other=0.0)
                    if CAST_FP32:
                        au = au.to(tl.float32)
                    acc_u = tl.dot(xt, au, acc_u, input_precision=DOT_PREC)
            if not STACKED:
                m_out = rows_in[:, None] & (offs_r[None, :] < BLOCK_R)
                zg = tl.sum(tl.reshape(tl.where(sel, acc_g, 0.0), [BLOCK_M, SG, BLOCK_R]), axis=1)
                tl.store(out_ptrs, zg, mask=m_out)
                if PARTS == 2:
                    zu = tl.sum(tl.reshape(tl.where(sel, acc_u, 0.0), [BLOCK_M, SG, BLOCK_R]), axis=1)
                    tl.store(out_ptrs + BLOCK_R, zu, mask=m_out)
        if STACKED:  # every group's columns, zeros where the group is absent
            m_st = mask_m[:, None] & ((s0 + q_s) < n_keys)[None, :]
            dst = st_ptrs + s0 * BLOCK_R
            tl.store(dst, tl.where(sel, acc_g, 0.0).to(out_ptr.dtype.element_ty), mask=m_st)
            if PARTS == 2:
                tl.store(dst + stride_out // 2, tl.where(sel, acc_u, 0.0).to(out_ptr.dtype.element_ty), mask=m_st)


@triton.jit
def _block_slots(sorted_ids_ptr, token_slot_ptr, blk, N, TOPK, BLOCK_M: tl.constexpr):
    """The adapter slot of each row of expert block blk (-1 for pads and rows without an adapter), as the
    GEMMs read them, and whether any is >= 0: the test by which the GEMMs run or skip their LoRA K step, so
    the shrinks that feed it decide on the whole block too."""
    rows = tl.load(sorted_ids_ptr + blk * BLOCK_M + tl.arange(0, BLOCK_M))
    slot = tl.load(token_slot_ptr + rows // TOPK, mask=rows < N, other=-1)
    return slot, tl.max((slot >= 0).to(tl.int32), axis=0) > 0


@triton.jit
def _sub_block_compaction(slot_b, sub, SUB_M: tl.constexpr, BLOCK_M: tl.constexpr, SP: tl.constexpr,
                          COMPACT: tl.constexpr):
    """(COMPACT) The block's distinct slots and the indices of sub-block `sub`'s rows into them."""
    if COMPACT:
        cslot, cidx_b, n_c = _compact_slots(slot_b, BLOCK_M, SP)
        return cslot, tl.gather(cidx_b, sub * SUB_M + tl.arange(0, SUB_M), 0), n_c
    else:
        return slot_b, slot_b, 0


@triton.jit
def _moe_lora_shrink_kernel(
    # pointers
    x_ptr,  # [T, H]
    gu_a_ptr,  # [S, E, 2R, H] per-expert gate_up A
    sh_a_ptr,  # [S, 2R, H] shared-outer A (read only when HAS_SHARED)
    token_slot_ptr,  # [T] int32, -1 = no adapter
    sorted_ids_ptr, block_expert_ptr, num_padded_ptr,  # base alignment (block_m == BLOCK_M)
    zgu_ptr,  # [N, SPLIT, 2, BLOCK_R] fp32 out: per pair, K-split partials of (gate z, up z)
    zsh_ptr,  # [T, SPLIT, 2, BLOCK_R] fp32 out: per token, shared-outer partials
    # sizes
    N, TOPK, T, H, S, R, max_blocks, k_chunk,
    # strides
    stride_xt, stride_xh,
    stride_as, stride_ae, stride_ar, stride_ah,
    stride_ss, stride_sr, stride_sh,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr,
    SG: tl.constexpr,  # slots stacked per dot (power of two)
    HAS_SHARED: tl.constexpr, CAST_FP32: tl.constexpr, DOT_PREC: tl.constexpr,
    USE_PDL: tl.constexpr,
    STACKED: tl.constexpr = False,  # zgu is the [N, 2, width, BLOCK_R] stacked z (x.dtype) of the LoRA K step
    SUB_M: tl.constexpr = 0,  # rows per program (a divisor of BLOCK_M; 0: BLOCK_M)
    COMPACT: tl.constexpr = False,  # slot groups (STACKED: the stacking) by the block's own slots (_compact_slots)
    SP: tl.constexpr = 1,  # COMPACT: a power of two >= S
):
    # grid: (max_blocks * BLOCK_M / SUB_M [+ token blocks of SUB_M when HAS_SHARED], SPLIT)
    pdl_wait(USE_PDL)  # the alignment
    pdl_trigger(USE_PDL)  # the gate_up GEMM may start: it reads our output only after its own wait
    SM: tl.constexpr = SUB_M if SUB_M > 0 else BLOCK_M
    NSUB: tl.constexpr = BLOCK_M // SM
    pid = tl.program_id(0)
    offs_m = tl.arange(0, SM)
    if pid < max_blocks * NSUB:
        # role 1: SM pairs of one expert block; blocks past the device-side count exit at once
        blk = pid // NSUB
        live = blk * BLOCK_M < tl.load(num_padded_ptr)
        expert = tl.load(block_expert_ptr + blk)
        if live & (expert >= 0):
            rows = tl.load(sorted_ids_ptr + blk * BLOCK_M + (pid % NSUB) * SM + offs_m)  # pair ids, N = padding
            token = rows // TOPK
            run = True
            cslot = rows  # (COMPACT only)
            cidx = rows
            n_c = 0
            if STACKED or COMPACT:
                # only blocks with adapter rows (the whole block's): the GEMMs skip the others' K step, and
                # without one (epilogue path) the block has nothing to write
                slot_b, run = _block_slots(sorted_ids_ptr, token_slot_ptr, blk, N, TOPK, BLOCK_M)
                cslot, cidx, n_c = _sub_block_compaction(slot_b, pid % NSUB, SM, BLOCK_M, SP, COMPACT)
            if run:
                _shrink_rows(
                    x_ptr, gu_a_ptr + expert.to(tl.int64) * stride_ae, zgu_ptr, token_slot_ptr,
                    rows, rows < N, token, token, H, S, R, k_chunk, 2 * _stack_width(S, BLOCK_M, COMPACT) * BLOCK_R,
                    stride_xt, stride_xh, stride_as, stride_ar, stride_ah,
                    SM, BLOCK_K, BLOCK_R, SPLIT, SG, CAST_FP32, DOT_PREC, 2, STACKED,
                    cidx, cslot, n_c, COMPACT,
                )
    elif HAS_SHARED:
        # role 2: one block of tokens against the shared-outer A (once per token, not per pair)
        tok_rows = (pid - max_blocks * NSUB) * SM + offs_m
        cslot = tok_rows  # (COMPACT only)
        cidx = tok_rows
        n_c = 0
        if COMPACT:  # grouped by the block's own slots, as the per-pair rows
            cslot, cidx, n_c = _compact_slots(tl.load(token_slot_ptr + tok_rows, mask=tok_rows < T, other=-1), SM,
                                              SP)
        _shrink_rows(
            x_ptr, sh_a_ptr, zsh_ptr, token_slot_ptr,
            tok_rows, tok_rows < T, tok_rows, tok_rows, H, S, R, k_chunk, 0,
            stride_xt, stride_xh, stride_ss, stride_sr, stride_sh,
            SM, BLOCK_K, BLOCK_R, SPLIT, SG, CAST_FP32, DOT_PREC, 2, False,
            cidx, cslot, n_c, COMPACT,
        )


@triton.jit
def _moe_lora_down_shrink_kernel(
    act_ptr,  # [N, I + W*BLOCK_R]: columns [0, I) the activation (read), [I, I + W*BLOCK_R) z_d stacked (out)
    d_a_ptr,  # [S, E, R, I]
    token_slot_ptr, sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
    act_ready_ptr,  # [max_blocks] int32: I tiles of each block whose act is stored (the gate_up kernel counts)
    zd_ready_ptr,  # [max_blocks] int32: parts of each block whose z_d is stored (we count, the down kernel waits)
    N, TOPK, I, S, R, nt_gu,
    stride_am, stride_ds, stride_de, stride_dr, stride_di,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, SG: tl.constexpr,
    CAST_FP32: tl.constexpr, DOT_PREC: tl.constexpr, USE_PDL: tl.constexpr,
    SUB_M: tl.constexpr,  # rows per program (a divisor of BLOCK_M)
    COMPACT: tl.constexpr = False,  # stacked by the block's own slots, as the gate_up shrink
    SP: tl.constexpr = 1,  # COMPACT: a power of two >= S
):
    """LoRA K step mode: z_d = down_A[s, e] a per pair, stacked by slot (or with COMPACT by the block's own
    slots) into act's extra columns (SUB_M rows of one expert block per program; blocks without adapter
    rows do nothing).

    A block starts once the gate_up kernel has stored all nt_gu I tiles of its act (act_ready[blk], acquire),
    not when that whole grid ends: the programs run beside its last ones. This launch is let in (PDL) only
    when every gate_up program has started, so none waits on a program that cannot run; the alignment it
    reads finished before those. The PDL wait at the end keeps the down kernel behind the whole gate_up
    grid (it waits only for this launch).
    """
    pdl_trigger(USE_PDL)
    NSUB: tl.constexpr = BLOCK_M // SUB_M
    pid = tl.program_id(0)
    blk = pid // NSUB
    live = blk * BLOCK_M < tl.load(num_padded_ptr)
    expert = tl.load(block_expert_ptr + blk)
    if live & (expert >= 0):  # noqa: SIM102 - the inner test reads the block, valid only when live
        slot_b, run = _block_slots(sorted_ids_ptr, token_slot_ptr, blk, N, TOPK, BLOCK_M)
        if run:  # the down GEMM's test
            if USE_PDL:
                wait_count(act_ready_ptr + blk, nt_gu)
            rows = tl.load(sorted_ids_ptr + blk * BLOCK_M + (pid % NSUB) * SUB_M + tl.arange(0, SUB_M))
            cslot, cidx, n_c = _sub_block_compaction(slot_b, pid % NSUB, SUB_M, BLOCK_M, SP, COMPACT)
            _shrink_rows(
                act_ptr, d_a_ptr + expert.to(tl.int64) * stride_de, act_ptr + I, token_slot_ptr,
                rows, rows < N, rows // TOPK, rows, I, S, R, I, stride_am,
                stride_am, 1, stride_ds, stride_dr, stride_di,
                SUB_M, BLOCK_K, BLOCK_R, 1, SG, CAST_FP32, DOT_PREC, 1, True,
                cidx, cslot, n_c, COMPACT,
            )
            if USE_PDL:
                tl.debug_barrier()  # every thread's z_d stores precede the release below
                tl.atomic_add(zd_ready_ptr + blk, 1, sem="release", scope="gpu")
    pdl_wait(USE_PDL)
