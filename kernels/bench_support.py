"""The kernel benchmark's cost model, timing helpers, fast torch baselines and paged-cache inputs (kernels/bench.py)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from lorax.kernels.fused_moe import silu_and_mul

if TYPE_CHECKING:
    from lorax.kernels.bench import Workload

# ------------------------------------------------------------------------------------------------
# Roofline arithmetic (host ints only; tested on the CPU)
# ------------------------------------------------------------------------------------------------


def roofline_ms(nbytes: int, flops: int, copy_tb_s: float, peak_tflops: float) -> float:
    return max(nbytes / (copy_tb_s * 1e12), flops / (peak_tflops * 1e12)) * 1e3


def moe_bytes(wl: Workload, experts_hit: int, pairs_hit: int, T: int, lora: bool) -> int:
    """Expert weights touched (gate, up, down of each hit expert) + activations in and out; with LoRA
    also each touched (adapter, expert) pair's A and B: 2 * r * 3 * (H + I) elements."""
    el = torch.empty(0, dtype=wl.torch_dtype).element_size()
    n = experts_hit * 3 * wl.hidden * wl.moe_inter + 2 * T * wl.hidden
    if lora:
        n += pairs_hit * 3 * wl.rank * (wl.hidden + wl.moe_inter)
    return n * el


def expected_experts_hit(E: int, k: int, T: int) -> float:
    return E * (1 - (1 - k / E) ** T)


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def _time(fns: list[Callable[[], object]], device: torch.device, graph: bool) -> float:
    """ms per call: the calls in `fns` run one after another (rotated inputs) and the total is divided."""
    run = lambda: [f() for f in fns]
    if device.type != "cuda":
        run()
        samples = []
        for _ in range(3):
            t0 = time.perf_counter()
            run()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples) / len(fns)
    import triton.testing

    if graph:
        try:
            return triton.testing.do_bench_cudagraph(run, rep=30, return_mode="median") / len(fns)
        except Exception:  # a call that syncs cannot be captured: time it eagerly below
            torch.cuda.synchronize()
    return triton.testing.do_bench(run, warmup=5, rep=50, return_mode="median") / len(fns)


def _time_slow(fn: Callable[[], object], device: torch.device, reps: int = 3) -> float:
    """Host-synchronising references: a few eager calls, median."""
    fn()
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def measure_copy_tb_s(device: torch.device) -> float:
    n = (1 << 30) if device.type == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = _time([lambda: dst.copy_(src)], device, graph=False)
    return 2 * n / (ms * 1e-3) / 1e12


def _rotations(set_bytes: int, device: torch.device) -> int:
    """Input sets per timed graph so that one pass reads more than twice the L2 cache."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(1, min(8, math.ceil(2 * l2 / max(set_bytes, 1))))


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.float().abs().max().item()
    return (got.float() - ref.float()).abs().max().item() / (scale if scale > 0 else 1.0)


# ------------------------------------------------------------------------------------------------
# Baselines a user could run instead of the slow references
# ------------------------------------------------------------------------------------------------


def moe_grouped_mm(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor) -> torch.Tensor:
    """transformers' grouped_mm experts path: sort pairs by expert, two torch._grouped_mm, index_add."""
    T, k = topk_ids.shape
    E = w13.shape[0]
    flat = topk_ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    rows = order // k
    h = torch._grouped_mm(x[rows], w13.transpose(1, 2), offs=offs)
    o = torch._grouped_mm(silu_and_mul(h), w2.transpose(1, 2), offs=offs)
    y = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    y.index_add_(0, rows, o.float() * topk_weights.reshape(-1)[order, None].float())
    return y.to(x.dtype)


def paged_caches(wl: Workload, ctx_lens: list[int], sets: int, device: torch.device):
    """Caches holding `sets` disjoint copies of the batch (rotation) and their block tables."""
    bs = wl.block_size
    nblk = [-(-c // bs) for c in ctx_lens]
    total = sum(nblk) * sets + 1
    shape = (total, bs, wl.n_kv, wl.head_dim)
    kc = torch.randn(shape, dtype=wl.torch_dtype, device=device)
    vc = torch.randn(shape, dtype=wl.torch_dtype, device=device)
    width = max(nblk)
    tables = []
    perm = torch.randperm(total - 1, device=device).to(torch.int32) + 1
    at = 0
    for _ in range(sets):
        t = torch.zeros(len(ctx_lens), width, dtype=torch.int32, device=device)
        for b, n in enumerate(nblk):
            t[b, :n] = perm[at : at + n]
            at += n
        tables.append(t)
    return kc, vc, tables
