"""Turns a ScheduledBatch into device tensors, runs the model, samples.

Host metadata is built as Python lists, then moved as pinned tensors with non-blocking copies on CUDA.
The forward itself never syncs with the host; the one sync per step is copying the sampled ids back
(`StepResult.ids` is a host list).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from lorax.inference.context import ForwardContext, forward_context
from lorax.inference.kv_cache import DUMMY_BLOCK
from lorax.inference.lora_pool import LoraPool
from lorax.inference.models.decoder import DecoderLM
from lorax.inference.sampler import SampleOutput, SamplingBatch, sample
from lorax.inference.scheduler import ScheduledBatch
from lorax.inference.sequence import Sequence
from lorax.kernels.registry import KernelOps


@dataclass
class StepResult:
    seqs: list[Sequence]  # the sequences that sampled a token this step, in row order
    ids: list[int]
    logprob: list[float] | None = None
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None


class DecodeGraphs(Protocol):
    """What the runner needs from a CUDA-graph runner (inference/graph.py GraphRunner)."""

    def can_run(self, batch: ScheduledBatch) -> bool: ...

    def forward_logits(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence]]: ...


class ModelRunner:
    def __init__(
        self, model: DecoderLM, block_size: int, device: torch.device, ops: KernelOps, pool: LoraPool | None
    ) -> None:
        self.model = model
        self.ops = ops
        self.pool = pool
        self.block_size = block_size
        self.device = device
        self.pin = device.type == "cuda"
        self.graphs: DecodeGraphs | None = None  # set by the engine once decode graphs are captured

    def _tensor(self, values: list[int] | list[float] | list[list[int]], dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(values, dtype=dtype, pin_memory=self.pin)
        return t.to(self.device, non_blocking=True)

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, ForwardContext, list[Sequence]]:
        """-> input_ids [T], the step's ForwardContext, and the sequences whose last row is sampled."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        token_slot: list[int] = []
        qsl = [0]
        context_lens: list[int] = []
        logits_rows: list[int] = []
        sampled: list[Sequence] = []
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            start, end = seq.num_computed, seq.num_computed + n
            input_ids.extend(seq.tokens[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            token_slot.extend([seq.slot] * n)
            qsl.append(qsl[-1] + n)
            context_lens.append(end)
            if end == seq.num_tokens:  # the chunk reaches the last token: sample the next one
                logits_rows.append(qsl[-1] - 1)
                sampled.append(seq)
        seq_slots = {seq.slot for seq in batch.seqs}  # per sequence, not per token: host work O(B)
        has_lora = self.pool is not None and self.pool.has_slabs and any(s >= 0 for s in seq_slots)
        width = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [DUMMY_BLOCK] * (width - len(s.block_table)) for s in batch.seqs]
        token_slot_t = self._tensor(token_slot, torch.int32)
        ctx = ForwardContext(
            positions=self._tensor(positions, torch.int64),
            slot_mapping=self._tensor(slots, torch.int64),
            block_tables=self._tensor(tables, torch.int32),
            context_lens=self._tensor(context_lens, torch.int32),
            query_start_loc=self._tensor(qsl, torch.int32),
            logits_indices=self._tensor(logits_rows, torch.int64),
            token_slot=token_slot_t,
            has_lora=has_lora,
            is_decode=batch.is_decode,
            num_tokens=len(input_ids),
            max_query_len=max(batch.num_new),
        )
        if has_lora and self.pool is not None:
            ctx.slot_rank = self.pool.slot_rank
            ctx.moe_shared = any(self.pool.slot_shared[s] for s in seq_slots if s >= 0)
            ctx.active_slots = sum(1 for s in seq_slots if s >= 0)
            if self.ops.name == "triton":  # the reference ignores it; the Triton kernels share it per step
                from lorax.kernels.lora_sgemm import build_lora_batch

                ctx.lora_batch = build_lora_batch(token_slot_t, self.pool.S)
        return self._tensor(input_ids, torch.int64), ctx, sampled

    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        params = [s.sampling for s in seqs]
        temps = [float(p.temperature) for p in params]
        want = [p.logprobs for p in params if p.logprobs is not None]
        return SamplingBatch(
            temperature=self._tensor(temps, torch.float32),
            top_k=self._tensor([int(p.top_k) for p in params], torch.int64),
            top_p=self._tensor([float(p.top_p) for p in params], torch.float32),
            min_p=self._tensor([float(p.min_p) for p in params], torch.float32),
            seed=self._tensor([s.seed for s in seqs], torch.int64),
            position=self._tensor([s.num_tokens for s in seqs], torch.int64),
            all_greedy=all(t == 0 for t in temps),
            need_filter=any(p.temperature > 0 and (p.top_k > 0 or p.top_p < 1 or p.min_p > 0) for p in params),
            max_logprobs=max(want) if want else -1,
        )

    @torch.inference_mode()
    def forward_logits(self, batch: ScheduledBatch, all_rows: bool = False) -> tuple[torch.Tensor, list[Sequence]]:
        """Run the model; -> fp32 logits [N, V] of the rows to sample (every row with all_rows), and the
        sequences those rows sample for. Decode steps replay a CUDA graph when one fits the batch."""
        if not all_rows and self.graphs is not None and self.graphs.can_run(batch):
            return self.graphs.forward_logits(batch)
        input_ids, ctx, sampled = self.prepare(batch)
        with forward_context(ctx):
            hidden = self.model(input_ids)
        return self.model.compute_logits(hidden if all_rows else hidden[ctx.logits_indices]), sampled

    @torch.inference_mode()
    def step(self, batch: ScheduledBatch) -> StepResult:
        logits, sampled = self.forward_logits(batch)
        if not sampled:
            return StepResult([], [])
        out: SampleOutput = sample(logits, self._sampling_batch(sampled))
        if out.logprob is None:
            return StepResult(sampled, out.ids.tolist())  # the step's one device->host sync
        # With logprobs, everything travels in one fp32 copy: [ids | logprob | top ids | top logprobs]
        # (token ids < 2^24 are exact in fp32).
        cols = [out.ids.float()[:, None], out.logprob[:, None]]
        if out.top_ids is not None and out.top_logprobs is not None:
            cols += [out.top_ids.float(), out.top_logprobs]
        rows = torch.cat(cols, dim=1).tolist()
        k = (len(rows[0]) - 2) // 2
        result = StepResult(sampled, [int(r[0]) for r in rows], logprob=[r[1] for r in rows])
        if k > 0:
            result.top_ids = [[int(t) for t in r[2 : 2 + k]] for r in rows]
            result.top_logprobs = [r[2 + k :] for r in rows]
        return result
