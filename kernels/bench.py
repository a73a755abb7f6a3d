"""Layer benchmark of the Triton kernels (`lorax bench kernels`): ours vs reference vs the HBM roofline.

For each token count T of the standard workload (../docs/BENCHMARKS.md: Qwen3-30B-A3B layer shapes,
4 adapters rank 16, tokens spread evenly over the adapters) and each kernel:
  1. numerics first: ours against the `*_ref` reference on the same inputs (relative max error);
  2. ours timed inside a CUDA graph (triton.testing.do_bench_cudagraph, median), the graph running
     the kernel over several input sets in turn so that the bytes read exceed twice the L2 cache;
  3. the reference (eager; it syncs with the host) and, where the reference is a slow loop, a fast
     torch baseline (torch._grouped_mm MoE, SDPA attention) that a user could run instead;
  4. the roofline: max(bytes / measured copy bandwidth, flops / peak) — the copy bandwidth is
     measured in the same run (a device-to-device copy of 1 GiB, bytes read + written).
Ratios in the same run: MoE+LoRA / MoE base (target <= 1.15) and qkv+LoRA / qkv base (<= 1.5).

The same code runs a tiny workload on the CPU (Triton interpreter, wall-clock timing) as a smoke test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import torch

from lorax.kernels.bench_support import (
    _rel_err,
    _rotations,
    _time,
    _time_slow,
    expected_experts_hit,
    measure_copy_tb_s,
    moe_bytes,
    moe_grouped_mm,
    roofline_ms,
)
from lorax.kernels.fused_moe import fused_moe_ref
from lorax.kernels.lora_sgemm import build_lora_batch, lora_linear, lora_linear_ref
from lorax.kernels.lora_stacked import linear_stacked, stacked_rows, uses_stacked_gemm
from lorax.kernels.moe_lora import MoELoraArgs
from lorax.kernels.triton_ops import fused_moe_is_triton, make_ops

STANDARD_TOKENS = (1, 8, 32, 128, 512, 2048)
KERNEL_GROUPS = ("moe", "qkv", "attention", "layer")


@dataclass(frozen=True)
class Workload:
    hidden: int = 2048
    experts: int = 128
    topk: int = 8
    moe_inter: int = 768
    n_heads: int = 32
    n_kv: int = 4
    head_dim: int = 128
    adapters: int = 4
    rank: int = 16
    block_size: int = 16
    decode_context: int = 1024  # every decode sequence's context (decode at T tokens = T sequences)
    dtype: str = "bfloat16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


STANDARD = Workload()
# Smoke-test shapes for the CPU interpreter: every code path, seconds not hours.
TINY = Workload(hidden=64, experts=8, topk=2, moe_inter=32, n_heads=4, n_kv=2, head_dim=16, adapters=2,
                rank=16, block_size=4, decode_context=24, dtype="float32")


@dataclass
class BenchRow:
    kernel: str
    tokens: int
    ours_ms: float
    ref_ms: float | None = None
    ref_name: str = ""
    fast_ms: float | None = None  # fast torch baseline, where the reference is a slow loop
    fast_name: str = ""
    bytes: int = 0
    flops: int = 0
    roofline_ms: float = 0.0
    rel_err: float | None = None  # max |ours - ref| / max |ref|
    note: str = ""

    @property
    def roofline_fraction(self) -> float:
        return self.roofline_ms / self.ours_ms if self.ours_ms > 0 else 0.0


@dataclass
class BenchReport:
    device: str
    torch_version: str
    triton_version: str
    date: str
    workload: dict
    copy_tb_s: float
    peak_tflops: float
    fused_moe_triton: bool
    rows: list[BenchRow] = field(default_factory=list)

    def ratio(self, num: str, den: str, tokens: int) -> float | None:
        a = next((r for r in self.rows if r.kernel == num and r.tokens == tokens), None)
        b = next((r for r in self.rows if r.kernel == den and r.tokens == tokens), None)
        return a.ours_ms / b.ours_ms if a and b and b.ours_ms > 0 else None

    def to_json(self) -> dict:
        d = asdict(self)
        d["rows"] = [{**asdict(r), "roofline_fraction": r.roofline_fraction} for r in self.rows]
        toks = sorted({r.tokens for r in self.rows})
        d["ratios"] = {
            "moe_lora_over_base": {t: self.ratio("moe_lora", "moe_base", t) for t in toks},
            "qkv_lora_over_base": {t: self.ratio("qkv_base+lora", "qkv_base", t) for t in toks},
        }
        return d


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


def _slots(wl: Workload, T: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(T, device=device) % wl.adapters).to(torch.int32)  # spread evenly


def bench_moe(wl: Workload, T: int, device: torch.device, bw: float, peak: float) -> list[BenchRow]:
    ops = make_ops()
    dt, H, E, k, I, S, R = wl.torch_dtype, wl.hidden, wl.experts, wl.topk, wl.moe_inter, wl.adapters, wl.rank
    w13 = torch.randn(E, 2 * I, H, dtype=dt, device=device) / H**0.5
    w2 = torch.randn(E, H, I, dtype=dt, device=device) / I**0.5
    lora = MoELoraArgs(
        token_slot=_slots(wl, T, device),
        gate_up_A=torch.randn(S, E, 2 * R, H, dtype=dt, device=device) / H**0.5,
        gate_up_B=torch.randn(S, E, 2 * I, R, dtype=dt, device=device) / R**0.5,
        down_A=torch.randn(S, E, R, I, dtype=dt, device=device) / I**0.5,
        down_B=torch.randn(S, E, H, R, dtype=dt, device=device) / R**0.5,
    )
    # Several routings so that the experts a timed pass touches do not sit in L2.
    per_set = max(1.0, expected_experts_hit(E, k, T)) * 3 * H * I * 2
    sets = []
    for _ in range(_rotations(int(per_set), device)):
        x = torch.randn(T, H, dtype=dt, device=device)
        weights, ids = torch.topk(torch.randn(T, E, device=device).softmax(-1), k)
        sets.append((x, weights, ids.to(torch.int32)))
    x, weights, ids = sets[0]
    hit = int(torch.unique(ids).numel())
    pairs = int(torch.unique(ids.long() + E * lora.token_slot.long()[:, None]).numel())
    flops = 2 * T * k * 3 * H * I
    rows = []
    for name, lo in (("moe_base", None), ("moe_lora", lora)):
        got = ops.fused_moe(x, w13, w2, weights, ids, lo)
        ref = fused_moe_ref(x, w13, w2, weights, ids, lo)
        row = BenchRow(name, T, _time([partial(ops.fused_moe, s[0], w13, w2, s[1], s[2], lo) for s in sets],
                                      device, graph=True),
                       ref_ms=_time_slow(partial(fused_moe_ref, x, w13, w2, weights, ids, lo), device),
                       ref_name="fused_moe_ref", rel_err=_rel_err(got, ref),
                       bytes=moe_bytes(wl, hit, pairs, T, lo is not None),
                       flops=flops + (2 * T * k * 3 * R * (H + I) if lo is not None else 0))
        if lo is None and device.type == "cuda":
            try:
                fast = moe_grouped_mm(x, w13, w2, weights, ids)
                row.fast_ms = _time([partial(moe_grouped_mm, s[0], w13, w2, s[1], s[2]) for s in sets],
                                    device, graph=True)
                row.fast_name = f"torch._grouped_mm (rel err {_rel_err(fast, ref):.1e})"
            except Exception as err:  # an older torch or GPU without grouped_mm
                row.fast_name = f"grouped_mm unavailable: {type(err).__name__}"
        if not fused_moe_is_triton():
            row.note = "fused_moe is the torch reference (Triton kernel not in the tree)"
        row.roofline_ms = roofline_ms(row.bytes, row.flops, bw, peak)
        rows.append(row)
    return rows


def bench_qkv(wl: Workload, T: int, device: torch.device, bw: float, peak: float) -> list[BenchRow]:
    """Dense qkv projection with GQA slice widths: the base GEMM, the LoRA delta alone, base + LoRA."""
    dt, H, S, R = wl.torch_dtype, wl.hidden, wl.adapters, wl.rank
    q, kv = wl.n_heads * wl.head_dim, wl.n_kv * wl.head_dim
    N = q + 2 * kv
    offs = (0, q, q + kv, N)
    el = torch.empty(0, dtype=dt).element_size()
    slot = _slots(wl, T, device)
    batch = build_lora_batch(slot, S)
    sets = []
    for _ in range(_rotations(N * H * el, device)):
        sets.append((torch.randn(N, H, dtype=dt, device=device) / H**0.5,
                     torch.randn(S, 3 * R, H, dtype=dt, device=device) / H**0.5,
                     torch.randn(S, N, R, dtype=dt, device=device) / R**0.5))
    x = torch.randn(T, H, dtype=dt, device=device)
    ys = [torch.empty(T, N, dtype=dt, device=device) for _ in sets]
    active = min(S, T)
    lora_bytes = active * (3 * R * H + N * R) * el
    act_bytes = (T * H + T * N) * el

    def base(i: int) -> torch.Tensor:
        return torch.matmul(x, sets[i][0].T, out=ys[i])

    def delta(i: int) -> torch.Tensor:
        return lora_linear(x, ys[i], sets[i][1], sets[i][2], offs, slot, batch=batch)

    def apart(i: int) -> torch.Tensor:  # A apart from W: the shrink and expand beside the GEMM
        return lora_linear(x, ys[i], sets[i][1], sets[i][2], offs, slot, batch=batch, base=partial(base, i))

    stacked = stacked_rows(N, S, 3, R) > 0  # what the engine's LoraLinear does at this pool size
    stacked_here = stacked and uses_stacked_gemm(T, device)
    cats = [torch.cat([w, a.reshape(-1, H)]) for w, a, _ in sets] if stacked else []

    def both(i: int) -> torch.Tensor:  # as the engine's LoraLinear calls it
        if stacked:
            return linear_stacked(lora_linear, x, cats[i], sets[i][2], offs, slot, batch=batch)
        return apart(i)

    y0 = base(0).clone()
    got = lora_linear(x, y0.clone(), sets[0][1], sets[0][2], offs, slot, batch=batch)
    ref = lora_linear_ref(x, y0.clone(), sets[0][1], sets[0][2], offs, slot)
    err = _rel_err(got - y0, ref - y0)  # error of the delta itself
    err_both = _rel_err(both(0).float() - y0.float(), ref.float() - y0.float())
    idx = range(len(sets))
    rows = [
        BenchRow("qkv_base", T, _time([partial(base, i) for i in idx], device, graph=True),
                 bytes=N * H * el + act_bytes, flops=2 * T * H * N, note="torch.matmul (cuBLAS)"),
        BenchRow("qkv_lora", T, _time([partial(delta, i) for i in idx], device, graph=True),
                 ref_ms=_time_slow(lambda: lora_linear_ref(x, y0.clone(), sets[0][1], sets[0][2], offs, slot), device),
                 ref_name="lora_linear_ref", rel_err=err, bytes=lora_bytes + T * H * el + 2 * T * N * el,
                 flops=2 * T * R * (3 * H + N), note="delta only, LoraBatch prebuilt"),
        BenchRow("qkv_base+lora", T, _time([partial(both, i) for i in idx], device, graph=True),
                 bytes=N * H * el + lora_bytes + act_bytes + 2 * T * N * el,
                 flops=2 * T * H * N + 2 * T * R * (3 * H + N), rel_err=err_both,
                 note="A stacked under W: one GEMM + the expand" if stacked_here else "shrink + expand beside the GEMM"),
        BenchRow("qkv_base+lora_apart", T, _time([partial(apart, i) for i in idx], device, graph=True),
                 bytes=N * H * el + lora_bytes + act_bytes + 2 * T * N * el,
                 flops=2 * T * H * N + 2 * T * R * (3 * H + N), note="A apart: shrink + expand beside the GEMM"),
        BenchRow("lora_batch_build", T, _time([lambda: build_lora_batch(slot, S)], device, graph=True),
                 bytes=T * 12, note="once per step, shared by all layers"),
    ]
    for r in rows:
        r.roofline_ms = roofline_ms(r.bytes, r.flops, bw, peak)
    return rows


def run_kernels(
    wl: Workload = STANDARD,
    tokens: tuple[int, ...] = STANDARD_TOKENS,
    groups: tuple[str, ...] = KERNEL_GROUPS,
    device: str = "cuda",
    peak_tflops: float = 788.0,
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    import datetime

    import triton

    dev = torch.device(device)
    torch.manual_seed(0)
    bw = measure_copy_tb_s(dev)
    if progress:
        progress(f"copy bandwidth {bw:.3f} TB/s")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (Triton interpreter)"
    report = BenchReport(device=name, torch_version=torch.__version__, triton_version=triton.__version__,
                         date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                         workload=asdict(wl), copy_tb_s=bw, peak_tflops=peak_tflops,
                         fused_moe_triton=fused_moe_is_triton())
    from lorax.kernels.bench_attention import bench_attention  # (these import this module's rows)
    from lorax.kernels.bench_layer import bench_layer

    cases = {"moe": bench_moe, "qkv": bench_qkv, "attention": bench_attention, "layer": bench_layer}
    for T in tokens:
        for g in groups:
            if progress:
                progress(f"{g} T={T}")
            try:
                rows = cases[g](wl, T, dev, bw, peak_tflops)
            except Exception as err:  # one broken kernel must not hide the others' figures
                rows = [BenchRow(g, T, float("nan"), note=f"FAILED: {type(err).__name__}: {str(err)[:200]}")]
            report.rows += rows
            if progress:
                for r in rows:  # partial results survive a run that is cut short
                    progress(f"    {r.kernel} T={T}: {_ms(r.ours_ms)} ms, roofline {_ms(r.roofline_ms)} ms, "
                             f"ref {_ms(r.ref_ms)} ms, fast {_ms(r.fast_ms)} ms, rel err {r.rel_err}")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return report


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}" if v < 1 else f"{v:.2f}"


def format_table(report: BenchReport) -> str:
    """Markdown tables: every row, then the two target ratios per token count."""
    lines = [
        f"device: {report.device} | torch {report.torch_version} | triton {report.triton_version} | "
        f"{report.date} | copy {report.copy_tb_s:.2f} TB/s | peak {report.peak_tflops:.0f} TFLOP/s | "
        f"fused_moe: {'Triton' if report.fused_moe_triton else 'torch reference'}",
        "",
        "| kernel | tokens | ours ms | roofline ms | of roofline | ref ms | fast baseline ms | rel err | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        fast = f"{_ms(r.fast_ms)} ({r.fast_name})" if r.fast_name else "-"
        err = "-" if r.rel_err is None else f"{r.rel_err:.1e}"
        lines.append(f"| {r.kernel} | {r.tokens} | {_ms(r.ours_ms)} | {_ms(r.roofline_ms)} | "
                     f"{100 * r.roofline_fraction:.0f}% | {_ms(r.ref_ms)} | {fast} | {err} | {r.note} |")
    toks = sorted({r.tokens for r in report.rows})
    lines += ["", "| tokens | MoE+LoRA / MoE base (target <= 1.15) | qkv+LoRA / qkv base (target <= 1.5) |",
              "|---|---|---|"]
    for t in toks:
        a, b = report.ratio("moe_lora", "moe_base", t), report.ratio("qkv_base+lora", "qkv_base", t)
        lines.append(f"| {t} | {'-' if a is None else f'{a:.2f}'} | {'-' if b is None else f'{b:.2f}'} |")
    return "\n".join(lines)
