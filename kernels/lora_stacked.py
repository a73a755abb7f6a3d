"""Dense LoRA with A stacked under the base weight: W_cat = [W; A_0; ...; A_{S-1}].

One GEMM writes the base output and, beside it, every slot's shrink; `lora_linear(z=...)` (Triton or the
reference, kernels/lora_sgemm.py) expands each token's own slot's block into the base part. At decode
sizes the shrink is then free: its bytes (the A rows) are read by a GEMM that reads the weight anyway,
and it needs no second launch and no side stream. `stacked_rows` says when a layer is stored so
(inference/layers/linear.py allocates the buffer and keeps `weight` and `lora_A` as views of it).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from lorax.kernels.lora_sgemm import LoraBatch

# A layer stores its weight stacked with the pool's A rows (`linear_stacked`) while those rows add at most
# this fraction to the weight's rows: the GEMM then computes every slot's shrink for every token, which
# at prefill sizes costs that fraction in FLOPs (and at decode sizes reads A once, as the shrink would).
# LORAX_STACKED_SHRINK (read at import): "0" never stacks, "1" always does.
STACKED_MAX_FRACTION = 1 / 8
STACKED_MODE = os.environ.get("LORAX_STACKED_SHRINK", "auto")
# Below this many tokens `linear_stacked` on a GPU runs the GEMM on W alone and the shrink and expand beside
# it (`lora_linear(base=...)`): there the side branch hides behind the GEMM, while the stacked path's expand
# runs after it. Measured on an H100 (qkv 2048 -> 5120, 4 adapters of rank 16, weights rotated past L2,
# two rounds): the side branch wins at 1-2 tokens (12.4-12.6 vs 13.3-13.5 us) and at 64 (13.8 vs 14.3);
# the stacked GEMM at 4-32 (13.4-14.2 vs 13.8-14.9), 128 (15.1 vs 17.0), 512 (25.7 vs 30.7), 2048 (93.6 vs 96.5).
STACKED_MIN_TOKENS = 4


def stacked_rows(out_total: int, S: int, n_slices: int, R: int) -> int:
    """A rows (S * n_slices * R) to stack under an [out_total, in] weight, or 0 to keep A apart."""
    rows = S * n_slices * R
    if STACKED_MODE == "0" or rows == 0:
        return 0
    return rows if STACKED_MODE == "1" or rows <= out_total * STACKED_MAX_FRACTION else 0


def uses_stacked_gemm(tokens: int, device: torch.device, min_tokens: int | None = None) -> bool:
    """Whether `linear_stacked` runs the stacked GEMM for this many tokens (else W alone + the side branch)."""
    return device.type != "cuda" or tokens >= (STACKED_MIN_TOKENS if min_tokens is None else min_tokens)


def linear_stacked(
    op: Callable[..., torch.Tensor],
    x: torch.Tensor,
    w_cat: torch.Tensor,
    B: torch.Tensor,
    slice_offsets: tuple[int, ...],
    token_slot: torch.Tensor,
    *,
    bias_cat: torch.Tensor | None = None,
    batch: LoraBatch | None = None,
    slot_rank: torch.Tensor | None = None,
    min_tokens: int | None = None,
) -> torch.Tensor:
    """y = x @ W^T (+ bias) plus each token's LoRA delta, for w_cat = [W; A.reshape(S * n * R, in)].

    One GEMM writes [T, out_total + S*n*R]: the base output and, beside it, every slot's shrink; `op` (a
    `lora_linear`: Triton or the reference) expands the token's own slot's block into the base part.
    Returns the base part, a [T, out_total] view with row stride out_total + S*n*R. On a GPU below
    `min_tokens` (default STACKED_MIN_TOKENS) the GEMM reads W alone and `op(base=...)` runs the shrink
    beside it instead; the result is the same.
    """
    out_total = slice_offsets[-1]
    S = B.shape[0]
    T, K = x.shape
    if w_cat.dim() != 2 or w_cat.shape[1] != K or (w_cat.shape[0] - out_total) % max(S, 1):
        raise ValueError(f"linear_stacked: w_cat {tuple(w_cat.shape)} is not [out_total={out_total} + S*n*R, {K}]")
    A = w_cat[out_total:].view(S, -1, K)
    if not uses_stacked_gemm(T, x.device, min_tokens):
        y = x.new_empty(T, out_total)
        w, b = w_cat[:out_total], None if bias_cat is None else bias_cat[:out_total]

        def base() -> None:
            torch.mm(x, w.t(), out=y) if b is None else torch.addmm(b, x, w.t(), out=y)

        return op(x, y, A, B, slice_offsets, token_slot, batch=batch, slot_rank=slot_rank, base=base)
    y_cat = x.new_empty(T, w_cat.shape[0])
    if bias_cat is None:
        torch.mm(x, w_cat.t(), out=y_cat)
    else:
        torch.addmm(bias_cat, x, w_cat.t(), out=y_cat)
    y = y_cat[:, :out_total]
    op(x, y, A, B, slice_offsets, token_slot, batch=batch, slot_rank=slot_rank, z=y_cat[:, out_total:])
    return y
