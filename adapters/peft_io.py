"""Finding adapter files (local dir, file, Hugging Face repo id) and reading them into canonical form."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorax.adapters.canonical import CanonicalAdapter
from lorax.adapters.formats import AdapterPlan, plan_keys
from lorax.adapters.layers import build_dense, build_moe, read
from lorax.adapters.settings import LoraSettings
from lorax.adapters.tensor_io import SafetensorsSource, TensorSource
from lorax.errors import AdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")


@dataclass
class AdapterFiles:
    """The resolved on-disk pieces of one adapter."""

    root: Path  # directory holding the config
    weights: Path
    config_path: Path | None


def resolve(source: str, revision: str | None = None) -> AdapterFiles:
    """A local directory, a weights file, or a Hugging Face repo id (offline cache honoured)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _in_dir(path, source)
    if path.is_file():
        cfg = path.parent / CONFIG_NAME
        return AdapterFiles(path.parent, path, cfg if cfg.is_file() else None)
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return _in_dir(_hub_download(source, revision), source)
    raise AdapterError(f"{source}: no such adapter directory or file (nor a 'org/name' Hub repo id)")


def _in_dir(path: Path, source: str) -> AdapterFiles:
    cfg = path / CONFIG_NAME
    for name in WEIGHT_NAMES:
        if (path / name).is_file():
            return AdapterFiles(path, path / name, cfg if cfg.is_file() else None)
    found = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    if len(found) == 1:
        return AdapterFiles(path, path / found[0], cfg if cfg.is_file() else None)
    raise AdapterError(f"{source}: no {' / '.join(WEIGHT_NAMES)} in {path}"
                       + (f" (found several weight files: {found})" if found else ""))


def _hub_download(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a hard dependency
        raise AdapterError(f"{repo_id}: huggingface_hub is not installed") from None
    patterns = [CONFIG_NAME, *WEIGHT_NAMES]
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=offline)
    except Exception as err:  # hub errors have many types; all mean "could not get it"
        if not offline:
            try:  # fall back to whatever the cache holds
                local = snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                          local_files_only=True)
                return Path(local)
            except Exception:
                pass
        raise AdapterError(f"{repo_id}: could not fetch from the Hugging Face Hub or the local cache "
                           f"({type(err).__name__}: {err})") from None
    return Path(local)


def read_config(files: AdapterFiles) -> dict[str, Any]:
    if files.config_path is None:
        raise AdapterError(f"{files.root}: missing {CONFIG_NAME} (rank and alpha are needed to scale the "
                           "adapter)")
    try:
        cfg = json.loads(files.config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"{files.config_path}: unreadable JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{files.config_path}: not a JSON object")
    return cfg


def open_weights(path: Path) -> TensorSource:
    if path.suffix == ".safetensors":
        return SafetensorsSource(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        from lorax.adapters.pickle_free import TorchZipSource

        return TorchZipSource(path)
    raise AdapterError(f"{path}: unknown weight file type {path.suffix!r} (expected .safetensors/.bin/.pt)")


@dataclass
class OpenedAdapter:
    """Everything known before any tensor data is read."""

    files: AdapterFiles
    config: dict[str, Any]
    settings: LoraSettings
    source: TensorSource
    plan: AdapterPlan


def open_adapter(source: str, *, revision: str | None = None, b_packing: str | None = None) -> OpenedAdapter:
    files = resolve(source, revision)
    config = read_config(files)
    settings = LoraSettings.from_config(config, b_packing, str(files.config_path))
    tensors = open_weights(files.weights)
    plan = plan_keys({k: tensors.shape(k) for k in tensors.names()})
    if config.get("modules_to_save"):
        plan.errors.append(f"{files.config_path}: modules_to_save {config['modules_to_save']} (full weights) "
                           "is not supported")
    return OpenedAdapter(files, config, settings, tensors, plan)


def hidden_hint(opened: OpenedAdapter) -> int | None:
    """The hidden size as the attention LoRA tensors show it (q_proj's in-dim), if any."""
    for lp in opened.plan.layers.values():
        for module in ("self_attn.q_proj", "self_attn.o_proj"):
            if module in lp.dense:
                pair = lp.dense[module]
                return opened.source.shape(pair.A)[1] if module.endswith("q_proj") else opened.source.shape(pair.B)[0]
    return None


def load_adapter(source: str, *, name: str | None = None, revision: str | None = None,
                 b_packing: str | None = None) -> CanonicalAdapter:
    """Read any supported layout into a CanonicalAdapter (CPU tensors, the file's dtype)."""
    opened = open_adapter(source, revision=revision, b_packing=b_packing)
    plan = opened.plan
    if plan.errors:
        more = f" (and {len(plan.errors) - 1} more)" if len(plan.errors) > 1 else ""
        raise AdapterError(f"{opened.files.weights}: {plan.errors[0]}{more}")
    return build_canonical(opened, name or _default_name(source))


def build_canonical(opened: OpenedAdapter, name: str) -> CanonicalAdapter:
    """Read every tensor of an opened adapter into canonical form (raises AdapterError naming the tensor)."""
    plan = opened.plan
    adapter = new_canonical(opened, name)
    hidden = hidden_hint(opened)
    for layer, lp in sorted(plan.layers.items()):
        for module, pair in lp.dense.items():
            adapter.dense[(layer, module)] = build_dense(opened.source, plan, layer, module, pair, opened.settings)
        if lp.moe_kinds:
            adapter.moe[layer] = build_moe(opened.source, plan, layer, lp, opened.settings, hidden)
    for key in plan.extra:
        adapter.extra[key] = read(opened.source, key)
    return adapter


def new_canonical(opened: OpenedAdapter, name: str) -> CanonicalAdapter:
    s = opened.settings
    return CanonicalAdapter(
        name=name,
        moe_format=opened.plan.moe_format,
        base_model=opened.config.get("base_model_name_or_path"),
        alpha=s.alpha,
        use_rslora=s.use_rslora,
        rank_pattern=dict(s.rank_pattern),
        alpha_pattern=dict(s.alpha_pattern),
        source_config=opened.config,
        expert_naming=expert_naming(opened),
        key_prefix=opened.plan.prefix,
    )


def expert_naming(opened: OpenedAdapter) -> str:
    """How per-expert keys should be spelled for this adapter's model: "mixtral" (w1/w3/w2 under
    block_sparse_moe) or "qwen". Key names decide; a fused or dense file falls back to the config
    (our own ``lorax_expert_naming``, else PEFT's ``auto_mapping.base_model_class``)."""
    if opened.plan.expert_naming == "mixtral":
        return "mixtral"
    if "lorax_expert_naming" in opened.config:
        return str(opened.config["lorax_expert_naming"])
    auto = opened.config.get("auto_mapping") or {}
    cls = str(auto.get("base_model_class", "")) if isinstance(auto, dict) else ""
    return "mixtral" if cls.startswith("Mixtral") else "qwen"


def _default_name(source: str) -> str:
    p = Path(source)
    return (p.stem if p.is_file() else p.name) or source
