"""Layout detection: tensor names (+ shapes) -> a plan saying which key feeds which canonical slot.

Nothing here reads tensor data, so `inspect` can report a plan's findings from headers alone and
`convert` can then load one layer at a time (see ``layers.py``).

Recognised names (``P`` = any prefix ending in ``layers.``, e.g. ``base_model.model.model.layers.``;
``lora_A.default.weight`` with a stray adapter name is accepted too)::

    P{i}.self_attn.q_proj.lora_A.weight                 dense (DENSE_MODULES)
    P{i}.mlp.experts.{e}.gate_proj.lora_A.weight        per-expert (also up_proj / down_proj)
    P{i}.block_sparse_moe.experts.{e}.w1.lora_A.weight  per-expert, Mixtral naming (w1 gate, w3 up, w2 down)
    P{i}.mlp.experts[.base_layer]*.lora_A.weight        fused (PEFT target_parameters), 2-D
    P{i}.mlp.experts.w1.lora_A.weight                   shared-outer, 3-D (w1 gate, w3 up, w2 down)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lorax.adapters.canonical import DENSE_MODULES

_LORA_KEY = re.compile(r"^(?P<path>.+?)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[A-Za-z0-9_-]+))?\.weight$")
_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.)(?P<layer>\d+)\.(?P<module>.+)$")
_PER_EXPERT = re.compile(r"^(?P<moe>(?:.+\.)?experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)$")
_FUSED = re.compile(r"^(?P<moe>(?:.+\.)?experts)(?P<nest>(?:\.base_layer)*)$")
_SHARED_OUTER = re.compile(r"^(?P<moe>(?:.+\.)?experts)\.(?P<proj>w1|w3|w2|gate_proj|up_proj|down_proj)$")
_EMBED_LORA = re.compile(r"^(?P<path>.+)\.lora_embedding_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?$")

# Projection name -> canonical part.
PROJ_PART = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
PARTS = ("gate", "up", "down")
MIXTRAL_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}
QWEN_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@dataclass
class KeyPair:
    A: str
    B: str


@dataclass
class LayerPlan:
    dense: dict[str, KeyPair] = field(default_factory=dict)  # module name -> keys
    per_expert: dict[tuple[int, str], KeyPair] = field(default_factory=dict)  # (expert, part) -> keys
    fused: dict[str, KeyPair] = field(default_factory=dict)  # nesting (".base_layer"*) -> keys
    shared_outer: dict[str, KeyPair] = field(default_factory=dict)  # part -> keys
    moe_module: str | None = None  # e.g. "mlp.experts" or "block_sparse_moe.experts"

    @property
    def moe_kinds(self) -> list[str]:
        kinds = [("per-expert", self.per_expert), ("fused", self.fused), ("shared-outer", self.shared_outer)]
        return [k for k, v in kinds if v]


@dataclass
class AdapterPlan:
    prefix: str = ""  # text before the layer index, e.g. "base_model.model.model.layers."
    layers: dict[int, LayerPlan] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)  # kept, not applied (embed_tokens / lm_head LoRA)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    expert_naming: str = "qwen"  # "qwen" (gate_proj/up_proj/down_proj) or "mixtral" (w1/w3/w2)

    @property
    def moe_format(self) -> str:
        kinds = {k for lp in self.layers.values() for k in lp.moe_kinds}
        if not kinds:
            return "none"
        if len(kinds) > 1:
            return "mixed"
        return kinds.pop()

    def module_path(self, layer: int, module: str) -> str:
        """The model-side module path PEFT matches rank/alpha patterns against (no base_model.model.)."""
        prefix = self.prefix
        if prefix.startswith("base_model.model."):
            prefix = prefix[len("base_model.model.") :]
        return f"{prefix}{layer}.{module}"


def _pair_up(halves: dict[str, dict[str, str]], plan: AdapterPlan) -> dict[str, KeyPair]:
    out: dict[str, KeyPair] = {}
    for path, ab in halves.items():
        if "A" not in ab or "B" not in ab:
            have, miss = ("A", "B") if "A" in ab else ("B", "A")
            plan.errors.append(f"tensor {ab[have]!r} has no matching lora_{miss}")
            continue
        out[path] = KeyPair(ab["A"], ab["B"])
    return out


def plan_keys(shapes: dict[str, tuple[int, ...]]) -> AdapterPlan:
    """Classify every tensor name; unknown or unsupported names become errors naming the key."""
    plan = AdapterPlan()
    halves: dict[str, dict[str, str]] = {}
    prefixes: set[str] = set()
    for key in shapes:
        if "lora_magnitude_vector" in key:
            plan.errors.append(f"tensor {key!r}: DoRA (lora_magnitude_vector) is not supported")
            continue
        if re.search(r"\.lora_[AB](\.[A-Za-z0-9_-]+)?\.bias$", key):
            plan.errors.append(f"tensor {key!r}: LoRA bias (lora_bias=True) is not supported")
            continue
        if ".modules_to_save." in key or (".lora_" not in key and key.endswith((".weight", ".bias"))):
            plan.errors.append(f"tensor {key!r}: full weights (modules_to_save) are not supported")
            continue
        if _EMBED_LORA.match(key):
            plan.extra[key] = key
            continue
        m = _LORA_KEY.match(key)
        if not m:
            plan.errors.append(f"tensor {key!r}: not a LoRA tensor name lorax knows")
            continue
        halves.setdefault(m["path"], {})
        if m["ab"] in halves[m["path"]]:
            plan.errors.append(f"tensor {key!r}: duplicate of {halves[m['path']][m['ab']]!r}")
            continue
        halves[m["path"]][m["ab"]] = key
    for path, pair in _pair_up(halves, plan).items():
        lm = _LAYER.match(path)
        if not lm:
            leaf = path.rsplit(".", 1)[-1]
            if leaf in ("embed_tokens", "lm_head"):
                plan.extra[pair.A], plan.extra[pair.B] = pair.A, pair.B
            else:
                plan.errors.append(f"tensor {pair.A!r}: module {path!r} is outside the decoder layers")
            continue
        prefixes.add(lm["prefix"])
        layer, module = int(lm["layer"]), lm["module"]
        lp = plan.layers.setdefault(layer, LayerPlan())
        _classify(plan, lp, module, pair, shapes)
    if len(prefixes) > 1:
        plan.errors.append(f"tensors use several layer prefixes: {sorted(prefixes)}")
    plan.prefix = min(prefixes) if prefixes else "base_model.model.model.layers."
    if plan.moe_format == "mixed":
        plan.errors.append("the adapter mixes MoE layouts across layers: " + ", ".join(
            f"layer {i}: {'/'.join(lp.moe_kinds)}" for i, lp in sorted(plan.layers.items()) if lp.moe_kinds
        ))
    return plan


def _classify(plan: AdapterPlan, lp: LayerPlan, module: str, pair: KeyPair, shapes: dict[str, tuple[int, ...]]) -> None:
    ndim = len(shapes[pair.A])
    moe_module = None
    if module in DENSE_MODULES:
        lp.dense[module] = pair
    elif m := _PER_EXPERT.match(module):
        moe_module = m["moe"]
        lp.per_expert[(int(m["e"]), PROJ_PART[m["proj"]])] = pair
        if m["proj"].startswith("w"):
            plan.expert_naming = "mixtral"
    elif (m := _SHARED_OUTER.match(module)) and ndim == 3:
        moe_module = m["moe"]
        lp.shared_outer[PROJ_PART[m["proj"]]] = pair
        if m["proj"].startswith("w"):
            plan.expert_naming = "mixtral" if moe_module.startswith("block_sparse_moe") else plan.expert_naming
    elif m := _FUSED.match(module):
        moe_module = m["moe"]
        lp.fused[m["nest"]] = pair
    elif module.endswith(("mlp.gate", "shared_expert_gate", "block_sparse_moe.gate")):
        plan.errors.append(f"tensor {pair.A!r}: LoRA on the router / shared-expert gate is not supported")
    else:
        plan.errors.append(f"tensor {pair.A!r}: module {module!r} is not one lorax applies LoRA to")
    if moe_module is not None:
        if lp.moe_module not in (None, moe_module):
            plan.errors.append(f"tensor {pair.A!r}: experts under both {lp.moe_module!r} and {moe_module!r}")
        lp.moe_module = moe_module
        if moe_module.startswith("block_sparse_moe"):
            plan.expert_naming = "mixtral"
