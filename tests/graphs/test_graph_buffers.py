"""CPU checks of the CUDA-graph runner's bookkeeping: buckets, static-buffer views, and the in-place fill
of per-step metadata (what a replay reads)."""

from __future__ import annotations

import pytest
import torch

from lorax.inference.graph import DecodeBuffers, GraphRunner, graph_buckets
from lorax.inference.kv_cache import DUMMY_BLOCK


@pytest.mark.parametrize(
    ("max_num_seqs", "expected"),
    [
        (1, [1]),
        (3, [1, 2, 3]),
        (8, [1, 2, 4, 8]),
        (20, [1, 2, 4, 8, 16, 20]),
        (64, [1, 2, 4, 8, 16, 32, 48, 64]),
        (70, [1, 2, 4, 8, 16, 32, 48, 64, 70]),
    ],
)
def test_buckets_cover_every_batch_size(max_num_seqs: int, expected: list[int]) -> None:
    buckets = graph_buckets(max_num_seqs)
    assert buckets == expected
    # every batch size 1..max has a bucket, and the smallest one that fits wastes < 16 rows past 8
    for n in range(1, max_num_seqs + 1):
        fit = min(b for b in buckets if b >= n)
        assert fit - n < max(n, 16)


def test_context_views_share_storage_with_static_buffers() -> None:
    bufs = DecodeBuffers.allocate(8, max_blocks=5, device=torch.device("cpu"))
    ctx = bufs.context(4, has_lora=True)
    assert ctx.num_tokens == 4 and ctx.is_decode and ctx.max_query_len == 1 and ctx.has_lora
    for view, full in [
        (ctx.positions, bufs.positions), (ctx.slot_mapping, bufs.slot_mapping),
        (ctx.token_slot, bufs.token_slot), (ctx.block_tables, bufs.block_tables),
        (ctx.context_lens, bufs.context_lens), (ctx.query_start_loc, bufs.query_start_loc),
    ]:
        assert view.data_ptr() == full.data_ptr(), "a captured view must alias the static buffer"
    assert ctx.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert ctx.block_tables.shape == (4, 5)
    assert bufs.token_slot.tolist() == [-1] * 8  # nothing is on an adapter until a step says so


class _Seq:
    def __init__(self, tokens: list[int], table: list[int], slot: int) -> None:
        self.tokens, self.block_table, self.slot = tokens, table, slot

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


class _Model(torch.nn.Module):
    pass


def test_fill_writes_step_metadata_and_pads_rows_onto_the_dummy_block() -> None:
    block = 4
    runner = GraphRunner(_Model(), max_num_seqs=8, max_model_len=32, block_size=block, device=torch.device("cpu"))
    seqs = [
        _Seq([5, 6, 7], [3], slot=1),  # next position 2 in block 3
        _Seq(list(range(9)), [2, 7, 4], slot=-1),  # position 8 -> block index 2 = block 4, offset 0
        _Seq([9] * 6, [1, 5], slot=0),  # position 5 -> block 5, offset 1
    ]
    bs = runner.bucket_for(len(seqs))
    assert bs == 4
    # stale values from an earlier, larger step must be overwritten, not left behind
    runner.bufs.token_slot.fill_(3)
    runner.bufs.block_tables.fill_(9)
    runner._fill(seqs, bs)
    b = runner.bufs
    assert b.input_ids[:bs].tolist() == [7, 8, 9, 0]
    assert b.positions[:bs].tolist() == [2, 8, 5, 0]
    assert b.slot_mapping[:bs].tolist() == [3 * block + 2, 4 * block + 0, 5 * block + 1, DUMMY_BLOCK * block]
    assert b.context_lens[:bs].tolist() == [3, 9, 6, 1]
    assert b.token_slot[:bs].tolist() == [1, -1, 0, -1]
    assert b.block_tables[0].tolist() == [3] + [DUMMY_BLOCK] * 7
    assert b.block_tables[1].tolist() == [2, 7, 4] + [DUMMY_BLOCK] * 5
    assert b.block_tables[3].tolist() == [DUMMY_BLOCK] * 8  # the padded row reads only the dummy block
