"""Fused MoE: grouped GEMMs over tokens aligned by expert, with optional LoRA deltas.

Contract of `fused_moe` (Triton) and `fused_moe_ref`:

    x             [T, H]        activations (bf16/fp16/fp32)
    w13           [E, 2I, H]    gate rows [0, I), up rows [I, 2I)   (transformers' gate_up_proj layout)
    w2            [E, H, I]
    topk_weights  [T, k] float  routing weights (already renormalised if the model does so)
    topk_ids      [T, k] int32  expert ids; negative = sentinel (expert not on this rank): no contribution
    lora          MoELoraArgs | None
    returns       [T, H] = sum_j w[t,j] * (W2[e] silu_and_mul(W13[e] x_t + dgu) + ddown)

Keyword-only, both implementations (the reference ignores the first and last):
    scratch       1-D uint8 workspace of >= fused_moe_scratch_bytes(x, w13, k, lora) bytes (CUDA graphs)
    out           [T, H] output buffer
    config        block config dict (see `moe_config`; default: kernels/configs/fused_moe.json, then a
                  heuristic by pairs per expert). Keys: BLOCK_M, BLOCK_N_GU, BLOCK_K_GU, BLOCK_N_D,
                  BLOCK_K_D, GROUP_M, num_warps, num_stages, SPLIT (LoRA shrink K-split), and optionally
                  STACK_ELEMS (LoRA epilogue slot stacking), LORA_K (1: the LoRA as K steps of the GEMMs,
                  see kernels/moe_lora.py), SHRINK_M (rows per LoRA shrink program, a divisor of BLOCK_M),
                  COMPACT (1 / 0: the LoRA's slot groups, or with LORA_K the K steps' stacking, follow each
                  block's own distinct slots rather than every registered slot; default: with LORA_K
                  moe_lora.use_compact, else whenever the slots take more than one group) and PREFETCH (1:
                  the epilogue path's LoRA B / down_A / down_B tiles of a block's first slot group are issued
                  before the GEMMs' main loops; decode), LORA_SEG (1: the LoRA by segments of one virtual
                  expert, kernels/moe_lora_seg.py; `moe_config.call_config` sets it from 16 slots in use at prefill sizes),
                  SEG_M (its rows per virtual block) and SEG_I_SPLIT (its expand programs per block)

The Triton path is sync-free; its results are bitwise repeatable (the top-k sum has a fixed order).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton

from lorax.kernels._common import dot_precision, use_pdl
from lorax.kernels.fused_moe_kernels import _gate_up_kernel
from lorax.kernels.moe_align import interpreting, max_padded_size, moe_align, virtual_expert_ids_ref
from lorax.kernels.moe_config import (  # noqa: F401  (moe_config, STACK_ELEMS: re-exported for callers)
    STACK_ELEMS,
    _epilogue_slot_group,
    _lora_compact,
    _lora_k_step,
    _lora_seg,
    _seg_i_split,
    call_config,
    moe_config,
)
from lorax.kernels.moe_down_kernels import _down_kernel
from lorax.kernels.moe_lora import (
    MoELoraArgs,
    compact_width,
    lora_block_r,
    moe_lora_down_ref,
    moe_lora_down_shrink,
    moe_lora_gate_up_ref,
    moe_lora_shrink,
    shrink_sub_m,
)
from lorax.kernels.moe_lora_seg import (
    SEG_M,
    moe_lora_seg_down_expand,
    moe_lora_seg_expand,
    moe_lora_seg_shrink,
    seg_align,
)
from lorax.kernels.moe_topk_sum_kernels import _topk_sum_kernel


def silu_and_mul(h: torch.Tensor) -> torch.Tensor:
    inter = h.shape[-1] // 2
    return F.silu(h[..., :inter]) * h[..., inter:]


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    lora: MoELoraArgs | None = None,
    *,
    scratch: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Torch reference. Takes the Triton keyword hints so both backends share one call signature:
    scratch and config are ignored, out (if given) receives the result."""
    T, k = topk_ids.shape
    E = w13.shape[0]
    flat = topk_ids.reshape(-1).long()
    h = torch.zeros(T * k, w13.shape[1], dtype=x.dtype, device=x.device)
    for e in range(E):
        pairs = (flat == e).nonzero(as_tuple=True)[0]
        if pairs.numel():
            h[pairs] = x[pairs // k] @ w13[e].T
    vid = None
    if lora is not None:
        vid = virtual_expert_ids_ref(topk_ids, lora.token_slot, E)
        moe_lora_gate_up_ref(x, vid, lora, h)
    a = silu_and_mul(h)  # [T*k, I]
    w = topk_weights.reshape(-1, 1).to(torch.float32)
    y = torch.zeros(T, w2.shape[1], dtype=torch.float32, device=x.device)
    for e in range(E):
        pairs = (flat == e).nonzero(as_tuple=True)[0]
        if pairs.numel():
            y.index_add_(0, pairs // k, w[pairs] * (a[pairs] @ w2[e].T).float())
    if lora is not None and vid is not None:
        moe_lora_down_ref(a, vid, topk_weights, lora, y)
    if out is not None:
        out.copy_(y)
        return out
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Triton path. Launches: moe_align (1 up to 64 pairs, else 2-3 + a memset), [LoRA shrink], gate_up GEMM,
# [LoRA down shrink], down GEMM, top-k sum (kernels in fused_moe_kernels.py, moe_down_kernels.py,
# moe_topk_sum_kernels.py). No host sync anywhere: CUDA-graph safe.
# ----------------------------------------------------------------------------------------------------

# The down kernel's z_d partials ([BLOCK_M, NT_GU, BLOCK_R] fp32) are issued before its main loop and held
# in registers across it when they fit this bound (64 registers a thread at 4 warps); else summed after it.
HOIST_Z_ELEMS = 8192


class _Buffers(NamedTuple):
    act: torch.Tensor  # [N, I] x.dtype ([N, I + S*BLOCK_R] in the LoRA K step mode: z_d stacked beside a)
    ypair: torch.Tensor  # [N, H] x.dtype
    zgu: torch.Tensor  # [N, SPLIT, 2, BLOCK_R] fp32 (LoRA; K step mode [N, 2, S, BLOCK_R] x.dtype) else [0]
    zsh: torch.Tensor  # [T, SPLIT, 2, BLOCK_R] fp32 (shared-outer) else [0]
    zdp: torch.Tensor  # [N, NT_GU, BLOCK_R] fp32 (LoRA; segment mode [N, BLOCK_R]) else [0]
    zdw: torch.Tensor  # [N, BLOCK_R] fp32 (shared-outer) else [0]
    h: torch.Tensor  # [N, 2I] x.dtype (segment mode: the pre-activation of adapter rows) else [0]


def _buffer_specs(T: int, topk: int, H: int, I: int, dtype: torch.dtype, lora: MoELoraArgs | None,
                  cfg: dict[str, int]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    N = T * topk
    f32 = torch.float32
    if lora is None:
        return [((N, I), dtype), ((N, H), dtype)] + [((0,), f32)] * 5
    S = lora.gate_up_A.shape[0]
    br = lora_block_r(lora.gate_up_A.shape[2] // 2)
    if _lora_seg(lora, cfg):
        return [((N, I), dtype), ((N, H), dtype), ((N, 2 * br), f32), ((0,), f32), ((N, _seg_i_split(I, cfg), br), f32),
                ((0,), f32), ((N, 2 * I), dtype)]
    if _lora_k_step(lora, cfg):
        cw = compact_width(S, cfg["BLOCK_M"], _lora_compact(lora, cfg, N))
        return [((N, I + cw * br), dtype), ((N, H), dtype), ((N, 2, cw, br), dtype)] + [((0,), f32)] * 4
    specs: list[tuple[tuple[int, ...], torch.dtype]] = [((N, I), dtype), ((N, H), dtype)]
    shared = lora.shared_gate_up_A is not None or lora.shared_down_B is not None
    nt = triton.cdiv(I, cfg["BLOCK_N_GU"])
    specs.append(((N, cfg["SPLIT"], 2, br), f32))
    specs.append(((T, cfg["SPLIT"], 2, br) if shared else (0,), f32))
    specs.append(((N, nt, br), f32))
    specs.append(((N, br) if shared else (0,), f32))
    specs.append(((0,), f32))
    return specs


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return (n * torch.empty(0, dtype=dtype).element_size() + 255) // 256 * 256


def fused_moe_scratch_bytes(x: torch.Tensor, w13: torch.Tensor, topk: int, lora: MoELoraArgs | None = None) -> int:
    """Bytes of the `scratch` workspace one fused_moe call on x [T, H] needs (CUDA-graph runners
    allocate it once per captured T; a call may pass a larger buffer)."""
    T, H = x.shape
    E, two_i, _ = w13.shape
    cfg = call_config(T, topk, E, H, two_i // 2, x.device, lora)
    return sum(_nbytes(s, d) for s, d in _buffer_specs(T, topk, H, two_i // 2, x.dtype, lora, cfg))


def _carve(specs: list[tuple[tuple[int, ...], torch.dtype]], scratch: torch.Tensor | None,
           device: torch.device) -> _Buffers:
    if scratch is None:
        return _Buffers(*(torch.empty(s, dtype=d, device=device) for s, d in specs))
    need = sum(_nbytes(s, d) for s, d in specs)
    if scratch.dtype != torch.uint8 or scratch.dim() != 1 or scratch.numel() < need:
        raise ValueError(f"fused_moe: scratch must be a 1-D uint8 tensor of >= {need} bytes")
    out, off = [], 0
    for shape, dtype in specs:
        n = _nbytes(shape, dtype)
        numel = n // torch.empty(0, dtype=dtype).element_size()
        flat = scratch[off : off + n].view(dtype)[:numel]
        cnt = 1
        for d in shape:
            cnt *= d
        out.append(flat[:cnt].view(shape))
        off += n
    return _Buffers(*out)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    lora: MoELoraArgs | None = None,
    *,
    scratch: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Triton fused MoE (contract at the top of this file). No host sync: safe inside CUDA graphs.

    scratch: optional 1-D uint8 workspace of >= `fused_moe_scratch_bytes(x, w13, k, lora)` bytes.
    out: optional [T, H] output (x.dtype). config: optional block config (see `moe_config`).
    """
    T, H = x.shape
    E, two_i, h_w = w13.shape
    I = two_i // 2
    topk = topk_ids.shape[1] if topk_ids.dim() == 2 else -1
    if h_w != H or w2.shape != (E, H, I) or topk_ids.shape != (T, topk) or topk_weights.shape != (T, topk):
        raise ValueError(
            f"fused_moe: shapes x {tuple(x.shape)} w13 {tuple(w13.shape)} w2 {tuple(w2.shape)} "
            f"topk_ids {tuple(topk_ids.shape)} topk_weights {tuple(topk_weights.shape)} do not agree"
        )
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"fused_moe: x, w13, w2 dtypes differ ({x.dtype}, {w13.dtype}, {w2.dtype})")
    y = out if out is not None else torch.empty(T, H, dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    ids = topk_ids if topk_ids.dtype == torch.int32 else topk_ids.to(torch.int32)
    ids = ids.contiguous()
    weights = topk_weights.reshape(-1)
    cfg = call_config(T, topk, E, H, I, x.device, lora, config)
    bm = cfg["BLOCK_M"]
    buf = _carve(_buffer_specs(T, topk, H, I, x.dtype, lora, cfg), scratch, x.device)
    if lora is not None and (lora.token_slot.shape != (T,) or lora.token_slot.dtype != torch.int32):
        raise ValueError(f"fused_moe: lora.token_slot must be [{T}] int32, got "
                         f"{tuple(lora.token_slot.shape)} {lora.token_slot.dtype}")
    slot = lora.token_slot.contiguous() if lora is not None else ids  # (without LoRA: a pointer never read)
    # with LoRA the alignment also lays out each row's adapter slot beside its pair id (sorted_slot)
    k_step = _lora_k_step(lora, cfg)
    seg = _lora_seg(lora, cfg)
    compact = _lora_compact(lora, cfg, T * topk)
    # (K step mode: per-block counters, zeroed with the alignment's counts: the gate_up kernel's I tiles stored,
    # then the down shrink's parts; the down shrink and the down kernel start each block on them)
    max_blocks = max_padded_size(T * topk, E, bm) // bm
    align = moe_align(ids, E, bm, row_slots=slot if lora is not None else None,
                      zeros=2 * max_blocks if k_step else 0)
    # (without the K step: x, a pointer never read)
    act_ready, zd_ready = align.zeros.view(2, max_blocks) if align.zeros is not None else (x, x)
    row_slot = align.sorted_slot if align.sorted_slot is not None else align.sorted_ids
    N = T * topk
    cast = interpreting()
    # fp32 (a CPU/debug dtype) on a GPU: exact fp32 products and tiles that fit in shared memory
    prec = dot_precision(x.dtype)
    if x.dtype == torch.float32 and not cast:
        cfg = {**cfg, "BLOCK_K_GU": min(cfg["BLOCK_K_GU"], 64), "BLOCK_K_D": min(cfg["BLOCK_K_D"], 64),
               "num_stages": min(cfg["num_stages"], 2)}
    pdl = use_pdl(x.device)
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], USE_PDL=pdl, launch_pdl=pdl)

    has_lora = lora is not None and not seg  # (the segment schedule runs the GEMMs without LoRA)
    S = R = 0
    br = 16
    has_shared = False
    dummy = x  # pointer for arguments a launch never reads
    gu_b = d_a = d_b = sh_b = dummy
    if lora is not None:
        S, _, two_r, _ = lora.gate_up_A.shape
        R = two_r // 2
        br = lora_block_r(R)
        for name, t, shape in (("gate_up_A", lora.gate_up_A, (S, E, 2 * R, H)),
                               ("gate_up_B", lora.gate_up_B, (S, E, 2 * I, R)),
                               ("down_A", lora.down_A, (S, E, R, I)), ("down_B", lora.down_B, (S, E, H, R))):
            if tuple(t.shape) != shape or t.dtype != x.dtype:
                raise ValueError(f"fused_moe: lora.{name} is {tuple(t.shape)} {t.dtype}, expected {shape} {x.dtype}")
        has_shared = lora.shared_gate_up_A is not None or lora.shared_down_B is not None
        lora = lora._replace(token_slot=slot)
        gu_b, d_a, d_b = lora.gate_up_B, lora.down_A, lora.down_B
        if has_shared:
            zero_a = torch.zeros(S, 2 * R, H, dtype=x.dtype, device=x.device)
            zero_b = torch.zeros(S, H, R, dtype=x.dtype, device=x.device)
            sh_a = lora.shared_gate_up_A if lora.shared_gate_up_A is not None else zero_a
            sh_b = lora.shared_down_B if lora.shared_down_B is not None else zero_b
            lora = lora._replace(shared_gate_up_A=sh_a, shared_down_B=sh_b)
        if seg:
            seg_m = cfg.get("SEG_M", SEG_M)
            valign = seg_align(ids, lora, E, seg_m)
            moe_lora_seg_shrink(x, lora, valign, topk, buf.zgu, seg_m=seg_m, cast_fp32=cast, dot_prec=prec)
        else:
            moe_lora_shrink(x, lora, align.sorted_ids, align.block_expert, align.num_padded, topk, bm,
                            cfg["SPLIT"], buf.zgu, buf.zsh if has_shared else None, stacked=k_step,
                            compact=compact, sub_m=cfg.get("SHRINK_M"), cast_fp32=cast, dot_prec=prec)
    nt_gu = triton.cdiv(I, cfg["BLOCK_N_GU"])
    sg = _epilogue_slot_group(S, br, cfg)
    nt_p2 = triton.next_power_of_2(nt_gu)
    prefetch = bool(cfg.get("PREFETCH", 0)) and (sg >= S or compact)
    nt_chunk = max(1, min(nt_p2, 4096 // (bm * br)))  # the down kernel sums each row's own partials
    _gate_up_kernel[(max_blocks * nt_gu,)](
        x, w13, buf.act, align.sorted_ids, align.block_expert, align.num_padded,
        row_slot, buf.zgu, buf.zsh, gu_b, d_a, buf.zdp, act_ready, buf.h if seg else x,
        N, topk, H, I, S, R,
        x.stride(0), x.stride(1), *w13.stride(), buf.act.stride(0),
        *(gu_b.stride() if has_lora else (0, 0, 0, 0)), *(d_a.stride() if has_lora else (0, 0, 0, 0)),
        BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N_GU"], BLOCK_K=cfg["BLOCK_K_GU"], GROUP_M=cfg["GROUP_M"],
        HAS_LORA=has_lora, HAS_SHARED=has_shared, SPLIT=cfg["SPLIT"], BLOCK_R=br, SG=sg,
        EVEN_K=H % cfg["BLOCK_K_GU"] == 0, CAST_FP32=cast, DOT_PREC=prec, LORA_K=k_step, PREFETCH=prefetch,
        ONE_GROUP=sg >= S, COMPACT=compact, SP=triton.next_power_of_2(S) if compact else 1, H_OUT=seg, **launch,
    )
    if seg:
        assert lora is not None
        moe_lora_seg_expand(buf.h, buf.zgu, lora, valign, buf.act, buf.zdp, seg_m=seg_m, cast_fp32=cast,
                            dot_prec=prec)
    if k_step:
        assert lora is not None
        moe_lora_down_shrink(buf.act, lora, align.sorted_ids, align.block_expert, align.num_padded, topk, bm,
                             act_ready, zd_ready, nt_gu, compact=compact, sub_m=cfg.get("SHRINK_M"),
                             block_k=min(64, cfg["BLOCK_K_D"]),
                             cast_fp32=cast, dot_prec=prec)
    _down_kernel[(max_blocks * triton.cdiv(H, cfg["BLOCK_N_D"]),)](
        buf.act, w2, buf.ypair, weights, align.sorted_ids, align.block_expert, align.num_padded,
        row_slot, buf.zdp, d_b, buf.zdw, act_ready, zd_ready,
        N, topk, H, I, S, R, nt_gu, bm // shrink_sub_m(bm, cfg.get("SHRINK_M")),
        buf.act.stride(0), *w2.stride(), buf.ypair.stride(0),
        *(d_b.stride() if has_lora else (0, 0, 0, 0)),
        BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N_D"], BLOCK_K=cfg["BLOCK_K_D"], GROUP_M=cfg["GROUP_M"],
        HAS_LORA=has_lora, HAS_SHARED=has_shared, BLOCK_R=br, NT_GU=nt_gu, NT_CHUNK=nt_chunk, SG=sg,
        EVEN_K=I % cfg["BLOCK_K_D"] == 0, CAST_FP32=cast, DOT_PREC=prec, LORA_K=k_step, PREFETCH=prefetch,
        ONE_GROUP=sg >= S, WAIT_READY=k_step and pdl,
        HOIST_Z=nt_p2 if bm * nt_p2 * br <= HOIST_Z_ELEMS else 0, COMPACT=compact,
        SP=triton.next_power_of_2(S) if compact else 1, **launch,
    )
    if seg:
        assert lora is not None
        moe_lora_seg_down_expand(buf.ypair, buf.zdp, weights, lora, valign, seg_m=seg_m, cast_fp32=cast,
                                 dot_prec=prec)
    block_t = 16
    block_h = min(256, triton.next_power_of_2(H))
    _topk_sum_kernel[(triton.cdiv(T, block_t), triton.cdiv(H, block_h))](
        buf.ypair, ids, y, slot, buf.zdw, sh_b,
        T, E, H, S, R,
        buf.ypair.stride(0), y.stride(0), *(sh_b.stride() if has_shared else (0, 0, 0)),
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_R=br, HAS_SHARED=has_shared, CAST_FP32=cast, DOT_PREC=prec,
        num_warps=4, USE_PDL=pdl, launch_pdl=pdl, TOPK=topk, K_P2=triton.next_power_of_2(topk),
    )
    return y
