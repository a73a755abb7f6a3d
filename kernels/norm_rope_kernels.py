"""The Triton kernels behind kernels/norm_rope.py (contracts, launchers and references live there).

Both follow the references' roundings: every step the reference takes in the model dtype (the residual sum,
the normalised row before the weight, each rope product and their sum) is rounded to it here too, so that
the kernels and transformers agree to the last bit wherever the fp32 statistics do.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lorax.kernels.attention_kernels import _cache_row


@triton.jit
def _rnd(x, DT: tl.constexpr):
    """x rounded to the model dtype and back to fp32 (what one torch op in that dtype does)."""
    return x.to(DT).to(tl.float32)


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr,
    y_ptr,  # [T, H] out: w * norm(h)
    h_ptr,  # [T, H] out (HAS_RES): h = x + res, in x's dtype
    H, eps,
    stride_x, stride_r, stride_y, stride_h,
    BLOCK_H: tl.constexpr, HAS_RES: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    DT: tl.constexpr = y_ptr.dtype.element_ty
    x = tl.load(x_ptr + t * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x = _rnd(x + tl.load(res_ptr + t * stride_r + offs, mask=mask, other=0.0).to(tl.float32), DT)
        tl.store(h_ptr + t * stride_h + offs, x.to(DT), mask=mask)
    inv = tl.math.rsqrt(tl.sum(x * x, axis=0) / H + eps)  # (as torch.rsqrt: H100, 99.9995% bit-equal)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + t * stride_y + offs, (w * _rnd(x * inv, DT)).to(DT), mask=mask)


@triton.jit
def _rope_heads(src, stride_h, n, c1, c2, s1, s2, w_ptr, eps, offs_d, mask_d,
                BLOCK_NH: tl.constexpr, HALF: tl.constexpr, HAS_NORM: tl.constexpr, DT: tl.constexpr):
    """n heads of one token (src: head 0, halves at +0 and +HALF): the per-head RMSNorm (HAS_NORM), then
    neox rope; returns the two rotated halves [BLOCK_NH, BLOCK_HALF] (fp32 holding model-dtype values) and
    their mask."""
    offs_h = tl.arange(0, BLOCK_NH)
    m = (offs_h < n)[:, None] & mask_d[None, :]
    p = src + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(p, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(p + HALF, mask=m, other=0.0).to(tl.float32)
    if HAS_NORM:
        inv = tl.math.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)
        w1 = tl.load(w_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        x1 = _rnd(w1[None, :] * _rnd(x1 * inv[:, None], DT), DT)
        x2 = _rnd(w2[None, :] * _rnd(x2 * inv[:, None], DT), DT)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]; each product and the sum rounded
    o1 = _rnd(_rnd(x1 * c1[None, :], DT) + _rnd(-x2 * s1[None, :], DT), DT)
    o2 = _rnd(_rnd(x2 * c2[None, :], DT) + _rnd(x1 * s2[None, :], DT), DT)
    return o1, o2, m


@triton.jit
def _rope_store_kernel(
    q_ptr, k_ptr, v_ptr,  # [T, n_h, D], [T, n_kv, D] (any row / head stride, unit stride along D)
    pos_ptr,  # [T] positions
    cos_ptr, sin_ptr,  # [max_positions, D] in the model dtype
    qw_ptr, kw_ptr,  # [D] per-head q / k norm weights (HAS_NORM)
    q_out_ptr,  # [T, n_h, D] out, contiguous
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, n_kv, D], same strides
    slot_ptr,  # [T] int64, -1 = not stored
    k_out_ptr,  # [T, n_kv, D] the stored (rotated) k as well, for rows with a slot (K_OUT)
    n_h, n_kv, eps, block_size,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos,
    stride_cb, stride_co, stride_ch, stride_kot, stride_koh,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
    HAS_NORM: tl.constexpr, K_OUT: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    DT: tl.constexpr = q_out_ptr.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cs = cos_ptr + pos * stride_cos + offs_d
    sn = sin_ptr + pos * stride_cos + offs_d
    c1 = tl.load(cs, mask=mask_d, other=0.0).to(tl.float32)
    c2 = tl.load(cs + HALF, mask=mask_d, other=0.0).to(tl.float32)
    s1 = tl.load(sn, mask=mask_d, other=0.0).to(tl.float32)
    s2 = tl.load(sn + HALF, mask=mask_d, other=0.0).to(tl.float32)
    o1, o2, m = _rope_heads(q_ptr + t * stride_qt, stride_qh, n_h, c1, c2, s1, s2, qw_ptr, eps, offs_d, mask_d,
                            BLOCK_QH, HALF, HAS_NORM, DT)
    qo = q_out_ptr + t * (n_h * 2 * HALF) + tl.arange(0, BLOCK_QH)[:, None] * (2 * HALF) + offs_d[None, :]
    tl.store(qo, o1.to(DT), mask=m)
    tl.store(qo + HALF, o2.to(DT), mask=m)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        offs_h = tl.arange(0, BLOCK_KH)
        dst = _cache_row(slot, block_size, stride_cb, stride_co) + offs_h[:, None] * stride_ch
        k1, k2, mk = _rope_heads(k_ptr + t * stride_kt, stride_kh, n_kv, c1, c2, s1, s2, kw_ptr, eps, offs_d,
                                 mask_d, BLOCK_KH, HALF, HAS_NORM, DT)
        CT: tl.constexpr = k_cache_ptr.dtype.element_ty
        tl.store(k_cache_ptr + dst + offs_d[None, :], k1.to(DT).to(CT), mask=mk)
        tl.store(k_cache_ptr + dst + HALF + offs_d[None, :], k2.to(DT).to(CT), mask=mk)
        if K_OUT:
            ko = k_out_ptr + t * stride_kot + offs_h[:, None] * stride_koh + offs_d[None, :]
            tl.store(ko, k1.to(DT).to(CT), mask=mk)
            tl.store(ko + HALF, k2.to(DT).to(CT), mask=mk)
        pv = v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
        tl.store(v_cache_ptr + dst + offs_d[None, :], tl.load(pv, mask=mk).to(CT), mask=mk)
        tl.store(v_cache_ptr + dst + HALF + offs_d[None, :], tl.load(pv + HALF, mask=mk).to(CT), mask=mk)
