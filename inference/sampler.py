"""Sampling on the device: greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

Randomness is counter-based: the noise for (request seed, position, token id) is a hash of those three
numbers, turned into Gumbel noise, and the sample is argmax(logits / T + noise) over the tokens the
filters keep. So a request's tokens depend only on its seed and its own logits -- not on the batch it
shares, on preemption, or on a CUDA graph -- and no generator state lives on the host. The only
device->host copy per step is the sampled ids (plus logprobs when a request asked for them).

Letters: N rows to sample, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingBatch:
    """Per-row sampling options as device tensors, plus host flags that let the sampler skip work."""

    temperature: torch.Tensor  # [N] fp32, 0 = greedy
    top_k: torch.Tensor  # [N] int64, <= 0 = off
    top_p: torch.Tensor  # [N] fp32, 1 = off
    min_p: torch.Tensor  # [N] fp32, 0 = off
    seed: torch.Tensor  # [N] int64 in [0, 2^32)
    position: torch.Tensor  # [N] int64, index of the token being sampled in its sequence
    all_greedy: bool
    need_filter: bool  # any row has top-k / top-p / min-p on
    max_logprobs: int  # -1: no row wants logprobs; else the largest top-N asked


@dataclass
class SampleOutput:
    ids: torch.Tensor  # [N] int64
    logprob: torch.Tensor | None = None  # [N] fp32, log p of the chosen token (raw model distribution)
    top_ids: torch.Tensor | None = None  # [N, max_logprobs] int64
    top_logprobs: torch.Tensor | None = None  # [N, max_logprobs] fp32


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for h in [0, 2^32), in halves so no int64 product overflows."""
    lo = h * (c & 0xFFFF)
    hi = ((h * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding values in [0, 2^32)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def uniform_noise(seed: torch.Tensor, position: torch.Tensor, vocab: int) -> torch.Tensor:
    """[N, V] uniforms in (0, 1) from (seed [N], position [N], token id)."""
    row = _fmix32((seed & _MASK32) ^ _fmix32(_mul32(position & _MASK32, 0x9E3779B1)))  # [N]
    ids = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    h = _fmix32((row[:, None] + _mul32(ids, 0x632BE5AB)[None, :]) & _MASK32)
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def _filter(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Set tokens removed by top-k, top-p and min-p to -inf (logits already divided by temperature)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    V = logits.shape[-1]
    rank = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(b.top_k > 0, b.top_k, torch.full_like(b.top_k, V))
    drop = rank >= k[:, None]
    probs = torch.softmax(sorted_logits, dim=-1)
    # top-p: drop a token when the mass strictly before it already reaches p (the top token always stays)
    before = torch.cumsum(probs, dim=-1) - probs
    drop |= before >= b.top_p[:, None]
    drop |= probs < b.min_p[:, None] * probs[:, :1]
    drop[:, 0] = False
    mask = torch.empty_like(drop).scatter_(1, order, drop)
    return logits.masked_fill(mask, float("-inf"))


def sample(logits: torch.Tensor, b: SamplingBatch) -> SampleOutput:
    """logits [N, V] fp32 -> sampled ids (and logprobs when asked)."""
    greedy = torch.argmax(logits, dim=-1)
    if b.all_greedy:
        ids = greedy
    else:
        temp = torch.where(b.temperature > 0, b.temperature, torch.ones_like(b.temperature))
        scaled = logits / temp[:, None]
        if b.need_filter:
            scaled = _filter(scaled, b)
        u = uniform_noise(b.seed, b.position, logits.shape[-1])
        gumbel = -torch.log(-torch.log(u))
        sampled = torch.argmax(scaled + gumbel, dim=-1)
        ids = torch.where(b.temperature > 0, sampled, greedy)
    out = SampleOutput(ids)
    if b.max_logprobs >= 0:
        logp = torch.log_softmax(logits, dim=-1)
        out.logprob = logp.gather(1, ids[:, None]).squeeze(1)
        if b.max_logprobs > 0:
            out.top_logprobs, out.top_ids = torch.topk(logp, b.max_logprobs, dim=-1)
    return out
