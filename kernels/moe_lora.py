"""LoRA over MoE experts through virtual experts (slot x expert).

Slab layout one MoE layer hands to the kernels (S slots, R = max rank, E experts, H hidden, I expert
intermediate); zero-padded past each adapter's rank, and all-zero for an empty slot:

    gate_up_A   [S, E, 2R, H]   per-expert A; rows [0,R) gate, [R,2R) up; zero for shared-outer slots
    gate_up_B   [S, E, 2I, R]   rows [0,I) take z[:R], rows [I,2I) take z[R:]
    down_A      [S, E, R, I]
    down_B      [S, E, H, R]    zero for shared-outer slots
    shared_gate_up_A [S, 2R, H] or None   the shared-outer A (same for every expert); zero otherwise
    shared_down_B    [S, H, R]  or None   the shared-outer down B; zero otherwise

Math per token t with slot s = token_slot[t] >= 0, routed pair (t, j) to expert e, weight w:

    z_gu[t,j] = gate_up_A[s,e] x_t + shared_gate_up_A[s] x_t          (the shared part once per token)
    h[t,j]   += [gate_up_B[s,e,:I] z_gu[:R] ; gate_up_B[s,e,I:] z_gu[R:]]   before SiLU-and-mul
    z_d[t,j]  = down_A[s,e] a[t,j]
    y[t]     += sum_j w_j down_B[s,e] z_d[t,j]  +  shared_down_B[s] (sum_j w_j z_d[t,j])

Tokens with slot -1, and pairs whose expert id is a sentinel, get no delta and should cost nothing.

Triton schedule (used by `fused_moe`): the LoRA rides the *base* expert alignment instead of a second
alignment over virtual experts. A base block holds BLOCK_M pairs of one expert e with mixed slots; every
kernel loops over the S slots and does work only for slots present in the block (a scalar test), so a
pair with slot -1 costs one compare, and each touched (slot, expert) pair reads its A/B once per block.

    launch 1  `moe_lora_shrink` (this file; the kernels: moe_lora_kernels.py): zgu[n] = gate_up_A[s,e] x_t
              (per expert block), and zsh[t] = shared_gate_up_A[s] x_t (per token, once), as fp32 K-split
              partials
    launch 2  gate_up GEMM (fused_moe.py): epilogue adds [gate_up_B_gate z[:R]; gate_up_B_up z[R:]],
              applies SiLU-and-mul, and writes the down shrink partials down_A[s,e] a (per I tile)
    launch 3  down GEMM: epilogue adds down_B[s,e] z_d, times the routing weight
    launch 4  top-k sum: adds shared_down_B[s] (sum_j w_j z_d[t,j]) once per token
so the LoRA costs one launch more than the base layer (the shrink), whatever the adapters.

LoRA K step mode (config LORA_K; prefill-sized blocks, SPLIT 1, no shared-outer slots). The epilogues
above walk the slot groups present in a block one after another, each a dependent chain of loads, which
dominates once blocks hold 64-128 pairs of every adapter. In this mode the delta is instead extra K
columns of the two GEMMs, stacked by slot, with zeros outside each row's own slot:
    launch 1  the shrink writes zgu [N, 2, S, BLOCK_R] (x.dtype), every row of a block with adapter rows
    launch 2  gate_up GEMM: after its main loop, K steps over [z_gate | z_up] x [B_gate | B_up] stacked
    launch 3  `moe_lora_down_shrink`: z_d = down_A[s,e] a into act's extra columns [I, I + S*BLOCK_R)
    launch 4  down GEMM: K steps over those columns x down_B stacked
Blocks without adapter rows skip both shrinks and both K steps.

Segment mode (config LORA_SEG; many adapters in use at prefill sizes): a second alignment by virtual expert and
the LoRA as grouped GEMMs around base-only GEMMs, kernels/moe_lora_seg.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from lorax.kernels._common import use_pdl
from lorax.kernels.moe_lora_kernels import _moe_lora_down_shrink_kernel, _moe_lora_shrink_kernel


class MoELoraArgs(NamedTuple):
    token_slot: torch.Tensor  # [T] int32, -1 = no adapter
    gate_up_A: torch.Tensor  # [S, E, 2R, H]
    gate_up_B: torch.Tensor  # [S, E, 2I, R]
    down_A: torch.Tensor  # [S, E, R, I]
    down_B: torch.Tensor  # [S, E, H, R]
    shared_gate_up_A: torch.Tensor | None = None  # [S, 2R, H]
    shared_down_B: torch.Tensor | None = None  # [S, H, R]
    # host int: how many distinct slots the tokens use (the engine knows it per step from its sequences);
    # None = unknown, taken as S. Only a hint for the schedule choice (moe_config.call_config), never a bound
    active_slots: int | None = None


def _pairs_by_virtual_expert(vid: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """Host-side grouping of flat pairs by virtual id (reference only: it syncs)."""
    flat = vid.reshape(-1)
    out = []
    for v in torch.unique(flat[flat >= 0]).tolist():
        out.append((int(v), (flat == v).nonzero(as_tuple=True)[0]))
    return out


def moe_lora_gate_up_ref(x: torch.Tensor, vid: torch.Tensor, lora: MoELoraArgs, h: torch.Tensor) -> None:
    """Add the gate_up LoRA delta into h [T*k, 2I] in place. x [T, H], vid [T, k] virtual ids."""
    T, k = vid.shape
    S, E, twoR, _ = lora.gate_up_A.shape
    R = twoR // 2
    inter = lora.gate_up_B.shape[2] // 2
    xf = x.float()
    z = torch.zeros(T * k, twoR, dtype=torch.float32, device=x.device)
    for v, pairs in _pairs_by_virtual_expert(vid):
        s, e = divmod(v, E)
        z[pairs] += xf[pairs // k] @ lora.gate_up_A[s, e].float().T
        if lora.shared_gate_up_A is not None:
            z[pairs] += xf[pairs // k] @ lora.shared_gate_up_A[s].float().T
    for v, pairs in _pairs_by_virtual_expert(vid):
        s, e = divmod(v, E)
        b = lora.gate_up_B[s, e].float()
        delta = torch.cat([z[pairs, :R] @ b[:inter].T, z[pairs, R:] @ b[inter:].T], dim=1)
        h[pairs] += delta.to(h.dtype)


def moe_lora_down_ref(
    a: torch.Tensor, vid: torch.Tensor, topk_weights: torch.Tensor, lora: MoELoraArgs, y: torch.Tensor
) -> None:
    """Add the down LoRA delta into y [T, H] in place (after the top-k sum). a [T*k, I]."""
    T, k = vid.shape
    S, E, R, _ = lora.down_A.shape
    w = topk_weights.reshape(-1).float()
    u = torch.zeros(T, R, dtype=torch.float32, device=a.device)  # shared-outer: sum_j w_j z_d[t,j]
    for v, pairs in _pairs_by_virtual_expert(vid):
        s, e = divmod(v, E)
        zd = a[pairs].float() @ lora.down_A[s, e].float().T  # [n, R]
        y.index_add_(0, pairs // k, ((w[pairs, None] * zd) @ lora.down_B[s, e].float().T).to(y.dtype))
        u.index_add_(0, pairs // k, w[pairs, None] * zd)
    if lora.shared_down_B is not None:
        slot = lora.token_slot.long()
        has = slot >= 0
        if bool(has.any()):
            idx = has.nonzero(as_tuple=True)[0]
            delta = torch.bmm(lora.shared_down_B[slot[idx]].float(), u[idx].unsqueeze(2)).squeeze(2)
            y[idx] += delta.to(y.dtype)


# Slots the shrink stacks per dot (`slot_group` with SHRINK_STACK_ELEMS). Its only accumulators are the
# stacked z tiles, so it stacks wider than the GEMM epilogues (H100, Qwen3-30B-A3B layer, 4 adapters:
# LoRA/base 1.27 -> 1.21 at 512 tokens, 1.45 -> 1.41 at 2048); 8 warps from 8192 stacked elements on.
SHRINK_STACK_ELEMS = 8192


def lora_block_r(rank: int) -> int:
    """Padded rank used inside the kernels (tl.dot needs >= 16)."""
    return max(16, triton.next_power_of_2(rank))


def slot_group(S: int, block_m: int, block_r: int, stack_elems: int) -> int:
    """Slots stacked along one LoRA dot's K axis (a power of two): K = SG * block_r <= 64 and
    block_m * K <= stack_elems, the register budget of the stacked tiles."""
    return min(triton.next_power_of_2(max(S, 1)), max(1, 64 // block_r), max(1, stack_elems // (block_m * block_r)))


# The LoRA K step stacks each block's z by the block's own distinct slots (`compact`, `use_compact`) when a
# block is expected to hold at most COMPACT_MAX_FRACTION of the registered slots, and always from
# COMPACT_ALWAYS_SLOTS slots on: a batch may use few of many loaded adapters, which the expectation (tokens
# spread over every slot) cannot see. H100, Qwen3-30B-A3B layer, MoE+LoRA / base, every slot -> compacted,
# tokens spread over all slots: 40 adapters 1.82 -> 1.24 at 64 tokens, 1.97 -> 1.34 at 128, 2.13 -> 1.87 at
# 512, 2.54 -> 2.63 at 2048 (every block holds nearly all 40: the compaction only costs); 8 adapters 1.21 ->
# 1.16 at 64 tokens, 1.25 -> 1.27 at 512, 1.31 -> 1.36 at 2048; 4 adapters 1.12 -> 1.11 at 64, 1.18 -> 1.20
# at 2048.
COMPACT_MAX_FRACTION = 0.6
COMPACT_ALWAYS_SLOTS = 16


def use_compact(slots: int, block_m: int, pairs: int, experts: int) -> bool:
    """Whether the K step's stacking should follow each block's own slots: many slots, or a small expected
    share of them per block, 1 - (1 - 1/S)^rows with rows = min(block_m, pairs per expert)."""
    if slots >= COMPACT_ALWAYS_SLOTS:
        return True
    if slots < 2:
        return False
    rows = min(block_m, pairs / max(experts, 1))
    return 1.0 - (1.0 - 1.0 / slots) ** rows <= COMPACT_MAX_FRACTION


def compact_width(slots: int, block_m: int, compact: bool) -> int:
    """Column blocks per row of the K step's stacked z: every slot, or (compact) the most distinct slots a
    block of block_m rows can hold."""
    return min(slots, block_m) if compact else slots


def shrink_sub_m(block_m: int, sub_m: int | None) -> int:
    """Rows per shrink program: a power of two dividing block_m, at least 16 (tl.dot's minimum)."""
    sm = block_m if not sub_m else min(block_m, max(16, sub_m))
    if block_m % sm or sm & (sm - 1):
        raise ValueError(f"moe_lora shrink: {sm} rows per program do not divide BLOCK_M {block_m}")
    return sm


def moe_lora_shrink(
    x: torch.Tensor,
    lora: MoELoraArgs,
    sorted_ids: torch.Tensor,
    block_expert: torch.Tensor,
    num_padded: torch.Tensor,
    topk: int,
    block_m: int,
    split: int,
    zgu: torch.Tensor,
    zsh: torch.Tensor | None,
    *,
    stacked: bool = False,
    compact: bool = False,
    sub_m: int | None = None,
    block_k: int = 64,
    num_warps: int | None = None,
    cast_fp32: bool = False,
    dot_prec: str = "tf32",
) -> None:
    """Launch 1 of the MoE LoRA: fill zgu [T*k, split, 2, BLOCK_R] (and zsh [T, split, 2, BLOCK_R]).

    Rows whose slot is -1 (and padding) are left untouched; consumers never read them unmasked.
    stacked (the LoRA K step, split 1, no shared-outer): zgu is [T*k, 2, S, BLOCK_R] in x.dtype, every row
    of a block with adapter rows written (zeros outside the row's own slot), other blocks untouched.
    compact: the slots are grouped by each block's own distinct slots (moe_lora_tiles._compact_slots), so a
    block's work follows the slots it holds, not the registered ones. The narrow layout is unchanged; with
    stacked, zgu is [T*k, 2, min(S, block_m), BLOCK_R], column block c of a row holding the block's c-th
    distinct slot (`compact_width`); only the first (number of distinct slots in the block) column blocks are
    written.
    """
    if stacked and (split != 1 or zsh is not None):
        raise ValueError("moe_lora_shrink: the stacked layout takes split 1 and no shared-outer adapters")
    T, H = x.shape
    S, E, two_r, _ = lora.gate_up_A.shape
    R = two_r // 2
    br = lora_block_r(R)
    max_blocks = block_expert.numel()
    has_shared = lora.shared_gate_up_A is not None and zsh is not None
    sh_a = lora.shared_gate_up_A if has_shared else lora.gate_up_A
    assert sh_a is not None
    k_chunk = triton.cdiv(triton.cdiv(H, split), block_k) * block_k
    sm = shrink_sub_m(block_m, sub_m)
    sg = slot_group(S, sm, br, SHRINK_STACK_ELEMS)
    pdl = use_pdl(x.device)
    grid = (max_blocks * (block_m // sm) + (triton.cdiv(T, sm) if has_shared else 0), split)
    sh_strides = (sh_a.stride(0), sh_a.stride(1), sh_a.stride(2)) if has_shared else (0, 0, 0)
    _moe_lora_shrink_kernel[grid](
        x, lora.gate_up_A, sh_a, lora.token_slot, sorted_ids, block_expert, num_padded,
        zgu, zsh if has_shared else zgu,
        T * topk, topk, T, H, S, R, max_blocks, k_chunk,
        x.stride(0), x.stride(1), *lora.gate_up_A.stride(), *sh_strides,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=br, SPLIT=split, HAS_SHARED=has_shared,
        SG=sg, CAST_FP32=cast_fp32, DOT_PREC=dot_prec, USE_PDL=pdl, STACKED=stacked, SUB_M=sm,
        COMPACT=compact, SP=triton.next_power_of_2(S) if compact else 1,
        num_warps=num_warps or (8 if sm * sg * br >= 8192 else 4), launch_pdl=pdl,
    )


def moe_lora_down_shrink(
    act: torch.Tensor,
    lora: MoELoraArgs,
    sorted_ids: torch.Tensor,
    block_expert: torch.Tensor,
    num_padded: torch.Tensor,
    topk: int,
    block_m: int,
    act_ready: torch.Tensor,
    zd_ready: torch.Tensor,
    tiles: int,
    *,
    compact: bool = False,
    sub_m: int | None = None,
    block_k: int = 64,
    cast_fp32: bool = False,
    dot_prec: str = "tf32",
) -> None:
    """LoRA K step mode, between the two GEMMs: act [T*k, I + CW*BLOCK_R] (CW = `compact_width(S, block_m,
    compact)`) holds the activation in its first I columns; this writes z_d = down_A[s, e] a, stacked by slot
    (compact: by the block's own slots, as moe_lora_shrink), into the rest (rows of blocks with
    adapter rows; zeros outside each row's own slot). With PDL a block waits until act_ready ([max_blocks]
    int32, zero at the alignment, counted up by the gate_up kernel) reaches `tiles`, its number of I tiles,
    and counts each part it stores into zd_ready (the down kernel waits for block_m / sub_m of them). So it
    must follow a K step mode gate_up launch that counts into the same act_ready (fused_moe's order): called
    on its own with PDL on, it would wait forever."""
    S, E, R, I = lora.down_A.shape
    br = lora_block_r(R)
    cw = compact_width(S, block_m, compact)
    if act.shape[1] != I + cw * br or act.stride(1) != 1:
        raise ValueError(f"moe_lora_down_shrink: act must be [N, {I + cw * br}] with unit column stride")
    sm = shrink_sub_m(block_m, sub_m)
    sg = slot_group(S, sm, br, SHRINK_STACK_ELEMS)
    pdl = use_pdl(act.device)
    _moe_lora_down_shrink_kernel[(block_expert.numel() * (block_m // sm),)](
        act, lora.down_A, lora.token_slot, sorted_ids, block_expert, num_padded, act_ready, zd_ready,
        act.shape[0], topk, I, S, R, tiles,
        act.stride(0), *lora.down_A.stride(),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=br, SG=sg, CAST_FP32=cast_fp32, DOT_PREC=dot_prec,
        USE_PDL=pdl, SUB_M=sm, COMPACT=compact, SP=triton.next_power_of_2(S) if compact else 1,
        num_warps=8 if sm * sg * br >= 8192 else 4, launch_pdl=pdl,
    )
