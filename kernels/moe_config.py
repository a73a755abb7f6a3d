"""Which block config and which LoRA schedule one fused_moe call runs (kernels/fused_moe.py launches them).

Block configs: kernels/configs/fused_moe.json, keyed by device name, then "E{E}_H{H}_I{I}_k{k}", then the
smallest token-count bucket >= T (a bucket may hold a "lora" entry for calls with adapters); missing entries
fall back to `_default_config`. The LoRA schedules (kernels/moe_lora.py, moe_lora_seg.py): the GEMMs'
epilogues (decode), K steps of the GEMMs (LORA_K, prefill), or segments of one virtual expert (LORA_SEG, many
adapters in use at prefill sizes). `call_config` decides for a call; the `_lora_*` predicates read a config.
Host ints only: nothing here touches device data.
"""

from __future__ import annotations

import torch
import triton

from lorax.kernels._common import interpreting, tuned_buckets
from lorax.kernels.moe_lora import MoELoraArgs, lora_block_r, slot_group, use_compact
from lorax.kernels.moe_lora_seg import EXPAND_LAUNCH, SEG_I_SPLIT

_PREFILL_PAIRS = 48  # pairs per expert past which `_default_config` takes its prefill tile


def _prefill_sized(T: int, topk: int, E: int) -> bool:
    """More than _PREFILL_PAIRS pairs per expert: the heuristic's prefill regime (`_default_config`)."""
    return T * topk / max(E, 1) > _PREFILL_PAIRS


def _default_config(T: int, topk: int, E: int) -> dict[str, int]:
    pairs_per_expert = T * topk / max(E, 1)
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N_GU=16, BLOCK_K_GU=16, BLOCK_N_D=16, BLOCK_K_D=16, GROUP_M=1, SPLIT=1,
                    num_warps=4, num_stages=1)
    # decode: the H100 sweep's pick at 8-32 tokens on Qwen3-30B-A3B and OLMoE (SPLIT 8 won at every size)
    if pairs_per_expert <= 4:
        return dict(BLOCK_M=16, BLOCK_N_GU=32, BLOCK_K_GU=256, BLOCK_N_D=64, BLOCK_K_D=256, GROUP_M=1, SPLIT=8,
                    num_warps=4, num_stages=3)
    if not _prefill_sized(T, topk, E):
        return dict(BLOCK_M=32, BLOCK_N_GU=64, BLOCK_K_GU=128, BLOCK_N_D=64, BLOCK_K_D=128, GROUP_M=1, SPLIT=2,
                    num_warps=4, num_stages=4)
    return dict(BLOCK_M=64, BLOCK_N_GU=64, BLOCK_K_GU=64, BLOCK_N_D=128, BLOCK_K_D=64, GROUP_M=8, SPLIT=1,
                num_warps=4, num_stages=4)


def moe_config(T: int, topk: int, E: int, H: int, I: int, device: torch.device,
               lora: bool = False) -> dict[str, int]:
    """Block config for one fused_moe call (host ints only). A tuned bucket may hold a "lora" entry:
    the config measured fastest with adapters, used for calls that pass LoRA arguments (it may also set
    STACK_ELEMS, the slot-stacking bound of the LoRA epilogues; see `slot_group`)."""
    by_shape = tuned_buckets("fused_moe.json", device, f"E{E}_H{H}_I{I}_k{topk}")
    if by_shape:
        # the smallest tuned bucket >= T; past the largest one, that one if it is a prefill bucket as T is a
        # prefill size (its tile then holds: at 8192 tokens on an H100 the 2048-token tile took 1.44 ms
        # where the heuristic's took 1.94), else the heuristic (a decode tile is no prefill tile)
        buckets = sorted(int(b) for b in by_shape)
        pick = next((b for b in buckets if b >= T), None)
        if pick is None and _prefill_sized(buckets[-1], topk, E) and _prefill_sized(T, topk, E):
            pick = buckets[-1]
        if pick is not None:
            entry = dict(by_shape[str(pick)])
            with_lora = entry.pop("lora", None)
            return {**_default_config(T, topk, E), **(with_lora if lora and with_lora else entry)}
    return _default_config(T, topk, E)


# Slots stacked per LoRA dot in the GEMM epilogues (`slot_group`): BLOCK_M * SG * BLOCK_R <= STACK_ELEMS
# keeps the stacked operands in registers beside the accumulators (no spills at BLOCK_M 16..64 on
# sm_90). A tuned "lora" config may set its own STACK_ELEMS (moe_tune tries wider stacks).
STACK_ELEMS = 1024


def _lora_k_step(lora: MoELoraArgs | None, cfg: dict[str, int]) -> bool:
    """Whether a call runs the LoRA as K steps of the GEMMs (config key LORA_K; SPLIT 1 and no
    shared-outer adapters) rather than in their epilogues."""
    return (lora is not None and bool(cfg.get("LORA_K", 0)) and cfg["SPLIT"] == 1
            and lora.shared_gate_up_A is None and lora.shared_down_B is None and not _lora_seg(lora, cfg))


# The segment schedule (kernels/moe_lora_seg.py): from SEG_MIN_SLOTS slots in use at prefill sizes (more than
# _PREFILL_PAIRS pairs per expert: never in a decode graph, which cannot see the step's adapter mix). H100,
# Qwen3-30B-A3B layer, rank 16, tokens spread over the slots, MoE+LoRA / base, K step -> segments: 40 slots
# 1.56 -> 1.53 at 256 tokens, 1.86 -> 1.73 at 512, 2.34 -> 1.98 at 1024, 2.64 -> 2.02 at 2048, 2.89 -> 1.57 at
# 8192; 16 slots 1.42 -> 1.39 at 256, 1.49 -> 1.52 at 512, 1.59 -> 1.57 at 1024, 1.68 -> 1.54 at 2048, 1.77 ->
# 1.39 at 8192; 8 slots 1.25 -> 1.30 at 256, 1.30 -> 1.36 at 2048, 1.31 -> 1.33 at 8192 (docs/KERNEL_NOTES.md)
SEG_MIN_SLOTS = 16


def _lora_seg(lora: MoELoraArgs | None, cfg: dict[str, int]) -> bool:
    """Whether a call runs the LoRA by segments of one virtual expert (config key LORA_SEG; no shared-outer
    adapters): the base GEMMs alone, the LoRA as grouped GEMMs around them."""
    return (lora is not None and bool(cfg.get("LORA_SEG", 0))
            and lora.shared_gate_up_A is None and lora.shared_down_B is None)


def use_seg(lora: MoELoraArgs, T: int, topk: int, E: int) -> bool:
    """Whether a call's default schedule is the segment one: no shared-outer adapters, and the slots in use
    (lora.active_slots, else every registered slot) many enough for the pairs per expert."""
    if lora.shared_gate_up_A is not None or lora.shared_down_B is not None:
        return False
    active = lora.gate_up_A.shape[0] if lora.active_slots is None else lora.active_slots
    return active >= SEG_MIN_SLOTS and _prefill_sized(T, topk, E)


def _seg_i_split(I: int, cfg: dict[str, int]) -> int:
    """The segment expand's programs per virtual block (config key SEG_I_SPLIT), at most its I tiles."""
    return max(1, min(cfg.get("SEG_I_SPLIT", SEG_I_SPLIT), triton.cdiv(I, EXPAND_LAUNCH["block_i"])))


def call_config(T: int, topk: int, E: int, H: int, I: int, device: torch.device, lora: MoELoraArgs | None,
                config: dict[str, int] | None = None) -> dict[str, int]:
    """The block config one fused_moe call runs with: `config` if given, else `moe_config`'s; with many slots
    in use at prefill sizes (`use_seg`) the base entry's tiles with LORA_SEG, the segment schedule."""
    if config is not None:
        return config
    if lora is not None and use_seg(lora, T, topk, E):
        return {**moe_config(T, topk, E, H, I, device, False), "LORA_SEG": 1}
    return moe_config(T, topk, E, H, I, device, lora is not None)


def _lora_compact(lora: MoELoraArgs | None, cfg: dict[str, int], pairs: int) -> bool:
    """Whether the LoRA's slot groups follow each block's own distinct slots instead of every registered slot
    (config key COMPACT; else for the K step `use_compact` from the slots, the block rows and the pairs per
    expert, and for the epilogue path whenever the slots take more than one group: a decode block of a few
    rows then takes one group, whose tiles PREFETCH issues before the main loops, whatever the slots). The
    segment schedule has no slot groups."""
    if lora is None or _lora_seg(lora, cfg):
        return False
    if "COMPACT" in cfg:
        return bool(cfg["COMPACT"])
    S, E, two_r = lora.gate_up_A.shape[:3]
    if _lora_k_step(lora, cfg):
        return use_compact(S, cfg["BLOCK_M"], pairs, E)
    return _epilogue_slot_group(S, lora_block_r(two_r // 2), cfg) < S


def _epilogue_slot_group(S: int, br: int, cfg: dict[str, int]) -> int:
    """Slots stacked per LoRA dot in the GEMM epilogues."""
    return slot_group(S, cfg["BLOCK_M"], br, cfg.get("STACK_ELEMS", STACK_ELEMS))
