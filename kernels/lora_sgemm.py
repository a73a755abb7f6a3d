"""Dense LoRA (q/k/v/o, dense MLPs, shared experts) over tokens grouped by adapter slot.

Contract of `lora_linear` (Triton) and `lora_linear_ref`; adds the delta into y in place:

    x             [T, in]
    y             [T, out_total]         the base layer's output (several slices side by side)
    A             [S, n_slices * R, in]  slice i's A in rows [i*R, (i+1)*R), zero-padded past its rank
    B             [S, out_total, R]      slice i's B in rows [offsets[i], offsets[i+1])
    slice_offsets host tuple of n_slices + 1 ints, offsets[0] == 0, offsets[-1] == out_total
    token_slot    [T] int32, -1 = no adapter (row untouched); ids >= S are treated as -1
    slot_rank     optional [S] int32: slot s uses only ranks [0, slot_rank[s]) (the rest is ignored)
    base          optional callable that writes the base layer's output into y (keyword-only); both
                  implementations run it before adding the delta, the Triton one with the shrink
                  running beside it on a side stream (the shrink reads only x)
    z             optional [T, S * n_slices * R] shrink computed by the caller (keyword-only; any row
                  stride): z[t, s*n*R + i*R + r] = A[s, i*R + r] @ x[t]. Both implementations then skip
                  the shrink and expand z (`linear_stacked` in kernels/lora_stacked.py gets it from the
                  base GEMM itself)
    batch, scratch, mode: Triton hints (keyword-only) that the reference accepts and ignores

    y[t, o_i:o_{i+1}] += B[s, o_i:o_{i+1}] @ (A[s, i*R:(i+1)*R] @ x[t])     for s = token_slot[t] >= 0

The Triton path sorts tokens by slot on the device (`LoraBatch`, built once per step by
`build_lora_batch` and reused by every layer), so its grid scales with the number of adapter slots,
not with the batch size: grid = (S, cdiv(T, BLOCK_M), output tiles), and a program whose rows lie
past its slot's segment exits before loading anything. Nothing here syncs with the host.

Two schedules (picked from kernels/configs/lora_sgemm.json for the GPU and shape, else "split"; or
forced with `mode=`):
- "fused": one launch; every program recomputes the shrink
  z = x_rows @ A_slice^T (BLOCK_M x R, K = in) for its own slice and expands it into its output
  tile. The recompute is cheap while BLOCK_M is small and saves a launch and a round trip for z.
- "split": a shrink launch writes z [SPLIT_K, T, n_slices * R] in fp32 (rows in sorted
  order; K cut into SPLIT_K ranges so that enough programs have work, each range to its own slab, so
  the sum is deterministic), then an expand launch sums the slabs and expands. `scratch=` takes a
  preallocated fp32 buffer for z.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import triton

from lorax.kernels._common import dot_precision, interpreting, tuned_buckets, use_pdl
from lorax.kernels.lora_sgemm_kernels import _lora_add_kernel, _lora_expand_kernel, _lora_shrink_kernel


def lora_linear_ref(
    x: torch.Tensor,
    y: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    slice_offsets: tuple[int, ...],
    token_slot: torch.Tensor,
    *,
    batch: LoraBatch | None = None,
    slot_rank: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
    mode: str = "auto",
    base: Callable[[], object] | None = None,
    z: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference (host-synchronising). batch/scratch/mode are Triton hints, accepted so that layers
    call either backend the same way; slot_rank and z are honoured; `base` (if given) runs first."""
    _check_z(z, base, x.shape[0], A.shape[0] * A.shape[1])
    if base is not None:
        base()
    R = B.shape[-1]
    nR = A.shape[1]
    slot = token_slot.long()
    slot = torch.where(slot < A.shape[0], slot, torch.full_like(slot, -1))
    for s in torch.unique(slot[slot >= 0]).tolist():
        rows = (slot == s).nonzero(as_tuple=True)[0]
        if z is None:
            z_s = x[rows].float() @ A[s].float().T  # [m, n_slices * R]
        else:
            z_s = z[rows, s * nR : (s + 1) * nR].float()
        if slot_rank is not None:
            keep = torch.arange(nR, device=x.device) % R < int(slot_rank[s])
            z_s = z_s * keep
        for i in range(len(slice_offsets) - 1):
            lo, hi = slice_offsets[i], slice_offsets[i + 1]
            y[rows, lo:hi] += (z_s[:, i * R : (i + 1) * R] @ B[s, lo:hi].float().T).to(y.dtype)
    return y


def _check_z(z: torch.Tensor | None, base: object, T: int, cols: int) -> None:
    if z is None:
        return
    if base is not None:
        raise ValueError("lora_linear: give either base= or z= (z comes from a base GEMM the caller ran)")
    if z.dim() != 2 or tuple(z.shape) != (T, cols) or z.stride(1) != 1:
        raise ValueError(f"lora_linear: z must be [T={T}, S*n_slices*R={cols}] with unit column stride, "
                         f"got {tuple(z.shape)} strides {z.stride()}")


class LoraBatch(NamedTuple):
    """Tokens of one step grouped by adapter slot; built on the device once per step."""

    sorted_tokens: torch.Tensor  # [T] int32 token rows, stable-sorted by slot; slot -1 rows come last
    seg_start: torch.Tensor  # [S] int32 first position of slot s in sorted_tokens
    seg_len: torch.Tensor  # [S] int32 number of tokens on slot s (0 = the slot's programs exit)
    num_tokens: int  # host bound T (the grid's row extent)


def build_lora_batch(token_slot: torch.Tensor, num_slots: int) -> LoraBatch:
    """Group tokens by slot with device ops only (stable sort + histogram + exclusive cumsum).

    Example, S = 3: token_slot [2, -1, 0, 2, 0] -> sorted_tokens [2, 4, 0, 3, 1],
    seg_start [0, 2, 2], seg_len [2, 0, 2]. Capturable in a CUDA graph (no host sync).
    """
    T = token_slot.shape[0]
    dev = token_slot.device
    slot = token_slot.to(torch.int64)
    # -1 and out-of-range ids sort into an extra bucket S that no program reads.
    key = torch.where((slot >= 0) & (slot < num_slots), slot, torch.full_like(slot, num_slots))
    order = torch.sort(key, stable=True).indices.to(torch.int32)
    counts = torch.zeros(num_slots + 1, dtype=torch.int32, device=dev)
    counts.scatter_add_(0, key, torch.ones(T, dtype=torch.int32, device=dev))
    starts = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    return LoraBatch(order, starts[:num_slots], counts[:num_slots], T)


# Largest T the default picks the fused schedule for. Measured on an H100 (qkv 2048 -> 5120, rank 16,
# 4 adapters), two launches beat the recomputed shrink at every T (T=1: 5.1 us split vs 7.8 us fused),
# so the default is the split schedule; "fused" stays available (mode="fused", or a config table entry).
FUSED_MAX_TOKENS = 0


@functools.lru_cache(maxsize=64)
def _tile_table(slice_offsets: tuple[int, ...], block_n: int, device: str) -> torch.Tensor:
    """Output tiles that never straddle two slices: rows (slice, first column, slice end)."""
    rows = []
    for i in range(len(slice_offsets) - 1):
        lo, hi = slice_offsets[i], slice_offsets[i + 1]
        rows += [(i, n, hi) for n in range(lo, hi, block_n)]
    return torch.tensor(rows, dtype=torch.int32, device=device).reshape(-1, 3)


def tuned_config(file: str, device: torch.device, shape_key: str, n: int) -> dict:
    """Measured block config from kernels/configs/<file> for this GPU and shape: the smallest bucket >= n
    (else the largest). Empty on the CPU / interpreter or when not measured."""
    by_bucket = tuned_buckets(file, device, shape_key)
    if not by_bucket:
        return {}
    buckets = sorted(int(b) for b in by_bucket)
    return dict(by_bucket[str(next((b for b in buckets if b >= n), buckets[-1]))])


def shrink_split_k(T: int, S: int, n_slices: int, K: int, block_m: int, block_k: int) -> int:
    """Split the shrink's K loop until about two programs per SM (132 on an H100) have work: busy
    programs ~ (m-blocks + slots) * slices, and a split keeps at least two BLOCK_K steps."""
    busy = (triton.cdiv(T, block_m) + min(S, T)) * n_slices
    return max(1, min(264 // max(busy, 1), triton.cdiv(K, 2 * block_k)))


def lora_config(T: int, out_total: int, mode: str) -> dict[str, int]:
    """Block sizes by token count. The fused schedule walks K once per output tile, so it takes long
    K steps (few loop trips at decode); the split expand has K = R and wants wide output tiles."""
    block_m = 16 if T <= 16 else 32 if T <= 64 else 64
    if mode == "fused":
        block_k = 256 if block_m == 16 else 128
    else:
        block_k = 64
    return dict(BLOCK_M=block_m, BLOCK_N=128 if out_total >= 1024 else 64, BLOCK_K=block_k,
                num_warps=4, num_stages=3)


def _plan(
    T: int, K: int, S: int, R: int, n_slices: int, out_total: int, device: torch.device, mode: str,
    config: dict[str, int] | None,
) -> tuple[str, dict[str, int], int, int]:
    """(schedule, block config, SPLIT_K, K columns per split) from host sizes only."""
    tuned = {} if config is not None else tuned_config("lora_sgemm.json", device, f"K{K}_N{out_total}_R{R}", T)
    picked = tuned.pop("mode", None)
    if mode == "auto":
        mode = picked or ("fused" if T <= FUSED_MAX_TOKENS else "split")
    if mode not in ("fused", "split"):
        raise ValueError(f"lora_linear: unknown mode {mode!r}")
    cfg = {**lora_config(T, out_total, mode), **tuned, **(config or {})}
    if interpreting():
        cfg["num_stages"] = 1
    if mode == "fused":
        return mode, cfg, 1, K
    split_k = cfg.get("SPLIT_K") or shrink_split_k(T, S, n_slices, K, cfg["BLOCK_M"], cfg["BLOCK_K"])
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    return mode, cfg, triton.cdiv(K, k_per_split), k_per_split


def lora_scratch_numel(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slice_offsets: tuple[int, ...],
                       mode: str = "auto", config: dict[str, int] | None = None) -> int:
    """fp32 elements of `scratch` one `lora_linear` call on these shapes needs (0 for the fused
    schedule): what a CUDA-graph runner allocates once per captured token count."""
    T, K = x.shape
    S, R = A.shape[0], B.shape[2]
    n = len(slice_offsets) - 1
    mode, _, split_k, _ = _plan(T, K, S, R, n, int(slice_offsets[-1]), x.device, mode, config)
    return 0 if mode == "fused" else split_k * T * n * R


def _check(
    x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
    slice_offsets: tuple[int, ...], token_slot: torch.Tensor,
) -> None:
    if x.dim() != 2 or y.dim() != 2 or A.dim() != 3 or B.dim() != 3:
        raise ValueError(f"lora_linear: x/y must be 2-D and A/B 3-D, got {x.shape} {y.shape} {A.shape} {B.shape}")
    T, K = x.shape
    S, nR, R = A.shape[0], A.shape[1], B.shape[2]
    n = len(slice_offsets) - 1
    if n < 1 or slice_offsets[0] != 0 or list(slice_offsets) != sorted(slice_offsets):
        raise ValueError(f"lora_linear: slice_offsets {slice_offsets} must start at 0 and not decrease")
    if y.shape != (T, slice_offsets[-1]) or B.shape[:2] != (S, slice_offsets[-1]):
        raise ValueError(f"lora_linear: y {tuple(y.shape)} / B {tuple(B.shape)} do not match slices {slice_offsets}")
    if A.shape[2] != K or nR != n * R:
        raise ValueError(f"lora_linear: A {tuple(A.shape)} must be [S, {n}*{R}, {K}]")
    if token_slot.shape != (T,) or token_slot.dtype != torch.int32:
        raise ValueError(f"lora_linear: token_slot must be [T={T}] int32, got {tuple(token_slot.shape)} {token_slot.dtype}")
    if not (x.dtype == y.dtype == A.dtype == B.dtype):
        raise ValueError(f"lora_linear: dtypes differ: x {x.dtype} y {y.dtype} A {A.dtype} B {B.dtype}")
    if len({x.device, y.device, A.device, B.device, token_slot.device}) != 1:
        raise ValueError("lora_linear: all tensors must be on one device")


def z_expand_config(T: int) -> dict[str, int]:
    """Expand tiles for a given z (no K loop). H100, qkv, 4 adapters of rank 16, after the stacked GEMM:
    16 x 128 tiles beat the split schedule's by 0.3 us at 128 tokens and 1-2 us at 512."""
    return {"BLOCK_M": 16 if T <= 256 else 32, "BLOCK_N": 128, "num_warps": 4}


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
# `base=` forks the delta onto a side stream up to this many tokens (decode-sized steps: there the
# delta's launches, not its bytes, are what it costs). LORAX_LORA_FORK (read at import): "0" never
# forks, "1" always does (on the CPU the same kernels then run in order: how CI tests this path).
FORK_MAX_TOKENS = 256
FORK_MODE = os.environ.get("LORAX_LORA_FORK", "auto")
ADD_BLOCK_T, ADD_BLOCK_N = 4, 1024


def _fork(T: int, device: torch.device) -> bool:
    return FORK_MODE == "1" or (FORK_MODE != "0" and device.type == "cuda" and T <= FORK_MAX_TOKENS)


@contextlib.contextmanager
def _beside(base: Callable[[], object], device: torch.device) -> Iterator[None]:
    """Run the body on a side stream while `base()` runs on the current stream; join after both.

    Fork and join are event record/wait pairs: no host sync, and inside a CUDA-graph capture they
    become two parallel branches of the graph.
    """
    if device.type != "cuda":
        yield
        base()
        return
    cur = torch.cuda.current_stream(device)
    side = _SIDE_STREAMS.get(device)
    if side is None:
        side = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    side.wait_stream(cur)
    with torch.cuda.stream(side):
        yield
    base()
    cur.wait_stream(side)


def lora_linear(
    x: torch.Tensor,
    y: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    slice_offsets: tuple[int, ...],
    token_slot: torch.Tensor,
    *,
    batch: LoraBatch | None = None,
    slot_rank: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
    mode: str = "auto",
    config: dict[str, int] | None = None,
    base: Callable[[], object] | None = None,
    z: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton `lora_linear`: y += per-slot LoRA delta, in place; returns y.

    base: optional callable writing the base output into y (e.g. `torch.mm(x, W.t(), out=y)`). On a GPU,
        up to FORK_MAX_TOKENS tokens, the shrink and expand then run on a side stream into a delta buffer
        while `base` runs on the current one (both only read x; fork and join are stream events, so
        this is capturable and never syncs), and one small kernel adds the delta to the adapter rows
        of y: the LoRA costs about one launch on top of the base GEMM instead of two in series.

    batch: the step's `build_lora_batch(token_slot, S)` (built here when None).
    scratch: fp32 buffer of >= `lora_scratch_numel(...)` elements for the split schedule (allocated
        when None).
    mode: "auto" | "fused" | "split".
    config: block sizes overriding `lora_config` (keys BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps,
        num_stages); without it, a measured entry of kernels/configs/lora_sgemm.json for this GPU and shape (which may
        also pick the schedule under mode="auto") overrides the defaults.
    """
    slice_offsets = tuple(int(o) for o in slice_offsets)
    _check(x, y, A, B, slice_offsets, token_slot)
    T, K = x.shape
    S, R = A.shape[0], B.shape[2]
    _check_z(z, base, T, S * A.shape[1])
    n_slices = len(slice_offsets) - 1
    if T == 0 or S == 0 or slice_offsets[-1] == 0 or R == 0:
        if base is not None:
            base()
        return y
    if batch is None:
        batch = build_lora_batch(token_slot, S)
    if batch.seg_len.shape[0] != S or batch.num_tokens != T:
        raise ValueError(f"lora_linear: batch built for {batch.seg_len.shape[0]} slots / {batch.num_tokens} tokens, "
                         f"layer has {S} slots / {T} tokens")
    if slot_rank is not None and (slot_rank.shape != (S,) or slot_rank.dtype != torch.int32):
        raise ValueError(f"lora_linear: slot_rank must be [S={S}] int32")
    given = z is not None
    if given:
        mode = "split"  # the expand of the split schedule, reading the caller's z: no shrink launch
    mode, cfg, split_k, k_per_split = _plan(T, K, S, R, n_slices, slice_offsets[-1], x.device, mode, config)
    if given:
        split_k = 1
        cfg = {**cfg, **z_expand_config(T), **(config or {})}
    block_m, block_n, block_k = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    block_r = max(16, triton.next_power_of_2(R))
    tiles = _tile_table(slice_offsets, block_n, str(x.device))
    rank_arg = slot_rank if slot_rank is not None else batch.seg_len
    cast = interpreting()
    pdl = use_pdl(x.device)
    grid_m = triton.cdiv(T, block_m)

    split = mode == "split"
    z_slot_cols = n_slices * R if given else 0
    # after our shrink, the expand launches early (PDL) and loads B while the shrink runs; after the caller's
    # GEMM (a given z: cuBLAS, which does not signal early) a programmatic launch only adds latency (H100,
    # qkv at 128 tokens: 16.2 -> 15.5 us without it)
    pdl_expand = pdl and split and not given
    if z is not None:  # given
        z = z.unsqueeze(0)  # one slab (SPLIT_K = 1)
    elif split:
        need = split_k * T * n_slices * R
        if scratch is None:
            z = torch.empty(split_k, T, n_slices * R, dtype=torch.float32, device=x.device)
        else:
            if scratch.dtype != torch.float32 or scratch.numel() < need:
                raise ValueError(f"lora_linear: scratch must be fp32 with >= {need} elements")
            z = scratch.reshape(-1)[:need].view(split_k, T, n_slices * R)
    else:
        z = y.unsqueeze(0)  # unused pointer in the fused schedule

    def shrink() -> None:
        _lora_shrink_kernel[(S, grid_m, n_slices * split_k)](
            x, A, z, batch.sorted_tokens, batch.seg_start, batch.seg_len, rank_arg,
            K, R, k_per_split,
            x.stride(0), x.stride(1),
            A.stride(0), A.stride(1), A.stride(2),
            z.stride(0), z.stride(1), z.stride(2),
            SPLIT_K=split_k, HAS_RANK=slot_rank is not None, CAST_FP32=cast, DOT_PREC=dot_precision(x.dtype),
            BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, USE_PDL=pdl, launch_pdl=pdl, **launch,
        )

    def expand(out: torch.Tensor, accumulate: bool) -> None:
        _lora_expand_kernel[(S, grid_m, tiles.shape[0])](
            x, A, z, B, out, tiles, batch.sorted_tokens, batch.seg_start, batch.seg_len, rank_arg,
            K, R, z_slot_cols,
            x.stride(0), x.stride(1),
            A.stride(0), A.stride(1), A.stride(2),
            z.stride(0), z.stride(1), z.stride(2),
            B.stride(0), B.stride(1), B.stride(2),
            out.stride(0), out.stride(1),
            SPLIT_K=split_k, SHRINK_INLINE=not split, Z_BY_TOKEN=given, HAS_RANK=slot_rank is not None,
            ACCUMULATE=accumulate, CAST_FP32=cast, DOT_PREC=dot_precision(x.dtype), BLOCK_M=block_m,
            BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_K=block_k, USE_PDL=pdl_expand, launch_pdl=pdl_expand, **launch,
        )

    if base is not None and _fork(T, x.device):
        # side stream: the delta into d while the base GEMM runs; then y += d on adapter rows. d is kept in
        # x's dtype (half the bytes of fp32 at prefill-sized T; the delta is rounded once more, to 16 bits)
        d = torch.empty(T, slice_offsets[-1], dtype=x.dtype, device=x.device)
        with _beside(base, x.device):
            if split:
                shrink()
            expand(d, accumulate=False)
        n_out = slice_offsets[-1]
        _lora_add_kernel[(triton.cdiv(T, ADD_BLOCK_T), triton.cdiv(n_out, ADD_BLOCK_N))](
            y, d, token_slot, T, n_out, S, y.stride(0), y.stride(1), d.stride(0),
            BLOCK_T=ADD_BLOCK_T, BLOCK_N=ADD_BLOCK_N, num_warps=4,
        )
        return y
    if base is not None:
        base()
    if split and not given:
        shrink()
    expand(y, accumulate=True)
    return y
