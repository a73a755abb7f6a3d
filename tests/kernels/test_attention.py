"""store_kv and paged_attention (Triton) == their references, on paged caches with shuffled blocks.

CPU: TRITON_INTERPRET=1 with tiny heads; GPU (`gpu` marker): Qwen3-30B-A3B heads (32 q / 4 kv x 128).
"""

from __future__ import annotations

import pytest
import torch

from lorax.kernels.attention import (
    new_kv_from_cache,
    paged_attention,
    paged_attention_ref,
    store_kv,
    store_kv_ref,
)

TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (2e-2, 2e-2)}


def _setup(ctx_lens, q_lens, n_h, n_kv, D, bs, dtype, device, spare_blocks=3):
    """Random caches whose blocks are handed out in shuffled order; q rows for each sequence."""
    B = len(ctx_lens)
    nblk = [-(-c // bs) for c in ctx_lens]
    width = max(max(nblk), 1) + 1  # one unused column: tables wider than needed, as an engine has
    total = sum(nblk) + spare_blocks
    perm = torch.randperm(total).tolist()
    tables = torch.zeros(B, width, dtype=torch.int32)
    it = iter(perm)
    for b, n in enumerate(nblk):
        for j in range(n):
            tables[b, j] = next(it)
    k_cache = torch.randn(total, bs, n_kv, D, dtype=dtype, device=device)
    v_cache = torch.randn(total, bs, n_kv, D, dtype=dtype, device=device)
    qsl = torch.zeros(B + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    T = int(qsl[-1])
    q = torch.randn(T, n_h, D, dtype=dtype, device=device)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32)
    return q, k_cache, v_cache, tables.to(device), ctx.to(device), qsl.to(device)


# (context lens, query lens, n_h, n_kv, D, block_size, max_query_len passed?)
PREFILL_CASES = [
    ([5, 13], [5, 13], 4, 2, 16, 4, True),  # full prefill, GQA 2
    ([21, 7, 9], [6, 0, 9], 2, 2, 24, 8, True),  # chunked (prefix cached), q_len 0, MHA, odd head dim
    ([19], [19], 8, 1, 16, 16, False),  # MQA, bound from T
    ([33, 3], [17, 1], 4, 1, 16, 4, False),  # mixed: a chunk and a decode row in one launch
    ([12], [7], 4, 2, 8, 4, True),  # head dim 8 (the demo model): lanes padded to tl.dot's 16
    ([70, 41], [45, 41], 4, 2, 16, 8, True),  # several key steps below each tile's diagonal (unmasked), 3 tiles
]


@pytest.mark.parametrize("ctx_lens,q_lens,n_h,n_kv,D,bs,pass_bound", PREFILL_CASES)
def test_prefill_matches_ref(ctx_lens, q_lens, n_h, n_kv, D, bs, pass_bound, device):
    q, kc, vc, tables, ctx, qsl = _setup(ctx_lens, q_lens, n_h, n_kv, D, bs, torch.float32, device)
    scale = D**-0.5
    expect = paged_attention_ref(q, kc, vc, tables, ctx, qsl, scale)
    got = paged_attention(q, kc, vc, tables, ctx, qsl, scale, max_query_len=max(q_lens) if pass_bound else None)
    torch.testing.assert_close(got, expect, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("ctx_lens,q_lens,n_h,n_kv,D,bs,pass_bound", PREFILL_CASES)
@pytest.mark.parametrize("block_n", [16, 32])
def test_prefill_new_kv_matches_ref(ctx_lens, q_lens, n_h, n_kv, D, bs, pass_bound, block_n, device):
    # This step's keys read beside the queries (k_new / v_new) and the prefix through the table: the same
    # answer. Prefixes of 0, 15, 16, 4, 5 and 29 keys: aligned to BLOCK_N, a partial last step, none.
    q, kc, vc, tables, ctx, qsl = _setup(ctx_lens, q_lens, n_h, n_kv, D, bs, torch.float32, device)
    scale = D**-0.5
    expect = paged_attention_ref(q, kc, vc, tables, ctx, qsl, scale)
    k_new, v_new = new_kv_from_cache(kc, vc, tables, ctx, qsl)
    cfg = {"BLOCK_M": 16, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 1}
    got = paged_attention(q, kc, vc, tables, ctx, qsl, scale, max_query_len=max(q_lens) if pass_bound else None,
                          k_new=k_new, v_new=v_new, config=cfg)
    torch.testing.assert_close(got, expect, atol=2e-4, rtol=2e-4)


def test_prefill_new_kv_reads_new_rows_there(device):
    # The step's own keys come from k_new / v_new and only the prefix from the cache: garbage in the cache's
    # new rows changes nothing, while a changed k_new row or a changed prefix row changes the answer.
    ctx_lens, q_lens, n_h, n_kv, D, bs = [29, 11], [13, 11], 4, 2, 16, 4
    q, kc, vc, tables, ctx, qsl = _setup(ctx_lens, q_lens, n_h, n_kv, D, bs, torch.float32, device)
    k_new, v_new = new_kv_from_cache(kc, vc, tables, ctx, qsl)
    v_strided = torch.randn(k_new.shape[0], n_kv + 3, D, device=device)[:, 1 : n_kv + 1]  # a view, as in the engine
    v_strided.copy_(v_new)
    run = lambda kc_, vc_, kn, vn: paged_attention(q, kc_, vc_, tables, ctx, qsl, 0.25, max_query_len=13,
                                                   k_new=kn, v_new=vn)
    base = run(kc, vc, k_new, v_strided)
    torch.testing.assert_close(base, paged_attention_ref(q, kc, vc, tables, ctx, qsl, 0.25), atol=2e-4, rtol=2e-4)
    junk_k, junk_v = kc.clone(), vc.clone()
    flat_k = junk_k.view(-1, n_kv, D)
    flat_v = junk_v.view(-1, n_kv, D)
    for b, (c, n) in enumerate(zip(ctx_lens, q_lens, strict=True)):
        for p in range(c - n, c):
            row = int(tables[b, p // bs]) * bs + p % bs
            flat_k[row] = 1e3
            flat_v[row] = -7.0
    assert torch.equal(run(junk_k, junk_v, k_new, v_strided), base)
    k_bad = k_new.clone()
    k_bad[20] += 3.0  # sequence 1's new row 7: changes its rows 7.. only
    moved = (run(kc, vc, k_bad, v_strided) - base).abs().amax(dim=(1, 2))
    assert moved[20:].min() > 0 and moved[:20].max() == 0
    kc_bad = kc.clone()
    kc_bad[int(tables[0, 0]), 0] += 3.0  # sequence 0's cached key 0: every row of sequence 0
    moved = (run(kc_bad, vc, k_new, v_strided) - base).abs().amax(dim=(1, 2))
    assert moved[:13].min() > 0 and moved[13:].max() == 0


def test_prefill_new_kv_rejects_bad_shapes(device):
    q, kc, vc, tables, ctx, qsl = _setup([9], [5], 4, 2, 16, 4, torch.float32, device)
    k_new, v_new = new_kv_from_cache(kc, vc, tables, ctx, qsl)
    with pytest.raises(ValueError, match="k_new and v_new must both"):
        paged_attention(q, kc, vc, tables, ctx, qsl, 0.25, k_new=k_new)
    with pytest.raises(ValueError, match="k_new and v_new must both"):
        paged_attention(q, kc, vc, tables, ctx, qsl, 0.25, k_new=k_new[:4], v_new=v_new[:4])
    with pytest.raises(ValueError, match="one stride along D"):
        paged_attention(q, kc, vc, tables, ctx, qsl, 0.25, k_new=k_new, v_new=v_new.transpose(1, 2).contiguous()
                        .transpose(1, 2))


# (context lens, query lens (0 or 1), n_h, n_kv, D, block_size, forced splits)
DECODE_CASES = [
    ([1, 17, 40], [1, 1, 1], 4, 2, 16, 4, None),
    ([1, 17, 40], [1, 1, 1], 4, 2, 16, 4, 3),  # split-K with a reduce
    ([50, 2, 9], [1, 0, 1], 8, 1, 16, 8, 4),  # q_len 0 row skipped; splits past short contexts exit
    ([64], [1], 2, 2, 24, 16, 2),  # odd head dim, MHA
    ([9, 30], [1, 1], 4, 2, 8, 4, 2),  # head dim 8
]


@pytest.mark.parametrize("ctx_lens,q_lens,n_h,n_kv,D,bs,splits", DECODE_CASES)
def test_decode_matches_ref(ctx_lens, q_lens, n_h, n_kv, D, bs, splits, device):
    q, kc, vc, tables, ctx, qsl = _setup(ctx_lens, q_lens, n_h, n_kv, D, bs, torch.float32, device)
    scale = D**-0.5
    expect = paged_attention_ref(q, kc, vc, tables, ctx, qsl, scale)
    got = paged_attention(q, kc, vc, tables, ctx, qsl, scale, max_query_len=1, num_splits=splits)
    torch.testing.assert_close(got, expect, atol=2e-4, rtol=2e-4)
    # decode through the prefill kernel (no host flag) gives the same answer
    general = paged_attention(q, kc, vc, tables, ctx, qsl, scale)
    torch.testing.assert_close(general, expect, atol=2e-4, rtol=2e-4)


def test_out_buffer_rows_outside_sequences_untouched(device):
    # Graph-style call: a static out buffer with padded rows past query_start_loc[-1].
    q, kc, vc, tables, ctx, qsl = _setup([9, 4], [1, 1], 4, 2, 16, 4, torch.float32, device)
    q_pad = torch.cat([q, torch.randn(2, 4, 16, device=device)])
    out = torch.full_like(q_pad, 7.0)
    ws = torch.empty(10_000, dtype=torch.float32, device=device)
    paged_attention(q_pad, kc, vc, tables, ctx, qsl, 0.25, max_query_len=1, num_splits=2, out=out, workspace=ws)
    expect = paged_attention_ref(q, kc, vc, tables, ctx, qsl, 0.25)
    torch.testing.assert_close(out[:2], expect, atol=2e-4, rtol=2e-4)
    assert torch.all(out[2:] == 7.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_store_kv_matches_ref(dtype, device):
    T, n_kv, D, bs, nb = 9, 2, 24, 4, 6
    k = torch.randn(T, n_kv, D, dtype=dtype, device=device)
    v = torch.randn(T, n_kv, D, dtype=dtype, device=device)
    slots = torch.randperm(nb * bs)[:T].to(torch.int64)
    slots[[2, 5]] = -1  # padded rows
    slots = slots.to(device)
    caches = [torch.randn(nb, bs, n_kv, D, dtype=dtype, device=device) for _ in range(2)]
    ref = [c.clone() for c in caches]
    store_kv_ref(k, v, ref[0], ref[1], slots)
    store_kv(k, v, caches[0], caches[1], slots)
    assert torch.equal(caches[0], ref[0]) and torch.equal(caches[1], ref[1])  # a copy: exact


def test_store_then_prefill_then_decode(device):
    # The engine's sequence of calls: store a prompt, attend over it, store one token, decode.
    n_h, n_kv, D, bs = 4, 2, 16, 4
    L = 10
    k_all = torch.randn(L + 1, n_kv, D, device=device)
    v_all = torch.randn(L + 1, n_kv, D, device=device)
    q_all = torch.randn(L + 1, n_h, D, device=device)
    kc = torch.zeros(4, bs, n_kv, D, device=device)
    vc = torch.zeros_like(kc)
    tables = torch.tensor([[3, 0, 2, 1]], dtype=torch.int32, device=device)
    slot_of = lambda p: int(tables[0, p // bs]) * bs + p % bs
    store_kv(k_all[:L], v_all[:L], kc, vc, torch.tensor([slot_of(p) for p in range(L)], device=device))
    qsl = torch.tensor([0, L], dtype=torch.int32, device=device)
    pre = paged_attention(q_all[:L], kc, vc, tables, torch.tensor([L], dtype=torch.int32, device=device), qsl, 0.3)
    store_kv(k_all[L:], v_all[L:], kc, vc, torch.tensor([slot_of(L)], device=device))
    dec = paged_attention(q_all[L:], kc, vc, tables, torch.tensor([L + 1], dtype=torch.int32, device=device),
                          torch.tensor([0, 1], dtype=torch.int32, device=device), 0.3, max_query_len=1)
    # dense causal attention over the unpaged K/V
    kk = k_all.repeat_interleave(n_h // n_kv, 1)
    vv = v_all.repeat_interleave(n_h // n_kv, 1)
    s = torch.einsum("qhd,khd->hqk", q_all, kk) * 0.3
    s = s.masked_fill(torch.ones(L + 1, L + 1, dtype=torch.bool, device=device).triu(1), float("-inf"))
    dense = torch.einsum("hqk,khd->qhd", s.softmax(-1), vv)
    torch.testing.assert_close(torch.cat([pre, dec]), dense, atol=2e-4, rtol=2e-4)


def test_rejects_bad_metadata(device):
    q, kc, vc, tables, ctx, qsl = _setup([5], [5], 4, 2, 16, 4, torch.float32, device)
    with pytest.raises(ValueError, match="int32"):
        paged_attention(q, kc, vc, tables, ctx.long(), qsl, 0.25)
    with pytest.raises(ValueError, match="multiple"):
        paged_attention(q[:, :3], kc, vc, tables, ctx, qsl, 0.25)
    for bad in (0.0, -0.25):
        with pytest.raises(ValueError, match="scale must be positive"):
            paged_attention(q, kc, vc, tables, ctx, qsl, bad)
    with pytest.raises(ValueError, match="int64"):
        store_kv(q[:, :2], q[:, :2], kc, vc, torch.zeros(5, dtype=torch.int32, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("D", [8, 24, 64])
def test_small_and_odd_head_dims_gpu(D):
    # Head dims below tl.dot's 16 and non-powers of two compile and match on the GPU.
    for ctx_lens, q_lens, mql in (([40, 7], [40, 7], None), ([300, 9], [1, 1], 1)):
        q, kc, vc, tables, ctx, qsl = _setup(ctx_lens, q_lens, 4, 2, D, 16, torch.bfloat16, "cuda")
        expect = paged_attention_ref(q, kc, vc, tables, ctx, qsl, D**-0.5)
        got = paged_attention(q, kc, vc, tables, ctx, qsl, D**-0.5, max_query_len=mql, num_splits=2 if mql else None)
        torch.testing.assert_close(got, expect, atol=TOL[torch.bfloat16][0], rtol=TOL[torch.bfloat16][1])


# GPU: Qwen3-30B-A3B attention (32 q heads, 4 kv heads, head dim 128), block size 16.
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["prefill", "chunked", "decode", "decode_long"])
def test_attention_gpu(kind, dtype):
    if kind == "prefill":
        ctx_lens, q_lens, mql = [512, 77, 1030], [512, 77, 1030], None
    elif kind == "chunked":
        ctx_lens, q_lens, mql = [700, 300], [200, 256], 256
    elif kind == "decode":
        ctx_lens, q_lens, mql = [int(c) for c in torch.randint(1, 600, (64,))], [1] * 64, 1
    else:
        ctx_lens, q_lens, mql = [8000, 31], [1, 1], 1
    q, kc, vc, tables, ctx, qsl = _setup(ctx_lens, q_lens, 32, 4, 128, 16, dtype, "cuda")
    expect = paged_attention_ref(q, kc, vc, tables, ctx, qsl, 128**-0.5)
    got = paged_attention(q, kc, vc, tables, ctx, qsl, 128**-0.5, max_query_len=mql)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, expect, atol=atol, rtol=rtol)


@pytest.mark.gpu
def test_decode_cuda_graph_replay():
    # Static buffers sized from host bounds; contexts grow between replays as in a decode loop.
    from lorax.kernels.attention import decode_splits, decode_workspace_size

    B, n_h, n_kv, D, bs, width = 5, 8, 2, 64, 16, 64  # 1024-token bound: split-K, 27 splits on an H100
    q, kc, vc, tables, ctx, qsl = _setup([bs * width] * B, [1] * B, n_h, n_kv, D, bs, torch.bfloat16, "cuda")
    splits = decode_splits(B, n_kv, width * bs, "cuda")
    ws = torch.empty(decode_workspace_size(B, n_h, D, splits), dtype=torch.float32, device="cuda")
    out = torch.zeros_like(q)
    call = lambda: paged_attention(q, kc, vc, tables, ctx, qsl, D**-0.5, max_query_len=1, max_context_len=width * bs,
                                   out=out, workspace=ws)
    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for lens in ([1, 2, 3, 4, 5], [17, 700, 1024, 33, 300], [1024] * 5):
        ctx.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        expect = paged_attention_ref(q, kc, vc, tables, ctx, qsl, D**-0.5)
        torch.testing.assert_close(out, expect, atol=TOL[torch.bfloat16][0], rtol=TOL[torch.bfloat16][1])


@pytest.mark.parametrize("ctx_lens", [[300, 5, 700], [1, 520], [0, 260]])
def test_decode_under_a_graph_sized_bound_splits_each_context_by_its_own_length(ctx_lens, device):
    """A CUDA graph passes the block table at max_model_len width (here 4096 keys) while contexts are
    short: the kernel sizes each sequence's splits from its own context; the merged result must match."""
    q, kc, vc, tables, ctx, qsl = _setup(ctx_lens, [1] * len(ctx_lens), 4, 2, 16, 16, torch.float32, device)
    wide = torch.zeros(tables.shape[0], 4096 // 16, dtype=torch.int32, device=tables.device)
    wide[:, : tables.shape[1]] = tables
    scale = 16**-0.5
    expect = paged_attention_ref(q, kc, vc, wide, ctx, qsl, scale)
    for splits in (None, 8):
        got = paged_attention(q, kc, vc, wide, ctx, qsl, scale, max_query_len=1, num_splits=splits,
                              max_context_len=4096)
        torch.testing.assert_close(got, expect, atol=2e-4, rtol=2e-4)


def test_decode_splits_fill_the_gpu_once_or_twice(monkeypatch):
    """Host-only rule: >= DECODE_MIN_KEYS keys a split, <= 128 splits; two programs per SM when the (sequence,
    KV head) pairs fill under half the SMs, else one (numbers for a 132-SM H100, 4 KV heads)."""
    import lorax.kernels.attention as attn

    monkeypatch.setattr(attn, "_num_sms", lambda device: 132)
    got = {(B, ctx): attn.decode_splits(B, 4, ctx, "cuda") for B in (1, 8, 16, 32, 64, 512) for ctx in (100, 1024, 40960)}
    assert got[1, 1024] == 32 and got[1, 100] == 4  # capped by the keys: 32 a split
    assert got[1, 40960] == 66 and got[8, 40960] == 9 and got[16, 40960] == 5  # 4 / 32 / 64 pairs: two per SM
    assert got[32, 40960] == 2 and got[64, 40960] == 1  # 128 / 256 pairs (>= half the SMs): one per SM
    assert got[512, 40960] == 1 and all(1 <= s <= 128 for s in got.values())
    assert attn.decode_splits(1, 1, 10**6, "cuda") == 128  # the cap
