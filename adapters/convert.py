"""`lorax convert`: any readable adapter -> safetensors in a chosen layout, one layer at a time.

Memory: the reader holds one tensor (safetensors) or one storage (.bin, read lazily from the zip),
the writer spills each tensor to disk as it comes, so the peak is about one layer's tensors (for MoE
layers the layer's experts: a fused output tensor *is* the whole layer), never the whole adapter.

After writing, the output is re-opened and each layer is compared bit for bit with the source's
canonical tensors (cast to the requested dtype), again one layer at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path

import torch

from lorax.adapters.canonical import LoraPair, MoELora
from lorax.adapters.layers import build_dense, build_moe, read
from lorax.adapters.layouts import LAYOUTS, WEIGHTS_FILE, AdapterWriter
from lorax.adapters.peft_io import OpenedAdapter, expert_naming, hidden_hint, open_adapter
from lorax.errors import AdapterError, UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_LAYOUT = {"none": "peft", "per-expert": "per-expert", "fused": "fused", "shared-outer": "shared-outer"}
_MOE_FIELDS = ("gate_up_A", "gate_up_B", "down_A", "down_B")


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def _cast_moe(m: MoELora, dtype: torch.dtype | None) -> MoELora:
    return MoELora(*(_cast(getattr(m, f), dtype) for f in _MOE_FIELDS), parts=m.parts)


def _layer_items(opened: OpenedAdapter, layer: int, dtype: torch.dtype | None,
                 hidden: int | None) -> Iterator[tuple[str, LoraPair | MoELora]]:
    """One layer's modules, one at a time: ("self_attn.q_proj", LoraPair) ..., then ("experts", MoELora)."""
    lp = opened.plan.layers[layer]
    for module, pair in sorted(lp.dense.items()):
        p = build_dense(opened.source, opened.plan, layer, module, pair, opened.settings)
        yield module, LoraPair(_cast(p.A, dtype), _cast(p.B, dtype))
    if lp.moe_kinds:
        yield "experts", _cast_moe(build_moe(opened.source, opened.plan, layer, lp, opened.settings, hidden), dtype)


def convert_adapter(source: str, dest: str | Path, layout: str | None = None, *, dtype: str | None = None,
                    b_packing: str | None = None, revision: str | None = None, overwrite: bool = False,
                    verify: bool = True) -> Path:
    """Convert ``source`` into ``dest`` (a directory); returns ``dest``. See the module docstring."""
    torch_dtype = None
    if dtype is not None:
        if dtype not in DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        torch_dtype = DTYPES[dtype]
    if layout is not None and layout not in LAYOUTS:
        raise UsageError(f"--to must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    opened = open_adapter(source, revision=revision, b_packing=b_packing)
    plan = opened.plan
    if plan.errors:
        raise AdapterError(f"{opened.files.weights}: " + "; ".join(plan.errors))
    dest = Path(dest)
    out_file = dest / WEIGHTS_FILE
    if dest.resolve() == opened.files.root.resolve():
        raise UsageError(f"{dest}: the destination is the source directory; choose another one")
    if out_file.exists() and not overwrite:
        raise UsageError(f"{out_file} exists (pass --force to replace it)")
    layout = layout or DEFAULT_LAYOUT[plan.moe_format]
    hidden = hidden_hint(opened)
    writer = AdapterWriter(dest, layout, key_prefix=plan.prefix, expert_naming=expert_naming(opened),
                           base_model=opened.config.get("base_model_name_or_path"))
    try:
        for layer in sorted(plan.layers):
            for module, item in _layer_items(opened, layer, torch_dtype, hidden):  # one module alive at a time
                if isinstance(item, MoELora):
                    writer.add_moe(layer, item)
                else:
                    writer.add_dense(layer, module, item)
        for key in plan.extra:
            writer.add_extra(key, _cast(read(opened.source, key), torch_dtype))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    if verify:
        verify_conversion(opened, dest, torch_dtype)
    return dest


def verify_conversion(opened: OpenedAdapter, dest: Path, dtype: torch.dtype | None) -> None:
    """Re-read ``dest`` and compare every layer with the source bit for bit (see ``_same_moe``)."""
    written = open_adapter(str(dest))
    if written.plan.errors:
        raise AdapterError(f"{dest}: the converted adapter does not read back: {written.plan.errors[0]}")
    if sorted(written.plan.layers) != sorted(opened.plan.layers):
        raise AdapterError(f"{dest}: layers {sorted(written.plan.layers)} != source {sorted(opened.plan.layers)}")
    h_src, h_out = hidden_hint(opened), hidden_hint(written)
    for layer in sorted(opened.plan.layers):
        ours = _layer_items(opened, layer, dtype, h_src)
        theirs = _layer_items(written, layer, None, h_out)
        for (name0, item0), (name1, item1) in zip_longest(ours, theirs, fillvalue=("<none>", None)):
            if name0 != name1 or item0 is None or item1 is None:
                raise AdapterError(f"{dest}: layer {layer}: {name0} in the source but {name1} in the output")
            if isinstance(item0, MoELora) and isinstance(item1, MoELora):
                same = _same_moe(item0, item1)
            else:
                same = isinstance(item0, LoraPair) and isinstance(item1, LoraPair) and torch.equal(
                    item0.A, item1.A) and torch.equal(item0.B, item1.B)
            if not same:
                raise AdapterError(f"{dest}: layer {layer} {name0}: tensors differ after conversion")
    if sorted(written.plan.extra) != sorted(opened.plan.extra):
        raise AdapterError(f"{dest}: embed_tokens / lm_head tensors were not carried over")
    for key in opened.plan.extra:
        if not torch.equal(_cast(read(opened.source, key), dtype), read(written.source, key)):
            raise AdapterError(f"{dest}: tensor {key!r} differs after conversion")


def _same_moe(a: MoELora, b: MoELora) -> bool:
    if all(torch.equal(getattr(a, f), getattr(b, f)) for f in _MOE_FIELDS):
        return True
    # A fused gate_up written for a lone gate (or up) projection reads back with that A in both halves
    # and zero B rows for the absent one: same factors for every present projection, so compare deltas.
    if a.num_experts != b.num_experts:
        return False
    return all(torch.equal(x, y) for e in range(a.num_experts)
               for x, y in zip(a.expert_deltas(e), b.expert_deltas(e), strict=True))
