"""`lorax bench kernels --kernels layer`: the small steps of a decoder layer (kernels/norm_rope.py,
kernels/moe_router.py) against the torch ops the engine ran before them. Rows, timing and roofline as in
kernels/bench.py."""

from __future__ import annotations

import torch

from lorax.kernels.attention import store_kv
from lorax.kernels.bench import BenchRow, Workload
from lorax.kernels.bench_support import _rel_err, _time, _time_slow, paged_caches, roofline_ms
from lorax.kernels.moe_router import router_topk, router_topk_ref
from lorax.kernels.norm_rope import (
    add_rms_norm,
    add_rms_norm_ref,
    rms_norm_ref,
    rope_ref,
    rope_store,
    rope_store_ref,
)


def bench_layer(wl: Workload, T: int, device: torch.device, bw: float, peak: float) -> list[BenchRow]:
    """The small steps of a decoder layer, each one launch (kernels/norm_rope.py, kernels/moe_router.py),
    against the torch ops the engine ran before them (`fast` column: the same ops in a CUDA graph)."""
    dt, n_h, n_kv, D, H, E = wl.torch_dtype, wl.n_heads, wl.n_kv, wl.head_dim, wl.hidden, wl.experts
    el = torch.empty(0, dtype=dt).element_size()
    eps = 1e-6
    rows = []
    torch_name = "the torch ops it replaces, in a CUDA graph"

    # the residual add and the next norm (twice a layer)
    x, res = torch.randn(T, H, dtype=dt, device=device), torch.randn(T, H, dtype=dt, device=device)
    w = 1 + 0.1 * torch.randn(H, dtype=dt, device=device)
    got, ref = add_rms_norm(x, res, w, eps)[0], add_rms_norm_ref(x, res, w, eps)[0]
    row = BenchRow("add_rms_norm", T, _time([lambda: add_rms_norm(x, res, w, eps)], device, graph=True),
                   ref_ms=_time_slow(lambda: add_rms_norm_ref(x, res, w, eps), device), ref_name="add_rms_norm_ref",
                   rel_err=_rel_err(got, ref), bytes=4 * T * H * el)
    row.fast_ms = _time([lambda: add_rms_norm_ref(x, res, w, eps)], device, graph=True)
    row.fast_name = torch_name
    rows.append(row)

    # q/k per-head norm (Qwen3), rope, k / v into the paged cache
    width = (n_h + 2 * n_kv) * D
    qkv = torch.randn(T, width, dtype=dt, device=device)
    q, k, v = (qkv[:, : n_h * D].view(T, n_h, D), qkv[:, n_h * D : (n_h + n_kv) * D].view(T, n_kv, D),
               qkv[:, (n_h + n_kv) * D :].view(T, n_kv, D))
    kc, vc, _ = paged_caches(wl, [T], 1, device)
    slots = torch.randperm(kc.shape[0] * wl.block_size, device=device)[:T]
    positions = torch.randint(0, 4096, (T,), device=device)
    cos, sin = torch.randn(4096, D, dtype=dt, device=device), torch.randn(4096, D, dtype=dt, device=device)
    qw, kw = 1 + 0.1 * torch.randn(2, D, dtype=dt, device=device)
    ref_c = (kc.clone(), vc.clone())
    ref = rope_store_ref(q, k, v, positions, cos, sin, *ref_c, slots, qw, kw, eps)
    got = rope_store(q, k, v, positions, cos, sin, kc, vc, slots, qw, kw, eps)
    err = max(_rel_err(got, ref), _rel_err(kc, ref_c[0]))

    def before() -> None:  # the engine's path before: torch norms and rope, then the Triton store_kv
        qn, kn = rms_norm_ref(q, qw, eps), rms_norm_ref(k, kw, eps)
        c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
        rope_ref(qn, c, s)
        store_kv(rope_ref(kn, c, s), v, kc, vc, slots)

    row = BenchRow("rope_store", T, _time([lambda: rope_store(q, k, v, positions, cos, sin, kc, vc, slots, qw, kw,
                                                              eps)], device, graph=True),
                   ref_ms=_time_slow(before, device), ref_name="torch norm + rope, Triton store_kv",
                   rel_err=err, bytes=T * (width + n_h * D + 2 * n_kv * D) * el, note="with the q/k head norm")
    row.fast_ms = _time([before], device, graph=True)
    row.fast_name = torch_name
    rows.append(row)

    # the router's softmax + top-k (+ renormalisation, weights through the model dtype)
    logits = torch.randn(T, E, dtype=dt, device=device)
    got_w, _ = router_topk(logits, wl.topk, True, True)
    ref_w, _ = router_topk_ref(logits, wl.topk, True, True)
    row = BenchRow("router_topk", T, _time([lambda: router_topk(logits, wl.topk, True, True)], device, graph=True),
                   ref_ms=_time_slow(lambda: router_topk_ref(logits, wl.topk, True, True), device),
                   ref_name="router_topk_ref", rel_err=_rel_err(got_w, ref_w), bytes=T * (E * el + 8 * wl.topk))
    row.fast_ms = _time([lambda: router_topk_ref(logits, wl.topk, True, True)], device, graph=True)
    row.fast_name = torch_name
    rows.append(row)
    for r in rows:
        r.roofline_ms = roofline_ms(r.bytes, r.flops, bw, peak)
    return rows
