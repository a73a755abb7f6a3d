"""MoE LoRA by segments of one virtual expert: many adapters at prefill sizes.

The slab layout and the math are moe_lora.py's. Its two schedules ride the base expert alignment: a block of
BLOCK_M pairs of one expert holds rows of many adapters, and the LoRA runs either in the GEMMs' epilogues
(decode) or as K steps stacked by the block's distinct slots (prefill). With tens of adapters in use, a
128-row prefill block holds nearly all of them: the K step then runs (slots x 16) extra K columns that are
zero for any one row (40 adapters: ~600 columns beside gate_up's 2048 and down's 768), and the shrink
multiplies every row by the A of every slot in its block.

This schedule aligns the pairs a second time, by virtual expert v = slot * E + e (`moe_align` with the token
slots), into blocks of SEG_M pairs of one adapter and one expert, and runs the LoRA as grouped GEMMs over
those blocks, each reading its (slot, expert) weights once and doing only its own rows' work:

    launch  `moe_lora_seg_shrink`        z[n] = gate_up_A[s, e] x_t                 [N, 2 * BLOCK_R] fp32
    launch  gate_up GEMM (fused_moe.py, H_OUT): the base GEMM alone; rows with an adapter store their
            pre-activation h [N, 2I] (x.dtype), the others their activation as usual
    launch  `moe_lora_seg_expand`        act[n] = silu(h_g + B_g z_g) * (h_u + B_u z_u) and z_d[n] =
                                         down_A[s, e] act[n]      [N, I_SPLIT, BLOCK_R] fp32 partials
    launch  down GEMM: the base GEMM alone, ypair[n] = w_n W2[e] act[n]
    launch  `moe_lora_seg_down_expand`   ypair[n] += w_n down_B[s, e] z_d[n]
then the top-k sum. Pairs without an adapter, and sentinel experts, land in no virtual block and cost
nothing here. The price is h's round trip (2I values per adapter row written and read back) and
ypair's read-modify-write: bytes that grow with the tokens, where the K step's extra work grows with the
tokens times the slots in a block. No shared-outer adapters (they take the other schedules).
"""

from __future__ import annotations

import torch
import triton

from lorax.kernels._common import dot_precision, interpreting, use_pdl
from lorax.kernels.moe_align import MoEAlignment, moe_align, virtual_expert_ids_ref
from lorax.kernels.moe_lora import MoELoraArgs, lora_block_r
from lorax.kernels.moe_lora_seg_kernels import _seg_down_expand_kernel, _seg_expand_kernel, _seg_shrink_kernel

SEG_M = 16  # pairs per virtual block (tl.dot's minimum; a virtual expert gets a few rows at prefill sizes)
# Launch defaults, from a sweep of each kernel alone on an H100 (Qwen3-30B-A3B layer, 8 and 40 adapters of
# rank 16, 512 to 8192 tokens; docs/KERNEL_NOTES.md): the expand is latency-bound, so small programs win
SHRINK_LAUNCH = dict(block_k=256, num_warps=4, num_stages=3)
EXPAND_LAUNCH = dict(block_i=64, num_warps=1, num_stages=1)  # num_warps per 16 rows of a virtual block
SEG_I_SPLIT = 1  # expand programs per virtual block (fused_moe's config key SEG_I_SPLIT)
DOWN_EXPAND_LAUNCH = dict(block_h=256, num_warps=2, num_stages=3)


def seg_align(topk_ids: torch.Tensor, lora: MoELoraArgs, num_experts: int, seg_m: int = SEG_M) -> MoEAlignment:
    """The pairs aligned by virtual expert slot * E + e in blocks of seg_m (pairs whose slot or expert is a
    sentinel in none). topk_ids [T, k] int32."""
    S = lora.gate_up_A.shape[0]
    return moe_align(topk_ids, S * num_experts, seg_m, token_slot=lora.token_slot, base_experts=num_experts)


def _check(lora: MoELoraArgs, what: str) -> None:
    if lora.shared_gate_up_A is not None or lora.shared_down_B is not None:
        raise ValueError(f"{what}: shared-outer adapters take fused_moe's other LoRA schedules")


def _numerics(dtype: torch.dtype, cast_fp32: bool | None, dot_prec: str | None) -> tuple[bool, str]:
    """The launchers' tl.dot settings: given, else fp32 operands under the interpreter and the dtype's precision."""
    return interpreting() if cast_fp32 is None else cast_fp32, dot_prec or dot_precision(dtype)


# ----------------------------------------------------------------------------------------------------
# torch references (same layouts as the launchers; rows of pairs without an adapter are not written)
# ----------------------------------------------------------------------------------------------------

def _adapter_pairs(topk_ids: torch.Tensor, lora: MoELoraArgs, E: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs with a virtual expert: their flat index n, slot s and expert e."""
    vid = virtual_expert_ids_ref(topk_ids, lora.token_slot, E).reshape(-1).long()
    n = (vid >= 0).nonzero(as_tuple=True)[0]
    return n, vid[n] // E, vid[n] % E


def moe_lora_seg_shrink_ref(x: torch.Tensor, lora: MoELoraArgs, topk_ids: torch.Tensor, z: torch.Tensor) -> None:
    """z [N, 2 * BLOCK_R] fp32: z[n, :R] = gate_up_A[s, e, :R] x_t, z[n, BLOCK_R : BLOCK_R + R] its up half."""
    S, E, two_r, _ = lora.gate_up_A.shape
    R, br = two_r // 2, lora_block_r(two_r // 2)
    n, s, e = _adapter_pairs(topk_ids, lora, E)
    zz = torch.einsum("nh,nrh->nr", x[n // topk_ids.shape[1]].float(), lora.gate_up_A[s, e].float())
    z[n, :R] = zz[:, :R]
    z[n, br : br + R] = zz[:, R:]


def moe_lora_seg_expand_ref(h: torch.Tensor, z: torch.Tensor, lora: MoELoraArgs, topk_ids: torch.Tensor,
                            act: torch.Tensor, zd: torch.Tensor) -> None:
    """act[n] = silu(h_g + B_g z_g) * (h_u + B_u z_u) (act's dtype), zd [N, BLOCK_R] fp32 = down_A[s, e] act[n]
    (the launcher's partials summed)."""
    S, E, two_i, R = lora.gate_up_B.shape
    I, br = two_i // 2, lora_block_r(R)
    n, s, e = _adapter_pairs(topk_ids, lora, E)
    b = lora.gate_up_B[s, e].float()  # [n, 2I, R]
    g = h[n, :I].float() + torch.einsum("nir,nr->ni", b[:, :I], z[n, :R])
    u = h[n, I:].float() + torch.einsum("nir,nr->ni", b[:, I:], z[n, br : br + R])
    a = (torch.nn.functional.silu(g) * u).to(act.dtype)
    act[n] = a
    zd[n, :R] = torch.einsum("nri,ni->nr", lora.down_A[s, e].float(), a.float())


def moe_lora_seg_down_expand_ref(ypair: torch.Tensor, zd: torch.Tensor, weights: torch.Tensor, lora: MoELoraArgs,
                                 topk_ids: torch.Tensor) -> None:
    """ypair[n] += w_n down_B[s, e] zd[n] (in ypair's dtype; zd [N, BLOCK_R], the partials summed)."""
    S, E, H, R = lora.down_B.shape
    n, s, e = _adapter_pairs(topk_ids, lora, E)
    w = weights.reshape(-1)[n].float()
    d = torch.einsum("nhr,nr->nh", lora.down_B[s, e].float(), zd[n, :R] * w[:, None])
    ypair[n] = (ypair[n].float() + d).to(ypair.dtype)


# ----------------------------------------------------------------------------------------------------
# launchers (no host sync: the grids are sized from the alignment's host bound)
# ----------------------------------------------------------------------------------------------------

def moe_lora_seg_shrink(x: torch.Tensor, lora: MoELoraArgs, valign: MoEAlignment, topk: int, z: torch.Tensor, *,
                        seg_m: int = SEG_M, block_k: int = SHRINK_LAUNCH["block_k"],
                        num_warps: int = SHRINK_LAUNCH["num_warps"], num_stages: int = SHRINK_LAUNCH["num_stages"],
                        cast_fp32: bool | None = None, dot_prec: str | None = None) -> None:
    """z [T*k, 2 * BLOCK_R] fp32 of the pairs in `valign` (`seg_align`), one program per virtual block."""
    _check(lora, "moe_lora_seg_shrink")
    T, H = x.shape
    if T == 0:
        return
    S, E, two_r, _ = lora.gate_up_A.shape
    br = lora_block_r(two_r // 2)
    if z.shape != (T * topk, 2 * br) or z.dtype != torch.float32 or not z.is_contiguous():
        raise ValueError(f"moe_lora_seg_shrink: z must be a contiguous [{T * topk}, {2 * br}] fp32 tensor")
    cast_fp32, dot_prec = _numerics(x.dtype, cast_fp32, dot_prec)
    pdl = use_pdl(x.device)
    _seg_shrink_kernel[(valign.block_expert.numel(),)](
        x, lora.gate_up_A, z, valign.sorted_ids, valign.block_expert, valign.num_padded,
        T * topk, topk, E, H, two_r // 2,
        x.stride(0), x.stride(1), *lora.gate_up_A.stride(),
        BLOCK_M=seg_m, BLOCK_R=br, BLOCK_K=min(block_k, max(16, triton.next_power_of_2(H))), CAST_FP32=cast_fp32, DOT_PREC=dot_prec, USE_PDL=pdl,
        num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl,
    )


def moe_lora_seg_expand(h: torch.Tensor, z: torch.Tensor, lora: MoELoraArgs, valign: MoEAlignment,
                        act: torch.Tensor, zd: torch.Tensor, *, seg_m: int = SEG_M,
                        block_i: int = EXPAND_LAUNCH["block_i"], num_warps: int | None = None,
                        num_stages: int = EXPAND_LAUNCH["num_stages"], cast_fp32: bool | None = None,
                        dot_prec: str | None = None) -> None:
    """act [N, I] and zd's z_d partials [N, I_SPLIT, BLOCK_R] fp32 (I_SPLIT programs per virtual block, each
    over every I_SPLIT-th I tile; a [N, BLOCK_R] zd is I_SPLIT 1) of the pairs in `valign`, from h [N, 2I]
    and the shrink's z."""
    _check(lora, "moe_lora_seg_expand")
    S, E, two_i, R = lora.gate_up_B.shape
    N, I, br = act.shape[0], two_i // 2, lora_block_r(R)
    if N == 0:
        return
    if h.shape != (N, two_i) or h.stride(1) != 1 or act.shape != (N, I) or act.stride(1) != 1:
        raise ValueError(f"moe_lora_seg_expand: h must be [{N}, {two_i}] and act [{N}, {I}], unit column stride")
    zd3 = zd.view(N, -1, br) if zd.is_contiguous() and zd.numel() % (N * br) == 0 else None
    if z.shape != (N, 2 * br) or zd3 is None or not z.is_contiguous():
        raise ValueError(f"moe_lora_seg_expand: z must be [{N}, {2 * br}] and zd [{N}, I_SPLIT, {br}], contiguous fp32")
    block_i = min(block_i, max(16, triton.next_power_of_2(I)))
    i_split = zd3.shape[1]
    if i_split < 1 or i_split > triton.cdiv(I, block_i):
        raise ValueError(f"moe_lora_seg_expand: {i_split} z_d partials for {triton.cdiv(I, block_i)} I tiles")
    cast_fp32, dot_prec = _numerics(h.dtype, cast_fp32, dot_prec)
    pdl = use_pdl(h.device)
    _seg_expand_kernel[(valign.block_expert.numel(), i_split)](
        h, z, lora.gate_up_B, lora.down_A, act, zd, valign.sorted_ids, valign.block_expert, valign.num_padded,
        N, E, I, R, h.stride(0), act.stride(0), *lora.gate_up_B.stride(), *lora.down_A.stride(),
        BLOCK_M=seg_m, BLOCK_R=br, BLOCK_I=block_i, I_SPLIT=i_split, CAST_FP32=cast_fp32,
        DOT_PREC=dot_prec, USE_PDL=pdl, num_warps=num_warps or EXPAND_LAUNCH["num_warps"] * max(1, seg_m // 16),
        num_stages=num_stages, launch_pdl=pdl,
    )


def moe_lora_seg_down_expand(ypair: torch.Tensor, zd: torch.Tensor, weights: torch.Tensor, lora: MoELoraArgs,
                             valign: MoEAlignment, *, seg_m: int = SEG_M, block_h: int = DOWN_EXPAND_LAUNCH["block_h"],
                             num_warps: int = DOWN_EXPAND_LAUNCH["num_warps"],
                             num_stages: int = DOWN_EXPAND_LAUNCH["num_stages"], cast_fp32: bool | None = None,
                             dot_prec: str | None = None) -> None:
    """ypair [N, H] += w down_B[s, e] z_d over the pairs in `valign`, z_d the sum of zd's partials [N, I_SPLIT,
    BLOCK_R] fp32 (or [N, BLOCK_R]); weights [N] (topk_weights flattened)."""
    _check(lora, "moe_lora_seg_down_expand")
    S, E, H, R = lora.down_B.shape
    N, br = ypair.shape[0], lora_block_r(R)
    if N == 0:
        return
    ok = zd.is_contiguous() and zd.shape[0] == N and zd.numel() % (N * br) == 0
    if ypair.shape != (N, H) or ypair.stride(1) != 1 or not ok or weights.numel() != N:
        raise ValueError(f"moe_lora_seg_down_expand: ypair must be [{N}, {H}], zd [{N}, I_SPLIT, {br}], weights [{N}]")
    cast_fp32, dot_prec = _numerics(ypair.dtype, cast_fp32, dot_prec)
    pdl = use_pdl(ypair.device)
    _seg_down_expand_kernel[(valign.block_expert.numel(),)](
        ypair, zd, weights.reshape(-1), lora.down_B, valign.sorted_ids, valign.block_expert, valign.num_padded,
        N, E, H, R, ypair.stride(0), *lora.down_B.stride(),
        BLOCK_M=seg_m, BLOCK_R=br, BLOCK_H=min(block_h, triton.next_power_of_2(H)),
        I_SPLIT=zd.numel() // (N * br), CAST_FP32=cast_fp32,
        DOT_PREC=dot_prec, USE_PDL=pdl, num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl,
    )
