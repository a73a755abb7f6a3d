"""The per-step ForwardContext: everything a layer needs besides its input activations.

The model runner builds one record per step (host lists -> tensors, pinned + non_blocking on CUDA) and
installs it with `forward_context(ctx)`; layers read it with `get_forward_context()` so their
signatures stay `forward(x)`. A CUDA-graph runner keeps one static record and updates its tensors in
place; the layers cannot tell the difference.

Letters: T tokens in the step (rows of x), B sequences in the step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ForwardContext:
    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, KV cache slot (block * block_size + offset); -1 = padded row
    block_tables: torch.Tensor  # [B, max_blocks] int32, unused entries point at the dummy block 0
    context_lens: torch.Tensor  # [B] int32, cached tokens of each sequence including this step's
    query_start_loc: torch.Tensor  # [B + 1] int32, sequence b owns rows [qsl[b], qsl[b+1])
    logits_indices: torch.Tensor  # [N] int64, rows whose next-token logits are wanted (N <= B)
    token_slot: torch.Tensor  # [T] int32, adapter slot of each token, -1 = base model
    has_lora: bool  # host: any token in this step uses an adapter (else LoRA work is skipped)
    is_decode: bool  # host: every sequence contributes exactly one token
    num_tokens: int  # host: T
    max_query_len: int  # host: the longest q_len in the step (1 on decode steps)
    slot_rank: torch.Tensor | None = None  # [S] int32, rank of the adapter in each slot (0 = empty)
    lora_batch: Any = None  # the Triton backend's per-step LoraBatch (tokens grouped by slot), or None
    # uint8 workspace every MoE layer's fused_moe may use in turn (layers run one after another); None =
    # the kernel allocates. A graph runner sizes it once with kernels.fused_moe.fused_moe_scratch_bytes.
    moe_scratch: torch.Tensor | None = None
    # host: a token of this step uses a shared-outer MoE adapter. When none does, the MoE layers leave the
    # pool's shared-outer slabs out of the call (their rows are zero for every other slot), which lets the
    # fused MoE take its LoRA K step path at prefill sizes. Captured graphs keep them (any mix replays).
    moe_shared: bool = True
    # host: distinct adapter slots the step's tokens use (None in captured graphs: any mix replays). The fused
    # MoE takes its segment schedule at prefill sizes only when many adapters are in use.
    active_slots: int | None = None


_CURRENT: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    if _CURRENT is None:
        raise RuntimeError("no ForwardContext installed: layers run only inside model_runner steps")
    return _CURRENT


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    global _CURRENT
    previous, _CURRENT = _CURRENT, ctx
    try:
        yield ctx
    finally:
        _CURRENT = previous
