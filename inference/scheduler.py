"""Continuous batching with chunked prefill, admission by free KV blocks, preemption, and adapter-aware
admission.

Each step is either a prefill step (chunks of prompts, unfinished chunked prefills first, then new
requests up to max_num_batched_tokens / max_num_seqs) or, when no prefill work can run, a decode step
over every running sequence. Pure decode steps are what CUDA graphs replay.

Adapters: a waiting request is admitted only when its adapter has a slot (already loaded, free, or
idle and evictable). Requests whose adapter cannot get a slot are skipped, not blocking the queue, so
requests for resident adapters keep flowing and slots are not thrashed; once a slot's requests drain it
becomes idle and the next adapter takes it.

Preemption (out of KV blocks during decode): the most recently admitted sequence gives back its blocks
and its slot and returns to the front of the queue; it is recomputed later (prompt + outputs so far).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from lorax.inference.kv_cache import BlockAllocator
from lorax.inference.lora_pool import LoraPool
from lorax.inference.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new: list[int]  # tokens each sequence feeds this step
    is_decode: bool


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        pool: LoraPool | None,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.allocator = allocator
        self.pool = pool
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- blocks ----------------------------------------------------------------------------------
    def _blocks_needed(self, seq: Sequence, num_new: int) -> int:
        total = -(-(seq.num_computed + num_new) // self.block_size)
        return max(0, total - len(seq.block_table))

    def _grow(self, seq: Sequence, num_new: int) -> bool:
        need = self._blocks_needed(seq, num_new)
        if need > self.allocator.num_free:
            return False
        seq.block_table.extend(self.allocator.allocate(need))
        return True

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_table)
        seq.block_table = []
        if self.pool is not None and seq.slot >= 0:
            self.pool.release(seq.slot)
        seq.slot = -1

    def finish(self, seq: Sequence) -> None:
        """Called by the engine when a running sequence is done."""
        seq.status = Status.FINISHED
        self._release(seq)
        self.running.remove(seq)

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        self.running.remove(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ---- scheduling ------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        while True:
            batch = self._schedule_prefill() or self._schedule_decode()
            if batch is not None or not self.running:
                return batch
            # Only chunked prefills are running and none can grow: free the newest one's blocks.
            self._preempt(self.running[-1])

    def _schedule_prefill(self) -> ScheduledBatch | None:
        seqs: list[Sequence] = []
        num_new: list[int] = []
        budget = self.max_tokens
        # 1. chunked prefills already running go first (they hold blocks and a slot)
        for seq in self.running:
            if budget <= 0:
                break
            if seq.in_prefill:
                n = min(seq.num_uncomputed, budget)
                if not self._grow(seq, n):
                    break
                seqs.append(seq)
                num_new.append(n)
                budget -= n
        # 2. admit waiting requests while tokens, sequence slots and blocks last
        skipped: list[Sequence] = []
        blocked: set[str] = set()  # adapters that found no slot in this call (skip without asking again)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget)
            if seq.adapter in blocked:
                skipped.append(self.waiting.popleft())
                continue
            if self._blocks_needed(seq, n) > self.allocator.num_free:
                break  # keep arrival order for blocks: later requests do not jump a long prompt
            slot = -1
            if seq.adapter is not None and self.pool is not None:
                got = self.pool.acquire(seq.adapter)
                if got is None:  # every slot pinned by other adapters' running requests
                    blocked.add(seq.adapter)
                    skipped.append(self.waiting.popleft())
                    continue
                slot = got
            self.waiting.popleft()
            seq.slot = slot
            self._grow(seq, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            num_new.append(n)
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        if not seqs:
            return None
        return ScheduledBatch(seqs, num_new, is_decode=False)

    def _schedule_decode(self) -> ScheduledBatch | None:
        scheduled: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or seq.in_prefill:
                continue
            while not self._grow(seq, 1):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(seq)
        scheduled = [s for s in scheduled if s.status is Status.RUNNING]
        if not scheduled:
            return None
        return ScheduledBatch(scheduled, [1] * len(scheduled), is_decode=True)

    def commit(self, batch: ScheduledBatch) -> None:
        """After the forward: the fed tokens are now in the KV cache."""
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            seq.num_computed += n
