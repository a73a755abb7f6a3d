"""LoRA over MoE experts through virtual experts (slot x expert).

Slab layout one MoE layer hands to the kernels (S slots, R = max rank, E experts, H hidden, I expert
intermediate); zero-padded past each adapter's rank, and all-zero for an empty slot:

    gate_up_A   [S, E, 2R, H]   per-expert A; rows [0,R) gate, [R,2R) up; zero for shared-outer slots
    gate_up_B   [S, E, 2I, R]   rows [0,I) take z[:R], rows [I,2I) take z[R:]
    down_A      [S, E, R, I]
    down_B      [S, E, H, R]    zero for shared-outer slots
    shared_gate_up_A [S, 2R, H] or None   the shared-outer A (same for every expert); zero otherwise
    shared_down_B    [S, H, R]  or None   the shared-outer down B; zero otherwise

Math per token t with slot s = token_slot[t] >= 0, routed pair (t, j) to expert e, weight w:

    z_gu[t,j] = gate_up_A[s,e] x_t + shared_gate_up_A[s] x_t          (the shared part once per token)
    h[t,j]   += [gate_up_B[s,e,:I] z_gu[:R] ; gate_up_B[s,e,I:] z_gu[R:]]   before SiLU-and-mul
    z_d[t,j]  = down_A[s,e] a[t,j]
    y[t]     += sum_j w_j down_B[s,e] z_d[t,j]  +  shared_down_B[s] (sum_j w_j z_d[t,j])

Tokens with slot -1, and pairs whose expert id is a sentinel, get no delta and should cost nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class MoELoraArgs(NamedTuple):
    token_slot: torch.Tensor  # [T] int32, -1 = no adapter
    gate_up_A: torch.Tensor  # [S, E, 2R, H]
    gate_up_B: torch.Tensor  # [S, E, 2I, R]
    down_A: torch.Tensor  # [S, E, R, I]
    down_B: torch.Tensor  # [S, E, H, R]
    shared_gate_up_A: torch.Tensor | None = None  # [S, 2R, H]
    shared_down_B: torch.Tensor | None = None  # [S, H, R]


def _pairs_by_virtual_expert(vid: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """Host-side grouping of flat pairs by virtual id (reference only: it syncs)."""
    flat = vid.reshape(-1)
    out = []
    for v in torch.unique(flat[flat >= 0]).tolist():
        out.append((int(v), (flat == v).nonzero(as_tuple=True)[0]))
    return out


def moe_lora_gate_up_ref(x: torch.Tensor, vid: torch.Tensor, lora: MoELoraArgs, h: torch.Tensor) -> None:
    """Add the gate_up LoRA delta into h [T*k, 2I] in place. x [T, H], vid [T, k] virtual ids."""
    T, k = vid.shape
    S, E, twoR, _ = lora.gate_up_A.shape
    R = twoR // 2
    inter = lora.gate_up_B.shape[2] // 2
    xf = x.float()
    z = torch.zeros(T * k, twoR, dtype=torch.float32, device=x.device)
    for v, pairs in _pairs_by_virtual_expert(vid):
        s, e = divmod(v, E)
        z[pairs] += xf[pairs // k] @ lora.gate_up_A[s, e].float().T
        if lora.shared_gate_up_A is not None:
            z[pairs] += xf[pairs // k] @ lora.shared_gate_up_A[s].float().T
    for v, pairs in _pairs_by_virtual_expert(vid):
        s, e = divmod(v, E)
        b = lora.gate_up_B[s, e].float()
        delta = torch.cat([z[pairs, :R] @ b[:inter].T, z[pairs, R:] @ b[inter:].T], dim=1)
        h[pairs] += delta.to(h.dtype)


def moe_lora_down_ref(
    a: torch.Tensor, vid: torch.Tensor, topk_weights: torch.Tensor, lora: MoELoraArgs, y: torch.Tensor
) -> None:
    """Add the down LoRA delta into y [T, H] in place (after the top-k sum). a [T*k, I]."""
    T, k = vid.shape
    S, E, R, _ = lora.down_A.shape
    w = topk_weights.reshape(-1).float()
    u = torch.zeros(T, R, dtype=torch.float32, device=a.device)  # shared-outer: sum_j w_j z_d[t,j]
    for v, pairs in _pairs_by_virtual_expert(vid):
        s, e = divmod(v, E)
        zd = a[pairs].float() @ lora.down_A[s, e].float().T  # [n, R]
        y.index_add_(0, pairs // k, ((w[pairs, None] * zd) @ lora.down_B[s, e].float().T).to(y.dtype))
        u.index_add_(0, pairs // k, w[pairs, None] * zd)
    if lora.shared_down_B is not None:
        slot = lora.token_slot.long()
        has = slot >= 0
        if bool(has.any()):
            idx = has.nonzero(as_tuple=True)[0]
            delta = torch.bmm(lora.shared_down_B[slot[idx]].float(), u[idx].unsqueeze(2)).squeeze(2)
            y[idx] += delta.to(y.dtype)
