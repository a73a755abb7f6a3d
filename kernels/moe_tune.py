"""Block-config sweep and timing of the Triton fused_moe on a GPU.

    python -m lorax.kernels.moe_tune --out-dir DIR [--shapes qwen3-30b-a3b,olmoe,mixtral] [--tokens 1,8,...]
    TRITON_INTERPRET=0 python -m lorax.kernels.moe_tune --compile-check     (no GPU needed)

For each layer shape and token count it times every candidate config (CUDA graph, rotated routings so
the expert weights come from HBM), keeps the fastest correct one, then times the same layer with 4
adapters of rank 16 (every token on an adapter) over the LoRA K-split choices, the tiles, the decode
epilogue's tile prefetch (PREFETCH), the LoRA K step mode (LORA_K, SHRINK_M; see kernels/fused_moe.py) and
the epilogue stacking. Writes DIR/fused_moe.json
(the data file kernels/configs/fused_moe.json holds) and DIR/moe_tune_report.json (ms, GB/s, fraction
of the HBM roofline, LoRA / base ratio).

--compile-check compiles (never runs) every launch fused_moe makes, with the runtime's own argument
specialization, for sm_90 through the ptxas that ships with triton, and prints registers / spill stack /
shared memory per kernel. It needs no GPU, so CI catches GPU-only compile errors (the interpreter does
not type-check a kernel the way the compiler does).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import triton
import triton.testing

from lorax.kernels._common import use_pdl
from lorax.kernels.fused_moe import STACK_ELEMS, fused_moe, fused_moe_ref
from lorax.kernels.moe_align import moe_align
from lorax.kernels.moe_lora import MoELoraArgs, lora_block_r, slot_group

SHAPES = {  # name: (H, I, E, k)
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "olmoe": (2048, 1024, 64, 8),
    "mixtral": (4096, 14336, 8, 2),
}
HBM_TB_S = 3.02  # replaced at start-up by the copy bandwidth measured on the GPU the sweep runs on
PEAK_TFLOPS = 788.0
DEVICE = "cuda"  # the CPU smoke test of this script switches it

# (BLOCK_M, BLOCK_N_GU, BLOCK_K_GU, BLOCK_N_D, BLOCK_K_D, GROUP_M, num_warps, num_stages)
_SMALL = [(16, 32, 256, 64, 256, 1, 4, 3), (16, 64, 128, 64, 128, 1, 4, 4), (16, 16, 256, 32, 256, 1, 4, 3),
          (16, 32, 128, 128, 128, 1, 4, 4), (16, 64, 256, 128, 128, 1, 8, 3), (16, 32, 128, 64, 128, 1, 4, 5)]
_MID = [(32, 64, 128, 64, 128, 1, 4, 4), (32, 32, 256, 64, 256, 1, 4, 3), (64, 64, 64, 128, 64, 8, 4, 4),
        (16, 64, 128, 64, 128, 1, 4, 4), (64, 64, 128, 64, 128, 4, 8, 3)]
_LARGE = [(64, 64, 64, 128, 64, 8, 4, 4), (128, 64, 64, 128, 64, 8, 8, 3), (64, 128, 64, 128, 64, 8, 8, 3),
          (128, 128, 64, 128, 64, 8, 8, 3), (64, 64, 128, 128, 64, 8, 4, 3), (128, 128, 64, 256, 64, 8, 8, 4)]
_KEYS = ("BLOCK_M", "BLOCK_N_GU", "BLOCK_K_GU", "BLOCK_N_D", "BLOCK_K_D", "GROUP_M", "num_warps", "num_stages")


def candidates(T: int, k: int, E: int) -> list[dict[str, int]]:
    per_expert = T * k / E
    pool = _SMALL if per_expert <= 4 else _MID if per_expert <= 48 else _LARGE
    if 4 < per_expert <= 8 or 48 < per_expert <= 96:  # bucket edges: try both neighbours
        pool = pool + (_SMALL[:3] if per_expert <= 8 else _MID[:3])
    return [dict(zip(_KEYS, c, strict=True), SPLIT=1) for c in pool]


def time_ms(fns: list[Callable[[], object]]) -> float:
    run = lambda: [f() for f in fns]
    return triton.testing.do_bench_cudagraph(run, rep=40, return_mode="median") / len(fns)


def workload(H: int, I: int, E: int, k: int, T: int, sets: int, S: int = 4, R: int = 16,
             dtype: torch.dtype = torch.bfloat16) -> tuple:
    dev = DEVICE
    w13 = torch.randn(E, 2 * I, H, dtype=dtype, device=dev) / H**0.5
    w2 = torch.randn(E, H, I, dtype=dtype, device=dev) / I**0.5
    routings = []
    for _ in range(sets):
        x = torch.randn(T, H, dtype=dtype, device=dev)
        w, ids = torch.topk(torch.randn(T, E, device=dev).softmax(-1), k)
        routings.append((x, w, ids.to(torch.int32)))
    lora = MoELoraArgs(
        (torch.arange(T, device=dev) % S).to(torch.int32),
        torch.randn(S, E, 2 * R, H, dtype=dtype, device=dev) / H**0.5,
        torch.randn(S, E, 2 * I, R, dtype=dtype, device=dev) / R**0.5,
        torch.randn(S, E, R, I, dtype=dtype, device=dev) / I**0.5,
        torch.randn(S, E, H, R, dtype=dtype, device=dev) / R**0.5,
    )
    return w13, w2, routings, lora


def time_layer(w13: torch.Tensor, w2: torch.Tensor, routings: list, lora: MoELoraArgs | None,
               cfg: dict[str, int]) -> float:
    """ms per fused_moe call, the routings replayed one after another inside one CUDA graph."""
    return time_ms([partial(fused_moe, r[0], w13, w2, r[1], r[2], lora, config=cfg) for r in routings])


def layer_bytes(H: int, I: int, E: int, k: int, T: int, ids: torch.Tensor, lora: MoELoraArgs | None) -> int:
    hit = int(torch.unique(ids).numel())
    n = hit * 3 * H * I * 2 + 2 * T * H * 2
    if lora is not None:
        R = lora.gate_up_A.shape[2] // 2
        pairs = int(torch.unique(ids.long() + E * lora.token_slot.long()[:, None]).numel())
        n += pairs * 2 * R * 3 * (H + I)
    return n


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def tune_shape(name: str, tokens: list[int], log: Callable[[str], None]) -> tuple[dict, list[dict]]:
    H, I, E, k = SHAPES[name]
    table: dict[str, dict[str, Any]] = {}
    rows = []
    for T in tokens:
        w13, w2, routings, lora = workload(H, I, E, k, T, sets=4 if T <= 128 else 2)
        x, w, ids = routings[0]
        ref = fused_moe_ref(x, w13, w2, w, ids)
        best: tuple[float, dict[str, int]] | None = None
        for cfg in candidates(T, k, E):
            try:
                err = rel_err(fused_moe(x, w13, w2, w, ids, config=cfg), ref)
                if err > 3e-2:
                    log(f"  {name} T={T} {cfg}: WRONG rel err {err:.2e}")
                    continue
                ms = time_layer(w13, w2, routings, None, cfg)
            except Exception as exc:  # out of shared memory / registers for this tile
                log(f"  {name} T={T} {cfg}: skipped ({type(exc).__name__}: {str(exc)[:80]})")
                continue
            log(f"  {name} T={T} base {ms * 1e3:8.1f} us  {cfg}")
            if best is None or ms < best[0]:
                best = (ms, cfg)
        if best is None:
            log(f"{name} T={T}: no candidate config ran (see the lines above)")
            continue
        base_ms, cfg = best
        lora_ref = fused_moe_ref(x, w13, w2, w, ids, lora)
        # with adapters: the base pick over the LoRA K-splits, then every other candidate at the best split
        lora_best: tuple[float, dict[str, int]] | None = None
        splits = (1, 2, 4, 8) if T <= 32 else (1, 2) if T <= 128 else (1,)
        S, br = lora.gate_up_A.shape[0], lora_block_r(lora.gate_up_A.shape[2] // 2)
        for phase in ("split", "tile", "prefetch", "kstep", "stack"):
            if phase == "split":
                tries = [{**cfg, "SPLIT": s} for s in splits]
            elif lora_best is None:
                break
            elif phase == "tile":
                tries = [{**c, "SPLIT": lora_best[1]["SPLIT"]} for c in candidates(T, k, E)]
                tries = [c for c in tries if c != lora_best[1]]
            elif phase == "prefetch":  # decode: the epilogue's LoRA tiles issued before the main loops
                if T * k > 4 * E:
                    continue
                tries = [{**lora_best[1], "SPLIT": s, "PREFETCH": 1} for s in splits]
            elif phase == "kstep":  # the LoRA as K steps of the GEMMs (SPLIT 1), whole or part blocks per shrink
                if T * k <= 4 * E:
                    continue  # decode: a few pairs per expert, the K-split epilogue path
                tries = [{**c, "LORA_K": 1, **({"SHRINK_M": sm} if sm else {})}
                         for c in candidates(T, k, E) for sm in (0, 64, 32) if sm < c["BLOCK_M"]]
            elif lora_best[1].get("LORA_K"):
                continue
            else:  # more slots per stacked epilogue dot than the register-safe default, at the best tile
                bm = lora_best[1]["BLOCK_M"]
                tries = [{**lora_best[1], "STACK_ELEMS": se} for se in (2048, 4096)
                         if slot_group(S, bm, br, se) != slot_group(S, bm, br, STACK_ELEMS)]
            for c in tries:
                try:
                    err = rel_err(fused_moe(x, w13, w2, w, ids, lora, config=c), lora_ref)
                    ms = time_layer(w13, w2, routings, lora, c)
                except Exception as exc:  # out of shared memory / registers for this tile
                    log(f"  {name} T={T} lora {c}: skipped ({type(exc).__name__}: {str(exc)[:80]})")
                    continue
                log(f"  {name} T={T} lora {ms * 1e3:8.1f} us rel err {err:.1e}  {c}")
                if err < 3e-2 and (lora_best is None or ms < lora_best[0]):
                    lora_best = (ms, c)
        if lora_best is None:
            log(f"{name} T={T}: no LoRA config gave a correct result")
            continue
        lora_ms, lora_cfg = lora_best
        table[str(T)] = {**cfg, "lora": lora_cfg}
        idle = lora._replace(token_slot=torch.full_like(lora.token_slot, -1))  # LoRA on, no token uses it
        idle_ms = time_layer(w13, w2, routings, idle, lora_cfg)
        align_ms = time_ms([partial(moe_align, r[2], E, cfg["BLOCK_M"]) for r in routings])
        nbytes = layer_bytes(H, I, E, k, T, ids, None)
        flops = 2 * T * k * 3 * H * I
        roof = max(nbytes / (HBM_TB_S * 1e9), flops / (PEAK_TFLOPS * 1e9))
        row: dict[str, Any] = dict(shape=name, T=T, base_us=base_ms * 1e3, lora_us=lora_ms * 1e3,
                   lora_over_base=lora_ms / base_ms, lora_no_token_us=idle_ms * 1e3, align_us=align_ms * 1e3,
                   base_GB_s=nbytes / base_ms / 1e6, base_TFLOP_s=flops / base_ms / 1e9,
                   base_roofline_frac=roof / base_ms, config=table[str(T)])
        log(f"{name} T={T}: base {row['base_us']:.1f} us ({row['base_GB_s']:.0f} GB/s, "
            f"{row['base_TFLOP_s']:.1f} TFLOP/s, {100 * row['base_roofline_frac']:.0f}% of roofline), "
            f"lora {row['lora_us']:.1f} us = {row['lora_over_base']:.3f}x base, lora w/o tokens "
            f"{row['lora_no_token_us']:.1f} us, align {row['align_us']:.1f} us")
        rows.append(row)
        torch.cuda.empty_cache()
    return table, rows


def _drive_attention() -> None:
    """paged_attention's launches (store_kv aside): prefill at head dims 128 (no masks past D) and 24, with the
    launcher's default and every tuned config of kernels/configs/attention.json, and decode with and without the
    split reduce."""
    from lorax.kernels._common import _config_file
    from lorax.kernels.attention import paged_attention

    table = [(key, cfg) for by_shape in _config_file("attention.json").values() if isinstance(by_shape, dict)
             for key, by_bucket in by_shape.items() for cfg in by_bucket.values()]
    tuned = [cfg for key, cfg in table if key.startswith("prefill_D")]
    tuned_kv = [cfg for key, cfg in table if key.startswith("prefill_kv_")]  # the k_new path's own entries
    dec = [cfg for key, cfg in table if key.startswith("decode")]
    for D in (128, 24):
        q, kc = torch.empty(40, 32, D, dtype=torch.bfloat16), torch.empty(8, 16, 4, D, dtype=torch.bfloat16)
        tables, ctx = torch.zeros(2, 4, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
        qsl, qsl1 = torch.tensor([0, 20, 40], dtype=torch.int32), torch.tensor([0, 1, 2], dtype=torch.int32)
        kn = torch.empty(40, 4, D, dtype=torch.bfloat16)
        for cfg in [None] + (tuned if D == 128 else []):
            paged_attention(q, kc, kc, tables, ctx, qsl, 0.1, max_query_len=20, config=cfg)
        for cfg in [None] + (tuned_kv if D == 128 else []):
            paged_attention(q, kc, kc, tables, ctx, qsl, 0.1, max_query_len=20, config=cfg, k_new=kn, v_new=kn)
        for cfg in [None] + (dec if D == 128 else []):
            for splits in (1, 4):
                paged_attention(q[:2], kc, kc, tables, ctx, qsl1, 0.1, max_query_len=1, num_splits=splits, config=cfg)


SM90_SMEM = 232448  # the most shared memory one block may use on sm_90 (227 KB)


def compile_check() -> int:
    """Compile fused_moe's and paged attention's launches for sm_90 without a GPU; returns the number of
    failures."""
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime import jit

    if not isinstance(fused_moe.__globals__["_gate_up_kernel"], jit.JITFunction):
        raise SystemExit("compile-check: unset TRITON_INTERPRET (the kernels were built for the interpreter)")
    target = GPUTarget("cuda", 90, 32)
    backend = CUDABackend(target)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    seen: set[tuple] = set()
    failures = 0

    def fake_run(self, *args, grid, warmup, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal failures
        binder = jit.create_function_from_signature(self.signature, self.params, CUDABackend)
        bound, spec, opts = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, spec, opts)
        key = (self.fn.__name__, repr(sorted(constexprs.items())), repr(signature), repr(attrs),
               options.num_warps, options.num_stages)
        if key in seen:
            return None
        seen.add(key)
        names = [p.name for p in self.params]
        meta = {names[k[0]]: v for k, v in constexprs.items() if names[k[0]].isupper()}
        try:
            k = triton.compile(ASTSource(self, signature, constexprs, attrs), target=target,
                               options=options.__dict__)
        except Exception as exc:
            failures += 1
            print(f"FAIL {self.fn.__name__} {meta}: {type(exc).__name__}: {str(exc)[:3000]}", flush=True)
            return None
        if k.metadata.shared > SM90_SMEM:  # compiles, but no sm_90 launch can have that much shared memory
            failures += 1
            print(f"FAIL {self.fn.__name__} {meta}: {k.metadata.shared} bytes of shared memory > {SM90_SMEM}",
                  flush=True)
            return None
        usage = "?"
        if os.path.exists(tool):
            with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
                f.write(k.asm["cubin"])
                f.flush()
                out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
            usage = " ".join(next((ln.split()[:2] for ln in out.splitlines() if "REG:" in ln), ["?"]))
        print(f"ok   {self.fn.__name__:28s} {usage:22s} smem={k.metadata.shared:<6d} warps={options.num_warps} "
              f"stages={options.num_stages} {meta}", flush=True)
        return None

    def drive(T: int, H: int, I: int, E: int, k: int, dtype: torch.dtype, lora: str, cfg: dict | None,
              S: int = 4) -> None:
        x = torch.empty(T, H, dtype=dtype)
        w13, w2 = torch.empty(E, 2 * I, H, dtype=dtype), torch.empty(E, H, I, dtype=dtype)
        R = 16
        lo = None
        if lora:
            shared = lora == "shared"
            lo = MoELoraArgs(torch.zeros(T, dtype=torch.int32), torch.empty(S, E, 2 * R, H, dtype=dtype),
                             torch.empty(S, E, 2 * I, R, dtype=dtype), torch.empty(S, E, R, I, dtype=dtype),
                             torch.empty(S, E, H, R, dtype=dtype),
                             torch.empty(S, 2 * R, H, dtype=dtype) if shared else None,
                             torch.empty(S, H, R, dtype=dtype) if shared else None)
        fused_moe(x, w13, w2, torch.empty(T, k), torch.zeros(T, k, dtype=torch.int32), lo, config=cfg)

    small = dict(BLOCK_M=16, BLOCK_N_GU=32, BLOCK_K_GU=256, BLOCK_N_D=64, BLOCK_K_D=256, GROUP_M=1, SPLIT=8,
                 num_warps=4, num_stages=3)
    large = dict(BLOCK_M=64, BLOCK_N_GU=64, BLOCK_K_GU=64, BLOCK_N_D=128, BLOCK_K_D=64, GROUP_M=8, SPLIT=1,
                 num_warps=4, num_stages=4)
    import lorax.kernels.fused_moe as fm
    import lorax.kernels.moe_align as ma
    import lorax.kernels.moe_lora as ml
    import lorax.kernels.moe_lora_seg as mls

    original = jit.JITFunction.run
    jit.JITFunction.run = fake_run  # type: ignore[method-assign]
    pdl_modules = (fm, ma, ml, mls)
    for m in pdl_modules:  # compile the launches as an sm_90 GPU makes them: with PDL
        m.use_pdl = lambda device: True  # type: ignore[attr-defined]
    try:
        large_k = {**large, "LORA_K": 1, "SHRINK_M": 32}  # the LoRA K step mode, half-block shrink programs
        # small, one-program and three-pass alignment
        small_p = {**small, "PREFETCH": 1}  # the decode epilogue's LoRA tiles issued before the main loops
        # the K step stacked by each block's own slots, at 16-, 64- and 128-row blocks
        compact = [{**small, "SPLIT": 1, "LORA_K": 1, "COMPACT": 1}, {**large_k, "COMPACT": 1},
                   {**large_k, "BLOCK_M": 128, "num_warps": 8, "SHRINK_M": 64, "COMPACT": 1}]
        for T, cfg in ((8, small), (8, small_p), (64, small), (2048, large), (2048, large_k), (64, compact[0]),
                       (2048, compact[1]), (2048, compact[2])):
            for lora in ("", "lora", "shared"):
                drive(T, 2048, 768, 128, 8, torch.bfloat16, lora, cfg)
        for cfg in (small, small_p):  # 40 slots: the epilogue path's slot groups by each block's own slots
            for lora in ("lora", "shared"):
                drive(8, 2048, 768, 128, 8, torch.bfloat16, lora, cfg, S=40)
        for S in (4, 40):  # the segment schedule (16-row virtual blocks; 32 rows with the expand split in four)
            drive(2048, 2048, 768, 128, 8, torch.bfloat16, "lora", {**large, "BLOCK_M": 128, "num_warps": 8,
                                                                    "LORA_SEG": 1}, S=S)
        drive(2048, 2048, 768, 128, 8, torch.bfloat16, "lora", {**large, "LORA_SEG": 1, "SEG_M": 32,
                                                                "SEG_I_SPLIT": 4})
        drive(1, 4096, 14336, 8, 2, torch.bfloat16, "lora", None)  # Mixtral: wide I, partials summed in a loop
        drive(5, 96, 40, 6, 2, torch.float16, "shared", None)  # odd sizes, default config
        drive(200, 96, 40, 1024, 8, torch.bfloat16, "", None)  # 1024 experts: the prefix sum's own launch
        drive(5, 96, 40, 6, 2, torch.float32, "shared", None)  # fp32 on a GPU (exact dots)
        _drive_attention()
    finally:
        jit.JITFunction.run = original  # type: ignore[method-assign]
        for m in pdl_modules:
            m.use_pdl = use_pdl  # type: ignore[attr-defined]
    return failures


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile-check", action="store_true", help="compile for sm_90 without a GPU, then exit")
    ap.add_argument("--out-dir")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", default="1,8,32,128,512,2048")
    args = ap.parse_args()
    if args.compile_check:
        raise SystemExit(1 if compile_check() else 0)
    if not args.out_dir:
        ap.error("--out-dir is required")
    os.makedirs(args.out_dir, exist_ok=True)
    torch.manual_seed(0)
    dev_name = torch.cuda.get_device_name()
    global HBM_TB_S
    from lorax.kernels.bench import measure_copy_tb_s

    HBM_TB_S = measure_copy_tb_s(torch.device("cuda"))
    print(f"{dev_name}: copy bandwidth {HBM_TB_S:.2f} TB/s (the roofline's HBM figure)", flush=True)
    tokens = [int(t) for t in args.tokens.split(",")]
    configs: dict[str, dict] = {dev_name: {}}
    report = dict(device=dev_name, copy_tb_s=HBM_TB_S, torch=torch.__version__, triton=triton.__version__,
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), rows=[])

    def log(msg: str) -> None:
        print(msg, flush=True)

    for name in args.shapes.split(","):
        H, I, E, k = SHAPES[name]
        for T in tokens:  # results are written after every bucket: a run cut short keeps what it measured
            try:
                table, rows = tune_shape(name, [T], log)
            except Exception as exc:  # one shape/bucket failing must not lose the others
                log(f"{name} T={T}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
                continue
            configs[dev_name].setdefault(f"E{E}_H{H}_I{I}_k{k}", {}).update(table)
            report["rows"].extend(rows)  # type: ignore[union-attr]
            with open(os.path.join(args.out_dir, "fused_moe.json"), "w") as f:
                json.dump(configs, f, indent=1)
            with open(os.path.join(args.out_dir, "moe_tune_report.json"), "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
