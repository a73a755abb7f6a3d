"""The Triton kernels behind kernels/moe_lora_seg.py (schedule, references and launchers live there).

Each walks the blocks of an alignment over virtual experts (slot * E + e, SEG_M pairs of one adapter and one
expert per block) and reads that pair's LoRA weights once per block:

    _seg_shrink_kernel       z[n] = gate_up_A[s, e] x_t                      (fp32, [N, 2 * BLOCK_R])
    _seg_expand_kernel       act[n] = silu(h_g + B_g z_g) * (h_u + B_u z_u),  z_d[n] = down_A[s, e] act[n]
                             (I_SPLIT programs per block, each over every I_SPLIT-th I tile: z_d partials)
    _seg_down_expand_kernel  ypair[n] += w_n down_B[s, e] z_d[n]   (z_d summed from those partials)
Blocks past the device-side num_padded, blocks of no virtual expert (-1) and padding rows (pair id == N) do
nothing. Every program waits for the previous launch before it reads or returns, so each grid ends after the
one before it (the chain of PDL launches stays ordered).
"""

from __future__ import annotations

import triton
import triton.language as tl

from lorax.kernels._common import pdl_trigger, pdl_wait


@triton.jit
def _seg_block(sorted_ids_ptr, block_v_ptr, num_padded_ptr, N, E, BLOCK_M: tl.constexpr, USE_PDL: tl.constexpr):
    """This program's virtual block, after the PDL wait: whether it has work, its slot and expert, its pair rows
    (int64; N = padding) and their mask."""
    pdl_wait(USE_PDL)
    pdl_trigger(USE_PDL)
    pid = tl.program_id(0)
    live = pid * BLOCK_M < tl.load(num_padded_ptr)
    v = tl.load(block_v_ptr + pid, mask=live, other=-1)
    rows = tl.load(sorted_ids_ptr + pid * BLOCK_M + tl.arange(0, BLOCK_M), mask=live, other=N)
    ok = live & (v >= 0)
    v = tl.maximum(v, 0)
    return ok, (v // E).to(tl.int64), (v % E).to(tl.int64), rows.to(tl.int64), rows < N


@triton.jit
def _operand(t, like_ptr, CAST_FP32: tl.constexpr):
    """A dot operand from an fp32 tile: fp32 under the interpreter (CAST_FP32), else like_ptr's dtype."""
    if CAST_FP32:
        return t.to(tl.float32)
    else:
        return t.to(like_ptr.dtype.element_ty)


@triton.jit
def _seg_shrink_kernel(
    x_ptr,  # [T, H]
    a_ptr,  # gate_up_A [S, E, 2R, H]
    z_ptr,  # [N, 2 * BLOCK_R] fp32 out: columns [0, BLOCK_R) gate, [BLOCK_R, 2 * BLOCK_R) up
    sorted_ids_ptr, block_v_ptr, num_padded_ptr,
    N, TOPK, E, H, R,
    stride_xt, stride_xh, stride_as, stride_ae, stride_ar, stride_ah,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    CAST_FP32: tl.constexpr, DOT_PREC: tl.constexpr, USE_PDL: tl.constexpr,
):
    ok, s, e, rows64, mask_m = _seg_block(sorted_ids_ptr, block_v_ptr, num_padded_ptr, N, E, BLOCK_M, USE_PDL)
    if ok:
        token = rows64 // TOPK
        offs_q = tl.arange(0, 2 * BLOCK_R)
        q_r = offs_q % BLOCK_R
        a_row = tl.where(offs_q < BLOCK_R, q_r, R + q_r)  # gate rows [0, R), up rows [R, 2R)
        mask_q = q_r < R
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :] * stride_xh
        a_ptrs = a_ptr + s * stride_as + e * stride_ae + a_row[None, :] * stride_ar + offs_k[:, None] * stride_ah
        acc = tl.zeros([BLOCK_M, 2 * BLOCK_R], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            mask_k = offs_k < H - k0
            xt = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            at = tl.load(a_ptrs, mask=mask_k[:, None] & mask_q[None, :], other=0.0)
            if CAST_FP32:
                xt = xt.to(tl.float32)
                at = at.to(tl.float32)
            acc = tl.dot(xt, at, acc, input_precision=DOT_PREC)
            x_ptrs += BLOCK_K * stride_xh
            a_ptrs += BLOCK_K * stride_ah
        tl.store(z_ptr + rows64[:, None] * (2 * BLOCK_R) + offs_q[None, :], acc, mask=mask_m[:, None])


@triton.jit
def _seg_expand_kernel(
    h_ptr,  # [N, 2I] x.dtype: the gate_up GEMM's output before the activation (rows with an adapter)
    z_ptr,  # [N, 2 * BLOCK_R] fp32 (the shrink's)
    b_ptr,  # gate_up_B [S, E, 2I, R]
    da_ptr,  # down_A [S, E, R, I]
    act_ptr,  # [N, I] out
    zd_ptr,  # [N, I_SPLIT, BLOCK_R] fp32 out: this program's partial of z_d
    sorted_ids_ptr, block_v_ptr, num_padded_ptr,
    N, E, I, R,
    stride_hm, stride_am,
    stride_bs, stride_be, stride_bn, stride_br,
    stride_ds, stride_de, stride_dr, stride_di,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, I_SPLIT: tl.constexpr,
    CAST_FP32: tl.constexpr, DOT_PREC: tl.constexpr, USE_PDL: tl.constexpr,
):
    ok, s, e, rows64, mask_m = _seg_block(sorted_ids_ptr, block_v_ptr, num_padded_ptr, N, E, BLOCK_M, USE_PDL)
    if ok:
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        z_rows = z_ptr + rows64[:, None] * (2 * BLOCK_R) + offs_r[None, :]
        zg = _operand(tl.load(z_rows, mask=mask_m[:, None], other=0.0), b_ptr, CAST_FP32)
        zu = _operand(tl.load(z_rows + BLOCK_R, mask=mask_m[:, None], other=0.0), b_ptr, CAST_FP32)
        pid_i = tl.program_id(1)
        offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
        b_ptrs = b_ptr + s * stride_bs + e * stride_be + offs_r[:, None] * stride_br + offs_i[None, :] * stride_bn
        d_ptrs = da_ptr + s * stride_ds + e * stride_de + offs_r[None, :] * stride_dr + offs_i[:, None] * stride_di
        h_ptrs = h_ptr + rows64[:, None] * stride_hm + offs_i[None, :]
        a_ptrs = act_ptr + rows64[:, None] * stride_am + offs_i[None, :]
        zd = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for i0 in range(0, I, I_SPLIT * BLOCK_I):
            mask_i = offs_i < I - i0
            m_b = mask_r[:, None] & mask_i[None, :]
            m_h = mask_m[:, None] & mask_i[None, :]
            bg = tl.load(b_ptrs, mask=m_b, other=0.0)  # [BLOCK_R, BLOCK_I]
            bu = tl.load(b_ptrs + I * stride_bn, mask=m_b, other=0.0)
            da = tl.load(d_ptrs, mask=mask_i[:, None] & mask_r[None, :], other=0.0)  # [BLOCK_I, BLOCK_R]
            g = tl.load(h_ptrs, mask=m_h, other=0.0).to(tl.float32)
            u = tl.load(h_ptrs + I, mask=m_h, other=0.0).to(tl.float32)
            if CAST_FP32:
                bg = bg.to(tl.float32)
                bu = bu.to(tl.float32)
                da = da.to(tl.float32)
            g = tl.dot(zg, bg, g, input_precision=DOT_PREC)
            u = tl.dot(zu, bu, u, input_precision=DOT_PREC)
            a = (g / (1.0 + tl.exp(-g)) * u).to(act_ptr.dtype.element_ty)
            tl.store(a_ptrs, a, mask=m_h)
            a_op = a
            if CAST_FP32:
                a_op = a.to(tl.float32)
            zd = tl.dot(a_op, da, zd, input_precision=DOT_PREC)
            b_ptrs += I_SPLIT * BLOCK_I * stride_bn
            d_ptrs += I_SPLIT * BLOCK_I * stride_di
            h_ptrs += I_SPLIT * BLOCK_I
            a_ptrs += I_SPLIT * BLOCK_I
        tl.store(zd_ptr + (rows64[:, None] * I_SPLIT + pid_i) * BLOCK_R + offs_r[None, :], zd, mask=mask_m[:, None])


@triton.jit
def _seg_down_expand_kernel(
    ypair_ptr,  # [N, H] in/out: w * W2 a per pair (the down GEMM's), plus w * down_B z_d here
    zd_ptr,  # [N, I_SPLIT, BLOCK_R] fp32 partials
    w_ptr,  # [N] routing weights
    db_ptr,  # down_B [S, E, H, R]
    sorted_ids_ptr, block_v_ptr, num_padded_ptr,
    N, E, H, R,
    stride_ym, stride_bs, stride_be, stride_bh, stride_br,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, I_SPLIT: tl.constexpr,
    CAST_FP32: tl.constexpr, DOT_PREC: tl.constexpr, USE_PDL: tl.constexpr,
):
    ok, s, e, rows64, mask_m = _seg_block(sorted_ids_ptr, block_v_ptr, num_padded_ptr, N, E, BLOCK_M, USE_PDL)
    if ok:
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        w = tl.load(w_ptr + rows64, mask=mask_m, other=0.0).to(tl.float32)
        zd = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for p in tl.static_range(I_SPLIT):
            zd += tl.load(zd_ptr + (rows64[:, None] * I_SPLIT + p) * BLOCK_R + offs_r[None, :], mask=mask_m[:, None],
                          other=0.0)
        zd = _operand(zd * w[:, None], db_ptr, CAST_FP32)
        offs_h = tl.arange(0, BLOCK_H)
        b_ptrs = db_ptr + s * stride_bs + e * stride_be + offs_r[:, None] * stride_br + offs_h[None, :] * stride_bh
        y_ptrs = ypair_ptr + rows64[:, None] * stride_ym + offs_h[None, :]
        for h0 in range(0, H, BLOCK_H):
            mask_h = offs_h < H - h0
            db = tl.load(b_ptrs, mask=mask_r[:, None] & mask_h[None, :], other=0.0)  # [BLOCK_R, BLOCK_H]
            m_y = mask_m[:, None] & mask_h[None, :]
            y = tl.load(y_ptrs, mask=m_y, other=0.0).to(tl.float32)
            if CAST_FP32:
                db = db.to(tl.float32)
            y = tl.dot(zd, db, y, input_precision=DOT_PREC)
            tl.store(y_ptrs, y.to(ypair_ptr.dtype.element_ty), mask=m_y)
            b_ptrs += BLOCK_H * stride_bh
            y_ptrs += BLOCK_H
