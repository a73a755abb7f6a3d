"""Sort (token, k) pairs by (virtual) expert and pad each expert's run to a multiple of BLOCK_M.

Contract (shared by the Triton kernel and `moe_align_ref`):

    inputs   topk_ids    [T, k] int32; an id < 0 or >= num_experts is a sentinel (no expert)
             num_experts host int (virtual experts: slots * E), block_m host int
    outputs  sorted_ids  [max_padded] int32   flat pair index n = t*k + j, grouped by expert, each
                                               group padded with the value T*k (a pad marker)
             block_expert [max_blocks] int32  expert of each BLOCK_M block; -1 for blocks past the
                                               device-side count (consumers exit on -1)
             num_padded   [1] int32           device-side number of valid entries of sorted_ids

Sentinel pairs are never placed in sorted_ids: they land in a bucket that no block points at, so every
consumer skips them at no cost. Output sizes come from host bounds only (`max_padded_size`), so no
host sync and no cap on num_experts.

Worked example, block_m = 4, num_experts = 3, topk_ids = [[2, 0], [-1, 2]] (T=2, k=2, pad marker 4):
    expert 0 <- pair 1; expert 2 <- pairs 0, 3; pair 2 is a sentinel
    sorted_ids   = [1, 4, 4, 4,  0, 3, 4, 4,  <unused...>]
    block_expert = [0, 2, -1, ...]            num_padded = [8]
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class MoEAlignment(NamedTuple):
    sorted_ids: torch.Tensor  # [max_padded] int32, pad marker = num_pairs
    block_expert: torch.Tensor  # [max_padded // block_m] int32, -1 = no block
    num_padded: torch.Tensor  # [1] int32 (device)


def max_padded_size(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Host bound on sorted_ids' length: each non-empty expert adds at most block_m - 1 pads."""
    nonempty = min(num_pairs, num_experts)
    size = num_pairs + nonempty * (block_m - 1)
    return max(block_m, -(-size // block_m) * block_m)


def moe_align_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    """Torch reference of the alignment (stable order inside each expert)."""
    assert topk_ids.dim() == 2, "topk_ids must be [T, k]"
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_pairs = flat.numel()
    max_padded = max_padded_size(num_pairs, num_experts, block_m)
    sorted_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=device)
    block_expert = torch.full((max_padded // block_m,), -1, dtype=torch.int32, device=device)
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))  # sentinel bucket = num_experts
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded  # [E] start of each expert's run
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    # rank of each pair inside its expert's run
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_pairs, device=device) - first[sorted_key]
    keep = sorted_key < num_experts
    dest = starts[sorted_key[keep]] + rank[keep]
    sorted_ids[dest] = order[keep].to(torch.int32)
    total = padded.sum()
    nblocks = padded // block_m
    block_starts = starts // block_m
    # block b belongs to expert e when block_starts[e] <= b < block_starts[e] + nblocks[e]
    b = torch.arange(block_expert.numel(), device=device)
    owner = torch.searchsorted(block_starts + nblocks, b, right=True)
    in_range = b < total // block_m
    block_expert = torch.where(in_range, owner.clamp(max=num_experts - 1).to(torch.int32), block_expert)
    return MoEAlignment(sorted_ids, block_expert, total.reshape(1).to(torch.int32))


def virtual_expert_ids_ref(topk_ids: torch.Tensor, token_slot: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, k] virtual ids slot * E + e; negative (sentinel) when the slot or the expert id is negative.

    A negative expert id (an EP sentinel) stays negative whatever the slot: it must never turn into a
    valid virtual id.
    """
    slot = token_slot.to(torch.int32).unsqueeze(1)
    vid = slot * num_experts + topk_ids.to(torch.int32)
    neg = (slot < 0) | (topk_ids < 0) | (topk_ids >= num_experts)
    return torch.where(neg, torch.full_like(vid, -1), vid)


# ----------------------------------------------------------------------------------------------------
# Triton implementation: count (atomics give each pair its rank) -> prefix sum -> scatter + block fill.
# Three launches plus one memset of the [E] counter; no host sync, no sort, no cap on num_experts.
# Smaller inputs take one launch: the same passes in one program (<= 1024 pairs), or, at decode sizes,
# everything in registers (<= 128 pairs, < 1024 experts).
# ----------------------------------------------------------------------------------------------------


import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lorax.kernels._common import interpreting, pdl_trigger, use_pdl  # noqa: E402,F401  (interpreting: re-exported)


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
    HAS_SLOT: tl.constexpr, BLOCK_N: tl.constexpr,
):
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
    # sizes
    N, TOPK, base_experts, num_experts, block_m, max_blocks, pair_programs,
    # meta
    HAS_SLOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_BM: tl.constexpr,
    LOG_E: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < pair_programs:
        # role 1: put each valid pair at start[expert] + rank
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        key, valid = _pair_key(topk_ids_ptr, token_slot_ptr, offs_n, mask_n, TOPK, base_experts,
                               num_experts, HAS_SLOT)
        rank = tl.load(rank_ptr + offs_n, mask=valid, other=0)
        start = tl.load(starts_ptr + key, mask=valid, other=0)
        tl.store(sorted_ids_ptr + start + rank, offs_n, mask=valid)
    else:
        # role 2: BLOCK_B blocks: owner expert by binary search over block_ends, pads past each count
        offs_b = (pid - pair_programs) * BLOCK_B + tl.arange(0, BLOCK_B)
        mask_b = offs_b < max_blocks
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
        run_start = tl.load(starts_ptr + owner, mask=live, other=0)
        run_count = tl.load(counts_ptr + owner, mask=live, other=0)
        offs_m = tl.arange(0, BLOCK_BM)
        pos = offs_b[:, None] * block_m + offs_m[None, :]  # [BLOCK_B, BLOCK_BM]
        in_block = mask_b[:, None] & (offs_m[None, :] < block_m)
        is_pad = (~live[:, None]) | (pos - run_start[:, None] >= run_count[:, None])
        tl.store(sorted_ids_ptr + pos, tl.zeros_like(pos) + N, mask=in_block & is_pad)


@triton.jit
def _moe_align_one_program_kernel(
    topk_ids_ptr, token_slot_ptr,
    counts_ptr, starts_ptr, rank_ptr,  # [E], [E], [N] int32 work
    sorted_ids_ptr, block_expert_ptr, num_padded_ptr,  # outputs
    N, TOPK, base_experts, num_experts, block_m, max_blocks,
    HAS_SLOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Small inputs: the three passes in one program, phases separated by CTA barriers.

    Global writes of one CTA are visible to its own threads after a barrier; counters are read back
    with volatile loads so no stale L1 line is used. Saves two launches and the memset on decode.
    Block owners and pads are written expert by expert (stores only: no dependent-load chains, which
    a single program would pay for in latency).

    With PDL the next launch (fused_moe's LoRA shrink or gate_up GEMM, both waiting before they read
    anything) is let in at once, so its launch latency hides behind this program.
    """
    pdl_trigger(USE_PDL)
    for e0 in range(0, num_experts, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        tl.store(counts_ptr + offs_e, tl.zeros([BLOCK_E], dtype=tl.int32), mask=offs_e < num_experts)
    tl.debug_barrier()
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        key, valid = _pair_key(topk_ids_ptr, token_slot_ptr, offs_n, mask_n, TOPK, base_experts,
                               num_experts, HAS_SLOT)
        rank = tl.atomic_add(counts_ptr + key, tl.full([BLOCK_N], 1, tl.int32), mask=valid)
        tl.store(rank_ptr + offs_n, rank, mask=mask_n)
    tl.debug_barrier()
    carry = tl.zeros([], dtype=tl.int32)
    for e0 in range(0, num_experts, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < num_experts
        cnt = tl.load(counts_ptr + offs_e, mask=mask_e, other=0, volatile=True)
        padded = (cnt + block_m - 1) // block_m * block_m
        start = tl.cumsum(padded, axis=0) + carry - padded
        tl.store(starts_ptr + offs_e, start, mask=mask_e)
        # owner of each of the expert's blocks, then the pads after its count (runs are disjoint)
        nblocks = padded // block_m
        for j in range(0, tl.max(nblocks, axis=0)):
            tl.store(block_expert_ptr + start // block_m + j, offs_e, mask=mask_e & (j < nblocks))
        for j in range(0, block_m - 1):
            tl.store(sorted_ids_ptr + start + cnt + j, tl.zeros_like(offs_e) + N, mask=mask_e & (cnt + j < padded))
        carry += tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, carry)
    # past the device-side count: no block, pad markers
    total_blocks = carry // block_m
    for b0 in range(0, max_blocks, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        tl.store(block_expert_ptr + offs_b, tl.full([BLOCK_B], -1, tl.int32),
                 mask=(offs_b >= total_blocks) & (offs_b < max_blocks))
    for p0 in range(0, max_blocks * block_m, BLOCK_B):
        offs_p = p0 + tl.arange(0, BLOCK_B)
        tl.store(sorted_ids_ptr + offs_p, tl.zeros_like(offs_p) + N,
                 mask=(offs_p >= carry) & (offs_p < max_blocks * block_m))
    tl.debug_barrier()
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        key, valid = _pair_key(topk_ids_ptr, token_slot_ptr, offs_n, mask_n, TOPK, base_experts,
                               num_experts, HAS_SLOT)
        rank = tl.load(rank_ptr + offs_n, mask=valid, other=0, volatile=True)
        run_start = tl.load(starts_ptr + key, mask=valid, other=0, volatile=True)
        tl.store(sorted_ids_ptr + run_start + rank, offs_n, mask=valid)


@triton.jit
def _moe_align_small_kernel(
    topk_ids_ptr, token_slot_ptr,
    sorted_ids_ptr, block_expert_ptr, num_padded_ptr,  # outputs
    N, TOPK, base_experts, num_experts, block_m, max_blocks,
    HAS_SLOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr,
    MAX_RUN_BLOCKS: tl.constexpr,  # cdiv(BLOCK_N, block_m): the most blocks one expert can own
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
    # pads everywhere, block owners, -1 past the count
    for p0 in range(0, max_blocks * block_m, BLOCK_B):
        offs_p = p0 + tl.arange(0, BLOCK_B)
        tl.store(sorted_ids_ptr + offs_p, tl.zeros_like(offs_p) + N, mask=offs_p < max_blocks * block_m)
    nblocks = padded // block_m
    for j in tl.static_range(MAX_RUN_BLOCKS):
        tl.store(block_expert_ptr + starts // block_m + j, offs_e, mask=j < nblocks)
    total_blocks = total // block_m
    for b0 in range(0, max_blocks, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        tl.store(block_expert_ptr + offs_b, tl.full([BLOCK_B], -1, tl.int32),
                 mask=(offs_b >= total_blocks) & (offs_b < max_blocks))
    tl.store(num_padded_ptr, total)
    tl.debug_barrier()
    tl.store(sorted_ids_ptr + dest, offs_n, mask=valid)


# one-launch paths when the whole alignment is small; tests force each path (`path=`)
ONE_PROGRAM_MAX_PAIRS = 1024
ONE_PROGRAM_MAX_EXPERTS = 4096
# registers-only path (decode steps of up to 16 tokens at top-8): pairs and experts (+ the sentinel bucket)
SMALL_MAX_PAIRS = 128
SMALL_MAX_EXPERTS = 1023


def moe_align(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_m: int,
    *,
    token_slot: torch.Tensor | None = None,
    base_experts: int | None = None,
    out: MoEAlignment | None = None,
    path: str | None = None,
) -> MoEAlignment:
    """Triton alignment with the contract above, no host sync. Three paths by size, `path` forces one:
    "multi" (3 launches + a memset, any size), "one_program" (one launch, <= ONE_PROGRAM_MAX_PAIRS pairs),
    "small" (one launch, registers only, <= SMALL_MAX_PAIRS pairs: decode).

    With `token_slot` [T] and `base_experts` E, the virtual ids slot * E + e are formed inside the first
    pass (num_experts must then be slots * E). `out` may hold preallocated buffers of the right sizes
    (for CUDA graphs); they are fully overwritten.
    """
    if topk_ids.dim() != 2 or topk_ids.dtype != torch.int32:
        raise ValueError(f"moe_align: topk_ids must be [T, k] int32, got {tuple(topk_ids.shape)} {topk_ids.dtype}")
    if num_experts < 1 or block_m < 1:
        raise ValueError(f"moe_align: num_experts ({num_experts}) and block_m ({block_m}) must be >= 1")
    has_slot = token_slot is not None
    if has_slot:
        assert token_slot is not None
        if base_experts is None or token_slot.shape != (topk_ids.shape[0],) or token_slot.dtype != torch.int32:
            raise ValueError("moe_align: token_slot must be [T] int32 and base_experts given")
    ids = topk_ids.contiguous()
    device = ids.device
    num_pairs = ids.numel()
    topk = ids.shape[1]
    max_padded = max_padded_size(num_pairs, num_experts, block_m)
    max_blocks = max_padded // block_m
    if out is None:
        out = MoEAlignment(
            torch.empty(max_padded, dtype=torch.int32, device=device),
            torch.empty(max_blocks, dtype=torch.int32, device=device),
            torch.empty(1, dtype=torch.int32, device=device),
        )
    elif out.sorted_ids.numel() != max_padded or out.block_expert.numel() != max_blocks:
        raise ValueError(f"moe_align: out buffers must be sized {max_padded} / {max_blocks}")
    slot_arg = token_slot if has_slot else ids
    if path is None:
        path = ("small" if num_pairs <= SMALL_MAX_PAIRS and num_experts <= SMALL_MAX_EXPERTS else
                "one_program" if num_pairs <= ONE_PROGRAM_MAX_PAIRS and num_experts <= ONE_PROGRAM_MAX_EXPERTS else
                "multi")
    if path not in ("small", "one_program", "multi"):
        raise ValueError(f"moe_align: unknown path {path!r}")
    if path == "small" and (num_pairs > SMALL_MAX_PAIRS or num_experts > SMALL_MAX_EXPERTS):
        raise ValueError(f"moe_align: the small path takes <= {SMALL_MAX_PAIRS} pairs and <= {SMALL_MAX_EXPERTS} experts")
    if path == "small":
        block_n = max(16, triton.next_power_of_2(num_pairs))
        _moe_align_small_kernel[(1,)](
            ids, slot_arg, out.sorted_ids, out.block_expert, out.num_padded,
            num_pairs, topk, base_experts or num_experts, num_experts, block_m, max_blocks,
            HAS_SLOT=has_slot, BLOCK_N=block_n, BLOCK_E=triton.next_power_of_2(num_experts + 1), BLOCK_B=1024,
            MAX_RUN_BLOCKS=triton.cdiv(block_n, block_m), num_warps=8 if block_n > 64 else 4, USE_PDL=use_pdl(device),
        )
        return out
    if path == "one_program":
        work = torch.empty(2 * num_experts + max(num_pairs, 1), dtype=torch.int32, device=device)
        counts, starts, rank = work[:num_experts], work[num_experts : 2 * num_experts], work[2 * num_experts :]
        _moe_align_one_program_kernel[(1,)](
            ids, slot_arg, counts, starts, rank, out.sorted_ids, out.block_expert, out.num_padded,
            num_pairs, topk, base_experts or num_experts, num_experts, block_m, max_blocks,
            HAS_SLOT=has_slot, BLOCK_N=256, BLOCK_E=1024, BLOCK_B=1024, num_warps=8, USE_PDL=use_pdl(device),
        )
        return out
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    work = torch.empty(2 * num_experts + max(num_pairs, 1), dtype=torch.int32, device=device)
    starts, block_ends, rank = work[:num_experts], work[num_experts : 2 * num_experts], work[2 * num_experts :]
    block_n = 256
    pair_programs = triton.cdiv(num_pairs, block_n)
    if pair_programs:
        _moe_count_kernel[(pair_programs,)](
            ids, slot_arg, counts, rank, num_pairs, topk, base_experts or num_experts, num_experts,
            HAS_SLOT=has_slot, BLOCK_N=block_n,
        )
    _moe_prefix_kernel[(1,)](counts, starts, block_ends, out.num_padded, num_experts, block_m, BLOCK_E=1024)
    block_b = 16
    _moe_scatter_kernel[(pair_programs + triton.cdiv(max_blocks, block_b),)](
        ids, slot_arg, counts, starts, block_ends, out.num_padded, rank, out.sorted_ids, out.block_expert,
        num_pairs, topk, base_experts or num_experts, num_experts, block_m, max_blocks, pair_programs,
        HAS_SLOT=has_slot, BLOCK_N=block_n, BLOCK_B=block_b, BLOCK_BM=triton.next_power_of_2(block_m),
        LOG_E=max(1, num_experts.bit_length()),
    )
    return out


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


def virtual_expert_ids(topk_ids: torch.Tensor, token_slot: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Triton `virtual_expert_ids_ref`: [T, k] int32 slot * E + e, -1 for any sentinel (never a valid id)."""
    if topk_ids.dim() != 2 or topk_ids.dtype != torch.int32 or token_slot.shape != (topk_ids.shape[0],):
        raise ValueError("virtual_expert_ids: topk_ids must be [T, k] int32 and token_slot [T]")
    ids = topk_ids.contiguous()
    vid = torch.empty_like(ids)
    n = ids.numel()
    if n:
        _virtual_ids_kernel[(triton.cdiv(n, 1024),)](ids, token_slot.to(torch.int32).contiguous(), vid, n,
                                                     ids.shape[1], num_experts, BLOCK_N=1024)
    return vid
