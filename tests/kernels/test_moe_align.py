"""Triton moe_align / virtual_expert_ids against the torch references (same contract, same edge cases).

Inside one expert the Triton order is whatever the atomics give, so runs are compared as multisets;
block_expert and num_padded must match exactly, and everything past num_padded is the pad marker.
"""

from __future__ import annotations

import pytest
import torch

from lorax.kernels import moe_align as moe_align_mod
from lorax.kernels.moe_align import (
    max_padded_size,
    moe_align,
    moe_align_ref,
    virtual_expert_ids,
    virtual_expert_ids_ref,
)


def _canonical(al, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Positions sorted by (expert of their block, value): equal for two valid alignments."""
    total = int(al.num_padded.item())
    ids = al.sorted_ids.long().cpu()
    owner = al.block_expert.long().cpu().repeat_interleave(block_m)
    live = ids[:total]
    key = owner[:total] * (ids.max().item() + 1) + live
    return torch.sort(key).values, ids[total:], total


def _check(topk_ids: torch.Tensor, num_experts: int, block_m: int, path: str | None = None) -> None:
    T, k = topk_ids.shape
    row_slots = torch.randint(-1, 5, (T,), dtype=torch.int32, device=topk_ids.device)
    ref = moe_align_ref(topk_ids, num_experts, block_m, row_slots=row_slots)
    got = moe_align(topk_ids, num_experts, block_m, path=path, row_slots=row_slots)
    n = topk_ids.numel()
    size = max_padded_size(n, num_experts, block_m)
    assert got.sorted_ids.shape == (size,) and got.block_expert.shape == (size // block_m,)
    assert torch.equal(got.num_padded.cpu(), ref.num_padded.cpu())
    assert torch.equal(got.block_expert.cpu(), ref.block_expert.cpu())
    key_ref, tail_ref, total = _canonical(ref, block_m)
    key_got, tail_got, _ = _canonical(got, block_m)
    assert torch.equal(key_got, key_ref)
    assert bool((tail_got == n).all()) and bool((tail_ref == n).all())
    # every valid pair appears exactly once, no sentinel pair appears
    flat = topk_ids.reshape(-1).cpu()
    valid = ((flat >= 0) & (flat < num_experts)).nonzero().reshape(-1)
    placed = got.sorted_ids[:total].long().cpu()
    assert torch.equal(torch.sort(placed[placed < n]).values, valid)
    # sorted_slot: each pair entry holds its token's slot (pad entries are unspecified in the Triton path)
    assert got.sorted_slot is not None and ref.sorted_slot is not None and got.sorted_slot.shape == (size,)
    slots = row_slots.cpu()
    for al in (got, ref):
        ids = al.sorted_ids.long().cpu()
        real = ids < n
        assert torch.equal(al.sorted_slot.cpu()[real], slots[ids[real] // k])
    assert bool((ref.sorted_slot.cpu()[ref.sorted_ids.cpu() >= n] == -1).all())


# (T, k, num_experts, block_m, id range low, id range high)
CASES = [
    (5, 2, 3, 4, -1, 4),  # sentinels on both sides (-1 and ids >= E)
    (1, 1, 1, 16, 0, 1),  # one expert
    (13, 3, 7, 4, 0, 7),  # odd sizes
    (33, 8, 128, 16, -1, 128),
    (40, 4, 8192, 16, -2, 8200),  # most experts empty
    (9, 8, 65536, 16, 0, 65536),  # no cap on the number of experts
    (17, 2, 5, 3, 0, 5),  # block_m not a power of two
    (300, 2, 4, 8, 0, 4),  # many pairs per expert, several scatter programs
    (8, 8, 128, 16, -1, 130),  # the small path's largest input (64 pairs), sentinels both sides
    (16, 8, 128, 16, -1, 130),  # 128 pairs: past the small path
    (3, 8, 1023, 16, 0, 1023),  # the small path's most experts
    (11, 8, 6, 16, 0, 6),  # 88 pairs on 6 experts: runs of several blocks
]
PATHS = ["multi", "small"]


def _fits(path: str, T: int, k: int, E: int) -> bool:
    return path != "small" or (T * k <= moe_align_mod.SMALL_MAX_PAIRS and E <= moe_align_mod.SMALL_MAX_EXPERTS)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("T,k,E,block_m,lo,hi", CASES)
def test_align_matches_ref(device: str, T: int, k: int, E: int, block_m: int, lo: int, hi: int, path: str) -> None:
    topk_ids = torch.randint(lo, hi, (T, k), dtype=torch.int32, device=device)
    if not _fits(path, T, k, E):
        with pytest.raises(ValueError, match="small path"):
            moe_align(topk_ids, E, block_m, path=path)
        return
    _check(topk_ids, E, block_m, path)


@pytest.mark.parametrize(
    "name,topk_ids,E",
    [
        ("empty input", torch.zeros(0, 2, dtype=torch.int32), 4),
        ("all sentinels", torch.full((6, 2), -1, dtype=torch.int32), 4),
        ("all ids past E", torch.full((3, 2), 9, dtype=torch.int32), 4),
        ("all on one expert", torch.full((7, 3), 2, dtype=torch.int32), 4),
        ("worked example", torch.tensor([[2, 0], [-1, 2]], dtype=torch.int32), 3),
    ],
)
def test_align_edge_cases(device: str, name: str, topk_ids: torch.Tensor, E: int) -> None:
    for path in PATHS:
        _check(topk_ids.to(device), E, 4, path)


def test_worked_example_exact(device: str) -> None:
    got = moe_align(torch.tensor([[2, 0], [-1, 2]], dtype=torch.int32, device=device), 3, 4)
    assert got.num_padded.tolist() == [8]
    assert got.block_expert.tolist()[:3] == [0, 2, -1]
    assert got.sorted_ids.tolist()[:2] == [1, 4] and sorted(got.sorted_ids.tolist()[4:8]) == [0, 3, 4, 4]


def test_zeros_scratch(device: str) -> None:
    """`zeros` hands back that many int32 zeros (fused_moe's per-block counters) on every path, the multi
    path's taken from the counts' fill: the counts the alignment counts in must not spill into it, and the
    alignment itself is unchanged."""
    topk_ids = torch.randint(-1, 9, (37, 4), dtype=torch.int32, device=device)
    plain = moe_align(topk_ids, 8, 16)
    for path in [p for p in PATHS if _fits(p, 37, 4, 8)]:
        got = moe_align(topk_ids, 8, 16, path=path, zeros=11)
        assert got.zeros is not None and got.zeros.shape == (11,) and got.zeros.dtype == torch.int32
        assert not bool(got.zeros.any())
        assert torch.equal(got.num_padded, plain.num_padded) and torch.equal(got.block_expert, plain.block_expert)
        assert torch.equal(_canonical(got, 16)[0], _canonical(plain, 16)[0])
    assert plain.zeros is None


@pytest.mark.parametrize("T,k,E,S", [(7, 2, 5, 3), (1, 1, 128, 4), (20, 8, 16, 2)])
def test_virtual_ids_and_fused_align(device: str, T: int, k: int, E: int, S: int) -> None:
    topk_ids = torch.randint(-1, E + 1, (T, k), dtype=torch.int32, device=device)  # sentinels both sides
    token_slot = torch.randint(-1, S, (T,), dtype=torch.int32, device=device)
    ref = virtual_expert_ids_ref(topk_ids, token_slot, E)
    got = virtual_expert_ids(topk_ids, token_slot, E)
    assert torch.equal(got, ref)
    assert bool((got[topk_ids < 0] < 0).all())  # an EP sentinel never turns into a valid id
    plain = moe_align(ref, S * E, 4)
    for path in [p for p in PATHS if _fits(p, T, k, S * E)]:
        fused = moe_align(topk_ids, S * E, 4, token_slot=token_slot, base_experts=E, path=path)
        assert torch.equal(fused.num_padded, plain.num_padded)
        assert torch.equal(fused.block_expert, plain.block_expert)
        assert torch.equal(_canonical(fused, 4)[0], _canonical(plain, 4)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("T,k,E", [(1, 8, 128), (16, 8, 128), (2048, 8, 128), (4096, 8, 512), (512, 2, 8),
                                   (64, 8, 65536)])
def test_align_gpu_large(T: int, k: int, E: int) -> None:
    topk_ids = torch.randint(-1, E, (T, k), dtype=torch.int32, device="cuda")
    for block_m in (16, 64):
        for path in PATHS:
            if _fits(path, T, k, E):
                _check(topk_ids, E, block_m, path)
