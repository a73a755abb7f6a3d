"""The byte and FLOP model of one engine step, for `lorax bench throughput` (../shared/BENCHMARKS.md).

Decode is bound by bytes. A decode step over B sequences touches, per layer:
  attention weights (q, k, v, o)                     (H*q + 2*H*kv + q*H) * elem
  KV cache read (every context token, K and V)       sum(ctx) * 2 * kv * elem   (+ the B new rows written)
  MoE: router E*H*elem + E_hit(B) * 3*H*I * elem     E_hit(T) = E * (1 - (1 - k/E)^T), uniform routing
  dense MLP layers instead: 3*H*I_dense * elem
  LoRA on q/k/v/o: r * (in + out) * elem per module and distinct adapter in the batch
  LoRA on experts: E_hit(T_a) * r * 3*(H + I) * elem per adapter a with T_a tokens
and once per step the lm_head (V*H*elem). Activations are left out (a few MB against ~GBs).

Prefill is bound by FLOPs: 2 * tokens * (attention projections + k routed experts * 3*H*I + router),
causal attention 4 * q * sum over new tokens of their context length, LoRA 2 * r * (in + out) per
module and token, and the lm_head for the sampled rows.
"""

from __future__ import annotations

from collections import Counter

from lorax.inference.config import ModelConfig


def experts_hit(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts touched by `tokens` tokens under uniform top-k routing."""
    if tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def _attn_io(m: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of q, k, v, o."""
    H = m.hidden_size
    return [(H, m.q_size), (H, m.kv_size), (H, m.kv_size), (m.q_size, H)]


def decode_step_bytes(m: ModelConfig, elem: int, adapters: list[str | None], context_lens: list[int],
                      rank: int) -> int:
    """Bytes a decode step over these sequences touches (context_lens include the token just fed)."""
    H, inter, E, k = m.hidden_size, m.moe_intermediate_size, m.num_experts, m.top_k
    B = len(adapters)
    per_adapter = Counter(a for a in adapters if a is not None)
    attn_w = sum(fin * fout for fin, fout in _attn_io(m))
    kv = sum(context_lens) * 2 * m.kv_size + B * 2 * m.kv_size
    attn_lora = len(per_adapter) * rank * sum(fin + fout for fin, fout in _attn_io(m))
    total = 0.0
    for is_moe in m.layer_is_moe:
        total += attn_w + kv + attn_lora
        if is_moe:
            total += E * H + experts_hit(E, k, B) * 3 * H * inter
            total += sum(experts_hit(E, k, n) for n in per_adapter.values()) * rank * 3 * (H + inter)
        else:
            total += 3 * H * m.intermediate_size
    total += m.vocab_size * H
    return int(total * elem)


def prefill_step_flops(m: ModelConfig, num_new: list[int], context_ends: list[int], adapters: list[str | None],
                       rank: int) -> int:
    """FLOPs of a prefill step: sequence j feeds num_new[j] tokens ending at position context_ends[j]."""
    H, inter, E, k = m.hidden_size, m.moe_intermediate_size, m.num_experts, m.top_k
    T = sum(num_new)
    T_lora = sum(n for n, a in zip(num_new, adapters, strict=True) if a is not None)
    # token at position p (0-based) attends over p + 1 keys: a chunk [end - n, end) sums to this
    keys = sum(n * (2 * end - n + 1) // 2 for n, end in zip(num_new, context_ends, strict=True))
    sampled = len(num_new)  # at most one sampled row per sequence (an upper bound for partial chunks)
    proj = sum(fin * fout for fin, fout in _attn_io(m))
    attn_lora = rank * sum(fin + fout for fin, fout in _attn_io(m))
    total = 0
    for is_moe in m.layer_is_moe:
        total += 2 * T * proj + 4 * m.q_size * keys + 2 * T_lora * attn_lora
        if is_moe:
            total += 2 * T * (E * H + k * 3 * H * inter) + 2 * T_lora * k * rank * 3 * (H + inter)
        else:
            total += 2 * T * 3 * H * m.intermediate_size
    total += 2 * sampled * H * m.vocab_size
    return total
