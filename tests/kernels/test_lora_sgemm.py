"""lora_linear (Triton, adapter-sorted) == lora_linear_ref, and build_lora_batch's grouping contract.

On the CPU these run under TRITON_INTERPRET=1 (set by tests/conftest.py before this module imports
triton kernels), with tiny shapes; the `gpu` cases use layer-sized shapes in bf16/fp16.
"""

from __future__ import annotations

import pytest
import torch

from lorax.kernels import lora_sgemm, lora_stacked
from lorax.kernels.lora_sgemm import build_lora_batch, lora_linear, lora_linear_ref, lora_scratch_numel
from lorax.kernels.lora_stacked import linear_stacked, stacked_rows

# dtype -> (atol, rtol) for y after the add; the kernel rounds once, the reference once per slice.
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (6e-2, 4e-2)}


def _slots(kind: str, T: int, S: int) -> torch.Tensor:
    if kind == "mixed":
        return torch.randint(-1, S, (T,), dtype=torch.int32)
    if kind == "one":  # every token on the last slot
        return torch.full((T,), S - 1, dtype=torch.int32)
    if kind == "none":
        return torch.full((T,), -1, dtype=torch.int32)
    if kind == "out_of_range":  # ids >= S behave as -1
        s = torch.randint(-1, S + 3, (T,), dtype=torch.int32)
        return s
    raise ValueError(kind)


def _problem(T, K, slices, S, R, dtype, device, kind):
    offs = [0]
    for w in slices:
        offs.append(offs[-1] + w)
    x = torch.randn(T, K, dtype=dtype, device=device)
    y = torch.randn(T, offs[-1], dtype=dtype, device=device)
    A = (torch.randn(S, len(slices) * R, K, dtype=dtype, device=device) / K**0.5).contiguous()
    B = torch.randn(S, offs[-1], R, dtype=dtype, device=device) / R**0.5
    slot = _slots(kind, T, S).to(device)
    return x, y, A, B, tuple(offs), slot


def _ref_slots(slot: torch.Tensor, S: int) -> torch.Tensor:
    return torch.where(slot < S, slot, torch.full_like(slot, -1))


# (T, K, slice widths, S, R, slot kind, mode)
CPU_CASES = [
    (1, 32, (24,), 2, 16, "mixed", "auto"),  # decode, one token
    (7, 40, (24, 8, 8), 3, 16, "mixed", "fused"),  # qkv with GQA widths, odd T and K
    (7, 40, (24, 8, 8), 3, 16, "mixed", "split"),
    (19, 33, (20, 12), 4, 8, "one", "fused"),  # all tokens on one adapter, rank below the tile
    (19, 33, (20, 12), 4, 8, "one", "split"),
    (5, 16, (16,), 2, 1, "mixed", "auto"),  # rank 1
    (9, 24, (40,), 3, 32, "out_of_range", "split"),  # max rank, ids >= S are no-adapter
    (6, 24, (16, 16), 2, 16, "none", "fused"),  # no adapter at all: y untouched
    (0, 24, (16,), 2, 16, "mixed", "auto"),  # empty input
]


@pytest.mark.parametrize("T,K,slices,S,R,kind,mode", CPU_CASES)
def test_lora_linear_matches_ref(T, K, slices, S, R, kind, mode, device):
    dtype = torch.float32
    x, y, A, B, offs, slot = _problem(T, K, slices, S, R, dtype, device, kind)
    expect = lora_linear_ref(x, y.clone(), A, B, offs, _ref_slots(slot, S))
    y0 = y.clone()
    got = lora_linear(x, y, A, B, offs, slot, mode=mode)
    assert got.data_ptr() == y.data_ptr()  # in place
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, expect, atol=atol, rtol=rtol)
    untouched = (slot < 0) | (slot >= S)
    assert torch.equal(got[untouched], y0[untouched])  # -1 rows bit-identical


@pytest.mark.parametrize("split_k", [2, 3])
def test_split_k_shrink(split_k, device):
    # K cut into ranges (the last one short) whose partial sums the expand adds up.
    x, y, A, B, offs, slot = _problem(12, 70, (24, 8, 8), 3, 16, torch.float32, device, "mixed")
    expect = lora_linear_ref(x, y.clone(), A, B, offs, slot)
    cfg = {"SPLIT_K": split_k, "BLOCK_K": 16, "BLOCK_M": 16}
    numel = lora_scratch_numel(x, A, B, offs, mode="split", config=cfg)
    assert numel == split_k * 12 * 48  # SPLIT_K slabs of [T, 3 slices * R]
    scratch = torch.full((numel,), float("nan"), device=device)  # every slab read is written first
    lora_linear(x, y, A, B, offs, slot, mode="split", scratch=scratch, config=cfg)
    torch.testing.assert_close(y, expect, atol=1e-4, rtol=1e-4)


def test_fp16_and_strided_views(device):
    # y is a column slice of a wider output and x a strided view, as a fused qkv layer would pass.
    T, K, S, R = 11, 48, 3, 16
    x_full = torch.randn(T, 2 * K, dtype=torch.float16, device=device)
    x = x_full[:, ::2]
    out = torch.randn(T, 80, dtype=torch.float16, device=device)
    y = out[:, 8:72]
    A = torch.randn(S, 2 * R, K, dtype=torch.float16, device=device) / K**0.5
    B = torch.randn(S, 64, R, dtype=torch.float16, device=device) / R**0.5
    slot = torch.randint(-1, S, (T,), dtype=torch.int32, device=device)
    expect = lora_linear_ref(x, y.clone(), A, B, (0, 48, 64), slot)
    lora_linear(x, y, A, B, (0, 48, 64), slot)
    atol, rtol = TOL[torch.float16]
    torch.testing.assert_close(y, expect, atol=atol, rtol=rtol)


@pytest.mark.parametrize("mode", ["fused", "split"])
def test_slot_rank_clips(mode, device):
    # Mixed ranks: slot s uses ranks [0, rank[s]); values past it are garbage and must be ignored.
    T, K, S, R = 10, 32, 3, 16
    ranks = torch.tensor([4, 16, 1], dtype=torch.int32)
    x, y, A, B, offs, slot = _problem(T, K, (24, 8), S, R, torch.float32, device, "mixed")
    A_clean, B_clean = A.clone(), B.clone()
    for s, r in enumerate(ranks.tolist()):
        for i in range(2):
            A_clean[s, i * R + r : (i + 1) * R] = 0
        B_clean[s, :, r:] = 0
    expect = lora_linear_ref(x, y.clone(), A_clean, B_clean, offs, slot)
    ref_clipped = lora_linear_ref(x, y.clone(), A, B, offs, slot, slot_rank=ranks)
    torch.testing.assert_close(ref_clipped, expect, atol=1e-4, rtol=1e-4)  # the reference honours it too
    lora_linear(x, y, A, B, offs, slot, slot_rank=ranks.to(device), mode=mode)
    torch.testing.assert_close(y, expect, atol=1e-4, rtol=1e-4)


# (T, K, slice widths, S, R, slot kind): the expand reading a z the caller computed
Z_CASES = [
    (1, 32, (24,), 2, 16, "mixed"),
    (7, 40, (24, 8, 8), 3, 16, "mixed"),
    (19, 33, (20, 12), 4, 8, "one"),
    (5, 16, (16,), 2, 1, "mixed"),  # rank 1
    (9, 24, (40,), 3, 32, "out_of_range"),  # max rank, ids >= S are no-adapter
    (6, 24, (16, 16), 2, 16, "none"),
    (0, 24, (16,), 2, 16, "mixed"),
]


@pytest.mark.parametrize("T,K,slices,S,R,kind", Z_CASES)
def test_given_z_matches_ref(T, K, slices, S, R, kind, device):
    x, y, A, B, offs, slot = _problem(T, K, slices, S, R, torch.float32, device, kind)
    ranks = torch.randint(1, R + 1, (S,), dtype=torch.int32)
    expect = lora_linear_ref(x, y.clone(), A, B, offs, _ref_slots(slot, S), slot_rank=ranks)
    # z as the stacked GEMM leaves it: a column block of a wider row (row stride > its width)
    wide = torch.randn(T, 5 + S * A.shape[1], device=device)
    z = wide[:, 5:]
    z.copy_(x @ A.reshape(-1, K).T)
    via_ref = lora_linear_ref(x, y.clone(), A, B, offs, _ref_slots(slot, S), slot_rank=ranks, z=z)
    torch.testing.assert_close(via_ref, expect, atol=1e-4, rtol=1e-4)
    y0 = y.clone()
    lora_linear(x, y, A, B, offs, slot, slot_rank=ranks.to(device), z=z)
    torch.testing.assert_close(y, expect, atol=1e-4, rtol=1e-4)
    untouched = (slot < 0) | (slot >= S)
    assert torch.equal(y[untouched], y0[untouched])


def test_given_z_is_what_gets_expanded(device):
    # the expand must read z, not recompute the shrink: a z of ones gives B's row sums
    T, K, S, R = 4, 16, 2, 16
    x, y, A, B, offs, slot = _problem(T, K, (24, 8), S, R, torch.float32, device, "one")
    z = torch.ones(T, S * 2 * R, device=device)
    y0 = y.clone()
    lora_linear(x, y, A, B, offs, slot, z=z)
    torch.testing.assert_close(y - y0, B[S - 1].sum(-1).expand(T, -1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_stacked_matches_separate(bias, device):
    T, K, S, R = 13, 40, 3, 8
    slices = (24, 8, 8)
    x, _, A, B, offs, slot = _problem(T, K, slices, S, R, torch.float32, device, "mixed")
    W = torch.randn(offs[-1], K, device=device) / K**0.5
    b = torch.randn(offs[-1], device=device) if bias else None
    w_cat = torch.cat([W, A.reshape(-1, K)])
    b_cat = torch.cat([b, torch.zeros(S * 3 * R, device=device)]) if b is not None else None
    expect = lora_linear_ref(x, torch.nn.functional.linear(x, W, b), A, B, offs, slot)
    for op in (lora_linear_ref, lora_linear):
        y = linear_stacked(op, x, w_cat, B, offs, slot, bias_cat=b_cat)
        assert y.shape == (T, offs[-1]) and y.stride(0) == w_cat.shape[0]  # a view of the stacked output
        torch.testing.assert_close(y, expect, atol=1e-4, rtol=1e-4)


def test_stacked_rows_policy(monkeypatch):
    assert stacked_rows(5120, 4, 3, 16) == 192  # Qwen3-30B-A3B qkv, 4 adapters of rank 16: 3.75% more rows
    assert stacked_rows(5120, 40, 3, 16) == 0  # 40 slots: 37.5%, A stays apart
    monkeypatch.setattr(lora_stacked, "STACKED_MODE", "1")
    assert stacked_rows(5120, 40, 3, 16) == 1920
    monkeypatch.setattr(lora_stacked, "STACKED_MODE", "0")
    assert stacked_rows(5120, 4, 3, 16) == 0


def test_given_z_rejected_when_misshapen_or_with_base(device):
    x, y, A, B, offs, slot = _problem(4, 16, (16,), 2, 8, torch.float32, device, "mixed")
    with pytest.raises(ValueError, match="z must be"):
        lora_linear(x, y, A, B, offs, slot, z=torch.zeros(4, 15, device=device))
    with pytest.raises(ValueError, match="either base= or z="):
        lora_linear(x, y, A, B, offs, slot, z=torch.zeros(4, 16, device=device), base=lambda: None)
    with pytest.raises(ValueError, match="z must be"):
        lora_linear_ref(x, y, A, B, offs, slot, z=torch.zeros(4, 16, device=device).T)


def test_build_lora_batch_contract():
    slot = torch.tensor([2, -1, 0, 2, 0, 5], dtype=torch.int32)
    b = build_lora_batch(slot, 3)
    assert b.sorted_tokens.tolist()[:4] == [2, 4, 0, 3]  # stable within a slot
    assert sorted(b.sorted_tokens.tolist()[4:]) == [1, 5]  # -1 and out-of-range last
    assert b.seg_start.tolist() == [0, 2, 2]
    assert b.seg_len.tolist() == [2, 0, 2]
    assert b.sorted_tokens.dtype == b.seg_start.dtype == b.seg_len.dtype == torch.int32
    assert b.num_tokens == 6


def test_batch_reused_across_layers(device):
    # One LoraBatch per step serves layers of different widths.
    T, S, R = 9, 3, 16
    slot = torch.randint(-1, S, (T,), dtype=torch.int32, device=device)
    batch = build_lora_batch(slot, S)
    for K, slices in [(32, (24, 8, 8)), (24, (32,))]:
        x, y, A, B, offs, _ = _problem(T, K, slices, S, R, torch.float32, device, "mixed")
        expect = lora_linear_ref(x, y.clone(), A, B, offs, slot)
        lora_linear(x, y, A, B, offs, slot, batch=batch)
        torch.testing.assert_close(y, expect, atol=1e-4, rtol=1e-4)


def test_rejects_bad_shapes(device):
    x, y, A, B, offs, slot = _problem(4, 16, (16,), 2, 16, torch.float32, device, "mixed")
    with pytest.raises(ValueError, match="slice"):
        lora_linear(x, y, A, B, (0, 8), slot)
    with pytest.raises(ValueError, match="int32"):
        lora_linear(x, y, A, B, offs, slot.long())
    with pytest.raises(ValueError, match="dtypes"):
        lora_linear(x.half(), y, A, B, offs, slot)


# GPU: Qwen3-30B-A3B qkv (hidden 2048 -> q 4096, k 512, v 512) and o_proj, 4 adapters rank 16.
GPU_CASES = [(T, dt, mode) for T in (1, 8, 33, 128, 512, 2048) for dt in (torch.bfloat16, torch.float16)
             for mode in ("fused", "split")]


@pytest.mark.gpu
@pytest.mark.parametrize("T,dtype,mode", GPU_CASES)
def test_lora_linear_gpu(T, dtype, mode):
    for K, slices in [(2048, (4096, 512, 512)), (4096, (2048,))]:
        x, y, A, B, offs, slot = _problem(T, K, slices, 4, 16, dtype, "cuda", "mixed")
        expect = lora_linear_ref(x, y.clone(), A, B, offs, slot)
        lora_linear(x, y, A, B, offs, slot, mode=mode)
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(y, expect, atol=atol, rtol=rtol)


@pytest.mark.gpu
def test_lora_linear_cuda_graph_replay():
    # Captured once; each replay sees a new adapter mix and new activations written in place.
    T, K, S, R, offs = 24, 256, 4, 16, (0, 128, 160, 192)
    x = torch.randn(T, K, dtype=torch.bfloat16, device="cuda")
    A = torch.randn(S, 3 * R, K, dtype=torch.bfloat16, device="cuda") / K**0.5
    B = torch.randn(S, 192, R, dtype=torch.bfloat16, device="cuda") / R**0.5
    slot = torch.randint(-1, S, (T,), dtype=torch.int32, device="cuda")
    y_base = torch.randn(T, 192, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(y_base)

    def step() -> None:
        y.copy_(y_base)
        lora_linear(x, y, A, B, offs, slot, batch=build_lora_batch(slot, S))

    step()  # warm-up outside the capture: compiles, caches the tile table
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for mix in ("mixed", "one", "none", "mixed"):
        slot.copy_(_slots(mix, T, S).cuda())
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        expect = lora_linear_ref(x, y_base.clone(), A, B, offs, slot)
        torch.testing.assert_close(y, expect, atol=TOL[torch.bfloat16][0], rtol=TOL[torch.bfloat16][1])


@pytest.mark.parametrize("fork", ["0", "1"])
@pytest.mark.parametrize("mode,T", [("split", 7), ("fused", 7), ("split", 0), ("split", 1)])
def test_base_callable_runs_first(mode, T, fork, device, monkeypatch):
    # fork=1 takes the side-stream path's kernels (delta into an fp32 buffer, then the masked add),
    # in order on the CPU
    # `base=` writes the base output into y (here a matmul), then the delta is added on top of it
    monkeypatch.setattr(lora_sgemm, "FORK_MODE", fork)
    x, _, A, B, offs, slot = _problem(T, 40, (24, 8, 8), 3, 16, torch.float32, device, "out_of_range")
    W = torch.randn(offs[-1], 40, dtype=torch.float32, device=device)
    y = torch.full((T, offs[-1]), float("nan"), device=device)
    lora_linear(x, y, A, B, offs, slot, mode=mode, base=lambda: torch.mm(x, W.t(), out=y))
    expect = lora_linear_ref(x, x @ W.t(), A, B, offs, _ref_slots(slot, 3))
    torch.testing.assert_close(y, expect, atol=1e-4, rtol=1e-4)
    ref_y = torch.full_like(y, float("nan"))
    lora_linear_ref(x, ref_y, A, B, offs, _ref_slots(slot, 3), base=lambda: torch.mm(x, W.t(), out=ref_y))
    torch.testing.assert_close(ref_y, expect, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("fork", ["0", "1"])
def test_base_beside_shrink_in_a_graph_without_sync(fork, monkeypatch):
    monkeypatch.setattr(lora_sgemm, "FORK_MODE", fork)
    # On a GPU `base=` forks the shrink onto a side stream; captured, replayed with new adapter mixes,
    # never syncing with the host, and equal to base-then-reference every time.
    T, K, S, R, offs = 40, 2048, 4, 16, (0, 4096, 4608, 5120)
    dt = torch.bfloat16
    x = torch.randn(T, K, dtype=dt, device="cuda")
    W = torch.randn(5120, K, dtype=dt, device="cuda") / K**0.5
    A = torch.randn(S, 3 * R, K, dtype=dt, device="cuda") / K**0.5
    B = torch.randn(S, 5120, R, dtype=dt, device="cuda") / R**0.5
    slot = torch.zeros(T, dtype=torch.int32, device="cuda")
    y = torch.empty(T, 5120, dtype=dt, device="cuda")

    def step() -> None:
        lora_linear(x, y, A, B, offs, slot, batch=build_lora_batch(slot, S), mode="split",
                    base=lambda: torch.mm(x, W.t(), out=y))

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    mixes = [_slots(mix, T, S).cuda() for mix in ("mixed", "one", "none", "mixed")]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for mix in mixes:
            slot.copy_(mix)
            x.copy_(torch.randn_like(x))
            graph.replay()
            step()  # eager too
            got = y.clone()
            graph.replay()
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
            expect = lora_linear_ref(x, x @ W.t(), A, B, offs, slot)
            torch.testing.assert_close(y, expect, atol=TOL[dt][0], rtol=TOL[dt][1])
            torch.testing.assert_close(got, expect, atol=TOL[dt][0], rtol=TOL[dt][1])
            torch.cuda.set_sync_debug_mode("error")
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("min_tokens", [None, 0])  # the default switch-over, and the stacked GEMM at every T
@pytest.mark.parametrize("T", [1, 40, 128, 2048])
def test_linear_stacked_in_a_graph_without_sync(T, min_tokens):
    # qkv at layer shape with A stacked under W: one cuBLAS GEMM + the expand, captured, replayed with new
    # adapter mixes and mixed ranks, never syncing, equal to the separate GEMM + reference every time.
    K, S, R, offs = 2048, 4, 16, (0, 4096, 4608, 5120)
    dt = torch.bfloat16
    x = torch.randn(T, K, dtype=dt, device="cuda")
    w_cat = torch.randn(5120 + S * 3 * R, K, dtype=dt, device="cuda") / K**0.5
    B = torch.randn(S, 5120, R, dtype=dt, device="cuda") / R**0.5
    ranks = torch.tensor([16, 1, 7, 16], dtype=torch.int32, device="cuda")
    slot = torch.zeros(T, dtype=torch.int32, device="cuda")
    out = torch.empty(T, 5120, dtype=dt, device="cuda")

    def step() -> None:
        out.copy_(linear_stacked(lora_linear, x, w_cat, B, offs, slot, batch=build_lora_batch(slot, S),
                                 slot_rank=ranks, min_tokens=min_tokens))

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    A = w_cat[5120:].view(S, 3 * R, K)
    for mix in ("mixed", "one", "none", "mixed"):
        slot.copy_(_slots(mix, T, S).cuda())
        x.copy_(torch.randn_like(x))
        torch.cuda.set_sync_debug_mode("error")
        try:
            graph.replay()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        expect = lora_linear_ref(x, x @ w_cat[:5120].T, A, B, offs, slot, slot_rank=ranks)
        torch.testing.assert_close(out, expect, atol=TOL[dt][0], rtol=TOL[dt][1])
