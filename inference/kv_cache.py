"""Paged KV cache: per-layer block tensors, the block allocator, and sizing.

Per layer, k and v are [num_blocks, block_size, n_kv, D]. Block 0 is reserved as the dummy block:
padded rows (CUDA-graph buckets) and unused block-table entries point at it, and the allocator never
hands it out.
"""

from __future__ import annotations

import logging
from collections import deque

import torch

from lorax.errors import ConfigError
from lorax.inference.config import EngineConfig, ModelConfig

log = logging.getLogger("lorax.kv_cache")

DUMMY_BLOCK = 0
_CPU_CACHE_BYTES = 512 << 20  # the CPU path caps its cache here unless num_kv_blocks says otherwise


class BlockAllocator:
    """Free list of KV blocks 1..num_blocks-1 (block 0 is the dummy)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self._free)} free (scheduler bug)")
        return [self._free.popleft() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


def bytes_per_block(mcfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * mcfg.num_layers * block_size * mcfg.num_kv_heads * mcfg.head_dim * elem


def scratch_bytes(mcfg: ModelConfig, ecfg: EngineConfig, dtype: torch.dtype) -> int:
    """A generous bound on the forward's activations at max_num_batched_tokens (x2 for the allocator)."""
    elem = torch.empty((), dtype=dtype).element_size()
    T = ecfg.max_num_batched_tokens
    per_token = 6 * mcfg.hidden_size + mcfg.q_size + 2 * mcfg.kv_size + 2 * mcfg.intermediate_size
    per_token += max(1, mcfg.top_k) * 3 * mcfg.moe_intermediate_size  # gate_up, activation per routed pair
    logits = 4 * ecfg.max_num_seqs * mcfg.vocab_size * 4  # fp32 logits, sorted copy, probs, noise
    return 2 * (T * per_token * elem + logits)


def plan_num_blocks(mcfg: ModelConfig, ecfg: EngineConfig, max_model_len: int, dtype: torch.dtype, device: torch.device) -> int:
    """Number of KV blocks (dummy included), after weights and the LoRA slab are already allocated."""
    per_block = bytes_per_block(mcfg, ecfg.block_size, dtype)
    if ecfg.num_kv_blocks is not None:
        return ecfg.num_kv_blocks
    # Never more blocks than max_num_seqs sequences of max_model_len tokens can use (plus the dummy).
    wanted = ecfg.max_num_seqs * -(-max_model_len // ecfg.block_size) + 1
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # Memory this process's caching allocator holds but does not use (an earlier engine's cache) is
        # free for this one too.
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = int(total * ecfg.gpu_memory_utilization) - (total - free) - scratch_bytes(mcfg, ecfg, dtype)
        n = min(wanted, budget // per_block)
        log.info("KV cache: %d blocks (%.2f GiB) after weights and adapters", n, n * per_block / 2**30)
    else:
        n = min(wanted, max(_CPU_CACHE_BYTES // per_block, -(-max_model_len // ecfg.block_size) + 1))
    if n < 2:
        raise ConfigError(
            f"no room for the KV cache (gpu_memory_utilization={ecfg.gpu_memory_utilization}): "
            "lower max_loras / max_lora_rank / max_num_batched_tokens or raise the utilisation"
        )
    return int(n)


class KVCache:
    def __init__(self, mcfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks, block_size, mcfg.num_kv_heads, mcfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(mcfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(mcfg.num_layers)]
        self.allocator = BlockAllocator(num_blocks)

    def attach(self, attention_layers: list[torch.nn.Module]) -> None:
        for layer, k, v in zip(attention_layers, self.k, self.v, strict=True):
            layer.k_cache, layer.v_cache = k, v
