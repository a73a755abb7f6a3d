"""Dense LoRA (q/k/v/o, dense MLPs, shared experts) over tokens grouped by adapter slot.

Contract of `lora_linear` (Triton) and `lora_linear_ref`; adds the delta into y in place:

    x             [T, in]
    y             [T, out_total]         the base layer's output (several slices side by side)
    A             [S, n_slices * R, in]  slice i's A in rows [i*R, (i+1)*R), zero-padded past its rank
    B             [S, out_total, R]      slice i's B in rows [offsets[i], offsets[i+1])
    slice_offsets host tuple of n_slices + 1 ints, offsets[0] == 0, offsets[-1] == out_total
    token_slot    [T] int32, -1 = no adapter (row untouched)

    y[t, o_i:o_{i+1}] += B[s, o_i:o_{i+1}] @ (A[s, i*R:(i+1)*R] @ x[t])     for s = token_slot[t] >= 0

The Triton path sorts tokens by slot on the device (`LoraBatch`), so its grid scales with the number of
adapters in the batch, not with the batch size.
"""

from __future__ import annotations

import torch


def lora_linear_ref(
    x: torch.Tensor,
    y: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    slice_offsets: tuple[int, ...],
    token_slot: torch.Tensor,
) -> torch.Tensor:
    R = B.shape[-1]
    slot = token_slot.long()
    for s in torch.unique(slot[slot >= 0]).tolist():
        rows = (slot == s).nonzero(as_tuple=True)[0]
        z = x[rows].float() @ A[s].float().T  # [m, n_slices * R]
        for i in range(len(slice_offsets) - 1):
            lo, hi = slice_offsets[i], slice_offsets[i + 1]
            y[rows, lo:hi] += (z[:, i * R : (i + 1) * R] @ B[s, lo:hi].float().T).to(y.dtype)
    return y
