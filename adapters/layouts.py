"""Write side: canonical tensors -> one on-disk layout, streamed into safetensors + adapter_config.json.

Scaling choice: canonical B already carries alpha/r, so the writer stores B unchanged and writes
``lora_alpha == r`` (and ``alpha_pattern[k] == rank_pattern[k]``, ``use_rslora: false``): every module's
scaling is exactly 1.0 and a re-read reproduces the canonical tensors bit for bit.

Layouts (E experts, r rank, H hidden, I intermediate; dense modules are the same in all of them):
    peft, per-expert  {P}{i}.mlp.experts.{e}.gate_proj|up_proj|down_proj (Mixtral: block_sparse_moe ... w1|w3|w2)
    fused             {P}{i}.mlp.experts[.base_layer].lora_A [E*r, in] / lora_B [out, r*E] (rank-major B)
    shared-outer      {P}{i}.mlp.experts.w1|w3|w2 with the outer factor stored once ([1, ...])
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from lorax.adapters.canonical import CanonicalAdapter, LoraPair, MoELora
from lorax.adapters.formats import MIXTRAL_NAMES, QWEN_NAMES
from lorax.adapters.tensor_io import SafetensorsWriter, write_json_atomic
from lorax.errors import AdapterError

LAYOUTS = ("peft", "per-expert", "fused", "shared-outer")
WEIGHTS_FILE = "adapter_model.safetensors"


def _rank_major(b3: torch.Tensor) -> torch.Tensor:
    """[E, out, r] -> PEFT's [out, r*E] with column j*E + e = b3[e, :, j]."""
    return b3.permute(1, 2, 0).reshape(b3.shape[1], -1)


def _block_diag_gate_up(b: torch.Tensor, r: int) -> torch.Tensor:
    """[E, 2I, r] with gate rows on z[:r], up rows on z[r:] -> [E, 2I, 2r] block diagonal."""
    inter = b.shape[1] // 2
    out = b.new_zeros(b.shape[0], 2 * inter, 2 * r)
    out[:, :inter, :r] = b[:, :inter]
    out[:, inter:, r:] = b[:, inter:]
    return out


def _one_outer(t: torch.Tensor, what: str, layer: int) -> torch.Tensor:
    """[E|1, ...] -> [1, ...]; refuse (never average) when the experts' factors differ."""
    if t.shape[0] == 1:
        return t
    if not all(torch.equal(t[0], t[e]) for e in range(1, t.shape[0])):
        raise AdapterError(f"layer {layer}: {what} differs across experts, so the adapter cannot be written "
                           "shared-outer (that would need an average, which changes the adapter)")
    return t[:1]


class AdapterWriter:
    """Streams one adapter into ``dest/adapter_model.safetensors`` and writes its config last."""

    def __init__(self, dest: str | Path, layout: str, *, key_prefix: str, expert_naming: str,
                 base_model: str | None = None) -> None:
        if layout not in LAYOUTS:
            raise AdapterError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
        self.dest = Path(dest)
        self.layout = layout
        # PEFT only loads keys under base_model.model.; other prefixes (bare "model.layers.") gain it.
        self.prefix = key_prefix if key_prefix.startswith("base_model.model.") else f"base_model.model.{key_prefix}"
        self.naming = expert_naming
        self.base_model = base_model
        self._out = SafetensorsWriter(self.dest / WEIGHTS_FILE)
        self._ranks: dict[str, int] = {}  # model-side module path -> rank written
        self._targets: set[str] = set()
        self._params: set[str] = set()

    def _path(self, layer: int, module: str) -> str:
        prefix = self.prefix[len("base_model.model."):] if self.prefix.startswith("base_model.model.") else self.prefix
        return f"{prefix}{layer}.{module}"

    def _pair(self, layer: int, module: str, a: torch.Tensor, b: torch.Tensor, rank: int) -> None:
        base = f"{self.prefix}{layer}.{module}"
        self._out.add(f"{base}.lora_A.weight", a)
        self._out.add(f"{base}.lora_B.weight", b)
        self._ranks[self._path(layer, module)] = rank

    def add_dense(self, layer: int, module: str, pair: LoraPair) -> None:
        self._pair(layer, module, pair.A, pair.B, pair.rank)
        self._targets.add(module.rsplit(".", 1)[-1])

    def add_extra(self, key: str, tensor: torch.Tensor) -> None:
        self._out.add(key, tensor)

    def add_moe(self, layer: int, moe: MoELora) -> None:
        if self.layout in ("peft", "per-expert"):
            self._per_expert(layer, moe)
        elif self.layout == "fused":
            self._fused(layer, moe)
        else:
            self._shared_outer(layer, moe)

    def _part(self, moe: MoELora, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        r, inter = moe.rank, moe.gate_up_B.shape[1] // 2
        if part == "gate":
            return moe.gate_up_A[:, :r], moe.gate_up_B[:, :inter]
        if part == "up":
            return moe.gate_up_A[:, r:], moe.gate_up_B[:, inter:]
        return moe.down_A, moe.down_B

    def _per_expert(self, layer: int, moe: MoELora) -> None:
        mixtral = self.naming == "mixtral"
        names, container = (MIXTRAL_NAMES, "block_sparse_moe.experts") if mixtral else (QWEN_NAMES, "mlp.experts")
        for part in moe.parts:
            a, b = self._part(moe, part)
            for e in range(moe.num_experts):
                ae, be = a[e if a.shape[0] > 1 else 0], b[e if b.shape[0] > 1 else 0]
                self._pair(layer, f"{container}.{e}.{names[part]}", ae, be, moe.rank)
            self._targets.add(names[part])

    def _fused(self, layer: int, moe: MoELora) -> None:
        num, r = moe.num_experts, moe.rank
        gate_up = "gate" in moe.parts or "up" in moe.parts
        down = "down" in moe.parts
        if gate_up:
            a = moe.gate_up_A.expand(num, -1, -1)
            if "up" not in moe.parts or torch.equal(a[:, :r], a[:, r:]):
                # one A for both halves (PEFT's native rank-r form); an absent half has B rows of zeros
                a3, b3, rank = a[:, :r], moe.gate_up_B, r
            elif "gate" not in moe.parts:
                a3, b3, rank = a[:, r:], moe.gate_up_B, r
            else:  # PEFT's rewrite of separate gate/up factors: rank 2r, block-diagonal B
                a3, b3, rank = a, _block_diag_gate_up(moe.gate_up_B, r), 2 * r
            module = "mlp.experts.base_layer" if down else "mlp.experts"
            self._pair(layer, module, a3.reshape(-1, a3.shape[2]), _rank_major(b3), rank)
            self._ranks[self._path(layer, "mlp.experts.gate_up_proj")] = self._ranks.pop(self._path(layer, module))
            self._params.add("mlp.experts.gate_up_proj")
        if down:
            a3, b3 = moe.down_A, moe.down_B.expand(num, -1, -1)
            self._pair(layer, "mlp.experts", a3.reshape(-1, a3.shape[2]), _rank_major(b3), r)
            self._ranks[self._path(layer, "mlp.experts.down_proj")] = self._ranks.pop(self._path(layer, "mlp.experts"))
            self._params.add("mlp.experts.down_proj")

    def _shared_outer(self, layer: int, moe: MoELora) -> None:
        container = "block_sparse_moe.experts" if self.naming == "mixtral" else "mlp.experts"
        for part in moe.parts:
            a, b = self._part(moe, part)
            if part == "down":
                b = _one_outer(b, "down_B (w2 lora_B)", layer)
                a = a.expand(moe.num_experts, -1, -1)
            else:
                a = _one_outer(a, f"gate_up_A ({MIXTRAL_NAMES[part]} lora_A)", layer)
                b = b.expand(moe.num_experts, -1, -1)
            self._pair(layer, f"{container}.{MIXTRAL_NAMES[part]}", a, b, moe.rank)
            self._targets.add(MIXTRAL_NAMES[part])

    def config(self) -> dict[str, Any]:
        counts = Counter(self._ranks.values())
        r = max(counts, key=lambda k: (counts[k], k)) if counts else 1
        pattern = {re.escape(path): rank for path, rank in sorted(self._ranks.items()) if rank != r}
        return {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": r,  # scaling is folded into lora_B: alpha == r makes it exactly 1
            "use_rslora": False,
            "rank_pattern": pattern,
            "alpha_pattern": {k: float(v) for k, v in pattern.items()},
            "target_modules": sorted(self._targets),
            "target_parameters": sorted(self._params) or None,
            "base_model_name_or_path": self.base_model,
            "bias": "none",
            "lora_dropout": 0.0,
            "fan_in_fan_out": False,
            "inference_mode": True,
            "task_type": "CAUSAL_LM",
            "use_dora": False,
            "modules_to_save": None,
            "lorax_layout": self.layout,
            "lorax_expert_naming": self.naming,
            "lorax_b_packing": "rank-major",  # fused B as PEFT packs it (column j*E + e)
        }

    def close(self) -> Path:
        self._out.close({"format": "pt", "lorax_layout": self.layout})
        write_json_atomic(self.dest / "adapter_config.json", self.config())
        return self.dest

    def abort(self) -> None:
        self._out.abort()


def save_adapter(adapter: CanonicalAdapter, dest: str | Path, layout: str) -> Path:
    """Write ``adapter`` to the directory ``dest`` in ``layout`` (atomic per file); returns ``dest``."""
    writer = AdapterWriter(dest, layout, key_prefix=adapter.key_prefix, expert_naming=adapter.expert_naming,
                           base_model=adapter.base_model)
    try:
        for layer in adapter.layers:
            for (li, module), pair in sorted(adapter.dense.items()):
                if li == layer:
                    writer.add_dense(layer, module, pair)
            if layer in adapter.moe:
                writer.add_moe(layer, adapter.moe[layer])
        for key, t in adapter.extra.items():
            writer.add_extra(key, t)
    except BaseException:
        writer.abort()
        raise
    return writer.close()
