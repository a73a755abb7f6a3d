"""The Triton kernels behind kernels/moe_align.py (contract, launcher and reference live there).

Two ways to the same alignment:
    _moe_count_kernel -> _moe_prefix_kernel -> _moe_scatter_kernel   any size (atomics give each pair its rank)
    _moe_align_small_kernel                                           decode sizes, registers only
and `_virtual_ids_kernel` for `virtual_expert_ids`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lorax.kernels._common import pdl_trigger, pdl_wait


@triton.jit
def _pair_key(
    topk_ids_ptr, token_slot_ptr, offs_n, mask_n,
    TOPK, base_experts, num_experts,
    HAS_SLOT: tl.constexpr,
):
    """Bucket of each flat pair n = t*TOPK + j: its (virtual) expert id, or num_experts for a sentinel."""
    ids = tl.load(topk_ids_ptr + offs_n, mask=mask_n, other=-1)
    if HAS_SLOT:
        # virtual expert slot * E + e; a negative slot or a sentinel expert id stays a sentinel
        slot = tl.load(token_slot_ptr + offs_n // TOPK, mask=mask_n, other=-1)
        bad = (slot < 0) | (ids < 0) | (ids >= base_experts)
        ids = tl.where(bad, -1, slot * base_experts + ids)
    valid = mask_n & (ids >= 0) & (ids < num_experts)
    return tl.where(valid, ids, num_experts), valid


@triton.jit
def _moe_count_kernel(
    # pointers
    topk_ids_ptr,  # [N] int32 flat pairs
    token_slot_ptr,  # [T] int32 (read only when HAS_SLOT)
    counts_ptr,  # [num_experts] int32, zeroed by the launcher
    rank_ptr,  # [N] int32 out: position of the pair inside its expert's run
    # sizes
    N, TOPK, base_experts, num_experts,
    # meta
    HAS_SLOT: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    pdl_trigger(USE_PDL)  # the scatter may be scheduled: it waits for this launch before reading counts
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    key, valid = _pair_key(topk_ids_ptr, token_slot_ptr, offs_n, mask_n, TOPK, base_experts, num_experts,
                           HAS_SLOT)
    # each lane's atomic returns the old count: a distinct rank per pair (order inside an expert is
    # whatever the hardware serialises; consumers treat rows independently, so it does not matter)
    rank = tl.atomic_add(counts_ptr + key, tl.full([BLOCK_N], 1, tl.int32), mask=valid)
    tl.store(rank_ptr + offs_n, rank, mask=mask_n)


@triton.jit
def _moe_prefix_kernel(
    counts_ptr,  # [E] int32 pairs per expert
    starts_ptr,  # [E] int32 out: first position of each expert's padded run
    block_ends_ptr,  # [E] int32 out: inclusive prefix sum of blocks per expert
    num_padded_ptr,  # [1] int32 out
    num_experts, block_m,
    BLOCK_E: tl.constexpr,
):
    # one program walks the experts in chunks, carrying the running total (E = 65536 is 64 chunks)
    carry = tl.zeros([], dtype=tl.int32)
    for e0 in range(0, num_experts, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < num_experts
        cnt = tl.load(counts_ptr + offs_e, mask=mask_e, other=0)
        padded = (cnt + block_m - 1) // block_m * block_m
        incl = tl.cumsum(padded, axis=0) + carry
        tl.store(starts_ptr + offs_e, incl - padded, mask=mask_e)
        tl.store(block_ends_ptr + offs_e, incl // block_m, mask=mask_e)
        carry += tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, carry)


@triton.jit
def _moe_scatter_kernel(
    # pointers
    topk_ids_ptr, token_slot_ptr,
    counts_ptr, starts_ptr, block_ends_ptr, num_padded_ptr, rank_ptr,
    sorted_ids_ptr,  # [max_padded] int32 out
    block_expert_ptr,  # [max_blocks] int32 out
    row_slots_ptr, sorted_slot_ptr,  # [T] in, [max_padded] out (SLOT_OUT)
    # sizes
    N, TOPK, base_experts, num_experts, block_m, max_blocks, pair_programs,
    # meta
    HAS_SLOT: tl.constexpr, SLOT_OUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_BM: tl.constexpr,
    LOG_E: tl.constexpr,
    FUSED_PREFIX: tl.constexpr = 0,  # > num_experts (a power of two): every program takes the prefix sum of
    # the counts itself, in registers (no prefix launch; starts / block_ends / num_padded are not read)
    USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)  # the counts
    pdl_trigger(USE_PDL)
    pid = tl.program_id(0)
    if FUSED_PREFIX > 0:
        offs_e = tl.arange(0, FUSED_PREFIX)
        cnt_e = tl.load(counts_ptr + offs_e, mask=offs_e < num_experts, other=0)
        padded_e = (cnt_e + block_m - 1) // block_m * block_m
        starts_e = tl.cumsum(padded_e, axis=0) - padded_e
        ends_e = tl.cumsum(padded_e // block_m, axis=0)  # inclusive prefix of blocks per expert
        if pid == 0:
            tl.store(num_padded_ptr, tl.sum(padded_e, axis=0))
    if pid < pair_programs:
        # role 1: put each valid pair at start[expert] + rank
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        key, valid = _pair_key(topk_ids_ptr, token_slot_ptr, offs_n, mask_n, TOPK, base_experts,
                               num_experts, HAS_SLOT)
        rank = tl.load(rank_ptr + offs_n, mask=valid, other=0)
        if FUSED_PREFIX > 0:
            start = tl.gather(starts_e, key, 0)  # key < FUSED_PREFIX (the sentinel bucket is num_experts)
        else:
            start = tl.load(starts_ptr + key, mask=valid, other=0)
        tl.store(sorted_ids_ptr + start + rank, offs_n, mask=valid)
        _store_slots(row_slots_ptr, sorted_slot_ptr, start + rank, offs_n, valid, TOPK, SLOT_OUT)
    else:
        # role 2: BLOCK_B blocks: owner expert by binary search over block_ends, pads past each count
        offs_b = (pid - pair_programs) * BLOCK_B + tl.arange(0, BLOCK_B)
        mask_b = offs_b < max_blocks
        if FUSED_PREFIX > 0:
            total_blocks = tl.sum(padded_e, axis=0) // block_m
            # owner of block b: the number of experts whose runs end at or before b
            lo = tl.sum((ends_e[None, :] <= offs_b[:, None]).to(tl.int32), axis=1)
        else:
            total_blocks = tl.load(num_padded_ptr) // block_m
            lo = tl.zeros([BLOCK_B], dtype=tl.int32)
            hi = tl.zeros([BLOCK_B], dtype=tl.int32) + num_experts
            for _ in range(LOG_E):  # smallest e with block_ends[e] > b
                mid = (lo + hi) // 2
                go_right = tl.load(block_ends_ptr + mid, mask=lo < hi, other=0) <= offs_b
                lo = tl.where((lo < hi) & go_right, mid + 1, lo)
                hi = tl.where((lo < hi) & ~go_right, mid, hi)
        live = mask_b & (offs_b < total_blocks)
        owner = tl.where(live, lo, -1)
        tl.store(block_expert_ptr + offs_b, owner, mask=mask_b)
        # (names differ from role 1's: Triton merges names bound in both branches of a runtime if)
        if FUSED_PREFIX > 0:
            run_start = tl.gather(starts_e, tl.where(live, owner, 0), 0)
            run_count = tl.gather(cnt_e, tl.where(live, owner, 0), 0)
        else:
            run_start = tl.load(starts_ptr + owner, mask=live, other=0)
            run_count = tl.load(counts_ptr + owner, mask=live, other=0)
        offs_m = tl.arange(0, BLOCK_BM)
        pos = offs_b[:, None] * block_m + offs_m[None, :]  # [BLOCK_B, BLOCK_BM]
        in_block = mask_b[:, None] & (offs_m[None, :] < block_m)
        is_pad = (~live[:, None]) | (pos - run_start[:, None] >= run_count[:, None])
        tl.store(sorted_ids_ptr + pos, tl.zeros_like(pos) + N, mask=in_block & is_pad)


@triton.jit
def _store_slots(row_slots_ptr, sorted_slot_ptr, dest, offs_n, valid, TOPK, SLOT_OUT: tl.constexpr):
    """sorted_slot[dest] = row_slots[n // TOPK] for the valid pairs n (with SLOT_OUT)."""
    if SLOT_OUT:
        slot = tl.load(row_slots_ptr + offs_n // TOPK, mask=valid, other=-1)
        tl.store(sorted_slot_ptr + dest, slot, mask=valid)


@triton.jit
def _fill_pads(block_expert_ptr, sorted_ids_ptr, total, N, block_m, max_blocks, BLOCK_B: tl.constexpr):
    """block_expert = -1 for the blocks past the padded count `total`; sorted_ids = the pad marker N
    everywhere (the caller's scatter then overwrites the pairs' places)."""
    total_blocks = total // block_m
    for b0 in range(0, max_blocks, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        tl.store(block_expert_ptr + offs_b, tl.full([BLOCK_B], -1, tl.int32),
                 mask=(offs_b >= total_blocks) & (offs_b < max_blocks))
    for p0 in range(0, max_blocks * block_m, BLOCK_B):
        offs_p = p0 + tl.arange(0, BLOCK_B)
        tl.store(sorted_ids_ptr + offs_p, tl.zeros_like(offs_p) + N, mask=offs_p < max_blocks * block_m)


@triton.jit
def _moe_align_small_kernel(
    topk_ids_ptr, token_slot_ptr,
    sorted_ids_ptr, block_expert_ptr, num_padded_ptr,  # outputs
    row_slots_ptr, sorted_slot_ptr,  # [T] in, [max_padded] out (SLOT_OUT)
    N, TOPK, base_experts, num_experts, block_m, max_blocks,
    HAS_SLOT: tl.constexpr, SLOT_OUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_B: tl.constexpr, MAX_RUN_BLOCKS: tl.constexpr,  # cdiv(BLOCK_N, block_m): the most blocks one expert can own
    USE_PDL: tl.constexpr,
):
    """Tiny inputs (decode: N <= BLOCK_N pairs, num_experts < BLOCK_E): one program, registers only.

    One load of the ids, then counts (histogram), padded starts (cumsum), each pair's rank inside its
    expert (pairs before it with the same key: a BLOCK_N x BLOCK_N comparison) and its start (gather) are
    all computed in registers; the outputs are plain stores. The one CTA barrier orders the pad fill of
    sorted_ids before the scatter that overwrites part of it. No atomics, no global round trips.
    """
    pdl_trigger(USE_PDL)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    key, valid = _pair_key(topk_ids_ptr, token_slot_ptr, offs_n, mask_n, TOPK, base_experts, num_experts,
                           HAS_SLOT)  # sentinels and lanes past N: key = num_experts (< BLOCK_E)
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.where(offs_e < num_experts, tl.histogram(key, BLOCK_E), 0)
    padded = (counts + block_m - 1) // block_m * block_m
    starts = tl.cumsum(padded, axis=0) - padded
    total = tl.sum(padded, axis=0)
    before = (key[:, None] == key[None, :]) & (offs_n[None, :] < offs_n[:, None])
    rank = tl.sum(before.to(tl.int32), axis=1)
    dest = tl.gather(starts, key, 0) + rank
    # pads everywhere (from position 0: the scatter below overwrites the pairs' places), block owners,
    # -1 past the count
    _fill_pads(block_expert_ptr, sorted_ids_ptr, total, N, block_m, max_blocks, BLOCK_B)
    nblocks = padded // block_m
    for j in tl.static_range(MAX_RUN_BLOCKS):
        tl.store(block_expert_ptr + starts // block_m + j, offs_e, mask=j < nblocks)
    tl.store(num_padded_ptr, total)
    tl.debug_barrier()
    tl.store(sorted_ids_ptr + dest, offs_n, mask=valid)
    _store_slots(row_slots_ptr, sorted_slot_ptr, dest, offs_n, valid, TOPK, SLOT_OUT)


@triton.jit
def _virtual_ids_kernel(
    topk_ids_ptr, token_slot_ptr, vid_ptr,
    N, TOPK, base_experts,
    BLOCK_N: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    ids = tl.load(topk_ids_ptr + offs_n, mask=mask_n, other=-1)
    slot = tl.load(token_slot_ptr + offs_n // TOPK, mask=mask_n, other=-1)
    bad = (slot < 0) | (ids < 0) | (ids >= base_experts)
    tl.store(vid_ptr + offs_n, tl.where(bad, -1, slot * base_experts + ids), mask=mask_n)
