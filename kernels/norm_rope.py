"""RMSNorm (with the residual add) and rope with the KV store: the small per-layer steps, one launch each.

In eager torch a decoder layer's norms, q/k norms, rope and residual adds are some forty launches of 1-4 us
(casts, a power, a mean, an rsqrt, products, a concatenation per rotate_half, index gathers of cos / sin),
which at decode cost more than the attention itself. These kernels do each group in one pass, rounding to
the model dtype wherever the references (and transformers) do.

`rms_norm(x, weight, eps)` -> y:
    x [T, H] (any row stride, unit column stride); y [T, H] = weight * (x * rsqrt(mean(x^2) + eps)), the
    statistics in fp32, the normalised row rounded to x.dtype before the weight (transformers' RMSNorm).
`add_rms_norm(x, residual, weight, eps)` -> (y, h):
    h = x + residual in x.dtype (the decoder's residual stream), y = rms_norm(h).
`rope_store(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, q_norm=None, k_norm=None, eps=0.,
           k_out=None)` -> q rotated [T, n_h, D]:
    q [T, n_h, D], k / v [T, n_kv, D] (views of the qkv output are fine: unit stride along D);
    q_norm / k_norm [D]: a per-head RMSNorm before rope (Qwen3), or None; neox rope (rotate_half) from the
    cos / sin caches [max_positions, D] in the model dtype; k rotated and v are written into the paged
    caches [num_blocks, block_size, n_kv, D] at slot_mapping [T] int64 (-1: not stored, as `store_kv`);
    k_out [T, n_kv, D] in the cache dtype, or None: each stored row's rotated k there as well (the prefill
    attention's `k_new`).
"""

from __future__ import annotations

import torch
import triton

from lorax.kernels.attention import store_kv_ref
from lorax.kernels.norm_rope_kernels import _rms_norm_kernel, _rope_store_kernel

# ----------------------------------------------------------------------------------------------
# References (the CPU path, and the tests' oracle)
# ----------------------------------------------------------------------------------------------


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + residual
    return rms_norm_ref(h, weight, eps), h


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, n, D], cos / sin [T, 1, D] -> x * cos + rotate_half(x) * sin (each op in x.dtype)."""
    return x * cos + rotate_half(x) * sin


def rope_store_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
    sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 0.0,
    k_out: torch.Tensor | None = None,
) -> torch.Tensor:
    if q_norm is not None and k_norm is not None:
        q, k = rms_norm_ref(q, q_norm, eps), rms_norm_ref(k, k_norm, eps)
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    q, k = rope_ref(q, c, s), rope_ref(k, c, s)
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    if k_out is not None:
        keep = slot_mapping >= 0
        k_out[keep] = k[keep].to(k_cache.dtype).to(k_out.dtype)
    return q


# ----------------------------------------------------------------------------------------------
# Triton launchers
# ----------------------------------------------------------------------------------------------


def _check_rows(name: str, t: torch.Tensor, H: int) -> None:
    if t.dim() != 2 or t.shape[1] != H or (H > 1 and t.stride(1) != 1):
        raise ValueError(f"{name}: expected [T, {H}] with unit column stride, got {tuple(t.shape)} "
                         f"strides {t.stride()}")


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    T, H = x.shape
    _check_rows("rms_norm x", x, H)
    if weight.shape != (H,):
        raise ValueError(f"rms_norm: weight is {tuple(weight.shape)}, expected ({H},)")
    y = torch.empty(T, H, dtype=x.dtype, device=x.device)
    h = None
    if residual is not None:
        _check_rows("add_rms_norm residual", residual, H)
        if residual.shape[0] != T or residual.dtype != x.dtype:
            raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} {residual.dtype} does not match "
                             f"x {tuple(x.shape)} {x.dtype}")
        h = torch.empty_like(y)
    if T:
        block = triton.next_power_of_2(H)
        _rms_norm_kernel[(T,)](
            x, residual if residual is not None else x, weight, y, h if h is not None else y, H, eps,
            x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
            h.stride(0) if h is not None else 0,
            BLOCK_H=block, HAS_RES=residual is not None, num_warps=max(1, min(8, block // 512)),
            enable_fp_fusion=False,
        )
    return y, h


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton `rms_norm`: one program per row."""
    return _norm(x, None, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `add_rms_norm`: the residual sum and its norm in one pass, one program per row."""
    y, h = _norm(x, residual, weight, eps)
    assert h is not None
    return y, h


def rope_store(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
    sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 0.0,
    k_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton `rope_store`: one program per token (its q heads, then its k and v heads into the cache; with
    k_out [T, n_kv, D] (unit stride along D), each stored row's rotated k there too)."""
    T, n_h, D = q.shape
    n_kv = k.shape[1]
    if k.shape != (T, n_kv, D) or v.shape != k.shape or D % 2:
        raise ValueError(f"rope_store: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected "
                         f"[T, n_h, D] and [T, n_kv, D] with an even D")
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("rope_store: q, k and v need a unit stride along D")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != D or cos.stride(1) != 1 or cos.stride() != sin.stride():
        raise ValueError(f"rope_store: cos / sin must be [max_positions, {D}] alike, got {tuple(cos.shape)} "
                         f"{tuple(sin.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[2:] != (n_kv, D) \
            or k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError(f"rope_store: caches must be [blocks, block_size, {n_kv}, {D}] alike, got "
                         f"{tuple(k_cache.shape)} {tuple(v_cache.shape)}")
    if slot_mapping.shape != (T,) or slot_mapping.dtype != torch.int64 or positions.shape != (T,):
        raise ValueError(f"rope_store: positions and slot_mapping must be [T={T}] (slot_mapping int64)")
    if (q_norm is None) != (k_norm is None) or (q_norm is not None and q_norm.shape != (D,)):
        raise ValueError(f"rope_store: q_norm and k_norm are both [{D}] or both None")
    if k_out is not None and (k_out.shape != k.shape or k_out.dtype != k_cache.dtype or k_out.stride(2) != 1):
        raise ValueError(f"rope_store: k_out must be {tuple(k.shape)} {k_cache.dtype} with a unit stride along D, "
                         f"got {tuple(k_out.shape)} {k_out.dtype} strides {k_out.stride()}")
    out = torch.empty(T, n_h, D, dtype=q.dtype, device=q.device)
    if T:
        half = D // 2
        _rope_store_kernel[(T,)](
            q, k, v, positions, cos, sin, q_norm if q_norm is not None else q, k_norm if k_norm is not None else q,
            out, k_cache, v_cache, slot_mapping, k_out if k_out is not None else out,
            n_h, n_kv, eps, k_cache.shape[1],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            *((k_out.stride(0), k_out.stride(1)) if k_out is not None else (0, 0)),
            HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_QH=triton.next_power_of_2(n_h),
            BLOCK_KH=triton.next_power_of_2(n_kv), HAS_NORM=q_norm is not None, K_OUT=k_out is not None, num_warps=4,
            enable_fp_fusion=False,  # (a fused multiply-add would skip the roundings the reference takes)
        )
    return out
