"""Build the canonical tensors of one decoder layer from a plan (read side of every layout).

Shapes: E experts, r rank, H hidden, I expert intermediate. Every B is multiplied by its module's
scaling here (alpha/r or alpha/sqrt(r), rank/alpha patterns applied to the model-side module path the
way PEFT matches them), in fp32 and cast back to the file's dtype.
"""

from __future__ import annotations

import torch

from lorax.adapters.canonical import LoraPair, MoELora
from lorax.adapters.formats import MIXTRAL_NAMES, PARTS, QWEN_NAMES, AdapterPlan, KeyPair, LayerPlan
from lorax.adapters.settings import LoraSettings
from lorax.adapters.tensor_io import TensorSource
from lorax.errors import AdapterError

Part = tuple[torch.Tensor, torch.Tensor]  # A [E|1, r, in], B [E|1, out, r]


def read(source: TensorSource, key: str) -> torch.Tensor:
    t = source.get(key)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise AdapterError(f"{source.path}: tensor {key!r} contains NaN or Inf")
    if not t.is_floating_point():
        raise AdapterError(f"{source.path}: tensor {key!r} has non-float dtype {t.dtype}")
    return t


def fold(b: torch.Tensor, s: float) -> torch.Tensor:
    return b if s == 1.0 else (b.float() * s).to(b.dtype)


def _expect_rank(source: TensorSource, key: str, got: int, want: int) -> None:
    if got != want:
        raise AdapterError(f"{source.path}: tensor {key!r} has rank {got} but adapter_config.json says {want}")


def build_dense(source: TensorSource, plan: AdapterPlan, layer: int, module: str, pair: KeyPair,
                settings: LoraSettings) -> LoraPair:
    a, b = read(source, pair.A), read(source, pair.B)
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
        raise AdapterError(f"{source.path}: {pair.A!r} {list(a.shape)} and {pair.B!r} {list(b.shape)} "
                           "are not LoRA factors [r, in] / [out, r]")
    path = plan.module_path(layer, module)
    _expect_rank(source, pair.A, a.shape[0], settings.rank_alpha(path)[0])
    return LoraPair(A=a, B=fold(b, settings.scaling(path)))


def fused_roles(lp: LayerPlan, shapes: dict[str, tuple[int, ...]], settings: LoraSettings,
                hidden: int | None, where: str) -> dict[str, KeyPair]:
    """Which fused key pair is gate_up and which is down, from shapes (never from key nesting).

    gate_up maps H -> 2I, down maps I -> H. With both present exactly one assignment fits (it would
    need 2I == I otherwise). A lone pair is named by target_parameters, else by the hidden size.
    """
    pairs = list(lp.fused.values())
    dims = [(shapes[p.A][-1], shapes[p.B][0]) for p in pairs]  # (in, out)
    if any(len(shapes[p.A]) != 2 or len(shapes[p.B]) != 2 for p in pairs):
        raise AdapterError(f"{where}: fused expert LoRA tensors must be 2-D: " + ", ".join(p.A for p in pairs))
    if len(pairs) == 2:
        (xi, xo), (yi, yo) = dims
        if xi == yo and xo == 2 * yi:
            return {"gate_up": pairs[0], "down": pairs[1]}
        if yi == xo and yo == 2 * xi:
            return {"gate_up": pairs[1], "down": pairs[0]}
        raise AdapterError(f"{where}: fused expert tensors {pairs[0].A!r} {dims[0]} and {pairs[1].A!r} {dims[1]} "
                           "are not a gate_up (H -> 2I) / down (I -> H) pair")
    if len(pairs) != 1:
        raise AdapterError(f"{where}: {len(pairs)} fused expert LoRA pairs in one layer (expected 1 or 2)")
    gu, dn = settings.targets_parameter("gate_up_proj"), settings.targets_parameter("down_proj")
    if gu != dn:
        return {"gate_up" if gu else "down": pairs[0]}
    fin, fout = dims[0]
    if hidden is not None and (fin == hidden) != (fout == hidden):
        return {"gate_up" if fin == hidden else "down": pairs[0]}
    raise AdapterError(f"{where}: cannot tell whether {pairs[0].A!r} is gate_up or down "
                       "(name it in target_parameters or pass the base model)")


def _unpack_fused(source: TensorSource, pair: KeyPair, r: int, packing: str) -> Part:
    a, b = read(source, pair.A), read(source, pair.B)
    if a.shape[0] % r or b.shape[1] != a.shape[0]:
        raise AdapterError(f"{source.path}: fused {pair.A!r} {list(a.shape)} / {pair.B!r} {list(b.shape)} "
                           f"do not split into experts of rank {r}")
    e = a.shape[0] // r
    a3 = a.reshape(e, r, a.shape[1])  # rows e*r + j
    if packing == "rank-major":  # B columns j*E + e
        b3 = b.reshape(b.shape[0], r, e).permute(2, 0, 1)
    else:  # B columns e*r + j
        b3 = b.reshape(b.shape[0], e, r).permute(1, 0, 2)
    return a3, b3


def _split_fused_gate_up(a3: torch.Tensor, b3: torch.Tensor) -> tuple[Part, Part]:
    """PEFT fused gate_up (one A for both halves) -> gate and up parts.

    When B is block diagonal (PEFT's rewrite of a per-expert adapter, rank 2r), the halves are split
    back to rank r exactly; otherwise both parts share the full A.
    """
    inter, r = b3.shape[1] // 2, b3.shape[2]
    h = r // 2
    off_diagonal_zero = not b3[:, :inter, h:].any() and not b3[:, inter:, :h].any()
    diagonal_used = bool(b3[:, :inter, :h].any()) and bool(b3[:, inter:, h:].any())  # not a fresh B = 0
    if r % 2 == 0 and off_diagonal_zero and diagonal_used:
        return (a3[:, :h], b3[:, :inter, :h]), (a3[:, h:], b3[:, inter:, h:])
    return (a3, b3[:, :inter]), (a3, b3[:, inter:])


def build_moe(source: TensorSource, plan: AdapterPlan, layer: int, lp: LayerPlan, settings: LoraSettings,
              hidden: int | None = None) -> MoELora:
    where = f"{source.path}: layer {layer}"
    moe = lp.moe_module or "mlp.experts"
    names = MIXTRAL_NAMES if plan.expert_naming == "mixtral" else QWEN_NAMES
    parts: dict[str, Part] = {}
    if lp.per_expert:
        num = max(e for e, _ in lp.per_expert) + 1
        for part in PARTS:
            if not any(p == part for _, p in lp.per_expert):
                continue
            a_list, b_list = [], []
            for e in range(num):
                pair = lp.per_expert.get((e, part))
                if pair is None:
                    raise AdapterError(f"{where}: expert {e} has no {names[part]} LoRA but expert {num - 1} does")
                lora = build_dense(source, plan, layer, f"{moe}.{e}.{names[part]}", pair, settings)
                a_list.append(lora.A)
                b_list.append(lora.B)
            try:
                parts[part] = (torch.stack(a_list), torch.stack(b_list))
            except RuntimeError:
                raise AdapterError(f"{where}: experts' {names[part]} LoRA tensors differ in shape") from None
    elif lp.fused:
        roles = fused_roles(lp, {k: source.shape(k) for p in lp.fused.values() for k in (p.A, p.B)},
                            settings, hidden, where)
        for role, pair in roles.items():
            path = plan.module_path(layer, f"mlp.experts.{role}_proj")
            a3, b3 = _unpack_fused(source, pair, settings.rank_alpha(path)[0], settings.b_packing)
            b3 = fold(b3, settings.scaling(path))
            if role == "down":
                parts["down"] = (a3, b3)
            else:
                if b3.shape[1] % 2:
                    raise AdapterError(f"{where}: fused gate_up {pair.B!r} has an odd out-dim {b3.shape[1]}")
                parts["gate"], parts["up"] = _split_fused_gate_up(a3, b3)
    elif lp.shared_outer:
        for part, pair in lp.shared_outer.items():
            a, b = read(source, pair.A), read(source, pair.B)
            if a.dim() != 3 or b.dim() != 3 or a.shape[1] != b.shape[2]:
                raise AdapterError(f"{where}: shared-outer {pair.A!r} {list(a.shape)} / {pair.B!r} "
                                   f"{list(b.shape)} are not [E|1, r, in] / [E|1, out, r]")
            path = plan.module_path(layer, f"{moe}.{names[part]}")
            _expect_rank(source, pair.A, a.shape[1], settings.rank_alpha(path)[0])
            parts[part] = (a, fold(b, settings.scaling(path)))
    return assemble_moe(parts, where)


def _pad_rank(a: torch.Tensor, b: torch.Tensor, r: int) -> Part:
    """Zero-pad a part to rank r: extra A rows and B columns of zeros leave B @ A unchanged exactly."""
    extra = r - a.shape[1]
    if extra == 0:
        return a, b
    a = torch.cat([a, a.new_zeros(a.shape[0], extra, a.shape[2])], dim=1)
    b = torch.cat([b, b.new_zeros(b.shape[0], b.shape[1], extra)], dim=2)
    return a, b


def assemble_moe(parts: dict[str, Part], where: str) -> MoELora:
    """gate / up / down parts ([E|1, r, in], [E|1, out, r]) -> MoELora; absent parts become zeros."""
    if not parts:
        raise AdapterError(f"{where}: no expert LoRA tensors")
    num = max(max(a.shape[0], b.shape[0]) for a, b in parts.values())
    r = max(a.shape[1] for a, _ in parts.values())
    dtype = next(iter(parts.values()))[0].dtype
    hidden = inter = None
    for part, (a, b) in parts.items():
        if a.shape[0] not in (1, num) or b.shape[0] not in (1, num):
            raise AdapterError(f"{where}: {part} LoRA has {a.shape[0]}/{b.shape[0]} experts, others {num}")
        h, i = (a.shape[2], b.shape[1]) if part != "down" else (b.shape[1], a.shape[2])
        if (hidden, inter) != (None, None) and (hidden, inter) != (h, i):
            raise AdapterError(f"{where}: {part} LoRA implies hidden {h} / intermediate {i}, "
                               f"other parts {hidden} / {inter}")
        hidden, inter = h, i
    assert hidden is not None and inter is not None
    zeros = {
        "gate": (torch.zeros(1, r, hidden, dtype=dtype), torch.zeros(num, inter, r, dtype=dtype)),
        "up": (torch.zeros(1, r, hidden, dtype=dtype), torch.zeros(num, inter, r, dtype=dtype)),
        "down": (torch.zeros(num, r, inter, dtype=dtype), torch.zeros(1, hidden, r, dtype=dtype)),
    }
    full = {p: _pad_rank(*parts.get(p, zeros[p]), r) for p in PARTS}
    (ga, gb), (ua, ub), (da, db) = full["gate"], full["up"], full["down"]
    if ga.shape[0] != ua.shape[0]:  # one side shared, the other not: store per expert
        ga, ua = ga.expand(num, -1, -1), ua.expand(num, -1, -1)
    return MoELora(
        gate_up_A=share_if_equal(torch.cat([ga, ua], dim=1)),
        gate_up_B=torch.cat([gb.expand(num, -1, -1), ub.expand(num, -1, -1)], dim=1).contiguous(),
        down_A=da.expand(num, -1, -1).contiguous(),
        down_B=share_if_equal(db),
        parts=tuple(p for p in PARTS if p in parts),
    )


def share_if_equal(t: torch.Tensor) -> torch.Tensor:
    """[E, ...] -> [1, ...] when every expert holds the same factor (exact; keeps shared-outer shared
    whichever layout it was stored in, so round trips through per-expert files give the same tensors)."""
    if t.shape[0] > 1 and all(torch.equal(t[0], t[e]) for e in range(1, t.shape[0])):
        return t[:1].contiguous()
    return t.contiguous()
