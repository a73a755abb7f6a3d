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

    launch 1  `moe_lora_shrink` (this file): zgu[n] = gate_up_A[s,e] x_t  (per expert block), and
              zsh[t] = shared_gate_up_A[s] x_t (per token, once), as fp32 K-split partials
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
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lorax.kernels._common import pdl_trigger, pdl_wait, use_pdl


class MoELoraArgs(NamedTuple):
    token_slot: torch.Tensor  # [T] int32, -1 = no adapter
    gate_up_A: torch.Tensor  # [S, E, 2R, H]
    gate_up_B: torch.Tensor  # [S, E, 2I, R]
    down_A: torch.Tensor  # [S, E, R, I]
    down_B: torch.Tensor  # [S, E, H, R]
    shared_gate_up_A: torch.Tensor | None = None  # [S, 2R, H]
    shared_down_B: torch.Tensor | None = None  # [S, H, R]


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


@triton.jit
def _shrink_rows(
    x_ptr, a_ptr, out_ptr, token_slot_ptr,
    rows, mask_m, token, xrow,  # [BLOCK_M] output row ids, their validity, each row's token and x row
    H, S, R, k_chunk, stride_out,
    stride_xt, stride_xh, stride_a_s, stride_a_r, stride_a_h,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr,
    SG: tl.constexpr, CAST_FP32: tl.constexpr, DOT_PREC: tl.constexpr,
    PARTS: tl.constexpr = 2,  # 2: A rows [0, R) gate and [R, 2R) up; 1: one z per row (the down shrink)
    STACKED: tl.constexpr = False,
):
    """z of A[slot(row)] x[xrow] over this program's K chunk, for every row of the block.

    Slots are stacked SG at a time along the dot's N axis (column g*BLOCK_R + r = row r of slot s0 + g's
    A, zero when that slot is absent from the block), so one K loop serves every slot of a group.
    Output layouts:
      STACKED False  out[row, pid_k, part, :BLOCK_R] fp32: each row keeps its own slot's column block
                     (rows whose slot is -1 are not written)
      STACKED True   out[row * stride_out + part * S*BLOCK_R + s*BLOCK_R + r], out's dtype, SPLIT 1: the
                     row's z in its own slot's column block and zeros in every other slot's (rows whose
                     slot is -1 get zeros), i.e. the extra K columns the GEMMs' LoRA K step reads
    """
    pid_k = tl.program_id(1)
    slot = tl.load(token_slot_ptr + token, mask=mask_m, other=-1)
    offs_r = tl.arange(0, BLOCK_R)
    offs_q = tl.arange(0, SG * BLOCK_R)
    q_s = offs_q // BLOCK_R
    q_r = offs_q % BLOCK_R
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = pid_k * k_chunk
    k_hi = tl.minimum(H, k_lo + k_chunk)
    x_rows = x_ptr + xrow.to(tl.int64)[:, None] * stride_xt
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * (SPLIT * PARTS * BLOCK_R) + pid_k * PARTS * BLOCK_R + offs_r[None, :]
    st_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out + offs_q[None, :]
    for s0 in range(0, S, SG):
        sel = slot[:, None] == (s0 + q_s)[None, :]  # [BLOCK_M, SG*BLOCK_R]
        present = tl.max(sel.to(tl.int32), axis=0) > 0  # [SG*BLOCK_R]
        acc_g = tl.zeros([BLOCK_M, SG * BLOCK_R], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, SG * BLOCK_R], dtype=tl.float32)
        rows_in = tl.max(sel.to(tl.int32), axis=1) > 0  # rows whose slot is in the group
        if tl.max(present.to(tl.int32), axis=0) > 0:  # some slot of the group is in this block
            # A rows [0, R) gate, [R, 2R) up, read transposed and stacked: [BLOCK_K, SG*BLOCK_R]
            a_cols = a_ptr + (s0 + q_s).to(tl.int64)[None, :] * stride_a_s + q_r[None, :] * stride_a_r
            m_q = (present & (q_r < R))[None, :]
            for k0 in range(k_lo, k_hi, BLOCK_K):
                ks = k0 + offs_k
                mask_k = ks < k_hi
                xt = tl.load(x_rows + ks[None, :] * stride_xh, mask=rows_in[:, None] & mask_k[None, :], other=0.0)
                ag_ptrs = a_cols + ks[:, None] * stride_a_h
                m_a = mask_k[:, None] & m_q
                ag = tl.load(ag_ptrs, mask=m_a, other=0.0)
                if CAST_FP32:
                    xt = xt.to(tl.float32)
                    ag = ag.to(tl.float32)
                acc_g = tl.dot(xt, ag, acc_g, input_precision=DOT_PREC)
                if PARTS == 2:
                    au = tl.load(ag_ptrs + R * stride_a_r, mask=m_a, other=0.0)
                    if CAST_FP32:
                        au = au.to(tl.float32)
                    acc_u = tl.dot(xt, au, acc_u, input_precision=DOT_PREC)
            if not STACKED:
                m_out = rows_in[:, None] & (offs_r[None, :] < BLOCK_R)
                zg = tl.sum(tl.reshape(tl.where(sel, acc_g, 0.0), [BLOCK_M, SG, BLOCK_R]), axis=1)
                tl.store(out_ptrs, zg, mask=m_out)
                if PARTS == 2:
                    zu = tl.sum(tl.reshape(tl.where(sel, acc_u, 0.0), [BLOCK_M, SG, BLOCK_R]), axis=1)
                    tl.store(out_ptrs + BLOCK_R, zu, mask=m_out)
        if STACKED:  # every group's columns, zeros where the group is absent
            m_st = mask_m[:, None] & ((s0 + q_s) < S)[None, :]
            dst = st_ptrs + s0 * BLOCK_R
            tl.store(dst, tl.where(sel, acc_g, 0.0).to(out_ptr.dtype.element_ty), mask=m_st)
            if PARTS == 2:
                tl.store(dst + S * BLOCK_R, tl.where(sel, acc_u, 0.0).to(out_ptr.dtype.element_ty), mask=m_st)


@triton.jit
def _block_has_adapter_rows(sorted_ids_ptr, token_slot_ptr, blk, N, TOPK, BLOCK_M: tl.constexpr):
    """Whether expert block blk holds a pair whose token has an adapter: the test by which the GEMMs run
    or skip their LoRA K step, so the shrinks that feed it decide on the whole block too."""
    rows = tl.load(sorted_ids_ptr + blk * BLOCK_M + tl.arange(0, BLOCK_M))
    slot = tl.load(token_slot_ptr + rows // TOPK, mask=rows < N, other=-1)
    return tl.max((slot >= 0).to(tl.int32), axis=0) > 0


@triton.jit
def _moe_lora_shrink_kernel(
    # pointers
    x_ptr,  # [T, H]
    gu_a_ptr,  # [S, E, 2R, H] per-expert gate_up A
    sh_a_ptr,  # [S, 2R, H] shared-outer A (read only when HAS_SHARED)
    token_slot_ptr,  # [T] int32, -1 = no adapter
    sorted_ids_ptr, block_expert_ptr, num_padded_ptr,  # base alignment (block_m == BLOCK_M)
    zgu_ptr,  # [N, SPLIT, 2, BLOCK_R] fp32 out: per pair, K-split partials of (gate z, up z)
    zsh_ptr,  # [T, SPLIT, 2, BLOCK_R] fp32 out: per token, shared-outer partials
    # sizes
    N, TOPK, T, H, S, R, max_blocks, k_chunk,
    # strides
    stride_xt, stride_xh,
    stride_as, stride_ae, stride_ar, stride_ah,
    stride_ss, stride_sr, stride_sh,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr,
    SG: tl.constexpr,  # slots stacked per dot (power of two)
    HAS_SHARED: tl.constexpr, CAST_FP32: tl.constexpr, DOT_PREC: tl.constexpr,
    USE_PDL: tl.constexpr,
    STACKED: tl.constexpr = False,  # zgu is the [N, 2, S, BLOCK_R] stacked z (x.dtype) of the LoRA K step
    SUB_M: tl.constexpr = 0,  # rows per program (a divisor of BLOCK_M; 0: BLOCK_M)
):
    # grid: (max_blocks * BLOCK_M / SUB_M [+ token blocks of SUB_M when HAS_SHARED], SPLIT)
    pdl_wait(USE_PDL)  # the alignment
    pdl_trigger(USE_PDL)  # the gate_up GEMM may start: it reads our output only after its own wait
    SM: tl.constexpr = SUB_M if SUB_M > 0 else BLOCK_M
    NSUB: tl.constexpr = BLOCK_M // SM
    pid = tl.program_id(0)
    offs_m = tl.arange(0, SM)
    if pid < max_blocks * NSUB:
        # role 1: SM pairs of one expert block; blocks past the device-side count exit at once
        blk = pid // NSUB
        live = blk * BLOCK_M < tl.load(num_padded_ptr)
        expert = tl.load(block_expert_ptr + blk)
        if live & (expert >= 0):
            rows = tl.load(sorted_ids_ptr + blk * BLOCK_M + (pid % NSUB) * SM + offs_m)  # pair ids, N = padding
            token = rows // TOPK
            run = True
            if STACKED:  # only blocks with adapter rows (the whole block's): the GEMMs skip the others' K step
                run = _block_has_adapter_rows(sorted_ids_ptr, token_slot_ptr, blk, N, TOPK, BLOCK_M)
            if run:
                _shrink_rows(
                    x_ptr, gu_a_ptr + expert.to(tl.int64) * stride_ae, zgu_ptr, token_slot_ptr,
                    rows, rows < N, token, token, H, S, R, k_chunk, 2 * S * BLOCK_R,
                    stride_xt, stride_xh, stride_as, stride_ar, stride_ah,
                    SM, BLOCK_K, BLOCK_R, SPLIT, SG, CAST_FP32, DOT_PREC, 2, STACKED,
                )
    elif HAS_SHARED:
        # role 2: one block of tokens against the shared-outer A (once per token, not per pair)
        tok_rows = (pid - max_blocks * NSUB) * SM + offs_m
        _shrink_rows(
            x_ptr, sh_a_ptr, zsh_ptr, token_slot_ptr,
            tok_rows, tok_rows < T, tok_rows, tok_rows, H, S, R, k_chunk, 0,
            stride_xt, stride_xh, stride_ss, stride_sr, stride_sh,
            SM, BLOCK_K, BLOCK_R, SPLIT, SG, CAST_FP32, DOT_PREC,
        )


@triton.jit
def _moe_lora_down_shrink_kernel(
    act_ptr,  # [N, I + S*BLOCK_R]: columns [0, I) the activation (read), [I, I + S*BLOCK_R) z_d stacked (out)
    d_a_ptr,  # [S, E, R, I]
    token_slot_ptr, sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
    ready_ptr,  # [2, max_blocks] int32: I tiles of each block whose act is stored (the gate_up kernel counts),
    # parts of each block whose z_d is stored (this launch counts, the down kernel waits)
    N, TOPK, I, S, R, nt_gu, max_blocks,
    stride_am, stride_ds, stride_de, stride_dr, stride_di,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, SG: tl.constexpr,
    CAST_FP32: tl.constexpr, DOT_PREC: tl.constexpr, USE_PDL: tl.constexpr,
    SUB_M: tl.constexpr,  # rows per program (a divisor of BLOCK_M)
):
    """LoRA K step mode: z_d = down_A[s, e] a per pair, stacked by slot into act's extra columns (SUB_M
    rows of one expert block per program; blocks without adapter rows do nothing).

    A block starts once the gate_up kernel has stored all nt_gu I tiles of its act (ready[blk], acquire),
    not when that whole grid ends: the programs run beside its last ones. This launch is let in (PDL) only
    when every gate_up program has started, so none waits on a program that cannot run; the alignment it
    reads finished before those. The PDL wait at the end keeps the down kernel behind the whole gate_up
    grid (it waits only for this launch).
    """
    pdl_trigger(USE_PDL)
    NSUB: tl.constexpr = BLOCK_M // SUB_M
    pid = tl.program_id(0)
    blk = pid // NSUB
    live = blk * BLOCK_M < tl.load(num_padded_ptr)
    expert = tl.load(block_expert_ptr + blk)
    if live & (expert >= 0):  # noqa: SIM102 - the inner test reads the block, valid only when live
        if _block_has_adapter_rows(sorted_ids_ptr, token_slot_ptr, blk, N, TOPK, BLOCK_M):  # the down GEMM's test
            if USE_PDL:
                while tl.atomic_add(ready_ptr + blk, 0, sem="acquire", scope="gpu") < nt_gu:
                    pass
            rows = tl.load(sorted_ids_ptr + blk * BLOCK_M + (pid % NSUB) * SUB_M + tl.arange(0, SUB_M))
            _shrink_rows(
                act_ptr, d_a_ptr + expert.to(tl.int64) * stride_de, act_ptr + I, token_slot_ptr,
                rows, rows < N, rows // TOPK, rows, I, S, R, I, stride_am,
                stride_am, 1, stride_ds, stride_dr, stride_di,
                SUB_M, BLOCK_K, BLOCK_R, 1, SG, CAST_FP32, DOT_PREC, 1, True,
            )
            if USE_PDL:
                tl.debug_barrier()  # every thread's z_d stores precede the release below
                tl.atomic_add(ready_ptr + max_blocks + blk, 1, sem="release", scope="gpu")
    pdl_wait(USE_PDL)


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
    ready: torch.Tensor,
    tiles: int,
    *,
    sub_m: int | None = None,
    block_k: int = 64,
    cast_fp32: bool = False,
    dot_prec: str = "tf32",
) -> None:
    """LoRA K step mode, between the two GEMMs: act [T*k, I + S*BLOCK_R] holds the activation in its first
    I columns; this writes z_d = down_A[s, e] a, stacked by slot, into the rest (rows of blocks with
    adapter rows; zeros outside each row's own slot). With PDL a block waits until ready[0] ([2, max_blocks]
    int32, zero at the alignment, counted up by the gate_up kernel) reaches `tiles`, its number of I tiles,
    and counts each part it stores into ready[1] (the down kernel waits for block_m / sub_m of them)."""
    S, E, R, I = lora.down_A.shape
    br = lora_block_r(R)
    if act.shape[1] != I + S * br or act.stride(1) != 1:
        raise ValueError(f"moe_lora_down_shrink: act must be [N, {I + S * br}] with unit column stride")
    sm = shrink_sub_m(block_m, sub_m)
    sg = slot_group(S, sm, br, SHRINK_STACK_ELEMS)
    pdl = use_pdl(act.device)
    _moe_lora_down_shrink_kernel[(block_expert.numel() * (block_m // sm),)](
        act, lora.down_A, lora.token_slot, sorted_ids, block_expert, num_padded, ready,
        act.shape[0], topk, I, S, R, tiles, block_expert.numel(),
        act.stride(0), *lora.down_A.stride(),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=br, SG=sg, CAST_FP32=cast_fp32, DOT_PREC=dot_prec,
        USE_PDL=pdl, SUB_M=sm, num_warps=8 if sm * sg * br >= 8192 else 4, launch_pdl=pdl,
    )
