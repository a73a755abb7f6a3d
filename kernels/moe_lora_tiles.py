"""Triton helpers of the MoE LoRA's slot stacking, shared by the fused MoE GEMMs (kernels/fused_moe_kernels.py,
kernels/moe_down_kernels.py) and the LoRA shrinks (kernels/moe_lora_kernels.py).

A LoRA dot over a block of aligned rows stacks several adapter slots along one axis: column g*BLOCK_R + r
belongs to the block's g-th key, a slot or (compacted) an index into the block's own distinct slots.
    _stack, _compact_slots, _column_slots    keys, compaction and the slot of each stacked column
    _first_group, _present                   the epilogue path's first group, a group's columns in use
    _b_ptrs, _load_b, _load_gate_up_b, _load_da   its stacked tile loads
    _gu_expand_group, _zd_group              one group's gate_up expand and down-shrink partial
    _stack_width, _k_step_columns, _stacked_b   the LoRA K step's stacked columns
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _stack(z, BLOCK_M: tl.constexpr, SG: tl.constexpr, BLOCK_R: tl.constexpr):
    """[BLOCK_M, BLOCK_R] -> [BLOCK_M, SG*BLOCK_R]: z repeated in each slot's column block (registers only)."""
    return tl.reshape(tl.broadcast_to(z[:, None, :], [BLOCK_M, SG, BLOCK_R]), [BLOCK_M, SG * BLOCK_R])


@triton.jit
def _compact_slots(slot, BLOCK_M: tl.constexpr, SP: tl.constexpr):
    """The distinct adapter slots of a block's rows, in ascending order: cslot [min(SP, BLOCK_M)] (-1 from n
    on), each row's index into it (cidx [BLOCK_M], -1 for rows without an adapter) and their number n. SP: a
    power of two >= the number of registered slots (a histogram over them, so the cost follows the slots,
    not BLOCK_M^2).

    The LoRA K step stacks a block's z by this index, not by slot, so that its width follows the slots the
    block holds (at most min(S, BLOCK_M)) instead of every registered slot: with 40 adapters a
    decode block of a few rows reads a few slots' B, not 40. A pure function of the set of the block's slots,
    so the shrinks and the GEMMs that compute it on their own agree."""
    CP: tl.constexpr = SP if SP < BLOCK_M else BLOCK_M  # (both powers of two)
    present = tl.histogram(tl.maximum(slot, 0), SP, mask=slot >= 0) > 0  # [SP]
    rank = tl.cumsum(present.to(tl.int32), axis=0) - 1
    n = tl.sum(present.to(tl.int32), axis=0)
    offs_c = tl.arange(0, CP)
    offs_s = tl.arange(0, SP)
    cslot = tl.sum(tl.where(present[None, :] & (rank[None, :] == offs_c[:, None]), offs_s[None, :], 0), axis=1)
    cslot = tl.where(offs_c < n, cslot, -1)
    cidx = tl.gather(rank, tl.maximum(slot, 0), 0)
    return cslot, tl.where(slot >= 0, cidx, -1), n


@triton.jit
def _stack_width(S, BLOCK_M: tl.constexpr, COMPACT: tl.constexpr):
    """Column blocks per part of a K step's stacked z row: every slot, or (COMPACT) the most distinct slots
    a block can hold (moe_lora.compact_width on the host)."""
    if COMPACT:
        return tl.minimum(S, BLOCK_M)
    else:
        return S


@triton.jit
def _k_step_columns(slot, S, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, SP: tl.constexpr, COMPACT: tl.constexpr):
    """A GEMM's LoRA K step over one block: the slot of each stacked column block (COMPACT: the block's
    distinct slots; else the column block is the slot, and `slot` is passed through unused) and the number of
    stacked K columns, (distinct slots or S) * BLOCK_R."""
    if COMPACT:
        cslot, _, n_c = _compact_slots(slot, BLOCK_M, SP)
        return cslot, n_c * BLOCK_R
    else:
        return slot, S * BLOCK_R


@triton.jit
def _column_slots(cslot, q, COMPACT: tl.constexpr):
    """Adapter slot of stacked column block q (a tensor): cslot[q] when compacted, else q itself."""
    if COMPACT:
        return tl.gather(cslot, tl.minimum(q, cslot.shape[0] - 1), 0)
    else:
        return q


@triton.jit
def _first_group(slot, S, BLOCK_M: tl.constexpr, SG: tl.constexpr, BLOCK_R: tl.constexpr, SP: tl.constexpr,
                 COMPACT: tl.constexpr):
    """The epilogue path's first slot group: each row's key in it (its slot, or with COMPACT its slot's index
    among the block's distinct slots, `_compact_slots`; -1 without an adapter), the number of keys (S, or the
    block's distinct slots: the group holds every row's slot when it is <= SG) and the adapter slot of each
    stacked column q = g*BLOCK_R + r ([SG*BLOCK_R]: g, or the block's g-th distinct slot). Compacted, a block
    that holds a few of many registered slots takes one group, whose tiles PREFETCH can issue early."""
    q_s = tl.arange(0, SG * BLOCK_R) // BLOCK_R
    if COMPACT:
        cslot, cidx, n = _compact_slots(slot, BLOCK_M, SP)
        return cidx, n, _column_slots(cslot, q_s, True)
    else:
        return slot, S, q_s


@triton.jit
def _present(sel, q_r, R):
    """The stacked columns ([SG*BLOCK_R]) some row of a group selects (sel: [BLOCK_M, SG*BLOCK_R]), within rank R."""
    return (tl.max(sel.to(tl.int32), axis=0) > 0) & (q_r < R)


@triton.jit
def _b_ptrs(b_ptr, expert, offs_n, s_q, q_r, stride_bs, stride_be, stride_bn, stride_br):
    """Pointers of a stacked LoRA B tile [len(s_q), BLOCK_N]: row q = B[s_q[q], expert, offs_n, q_r[q]]."""
    return (b_ptr + expert.to(tl.int64) * stride_be + offs_n[None, :] * stride_bn
            + s_q.to(tl.int64)[:, None] * stride_bs + q_r[:, None] * stride_br)


@triton.jit
def _load_b(b_ptr, expert, offs_n, s_q, q_r, m_q, mask_n, stride_bs, stride_be, stride_bn, stride_br):
    """A stacked LoRA B tile (`_b_ptrs`), zero where not m_q[q] (or past mask_n)."""
    return tl.load(_b_ptrs(b_ptr, expert, offs_n, s_q, q_r, stride_bs, stride_be, stride_bn, stride_br),
                   mask=m_q[:, None] & mask_n[None, :], other=0.0)


@triton.jit
def _load_gate_up_b(gu_b_ptr, I, expert, offs_n, s_q, q_r, m_q, mask_n, stride_bs, stride_be, stride_bn, stride_br):
    """`_load_b` of gate_up_B's gate rows and of its up rows (I rows further on)."""
    ptrs = _b_ptrs(gu_b_ptr, expert, offs_n, s_q, q_r, stride_bs, stride_be, stride_bn, stride_br)
    mask = m_q[:, None] & mask_n[None, :]
    return tl.load(ptrs, mask=mask, other=0.0), tl.load(ptrs + I * stride_bn, mask=mask, other=0.0)


@triton.jit
def _load_da(d_a_ptr, expert, offs_n, s_q, q_r, m_q, mask_n, stride_ds, stride_de, stride_dr, stride_di):
    """A stacked down_A tile [BLOCK_N, len(s_q)]: column q = down_A[s_q[q], expert, q_r[q], offs_n] where m_q[q]
    (and mask_n), else 0."""
    ptrs = (d_a_ptr + expert.to(tl.int64) * stride_de + offs_n[:, None] * stride_di
            + s_q.to(tl.int64)[None, :] * stride_ds + q_r[None, :] * stride_dr)
    return tl.load(ptrs, mask=mask_n[:, None] & m_q[None, :], other=0.0)


@triton.jit
def _gu_expand_group(acc_g, acc_u, sel, zg_own, zu_own, z_row, zs_row, q_r, bg, bu,
                     BLOCK_M: tl.constexpr, SG: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr,
                     HAS_SHARED: tl.constexpr, CAST_FP32: tl.constexpr, DOT_PREC: tl.constexpr):
    """One slot group of the gate_up expand: h += z(stacked, sel: [BLOCK_M, SG*BLOCK_R] the rows' own column
    blocks) [B_gate | B_up](stacked, bg / bu: [SG*BLOCK_R, BLOCK_N]). With SPLIT > 1 the rows' own z (the
    partials summed, zg_own / zu_own) is masked into place in registers; with SPLIT 1 it is read straight into
    the stacked layout (z_row / zs_row: each row's narrow z and shared-outer z)."""
    if SPLIT > 1:
        zg = tl.where(sel, _stack(zg_own, BLOCK_M, SG, BLOCK_R), 0.0)
        zu = tl.where(sel, _stack(zu_own, BLOCK_M, SG, BLOCK_R), 0.0)
    else:
        zg = tl.load(z_row + q_r[None, :], mask=sel, other=0.0)
        zu = tl.load(z_row + BLOCK_R + q_r[None, :], mask=sel, other=0.0)
        if HAS_SHARED:
            zg += tl.load(zs_row + q_r[None, :], mask=sel, other=0.0)
            zu += tl.load(zs_row + BLOCK_R + q_r[None, :], mask=sel, other=0.0)
    if CAST_FP32:
        bg = bg.to(tl.float32)
        bu = bu.to(tl.float32)
    acc_g = tl.dot(zg.to(bg.dtype), bg, acc_g, input_precision=DOT_PREC)
    acc_u = tl.dot(zu.to(bu.dtype), bu, acc_u, input_precision=DOT_PREC)
    return acc_g, acc_u


@triton.jit
def _zd_group(zd, a_op, sel, da, BLOCK_M: tl.constexpr, SG: tl.constexpr, BLOCK_R: tl.constexpr,
              CAST_FP32: tl.constexpr, DOT_PREC: tl.constexpr):
    """One slot group of the down shrink's partial over an I tile: zd += each row's own column block of
    a down_A(stacked, da: [BLOCK_N, SG*BLOCK_R])."""
    if CAST_FP32:
        da = da.to(tl.float32)
    zw = tl.where(sel, tl.dot(a_op, da, input_precision=DOT_PREC), 0.0)  # [BLOCK_M, SG*BLOCK_R]
    return zd + tl.sum(tl.reshape(zw, [BLOCK_M, SG, BLOCK_R]), axis=1)


@triton.jit
def _stacked_b(b_cols, j, KW, R, mask_n, stride_bs, stride_br, BLOCK_R: tl.constexpr, cslot=None,
               COMPACT: tl.constexpr = False):
    """Pointers and mask of a LoRA K step's B tile [len(j), BLOCK_N]: stacked column j = c*BLOCK_R + r reads
    B[s, :, :, r] of the block's expert, s = c or (COMPACT) the block's c-th slot cslot[c] (b_cols: [1, BLOCK_N]
    at s = r = 0); zero past KW and rank R."""
    sj = _column_slots(cslot, j // BLOCK_R, COMPACT)
    ptrs = b_cols + sj.to(tl.int64)[:, None] * stride_bs + (j % BLOCK_R)[:, None] * stride_br
    return ptrs, ((j < KW) & (j % BLOCK_R < R))[:, None] & mask_n[None, :]
