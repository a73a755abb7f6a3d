"""Per-launch GPU time of the MoE and dense-LoRA kernels (a developer tool; run on a GPU).

    python scripts/profile_kernels.py [--tokens 1,8,32,128,512,2048] [--out DIR]

For each token count of the standard workload (kernels/bench.py) it captures one CUDA graph per case
(MoE base, MoE + LoRA, qkv base, qkv + LoRA), replays it under torch.profiler and prints each kernel's
mean device time, plus the replay's wall time (CUDA events) — the gap between the two is launch and
dependency latency inside the graph.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from lorax.kernels.bench import STANDARD, Workload, _slots
from lorax.kernels.fused_moe import fused_moe
from lorax.kernels.lora_sgemm import build_lora_batch, lora_linear
from lorax.kernels.lora_stacked import linear_stacked
from lorax.kernels.moe_lora import MoELoraArgs

REPLAYS = 20


def _graph(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def profile_case(fn: Callable[[], object]) -> dict:
    g = _graph(fn)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    wall_us = start.elapsed_time(end) * 1e3 / REPLAYS
    kernels: dict[str, float] = defaultdict(float)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            g.replay()
        torch.cuda.synchronize()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.name[:60]] += ev.device_time / REPLAYS
    return {"wall_us": wall_us, "kernels_us": dict(kernels), "sum_us": sum(kernels.values())}


def moe_cases(wl: Workload, T: int, dev: torch.device) -> dict[str, Callable[[], object]]:
    dt, H, E, k, I, S, R = wl.torch_dtype, wl.hidden, wl.experts, wl.topk, wl.moe_inter, wl.adapters, wl.rank  # noqa: E741
    g = torch.Generator(device=dev).manual_seed(T)
    w13 = torch.randn(E, 2 * I, H, dtype=dt, device=dev, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, dtype=dt, device=dev, generator=g) / I**0.5
    lora = MoELoraArgs(
        token_slot=_slots(wl, T, dev),
        gate_up_A=torch.randn(S, E, 2 * R, H, dtype=dt, device=dev, generator=g) / H**0.5,
        gate_up_B=torch.randn(S, E, 2 * I, R, dtype=dt, device=dev, generator=g) / R**0.5,
        down_A=torch.randn(S, E, R, I, dtype=dt, device=dev, generator=g) / I**0.5,
        down_B=torch.randn(S, E, H, R, dtype=dt, device=dev, generator=g) / R**0.5,
    )
    x = torch.randn(T, H, dtype=dt, device=dev, generator=g)
    weights, ids = torch.topk(torch.randn(T, E, device=dev, generator=g).softmax(-1), k)
    ids = ids.to(torch.int32)
    out = torch.empty(T, H, dtype=dt, device=dev)
    return {
        "moe_base": lambda: fused_moe(x, w13, w2, weights, ids, None, out=out),
        "moe_lora": lambda: fused_moe(x, w13, w2, weights, ids, lora, out=out),
    }


def qkv_cases(wl: Workload, T: int, dev: torch.device) -> dict[str, Callable[[], object]]:
    dt, H, S, R = wl.torch_dtype, wl.hidden, wl.adapters, wl.rank
    q, kv = wl.n_heads * wl.head_dim, wl.n_kv * wl.head_dim
    N = q + 2 * kv
    offs = (0, q, q + kv, N)
    W = torch.randn(N, H, dtype=dt, device=dev) / H**0.5
    A = torch.randn(S, 3 * R, H, dtype=dt, device=dev) / H**0.5
    B = torch.randn(S, N, R, dtype=dt, device=dev) / R**0.5
    x = torch.randn(T, H, dtype=dt, device=dev)
    y = torch.empty(T, N, dtype=dt, device=dev)
    slot = _slots(wl, T, dev)
    batch = build_lora_batch(slot, S)
    w_cat = torch.cat([W, A.reshape(-1, H)])
    return {
        "qkv_base": lambda: torch.matmul(x, W.T, out=y),
        "qkv_lora_apart": lambda: lora_linear(x, y, A, B, offs, slot, batch=batch,
                                              base=lambda: torch.mm(x, W.T, out=y)),
        "qkv_lora_stacked": lambda: linear_stacked(lora_linear, x, w_cat, B, offs, slot, batch=batch, min_tokens=0),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,8,32,128,512,2048")
    ap.add_argument("--only", default="moe,qkv")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    report: dict = {"device": torch.cuda.get_device_name(dev), "cases": {}}
    for T in (int(t) for t in args.tokens.split(",")):
        cases: dict[str, Callable[[], object]] = {}
        if "moe" in args.only:
            cases.update(moe_cases(STANDARD, T, dev))
        if "qkv" in args.only:
            cases.update(qkv_cases(STANDARD, T, dev))
        for name, fn in cases.items():
            r = profile_case(fn)
            report["cases"][f"{name}@{T}"] = r
            parts = ", ".join(f"{n.split('(')[0]} {us:.1f}" for n, us in sorted(r["kernels_us"].items(),
                                                                               key=lambda kv: -kv[1]))
            print(f"{name:9s} T={T:5d} wall {r['wall_us']:8.1f} us  kernels {r['sum_us']:8.1f} us :: {parts}",
                  flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "profile_kernels.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
