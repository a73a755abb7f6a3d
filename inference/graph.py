"""CUDA graphs for decode steps: one graph per batch-size bucket, any mix of adapters, ranks and layouts.

The GraphRunner owns one typed record of static buffers (`DecodeBuffers`), allocated once at the size of
the largest bucket before the graphs are captured. Each replay copies the step's host metadata into
them in place (one pinned staging tensor, one non-blocking copy) and replays the bucket's graph; the
buffers are never trimmed or re-allocated, so every captured kernel keeps reading the right memory.

Why one graph per bucket is enough for every adapter mix: adapter weights live in the LoRA pool's slab,
which is allocated once and updated in place (a slot is loaded with `copy_` and zeroed on eviction), and
per-token adapter choice is the `token_slot` buffer (-1 = none). Ranks up to `max_lora_rank` are
zero-padded in the slab, so rank changes nothing either. Kernels exit early on slots with no tokens.

Padded rows (a batch of 5 replayed in the bucket of 8) write their K/V into the reserved dummy block,
attend over that one dummy slot, and use adapter slot -1; their logits are never read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from lorax.inference.context import ForwardContext, forward_context
from lorax.inference.kv_cache import DUMMY_BLOCK
from lorax.inference.lora_pool import LoraPool
from lorax.inference.models.decoder import DecoderLM
from lorax.inference.scheduler import ScheduledBatch
from lorax.inference.sequence import Sequence

log = logging.getLogger("lorax.graph")


def graph_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every 16 up to max_num_seqs (which is always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    sizes.append(max_num_seqs)
    return sorted(set(sizes))


@dataclass
class DecodeBuffers:
    """Static inputs of every decode graph (N = the largest bucket, MB = blocks per sequence)."""

    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    slot_mapping: torch.Tensor  # [N] int64, padded rows -> a slot of the dummy block
    context_lens: torch.Tensor  # [N] int32, padded rows -> 1
    token_slot: torch.Tensor  # [N] int32, -1 = no adapter (and every padded row)
    block_tables: torch.Tensor  # [N, MB] int32, unused entries -> the dummy block
    query_start_loc: torch.Tensor  # [N + 1] int32, constant 0..N (one token per sequence)
    logits_indices: torch.Tensor  # [N] int64, constant 0..N-1

    @classmethod
    def allocate(cls, n: int, max_blocks: int, device: torch.device) -> DecodeBuffers:
        def zeros(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(
            input_ids=zeros(n, dtype=torch.int64),
            positions=zeros(n, dtype=torch.int64),
            slot_mapping=zeros(n, dtype=torch.int64),
            context_lens=torch.ones(n, dtype=torch.int32, device=device),
            token_slot=torch.full((n,), -1, dtype=torch.int32, device=device),
            block_tables=torch.full((n, max_blocks), DUMMY_BLOCK, dtype=torch.int32, device=device),
            query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=device),
            logits_indices=torch.arange(n, dtype=torch.int64, device=device),
        )

    def context(self, bs: int, has_lora: bool) -> ForwardContext:
        """The ForwardContext a bucket of `bs` rows is captured with: views into the static buffers."""
        return ForwardContext(
            positions=self.positions[:bs],
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            context_lens=self.context_lens[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            logits_indices=self.logits_indices[:bs],
            token_slot=self.token_slot[:bs],
            has_lora=has_lora,
            is_decode=True,
            num_tokens=bs,
            max_query_len=1,
        )


class GraphRunner:
    """Captures decode graphs for each bucket (largest first, one memory pool) and replays them."""

    def __init__(
        self,
        model: DecoderLM,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
        pool: LoraPool | None = None,
    ) -> None:
        self.model = model
        # Captured with LoRA on whenever the engine has adapter slabs at all (kernels skip empty slots).
        self.pool = pool if pool is not None and pool.has_slabs else None
        self.has_lora = self.pool is not None
        self.block_size = block_size
        self.device = device
        self.buckets = graph_buckets(max_num_seqs)
        self.max_blocks = -(-max_model_len // block_size)
        self.bufs = DecodeBuffers.allocate(self.buckets[-1], self.max_blocks, device)
        self._scalar_cols = 5  # input_ids, positions, slot_mapping, context_lens, token_slot
        self._staging = torch.zeros(
            self.buckets[-1] * (self._scalar_cols + self.max_blocks),
            dtype=torch.int64,
            pin_memory=device.type == "cuda",
        )
        # The staging tensor is rewritten every step; that is safe because each step ends with the
        # copy of the sampled ids back to the host, after which the previous async copies are done.
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # bucket -> static fp32 logits [bs, V]
        self.mempool: Any = None  # one memory pool shared by every bucket's graph

    @torch.inference_mode()
    def capture(self, progress: bool = True) -> None:
        before = torch.cuda.memory_allocated(self.device)
        free_before = torch.cuda.mem_get_info(self.device)[0]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        sizes = sorted(self.buckets, reverse=True)  # largest first: later graphs reuse its pool memory
        with torch.cuda.stream(stream):
            for bs in tqdm(sizes, desc="capturing CUDA graphs", disable=not progress, leave=False):
                ctx = self.bufs.context(bs, self.has_lora)
                ids = self.bufs.input_ids[:bs]
                self._forward(ctx, ids)  # warm-up outside the graph: JIT compilation, lazy init
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.mempool, stream=stream):
                    self.logits[bs] = self._forward(ctx, ids)
                if self.mempool is None:
                    self.mempool = graph.pool()
                self.graphs[bs] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        log.info(
            "captured %d decode graphs (batch sizes %s): %.1f MiB of graph memory (%.1f MiB allocated)",
            len(self.graphs), self.buckets, used / 2**20,
            (torch.cuda.memory_allocated(self.device) - before) / 2**20,
        )

    def _forward(self, ctx: ForwardContext, ids: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            # The adapter batch (tokens grouped by slot) is built inside the graph from the token_slot
            # buffer, so each replay regroups whatever mix of adapters the step carries.
            from lorax.kernels.lora_sgemm import build_lora_batch

            ctx.slot_rank = self.pool.slot_rank
            ctx.lora_batch = build_lora_batch(ctx.token_slot, self.pool.S)
        with forward_context(ctx):
            return self.model.compute_logits(self.model(ids))

    def bucket_for(self, n: int) -> int | None:
        for bs in self.buckets:
            if bs >= n:
                return bs
        return None

    def can_run(self, batch: ScheduledBatch) -> bool:
        return batch.is_decode and bool(self.graphs) and self.bucket_for(len(batch.seqs)) is not None

    def _fill(self, seqs: list[Sequence], bs: int) -> None:
        """Write the step's metadata into the static buffers: host lists -> pinned -> one async copy each."""
        n, blk = len(seqs), self.block_size
        cols, mb = self._scalar_cols, self.max_blocks
        host = self._staging[: bs * (cols + mb)]
        scalars = host[: bs * cols].view(cols, bs)
        tables = host[bs * cols :].view(bs, mb)
        dummy_slot = DUMMY_BLOCK * blk
        ids, pos, slots, lens, adapters = [], [], [], [], []
        for seq in seqs:
            p = seq.num_tokens - 1  # the one new token of a decode step
            ids.append(seq.tokens[p])
            pos.append(p)
            slots.append(seq.block_table[p // blk] * blk + p % blk)
            lens.append(p + 1)
            adapters.append(seq.slot)
        pad = bs - n
        scalars[0, :] = torch.tensor(ids + [0] * pad)
        scalars[1, :] = torch.tensor(pos + [0] * pad)
        scalars[2, :] = torch.tensor(slots + [dummy_slot] * pad)
        scalars[3, :] = torch.tensor(lens + [1] * pad)
        scalars[4, :] = torch.tensor(adapters + [-1] * pad)
        tables.fill_(DUMMY_BLOCK)
        for row, seq in enumerate(seqs):
            tables[row, : len(seq.block_table)] = torch.tensor(seq.block_table)
        b = self.bufs
        dev = scalars.to(self.device, non_blocking=True)
        b.input_ids[:bs].copy_(dev[0], non_blocking=True)
        b.positions[:bs].copy_(dev[1], non_blocking=True)
        b.slot_mapping[:bs].copy_(dev[2], non_blocking=True)
        b.context_lens[:bs].copy_(dev[3], non_blocking=True)
        b.token_slot[:bs].copy_(dev[4], non_blocking=True)
        b.block_tables[:bs].copy_(tables.to(self.device, non_blocking=True), non_blocking=True)

    def forward_logits(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence]]:
        """Replay the bucket's graph for a decode batch -> fp32 logits [n, V] (a view) and its sequences."""
        seqs = batch.seqs
        bs = self.bucket_for(len(seqs))
        assert bs is not None and batch.is_decode
        self._fill(seqs, bs)
        self.graphs[bs].replay()
        return self.logits[bs][: len(seqs)], seqs
