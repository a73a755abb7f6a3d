"""Attention over a paged KV cache: KV store, prefill (varlen, causal) and decode, with GQA.

Cache layout (per layer): k_cache, v_cache [num_blocks, block_size, n_kv, D]; a token's cache slot is
block * block_size + offset. Contracts of the Triton kernels and the references:

`store_kv(k, v, k_cache, v_cache, slot_mapping)`:
    k, v [T, n_kv, D]; slot_mapping [T] int64, -1 = do not store (padded rows).

`paged_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale)`:
    q [T, n_h, D] (n_h a multiple of n_kv); sequences b = 0..B-1 own query rows
    [query_start_loc[b], query_start_loc[b+1]); context_lens [B] int32 counts the cached tokens of b
    *including* this step's (already stored); block_tables [B, max_blocks] int32.
    Query row i of sequence b sits at position context_lens[b] - q_len_b + i and attends to every key
    at a position <= its own (causal). A sequence with q_len 0 produces nothing. Returns [T, n_h, D].
    Decode is the case q_len == 1 for every sequence; prefill chunks (with earlier chunks already
    in the cache) are the general case.
    Keyword hints both backends accept (the reference ignores all but `out`): max_query_len (host
    bound; 1 = decode kernel), max_context_len, num_splits, out (preallocated [T, n_h, D]; rows of no
    sequence are left as they are), workspace (split-K decode scratch), k_new / v_new (this step's keys
    and values [T, n_kv, D] beside their query rows, as stored in the cache: the prefill kernel reads
    them there instead of through the block table). See `paged_attention`.
"""

from __future__ import annotations

import functools

import torch
import triton

from lorax.kernels._common import dot_precision, interpreting
from lorax.kernels.attention_kernels import (
    _decode_kernel,
    _decode_reduce_kernel,
    _prefill_kernel,
    _store_kv_kernel,
)
from lorax.kernels.lora_sgemm import tuned_config


def store_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    nb, bs = k_cache.shape[:2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(nb * bs, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(nb * bs, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    max_query_len: int | None = None,
    max_context_len: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference (host-synchronising). The keyword arguments are the Triton path's hints, accepted so
    that layers call either backend the same way; `out` is honoured (rows of no sequence untouched)."""
    T, n_h, D = q.shape
    bs, n_kv = k_cache.shape[1], k_cache.shape[2]
    group = n_h // n_kv
    if out is None:
        out = torch.zeros_like(q)
    starts = query_start_loc.tolist()
    lens = context_lens.tolist()
    tables = block_tables.tolist()
    for b in range(len(lens)):
        q0, q1, ctx = starts[b], starts[b + 1], lens[b]
        qlen = q1 - q0
        if qlen <= 0 or ctx <= 0:
            continue
        nblk = -(-ctx // bs)
        blocks = torch.tensor(tables[b][:nblk], dtype=torch.long, device=q.device)
        keys = k_cache[blocks].reshape(nblk * bs, n_kv, D)[:ctx].float()
        vals = v_cache[blocks].reshape(nblk * bs, n_kv, D)[:ctx].float()
        keys = keys.repeat_interleave(group, dim=1)  # [ctx, n_h, D]
        vals = vals.repeat_interleave(group, dim=1)
        qs = q[q0:q1].float()  # [qlen, n_h, D]
        scores = torch.einsum("qhd,khd->hqk", qs, keys) * scale
        qpos = torch.arange(ctx - qlen, ctx, device=q.device)
        kpos = torch.arange(ctx, device=q.device)
        scores = scores.masked_fill(kpos[None, None, :] > qpos[None, :, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, vals).to(q.dtype)
    return out


# ----------------------------------------------------------------------------------------------
# store_kv
# ----------------------------------------------------------------------------------------------


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Triton `store_kv`: one program per token row; rows with slot -1 exit at once."""
    if k.dim() != 3 or k.shape != v.shape or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"store_kv: k/v [T, n_kv, D] and caches [blocks, bs, n_kv, D] expected, got "
                         f"{tuple(k.shape)} {tuple(v.shape)} {tuple(k_cache.shape)} {tuple(v_cache.shape)}")
    if k_cache.shape[2:] != k.shape[1:] or k_cache.stride() != v_cache.stride():
        raise ValueError("store_kv: cache heads/dim differ from k/v, or k_cache and v_cache strides differ")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != torch.int64:
        raise ValueError(f"store_kv: slot_mapping must be [T={k.shape[0]}] int64")
    T, n_kv, D = k.shape
    if T == 0:
        return
    _store_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        n_kv, D, k_cache.shape[1],
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        BLOCK_H=triton.next_power_of_2(n_kv), BLOCK_D=triton.next_power_of_2(D),
    )


# ----------------------------------------------------------------------------------------------
# Prefill (varlen, causal, chunked: earlier chunks already in the cache)
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Decode (one query per sequence, paged, GQA heads of a KV head packed into one tile, split-K)
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

LOG2E = 1.4426950408889634


@functools.lru_cache(maxsize=8)
def _num_sms(device: str) -> int:
    if device.startswith("cuda") and not interpreting():
        return torch.cuda.get_device_properties(torch.device(device)).multi_processor_count
    return 4


# Fewest keys a decode split takes (rounded up to the kernel's BLOCK_N). A decode program is a short chain of
# dependent loads (block table, then K / V tiles), so at small batch many short splits beat a few long ones:
# on an H100, batch 1 with 1024 cached keys took 5.7 us in 32 splits of 32 keys against 8.8 us in 4 of 256.
DECODE_MIN_KEYS = 32


def decode_splits(batch: int, n_kv: int, ctx_bound: int, device: torch.device | str) -> int:
    """Decode split count, >= DECODE_MIN_KEYS keys a split and <= 128 splits: with few (sequence, KV head) pairs
    (under half the SMs) enough splits for two programs per SM, else for one (a split costs the partials' writes
    and the reduce launch: on an H100 batch 64 with 1024 keys took 51 us in one split against 62 us in two,
    batch 8 9.8 us in 16 splits against 12.1 in 5). The kernel spreads each sequence's own context over them.

    Depends only on host values (batch, KV heads, the context bound), so a CUDA-graph bucket keeps it,
    and `decode_workspace_size(batch, n_h, D, decode_splits(...))` sizes its static workspace.
    """
    sms = _num_sms(str(device))
    pairs = max(1, batch * n_kv)
    target = 2 * sms if 2 * pairs < sms else sms
    return max(1, min(triton.cdiv(target, pairs), triton.cdiv(ctx_bound, DECODE_MIN_KEYS), 128))


def decode_workspace_size(batch: int, n_h: int, head_dim: int, num_splits: int) -> int:
    """fp32 elements of the split-K workspace (`workspace=` of `paged_attention`)."""
    return batch * n_h * num_splits * (head_dim + 2)


def _check_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(f"paged_attention: q [T, n_h, D] and equal caches [blocks, bs, n_kv, D] expected, got "
                         f"{tuple(q.shape)} {tuple(k_cache.shape)} {tuple(v_cache.shape)}")
    n_h, D = q.shape[1], q.shape[2]
    n_kv = k_cache.shape[2]
    if k_cache.shape[3] != D or n_h % n_kv:
        raise ValueError(f"paged_attention: head dim {D} vs cache {k_cache.shape[3]}, or {n_h} heads not a multiple of {n_kv}")
    B = context_lens.shape[0]
    for name, t, shape in (("block_tables", block_tables, (B, block_tables.shape[-1])),
                           ("context_lens", context_lens, (B,)), ("query_start_loc", query_start_loc, (B + 1,))):
        if t.dtype != torch.int32 or tuple(t.shape) != shape:
            raise ValueError(f"paged_attention: {name} must be int32 {shape}, got {t.dtype} {tuple(t.shape)}")


def _check_new_kv(k_new: torch.Tensor | None, v_new: torch.Tensor | None, q: torch.Tensor, n_kv: int) -> bool:
    """Whether this step's keys come in k_new / v_new (both or neither, shaped and typed as the kernel reads them)."""
    if k_new is None and v_new is None:
        return False
    want = (q.shape[0], n_kv, q.shape[2])
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if t is None or tuple(t.shape) != want or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"paged_attention: k_new and v_new must both be {want} {q.dtype} on {q.device}, got "
                             f"{name} {None if t is None else (tuple(t.shape), t.dtype, t.device)}")
    assert k_new is not None and v_new is not None
    if k_new.stride(2) != v_new.stride(2):
        raise ValueError(f"paged_attention: k_new and v_new need one stride along D, got {k_new.stride(2)} and "
                         f"{v_new.stride(2)}")
    return True


def new_kv_from_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      context_lens: torch.Tensor, query_start_loc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_new, v_new) [T, n_kv, D]: each query row's own key and value, gathered from the cache (host-synchronising;
    for benchmarks and tests; the engine has them from its qkv projection)."""
    bs = k_cache.shape[1]
    starts = query_start_loc.tolist()
    T = starts[-1]
    rows = torch.zeros(T, dtype=torch.long)
    for b, ctx in enumerate(context_lens.tolist()):
        q0, q1 = starts[b], starts[b + 1]
        pos = torch.arange(ctx - (q1 - q0), ctx)
        rows[q0:q1] = block_tables[b].cpu().long()[pos // bs] * bs + pos % bs
    rows = rows.to(k_cache.device)
    flat = (k_cache.shape[0] * bs, *k_cache.shape[2:])
    return k_cache.reshape(flat)[rows].to(k_cache.dtype), v_cache.reshape(flat)[rows].to(v_cache.dtype)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    max_query_len: int | None = None,
    max_context_len: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Triton `paged_attention` (contract at the top of this file).

    max_query_len: host bound on any sequence's query count. 1 selects the decode kernel (split-K);
        anything else (or None: bound T) the prefill kernel, whose grid is sized from the bound.
    max_context_len: host bound on context_lens for sizing decode splits (default: the block table's
        width times the block size).
    num_splits: the decode split count (default `decode_splits`; a graph runner may fix it).
    out: [T, n_h, D] output buffer; rows outside every sequence are not written (a fresh output is
        zero-filled, so they read 0 as in the reference).
    workspace: fp32 buffer of >= decode_workspace_size(B, n_h, D, splits) elements for split decode.
    k_new, v_new: [T, n_kv, D] in q's dtype, unit stride along D (any row / head strides): row i holds the key
        and value of query row i's token, the values the cache holds for it (the engine passes rope_store's
        rotated k and the qkv output's v). The prefill kernel then reads this step's keys from them, a plain
        causal attention over the sequence's new rows, and only the earlier (cached) keys through the block
        table (measured tiles: attention.json's "prefill_kv_*" entries, else BLOCK_M 64 x BLOCK_N 64, 4 warps,
        3 stages). Ignored by the decode kernel (one key per sequence).
    config: block sizes overriding the defaults (BLOCK_M, BLOCK_N, num_warps, num_stages); without it,
        a measured entry of kernels/configs/attention.json for this GPU and head shape is used.
    """
    _check_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc)
    if not float(scale) > 0:  # the kernels scale the running max, which needs a positive scale
        raise ValueError(f"paged_attention: scale must be positive, got {scale}")
    T, n_h, D = q.shape
    B, bs, n_kv = context_lens.shape[0], k_cache.shape[1], k_cache.shape[2]
    if out is None:
        out = torch.zeros_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"paged_attention: out must be {tuple(q.shape)} {q.dtype}")
    if T == 0 or B == 0:
        return out
    cast = interpreting()
    group = n_h // n_kv
    block_d = max(16, triton.next_power_of_2(D))  # tl.dot needs K >= 16; lanes past D are masked
    qk_scale = float(scale) * LOG2E
    common_strides = (
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        block_tables.stride(0),
    )
    if max_query_len != 1:
        new_kv = _check_new_kv(k_new, v_new, q, n_kv)
        kn, vn = (k_new, v_new) if k_new is not None and v_new is not None else (q, q)
        new_strides = (kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1), kn.stride(2)) if new_kv else (0,) * 5
        bound = T if max_query_len is None else min(int(max_query_len), T)
        # the two paths keep their own measured tables (their registers and best tiles differ)
        key = f"prefill_{'kv_' if new_kv else ''}D{D}_G{group}"
        tuned = tuned_config("attention.json", q.device, key, bound) if config is None else {}
        cfg = {"BLOCK_M": 16 if bound <= 16 or cast else 64, "BLOCK_N": 16 if cast else 64,
               "num_warps": 4, "num_stages": 1 if cast else 3, **tuned, **(config or {})}
        block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
        _prefill_kernel[(B, n_h, triton.cdiv(bound, block_m))](
            q, k_cache, v_cache, out, block_tables, context_lens, query_start_loc, kn, vn,
            qk_scale, bs, group, D,
            q.stride(0), q.stride(1), q.stride(2),
            *common_strides, *new_strides,
            NEW_KV=new_kv, CAST_FP32=cast, DOT_PREC=dot_precision(q.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            EVEN_D=block_d == D, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        return out

    tuned = tuned_config("attention.json", q.device, f"decode_D{D}_G{group}", B) if config is None else {}
    cfg = {"BLOCK_N": 16 if cast else 64, "num_warps": 4, "num_stages": 1 if cast else 3, **tuned, **(config or {})}
    block_n = cfg["BLOCK_N"]
    ctx_bound = max_context_len if max_context_len is not None else block_tables.shape[1] * bs
    ctx_bound = max(1, int(ctx_bound))
    splits = max(1, int(num_splits)) if num_splits is not None else decode_splits(B, n_kv, ctx_bound, q.device)
    # Each sequence's keys per split are worked out in the kernel from its own context, a whole number
    # of BLOCK_N and at least min_partition (DECODE_MIN_KEYS by default; one block when a caller forces the
    # split count); splits whose range starts past a context exit at once.
    min_partition = block_n if num_splits is not None else triton.cdiv(DECODE_MIN_KEYS, block_n) * block_n
    split = splits > 1
    if split:
        need = decode_workspace_size(B, n_h, D, splits)
        if workspace is None:
            workspace = torch.empty(need, dtype=torch.float32, device=q.device)
        elif workspace.dtype != torch.float32 or workspace.numel() < need:
            raise ValueError(f"paged_attention: workspace must be fp32 with >= {need} elements")
        part_o = workspace[: B * n_h * splits * D]
        part_ml = workspace[B * n_h * splits * D : need]
    else:
        part_o = part_ml = out  # unused
    _decode_kernel[(B, n_kv, splits)](
        q, k_cache, v_cache, out, part_o, part_ml, block_tables, context_lens, query_start_loc,
        qk_scale, bs, group, D, n_h, splits, min_partition,
        q.stride(0), q.stride(1), q.stride(2),
        *common_strides,
        SPLIT=split, CAST_FP32=cast, DOT_PREC=dot_precision(q.dtype), BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split:
        _decode_reduce_kernel[(B, n_h)](
            part_o, part_ml, out, context_lens, query_start_loc,
            D, n_h, splits, block_n, min_partition,
            out.stride(0), out.stride(1), out.stride(2),
            BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
        )
    return out
