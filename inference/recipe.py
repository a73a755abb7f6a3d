"""YAML recipes for `lorax batch-run`: model, adapters, engine options, sampling defaults, job options.

A recipe is read with `yaml.safe_load` and checked against a typed schema before anything loads:
an unknown key, a wrong type or an out-of-range value is a ConfigError naming the key and the file.
Shape (every section optional except `model`, which the command line may give instead):

    name: demo                      # free text
    description: ...                # free text
    model: ./demo/model             # local dir (relative to this file) or a Hub repo id
    adapters:                       # name -> local dir (relative to this file) or Hub repo id
      reverse: ./demo/adapters/reverse
    engine:   {device: auto, dtype: float32, max_loras: 4, ...}   # EngineConfig field names
    sampling: {max_tokens: 16, temperature: 0.0, ...}             # defaults for lines that omit them
    job:      {ordered: false, chat_template: null, ...}          # batch-job options

Command-line flags override recipe values key by key (`Recipe.with_overrides`). Built-in recipes live
in lorax.recipes (the repository's recipes/ folder) and are found by name: `--recipe demo`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lorax.errors import ConfigError

# A field spec: (python types accepted, allowed values or None, minimum or None).
# bool is checked apart from int: YAML `true` must not pass as max_loras=1.
_Spec = tuple[tuple[type, ...], tuple[Any, ...] | None, float | None]

ENGINE_SCHEMA: dict[str, _Spec] = {
    "device": ((str,), None, None),  # auto | cpu | cuda | cuda:N, checked in _check_value
    "dtype": ((str,), ("auto", "float32", "bfloat16", "float16"), None),
    "kernel_backend": ((str,), ("auto", "torch", "triton"), None),
    "max_loras": ((int,), None, 1),
    "max_lora_rank": ((int,), None, 1),
    "max_cpu_loras": ((int,), None, 1),
    "max_num_seqs": ((int,), None, 1),
    "max_num_batched_tokens": ((int,), None, 1),
    "max_model_len": ((int,), None, 1),
    "block_size": ((int,), None, 1),
    "gpu_memory_utilization": ((float, int), None, 0.0),
    "num_kv_blocks": ((int,), None, 1),
    "load_format": ((str,), ("auto", "safetensors", "dummy"), None),
    "enforce_eager": ((bool,), None, None),
    "seed": ((int,), None, 0),
    "revision": ((str,), None, None),
}

SAMPLING_SCHEMA: dict[str, _Spec] = {
    "max_tokens": ((int,), None, 1),
    "temperature": ((float, int), None, 0.0),
    "top_p": ((float, int), None, 0.0),
    "top_k": ((int,), None, -1),
    "min_p": ((float, int), None, 0.0),
    "seed": ((int,), None, None),
    "stop": ((list, str), None, None),
    "stop_token_ids": ((list,), None, None),
    "ignore_eos": ((bool,), None, None),
    "logprobs": ((int,), None, 0),
}

JOB_SCHEMA: dict[str, _Spec] = {
    "errors": ((str,), None, None),  # errors file (relative paths: the current directory)
    "ordered": ((bool,), None, None),  # rewrite the output in input order at the end
    "retry_errors": ((bool,), None, None),
    "chat_template": ((str,), None, None),  # file (relative to the recipe) or Jinja source
    "max_in_flight": ((int,), None, 1),  # lookahead window; default 4 x max_num_seqs
    "fsync_interval_s": ((float, int), None, 0.0),
    "served_model_names": ((list,), None, None),  # extra names of the base model for OpenAI body.model
}

_TOP_KEYS = ("name", "description", "model", "adapters", "engine", "sampling", "job", "probes")
_SECTIONS = {"engine": ENGINE_SCHEMA, "sampling": SAMPLING_SCHEMA, "job": JOB_SCHEMA}


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. Paths in `model`/`adapters`/`job.chat_template` are already resolved."""

    source: str  # the file it came from, or "<command line>"
    name: str | None = None
    model: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    job: dict[str, Any] = field(default_factory=dict)
    probes: list[str] = field(default_factory=list)  # `lorax verify` prompts in the model's own format

    def with_overrides(
        self,
        *,
        model: str | None = None,
        adapters: dict[str, str] | None = None,
        engine: dict[str, Any] | None = None,
        sampling: dict[str, Any] | None = None,
        job: dict[str, Any] | None = None,
    ) -> Recipe:
        """Command-line values win; None means "not given" and keeps the recipe's value."""

        def merged(base: dict[str, Any], new: dict[str, Any] | None, schema: dict[str, _Spec] | None,
                   what: str) -> dict[str, Any]:
            out = dict(base)
            for key, value in (new or {}).items():
                if value is None:
                    continue
                if schema is not None:
                    _check_value(schema, key, value, what, "<command line>")
                out[key] = value
            return out

        return replace(
            self,
            model=model if model is not None else self.model,
            adapters=merged(self.adapters, adapters, None, "adapters"),
            engine=merged(self.engine, engine, ENGINE_SCHEMA, "engine"),
            sampling=merged(self.sampling, sampling, SAMPLING_SCHEMA, "sampling"),
            job=merged(self.job, job, JOB_SCHEMA, "job"),
        )


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped in lorax.recipes."""
    from lorax.recipes import RECIPES_DIR

    return sorted(p.stem for p in Path(RECIPES_DIR).glob("*.yaml"))


def find_recipe(name_or_path: str) -> Path:
    """A recipe file: an existing path, else a built-in name (with or without `.yaml`)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    from lorax.recipes import RECIPES_DIR

    stem = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
    builtin = Path(RECIPES_DIR) / f"{stem}.yaml"
    if "/" not in stem and builtin.is_file():
        return builtin
    names = ", ".join(builtin_recipes()) or "none"
    raise ConfigError(f"recipe {name_or_path!r}: no such file and no built-in recipe of that name (built-in: {names})")


def load_recipe(name_or_path: str) -> Recipe:
    """Read, validate and resolve a recipe file or built-in recipe name."""
    import yaml

    path = find_recipe(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} not valid YAML: {getattr(err, 'problem', None) or err}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text") from err
    return parse_recipe(data if data is not None else {}, path)


def parse_recipe(data: Any, path: Path) -> Recipe:
    """Validate the mapping read from `path`; resolve relative paths against the recipe's folder."""
    src = str(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: a recipe must be a mapping of keys, got {type(data).__name__}")
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(f"{src}: unknown key {key!r} (allowed: {', '.join(_TOP_KEYS)})")
    base = path.resolve().parent
    for key in ("name", "description", "model"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise ConfigError(f"{src}: key {key!r} must be a string, got {type(data[key]).__name__}")

    adapters_raw = data.get("adapters") or {}
    if not isinstance(adapters_raw, dict):
        raise ConfigError(f"{src}: key 'adapters' must be a mapping of name -> source")
    adapters: dict[str, str] = {}
    for name, source in adapters_raw.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{src}: adapter names must be non-empty strings, got {name!r}")
        if not isinstance(source, str) or not source:
            raise ConfigError(f"{src}: key 'adapters.{name}' must be a path or repo id string")
        adapters[name] = resolve_source(source, base)

    sections: dict[str, dict[str, Any]] = {}
    for section, schema in _SECTIONS.items():
        raw = data.get(section) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{src}: key {section!r} must be a mapping")
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if value is None:
                continue  # null: use the default
            _check_value(schema, key, value, section, src)
            values[key] = value
        sections[section] = values
    if "chat_template" in sections["job"]:
        from lorax.inference.chat import load_template_arg

        sections["job"]["chat_template"] = load_template_arg(sections["job"]["chat_template"], base)
    probes = data.get("probes") or []
    if not isinstance(probes, list) or not all(isinstance(p, str) and p for p in probes):
        raise ConfigError(f"{src}: key 'probes' must be a list of non-empty strings")
    model = data.get("model")
    return Recipe(
        source=src,
        name=data.get("name"),
        model=resolve_source(model, base) if model else None,
        adapters=adapters,
        engine=sections["engine"],
        sampling=sections["sampling"],
        job=sections["job"],
        probes=list(probes),
    )


def resolve_source(value: str, base: Path) -> str:
    """A model/adapter source written in a recipe: paths are relative to the recipe's folder.

    `./x`, `../x`, `~/x` and absolute paths are paths; a bare `org/name` is a local path only if it
    exists next to the recipe, otherwise a Hub repo id left as written.
    """
    if value.startswith(("~",)):
        return str(Path(value).expanduser())
    p = Path(value)
    if p.is_absolute():
        return value
    if value.startswith(("./", "../")) or (base / p).exists():
        return str((base / p).resolve())
    return value


def _check_value(schema: dict[str, _Spec], key: Any, value: Any, section: str, src: str) -> None:
    if key not in schema:
        raise ConfigError(f"{src}: unknown key '{section}.{key}' (allowed: {', '.join(schema)})")
    types, choices, minimum = schema[key]
    ok_type = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok_type:
        want = " or ".join(t.__name__ for t in types)
        raise ConfigError(f"{src}: key '{section}.{key}' must be {want}, got {type(value).__name__} {value!r}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{src}: key '{section}.{key}' must be one of {', '.join(map(str, choices))}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{src}: key '{section}.{key}' must be >= {minimum}, got {value!r}")
    if section == "engine" and key == "device" and not (value in ("auto", "cpu", "cuda") or
                                                        (value.startswith("cuda:") and value[5:].isdigit())):
        raise ConfigError(f"{src}: key 'engine.device' must be auto, cpu, cuda or cuda:N, got {value!r}")
    if key == "gpu_memory_utilization" and not 0 < value <= 1:
        raise ConfigError(f"{src}: key 'engine.gpu_memory_utilization' must be in (0, 1], got {value!r}")
    if key == "served_model_names" and not all(isinstance(n, str) and n for n in value):
        raise ConfigError(f"{src}: key '{section}.{key}' must be a list of non-empty strings")
    if key == "stop" and isinstance(value, list) and not all(isinstance(s, str) for s in value):
        raise ConfigError(f"{src}: key '{section}.{key}' must be a list of strings")
    if key == "stop_token_ids" and not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ConfigError(f"{src}: key '{section}.{key}' must be a list of integers")
