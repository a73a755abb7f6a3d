"""Continuous batching: chunked prefill, preemption when KV blocks run out, sequence limits, and the
block allocator. The reference is always the same request run without the constraint (or transformers)."""

from __future__ import annotations

import pytest
import torch

from lorax.inference import LLM, GenerateRequest, SamplingParams
from lorax.inference.kv_cache import DUMMY_BLOCK, BlockAllocator

from .tiny_models import ENGINE, hf_greedy

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22], [30] * 7, [40, 41]]
NEW = 8


def _reqs(sp: SamplingParams) -> list[GenerateRequest]:
    return [GenerateRequest(str(i), prompt_token_ids=p, sampling=sp) for i, p in enumerate(PROMPTS)]


GREEDY = SamplingParams(max_tokens=NEW, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=NEW, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)

# engine options that force a code path, each compared with the unconstrained engine
CONSTRAINED = {
    "chunked_prefill": dict(max_num_batched_tokens=4),
    "one_seq_at_a_time": dict(max_num_seqs=1),
    "preemption": dict(num_kv_blocks=7, block_size=4),  # 6 usable blocks = 24 slots for 4 x ~20 tokens
    "tiny_blocks": dict(block_size=1),
}


@pytest.mark.parametrize("name", list(CONSTRAINED))
def test_constrained_engine_gives_the_same_tokens(name: str, qwen3_moe: tuple) -> None:
    hf, path = qwen3_moe
    base = LLM(str(path), **ENGINE, max_model_len=24)
    llm = LLM(str(path), **ENGINE, max_model_len=24, **CONSTRAINED[name])
    for sp in (GREEDY, SEEDED):
        want = [o.token_ids for o in base.generate(_reqs(sp))]
        got = [o.token_ids for o in llm.generate(_reqs(sp))]
        assert got == want, f"{name} with {sp}"
    assert [o.token_ids for o in llm.generate(_reqs(GREEDY))] == [hf_greedy(hf, p, NEW) for p in PROMPTS]
    if name == "preemption":
        assert llm.stats["preemptions"] > 0, "the preemption case did not preempt"
    assert llm.kv_cache.allocator.num_free == llm.kv_cache.num_blocks - 1  # every block came back


def test_chunked_prefill_logits_equal_unchunked(qwen3_moe: tuple) -> None:
    _, path = qwen3_moe
    whole = LLM(str(path), **ENGINE, max_model_len=32)
    chunked = LLM(str(path), **ENGINE, max_model_len=32, max_num_batched_tokens=3, block_size=2)
    req = GenerateRequest("x", prompt_token_ids=PROMPTS[0])
    a, b = whole.prompt_logits(req), chunked.prompt_logits(req)
    assert a.shape == b.shape == (len(PROMPTS[0]), 96)
    assert torch.allclose(a, b, rtol=0, atol=1e-5 * a.abs().max().item())


def test_generation_stops_at_max_model_len(qwen3_moe: tuple) -> None:
    _, path = qwen3_moe
    llm = LLM(str(path), **ENGINE, max_model_len=16)
    out = llm.generate([GenerateRequest("a", prompt_token_ids=PROMPTS[0], sampling=SamplingParams(max_tokens=50))])[0]
    assert len(out.token_ids) == 16 - len(PROMPTS[0]) and out.finish_reason == "length"


def test_step_api_streams_finished_requests(qwen3_moe: tuple) -> None:
    _, path = qwen3_moe
    llm = LLM(str(path), **ENGINE, max_model_len=32)
    for i, n in enumerate([2, 5]):
        llm.add_request(GenerateRequest(f"r{i}", prompt_token_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=n, ignore_eos=True)))
    done: list[tuple[int, str]] = []
    steps = 0
    while llm.has_unfinished():
        steps += 1
        done += [(steps, o.request_id) for o in llm.step()]
    assert [r for _, r in done] == ["r0", "r1"]
    assert done[0][0] < done[1][0]  # r0 finished in an earlier step than r1


def test_block_allocator_never_hands_out_the_dummy_block() -> None:
    alloc = BlockAllocator(5)
    blocks = alloc.allocate(4)
    assert DUMMY_BLOCK not in blocks and sorted(blocks) == [1, 2, 3, 4] and alloc.num_free == 0
    with pytest.raises(RuntimeError):
        alloc.allocate(1)
    alloc.free(blocks[:2])
    assert alloc.num_free == 2
