"""Fused MoE: grouped GEMMs over tokens aligned by expert, with optional LoRA deltas.

Contract of `fused_moe` (Triton) and `fused_moe_ref`:

    x             [T, H]        activations (bf16/fp16/fp32)
    w13           [E, 2I, H]    gate rows [0, I), up rows [I, 2I)   (transformers' gate_up_proj layout)
    w2            [E, H, I]
    topk_weights  [T, k] float  routing weights (already renormalised if the model does so)
    topk_ids      [T, k] int32  expert ids; negative = sentinel (expert not on this rank): no contribution
    lora          MoELoraArgs | None
    returns       [T, H] = sum_j w[t,j] * (W2[e] silu_and_mul(W13[e] x_t + dgu) + ddown)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorax.kernels.moe_align import virtual_expert_ids_ref
from lorax.kernels.moe_lora import MoELoraArgs, moe_lora_down_ref, moe_lora_gate_up_ref


def silu_and_mul(h: torch.Tensor) -> torch.Tensor:
    inter = h.shape[-1] // 2
    return F.silu(h[..., :inter]) * h[..., inter:]


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    lora: MoELoraArgs | None = None,
    *,
    scratch: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Torch reference. Takes the Triton keyword hints so both backends share one call signature:
    scratch and config are ignored, out (if given) receives the result."""
    T, k = topk_ids.shape
    E = w13.shape[0]
    flat = topk_ids.reshape(-1).long()
    h = torch.zeros(T * k, w13.shape[1], dtype=x.dtype, device=x.device)
    for e in range(E):
        pairs = (flat == e).nonzero(as_tuple=True)[0]
        if pairs.numel():
            h[pairs] = x[pairs // k] @ w13[e].T
    vid = None
    if lora is not None:
        vid = virtual_expert_ids_ref(topk_ids, lora.token_slot, E)
        moe_lora_gate_up_ref(x, vid, lora, h)
    a = silu_and_mul(h)  # [T*k, I]
    w = topk_weights.reshape(-1, 1).to(torch.float32)
    y = torch.zeros(T, w2.shape[1], dtype=torch.float32, device=x.device)
    for e in range(E):
        pairs = (flat == e).nonzero(as_tuple=True)[0]
        if pairs.numel():
            y.index_add_(0, pairs // k, w[pairs] * (a[pairs] @ w2[e].T).float())
    if lora is not None and vid is not None:
        moe_lora_down_ref(a, vid, topk_weights, lora, y)
    if out is not None:
        out.copy_(y)
        return out
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Triton implementation. Launches: moe_align (3 + memset), [LoRA shrink], gate_up GEMM, down GEMM, top-k
# sum. Every GEMM walks the aligned blocks; blocks past the device-side num_padded exit first.
# ----------------------------------------------------------------------------------------------------

import json  # noqa: E402
import os  # noqa: E402
from functools import cache  # noqa: E402
from typing import NamedTuple  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lorax.kernels.moe_align import interpreting, moe_align  # noqa: E402
from lorax.kernels.moe_lora import lora_block_r, moe_lora_shrink  # noqa: E402


@triton.jit
def _block_rows(pid, sorted_ids_ptr, block_expert_ptr, num_padded_ptr, num_pid_n, N,
                GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grouped (pid_m, pid_n) order, this block's live flag, expert and pair rows."""
    num_pid_m = tl.cdiv(tl.load(num_padded_ptr), BLOCK_M)  # device-side count of live blocks
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group = tl.minimum(num_pid_m - first_m, GROUP_M)
    group = tl.maximum(group, 1)
    pid_m = first_m + (pid % width) % group
    pid_n = (pid % width) // group
    live = pid_m < num_pid_m
    expert = tl.load(block_expert_ptr + pid_m, mask=live, other=-1)
    rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M), mask=live, other=N)
    # the grid is sized from the host bound (max blocks), so the last live group also gets programs
    # whose pid_n runs past num_pid_n: they must not run (they would write other rows' partials)
    return live & (expert >= 0) & (pid_n < num_pid_n), expert, rows, pid_n


@triton.jit
def _gate_up_kernel(
    # pointers
    x_ptr,  # [T, H]
    w13_ptr,  # [E, 2I, H]
    act_ptr,  # [N, I] out: silu(gate) * up, rows indexed by pair
    sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
    token_slot_ptr,  # [T] int32 (LoRA)
    zgu_ptr,  # [N, SPLIT, 2, BLOCK_R] fp32 shrink partials (LoRA)
    zsh_ptr,  # [T, SPLIT, 2, BLOCK_R] fp32 shared-outer shrink partials (HAS_SHARED)
    gu_b_ptr,  # [S, E, 2I, R] (LoRA)
    d_a_ptr,  # [S, E, R, I] (LoRA)
    zdp_ptr,  # [N, num_pid_n, BLOCK_R] fp32 out: down-shrink partials of this I tile (LoRA)
    # sizes
    N, TOPK, H, I, S, R,
    # strides
    stride_xt, stride_xh, stride_we, stride_wn, stride_wh, stride_am,
    stride_bs, stride_be, stride_bn, stride_br,
    stride_ds, stride_de, stride_dr, stride_di,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_SHARED: tl.constexpr, SPLIT: tl.constexpr, BLOCK_R: tl.constexpr,
    SG: tl.constexpr,  # slots stacked per LoRA dot (power of two)
    EVEN_K: tl.constexpr, CAST_FP32: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # each program owns BLOCK_N gate columns and the matching BLOCK_N up columns of one block of pairs
    num_pid_n = tl.cdiv(I, BLOCK_N)
    ok, expert, rows, pid_n = _block_rows(tl.program_id(0), sorted_ids_ptr, block_expert_ptr,
                                          num_padded_ptr, num_pid_n, N, GROUP_M, BLOCK_M)
    if ok:
        mask_m = rows < N
        token = (rows // TOPK).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < I
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :] * stride_xh
        wg_ptrs = (w13_ptr + expert.to(tl.int64) * stride_we
                   + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wh)  # [BLOCK_K, BLOCK_N]
        wu_ptrs = wg_ptrs + I * stride_wn
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            if EVEN_K:
                xt = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
                wg = tl.load(wg_ptrs, mask=mask_n[None, :], other=0.0)
                wu = tl.load(wu_ptrs, mask=mask_n[None, :], other=0.0)
            else:
                mask_k = offs_k < H - k0
                xt = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                wg = tl.load(wg_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                wu = tl.load(wu_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if CAST_FP32:
                xt = xt.to(tl.float32)
                wg = wg.to(tl.float32)
                wu = wu.to(tl.float32)
            acc_g = tl.dot(xt, wg, acc_g, input_precision=DOT_PREC)
            acc_u = tl.dot(xt, wu, acc_u, input_precision=DOT_PREC)
            x_ptrs += BLOCK_K * stride_xh
            wg_ptrs += BLOCK_K * stride_wh
            wu_ptrs += BLOCK_K * stride_wh
        if HAS_LORA:
            # gate_up expand before the activation: h += [B_gate z_gate ; B_up z_up]. Slots are stacked
            # SG at a time along the dot's K axis (column g*BLOCK_R + r holds z[:, r] of the rows whose
            # slot is s0 + g, zero elsewhere): one dot and one masked tile load per group, no per-slot
            # branches, so the B loads of all present slots are in flight together.
            slot = tl.load(token_slot_ptr + token, mask=mask_m, other=-1)
            has = slot >= 0
            any_lora = tl.max(has.to(tl.int32), axis=0) > 0  # blocks without adapter rows skip it all
            offs_q = tl.arange(0, SG * BLOCK_R)
            q_s = offs_q // BLOCK_R  # slot (within the group) of stacked column q
            q_r = offs_q % BLOCK_R  # rank index of stacked column q
            if any_lora:
                z_ptrs = zgu_ptr + rows.to(tl.int64)[:, None] * (SPLIT * 2 * BLOCK_R) + q_r[None, :]
                zs_ptrs = zsh_ptr + token[:, None] * (SPLIT * 2 * BLOCK_R) + q_r[None, :]
                b_ptrs = (gu_b_ptr + expert.to(tl.int64) * stride_be + offs_n[None, :] * stride_bn
                          + q_r[:, None] * stride_br)  # [SG*BLOCK_R, BLOCK_N]
                for s0 in range(0, S, SG):
                    sel = slot[:, None] == (s0 + q_s)[None, :]  # [BLOCK_M, SG*BLOCK_R]
                    present = tl.max(sel.to(tl.int32), axis=0) > 0  # [SG*BLOCK_R]
                    if tl.max(present.to(tl.int32), axis=0) > 0:
                        # the shrink's K-split partials, read straight into the stacked layout
                        zg = tl.zeros([BLOCK_M, SG * BLOCK_R], dtype=tl.float32)
                        zu = tl.zeros([BLOCK_M, SG * BLOCK_R], dtype=tl.float32)
                        for sp in tl.static_range(SPLIT):
                            zg += tl.load(z_ptrs + sp * 2 * BLOCK_R, mask=sel, other=0.0)
                            zu += tl.load(z_ptrs + sp * 2 * BLOCK_R + BLOCK_R, mask=sel, other=0.0)
                            if HAS_SHARED:
                                zg += tl.load(zs_ptrs + sp * 2 * BLOCK_R, mask=sel, other=0.0)
                                zu += tl.load(zs_ptrs + sp * 2 * BLOCK_R + BLOCK_R, mask=sel, other=0.0)
                        m_b = (present & (q_r < R))[:, None] & mask_n[None, :]
                        bs_ptrs = b_ptrs + (s0 + q_s).to(tl.int64)[:, None] * stride_bs
                        bg = tl.load(bs_ptrs, mask=m_b, other=0.0)
                        bu = tl.load(bs_ptrs + I * stride_bn, mask=m_b, other=0.0)
                        if CAST_FP32:
                            bg = bg.to(tl.float32)
                            bu = bu.to(tl.float32)
                        acc_g = tl.dot(zg.to(bg.dtype), bg, acc_g, input_precision=DOT_PREC)
                        acc_u = tl.dot(zu.to(bu.dtype), bu, acc_u, input_precision=DOT_PREC)
        act = (acc_g / (1.0 + tl.exp(-acc_g)) * acc_u).to(act_ptr.dtype.element_ty)
        tl.store(act_ptr + rows.to(tl.int64)[:, None] * stride_am + offs_n[None, :], act,
                 mask=mask_m[:, None] & mask_n[None, :])
        if HAS_LORA:  # noqa: SIM102 - a constexpr test, then a runtime one
            if any_lora:
                # down shrink, partial over this I tile: zdp[n, pid_n] = down_A[s, e][:, tile] a[n, tile],
                # one stacked dot per slot group, then each row keeps its own slot's column block
                zd = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
                da_ptrs = (d_a_ptr + expert.to(tl.int64) * stride_de + offs_n[:, None] * stride_di
                           + q_r[None, :] * stride_dr)  # [BLOCK_N, SG*BLOCK_R]
                a_op = act
                if CAST_FP32:
                    a_op = act.to(tl.float32)
                for s0 in range(0, S, SG):
                    sel = slot[:, None] == (s0 + q_s)[None, :]
                    present = tl.max(sel.to(tl.int32), axis=0) > 0
                    if tl.max(present.to(tl.int32), axis=0) > 0:
                        m_d = mask_n[:, None] & (present & (q_r < R))[None, :]
                        da = tl.load(da_ptrs + (s0 + q_s).to(tl.int64)[None, :] * stride_ds, mask=m_d, other=0.0)
                        if CAST_FP32:
                            da = da.to(tl.float32)
                        zw = tl.where(sel, tl.dot(a_op, da, input_precision=DOT_PREC), 0.0)  # [BLOCK_M, SG*R]
                        zd += tl.sum(tl.reshape(zw, [BLOCK_M, SG, BLOCK_R]), axis=1)
                offs_r = tl.arange(0, BLOCK_R)
                zdp_ptrs = zdp_ptr + (rows.to(tl.int64)[:, None] * num_pid_n + pid_n) * BLOCK_R + offs_r[None, :]
                tl.store(zdp_ptrs, zd, mask=has[:, None])


@triton.jit
def _down_kernel(
    # pointers
    act_ptr,  # [N, I]
    w2_ptr,  # [E, H, I]
    ypair_ptr,  # [N, H] out: w * (W2 a + down_B z_d) per pair, summed over k later
    topk_w_ptr,  # [N] routing weights
    sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
    token_slot_ptr,  # [T] (LoRA)
    zdp_ptr,  # [N, NT_GU, BLOCK_R] fp32 down-shrink partials (LoRA)
    d_b_ptr,  # [S, E, H, R] (LoRA)
    zdw_ptr,  # [N, BLOCK_R] fp32 out: w * z_d, for the shared-outer expand (HAS_SHARED)
    # sizes
    N, TOPK, H, I, S, R, NT_GU,  # NT_GU: I tiles of the gate_up kernel (partials per pair)
    # strides
    stride_am, stride_we, stride_wn, stride_wk, stride_ym,
    stride_bs, stride_be, stride_bn, stride_br,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_SHARED: tl.constexpr, BLOCK_R: tl.constexpr, NT_CHUNK: tl.constexpr,
    SG: tl.constexpr,
    EVEN_K: tl.constexpr, CAST_FP32: tl.constexpr, DOT_PREC: tl.constexpr,
):
    num_pid_n = tl.cdiv(H, BLOCK_N)
    ok, expert, rows, pid_n = _block_rows(tl.program_id(0), sorted_ids_ptr, block_expert_ptr,
                                          num_padded_ptr, num_pid_n, N, GROUP_M, BLOCK_M)
    if ok:
        mask_m = rows < N
        rows64 = rows.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < H
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = act_ptr + rows64[:, None] * stride_am + offs_k[None, :]
        w_ptrs = (w2_ptr + expert.to(tl.int64) * stride_we
                  + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk)  # [BLOCK_K, BLOCK_N]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            if EVEN_K:
                at = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
                wt = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
            else:
                mask_k = offs_k < I - k0
                at = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                wt = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if CAST_FP32:
                at = at.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(at, wt, acc, input_precision=DOT_PREC)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
        w = tl.load(topk_w_ptr + rows, mask=mask_m, other=0.0).to(tl.float32)
        if HAS_LORA:
            slot = tl.load(token_slot_ptr + rows // TOPK, mask=mask_m, other=-1)
            has = slot >= 0
            if tl.max(has.to(tl.int32), axis=0) > 0:  # blocks without adapter rows skip it all
                # z_d = sum of the gate_up kernel's per-I-tile partials, read (NT_CHUNK tiles per vector
                # load) straight into the slot-stacked layout, then one stacked dot with down_B per group
                offs_q = tl.arange(0, SG * BLOCK_R)
                q_s = offs_q // BLOCK_R
                q_r = offs_q % BLOCK_R
                offs_t = tl.arange(0, NT_CHUNK)
                zp_ptrs = (zdp_ptr + rows64[:, None, None] * (NT_GU * BLOCK_R) + offs_t[None, :, None] * BLOCK_R
                           + q_r[None, None, :])  # [BLOCK_M, NT_CHUNK, SG*BLOCK_R]
                db_ptrs = (d_b_ptr + expert.to(tl.int64) * stride_be + offs_n[None, :] * stride_bn
                           + q_r[:, None] * stride_br)  # [SG*BLOCK_R, BLOCK_N]
                for s0 in range(0, S, SG):
                    sel = slot[:, None] == (s0 + q_s)[None, :]
                    present = tl.max(sel.to(tl.int32), axis=0) > 0
                    if tl.max(present.to(tl.int32), axis=0) > 0:
                        db = tl.load(db_ptrs + (s0 + q_s).to(tl.int64)[:, None] * stride_bs,
                                     mask=(present & (q_r < R))[:, None] & mask_n[None, :], other=0.0)
                        zw = tl.zeros([BLOCK_M, SG * BLOCK_R], dtype=tl.float32)
                        for t0 in range(0, NT_GU, NT_CHUNK):
                            m_z = sel[:, None, :] & (t0 + offs_t < NT_GU)[None, :, None]
                            zw += tl.sum(tl.load(zp_ptrs + t0 * BLOCK_R, mask=m_z, other=0.0), axis=1)
                        if CAST_FP32:
                            db = db.to(tl.float32)
                        acc = tl.dot(zw.to(db.dtype), db, acc, input_precision=DOT_PREC)
                if HAS_SHARED:  # noqa: SIM102 - a constexpr test, then a runtime one
                    if pid_n == 0:
                        # w * z_d per pair for the shared-outer expand in the top-k sum (narrow layout);
                        # rows of pairs without an adapter are not written: the top-k sum masks them
                        offs_r = tl.arange(0, BLOCK_R)
                        zn_ptrs = (zdp_ptr + rows64[:, None, None] * (NT_GU * BLOCK_R)
                                   + offs_t[None, :, None] * BLOCK_R + offs_r[None, None, :])
                        zd = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
                        for t0 in range(0, NT_GU, NT_CHUNK):
                            m_z = has[:, None, None] & (t0 + offs_t < NT_GU)[None, :, None]
                            zd += tl.sum(tl.load(zn_ptrs + t0 * BLOCK_R, mask=m_z, other=0.0), axis=1)
                        tl.store(zdw_ptr + rows64[:, None] * BLOCK_R + offs_r[None, :], zd * w[:, None],
                                 mask=has[:, None])
        acc = acc * w[:, None]
        tl.store(ypair_ptr + rows64[:, None] * stride_ym + offs_n[None, :], acc.to(ypair_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _topk_sum_kernel(
    # pointers
    ypair_ptr,  # [T*k, H] per-pair outputs (rows of sentinel pairs were never written)
    topk_ids_ptr,  # [T, k] int32
    y_ptr,  # [T, H] out
    token_slot_ptr, zdw_ptr, sh_b_ptr,  # HAS_SHARED: [T], [T*k, BLOCK_R] fp32, [S, H, R]
    # sizes
    T, TOPK, E, H, S, R,
    stride_ym, stride_om, stride_ss, stride_sh, stride_sr,
    # meta
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_SHARED: tl.constexpr, CAST_FP32: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # deterministic top-k reduction (fixed j order, fp32), plus the shared-outer down expand once per token
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_t = offs_t < T
    mask_h = offs_h < H
    offs_t64 = offs_t.to(tl.int64)
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    offs_r = tl.arange(0, BLOCK_R)
    u = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
    slot = tl.load(token_slot_ptr + offs_t, mask=mask_t, other=-1)  # (without LoRA: any int32 [>= T])
    for j in range(0, TOPK):
        e = tl.load(topk_ids_ptr + offs_t64 * TOPK + j, mask=mask_t, other=-1)
        valid = (e >= 0) & (e < E)
        row = offs_t64 * TOPK + j
        acc += tl.load(ypair_ptr + row[:, None] * stride_ym + offs_h[None, :],
                       mask=valid[:, None] & mask_h[None, :], other=0.0).to(tl.float32)
        if HAS_SHARED:
            u += tl.load(zdw_ptr + row[:, None] * BLOCK_R + offs_r[None, :], mask=(valid & (slot >= 0))[:, None],
                         other=0.0)
    if HAS_SHARED:
        b_off = offs_h[None, :] * stride_sh + offs_r[:, None] * stride_sr
        for s in range(0, S):
            in_s = slot == s
            if tl.max(in_s.to(tl.int32), axis=0) > 0:
                sb = tl.load(sh_b_ptr + s * stride_ss + b_off, mask=(offs_r[:, None] < R) & mask_h[None, :],
                             other=0.0)
                us = tl.where(in_s[:, None], u, 0.0)
                if CAST_FP32:
                    sb = sb.to(tl.float32)
                else:
                    us = us.to(sb.dtype)
                acc = tl.dot(us, sb, acc, input_precision=DOT_PREC)
    tl.store(y_ptr + offs_t64[:, None] * stride_om + offs_h[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_t[:, None] & mask_h[None, :])


# ----------------------------------------------------------------------------------------------------
# Block configs: kernels/configs/fused_moe.json, keyed by device name, then "E{E}_H{H}_I{I}_k{k}", then
# the smallest token-count bucket >= T. Missing entries fall back to `_default_config`.
# ----------------------------------------------------------------------------------------------------

_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N_GU", "BLOCK_K_GU", "BLOCK_N_D", "BLOCK_K_D", "GROUP_M", "SPLIT",
                "num_warps", "num_stages")


@cache
def _config_table() -> dict:
    path = os.path.join(os.path.dirname(__file__), "configs", "fused_moe.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _default_config(T: int, topk: int, E: int) -> dict[str, int]:
    pairs_per_expert = T * topk / max(E, 1)
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N_GU=16, BLOCK_K_GU=16, BLOCK_N_D=16, BLOCK_K_D=16, GROUP_M=1, SPLIT=1,
                    num_warps=4, num_stages=1)
    if pairs_per_expert <= 4:
        return dict(BLOCK_M=16, BLOCK_N_GU=32, BLOCK_K_GU=256, BLOCK_N_D=64, BLOCK_K_D=256, GROUP_M=1, SPLIT=4,
                    num_warps=4, num_stages=3)
    if pairs_per_expert <= 48:
        return dict(BLOCK_M=32, BLOCK_N_GU=64, BLOCK_K_GU=128, BLOCK_N_D=64, BLOCK_K_D=128, GROUP_M=1, SPLIT=2,
                    num_warps=4, num_stages=4)
    return dict(BLOCK_M=64, BLOCK_N_GU=64, BLOCK_K_GU=64, BLOCK_N_D=128, BLOCK_K_D=64, GROUP_M=8, SPLIT=1,
                num_warps=4, num_stages=4)


def moe_config(T: int, topk: int, E: int, H: int, I: int, device: torch.device) -> dict[str, int]:
    """Block config for one fused_moe call (host ints only)."""
    if device.type == "cuda" and not interpreting():
        by_shape = _config_table().get(torch.cuda.get_device_name(device), {}).get(f"E{E}_H{H}_I{I}_k{topk}")
        if by_shape:
            buckets = sorted(int(b) for b in by_shape)
            pick = next((b for b in buckets if b >= T), buckets[-1])
            return {**_default_config(T, topk, E), **by_shape[str(pick)]}
    return _default_config(T, topk, E)


class _Buffers(NamedTuple):
    act: torch.Tensor  # [N, I] x.dtype
    ypair: torch.Tensor  # [N, H] x.dtype
    zgu: torch.Tensor  # [N, SPLIT, 2, BLOCK_R] fp32 (LoRA) else [0]
    zsh: torch.Tensor  # [T, SPLIT, 2, BLOCK_R] fp32 (shared-outer) else [0]
    zdp: torch.Tensor  # [N, NT_GU, BLOCK_R] fp32 (LoRA) else [0]
    zdw: torch.Tensor  # [N, BLOCK_R] fp32 (shared-outer) else [0]


def _buffer_specs(T: int, topk: int, H: int, I: int, dtype: torch.dtype, lora: MoELoraArgs | None,
                  cfg: dict[str, int]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    N = T * topk
    specs: list[tuple[tuple[int, ...], torch.dtype]] = [((N, I), dtype), ((N, H), dtype)]
    f32 = torch.float32
    if lora is None:
        return specs + [((0,), f32)] * 4
    br = lora_block_r(lora.gate_up_A.shape[2] // 2)
    shared = lora.shared_gate_up_A is not None or lora.shared_down_B is not None
    nt = triton.cdiv(I, cfg["BLOCK_N_GU"])
    specs.append(((N, cfg["SPLIT"], 2, br), f32))
    specs.append(((T, cfg["SPLIT"], 2, br) if shared else (0,), f32))
    specs.append(((N, nt, br), f32))
    specs.append(((N, br) if shared else (0,), f32))
    return specs


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return (n * torch.empty(0, dtype=dtype).element_size() + 255) // 256 * 256


def fused_moe_scratch_bytes(x: torch.Tensor, w13: torch.Tensor, topk: int, lora: MoELoraArgs | None = None) -> int:
    """Bytes of the `scratch` workspace one fused_moe call on x [T, H] needs (CUDA-graph runners
    allocate it once per captured T; a call may pass a larger buffer)."""
    T, H = x.shape
    E, two_i, _ = w13.shape
    cfg = moe_config(T, topk, E, H, two_i // 2, x.device)
    return sum(_nbytes(s, d) for s, d in _buffer_specs(T, topk, H, two_i // 2, x.dtype, lora, cfg))


def _carve(specs: list[tuple[tuple[int, ...], torch.dtype]], scratch: torch.Tensor | None,
           device: torch.device) -> _Buffers:
    if scratch is None:
        return _Buffers(*(torch.empty(s, dtype=d, device=device) for s, d in specs))
    need = sum(_nbytes(s, d) for s, d in specs)
    if scratch.dtype != torch.uint8 or scratch.dim() != 1 or scratch.numel() < need:
        raise ValueError(f"fused_moe: scratch must be a 1-D uint8 tensor of >= {need} bytes")
    out, off = [], 0
    for shape, dtype in specs:
        n = _nbytes(shape, dtype)
        numel = n // torch.empty(0, dtype=dtype).element_size()
        flat = scratch[off : off + n].view(dtype)[:numel]
        cnt = 1
        for d in shape:
            cnt *= d
        out.append(flat[:cnt].view(shape))
        off += n
    return _Buffers(*out)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    lora: MoELoraArgs | None = None,
    *,
    scratch: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Triton fused MoE (contract at the top of this file). No host sync: safe inside CUDA graphs.

    scratch: optional 1-D uint8 workspace of >= `fused_moe_scratch_bytes(x, w13, k, lora)` bytes.
    out: optional [T, H] output (x.dtype). config: optional block config (see `moe_config`).
    """
    T, H = x.shape
    E, two_i, h_w = w13.shape
    I = two_i // 2
    topk = topk_ids.shape[1] if topk_ids.dim() == 2 else -1
    if h_w != H or w2.shape != (E, H, I) or topk_ids.shape != (T, topk) or topk_weights.shape != (T, topk):
        raise ValueError(
            f"fused_moe: shapes x {tuple(x.shape)} w13 {tuple(w13.shape)} w2 {tuple(w2.shape)} "
            f"topk_ids {tuple(topk_ids.shape)} topk_weights {tuple(topk_weights.shape)} do not agree"
        )
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"fused_moe: x, w13, w2 dtypes differ ({x.dtype}, {w13.dtype}, {w2.dtype})")
    y = out if out is not None else torch.empty(T, H, dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    ids = topk_ids if topk_ids.dtype == torch.int32 else topk_ids.to(torch.int32)
    ids = ids.contiguous()
    weights = topk_weights.reshape(-1)
    cfg = config or moe_config(T, topk, E, H, I, x.device)
    bm = cfg["BLOCK_M"]
    buf = _carve(_buffer_specs(T, topk, H, I, x.dtype, lora, cfg), scratch, x.device)
    align = moe_align(ids, E, bm)
    N = T * topk
    max_blocks = align.block_expert.numel()
    cast = interpreting()
    # fp32 (a CPU/debug dtype) on a GPU: exact fp32 products and tiles that fit in shared memory
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    if x.dtype == torch.float32 and not cast:
        cfg = {**cfg, "BLOCK_K_GU": min(cfg["BLOCK_K_GU"], 64), "BLOCK_K_D": min(cfg["BLOCK_K_D"], 64),
               "num_stages": min(cfg["num_stages"], 2)}
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    has_lora = lora is not None
    S = R = 0
    br = 16
    has_shared = False
    dummy = x  # pointer for arguments a launch never reads
    gu_b = d_a = d_b = sh_b = dummy
    slot = ids
    if lora is not None:
        S, _, two_r, _ = lora.gate_up_A.shape
        R = two_r // 2
        br = lora_block_r(R)
        for name, t, shape in (("gate_up_A", lora.gate_up_A, (S, E, 2 * R, H)),
                               ("gate_up_B", lora.gate_up_B, (S, E, 2 * I, R)),
                               ("down_A", lora.down_A, (S, E, R, I)), ("down_B", lora.down_B, (S, E, H, R))):
            if tuple(t.shape) != shape or t.dtype != x.dtype:
                raise ValueError(f"fused_moe: lora.{name} is {tuple(t.shape)} {t.dtype}, expected {shape} {x.dtype}")
        has_shared = lora.shared_gate_up_A is not None or lora.shared_down_B is not None
        slot = lora.token_slot
        gu_b, d_a, d_b = lora.gate_up_B, lora.down_A, lora.down_B
        if has_shared:
            zero_a = torch.zeros(S, 2 * R, H, dtype=x.dtype, device=x.device)
            zero_b = torch.zeros(S, H, R, dtype=x.dtype, device=x.device)
            sh_a = lora.shared_gate_up_A if lora.shared_gate_up_A is not None else zero_a
            sh_b = lora.shared_down_B if lora.shared_down_B is not None else zero_b
            lora = lora._replace(shared_gate_up_A=sh_a, shared_down_B=sh_b)
        moe_lora_shrink(x, lora, align.sorted_ids, align.block_expert, align.num_padded, topk, bm, cfg["SPLIT"],
                        buf.zgu, buf.zsh if has_shared else None, cast_fp32=cast, dot_prec=prec)
    nt_gu = triton.cdiv(I, cfg["BLOCK_N_GU"])
    # slots stacked per LoRA dot: K = SG * BLOCK_R <= 64 and BLOCK_M * K <= 1024 keep the stacked
    # operands in registers (ptxas: no spills at BLOCK_M 16..64 on sm_90)
    sg = min(triton.next_power_of_2(max(S, 1)), max(1, 64 // br), max(1, 1024 // (bm * br)))
    nt_chunk = max(1, min(triton.next_power_of_2(nt_gu), 4096 // (bm * sg * br)))
    _gate_up_kernel[(max_blocks * nt_gu,)](
        x, w13, buf.act, align.sorted_ids, align.block_expert, align.num_padded,
        slot, buf.zgu, buf.zsh, gu_b, d_a, buf.zdp,
        N, topk, H, I, S, R,
        x.stride(0), x.stride(1), *w13.stride(), buf.act.stride(0),
        *(gu_b.stride() if has_lora else (0, 0, 0, 0)), *(d_a.stride() if has_lora else (0, 0, 0, 0)),
        BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N_GU"], BLOCK_K=cfg["BLOCK_K_GU"], GROUP_M=cfg["GROUP_M"],
        HAS_LORA=has_lora, HAS_SHARED=has_shared, SPLIT=cfg["SPLIT"], BLOCK_R=br, SG=sg,
        EVEN_K=H % cfg["BLOCK_K_GU"] == 0, CAST_FP32=cast, DOT_PREC=prec, **launch,
    )
    _down_kernel[(max_blocks * triton.cdiv(H, cfg["BLOCK_N_D"]),)](
        buf.act, w2, buf.ypair, weights, align.sorted_ids, align.block_expert, align.num_padded,
        slot, buf.zdp, d_b, buf.zdw,
        N, topk, H, I, S, R, nt_gu,
        buf.act.stride(0), *w2.stride(), buf.ypair.stride(0),
        *(d_b.stride() if has_lora else (0, 0, 0, 0)),
        BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N_D"], BLOCK_K=cfg["BLOCK_K_D"], GROUP_M=cfg["GROUP_M"],
        HAS_LORA=has_lora, HAS_SHARED=has_shared, BLOCK_R=br, NT_CHUNK=nt_chunk, SG=sg,
        EVEN_K=I % cfg["BLOCK_K_D"] == 0, CAST_FP32=cast, DOT_PREC=prec, **launch,
    )
    block_t = 16
    block_h = min(256, triton.next_power_of_2(H))
    _topk_sum_kernel[(triton.cdiv(T, block_t), triton.cdiv(H, block_h))](
        buf.ypair, ids, y, slot, buf.zdw, sh_b,
        T, topk, E, H, S, R,
        buf.ypair.stride(0), y.stride(0), *(sh_b.stride() if has_shared else (0, 0, 0)),
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_R=br, HAS_SHARED=has_shared, CAST_FP32=cast, DOT_PREC=prec,
        num_warps=4,
    )
    return y
