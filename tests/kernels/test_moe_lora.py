# ruff: noqa: E741  (I is the expert intermediate size, as in the kernel contracts)
"""MoE LoRA inside the Triton fused_moe against fused_moe_ref with MoELoraArgs.

Slabs follow kernels/moe_lora.py: zero past each slot's rank, all-zero for empty slots; shared-outer
slots carry shared_gate_up_A / shared_down_B and zero per-expert gate_up_A / down_B.
"""

from __future__ import annotations

import pytest
import torch
from test_fused_moe import TOL, assert_close, make_moe, ref_fp32

from lorax.kernels.fused_moe import fused_moe, moe_config
from lorax.kernels.moe_align import moe_align
from lorax.kernels.moe_lora import MoELoraArgs, lora_block_r, moe_lora_shrink, use_compact


def make_lora(T: int, H: int, I: int, E: int, ranks: list[int | None], slots: torch.Tensor,
              dtype: torch.dtype, device: str, shared: tuple[int, ...] = ()) -> MoELoraArgs:
    """ranks[s] = rank of slot s (None = empty slot); slot ids in `shared` use the shared-outer form."""
    S = len(ranks)
    R = max([r for r in ranks if r] or [1])
    def rnd(*shape: int, fan: int) -> torch.Tensor:
        return torch.randn(*shape, device=device) / fan**0.5
    gu_a, gu_b = rnd(S, E, 2 * R, H, fan=H), rnd(S, E, 2 * I, R, fan=R)
    d_a, d_b = rnd(S, E, R, I, fan=I), rnd(S, E, H, R, fan=R)
    sh_a, sh_b = rnd(S, 2 * R, H, fan=H), rnd(S, H, R, fan=R)
    for s, r in enumerate(ranks):
        r = r or 0
        gu_a[s, :, r:R] = 0
        gu_a[s, :, R + r:] = 0
        gu_b[s, :, :, r:] = 0
        d_a[s, :, r:] = 0
        d_b[s, :, :, r:] = 0
        sh_a[s, r:R] = 0
        sh_a[s, R + r:] = 0
        sh_b[s, :, r:] = 0
        if s in shared:
            gu_a[s] = 0
            d_b[s] = 0
        else:
            sh_a[s] = 0
            sh_b[s] = 0
    cast = lambda t: t.to(dtype)
    return MoELoraArgs(slots.to(device), cast(gu_a), cast(gu_b), cast(d_a), cast(d_b),
                       cast(sh_a) if shared else None, cast(sh_b) if shared else None)


# (name, T, E, k, ranks, slot pattern, shared slots, id low, id high)
CASES = [
    ("rank 1", 9, 4, 2, [1, 1], "mixed", (), 0, 4),
    ("max rank 16", 7, 3, 2, [16, 16, 16], "mixed", (), 0, 3),
    ("rank 32", 5, 4, 2, [32, 4], "mixed", (), 0, 4),
    ("mixed ranks, empty slot", 13, 5, 3, [2, 8, None], "mixed", (), 0, 5),
    ("all tokens on one adapter", 11, 4, 2, [4, 4], "one", (), 0, 4),
    ("sentinel ids with adapters", 12, 4, 2, [4, 8], "mixed", (), -1, 6),
    ("shared-outer mixed with standard", 10, 4, 2, [4, 8, 4], "mixed", (0, 2), 0, 4),
    ("shared-outer, sentinels", 9, 3, 3, [8], "mixed", (0,), -1, 4),
    ("slots in two stacked groups", 14, 4, 2, [8, 4, 8, None, 2, 8], "mixed", (1, 4), -1, 4),
]


def _slots(pattern: str, T: int, S: int) -> torch.Tensor:
    if pattern == "one":
        return torch.full((T,), S - 1, dtype=torch.int32)
    return torch.randint(-1, S, (T,), dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,T,E,k,ranks,pattern,shared,lo,hi", CASES)
def test_moe_lora_matches_ref(device: str, dtype: torch.dtype, name: str, T: int, E: int, k: int,
                              ranks: list[int | None], pattern: str, shared: tuple[int, ...], lo: int,
                              hi: int) -> None:
    H, I = 32, 24
    x, w13, w2, w, ids = make_moe(T, H, I, E, k, dtype, device, lo, hi)
    lora = make_lora(T, H, I, E, ranks, _slots(pattern, T, len(ranks)), dtype, device, shared)
    ref = ref_fp32(x, w13, w2, w, ids, lora)
    base = ref_fp32(x, w13, w2, w, ids)
    # the LoRA must move the output well past the tolerance, or this test could not fail
    assert (ref - base).abs().max().item() > 10 * TOL[dtype] * ref.abs().max().item()
    assert_close(fused_moe(x, w13, w2, w, ids, lora), ref, dtype)


@pytest.mark.parametrize("prefetch", [0, 1])
@pytest.mark.parametrize("split,block_n", [(1, 16), (3, 16), (2, 32)])
def test_k_split_and_tile_partials(device: str, split: int, block_n: int, prefetch: int) -> None:
    """The shrink's K-split partials and the down-shrink per-I-tile partials sum to the same delta, with the
    LoRA tiles loaded in the epilogues or (PREFETCH) before the main loops."""
    T, H, I, E, k = 10, 48, 40, 3, 2
    x, w13, w2, w, ids = make_moe(T, H, I, E, k, torch.float32, device)
    # 3 slots stacked as 4 (the fourth column block past S is masked), one of them empty
    lora = make_lora(T, H, I, E, [4, None, 8], _slots("mixed", T, 3), torch.float32, device, (2,))
    cfg = dict(BLOCK_M=16, BLOCK_N_GU=block_n, BLOCK_K_GU=16, BLOCK_N_D=16, BLOCK_K_D=16, GROUP_M=2,
               SPLIT=split, num_warps=4, num_stages=1, PREFETCH=prefetch)
    assert_close(fused_moe(x, w13, w2, w, ids, lora, config=cfg), ref_fp32(x, w13, w2, w, ids, lora),
                 torch.float32)


@pytest.mark.parametrize("block_m,stack_elems", [(16, 256), (16, 512), (16, 4096), (64, 1024), (128, 8192)])
def test_slot_stacking_widths(device: str, block_m: int, stack_elems: int) -> None:
    """A config's STACK_ELEMS sets how many slots each epilogue dot stacks (1, 2, 4 at BLOCK_M 16, rank 16; 1 at
    64; 4 at 128), and the shrink stacks by its own bound (4 slots at every BLOCK_M here): 5 slots then take
    several slot groups, each group's rows picked by their own slot."""
    T, H, I, E, k = 21, 32, 24, 3, 2
    x, w13, w2, w, ids = make_moe(T, H, I, E, k, torch.float32, device)
    lora = make_lora(T, H, I, E, [16, 8, None, 16, 1], _slots("mixed", T, 5), torch.float32, device, (3,))
    cfg = dict(BLOCK_M=block_m, BLOCK_N_GU=16, BLOCK_K_GU=16, BLOCK_N_D=16, BLOCK_K_D=16, GROUP_M=1,
               SPLIT=2 if block_m == 16 else 1, num_warps=4, num_stages=1, STACK_ELEMS=stack_elems)
    assert_close(fused_moe(x, w13, w2, w, ids, lora, config=cfg), ref_fp32(x, w13, w2, w, ids, lora),
                 torch.float32)


@pytest.mark.parametrize("block_m,split,prefetch,E", [(16, 3, 1, 2), (16, 1, 1, 2), (16, 2, 0, 2), (32, 1, 0, 2),
                                                       (16, 3, 1, 12), (16, 1, 0, 12)])
def test_epilogue_slot_groups_by_the_blocks_slots(device: str, block_m: int, split: int, prefetch: int,
                                                  E: int) -> None:
    """The epilogue path with more slots than one group: grouped by each block's own distinct slots (COMPACT,
    the default there), with group 0's tiles prefetched or not, equals the reference and the grouping by every
    registered slot; mixed ranks, empty slots, shared-outer slots, tokens without an adapter and sentinel
    experts; 2 experts: blocks holding up to 16 distinct slots (past one group: by slot), 12 experts: blocks of a
    few rows (one group of their own slots)."""
    T, H, I, k, S = 23, 40, 24, 2, 19
    x, w13, w2, w, ids = make_moe(T, H, I, E, k, torch.float32, device, -1, E + 1)
    ranks = [[1, 16, 4, None, 8][s % 5] for s in range(S)]
    lora = make_lora(T, H, I, E, ranks, _slots("mixed", T, S), torch.float32, device, (2, 11))
    cfg = dict(BLOCK_M=block_m, BLOCK_N_GU=16, BLOCK_K_GU=16, BLOCK_N_D=16, BLOCK_K_D=16, GROUP_M=1, SPLIT=split,
               num_warps=4, num_stages=1, PREFETCH=prefetch)
    got = fused_moe(x, w13, w2, w, ids, lora, config=cfg)
    assert_close(got, ref_fp32(x, w13, w2, w, ids, lora), torch.float32)
    assert_close(got, fused_moe(x, w13, w2, w, ids, lora, config={**cfg, "COMPACT": 0}), torch.float32)


@pytest.mark.parametrize("block_m", [16, 64])
def test_wide_intermediate_partials_loop(device: str, block_m: int) -> None:
    """I / BLOCK_N_GU = 33 down-shrink partials per pair. BLOCK_M 64: one slot per group and 4 partials per
    load, so the down kernel sums them in a loop (past the unrolled 8 loads); BLOCK_M 16: both slots in one
    group, too many partials to hold across the main loop, so each row's own are summed after it."""
    T, H, I, E, k = 4, 32, 528, 2, 1
    x, w13, w2, w, ids = make_moe(T, H, I, E, k, torch.float32, device)
    lora = make_lora(T, H, I, E, [4, 8], torch.tensor([0, 1, -1, 1], dtype=torch.int32), torch.float32, device, (0,))
    cfg = dict(BLOCK_M=block_m, BLOCK_N_GU=16, BLOCK_K_GU=16, BLOCK_N_D=16, BLOCK_K_D=64, GROUP_M=1, SPLIT=1,
               num_warps=4, num_stages=1, PREFETCH=1)
    assert_close(fused_moe(x, w13, w2, w, ids, lora, config=cfg), ref_fp32(x, w13, w2, w, ids, lora),
                 torch.float32)


def test_no_adapter_tokens_cost_nothing_and_change_nothing(device: str) -> None:
    """Every slot -1: the LoRA launches do no work and the output equals the base kernel (bit for bit under
    the interpreter; on a GPU the two compiled kernels may order the MMA sums differently)."""
    T, H, I, E, k = 9, 32, 24, 4, 2
    x, w13, w2, w, ids = make_moe(T, H, I, E, k, torch.float32, device)
    lora = make_lora(T, H, I, E, [4, 4], torch.full((T,), -1, dtype=torch.int32), torch.float32, device, (1,))
    got, base = fused_moe(x, w13, w2, w, ids, lora), fused_moe(x, w13, w2, w, ids)
    if device == "cpu":
        assert torch.equal(got, base)
    else:
        assert (got - base).abs().max().item() <= 1e-6 * base.abs().max().item()


# LoRA K step mode (config LORA_K): (name, T, E, k, ranks, slot pattern, id low, id high, BLOCK_M, BLOCK_K,
# SHRINK_M). S * 16 stacked columns against BLOCK_K: 5 slots take two K steps (80 columns, the second one
# partial), 2 slots half a step.
K_CASES = [
    ("rank 1 and max rank, empty slot, sentinels", 21, 3, 2, [16, 8, None, 16, 1], "mixed", -1, 4, 16, 64, None),
    ("all tokens on one adapter", 17, 2, 2, [4, 8], "one", 0, 2, 32, 32, 16),
    ("mixed ranks, sub-block shrink programs", 23, 2, 3, [16, 2, 8], "mixed", 0, 2, 64, 16, 16),
    ("empty experts, one K step per 16 columns", 9, 6, 2, [1], "mixed", 0, 3, 16, 16, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,T,E,k,ranks,pattern,lo,hi,bm,bk,sub_m", K_CASES)
def test_lora_k_step_matches_ref(device: str, dtype: torch.dtype, name: str, T: int, E: int, k: int,
                                 ranks: list[int | None], pattern: str, lo: int, hi: int, bm: int, bk: int,
                                 sub_m: int | None) -> None:
    """The LoRA as extra K columns of both GEMMs (stacked z from the shrink, stacked z_d from the down shrink
    in act's extra columns) equals the reference, on odd sizes (H 48, I 40)."""
    H, I = 48, 40
    x, w13, w2, w, ids = make_moe(T, H, I, E, k, dtype, device, lo, hi)
    lora = make_lora(T, H, I, E, ranks, _slots(pattern, T, len(ranks)), dtype, device)
    cfg = dict(BLOCK_M=bm, BLOCK_N_GU=16, BLOCK_K_GU=bk, BLOCK_N_D=16, BLOCK_K_D=bk, GROUP_M=2, SPLIT=1,
               num_warps=4, num_stages=1, LORA_K=1, **({"SHRINK_M": sub_m} if sub_m else {}))
    ref = ref_fp32(x, w13, w2, w, ids, lora)
    assert (ref - ref_fp32(x, w13, w2, w, ids)).abs().max().item() > 10 * TOL[dtype] * ref.abs().max().item()
    assert_close(fused_moe(x, w13, w2, w, ids, lora, config=cfg), ref, dtype)


# (name, T, E, k, number of slots, BLOCK_M, BLOCK_K, SHRINK_M): more slots than a block has rows (the
# stacked width is then BLOCK_M column blocks), sub-block shrink programs, several K steps
COMPACT_CASES = [
    ("20 slots, 16-row blocks", 19, 2, 2, 20, 16, 32, None),
    ("11 slots, 32-row blocks in 16-row shrink parts", 29, 3, 2, 11, 32, 16, 16),
    ("3 slots, one expert", 9, 1, 1, 3, 16, 64, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,T,E,k,S,bm,bk,sub_m", COMPACT_CASES)
def test_lora_k_step_compact_matches_ref(device: str, dtype: torch.dtype, name: str, T: int, E: int, k: int,
                                         S: int, bm: int, bk: int, sub_m: int | None) -> None:
    """The K step stacked by each block's own slots (COMPACT) equals the reference and the K step stacked by
    every slot, with mixed ranks, empty slots and tokens without an adapter."""
    H, I = 40, 24
    x, w13, w2, w, ids = make_moe(T, H, I, E, k, dtype, device, -1, E + 1)
    ranks = [[1, 16, 4, None, 8][s % 5] for s in range(S)]
    lora = make_lora(T, H, I, E, ranks, _slots("mixed", T, S), dtype, device)
    cfg = dict(BLOCK_M=bm, BLOCK_N_GU=16, BLOCK_K_GU=bk, BLOCK_N_D=16, BLOCK_K_D=bk, GROUP_M=2, SPLIT=1,
               num_warps=4, num_stages=1, LORA_K=1, **({"SHRINK_M": sub_m} if sub_m else {}))
    got = fused_moe(x, w13, w2, w, ids, lora, config={**cfg, "COMPACT": 1})
    assert_close(got, ref_fp32(x, w13, w2, w, ids, lora), dtype)
    assert_close(got, fused_moe(x, w13, w2, w, ids, lora, config={**cfg, "COMPACT": 0}), dtype)


def test_compact_stacked_shrink_layout(device: str) -> None:
    """moe_lora_shrink(stacked=True, compact=True): a row's z sits in the column block of its slot's index
    among the block's distinct slots (in ascending order), zeros in the block's other
    column blocks; rows with slot -1 get zeros; blocks without adapter rows are not written. Without stacked,
    compact changes only the order of the work."""
    T, H, E, k, S, R = 10, 24, 2, 1, 6, 4
    br = lora_block_r(R)
    x = torch.randn(T, H, device=device)
    ids = torch.tensor([[0]] * 7 + [[1]] * 3, dtype=torch.int32, device=device)  # expert 1: tokens 7..9
    slot = torch.tensor([5, 2, 5, -1, 0, 2, 5, -1, -1, -1], dtype=torch.int32, device=device)
    gu_a = torch.randn(S, E, 2 * R, H, device=device)
    lora = MoELoraArgs(slot, gu_a, torch.zeros(S, E, 2, R, device=device), torch.zeros(S, E, R, 2, device=device),
                       torch.zeros(S, E, H, R, device=device))
    align = moe_align(ids, E, 16, row_slots=slot)
    cw = min(S, 16)
    out = torch.full((T * k, 2, cw, br), 7.0, device=device)
    moe_lora_shrink(x, lora, align.sorted_ids, align.block_expert, align.num_padded, k, 16, 1, out, None,
                    stacked=True, compact=True)
    distinct = sorted({int(slot[int(n)]) for n in align.sorted_ids[:16].tolist() if n < T * k} - {-1})  # block 0
    assert distinct and len(distinct) < S
    for n in range(T * k):
        t = n // k
        if t >= 7:
            assert torch.equal(out[n], torch.full_like(out[n], 7.0)), f"pair {n}: block without adapter rows written"
            continue
        s = int(slot[t])
        want = torch.zeros(2, len(distinct), br, device=device)
        if s >= 0:
            z = gu_a[s, 0] @ x[t]
            c = distinct.index(s)
            want[0, c, :R], want[1, c, :R] = z[:R], z[R:]
        torch.testing.assert_close(out[n, :, :len(distinct)], want, rtol=1e-4, atol=1e-4)
    # the narrow layout (epilogue path) grouped by the block's slots: the same z as grouped by every slot, in
    # each row's own place; rows without an adapter are not written
    for split in (1, 3):
        narrow = {c: torch.full((T * k, split, 2, br), 7.0, device=device) for c in (False, True)}
        for c, buf in narrow.items():
            moe_lora_shrink(x, lora, align.sorted_ids, align.block_expert, align.num_padded, k, 16, split, buf,
                            None, compact=c, block_k=16)
        assert torch.equal(narrow[True], narrow[False])
        for n in range(T * k):
            s = int(slot[n // k])
            if s < 0:
                assert torch.equal(narrow[True][n], torch.full_like(narrow[True][n], 7.0))
            else:
                z = narrow[True][n].sum(0)
                want = gu_a[s, 0] @ x[n // k]
                torch.testing.assert_close(torch.cat([z[0, :R], z[1, :R]]), want, rtol=1e-4, atol=1e-4)


def test_use_compact_follows_the_share_of_slots_a_block_holds() -> None:
    """Compaction where a block holds few of the registered slots (few rows a block) or where there are many
    slots (a batch may use few of them), not where every block holds the few there are."""
    assert use_compact(8, 16, 64 * 8, 128)  # batch-64 decode step: 4 rows a block, 8 adapters
    assert not use_compact(4, 16, 64 * 8, 128)  # 4 adapters: a block of 4 rows holds most of them
    assert not use_compact(8, 64, 512 * 8, 128)
    assert use_compact(40, 128, 2048 * 8, 128)
    assert not use_compact(1, 16, 8, 128)


def test_lora_k_step_no_adapter_rows_and_shared_fallback(device: str) -> None:
    """K step mode with every slot -1 equals the base layer; with shared-outer adapters the config's LORA_K
    falls back to the epilogue path and still matches the reference."""
    T, H, I, E, k = 11, 32, 24, 3, 2
    x, w13, w2, w, ids = make_moe(T, H, I, E, k, torch.float32, device)
    cfg = dict(BLOCK_M=16, BLOCK_N_GU=16, BLOCK_K_GU=16, BLOCK_N_D=16, BLOCK_K_D=16, GROUP_M=1, SPLIT=1,
               num_warps=4, num_stages=1, LORA_K=1)
    idle = make_lora(T, H, I, E, [4, 4], torch.full((T,), -1, dtype=torch.int32), torch.float32, device)
    assert_close(fused_moe(x, w13, w2, w, ids, idle, config=cfg), fused_moe(x, w13, w2, w, ids, config=cfg),
                 torch.float32)
    shared = make_lora(T, H, I, E, [4, 8], _slots("mixed", T, 2), torch.float32, device, (1,))
    assert_close(fused_moe(x, w13, w2, w, ids, shared, config=cfg), ref_fp32(x, w13, w2, w, ids, shared),
                 torch.float32)


def test_stacked_shrink_layout(device: str) -> None:
    """moe_lora_shrink(stacked=True): each row of a block with adapter rows holds A[s, e] x in its own
    slot's column block and zeros in every other (rows with slot -1 all zeros); blocks without adapter
    rows are not written."""
    T, H, E, k, S, R = 12, 40, 3, 2, 3, 8
    br = lora_block_r(R)
    x = torch.randn(T, H, device=device)
    ids = torch.tensor([[0, 1]] * 6 + [[2, 1]] * 6, dtype=torch.int32, device=device)  # expert 2: tokens 6..11
    slot = torch.tensor([0, 2, -1, 1, 0, 2] + [-1] * 6, dtype=torch.int32, device=device)  # expert 2 block: no adapter
    gu_a = torch.randn(S, E, 2 * R, H, device=device)
    lora = MoELoraArgs(slot, gu_a, torch.zeros(S, E, 2, R, device=device), torch.zeros(S, E, R, 2, device=device),
                       torch.zeros(S, E, H, R, device=device))
    align = moe_align(ids, E, 16)
    out = torch.full((T * k, 2, S, br), 7.0, device=device)
    moe_lora_shrink(x, lora, align.sorted_ids, align.block_expert, align.num_padded, k, 16, 1, out, None,
                    stacked=True, sub_m=16)
    for n in range(T * k):
        t, e = n // k, int(ids[n // k, n % k])
        if e == 2:
            assert torch.equal(out[n], torch.full_like(out[n], 7.0)), f"pair {n}: block without adapter rows written"
            continue
        want = torch.zeros(2, S, br, device=device)
        s = int(slot[t])
        if s >= 0:
            z = gu_a[s, e] @ x[t]
            want[0, s, :R], want[1, s, :R] = z[:R], z[R:]
        torch.testing.assert_close(out[n], want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="split 1"):
        moe_lora_shrink(x, lora, align.sorted_ids, align.block_expert, align.num_padded, k, 16, 2, out, None,
                        stacked=True)
    with pytest.raises(ValueError, match="rows per program"):
        moe_lora_shrink(x, lora, align.sorted_ids, align.block_expert, align.num_padded, k, 32, 1, out, None,
                        stacked=True, sub_m=24)


def test_rejects_bad_slab(device: str) -> None:
    T, H, I, E, k = 3, 32, 24, 4, 2
    x, w13, w2, w, ids = make_moe(T, H, I, E, k, torch.float32, device)
    lora = make_lora(T, H, I, E, [4], torch.zeros(T, dtype=torch.int32), torch.float32, device)
    with pytest.raises(ValueError, match="gate_up_B"):
        fused_moe(x, w13, w2, w, ids, lora._replace(gate_up_B=lora.gate_up_B[:, :, :I]))
    with pytest.raises(ValueError, match="token_slot"):
        fused_moe(x, w13, w2, w, ids, lora._replace(token_slot=lora.token_slot.long()))


_GPU_CASES = [(T, shape, (2,)) for T in (1, 8, 64, 512, 2048) for shape in ((2048, 768, 128, 8), (2048, 1024, 64, 8))]
# without shared-outer slots the tuned H100 configs at 512 and 2048 tokens run the LoRA K step
_GPU_CASES += [(512, (2048, 768, 128, 8), ()), (2048, (2048, 768, 128, 8), ())]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,shape,shared", _GPU_CASES)
def test_moe_lora_gpu(dtype: torch.dtype, T: int, shape: tuple[int, int, int, int], shared: tuple[int, ...]) -> None:
    H, I, E, k = shape
    x, w13, w2, w, ids = make_moe(T, H, I, E, k, dtype, "cuda", -1, E)
    lora = make_lora(T, H, I, E, [16, 8, 16, None], _slots("mixed", T, 4), dtype, "cuda", shared)
    assert_close(fused_moe(x, w13, w2, w, ids, lora), ref_fp32(x, w13, w2, w, ids, lora), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,bm,sub_m,S,compact", [(96, 64, 32, 5, 0), (700, 128, 64, 5, 0), (2048, 128, None, 5, 0),
                                                   (64, 16, None, 40, 1), (512, 64, 32, 40, 1)])
def test_lora_k_step_gpu(dtype: torch.dtype, T: int, bm: int, sub_m: int | None, S: int, compact: int) -> None:
    """The K step mode compiled for the GPU at the Qwen3-30B-A3B layer: 5 slots (two K steps), and 40 slots
    stacked by each block's own slots."""
    H, I, E, k = 2048, 768, 128, 8
    x, w13, w2, w, ids = make_moe(T, H, I, E, k, dtype, "cuda", -1, E)
    ranks = [16, 8, 16, None, 1] if S == 5 else [[16, 8, None, 4][s % 4] for s in range(S)]
    lora = make_lora(T, H, I, E, ranks, _slots("mixed", T, S), dtype, "cuda")
    cfg = dict(BLOCK_M=bm, BLOCK_N_GU=64, BLOCK_K_GU=64, BLOCK_N_D=128, BLOCK_K_D=64, GROUP_M=8, SPLIT=1,
               num_warps=8 if bm == 128 else 4, num_stages=3, LORA_K=1, COMPACT=compact,
               **({"SHRINK_M": sub_m} if sub_m else {}))
    assert_close(fused_moe(x, w13, w2, w, ids, lora, config=cfg), ref_fp32(x, w13, w2, w, ids, lora), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("T,S,used", [(1, 40, 40), (8, 40, 40), (32, 40, 40), (32, 40, 3), (8, 8, 8)])
def test_epilogue_slot_groups_gpu(T: int, S: int, used: int) -> None:
    """The decode (epilogue) path with more slots than one group, at the Qwen3-30B-A3B layer and its tuned
    configs: each block's slots grouped by the block's own (COMPACT, the default there), the tiles of the first
    group prefetched at 1 and 8 tokens, and the grouping by every slot (COMPACT 0)."""
    H, I, E, k = 2048, 768, 128, 8
    x, w13, w2, w, ids = make_moe(T, H, I, E, k, torch.bfloat16, "cuda", -1, E)
    ranks = [[16, 8, None, 4][s % 4] for s in range(S)]
    slots = torch.randint(-1, used, (T,), dtype=torch.int32)
    lora = make_lora(T, H, I, E, ranks, slots, torch.bfloat16, "cuda")
    ref = ref_fp32(x, w13, w2, w, ids, lora)
    assert_close(fused_moe(x, w13, w2, w, ids, lora), ref, torch.bfloat16)
    cfg = moe_config(T, k, E, H, I, torch.device("cuda"), True)
    assert_close(fused_moe(x, w13, w2, w, ids, lora, config={**cfg, "COMPACT": 0}), ref, torch.bfloat16)
