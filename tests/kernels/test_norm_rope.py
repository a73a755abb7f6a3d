"""rms_norm / add_rms_norm, rope_store and router_topk (Triton) == their references.

The kernels round to the model dtype where the references do, so in 16 bits nearly every element is
bit-identical (the fp32 statistics may differ in their last bits and move a rounding); the residual sum,
the KV cache's untouched slots and the chosen experts must be exact. CPU: TRITON_INTERPRET=1 with small
shapes; GPU (`gpu` marker): the Qwen3-30B-A3B shapes. The interpreter truncates fp32 -> bf16 (the GPU rounds
to nearest even, as torch does; `fp_downcast_rounding` does not change it there), so under it bf16 is held to
two units in the last place instead of bit identity.
"""

from __future__ import annotations

import pytest
import torch

from lorax.kernels._common import interpreting
from lorax.kernels.moe_router import router_topk, router_topk_ref
from lorax.kernels.norm_rope import (
    add_rms_norm,
    add_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
    rope_store,
    rope_store_ref,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}  # (fp32: a tolerance)


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Within two units in the last place of the dtype (an rsqrt a bit apart moves the normalised value one
    unit, and the weight's product can make it two), and (16 bits) bit-identical almost everywhere."""
    truncating = interpreting() and dtype == torch.bfloat16
    tol = 2 * ULP[dtype] * (2 if truncating else 1)
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)
    if got.numel() and dtype != torch.float32 and not truncating:
        assert (got == ref).float().mean().item() > 0.98


def _rows(T: int, H: int, dtype: torch.dtype, device: str, pad: int = 0) -> torch.Tensor:
    """[T, H] with row stride H + pad (a view of a wider buffer, as the slices of a fused projection)."""
    return (torch.randn(T, H + pad, device=device) * 3).to(dtype)[:, :H]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,pad", [(1, 40, 0), (7, 96, 5), (0, 16, 0), (3, 1, 2)])
def test_rms_norm_matches_ref(T, H, pad, dtype, device):
    x = _rows(T, H, dtype, device, pad)
    w = (1 + 0.5 * torch.randn(H, device=device)).to(dtype)
    y = rms_norm(x, w, 1e-6)
    assert y.shape == (T, H) and y.dtype == dtype
    _close(y, rms_norm_ref(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,pad", [(1, 40, 0), (9, 96, 3), (0, 16, 0)])
def test_add_rms_norm_matches_ref(T, H, pad, dtype, device):
    x, res = _rows(T, H, dtype, device, pad), _rows(T, H, dtype, device)
    w = (1 + 0.5 * torch.randn(H, device=device)).to(dtype)
    y, h = add_rms_norm(x, res, w, 1e-5)
    y_ref, h_ref = add_rms_norm_ref(x, res, w, 1e-5)
    if interpreting() and dtype == torch.bfloat16:
        _close(h, h_ref, dtype)
    else:
        assert torch.equal(h, h_ref)  # one rounding of an exact fp32 sum: no room for any difference
    _close(y, y_ref, dtype)


def test_rms_norm_rejects_bad_shapes(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7, device=device), 1e-6)
    with pytest.raises(ValueError, match="unit column stride"):
        rms_norm(x.t(), torch.ones(4, device=device), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, torch.randn(3, 8, device=device), torch.ones(8, device=device), 1e-6)


def _rope_case(T, n_h, n_kv, D, dtype, device, pad=3, bs=4, blocks=6):
    """q, k, v as views of one fused projection output (row stride past its width), positions, cos / sin
    caches as RotaryEmbedding builds them, random caches, and slots with some rows at -1."""
    from lorax.inference.layers.norm_rope import RotaryEmbedding

    width = (n_h + 2 * n_kv) * D
    qkv = (torch.randn(T, width + pad, device=device) * 2).to(dtype)
    q = qkv[:, : n_h * D].view(T, n_h, D)
    k = qkv[:, n_h * D : (n_h + n_kv) * D].view(T, n_kv, D)
    v = qkv[:, (n_h + n_kv) * D : width].view(T, n_kv, D)
    rope = RotaryEmbedding(D, 64, 10000.0, None, dtype, device)
    positions = torch.randint(0, 64, (T,), device=device)
    kc = torch.randn(blocks, bs, n_kv, D, device=device).to(dtype)
    vc = torch.randn(blocks, bs, n_kv, D, device=device).to(dtype)
    slots = torch.randperm(blocks * bs, device=device)[:T].to(torch.int64)
    slots[::3] = -1  # padded rows (CUDA-graph buckets): not stored
    return q, k, v, positions, rope.cos, rope.sin, kc, vc, slots


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("T,n_h,n_kv,D", [(5, 4, 2, 16), (7, 5, 1, 24), (1, 2, 2, 8), (0, 4, 2, 16)])
def test_rope_store_matches_ref(T, n_h, n_kv, D, norm, dtype, device):
    q, k, v, pos, cos, sin, kc, vc, slots = _rope_case(T, n_h, n_kv, D, dtype, device)
    qw = (1 + 0.5 * torch.randn(D, device=device)).to(dtype) if norm else None
    kw = (1 + 0.5 * torch.randn(D, device=device)).to(dtype) if norm else None
    kc_ref, vc_ref = kc.clone(), vc.clone()
    expect = rope_store_ref(q, k, v, pos, cos, sin, kc_ref, vc_ref, slots, qw, kw, 1e-6)
    got = rope_store(q, k, v, pos, cos, sin, kc, vc, slots, qw, kw, 1e-6)
    assert got.shape == (T, n_h, D) and got.is_contiguous()
    _close(got, expect, dtype)
    stored = torch.zeros(kc.shape[0] * kc.shape[1], dtype=torch.bool, device=device)
    stored[slots[slots >= 0]] = True
    stored = stored.view(kc.shape[:2])
    assert torch.equal(vc, vc_ref)  # v is copied, never rounded
    assert torch.equal(kc[~stored], kc_ref[~stored])  # rows at -1 and other slots untouched
    _close(kc[stored], kc_ref[stored], dtype)


@pytest.mark.parametrize("norm", [False, True])
def test_rope_store_k_out_is_the_stored_k(norm, device):
    # k_out (here a strided view) receives exactly what the cache receives for each stored row; rows at -1 keep
    # whatever they held; q and the caches are as without k_out.
    T, n_h, n_kv, D = 9, 4, 2, 16
    q, k, v, pos, cos, sin, kc, vc, slots = _rope_case(T, n_h, n_kv, D, torch.float32, device)
    w = (1 + 0.5 * torch.randn(2, D, device=device)) if norm else (None, None)
    kc2, vc2 = kc.clone(), vc.clone()
    plain = rope_store(q, k, v, pos, cos, sin, kc2, vc2, slots, w[0], w[1], 1e-6)
    holder = torch.full((T, n_kv + 1, D), 5.0, device=device)
    k_out = holder[:, 1:]
    got = rope_store(q, k, v, pos, cos, sin, kc, vc, slots, w[0], w[1], 1e-6, k_out=k_out)
    assert torch.equal(got, plain) and torch.equal(kc, kc2) and torch.equal(vc, vc2)
    keep = slots >= 0
    assert 0 < int(keep.sum()) < T
    assert torch.equal(k_out[keep], kc.view(-1, n_kv, D)[slots[keep]])
    assert bool((k_out[~keep] == 5.0).all()) and bool((holder[:, 0] == 5.0).all())
    ref_out = torch.full_like(k_out, 5.0)
    rope_store_ref(q, k, v, pos, cos, sin, kc.clone(), vc.clone(), slots, w[0], w[1], 1e-6, k_out=ref_out)
    _close(ref_out, k_out, torch.float32)


def test_rope_store_rejects_bad_inputs(device):
    q, k, v, pos, cos, sin, kc, vc, slots = _rope_case(3, 4, 2, 16, torch.float32, device)
    with pytest.raises(ValueError, match="both"):
        rope_store(q, k, v, pos, cos, sin, kc, vc, slots, torch.ones(16, device=device), None)
    with pytest.raises(ValueError, match="slot_mapping"):
        rope_store(q, k, v, pos, cos, sin, kc, vc, slots.to(torch.int32))
    with pytest.raises(ValueError, match="caches"):
        rope_store(q, k, v, pos, cos, sin, kc[..., :8], vc[..., :8], slots)
    with pytest.raises(ValueError, match="k_out"):
        rope_store(q, k, v, pos, cos, sin, kc, vc, slots, k_out=k.transpose(1, 2).contiguous().transpose(1, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 2048])
def test_norm_rope_qwen3_shapes_gpu(T):
    """Qwen3-30B-A3B: H 2048, 32 q / 4 kv heads of 128, bf16, the per-head q/k norm."""
    dt, dev = torch.bfloat16, "cuda"
    x, res = _rows(T, 2048, dt, dev, 8), _rows(T, 2048, dt, dev)
    w = (1 + 0.5 * torch.randn(2048, device=dev)).to(dt)
    y, h = add_rms_norm(x, res, w, 1e-6)
    y_ref, h_ref = add_rms_norm_ref(x, res, w, 1e-6)
    assert torch.equal(h, h_ref)
    _close(y, y_ref, dt)
    q, k, v, pos, cos, sin, kc, vc, slots = _rope_case(T, 32, 4, 128, dt, dev, bs=16, blocks=T // 16 + 2)
    qw, kw = (1 + 0.5 * torch.randn(2, 128, device=dev)).to(dt)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    _close(rope_store(q, k, v, pos, cos, sin, kc, vc, slots, qw, kw, 1e-6),
           rope_store_ref(q, k, v, pos, cos, sin, kc_ref, vc_ref, slots, qw, kw, 1e-6), dt)
    _close(kc, kc_ref, dt)
    assert torch.equal(vc, vc_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k", [(1, 128, 8), (9, 60, 4), (4, 8, 8), (3, 5, 1), (0, 16, 2)])
@pytest.mark.parametrize("renorm,round_w", [(True, True), (False, False), (True, False)])
def test_router_topk_matches_ref(T, E, k, renorm, round_w, dtype, device):
    # distinct logits per row (multiples of 1/8, exact in 16 bits), so that the top k has one right answer
    # (ties may come in either order); a strided view, as rows of a wider GEMM output
    steps = torch.stack([torch.randperm(E + 3) for _ in range(T)]) if T else torch.zeros(0, E + 3)
    logits = (steps.float() * 0.125 - E / 16).to(dtype).to(device)[:, :E]
    w, ids = router_topk(logits, k, renorm, round_w)
    w_ref, ids_ref = router_topk_ref(logits, k, renorm, round_w)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and w.shape == ids.shape == (T, k)
    assert torch.equal(ids, ids_ref)  # the same experts in the same (descending) order
    torch.testing.assert_close(w, w_ref, atol=ULP[dtype] if round_w else 1e-6, rtol=1e-5)
    if round_w:  # the weights went through the model dtype
        assert torch.equal(w, w.to(dtype).float())
    if renorm and T:
        torch.testing.assert_close(w.sum(-1), torch.ones(T, device=device), atol=2 * k * ULP[dtype], rtol=0)


def test_router_topk_rejects_bad_k(device):
    with pytest.raises(ValueError, match="top_k"):
        router_topk(torch.randn(2, 4, device=device), 5, True, True)
