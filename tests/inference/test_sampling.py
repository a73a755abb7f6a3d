"""Sampling: the device sampler against exact distributions, and the engine's stop / length rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorax.inference import LLM, GenerateRequest, SamplingParams
from lorax.inference.sampler import SamplingBatch, sample

from .tiny_models import ENGINE, hf_greedy, hf_logits

V = 8
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def _batch(n: int, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0, min_p: float = 0.0) -> SamplingBatch:
    return SamplingBatch(
        temperature=torch.full((n,), temperature),
        top_k=torch.full((n,), top_k, dtype=torch.int64),
        top_p=torch.full((n,), top_p),
        min_p=torch.full((n,), min_p),
        seed=torch.arange(n, dtype=torch.int64) * 7919 + 13,
        position=torch.full((n,), 5, dtype=torch.int64),
        all_greedy=temperature == 0,
        need_filter=top_k > 0 or top_p < 1 or min_p > 0,
        max_logprobs=-1,
    )


def _expected(temperature: float, keep: list[int]) -> torch.Tensor:
    p = torch.zeros(V)
    p[keep] = torch.softmax(LOGITS[keep] / temperature, dim=0)
    return p


# (options, tokens the filter keeps): probabilities of LOGITS at T=1 are about
# [.41 .25 .15 .09 .06 .03 .02 .00]
FILTER_CASES = [
    (dict(), list(range(V))),
    (dict(temperature=0.5), list(range(V))),
    (dict(top_k=3), [0, 1, 2]),
    (dict(top_p=0.7), [0, 1, 2]),  # mass before token 2 is .66 < .7, before token 3 is .81
    (dict(min_p=0.3), [0, 1, 2]),  # keeps p >= .3 * p_max (token 3 has .22 * p_max)
    (dict(top_k=2, top_p=0.5), [0, 1]),
]


@pytest.mark.parametrize(("opts", "keep"), FILTER_CASES)
def test_sampler_matches_the_filtered_distribution(opts: dict, keep: list[int]) -> None:
    n = 20000
    b = _batch(n, **opts)
    ids = sample(LOGITS.repeat(n, 1), b).ids
    freq = torch.bincount(ids, minlength=V).float() / n
    want = _expected(opts.get("temperature", 1.0), keep)
    assert set(ids.unique().tolist()) <= set(keep)
    assert (freq - want).abs().max() < 0.015, (freq, want)


def test_sampler_greedy_and_top_k_one() -> None:
    logits = torch.randn(16, 50)
    greedy = sample(logits, _batch(16, temperature=0.0)).ids
    assert torch.equal(greedy, logits.argmax(-1))
    assert torch.equal(sample(logits, _batch(16, temperature=1.3, top_k=1)).ids, greedy)


def test_sampler_logprobs() -> None:
    logits = torch.randn(4, 30)
    b = _batch(4, temperature=0.0)
    b.max_logprobs = 3
    out = sample(logits, b)
    ref = torch.log_softmax(logits, -1)
    assert torch.allclose(out.logprob, ref.gather(1, out.ids[:, None]).squeeze(1))
    assert out.top_ids is not None and out.top_logprobs is not None
    assert torch.equal(out.top_ids[:, 0], out.ids)
    assert torch.allclose(out.top_logprobs, ref.topk(3, dim=-1).values)


def _gen(llm: LLM, prompts: list[list[int]], sp: SamplingParams) -> list[list[int]]:
    outs = llm.generate([GenerateRequest(str(i), prompt_token_ids=p, sampling=sp) for i, p in enumerate(prompts)])
    return [o.token_ids for o in outs]


def test_seeded_sampling_is_reproducible_and_batch_independent(qwen3_moe: tuple) -> None:
    _, path = qwen3_moe
    llm = LLM(str(path), **ENGINE, max_model_len=64)
    sp = SamplingParams(max_tokens=10, temperature=1.0, seed=1234, ignore_eos=True)
    alone = _gen(llm, [[5, 6, 7]], sp)[0]
    batched = _gen(llm, [[1, 2], [5, 6, 7], [9] * 9], sp)[1]
    again = _gen(LLM(str(path), **ENGINE, max_model_len=64), [[5, 6, 7]], sp)[0]
    other = _gen(llm, [[5, 6, 7]], SamplingParams(max_tokens=10, temperature=1.0, seed=99, ignore_eos=True))[0]
    assert alone == batched == again
    assert alone != other


def test_top_k_one_equals_greedy(qwen3_moe: tuple) -> None:
    hf, path = qwen3_moe
    llm = LLM(str(path), **ENGINE, max_model_len=64)
    got = _gen(llm, [[3, 4, 5]], SamplingParams(max_tokens=8, temperature=0.8, top_k=1, ignore_eos=True))[0]
    assert got == hf_greedy(hf, [3, 4, 5], 8)


def test_max_tokens_eos_stop_ids_and_ignore_eos(qwen3_moe: tuple) -> None:
    hf, path = qwen3_moe
    prompt = [3, 4, 5]
    ref = hf_greedy(hf, prompt, 8)
    llm = LLM(str(path), **ENGINE, max_model_len=64)
    out = llm.generate([GenerateRequest("a", prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=3, ignore_eos=True))])[0]
    assert out.token_ids == ref[:3] and out.finish_reason == "length"
    # a stop token id ends generation at its first occurrence, and is part of the output
    stop_at = ref[2]
    first = ref.index(stop_at)
    sp = SamplingParams(max_tokens=8, stop_token_ids=[stop_at], ignore_eos=True)
    out = llm.generate([GenerateRequest("b", prompt_token_ids=prompt, sampling=sp)])[0]
    assert out.token_ids == ref[: first + 1] and out.finish_reason == "stop"
    # the tokenizer's eos (id 95) stops unless ignore_eos; force it to be produced by making it the argmax
    llm.eos_token_ids = frozenset({stop_at})
    out = llm.generate([GenerateRequest("c", prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=8))])[0]
    assert out.token_ids == ref[: first + 1] and out.finish_reason == "stop"
    out = llm.generate([GenerateRequest("d", prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=8, ignore_eos=True))])[0]
    assert out.token_ids == ref and out.finish_reason == "length"


def test_stop_strings_are_trimmed(qwen3_moe: tuple) -> None:
    hf, path = qwen3_moe
    llm = LLM(str(path), **ENGINE, max_model_len=64)
    prompt = "abc"
    ids = llm.tokenizer.encode(prompt)
    ref = hf_greedy(hf, ids, 10)
    full = llm.tokenizer.decode(ref)
    out = llm.generate([GenerateRequest("a", prompt=prompt, sampling=SamplingParams(max_tokens=10, ignore_eos=True))])[0]
    assert out.text == full and out.token_ids == ref
    stop = full[3:5]  # a two-character string that first appears at character `cut`
    cut = full.find(stop)
    sp = SamplingParams(max_tokens=10, stop=[stop, "never-there"], ignore_eos=True)
    out = llm.generate([GenerateRequest("b", prompt=prompt, sampling=sp)])[0]
    assert out.finish_reason == "stop"
    assert out.text == full[:cut]
    assert out.token_ids == ref[: cut + len(stop)]  # one character per token


def test_logprobs_match_transformers(qwen3_moe: tuple) -> None:
    hf, path = qwen3_moe
    llm = LLM(str(path), **ENGINE, max_model_len=64)
    prompt = [7, 8, 9, 10]
    sp = SamplingParams(max_tokens=3, logprobs=2, ignore_eos=True)
    out = llm.generate([GenerateRequest("a", prompt_token_ids=prompt, sampling=sp)])[0]
    assert out.logprobs is not None and len(out.logprobs) == 3
    ids = list(prompt)
    for lp in out.logprobs:
        ref = torch.log_softmax(hf_logits(hf, ids)[-1], -1)
        assert lp.token_id == int(ref.argmax())
        assert abs(lp.logprob - float(ref[lp.token_id])) < 1e-4
        assert [t for t, _ in lp.top] == ref.topk(2).indices.tolist()
        ids.append(lp.token_id)


def test_unseeded_requests_follow_the_engine_seed(qwen3_moe: tuple, tmp_path: Path) -> None:
    _, path = qwen3_moe
    sp = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
    a = _gen(LLM(str(path), **ENGINE, max_model_len=64, seed=3), [[1, 2, 3]] * 2, sp)
    b = _gen(LLM(str(path), **ENGINE, max_model_len=64, seed=3), [[1, 2, 3]] * 2, sp)
    assert a == b
    assert a[0] != a[1]  # two requests draw different seeds
