"""Self-attention over the paged KV cache: fused qkv (+LoRA), optional q/k norm, rope and the KV store (one
launch, `rope_store`), GQA, o (+LoRA)."""

from __future__ import annotations

import torch
from torch import nn

from lorax.inference.config import ModelConfig
from lorax.inference.context import get_forward_context
from lorax.inference.layers.linear import LoraLinear
from lorax.inference.layers.norm_rope import RMSNorm, RotaryEmbedding
from lorax.kernels.registry import KernelOps


class Attention(nn.Module):
    # Prefill steps hand the attention this step's keys and values beside their queries (rope_store keeps the
    # rotated k, v is the qkv output), so that only a cached prefix goes through the block table
    # (`paged_attention(k_new=, v_new=)`): 102.9 against 136.1 us for one 2048-token sequence on an H100, 1.20 against
    # 1.69 ms at 8192 (docs/BENCHMARKS.md, "Attention"). False reads every key through the table (the path
    # before it), kept for A/B runs and tested beside it.
    prefill_new_kv = True

    def __init__(
        self, cfg: ModelConfig, rope: RotaryEmbedding, ops: KernelOps, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.ops = ops
        self.rope = rope  # shared by every layer; not a registered submodule
        self.n_h, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv = LoraLinear(
            cfg.hidden_size, (cfg.q_size, cfg.kv_size, cfg.kv_size), ops, cfg.qkv_bias, dtype, device
        )
        self.o = LoraLinear(cfg.q_size, (cfg.hidden_size,), ops, cfg.o_bias, dtype, device)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if cfg.qk_norm == "head":  # Qwen3: one norm over each head's D features (inside rope_store)
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops, dtype, device)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops, dtype, device)
        elif cfg.qk_norm == "full":  # OLMoE: one norm over the whole q (k) projection
            self.q_norm = RMSNorm(cfg.q_size, cfg.rms_norm_eps, ops, dtype, device)
            self.k_norm = RMSNorm(cfg.kv_size, cfg.rms_norm_eps, ops, dtype, device)
        # Attached by the KV cache after it is sized: [num_blocks, block_size, n_kv, D] each.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = get_forward_context()
        T = x.shape[0]
        q, k, v = self.qkv(x).split([self.cfg.q_size, self.cfg.kv_size, self.cfg.kv_size], dim=-1)
        if self.cfg.qk_norm == "full":
            assert self.q_norm is not None and self.k_norm is not None
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(T, self.n_h, self.head_dim)  # (views of the qkv output where they can be)
        k = k.reshape(T, self.n_kv, self.head_dim)
        v = v.reshape(T, self.n_kv, self.head_dim)
        qw = kw = None  # per-head q/k norm weights for rope_store
        if self.cfg.qk_norm == "head":
            assert self.q_norm is not None and self.k_norm is not None
            if self.cfg.clip_qkv is None:
                qw, kw = self.q_norm.weight, self.k_norm.weight
            else:  # the norm comes before the clamp (transformers' order): not inside rope_store then
                q, k = self.q_norm(q), self.k_norm(k)
        if self.cfg.clip_qkv is not None:
            c = self.cfg.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        assert self.k_cache is not None and self.v_cache is not None, "KV cache not attached"
        # Prefill: the attention reads this step's keys beside their queries (rotated k kept by rope_store, v
        # from the qkv output) and only the cached prefix through the block table. Decode reads the cache.
        k_new = None
        if self.prefill_new_kv and ctx.max_query_len > 1 and self.k_cache.dtype == x.dtype:
            k_new = torch.empty(T, self.n_kv, self.head_dim, dtype=x.dtype, device=x.device)
        # q/k per-head norm (Qwen3), rope, and k / v into the paged cache: one launch
        q = self.ops.rope_store(q, k, v, ctx.positions, self.rope.cos, self.rope.sin, self.k_cache, self.v_cache,
                                ctx.slot_mapping, qw, kw, self.cfg.rms_norm_eps, k_new)
        out = self.ops.paged_attention(
            q, self.k_cache, self.v_cache, ctx.block_tables, ctx.context_lens, ctx.query_start_loc, self.scale,
            max_query_len=ctx.max_query_len, k_new=k_new, v_new=None if k_new is None else v,
        )
        return self.o(out.reshape(T, self.cfg.q_size))
