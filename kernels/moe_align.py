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
