"""The byte / FLOP model of `lorax bench throughput` against ../shared/BENCHMARKS.md, term by term."""

from __future__ import annotations

import pytest

from lorax.inference.bench_cost import decode_step_bytes, experts_hit, prefill_step_flops
from lorax.inference.bench_inputs import STANDARD_MODEL
from lorax.inference.config import ModelConfig

STD = ModelConfig.from_hf(STANDARD_MODEL)
H, INTER, E, K, V = 2048, 768, 128, 8, 151936
Q, KV = 32 * 128, 4 * 128
ELEM = 2  # bf16


@pytest.mark.parametrize("tokens,expected", [(0, 0.0), (1, 8.0), (2, 128 * (1 - (120 / 128) ** 2))])
def test_experts_hit(tokens: int, expected: float) -> None:
    assert experts_hit(E, K, tokens) == pytest.approx(expected)


def test_experts_hit_saturates() -> None:
    assert 127 < experts_hit(E, K, 2048) <= 128
    hits = [experts_hit(E, K, t) for t in (1, 8, 32, 128, 512)]
    assert hits == sorted(hits)


def _independent_bytes(B: int, ctx: list[int], adapter_tokens: list[int], r: int) -> float:
    """BENCHMARKS.md's decode bytes, written out again from the layer shapes."""
    per_layer = (
        (H * Q + 2 * H * KV + Q * H)  # attention weights
        + (sum(ctx) + B) * 2 * KV  # KV read + the new rows written
        + E * H  # router
        + E * (1 - (1 - K / E) ** B) * 3 * H * INTER  # experts touched
        + sum(E * (1 - (1 - K / E) ** n) for n in adapter_tokens) * 2 * r * 3 * (H + INTER) / 2
        + len(adapter_tokens) * r * ((H + Q) + 2 * (H + KV) + (Q + H))  # q/k/v/o LoRA factors
    )
    return (48 * per_layer + V * H) * ELEM


@pytest.mark.parametrize(
    "adapters",
    [[None] * 64, ["a"] * 64, ["a", "b", "c", "d"] * 16, ["a"] * 8 + [None] * 56, ["a", "b"]],
)
def test_decode_bytes_match_the_formula(adapters: list[str | None]) -> None:
    ctx = [600 + i for i in range(len(adapters))]
    counts = [adapters.count(a) for a in sorted({a for a in adapters if a is not None})]
    got = decode_step_bytes(STD, ELEM, adapters, ctx, rank=16)
    assert got == pytest.approx(_independent_bytes(len(adapters), ctx, counts, 16), rel=1e-9)


def test_decode_bytes_standard_batch_64_is_about_60_gb() -> None:
    # BENCHMARKS.md: ~60 GB of expert weights per decode step at batch 64 (about 20 ms at 3.02 TB/s).
    base = decode_step_bytes(STD, ELEM, [None] * 64, [1] * 64, rank=16)
    assert 55e9 < base < 65e9
    lora = decode_step_bytes(STD, ELEM, [f"a{i % 8}" for i in range(64)], [1] * 64, rank=16)
    assert 0.01 < lora / base - 1 < 0.1  # LoRA bytes are a few percent of the base's


def _brute_flops(num_new: list[int], ends: list[int], lora: list[bool], r: int) -> int:
    total = 0
    for n, end, has in zip(num_new, ends, lora, strict=True):
        for p in range(end - n, end):
            per_layer = 2 * (H * Q + 2 * H * KV + Q * H) + 4 * Q * (p + 1) + 2 * (E * H + K * 3 * H * INTER)
            if has:
                per_layer += 2 * r * ((H + Q) + 2 * (H + KV) + (Q + H)) + 2 * K * r * 3 * (H + INTER)
            total += 48 * per_layer
        total += 2 * H * V  # the sampled row's lm_head
    return total


@pytest.mark.parametrize(
    "num_new,ends,adapters",
    [([512], [512], [None]), ([512], [512], ["a"]), ([100, 7], [300, 7], ["a", None]), ([1, 1], [5, 9], [None, "b"])],
)
def test_prefill_flops_match_a_token_by_token_count(num_new: list[int], ends: list[int],
                                                    adapters: list[str | None]) -> None:
    got = prefill_step_flops(STD, num_new, ends, adapters, rank=16)
    assert got == _brute_flops(num_new, ends, [a is not None for a in adapters], 16)


def test_prefill_chunks_add_up() -> None:
    whole = prefill_step_flops(STD, [512], [512], ["a"], 16)
    parts = prefill_step_flops(STD, [200], [200], ["a"], 16) + prefill_step_flops(STD, [312], [512], ["a"], 16)
    assert parts - whole == 2 * H * V  # only the extra lm_head row of the first chunk differs
