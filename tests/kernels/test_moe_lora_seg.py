# ruff: noqa: E741  (I is the expert intermediate size, as in the kernel contracts)
"""The segment MoE LoRA schedule (kernels/moe_lora_seg.py): each kernel against its torch reference, and
fused_moe with LORA_SEG against fused_moe_ref, on odd sizes with rank 1 and max rank, empty slots, tokens
without an adapter, sentinel experts, empty experts and every token on one adapter."""

from __future__ import annotations

import pytest
import torch
from test_fused_moe import TOL, assert_close, make_moe, ref_fp32
from test_moe_lora import _slots, make_lora

from lorax.kernels import fused_moe as fm
from lorax.kernels import moe_config as mc
from lorax.kernels.fused_moe import fused_moe, fused_moe_scratch_bytes
from lorax.kernels.moe_align import virtual_expert_ids_ref
from lorax.kernels.moe_lora import MoELoraArgs, lora_block_r
from lorax.kernels.moe_lora_seg import (
    moe_lora_seg_down_expand,
    moe_lora_seg_down_expand_ref,
    moe_lora_seg_expand,
    moe_lora_seg_expand_ref,
    moe_lora_seg_shrink,
    moe_lora_seg_shrink_ref,
    seg_align,
)

_SEG_CFG = dict(BLOCK_M=16, BLOCK_N_GU=16, BLOCK_K_GU=16, BLOCK_N_D=16, BLOCK_K_D=16, GROUP_M=2, SPLIT=1,
                num_warps=4, num_stages=1, LORA_SEG=1)

# (name, T, E, k, ranks, slot pattern, id low, id high, SEG_M)
CASES = [
    ("rank 1 and max rank, empty slot, sentinels", 21, 3, 2, [16, 8, None, 16, 1], "mixed", -1, 4, 16),
    ("all tokens on one adapter, segments past one block", 37, 2, 2, [4, 8], "one", 0, 2, 16),
    ("mixed ranks, 32-row segments", 23, 2, 3, [16, 2, 8], "mixed", 0, 2, 32),
    ("empty experts", 9, 6, 2, [1], "mixed", 0, 3, 16),
    ("rank 32", 11, 3, 2, [32, 5], "mixed", 0, 3, 16),
    ("20 slots", 19, 2, 2, [[1, 16, 4, None, 8][s % 5] for s in range(20)], "mixed", -1, 3, 16),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,T,E,k,ranks,pattern,lo,hi,seg_m", CASES)
def test_seg_schedule_matches_ref(device: str, dtype: torch.dtype, name: str, T: int, E: int, k: int,
                                  ranks: list[int | None], pattern: str, lo: int, hi: int, seg_m: int) -> None:
    """fused_moe with LORA_SEG == fused_moe_ref (H 48, I 40: no tile divides them), and the LoRA is there."""
    H, I = 48, 40
    x, w13, w2, w, ids = make_moe(T, H, I, E, k, dtype, device, lo, hi)
    lora = make_lora(T, H, I, E, ranks, _slots(pattern, T, len(ranks)), dtype, device)
    ref = ref_fp32(x, w13, w2, w, ids, lora)
    assert (ref - ref_fp32(x, w13, w2, w, ids)).abs().max().item() > 10 * TOL[dtype] * ref.abs().max().item()
    cfg = {**_SEG_CFG, "SEG_M": seg_m}
    got = fused_moe(x, w13, w2, w, ids, lora, config=cfg)
    assert_close(got, ref, dtype)
    # through a caller's scratch (the size fused_moe_scratch_bytes reports for the same config) and out
    need = sum(fm._nbytes(s, d) for s, d in fm._buffer_specs(T, k, H, I, dtype, lora, cfg))
    scratch = torch.empty(need, dtype=torch.uint8, device=device)
    out = torch.empty(T, H, dtype=dtype, device=device)
    fused_moe(x, w13, w2, w, ids, lora, scratch=scratch, out=out, config=cfg)
    assert torch.equal(out, got)


@pytest.mark.parametrize("i_split", [1, 2, 5])
def test_seg_schedule_expand_split(device: str, i_split: int) -> None:
    """I 136: three 64-wide I tiles; SEG_I_SPLIT 2 (one program takes tiles 0 and 2, the other tile 1) and 5
    (clipped to the 3 tiles) against the reference."""
    T, H, I, E, k = 15, 32, 136, 3, 2
    x, w13, w2, w, ids = make_moe(T, H, I, E, k, torch.float32, device, -1, E)
    lora = make_lora(T, H, I, E, [16, 3, None], _slots("mixed", T, 3), torch.float32, device)
    got = fused_moe(x, w13, w2, w, ids, lora, config={**_SEG_CFG, "SEG_I_SPLIT": i_split})
    assert_close(got, ref_fp32(x, w13, w2, w, ids, lora), torch.float32)


def test_seg_no_adapter_rows_change_nothing(device: str) -> None:
    """Every slot -1: the segment schedule's result is the base layer's, exactly (no virtual block exists)."""
    T, H, I, E, k = 13, 32, 24, 3, 2
    x, w13, w2, w, ids = make_moe(T, H, I, E, k, torch.float32, device)
    lora = make_lora(T, H, I, E, [8, 4], torch.full((T,), -1, dtype=torch.int32), torch.float32, device)
    assert torch.equal(fused_moe(x, w13, w2, w, ids, lora, config=_SEG_CFG),
                       fused_moe(x, w13, w2, w, ids, config={k: v for k, v in _SEG_CFG.items() if k != "LORA_SEG"}))


def _kernel_inputs(device: str, dtype: torch.dtype, S: int = 5, seg_m: int = 16):
    T, H, I, E, k = 27, 40, 24, 4, 2
    x, _, _, w, ids = make_moe(T, H, I, E, k, dtype, device, -1, E + 1)
    ranks = [[16, 1, None, 7, 16][s % 5] for s in range(S)]
    lora = make_lora(T, H, I, E, ranks, _slots("mixed", T, S), dtype, device)
    valign = seg_align(ids, lora, E, seg_m)
    has = (virtual_expert_ids_ref(ids, lora.token_slot, E) >= 0).reshape(-1)
    return x, w, ids, lora, valign, has, I, H


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seg_shrink_matches_ref(device: str, dtype: torch.dtype) -> None:
    x, _, ids, lora, valign, has, _, _ = _kernel_inputs(device, dtype)
    N, br = ids.numel(), lora_block_r(lora.gate_up_A.shape[2] // 2)
    got = torch.full((N, 2 * br), 7.0, device=device)
    ref = torch.full((N, 2 * br), 7.0, device=device)
    moe_lora_seg_shrink(x, lora, valign, ids.shape[1], got)
    moe_lora_seg_shrink_ref(x, lora, ids, ref)
    assert_close(got[has], ref[has], dtype)
    assert torch.equal(got[~has], ref[~has])  # rows without a virtual expert untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("i_split", [1, 2])
def test_seg_expand_matches_ref(device: str, dtype: torch.dtype, i_split: int) -> None:
    """I 24 in 16-wide tiles (the second partial); with I_SPLIT 2 each program takes one tile and the z_d
    partials sum to the reference's z_d."""
    x, _, ids, lora, valign, has, I, _ = _kernel_inputs(device, dtype)
    N, br = ids.numel(), lora_block_r(lora.gate_up_A.shape[2] // 2)
    h = torch.randn(N, 2 * I, device=device).to(dtype)
    z = torch.randn(N, 2 * br, device=device)
    got_a, ref_a = torch.zeros(N, I, dtype=dtype, device=device), torch.zeros(N, I, dtype=dtype, device=device)
    got_d, ref_d = torch.zeros(N, i_split, br, device=device), torch.zeros(N, br, device=device)
    moe_lora_seg_expand(h, z, lora, valign, got_a, got_d, block_i=16)
    moe_lora_seg_expand_ref(h, z, lora, ids, ref_a, ref_d)
    assert_close(got_a[has], ref_a[has].float(), dtype)
    assert_close(got_d.sum(1)[has], ref_d[has], dtype)
    assert not got_a[~has].any() and not got_d[~has].any()
    if i_split == 2:  # both programs of a block did part of the work
        assert got_d[has, 0].abs().sum() > 0 and got_d[has, 1].abs().sum() > 0
    with pytest.raises(ValueError, match="partials"):
        moe_lora_seg_expand(h, z, lora, valign, got_a, torch.zeros(N, 3, br, device=device), block_i=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("i_split", [1, 3])
def test_seg_down_expand_matches_ref(device: str, dtype: torch.dtype, i_split: int) -> None:
    """H 40 in 16-wide tiles; z_d given as I_SPLIT partials, summed by the kernel."""
    _, w, ids, lora, valign, has, _, H = _kernel_inputs(device, dtype)
    N, br = ids.numel(), lora_block_r(lora.gate_up_A.shape[2] // 2)
    y0 = torch.randn(N, H, device=device).to(dtype)
    zd = torch.randn(N, i_split, br, device=device)
    got, ref = y0.clone(), y0.clone()
    moe_lora_seg_down_expand(got, zd, w, lora, valign, block_h=16)
    moe_lora_seg_down_expand_ref(ref, zd.sum(1), w, lora, ids)
    assert_close(got.float(), ref.float(), dtype)
    assert torch.equal(got[~has], y0[~has])


def test_seg_rejects_shared_outer_and_bad_buffers(device: str) -> None:
    x, _, ids, lora, valign, _, _, _ = _kernel_inputs(device, torch.float32)
    shared = lora._replace(shared_gate_up_A=torch.zeros(5, 32, 40, device=device))
    with pytest.raises(ValueError, match="shared-outer"):
        moe_lora_seg_shrink(x, shared, valign, 2, torch.zeros(ids.numel(), 32, device=device))
    with pytest.raises(ValueError, match="fp32"):
        moe_lora_seg_shrink(x, lora, valign, 2, torch.zeros(ids.numel(), 16, device=device))


def test_call_config_takes_the_segment_schedule_for_many_slots_at_prefill(monkeypatch) -> None:
    """From SEG_MIN_SLOTS registered slots at prefill sizes (and no shared-outer adapters) a call runs the
    segment schedule on the base entry's tiles; below it, at decode sizes, or with shared-outer slots, not."""
    base = dict(BLOCK_M=128, BLOCK_N_GU=128, BLOCK_K_GU=64, BLOCK_N_D=256, BLOCK_K_D=64, GROUP_M=8, SPLIT=1,
                num_warps=8, num_stages=4)
    with_lora = {**base, "BLOCK_M": 64, "LORA_K": 1}
    monkeypatch.setattr(mc, "tuned_buckets", lambda *a: {"2048": {**base, "lora": with_lora}})
    dev = torch.device("cpu")

    def args(S: int, shared: bool = False, active: int | None = None) -> MoELoraArgs:
        z = torch.zeros(S, 1, 1, 1)
        return MoELoraArgs(torch.zeros(1, dtype=torch.int32), z, z, z, z, z[:, 0] if shared else None, None, active)

    def seg(T: int, lora: MoELoraArgs) -> bool:
        return mc.call_config(T, 8, 128, 2048, 768, dev, lora).get("LORA_SEG") == 1

    many = mc.call_config(2048, 8, 128, 2048, 768, dev, args(mc.SEG_MIN_SLOTS))
    assert many["LORA_SEG"] == 1 and many["BLOCK_M"] == 128 and "LORA_K" not in many
    assert not seg(2048, args(mc.SEG_MIN_SLOTS - 1))
    assert not seg(8, args(40)) and not seg(512, args(40))  # decode graph sizes
    assert not seg(2048, args(40, shared=True))
    # the slots in use, when the caller knows them, decide instead of the registered ones
    assert not seg(2048, args(40, active=4)) and seg(2048, args(16, active=16))
    assert mc.call_config(2048, 8, 128, 2048, 768, dev, args(40), {"BLOCK_M": 16}) == {"BLOCK_M": 16}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,S,used", [(1024, 40, 40), (2048, 40, 40), (2048, 40, 3), (1000, 16, 16)])
def test_seg_schedule_gpu(dtype: torch.dtype, T: int, S: int, used: int) -> None:
    """The segment schedule at the Qwen3-30B-A3B layer with the tuned base tiles (the default for these calls),
    and with 32-row segments."""
    H, I, E, k = 2048, 768, 128, 8
    x, w13, w2, w, ids = make_moe(T, H, I, E, k, dtype, "cuda", -1, E)
    ranks = [[16, 8, None, 4, 1][s % 5] for s in range(S)]
    slots = torch.randint(-1, used, (T,), dtype=torch.int32)
    lora = make_lora(T, H, I, E, ranks, slots, dtype, "cuda")
    cfg = mc.call_config(T, k, E, H, I, torch.device("cuda"), lora)
    assert cfg.get("LORA_SEG") == 1
    ref = ref_fp32(x, w13, w2, w, ids, lora)
    assert_close(fused_moe(x, w13, w2, w, ids, lora), ref, dtype)
    assert_close(fused_moe(x, w13, w2, w, ids, lora, config={**cfg, "SEG_M": 32, "SEG_I_SPLIT": 4}), ref, dtype)
    assert fused_moe_scratch_bytes(x, w13, k, lora) >= sum(
        fm._nbytes(s, d) for s, d in fm._buffer_specs(T, k, H, I, dtype, lora, cfg))
