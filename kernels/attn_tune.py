"""Block-config sweep of paged attention (kernels/attention.py) on the GPU it runs on:

    python -m lorax.kernels.attn_tune --out-dir DIR [--heads 32 --kv-heads 4 --head-dim 128]
        [--prefill-buckets 16,128,...] [--decode-batches 1,8,...]  (an empty list sweeps none of that kind)

writes DIR/attention.json ({GPU name: {"prefill_kv_D{D}_G{G}": {bound: config}, "decode_D{D}_G{G}": {batch: config}}},
the layout of kernels/configs/attention.json, whose entries it is meant to be merged into by hand) and
DIR/attn_tune_report.json (every config's time on every workload).

Each prefill bucket (the launch's max_query_len bound) is decided by the summed time of a few workloads of that
size, run as the engine runs them (this step's keys from k_new / v_new, the prefix through the block table),
among them a chunk after a cached prefix, since a tile that wins on fresh prompts can lose badly there
(BLOCK_N 32 at 512 rows: 92.6 against 103.8 us on 8 fresh prompts, 89.5 against 77.5 after 2048 cached keys, on
an H100). Decode buckets are batch sizes at 1024 cached keys, with the launcher's own split count. A config is
kept only if its output matches the launcher's default config's (and, on small workloads, the reference's).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from functools import partial
from typing import Any

import torch

from lorax.kernels.attention import new_kv_from_cache, paged_attention, paged_attention_ref
from lorax.kernels.bench_support import _rel_err, _time

# bucket -> workloads (cached keys per sequence, new query rows per sequence, sequences)
PREFILL_WORKLOADS: dict[int, list[tuple[int, int, int]]] = {
    16: [(16, 16, 32), (1040, 16, 8)],
    128: [(128, 128, 16), (1152, 128, 4)],
    512: [(512, 512, 1), (512, 512, 8), (2560, 512, 1)],
    1024: [(1024, 1024, 1), (3072, 1024, 1)],
    2048: [(2048, 2048, 1), (4096, 2048, 1)],
    4096: [(4096, 4096, 1)],
    8192: [(8192, 8192, 1)],
}
DECODE_BATCHES = (1, 8, 32, 64, 128, 512)
DECODE_CONTEXT = 1024
PREFILL_GRID = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
                for m, n, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))]
# buckets of at most SMALL_BOUND rows take short tiles instead (a 64-row tile on 16 rows is 3/4 masked)
SMALL_BOUND = 32
SMALL_PREFILL_GRID = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=4, num_stages=s)
                      for m, n, s in itertools.product((16, 32), (32, 64, 128), (2, 3, 4))]
DECODE_GRID = [dict(BLOCK_N=n, num_warps=4, num_stages=s) for n, s in itertools.product((32, 64, 128), (2, 3))]
REF_ROWS = 2048  # workloads up to this many query rows are also checked against the torch reference


def _inputs(ctx: int, q_len: int, seqs: int, n_h: int, n_kv: int, D: int, bs: int, dtype: torch.dtype,
            device: torch.device) -> tuple[torch.Tensor, ...]:
    """q rows and a paged cache whose blocks are handed out in shuffled order."""
    nblk = -(-ctx // bs)
    total = nblk * seqs + 1
    kc = torch.randn(total, bs, n_kv, D, dtype=dtype, device=device)
    vc = torch.randn_like(kc)
    tables = (torch.randperm(total - 1, device=device).to(torch.int32) + 1).view(seqs, nblk)  # block 0 unused
    qsl = torch.arange(seqs + 1, dtype=torch.int32, device=device) * q_len
    q = torch.randn(seqs * q_len, n_h, D, dtype=dtype, device=device)
    ctx_t = torch.full((seqs,), ctx, dtype=torch.int32, device=device)
    return q, kc, vc, tables, ctx_t, qsl


def _sweep(workloads: list[tuple[int, int, int]], grid: list[dict[str, int]], decode: bool, shape: tuple[int, ...],
           device: torch.device, log: Any) -> tuple[dict[str, int] | None, dict[str, list[float]]]:
    """The config of `grid` with the least summed time over `workloads` (None if none ran correctly) and every
    config's times (ms per workload; the key "default" is the launcher's own pick)."""
    n_h, n_kv, D, bs = shape
    sets = [_inputs(c, q, s, n_h, n_kv, D, bs, torch.bfloat16, device) for c, q, s in workloads]
    # prefill as the engine calls it: this step's keys and values beside their queries (k_new / v_new)
    new = [{} if decode else dict(zip(("k_new", "v_new"), new_kv_from_cache(*args[1:]), strict=True)) for args in sets]
    runs = [partial(paged_attention, *args, D**-0.5, max_query_len=1 if decode else q_len, **kv)
            for (_, q_len, _), args, kv in zip(workloads, sets, new, strict=True)]
    defaults = [run() for run in runs]  # the launcher's own config: what every other config must reproduce
    for (_, q_len, seqs), args, want in zip(workloads, sets, defaults, strict=True):
        if seqs * q_len <= REF_ROWS and _rel_err(want, paged_attention_ref(*args, D**-0.5)) > 2e-2:
            raise ValueError(f"the default config differs from the reference on {seqs} x {q_len} rows")
    times: dict[str, list[float]] = {}
    best: tuple[float, dict[str, int]] | None = None
    for cfg in [None, *grid]:
        key = "default" if cfg is None else " ".join(f"{k}={v}" for k, v in cfg.items())
        row = []
        try:
            for run, want in zip(runs, defaults, strict=True):
                got = run(config=cfg)
                if cfg is not None and _rel_err(got, want) > 2e-2:
                    raise ValueError(f"differs from the default config (rel err {_rel_err(got, want):.1e})")
                row.append(_time([partial(run, out=torch.empty_like(got), config=cfg)], device, graph=True))
        except Exception as exc:  # out of shared memory / registers for this tile, or a wrong result
            log(f"  {key}: skipped ({type(exc).__name__}: {str(exc)[:100]})")
            continue
        times[key] = row
        log(f"  {key}: {' / '.join(f'{t * 1e3:.1f}' for t in row)} us")
        if cfg is not None and (best is None or sum(row) < best[0]):
            best = (sum(row), cfg)
    return (best[1] if best else None), times


def tune(shape: tuple[int, int, int, int], device: torch.device, log: Any = print,
         prefill: dict[int, list[tuple[int, int, int]]] | None = None, decode_batches: tuple[int, ...] | None = None,
         prefill_grid: list[dict[str, int]] | None = None, decode_grid: list[dict[str, int]] | None = None,
         decode_context: int = DECODE_CONTEXT) -> tuple[dict[str, dict], dict[str, Any]]:
    """Sweep every bucket; returns the config table (attention.json's per-GPU layout) and the report."""
    n_h, n_kv, D, _ = shape
    table: dict[str, dict] = {}
    report: dict[str, Any] = {}
    p_key, d_key = f"prefill_kv_D{D}_G{n_h // n_kv}", f"decode_D{D}_G{n_h // n_kv}"  # prefill: the k_new path
    for bucket, wls in (prefill if prefill is not None else PREFILL_WORKLOADS).items():
        log(f"{p_key} bound {bucket}: workloads (cached, rows, sequences) {wls}")
        grid = prefill_grid or (SMALL_PREFILL_GRID if bucket <= SMALL_BOUND else PREFILL_GRID)
        cfg, times = _sweep(wls, grid, False, shape, device, log)
        report[f"{p_key} {bucket}"] = times
        if cfg is not None:
            table.setdefault(p_key, {})[str(bucket)] = cfg
    for B in decode_batches if decode_batches is not None else DECODE_BATCHES:
        log(f"{d_key} batch {B}: {decode_context} cached keys")
        cfg, times = _sweep([(decode_context, 1, B)], decode_grid or DECODE_GRID, True, shape, device, log)
        report[f"{d_key} {B}"] = times
        if cfg is not None:
            table.setdefault(d_key, {})[str(B)] = cfg
    return table, report


def main() -> None:
    ap = argparse.ArgumentParser(description="Block-config sweep of paged attention on this GPU: writes "
                                 "OUT_DIR/attention.json (kernels/configs/attention.json's layout) and a report.")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--prefill-buckets", default=",".join(map(str, PREFILL_WORKLOADS)),
                    help="comma-separated prefill buckets to sweep, of " + ",".join(map(str, PREFILL_WORKLOADS))
                    + " (empty: none)")
    ap.add_argument("--decode-batches", default=",".join(map(str, DECODE_BATCHES)),
                    help="comma-separated decode batch sizes to sweep (empty: none)")
    args = ap.parse_args()
    buckets = [int(b) for b in args.prefill_buckets.split(",") if b]
    unknown = sorted(set(buckets) - set(PREFILL_WORKLOADS))
    if unknown:
        raise SystemExit(f"attn_tune: no prefill workloads for bucket(s) {unknown}; known: {list(PREFILL_WORKLOADS)}")
    if not torch.cuda.is_available():
        raise SystemExit("attn_tune: needs a CUDA GPU")
    os.makedirs(args.out_dir, exist_ok=True)
    torch.manual_seed(0)
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    table, report = tune((args.heads, args.kv_heads, args.head_dim, args.block_size), device,
                         log=lambda m: print(m, flush=True), prefill={b: PREFILL_WORKLOADS[b] for b in buckets},
                         decode_batches=tuple(int(b) for b in args.decode_batches.split(",") if b))
    with open(os.path.join(args.out_dir, "attention.json"), "w") as f:
        json.dump({name: table}, f, indent=1)
    with open(os.path.join(args.out_dir, "attn_tune_report.json"), "w") as f:
        json.dump(dict(device=name, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
                       times_ms=report), f, indent=1)
    print(f"wrote {args.out_dir}/attention.json", flush=True)


if __name__ == "__main__":
    main()
