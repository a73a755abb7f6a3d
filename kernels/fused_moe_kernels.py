"""Triton kernels of the fused MoE (launcher, configs and contract: kernels/fused_moe.py).

The GEMM kernels walk the blocks of a `moe_align` alignment (BLOCK_M pairs of one expert):
    _gate_up_kernel   act = silu(x W_gate^T + dg) * (x W_up^T + du), with the LoRA expand (dg, du) and the
                      down-LoRA shrink partials in its epilogue, or (LORA_K) the expand as K steps after
                      its main loop
and the block walk it shares with the down GEMM (`_block_rows`; kernels/moe_down_kernels.py); the LoRA's
slot-stacking helpers: kernels/moe_lora_tiles.py; the top-k sum that follows them:
kernels/moe_topk_sum_kernels.py.
Blocks past the device-side num_padded, and padding rows (pair id == N), do nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lorax.kernels._common import here, pdl_trigger, pdl_wait
from lorax.kernels.moe_lora_tiles import (
    _first_group,
    _gu_expand_group,
    _k_step_columns,
    _load_da,
    _load_gate_up_b,
    _present,
    _stack_width,
    _stacked_b,
    _zd_group,
)


@triton.jit
def _block_rows(pid, sorted_ids_ptr, block_expert_ptr, num_padded_ptr, row_slot_ptr, num_pid_n, N,
                GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, SLOTS: tl.constexpr):
    """Grouped (pid_m, pid_n) order, this block's live flag, expert, pair rows and (SLOTS) the rows' adapter
    slots (-1 for padding), read beside the rows from the alignment's sorted_slot; and pid_m."""
    num_pid_m = tl.cdiv(tl.load(num_padded_ptr), BLOCK_M)  # device-side count of live blocks
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group = tl.minimum(num_pid_m - first_m, GROUP_M)
    group = tl.maximum(group, 1)
    pid_m = first_m + (pid % width) % group
    pid_n = (pid % width) // group
    live = pid_m < num_pid_m
    expert = tl.load(block_expert_ptr + pid_m, mask=live, other=-1)
    rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M), mask=live, other=N)
    slot = rows  # (unused without SLOTS)
    if SLOTS:
        slot = tl.where(rows < N, tl.load(row_slot_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M), mask=live,
                                          other=-1), -1)
    # the grid is sized from the host bound (max blocks), so the last live group also gets programs
    # whose pid_n runs past num_pid_n: they must not run (they would write other rows' partials)
    return live & (expert >= 0) & (pid_n < num_pid_n), expert, rows, pid_n, slot, pid_m


@triton.jit
def _gate_up_kernel(
    # pointers
    x_ptr,  # [T, H]
    w13_ptr,  # [E, 2I, H]
    act_ptr,  # [N, I] out: silu(gate) * up, rows indexed by pair
    sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
    row_slot_ptr,  # [max_padded] int32 (LoRA): the adapter slot of each aligned row (moe_align's sorted_slot)
    zgu_ptr,  # [N, SPLIT, 2, BLOCK_R] fp32 shrink partials (LoRA)
    zsh_ptr,  # [T, SPLIT, 2, BLOCK_R] fp32 shared-outer shrink partials (HAS_SHARED)
    gu_b_ptr,  # [S, E, 2I, R] (LoRA)
    d_a_ptr,  # [S, E, R, I] (LoRA)
    zdp_ptr,  # [N, num_pid_n, BLOCK_R] fp32 out: down-shrink partials of this I tile (LoRA)
    act_ready_ptr,  # [max_blocks] int32, zero at the alignment (LORA_K): counts each block's stored I tiles
    h_ptr,  # [N, 2I] out (H_OUT): the pre-activation [gate | up] of rows with an adapter
    # sizes
    N, TOPK, H, I, S, R,
    # strides
    stride_xt, stride_xh, stride_we, stride_wn, stride_wh, stride_am,
    stride_bs, stride_be, stride_bn, stride_br,
    stride_ds, stride_de, stride_dr, stride_di,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_SHARED: tl.constexpr, SPLIT: tl.constexpr, BLOCK_R: tl.constexpr,
    SG: tl.constexpr,  # slots stacked per LoRA dot (power of two)
    EVEN_K: tl.constexpr, CAST_FP32: tl.constexpr, DOT_PREC: tl.constexpr,
    USE_PDL: tl.constexpr,  # with LoRA the previous launch is the shrink: only the epilogue waits for it
    LORA_K: tl.constexpr = False,  # LoRA K step mode: zgu is the stacked z [N, 2, width, BLOCK_R] (x.dtype)
    PREFETCH: tl.constexpr = False,  # epilogue path: slot group 0's B and down_A tiles issued before the main loop
    ONE_GROUP: tl.constexpr = False,  # epilogue path, S <= SG: the slots take one group (no loop past it)
    COMPACT: tl.constexpr = False,  # the slots grouped (epilogue) or z stacked (LORA_K) by the block's own slots
    SP: tl.constexpr = 1,  # COMPACT: next power of two >= S
    H_OUT: tl.constexpr = False,  # the segment LoRA (moe_lora_seg): adapter rows store h, the others act
):
    if HAS_LORA or H_OUT:
        # the shrink writes only zgu/zsh, read after pdl_wait below: the main loop overlaps it (H_OUT: the
        # segment shrink, whose programs start after the alignments are done, is not read here at all)
        pdl_trigger(USE_PDL)
    else:
        pdl_wait(USE_PDL)
        pdl_trigger(USE_PDL)
    # each program owns BLOCK_N gate columns and the matching BLOCK_N up columns of one block of pairs
    num_pid_n = tl.cdiv(I, BLOCK_N)
    ok, expert, rows, pid_n, slot, pid_m = _block_rows(tl.program_id(0), sorted_ids_ptr, block_expert_ptr,
                                                       num_padded_ptr, row_slot_ptr, num_pid_n, N, GROUP_M, BLOCK_M,
                                                       HAS_LORA or H_OUT)
    if ok:
        mask_m = rows < N
        token = (rows // TOPK).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < I
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :] * stride_xh
        wg_ptrs = (w13_ptr + expert.to(tl.int64) * stride_we
                   + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wh)  # [BLOCK_K, BLOCK_N]
        wu_ptrs = wg_ptrs + I * stride_wn
        if HAS_LORA and not LORA_K:
            # the epilogues stack SG slots per dot. A block whose slots fit one group (every block when S <=
            # SG; with COMPACT, one holding <= SG distinct slots, whatever S) takes that group alone (_first_group);
            # the others loop over every registered slot's group. PREFETCH: the first group's B and down_A tiles
            # are issued before the main loop (the slots came with the rows; nothing here depends on the
            # shrink), so the epilogue waits only for the shrink's z, in L2, instead of a chain of loads from a
            # saturated HBM
            offs_q = tl.arange(0, SG * BLOCK_R)
            q_s = offs_q // BLOCK_R  # key (within the group) of stacked column q
            q_r = offs_q % BLOCK_R  # rank index of stacked column q
            key0, n0, s_q0 = _first_group(slot, S, BLOCK_M, SG, BLOCK_R, SP, COMPACT)
            first = n0 <= SG  # (the block's own slots fit one group: taken alone when not ONE_GROUP)
            n_by_slot = S  # groups by slot: the one group (ONE_GROUP), else none when `first`, every one otherwise
            if not ONE_GROUP:
                n_by_slot = tl.where(first, 0, S)
            if PREFETCH:
                m_q0 = _present(key0[:, None] == q_s[None, :], q_r, R)
                bg0, bu0 = _load_gate_up_b(gu_b_ptr, I, expert, offs_n, s_q0, q_r, m_q0, mask_n,
                                           stride_bs, stride_be, stride_bn, stride_br)
                da0 = _load_da(d_a_ptr, expert, offs_n, s_q0, q_r, m_q0, mask_n, stride_ds, stride_de, stride_dr,
                               stride_di)
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            if EVEN_K:
                xt = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
                wg = tl.load(wg_ptrs, mask=mask_n[None, :], other=0.0)
                wu = tl.load(wu_ptrs, mask=mask_n[None, :], other=0.0)
            else:
                mask_k = offs_k < H - k0
                xt = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                wg = tl.load(wg_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                wu = tl.load(wu_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if CAST_FP32:
                xt = xt.to(tl.float32)
                wg = wg.to(tl.float32)
                wu = wu.to(tl.float32)
            acc_g = tl.dot(xt, wg, acc_g, input_precision=DOT_PREC)
            acc_u = tl.dot(xt, wu, acc_u, input_precision=DOT_PREC)
            x_ptrs += BLOCK_K * stride_xh
            wg_ptrs += BLOCK_K * stride_wh
            wu_ptrs += BLOCK_K * stride_wh
        if HAS_LORA and LORA_K:
            # LoRA K step: h += [z_gate | z_up](stacked by slot) [B_gate | B_up](stacked by slot), S*BLOCK_R
            # more K columns read like the main loop's (zeros outside each row's slot: no masks by slot)
            if tl.max((slot >= 0).to(tl.int32), axis=0) > 0:  # blocks without adapter rows skip it
                pdl_wait(USE_PDL)
                cslot, KW = _k_step_columns(slot, S, BLOCK_M, BLOCK_R, SP, COMPACT)
                ZW = _stack_width(S, BLOCK_M, COMPACT) * BLOCK_R  # z columns per part
                z_rows = zgu_ptr + rows.to(tl.int64)[:, None] * (2 * ZW)
                b_cols = gu_b_ptr + expert.to(tl.int64) * stride_be + offs_n[None, :] * stride_bn  # [1, BLOCK_N]
                for j0 in tl.range(0, KW, BLOCK_K, num_stages=1):
                    j = j0 + offs_k
                    mask_j = j < KW
                    m_z = mask_m[:, None] & mask_j[None, :]
                    zg = tl.load(z_rows + j[None, :], mask=m_z, other=0.0)
                    zu = tl.load(z_rows + ZW + j[None, :], mask=m_z, other=0.0)
                    b_ptrs, m_b = _stacked_b(b_cols, j, KW, R, mask_n, stride_bs, stride_br, BLOCK_R, cslot, COMPACT)
                    bg = tl.load(b_ptrs, mask=m_b, other=0.0)
                    bu = tl.load(b_ptrs + I * stride_bn, mask=m_b, other=0.0)
                    if CAST_FP32:
                        zg = zg.to(tl.float32)
                        zu = zu.to(tl.float32)
                        bg = bg.to(tl.float32)
                        bu = bu.to(tl.float32)
                    acc_g = tl.dot(zg, bg, acc_g, input_precision=DOT_PREC)
                    acc_u = tl.dot(zu, bu, acc_u, input_precision=DOT_PREC)
        elif HAS_LORA:
            # gate_up expand before the activation: h += [B_gate z_gate ; B_up z_up]. Slots are stacked
            # SG at a time along the dot's K axis (column g*BLOCK_R + r holds z[:, r] of the rows whose
            # key is s0 + g, zero elsewhere): one dot and one masked tile load per group, no per-slot
            # branches, so the B loads of all present slots are in flight together.
            has = slot >= 0
            any_lora = tl.max(has.to(tl.int32), axis=0) > 0  # blocks without adapter rows skip it all
            if any_lora:
                pdl_wait(USE_PDL)
                z_row = zgu_ptr + rows.to(tl.int64)[:, None] * (SPLIT * 2 * BLOCK_R)  # [BLOCK_M, 1]
                zs_row = zsh_ptr + token[:, None] * (SPLIT * 2 * BLOCK_R)
                zg_own = z_row  # (SPLIT 1: unused)
                zu_own = z_row
                if SPLIT > 1:
                    # K-split partials: each row's own z summed once (narrow loads); the groups then
                    # mask it in registers (decode: 2 us less than SPLIT stacked masked loads per group)
                    zg_own = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
                    zu_own = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
                    offs_r = tl.arange(0, BLOCK_R)
                    zr_ptrs = z_row + offs_r[None, :]
                    zsr_ptrs = zs_row + offs_r[None, :]
                    for sp in tl.static_range(SPLIT):
                        zg_own += tl.load(zr_ptrs + sp * 2 * BLOCK_R, mask=has[:, None], other=0.0)
                        zu_own += tl.load(zr_ptrs + sp * 2 * BLOCK_R + BLOCK_R, mask=has[:, None], other=0.0)
                        if HAS_SHARED:
                            zg_own += tl.load(zsr_ptrs + sp * 2 * BLOCK_R, mask=has[:, None], other=0.0)
                            zu_own += tl.load(zsr_ptrs + sp * 2 * BLOCK_R + BLOCK_R, mask=has[:, None], other=0.0)
                if not ONE_GROUP:  # noqa: SIM102 - a constexpr test, then a runtime one
                    if first:  # the block's own slots, one group
                        sel = key0[:, None] == q_s[None, :]  # [BLOCK_M, SG*BLOCK_R]
                        if PREFETCH:  # (the copies to shared memory here, not at the loads)
                            bg = here(bg0, not CAST_FP32)
                            bu = here(bu0, not CAST_FP32)
                        else:
                            m_b = _present(sel, q_r, R)
                            bg, bu = _load_gate_up_b(gu_b_ptr, I, expert, offs_n, s_q0, q_r, m_b, mask_n,
                                                     stride_bs, stride_be, stride_bn, stride_br)
                        acc_g, acc_u = _gu_expand_group(acc_g, acc_u, sel, zg_own, zu_own, z_row, zs_row, q_r, bg,
                                                        bu, BLOCK_M, SG, BLOCK_R, SPLIT, HAS_SHARED, CAST_FP32,
                                                        DOT_PREC)
                # by slot: the one group (ONE_GROUP), or every group for the blocks whose slots do not fit one
                for s0 in range(0, n_by_slot, SG):
                    sel = slot[:, None] == (s0 + q_s)[None, :]  # [BLOCK_M, SG*BLOCK_R]
                    present = tl.max(sel.to(tl.int32), axis=0) > 0  # [SG*BLOCK_R]
                    if tl.max(present.to(tl.int32), axis=0) > 0:
                        if PREFETCH and ONE_GROUP:
                            bg = here(bg0, not CAST_FP32)
                            bu = here(bu0, not CAST_FP32)
                        else:
                            m_b = present & (q_r < R)
                            bg, bu = _load_gate_up_b(gu_b_ptr, I, expert, offs_n, s0 + q_s, q_r, m_b, mask_n,
                                                     stride_bs, stride_be, stride_bn, stride_br)
                        acc_g, acc_u = _gu_expand_group(acc_g, acc_u, sel, zg_own, zu_own, z_row, zs_row, q_r, bg, bu,
                                                        BLOCK_M, SG, BLOCK_R, SPLIT, HAS_SHARED, CAST_FP32, DOT_PREC)
        act = (acc_g / (1.0 + tl.exp(-acc_g)) * acc_u).to(act_ptr.dtype.element_ty)
        mask_a = mask_m[:, None] & mask_n[None, :]
        if H_OUT:
            # adapter rows: h for the segment expand, which adds the LoRA and applies the activation itself
            mask_h = mask_a & (slot >= 0)[:, None]
            mask_a = mask_a & (slot < 0)[:, None]
            h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * (2 * I) + offs_n[None, :]
            tl.store(h_ptrs, acc_g.to(h_ptr.dtype.element_ty), mask=mask_h, eviction_policy="evict_last")
            tl.store(h_ptrs + I, acc_u.to(h_ptr.dtype.element_ty), mask=mask_h, eviction_policy="evict_last")
        # act is read again by the down GEMM while expert weights stream through L2: keep it there
        tl.store(act_ptr + rows.to(tl.int64)[:, None] * stride_am + offs_n[None, :], act,
                 mask=mask_a, eviction_policy="evict_last")
        if HAS_LORA and LORA_K:
            # the down shrink and the down kernel start on this block once all its I tiles are stored (they spin
            # on the count, so they run beside this grid's last programs instead of after the whole grid)
            tl.debug_barrier()  # every thread's act stores precede the release below
            tl.atomic_add(act_ready_ptr + pid_m, 1, sem="release", scope="gpu")
        if HAS_LORA and not LORA_K:  # noqa: SIM102 - a constexpr test, then a runtime one
            if any_lora:
                # down shrink, partial over this I tile: zdp[n, pid_n] = down_A[s, e][:, tile] a[n, tile],
                # one stacked dot per slot group, then each row keeps its own slot's column block
                zd = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
                a_op = act
                if CAST_FP32:
                    a_op = act.to(tl.float32)
                if not ONE_GROUP:  # noqa: SIM102 - a constexpr test, then a runtime one
                    if first:
                        sel = key0[:, None] == q_s[None, :]
                        if PREFETCH:
                            da = here(da0, not CAST_FP32)
                        else:
                            da = _load_da(d_a_ptr, expert, offs_n, s_q0, q_r, _present(sel, q_r, R), mask_n,
                                          stride_ds, stride_de, stride_dr, stride_di)
                        zd = _zd_group(zd, a_op, sel, da, BLOCK_M, SG, BLOCK_R, CAST_FP32, DOT_PREC)
                for s0 in range(0, n_by_slot, SG):
                    sel = slot[:, None] == (s0 + q_s)[None, :]
                    present = tl.max(sel.to(tl.int32), axis=0) > 0
                    if tl.max(present.to(tl.int32), axis=0) > 0:
                        if PREFETCH and ONE_GROUP:
                            da = here(da0, not CAST_FP32)
                        else:
                            da = _load_da(d_a_ptr, expert, offs_n, s0 + q_s, q_r, present & (q_r < R), mask_n,
                                          stride_ds, stride_de, stride_dr, stride_di)
                        zd = _zd_group(zd, a_op, sel, da, BLOCK_M, SG, BLOCK_R, CAST_FP32, DOT_PREC)
                offs_r = tl.arange(0, BLOCK_R)
                zdp_ptrs = zdp_ptr + (rows.to(tl.int64)[:, None] * num_pid_n + pid_n) * BLOCK_R + offs_r[None, :]
                tl.store(zdp_ptrs, zd, mask=has[:, None])
    if HAS_LORA or H_OUT:
        pdl_wait(USE_PDL)  # every program: this launch finishing implies the shrink finished
