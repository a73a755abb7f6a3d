"""The registry's two backends are interchangeable: same calls (hints included), same answers."""

from __future__ import annotations

import pytest
import torch

from lorax.kernels import attention, lora_sgemm, moe_router, norm_rope, triton_ops
from lorax.kernels.lora_sgemm import build_lora_batch
from lorax.kernels.registry import get_ops


def test_triton_backend_is_the_triton_kernels():
    ops = get_ops("cpu", "triton")
    assert ops.name == "triton"
    assert ops.lora_linear is lora_sgemm.lora_linear
    assert ops.store_kv is attention.store_kv
    assert ops.paged_attention is attention.paged_attention
    assert (ops.rms_norm, ops.add_rms_norm, ops.rope_store) == (norm_rope.rms_norm, norm_rope.add_rms_norm,
                                                                norm_rope.rope_store)
    assert ops.router_topk is moe_router.router_topk
    from lorax.kernels import fused_moe as fm

    expected = fm.fused_moe if triton_ops.fused_moe_is_triton() else fm.fused_moe_ref
    assert ops.fused_moe is expected


def test_auto_picks_torch_on_cpu():
    assert get_ops("cpu").name == "torch"


def test_lora_linear_same_call_both_backends(device):
    T, K, S, R, offs = 13, 32, 3, 16, (0, 24, 32, 40)
    x = torch.randn(T, K, device=device)
    A = torch.randn(S, 3 * R, K, device=device) / K**0.5
    B = torch.randn(S, 40, R, device=device) / R**0.5
    slot = torch.randint(-1, S, (T,), dtype=torch.int32, device=device)
    rank = torch.tensor([16, 3, 8], dtype=torch.int32, device=device)
    batch = build_lora_batch(slot, S)  # built once per step, shared by both backends' calls
    y0 = torch.randn(T, 40, device=device)
    outs = []
    for backend in ("torch", "triton"):
        y = y0.clone()
        get_ops(device, backend).lora_linear(x, y, A, B, offs, slot, batch=batch, slot_rank=rank)
        outs.append(y)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("decode", [False, True])
def test_attention_same_call_both_backends(decode, device):
    n_h, n_kv, D, bs = 4, 2, 16, 4
    ctx_lens = [9, 14]
    q_lens = [1, 1] if decode else [3, 14]
    T = sum(q_lens)
    kv = torch.randn(sum(ctx_lens), n_kv, D, device=device), torch.randn(sum(ctx_lens), n_kv, D, device=device)
    tables = torch.tensor([[0, 1, 2, 0], [3, 4, 5, 6]], dtype=torch.int32, device=device)
    slots = torch.cat([tables[b, torch.arange(c, device=device) // bs].long() * bs + torch.arange(c, device=device) % bs
                       for b, c in enumerate(ctx_lens)])
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=device)
    qsl = torch.tensor([0, q_lens[0], T], dtype=torch.int32, device=device)
    q = torch.randn(T, n_h, D, device=device)
    results = []
    for backend in ("torch", "triton"):
        ops = get_ops(device, backend)
        kc = torch.zeros(8, bs, n_kv, D, device=device)
        vc = torch.zeros_like(kc)
        ops.store_kv(kv[0], kv[1], kc, vc, slots)
        out = torch.zeros(T + 1, n_h, D, device=device)[:T]  # a caller-owned buffer
        got = ops.paged_attention(q, kc, vc, tables, ctx, qsl, D**-0.5,
                                  max_query_len=max(q_lens), max_context_len=16, out=out)
        assert got.data_ptr() == out.data_ptr()
        results.append((kc, vc, got))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    torch.testing.assert_close(results[1][2], results[0][2], atol=2e-4, rtol=2e-4)


def test_fused_moe_matches_ref(device):
    # Whichever fused_moe the Triton backend carries must equal the reference on a tiny MoE.
    from lorax.kernels.fused_moe import fused_moe_ref

    T, H, inter, E, k = 5, 32, 16, 4, 2
    x = torch.randn(T, H, device=device)
    w13 = torch.randn(E, 2 * inter, H, device=device) / H**0.5
    w2 = torch.randn(E, H, inter, device=device) / inter**0.5
    logits = torch.randn(T, E, device=device)
    weights, ids = torch.topk(logits.softmax(-1), k)
    ids = ids.to(torch.int32)
    expect = fused_moe_ref(x, w13, w2, weights, ids)
    got = get_ops(device, "triton").fused_moe(x, w13, w2, weights, ids)
    tol = 1e-4 if device == "cpu" else 5e-3  # on the GPU an fp32 tl.dot may run in tf32
    torch.testing.assert_close(got, expect, atol=tol, rtol=tol)


@pytest.mark.gpu
def test_no_host_sync_in_the_step_ops():
    # ARCHITECTURE invariant: nothing in the forward syncs with the host (after a warm-up call).
    ops = get_ops("cuda", "triton")
    T, K, S, R, offs = 16, 128, 4, 16, (0, 64, 96, 128)
    x = torch.randn(T, K, dtype=torch.bfloat16, device="cuda")
    y = torch.randn(T, 128, dtype=torch.bfloat16, device="cuda")
    A = torch.randn(S, 3 * R, K, dtype=torch.bfloat16, device="cuda")
    B = torch.randn(S, 128, R, dtype=torch.bfloat16, device="cuda")
    slot = torch.randint(-1, S, (T,), dtype=torch.int32, device="cuda")
    n_h, n_kv, D, bs = 8, 2, 64, 16
    kc = torch.randn(8, bs, n_kv, D, dtype=torch.bfloat16, device="cuda")
    vc = torch.randn_like(kc)
    q = torch.randn(T, n_h, D, dtype=torch.bfloat16, device="cuda")
    kv = torch.randn(T, n_kv, D, dtype=torch.bfloat16, device="cuda")
    slots = torch.arange(T, dtype=torch.int64, device="cuda")
    tables = torch.arange(8, dtype=torch.int32, device="cuda").reshape(1, 8).repeat(T, 1)
    ctx = torch.full((T,), 100, dtype=torch.int32, device="cuda")
    qsl = torch.arange(T + 1, dtype=torch.int32, device="cuda")

    w, logits = torch.ones(K, dtype=torch.bfloat16, device="cuda"), torch.randn(T, 16, device="cuda")
    cos = sin = torch.randn(128, D, dtype=torch.bfloat16, device="cuda")
    hw = torch.ones(D, dtype=torch.bfloat16, device="cuda")
    k_new = torch.empty_like(kv)

    def step() -> None:  # every op a decoder layer calls, as it calls them
        ops.rms_norm(x, w, 1e-6)
        ops.add_rms_norm(x, x, w, 1e-6)
        ops.lora_linear(x, y, A, B, offs, slot, batch=build_lora_batch(slot, S))
        ops.store_kv(kv, kv, kc, vc, slots)
        ops.rope_store(q, kv, kv, slots, cos, sin, kc, vc, slots, hw, hw, 1e-6)
        ops.rope_store(q, kv, kv, slots, cos, sin, kc, vc, slots, hw, hw, 1e-6, k_new)
        ops.paged_attention(q, kc, vc, tables, ctx, qsl, 0.125, max_query_len=1)
        ops.paged_attention(q, kc, vc, tables, ctx, qsl, 0.125)
        ops.paged_attention(q, kc, vc, tables, ctx, qsl, 0.125, k_new=k_new, v_new=kv)  # prefill kernel
        ops.router_topk(logits, 4, True, True)

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
