"""The device-side adapter slab: `max_loras` slots of rank `max_lora_rank`, loaded and evicted in place.

Per layer the pool allocates, once, the slabs the layers read (S slots, R = max_lora_rank):
    attn.qkv      A [S, 3R, H]          B [S, q+k+v, R]
    attn.o        A [S, R, q]           B [S, H, R]
    dense mlp / shared expert: gate_up A [S, 2R, H], B [S, 2I, R]; down A [S, R, I], B [S, H, R]
    MoE experts   the MoELoraArgs slab of kernels/moe_lora.py ([S, E, 2R, H], [S, E, 2I, R], [S, E, R, I],
                  [S, E, H, R], plus shared_gate_up_A [S, 2R, H] / shared_down_B [S, H, R] when any
                  registered adapter is shared-outer)
Only the (layer, module) slabs some registered adapter targets are allocated (known at start-up, so a
graph captured later sees a fixed set; a layer without a slab does no LoRA work). Loading copies an
adapter into a slot in place (zero-padded past its rank); evicting zeroes the slot in place. Buffers
are never re-allocated.

Adapters live on the host in canonical form (pinned on CUDA), at most `max_cpu_loras` of them; others
are re-read through `loader` when wanted again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from lorax.adapters.canonical import CanonicalAdapter, LoraPair, MoELora
from lorax.errors import AdapterError
from lorax.inference.config import ModelConfig
from lorax.inference.layers.linear import LoraLinear
from lorax.inference.layers.mlp import GatedMLP
from lorax.inference.layers.moe import MoESlab, SparseMoE
from lorax.inference.models.decoder import DecoderLM

# module name (canonical) -> (fused layer attribute path, slice index)
_QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}


def _dense_targets(mcfg: ModelConfig, layer: int) -> dict[str, tuple[int, int]]:
    """Canonical dense module -> (in, out) features it must have in `layer`."""
    H, q, kv = mcfg.hidden_size, mcfg.q_size, mcfg.kv_size
    out = {
        "self_attn.q_proj": (H, q),
        "self_attn.k_proj": (H, kv),
        "self_attn.v_proj": (H, kv),
        "self_attn.o_proj": (q, H),
    }
    if mcfg.layer_is_moe[layer]:
        if mcfg.shared_expert_intermediate_size:
            i = mcfg.shared_expert_intermediate_size
            out.update({
                "mlp.shared_expert.gate_proj": (H, i),
                "mlp.shared_expert.up_proj": (H, i),
                "mlp.shared_expert.down_proj": (i, H),
            })
    else:
        i = mcfg.intermediate_size
        out.update({"mlp.gate_proj": (H, i), "mlp.up_proj": (H, i), "mlp.down_proj": (i, H)})
    return out


def check_adapter(adapter: CanonicalAdapter, mcfg: ModelConfig, max_rank: int) -> None:
    """Raise AdapterError naming the first thing that does not fit this model / engine."""
    where = f"adapter {adapter.name!r}"
    if adapter.extra:
        raise AdapterError(f"{where}: tensors lorax cannot apply: {sorted(adapter.extra)[:4]} (embedding/lm_head LoRA)")
    if adapter.rank > max_rank:
        raise AdapterError(f"{where}: rank {adapter.rank} exceeds max_lora_rank={max_rank}; raise max_lora_rank")
    for (layer, module), pair in adapter.dense.items():
        if not 0 <= layer < mcfg.num_layers:
            raise AdapterError(f"{where}: layer {layer} ({module}) but the model has {mcfg.num_layers} layers")
        targets = _dense_targets(mcfg, layer)
        if module not in targets:
            raise AdapterError(f"{where}: layer {layer} has no module {module!r} in this {mcfg.model_type} model")
        fin, fout = targets[module]
        if tuple(pair.A.shape) != (pair.rank, fin) or tuple(pair.B.shape) != (fout, pair.rank):
            raise AdapterError(
                f"{where}: layers.{layer}.{module} A {tuple(pair.A.shape)} / B {tuple(pair.B.shape)} does not fit "
                f"[r, {fin}] / [{fout}, r] (an adapter for another model?)"
            )
    E, H, inter = mcfg.num_experts, mcfg.hidden_size, mcfg.moe_intermediate_size
    for layer, m in adapter.moe.items():
        if not 0 <= layer < mcfg.num_layers or not mcfg.layer_is_moe[layer]:
            raise AdapterError(f"{where}: expert LoRA for layer {layer}, which is not a MoE layer of this model")
        r = m.rank
        want = {
            "gate_up_A": ((E, 2 * r, H), (1, 2 * r, H)),
            "gate_up_B": ((E, 2 * inter, r),),
            "down_A": ((E, r, inter),),
            "down_B": ((E, H, r), (1, H, r)),
        }
        for name, shapes in want.items():
            got = tuple(getattr(m, name).shape)
            if got not in shapes:
                raise AdapterError(
                    f"{where}: layers.{layer} experts {name} {got} does not fit {shapes[0]} "
                    f"(E={E}, H={H}, I={inter}; an adapter for another model?)"
                )


class _DenseSlab:
    def __init__(self, layer: LoraLinear, S: int, R: int) -> None:
        self.A, self.B = layer.alloc_lora(S, R)  # A may be a view under the layer's weight
        self.offsets = layer.slice_offsets
        self.R = R

    def zero(self, slot: int) -> None:
        self.A[slot].zero_()
        self.B[slot].zero_()

    def put(self, slot: int, index: int, pair: LoraPair) -> None:
        r = pair.rank
        self.A[slot, index * self.R : index * self.R + r].copy_(pair.A, non_blocking=True)
        lo, hi = self.offsets[index], self.offsets[index + 1]
        self.B[slot, lo:hi, :r].copy_(pair.B, non_blocking=True)


def _moe_slab(moe: SparseMoE, S: int, R: int, shared_a: bool, shared_b: bool) -> MoESlab:
    E, twoI, H = moe.w13.shape
    inter = twoI // 2
    kw = {"dtype": moe.w13.dtype, "device": moe.w13.device}
    slab = MoESlab(
        torch.zeros(S, E, 2 * R, H, **kw),
        torch.zeros(S, E, 2 * inter, R, **kw),
        torch.zeros(S, E, R, inter, **kw),
        torch.zeros(S, E, H, R, **kw),
        torch.zeros(S, 2 * R, H, **kw) if shared_a else None,
        torch.zeros(S, H, R, **kw) if shared_b else None,
    )
    moe.lora = slab
    return slab


def _slab_tensors(slab: MoESlab) -> list[torch.Tensor]:
    out = [slab.gate_up_A, slab.gate_up_B, slab.down_A, slab.down_B]
    return out + [t for t in (slab.shared_gate_up_A, slab.shared_down_B) if t is not None]


class LoraPool:
    def __init__(
        self,
        model: DecoderLM,
        mcfg: ModelConfig,
        max_loras: int,
        max_rank: int,
        adapters: dict[str, CanonicalAdapter],
        loader: Callable[[str], CanonicalAdapter] | None = None,
        max_cpu_loras: int | None = None,
    ) -> None:
        self.mcfg = mcfg
        self.S, self.R = max_loras, max_rank
        self.loader = loader
        self.names = list(adapters)
        self.max_cpu = max_cpu_loras
        self.device = model.lm_head_weight.device
        for adapter in adapters.values():
            check_adapter(adapter, mcfg, max_rank)
        self._host: OrderedDict[str, CanonicalAdapter] = OrderedDict()
        for name, adapter in adapters.items():
            self._remember(name, adapter)

        wanted = {(layer, mod) for a in adapters.values() for (layer, mod) in a.dense}
        moe_layers = {layer for a in adapters.values() for layer in a.moe}
        shared_a = any(m.shared_gate_up_A for a in adapters.values() for m in a.moe.values())
        shared_b = any(m.shared_down_B for a in adapters.values() for m in a.moe.values())
        # (layer, canonical module) -> (slab, slice index); only kinds some adapter targets
        self._dense: dict[tuple[int, str], tuple[_DenseSlab, int]] = {}
        self._moe: dict[int, MoESlab] = {}
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.attn, layer.mlp
            if any((i, mod) in wanted for mod in _QKV):
                slab = _DenseSlab(attn.qkv, self.S, self.R)
                for mod, idx in _QKV.items():
                    self._dense[(i, mod)] = (slab, idx)
            if (i, "self_attn.o_proj") in wanted:
                self._dense[(i, "self_attn.o_proj")] = (_DenseSlab(attn.o, self.S, self.R), 0)
            mlp_prefix = None
            dense_mlp: GatedMLP | None = None
            if isinstance(mlp, GatedMLP):
                mlp_prefix, dense_mlp = "mlp.", mlp
            elif mlp.shared is not None:
                mlp_prefix, dense_mlp = "mlp.shared_expert.", mlp.shared
            if dense_mlp is not None and mlp_prefix is not None:
                names = (mlp_prefix + "gate_proj", mlp_prefix + "up_proj")
                if any((i, n) in wanted for n in names):
                    slab = _DenseSlab(dense_mlp.gate_up, self.S, self.R)
                    self._dense[(i, names[0])], self._dense[(i, names[1])] = (slab, 0), (slab, 1)
                if (i, mlp_prefix + "down_proj") in wanted:
                    self._dense[(i, mlp_prefix + "down_proj")] = (_DenseSlab(dense_mlp.down, self.S, self.R), 0)
            if isinstance(mlp, SparseMoE) and i in moe_layers:
                self._moe[i] = _moe_slab(mlp, self.S, self.R, shared_a, shared_b)

        # Rank of the adapter in each slot, on the device, updated in place (kernels skip empty slots).
        self.slot_rank = torch.zeros(self.S, dtype=torch.int32, device=self.device)
        self.slot_name: list[str | None] = [None] * self.S
        self.slot_shared = [False] * self.S  # host: the slot's adapter has a shared-outer MoE module
        self.slot_of: dict[str, int] = {}
        self.refcount = [0] * self.S
        self.last_used = [0] * self.S
        self._tick = 0
        self.num_loads = 0  # slot loads so far (how much the scheduler made the pool thrash)

    # ---- host side -------------------------------------------------------------------------------
    def _remember(self, name: str, adapter: CanonicalAdapter) -> None:
        if self.device.type == "cuda":
            _pin(adapter)
        self._host[name] = adapter
        self._host.move_to_end(name)
        while self.max_cpu is not None and len(self._host) > self.max_cpu and self.loader is not None:
            self._host.popitem(last=False)

    def _host_adapter(self, name: str) -> CanonicalAdapter:
        if name in self._host:
            self._host.move_to_end(name)
            return self._host[name]
        if self.loader is None:
            raise AdapterError(f"adapter {name!r} is no longer on the host and has no loader")
        adapter = self.loader(name)
        check_adapter(adapter, self.mcfg, self.R)
        self._remember(name, adapter)
        return adapter

    @property
    def nbytes(self) -> int:
        """Device bytes of the slab (every slot, every layer)."""
        seen: dict[int, torch.Tensor] = {}
        for slab, _ in self._dense.values():
            seen[id(slab.A)], seen[id(slab.B)] = slab.A, slab.B
        for moe in self._moe.values():
            for t in _slab_tensors(moe):
                seen[id(t)] = t
        return sum(t.numel() * t.element_size() for t in seen.values())

    # ---- slots -----------------------------------------------------------------------------------
    @property
    def has_slabs(self) -> bool:
        return bool(self._dense or self._moe)

    def can_acquire(self, name: str) -> bool:
        return name in self.slot_of or any(n is None or c == 0 for n, c in zip(self.slot_name, self.refcount, strict=True))

    def acquire(self, name: str) -> int | None:
        """The slot holding `name`, loading it (evicting the least recently used idle slot) if needed.
        None when every slot is pinned by running requests."""
        self._tick += 1
        slot = self.slot_of.get(name)
        if slot is None:
            free = [s for s in range(self.S) if self.slot_name[s] is None]
            idle = [s for s in range(self.S) if self.refcount[s] == 0]
            if free:
                slot = free[0]
            elif idle:
                slot = min(idle, key=lambda s: self.last_used[s])
            else:
                return None
            self._load(slot, name)
        self.refcount[slot] += 1
        self.last_used[slot] = self._tick
        return slot

    def release(self, slot: int) -> None:
        if slot >= 0:
            self.refcount[slot] -= 1
            assert self.refcount[slot] >= 0, "slot released more often than acquired"

    def evict(self, slot: int) -> None:
        """Zero a slot in place (its buffers stay where graphs captured them)."""
        assert self.refcount[slot] == 0, "cannot evict a slot in use"
        old = self.slot_name[slot]
        if old is not None:
            del self.slot_of[old]
        self.slot_name[slot] = None
        self.slot_shared[slot] = False
        self.slot_rank[slot] = 0
        for slab in {id(slab): slab for slab, _ in self._dense.values()}.values():  # qkv appears 3 times
            slab.zero(slot)
        for moe in self._moe.values():
            for t in _slab_tensors(moe):
                t[slot].zero_()

    def _load(self, slot: int, name: str) -> None:
        adapter = self._host_adapter(name)
        self.evict(slot)
        self.num_loads += 1
        for key, pair in adapter.dense.items():
            slab, idx = self._dense[key]
            slab.put(slot, idx, pair)
        for layer, m in adapter.moe.items():
            _put_moe(self._moe[layer], slot, m, self.R)
        self.slot_name[slot] = name
        self.slot_of[name] = slot
        self.slot_shared[slot] = any(m.shared_gate_up_A or m.shared_down_B for m in adapter.moe.values())
        self.slot_rank[slot] = adapter.rank


def _put_moe(slab: MoESlab, slot: int, m: MoELora, R: int) -> None:
    r = m.rank
    if m.shared_gate_up_A:
        assert slab.shared_gate_up_A is not None
        slab.shared_gate_up_A[slot, :r].copy_(m.gate_up_A[0, :r], non_blocking=True)
        slab.shared_gate_up_A[slot, R : R + r].copy_(m.gate_up_A[0, r:], non_blocking=True)
    else:
        slab.gate_up_A[slot, :, :r].copy_(m.gate_up_A[:, :r], non_blocking=True)
        slab.gate_up_A[slot, :, R : R + r].copy_(m.gate_up_A[:, r:], non_blocking=True)
    slab.gate_up_B[slot, :, :, :r].copy_(m.gate_up_B, non_blocking=True)
    slab.down_A[slot, :, :r].copy_(m.down_A, non_blocking=True)
    if m.shared_down_B:
        assert slab.shared_down_B is not None
        slab.shared_down_B[slot, :, :r].copy_(m.down_B[0], non_blocking=True)
    else:
        slab.down_B[slot, :, :, :r].copy_(m.down_B, non_blocking=True)


def _pin(adapter: CanonicalAdapter) -> None:
    """Pin host tensors so slot loads are asynchronous copies."""
    for pair in adapter.dense.values():
        pair.A, pair.B = pair.A.pin_memory(), pair.B.pin_memory()
    for m in adapter.moe.values():
        m.gate_up_A, m.gate_up_B = m.gate_up_A.pin_memory(), m.gate_up_B.pin_memory()
        m.down_A, m.down_B = m.down_A.pin_memory(), m.down_B.pin_memory()


__all__ = ["LoraPool", "check_adapter"]
