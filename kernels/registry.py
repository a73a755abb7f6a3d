"""One place that picks the kernel backend for a device.

`get_ops(device, backend)` returns a `KernelOps` whose members follow the contracts written in each
kernel file. backend "torch" always gives the `*_ref` references (the CPU path, and a GPU oracle);
"triton" gives the Triton kernels; "auto" picks Triton on CUDA and torch elsewhere. Layers call
`ops.<name>(...)` and never branch on the platform themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KernelOps:
    name: str
    fused_moe: Callable[..., torch.Tensor]
    lora_linear: Callable[..., torch.Tensor]
    store_kv: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]
    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rope_store: Callable[..., torch.Tensor]
    router_topk: Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _torch_ops() -> KernelOps:
    from lorax.kernels.attention import paged_attention_ref, store_kv_ref
    from lorax.kernels.fused_moe import fused_moe_ref
    from lorax.kernels.lora_sgemm import lora_linear_ref
    from lorax.kernels.moe_router import router_topk_ref
    from lorax.kernels.norm_rope import add_rms_norm_ref, rms_norm_ref, rope_store_ref

    return KernelOps("torch", fused_moe_ref, lora_linear_ref, store_kv_ref, paged_attention_ref, rms_norm_ref,
                     add_rms_norm_ref, rope_store_ref, router_topk_ref)


def _triton_ops() -> KernelOps:
    from lorax.kernels import triton_ops  # filled by the Triton kernels; imported lazily

    return triton_ops.make_ops()


def get_ops(device: torch.device | str, backend: str = "auto") -> KernelOps:
    device = torch.device(device)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        return _torch_ops()
    if backend == "triton":
        return _triton_ops()
    raise ValueError(f"unknown kernel backend {backend!r} (expected auto, torch or triton)")
