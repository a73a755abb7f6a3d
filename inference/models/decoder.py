"""The decoder-only transformer every supported family composes from shared layers.

The families differ only in what ModelConfig.from_hf resolved (q/k norm kind, biases, MoE or dense MLP
per layer, shared expert, router renormalisation, rope scaling), so one composition serves them all;
`models/__init__.py` maps each HF model_type onto it.

Parameter names (what weights.py maps HF keys onto):
    embed.weight [V, H]   lm_head.weight [V, H] (the same tensor when tied)   norm.weight [H]
    layers.{i}.input_norm.weight, layers.{i}.post_norm.weight
    layers.{i}.attn.qkv.weight [q+k+v, H] (+ .bias), attn.o.weight [H, q] (+ .bias), attn.{q,k}_norm.weight
    layers.{i}.mlp.gate_up.weight [2I, H], mlp.down.weight [H, I]                   (dense layers)
    layers.{i}.mlp.router [E, H], mlp.w13 [E, 2I, H], mlp.w2 [E, H, I]               (MoE layers)
    layers.{i}.mlp.shared.gate_up.weight, mlp.shared.down.weight, mlp.shared_gate [1, H]  (Qwen2-MoE)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorax.inference.config import ModelConfig
from lorax.inference.layers.attention import Attention
from lorax.inference.layers.mlp import GatedMLP
from lorax.inference.layers.moe import SparseMoE
from lorax.inference.layers.norm_rope import RMSNorm, RotaryEmbedding
from lorax.kernels.registry import KernelOps


class DecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        index: int,
        rope: RotaryEmbedding,
        ops: KernelOps,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops, dtype, device)
        self.attn = Attention(cfg, rope, ops, dtype, device)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops, dtype, device)
        self.mlp: SparseMoE | GatedMLP
        if cfg.layer_is_moe[index]:
            self.mlp = SparseMoE(cfg, ops, dtype, device)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, ops, cfg.mlp_bias, dtype, device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (this layer's MLP output, the residual stream before it). The stream is
        h = residual + x, summed by the next norm in the same launch (`RMSNorm.add`); the first layer gets
        the embeddings as x and no residual."""
        if residual is None:
            residual, h = x, self.input_norm(x)
        else:
            h, residual = self.input_norm.add(x, residual)
        h, residual = self.post_norm.add(self.attn(h), residual)
        return self.mlp(h), residual


class DecoderLM(nn.Module):
    def __init__(
        self, cfg: ModelConfig, ops: KernelOps, dtype: torch.dtype, device: torch.device, max_positions: int
    ) -> None:
        super().__init__()
        self.cfg = cfg
        V, H = cfg.vocab_size, cfg.hidden_size
        self.embed = nn.Embedding(V, H, _weight=torch.empty(V, H, dtype=dtype, device=device), _freeze=True)
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, dtype, device)
        self.layers = nn.ModuleList(
            [DecoderLayer(cfg, i, self.rope, ops, dtype, device) for i in range(cfg.num_layers)]
        )
        self.norm = RMSNorm(H, cfg.rms_norm_eps, ops, dtype, device)
        self.lm_head: nn.Parameter | None = None  # None when tied to the embedding
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Parameter(torch.empty(V, H, dtype=dtype, device=device), requires_grad=False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> final hidden states [T, H]."""
        x, residual = self.embed(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual)
        return self.norm(x, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> fp32 logits [N, V]."""
        return F.linear(hidden, self.lm_head_weight).float()

    def named_weights(self) -> dict[str, torch.Tensor]:
        """Every loadable tensor by name (lm_head appears once, under lm_head.weight, when untied)."""
        out: dict[str, torch.Tensor] = {name: p for name, p in self.named_parameters() if name != "lm_head"}
        if self.lm_head is not None:
            out["lm_head.weight"] = self.lm_head
        return out
