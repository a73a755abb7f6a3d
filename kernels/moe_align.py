"""Sort (token, k) pairs by (virtual) expert and pad each expert's run to a multiple of BLOCK_M.

Contract (shared by the Triton kernel and `moe_align_ref`):

    inputs   topk_ids    [T, k] int32; an id < 0 or >= num_experts is a sentinel (no expert)
             num_experts host int (virtual experts: slots * E), block_m host int
    outputs  sorted_ids  [max_padded] int32   flat pair index n = t*k + j, grouped by expert, each
                                               group padded with the value T*k (a pad marker)
             block_expert [max_blocks] int32  expert of each BLOCK_M block; -1 for blocks past the
                                               device-side count (consumers exit on -1)
             num_padded   [1] int32           device-side number of valid entries of sorted_ids
             sorted_slot  [max_padded] int32  (with `row_slots` [T]) row_slots[t] of each entry's pair
                                               (t = n // k); unspecified at pad entries. None otherwise

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
    sorted_slot: torch.Tensor | None = None  # [max_padded] int32: the adapter slot of each entry's token
    zeros: torch.Tensor | None = None  # [zeros] int32 of the caller's, zero before the alignment's first launch


def max_padded_size(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Host bound on sorted_ids' length: each non-empty expert adds at most block_m - 1 pads."""
    nonempty = min(num_pairs, num_experts)
    size = num_pairs + nonempty * (block_m - 1)
    return max(block_m, -(-size // block_m) * block_m)


def moe_align_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                  row_slots: torch.Tensor | None = None) -> MoEAlignment:
    """Torch reference of the alignment (stable order inside each expert; pad entries of sorted_slot -1)."""
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
    sorted_slot = None
    if row_slots is not None:
        real = sorted_ids < num_pairs
        tok = torch.where(real, sorted_ids, 0).long() // max(topk_ids.shape[1], 1)
        sorted_slot = torch.where(real, row_slots.to(torch.int32)[tok] if num_pairs else sorted_ids, -1)
    return MoEAlignment(sorted_ids, block_expert, total.reshape(1).to(torch.int32), sorted_slot)


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
# Triton implementation (kernels in moe_align_kernels.py): count (atomics give each pair its rank) ->
# prefix sum -> scatter + block fill. Three launches plus one memset of the [E] counter (two launches below
# FUSED_PREFIX_MAX_EXPERTS experts: the scatter takes the prefix sum itself); no host sync, no sort, no cap
# on num_experts. Decode sizes take one launch, everything in registers (<= 64 pairs, < 1024 experts).
# (A one-program version of the three passes for <= 1024 pairs was dropped: its phases run one after another
# in one CTA, and on an H100 it took 8-36 us where these launches take 6-7, e.g. Qwen3-30B-A3B at 128 tokens
# 414.3 -> 408.3 us for the whole layer; docs/KERNEL_NOTES.md.)
# ----------------------------------------------------------------------------------------------------

import triton  # noqa: E402

from lorax.kernels._common import interpreting, use_pdl  # noqa: E402,F401  (interpreting: re-exported)
from lorax.kernels.moe_align_kernels import (  # noqa: E402
    _moe_align_small_kernel,
    _moe_count_kernel,
    _moe_prefix_kernel,
    _moe_scatter_kernel,
    _virtual_ids_kernel,
)

# registers-only path (decode steps of up to 8 tokens at top-8): pairs and experts (+ the sentinel bucket);
# tests force either path with `path=`. Its rank step compares every pair with every other: on an H100 the
# Qwen3-30B-A3B layer took 2-3 us less with it at 8 tokens (64 pairs), 3-4 us more at 16 (128 pairs)
SMALL_MAX_PAIRS = 64
SMALL_MAX_EXPERTS = 1023
# three-pass path: below this many experts the scatter takes the counts' prefix sum itself, in registers
FUSED_PREFIX_MAX_EXPERTS = 1024


def moe_align(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_m: int,
    *,
    token_slot: torch.Tensor | None = None,
    base_experts: int | None = None,
    row_slots: torch.Tensor | None = None,
    out: MoEAlignment | None = None,
    path: str | None = None,
    zeros: int = 0,
) -> MoEAlignment:
    """Triton alignment with the contract above, no host sync. Two paths by size, `path` forces one:
    "multi" (3 launches + a memset, any size), "small" (one launch, registers only, <= SMALL_MAX_PAIRS pairs: decode).

    With `token_slot` [T] and `base_experts` E, the virtual ids slot * E + e are formed inside the first
    pass (num_experts must then be slots * E). With `row_slots` [T] int32 (the MoE LoRA's token slots), the
    scatter also writes each entry's slot into sorted_slot, so that the GEMMs read a block's slots beside
    its pair ids instead of one dependent load later. `out` may hold preallocated buffers of the right
    sizes (for CUDA graphs); they are fully overwritten (sorted_slot at pair entries). `zeros` > 0 returns
    that many int32 zeros in `zeros` (fused_moe's per-block counters), zeroed with the counts in the multi
    path (one fill for both).
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
    if row_slots is not None and (row_slots.shape != (topk_ids.shape[0],) or row_slots.dtype != torch.int32):
        raise ValueError("moe_align: row_slots must be [T] int32")
    ids = topk_ids.contiguous()
    device = ids.device
    num_pairs = ids.numel()
    topk = ids.shape[1]
    max_padded = max_padded_size(num_pairs, num_experts, block_m)
    max_blocks = max_padded // block_m
    slot_out = row_slots is not None
    if out is None:
        out = MoEAlignment(
            torch.empty(max_padded, dtype=torch.int32, device=device),
            torch.empty(max_blocks, dtype=torch.int32, device=device),
            torch.empty(1, dtype=torch.int32, device=device),
            torch.empty(max_padded, dtype=torch.int32, device=device) if slot_out else None,
        )
    elif out.sorted_ids.numel() != max_padded or out.block_expert.numel() != max_blocks or (
            slot_out and (out.sorted_slot is None or out.sorted_slot.numel() != max_padded)):
        raise ValueError(f"moe_align: out buffers must be sized {max_padded} / {max_blocks}")
    slot_arg = token_slot if has_slot else ids
    rows_src = row_slots.contiguous() if row_slots is not None else ids
    rows_dst = out.sorted_slot if out.sorted_slot is not None and slot_out else out.sorted_ids
    if path is None:
        path = "small" if num_pairs <= SMALL_MAX_PAIRS and num_experts <= SMALL_MAX_EXPERTS else "multi"
    if path not in ("small", "multi"):
        raise ValueError(f"moe_align: unknown path {path!r}")
    if path == "small" and (num_pairs > SMALL_MAX_PAIRS or num_experts > SMALL_MAX_EXPERTS):
        raise ValueError(f"moe_align: the small path takes <= {SMALL_MAX_PAIRS} pairs and <= {SMALL_MAX_EXPERTS} experts")
    if zeros and path != "multi":
        out = out._replace(zeros=torch.zeros(zeros, dtype=torch.int32, device=device))
    if path == "small":
        block_n = max(16, triton.next_power_of_2(num_pairs))
        _moe_align_small_kernel[(1,)](
            ids, slot_arg, out.sorted_ids, out.block_expert, out.num_padded, rows_src, rows_dst,
            num_pairs, topk, base_experts or num_experts, num_experts, block_m, max_blocks,
            HAS_SLOT=has_slot, SLOT_OUT=slot_out, BLOCK_N=block_n, BLOCK_E=triton.next_power_of_2(num_experts + 1), BLOCK_B=1024,
            MAX_RUN_BLOCKS=triton.cdiv(block_n, block_m), num_warps=4, USE_PDL=use_pdl(device),
        )
        return out
    counts = torch.zeros(num_experts + zeros, dtype=torch.int32, device=device)
    if zeros:
        counts, out = counts[:num_experts], out._replace(zeros=counts[num_experts:])
    work = torch.empty(2 * num_experts + max(num_pairs, 1), dtype=torch.int32, device=device)
    starts, block_ends, rank = work[:num_experts], work[num_experts : 2 * num_experts], work[2 * num_experts :]
    block_n = 256
    pair_programs = triton.cdiv(num_pairs, block_n)
    # up to FUSED_PREFIX_MAX_EXPERTS experts the scatter takes the prefix sum itself (one launch less)
    fused = triton.next_power_of_2(num_experts + 1) if num_experts < FUSED_PREFIX_MAX_EXPERTS else 0
    pdl = use_pdl(device)
    if pair_programs:
        _moe_count_kernel[(pair_programs,)](
            ids, slot_arg, counts, rank, num_pairs, topk, base_experts or num_experts, num_experts,
            HAS_SLOT=has_slot, BLOCK_N=block_n, USE_PDL=pdl,
        )
    if not fused:
        _moe_prefix_kernel[(1,)](counts, starts, block_ends, out.num_padded, num_experts, block_m, BLOCK_E=1024)
    block_b = 16
    _moe_scatter_kernel[(pair_programs + triton.cdiv(max_blocks, block_b),)](
        ids, slot_arg, counts, starts, block_ends, out.num_padded, rank, out.sorted_ids, out.block_expert,
        rows_src, rows_dst,
        num_pairs, topk, base_experts or num_experts, num_experts, block_m, max_blocks, pair_programs,
        HAS_SLOT=has_slot, SLOT_OUT=slot_out, BLOCK_N=block_n, BLOCK_B=block_b, BLOCK_BM=triton.next_power_of_2(block_m),
        LOG_E=max(1, num_experts.bit_length()), FUSED_PREFIX=fused, USE_PDL=pdl and bool(pair_programs),
        launch_pdl=pdl and bool(pair_programs),
    )
    return out


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
