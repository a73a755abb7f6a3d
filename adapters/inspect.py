"""`lorax inspect`: what an adapter holds, whether it is usable, and (with a base model) whether it fits.

``inspect_adapter`` never raises for a broken adapter it could open: every problem becomes a string in
``errors`` (unusable) or ``warnings`` (usable, but worth knowing). Only an adapter that cannot be found
at all raises AdapterError.
"""

from __future__ import annotations

import math
from typing import Any

from lorax.adapters.formats import MIXTRAL_NAMES, QWEN_NAMES, AdapterPlan, LayerPlan
from lorax.adapters.layers import fused_roles
from lorax.adapters.model_config import check_against_config, read_model_config
from lorax.adapters.peft_io import OpenedAdapter, build_canonical, hidden_hint, open_adapter
from lorax.errors import LoraxError, UsageError


def _module_names(opened: OpenedAdapter, lp: LayerPlan) -> set[str]:
    """HF-style target module names derived from one layer's tensor names."""
    names = {m.split(".", 1)[1] if m.startswith("mlp.shared_expert.") else m.rsplit(".", 1)[-1] for m in lp.dense}
    proj = MIXTRAL_NAMES if opened.plan.expert_naming == "mixtral" else QWEN_NAMES
    names |= {f"experts.{proj[part]}" for _, part in lp.per_expert}
    names |= {f"experts.{proj[part]}" for part in lp.shared_outer}
    if lp.fused:
        shapes = {k: opened.source.shape(k) for p in lp.fused.values() for k in (p.A, p.B)}
        try:
            roles = fused_roles(lp, shapes, opened.settings, hidden_hint(opened), "")
            names |= {f"experts.{role}_proj" for role in roles}
        except LoraxError:
            names.add("experts.<unknown>")
    return names


def _extra_names(plan: AdapterPlan) -> set[str]:
    return {leaf for key in plan.extra for leaf in ("embed_tokens", "lm_head") if f".{leaf}." in f".{key}"}


def inspect_adapter(source: str, base: str | None = None, *, revision: str | None = None,
                    b_packing: str | None = None) -> dict[str, Any]:
    """The `lorax inspect --json` object (see docs in the CLI command)."""
    try:
        opened = open_adapter(source, revision=revision, b_packing=b_packing)
    except UsageError:
        raise
    except LoraxError as err:  # unreadable file or config: still one object with the same keys
        return _unreadable(source, str(err))
    plan, src, s = opened.plan, opened.source, opened.settings
    errors, warnings = list(plan.errors), list(plan.warnings)
    keys = src.names()
    dtypes = sorted({str(src.dtype(k)).removeprefix("torch.") for k in keys})
    num_params = sum(math.prod(src.shape(k)) for k in keys)
    num_bytes = sum(math.prod(src.shape(k)) * _itemsize(src.dtype(k)) for k in keys)
    targets: set[str] = set()
    for lp in plan.layers.values():
        targets |= _module_names(opened, lp)
    targets |= _extra_names(plan)
    out: dict[str, Any] = {
        "source": source,
        "weights": str(opened.files.weights),
        "moe_format": plan.moe_format,
        "target_modules": sorted(targets),
        "rank": s.r,
        "alpha": s.alpha,
        "use_rslora": s.use_rslora,
        "scaling": s.alpha / math.sqrt(s.r) if s.use_rslora else s.alpha / s.r,
        "rank_pattern": s.rank_pattern,
        "alpha_pattern": s.alpha_pattern,
        "b_packing": s.b_packing if plan.moe_format == "fused" else None,
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "num_params": num_params,
        "num_bytes": num_bytes,
        "num_tensors": len(keys),
        "layers": sorted(plan.layers),
        "num_experts": None,
        "max_rank": None,
        "base_model": opened.config.get("base_model_name_or_path"),
        "unsupported": sorted(plan.extra),
    }
    said = b_packing is not None or "peft_version" in opened.config or "lorax_b_packing" in opened.config
    if plan.moe_format == "fused" and not said:
        warnings.append("fused expert B is read rank-major (PEFT's packing, column j*E + e); a trainer that "
                        "packs B expert-major needs --b-packing expert-major (the file cannot tell)")
    if plan.moe_format == "per-expert" and s.use_rslora:
        warnings.append("per-expert adapter with rsLoRA: PEFT 0.21 loading it into a transformers 5 model "
                        "rewrites gate/up to rank 2r with doubled alpha, which scales them by sqrt(2) more "
                        "than this file means; lorax applies alpha/sqrt(r) per expert")
    if plan.extra:
        warnings.append("embed_tokens / lm_head LoRA tensors are reported but never applied by the engine: "
                        + ", ".join(sorted(plan.extra)))
    adapter = None
    if not plan.errors:
        try:
            adapter = build_canonical(opened, source)
        except LoraxError as err:
            errors.append(str(err))
    if adapter is not None:
        out["max_rank"] = adapter.rank
        out["num_experts"] = max((m.num_experts for m in adapter.moe.values()), default=None)
    if base is not None:
        out["base"] = base
        try:
            config = read_model_config(base, revision=None)
        except LoraxError as err:
            errors.append(str(err))
        else:
            if adapter is not None:
                errors += check_against_config(adapter, config, _namer(plan))
    out["errors"] = errors
    out["warnings"] = warnings
    out["usable"] = not errors
    return out


REPORT_KEYS = ("weights", "moe_format", "rank", "alpha", "use_rslora", "scaling", "b_packing", "dtype",
               "num_params", "num_bytes", "num_tensors", "num_experts", "max_rank", "base_model")


def _unreadable(source: str, error: str) -> dict[str, Any]:
    out: dict[str, Any] = dict.fromkeys(REPORT_KEYS)
    out.update(source=source, target_modules=[], layers=[], rank_pattern={}, alpha_pattern={}, unsupported=[],
               errors=[error], warnings=[], usable=False)
    return out


def _namer(plan: AdapterPlan) -> Any:
    """Name the first on-disk tensor of (layer, module) in check messages."""

    def name_of(layer: int, module: str) -> str:
        lp = plan.layers.get(layer)
        if lp is None:
            return f"layer {layer} {module}"
        if module in lp.dense:
            return f"tensor {lp.dense[module].A!r}"
        pairs = list(lp.per_expert.values()) + list(lp.fused.values()) + list(lp.shared_outer.values())
        return f"tensor {pairs[0].A!r}" if pairs else f"layer {layer} {module}"

    return name_of


def _itemsize(dtype: Any) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def format_report(info: dict[str, Any]) -> str:
    """Human-readable lines for `lorax inspect` without --json."""
    if info["moe_format"] is None:  # could not be read at all
        return "\n".join([f"adapter      {info['source']}", *(f"error: {e}" for e in info["errors"]), "NOT usable"])
    scaling = f"{info['scaling']:.6g}" + (" (alpha/sqrt(r), rsLoRA)" if info["use_rslora"] else " (alpha/r)")
    layers = info["layers"]
    span = f"{len(layers)} ({layers[0]}..{layers[-1]})" if layers else "0"
    lines = [
        f"adapter      {info['source']}",
        f"weights      {info['weights']}",
        f"layout       {info['moe_format']}" + (f", B {info['b_packing']}" if info["b_packing"] else ""),
        f"targets      {', '.join(info['target_modules']) or '-'}",
        f"rank         {info['rank']}" + (f" (max {info['max_rank']})" if info["max_rank"] not in (None,
                                                                                           info["rank"]) else ""),
        f"alpha        {info['alpha']:g}",
        f"scaling      {scaling}",
    ]
    if info["rank_pattern"] or info["alpha_pattern"]:
        lines.append(f"patterns     rank {info['rank_pattern']} alpha {info['alpha_pattern']}")
    lines += [
        f"dtype        {info['dtype']}",
        f"parameters   {info['num_params']:,} ({info['num_bytes']:,} bytes in {info['num_tensors']} tensors)",
        f"layers       {span}",
    ]
    if info["num_experts"]:
        lines.append(f"experts      {info['num_experts']}")
    if "base" in info:
        lines.append(f"base         {info['base']}")
    lines += [f"warning: {w}" for w in info["warnings"]]
    lines += [f"error: {e}" for e in info["errors"]]
    lines.append("usable" if info["usable"] else f"NOT usable ({len(info['errors'])} error(s))")
    return "\n".join(lines)
