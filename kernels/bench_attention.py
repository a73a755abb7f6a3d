"""`lorax bench kernels --kernels attention`: store_kv, paged decode and prefill attention (kernels/attention.py)
against their references and SDPA. Rows, timing and roofline as in kernels/bench.py."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from lorax.kernels.attention import (
    new_kv_from_cache,
    paged_attention,
    paged_attention_ref,
    store_kv,
    store_kv_ref,
)
from lorax.kernels.bench import BenchRow, Workload
from lorax.kernels.bench_support import _rel_err, _rotations, _time, _time_slow, paged_caches, roofline_ms


def bench_attention(wl: Workload, T: int, device: torch.device, bw: float, peak: float) -> list[BenchRow]:
    dt, n_h, n_kv, D = wl.torch_dtype, wl.n_heads, wl.n_kv, wl.head_dim
    el = torch.empty(0, dtype=dt).element_size()
    scale = D**-0.5
    rows = []

    # store_kv: T new tokens into free slots
    k = torch.randn(T, n_kv, D, dtype=dt, device=device)
    v = torch.randn_like(k)
    kc, vc, _ = paged_caches(wl, [T], 1, device)
    slots = torch.randperm(kc.shape[0] * wl.block_size, device=device)[:T]
    ref_c = (kc.clone(), vc.clone())
    store_kv_ref(k, v, *ref_c, slots)
    store_kv(k, v, kc, vc, slots)
    err = max(_rel_err(kc, ref_c[0]), _rel_err(vc, ref_c[1]))
    sb = 4 * T * n_kv * D * el
    rows.append(BenchRow("store_kv", T, _time([lambda: store_kv(k, v, kc, vc, slots)], device, graph=True),
                         ref_ms=_time_slow(lambda: store_kv_ref(k, v, kc, vc, slots), device), ref_name="store_kv_ref",
                         rel_err=err, bytes=sb))

    # decode: T sequences, one query each, decode_context keys each
    C = wl.decode_context
    kv_bytes = 2 * T * C * n_kv * D * el
    n_rot = _rotations(kv_bytes, device)
    kc, vc, tables = paged_caches(wl, [C] * T, n_rot, device)
    ctx = torch.full((T,), C, dtype=torch.int32, device=device)
    qsl = torch.arange(T + 1, dtype=torch.int32, device=device)
    q = torch.randn(T, n_h, D, dtype=dt, device=device)
    out = torch.empty_like(q)
    got = paged_attention(q, kc, vc, tables[0], ctx, qsl, scale, max_query_len=1)
    ref = paged_attention_ref(q, kc, vc, tables[0], ctx, qsl, scale)
    row = BenchRow("attn_decode", T,
                   _time([partial(paged_attention, q, kc, vc, t, ctx, qsl, scale, max_query_len=1, out=out)
                          for t in tables], device, graph=True),
                   ref_ms=_time_slow(lambda: paged_attention_ref(q, kc, vc, tables[0], ctx, qsl, scale), device),
                   ref_name="paged_attention_ref", rel_err=_rel_err(got, ref),
                   bytes=kv_bytes + 2 * T * n_h * D * el, flops=4 * T * C * n_h * D, note=f"context {C}")
    if device.type == "cuda":
        try:
            kd = torch.randn(T, n_kv, C, D, dtype=dt, device=device)
            vd = torch.randn_like(kd)
            q4 = q.view(T, n_h, 1, D)
            row.fast_ms = _time([lambda: F.scaled_dot_product_attention(q4, kd, vd, enable_gqa=True)], device,
                                graph=True)
            row.fast_name = "SDPA on a dense (unpaged) cache"
            del kd, vd
        except Exception as err:
            row.fast_name = f"SDPA failed: {type(err).__name__}"
    rows.append(row)
    del kc, vc

    # prefill: one sequence of T new tokens, causal, as the engine runs it (its keys from k_new / v_new); and the
    # same through the block table alone (what a chunk's cached prefix takes)
    kc, vc, tables = paged_caches(wl, [T], 1, device)
    ctx = torch.tensor([T], dtype=torch.int32, device=device)
    qsl = torch.tensor([0, T], dtype=torch.int32, device=device)
    k_new, v_new = new_kv_from_cache(kc, vc, tables[0], ctx, qsl)
    ref = paged_attention_ref(q, kc, vc, tables[0], ctx, qsl, scale)
    ref_ms = _time_slow(lambda: paged_attention_ref(q, kc, vc, tables[0], ctx, qsl, scale), device)
    pre_bytes, pre_flops = 2 * T * n_kv * D * el + 2 * T * n_h * D * el, 2 * T * (T + 1) * n_h * D
    for name, kv, note in (("attn_prefill", dict(k_new=k_new, v_new=v_new), "one sequence, no prefix"),
                           ("attn_prefill_paged", {}, "the same, every key through the block table")):
        got = paged_attention(q, kc, vc, tables[0], ctx, qsl, scale, max_query_len=T, **kv)
        row = BenchRow(name, T,
                       _time([lambda kv=kv: paged_attention(q, kc, vc, tables[0], ctx, qsl, scale, max_query_len=T,
                                                            out=out, **kv)], device, graph=True),
                       ref_ms=ref_ms, ref_name="paged_attention_ref", rel_err=_rel_err(got, ref),
                       bytes=pre_bytes, flops=pre_flops, note=note)
        rows.append(row)
    row = rows[-2]
    if device.type == "cuda":
        try:
            qs = q.transpose(0, 1).unsqueeze(0)
            kd = torch.randn(1, n_kv, T, D, dtype=dt, device=device)
            vd = torch.randn_like(kd)
            row.fast_ms = _time([lambda: F.scaled_dot_product_attention(qs, kd, vd, is_causal=True, enable_gqa=True)],
                                device, graph=True)
            row.fast_name = "SDPA causal, dense"
        except Exception as err:
            row.fast_name = f"SDPA failed: {type(err).__name__}"
    for r in rows:
        r.roofline_ms = roofline_ms(r.bytes, r.flops, bw, peak)
    return rows
