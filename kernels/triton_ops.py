"""The Triton backend of `lorax.kernels.registry.get_ops`: the ops layers call, as Triton kernels.

Each op keeps its reference's positional signature (see the contract at the top of its kernel file)
and takes keyword-only hints and preallocated buffers that a CUDA-graph runner passes:

    fused_moe(x, w13, w2, topk_weights, topk_ids, lora=None, ...)           kernels/fused_moe.py
    lora_linear(x, y, A, B, slice_offsets, token_slot, *, batch, slot_rank, scratch)
                                                                              kernels/lora_sgemm.py
    store_kv(k, v, k_cache, v_cache, slot_mapping)                           kernels/attention.py
    paged_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale, *,
                    max_query_len, max_context_len, num_splits, out, workspace, k_new, v_new)
    rms_norm(x, weight, eps), add_rms_norm(x, residual, weight, eps),
    rope_store(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, q_norm, k_norm, eps, k_out)
                                                                              kernels/norm_rope.py
    router_topk(logits, top_k, renormalize, round_weights)                    kernels/moe_router.py

Per step the engine builds `build_lora_batch(token_slot, S)` once (device ops only, backend-neutral)
and passes it to every `lora_linear` call as `batch=`; it passes `max_query_len=1` on decode steps so
that attention takes the split-K decode kernel without looking at device data.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorax.kernels.attention import paged_attention, store_kv
from lorax.kernels.lora_sgemm import lora_linear
from lorax.kernels.moe_router import router_topk
from lorax.kernels.norm_rope import add_rms_norm, rms_norm, rope_store
from lorax.kernels.registry import KernelOps


def _fused_moe() -> tuple[Callable[..., torch.Tensor], bool]:
    """Engineer A's Triton fused MoE when it is in the tree; else the torch reference, said out loud."""
    try:
        from lorax.kernels.fused_moe import fused_moe
    except ImportError:
        # Until kernels/fused_moe.py exports `fused_moe`, the Triton backend runs the reference MoE
        # (correct, slow, host-synchronising). `fused_moe_is_triton()` tells callers (and the benchmark) which.
        from lorax.kernels.fused_moe import fused_moe_ref

        return fused_moe_ref, False
    return fused_moe, True


def fused_moe_is_triton() -> bool:
    return _fused_moe()[1]


def make_ops() -> KernelOps:
    fused_moe, _ = _fused_moe()
    return KernelOps(
        name="triton",
        fused_moe=fused_moe,
        lora_linear=lora_linear,
        store_kv=store_kv,
        paged_attention=paged_attention,
        rms_norm=rms_norm,
        add_rms_norm=add_rms_norm,
        rope_store=rope_store,
        router_topk=router_topk,
    )
