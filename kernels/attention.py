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
"""

from __future__ import annotations

import torch


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
) -> torch.Tensor:
    T, n_h, D = q.shape
    bs, n_kv = k_cache.shape[1], k_cache.shape[2]
    group = n_h // n_kv
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
