"""Recipes: schema errors name the key and the file; paths resolve against the recipe; built-ins load."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorax.errors import ConfigError
from lorax.inference.recipe import ENGINE_SCHEMA, builtin_recipes, load_recipe
from lorax.recipes import RECIPES_DIR

# (recipe text, substrings the error must contain besides the file name)
BAD: list[tuple[str, tuple[str, ...]]] = [
    ("modle: x\n", ("unknown key 'modle'",)),
    ("model: x\nengine: {max_lora: 4}\n", ("engine.max_lora",)),
    ("model: x\nengine: {max_loras: '4'}\n", ("engine.max_loras", "int")),
    ("model: x\nengine: {max_loras: true}\n", ("engine.max_loras", "bool")),
    ("model: x\nengine: {max_loras: 0}\n", ("engine.max_loras", ">= 1")),
    ("model: x\nengine: {dtype: fp8}\n", ("engine.dtype", "fp8")),
    ("model: x\nengine: {device: tpu}\n", ("engine.device",)),
    ("model: x\nengine: {gpu_memory_utilization: 1.5}\n", ("engine.gpu_memory_utilization",)),
    ("model: x\nengine: {enforce_eager: 1}\n", ("engine.enforce_eager", "bool")),
    ("model: x\nsampling: {temperature: hot}\n", ("sampling.temperature",)),
    ("model: x\nsampling: {stop: [1, 2]}\n", ("sampling.stop", "strings")),
    ("model: x\nsampling: {max_new_tokens: 5}\n", ("sampling.max_new_tokens",)),
    ("model: x\njob: {orderd: true}\n", ("job.orderd",)),
    ("model: x\nengine: [1, 2]\n", ("'engine' must be a mapping",)),
    ("model: 3\n", ("'model' must be a string",)),
    ("model: x\nadapters: [a, b]\n", ("'adapters' must be a mapping",)),
    ("model: x\nadapters: {a: 3}\n", ("adapters.a",)),
    ("- just\n- a list\n", ("must be a mapping",)),
    ("model: x\nengine: {max_loras: 4\n", ("not valid YAML",)),
]


@pytest.mark.parametrize(("text", "needles"), BAD, ids=[b[1][0] for b in BAD])
def test_bad_recipes_name_key_and_file(tmp_path: Path, text: str, needles: tuple[str, ...]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_recipe(str(path))
    msg = str(info.value)
    assert str(path) in msg
    for needle in needles:
        assert needle in msg, msg


def test_paths_resolve_against_the_recipe_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sub = tmp_path / "r"
    (sub / "adapters" / "a").mkdir(parents=True)
    (sub / "model").mkdir()
    (sub / "tpl.jinja").write_text("{{ messages[0].content }}")
    (sub / "job.yaml").write_text(
        "model: ./model\nadapters:\n  a: adapters/a\n  hub: org/name\n  up: ../elsewhere\n"
        "job: {chat_template: tpl.jinja}\nengine: {max_num_seqs: 8, gpu_memory_utilization: 1}\n"
    )
    monkeypatch.chdir(tmp_path)  # the current directory must not matter
    rec = load_recipe("r/job.yaml")
    assert rec.model == str(sub / "model")
    assert rec.adapters == {"a": str(sub / "adapters" / "a"), "hub": "org/name", "up": str(tmp_path / "elsewhere")}
    assert rec.job["chat_template"] == "{{ messages[0].content }}"
    assert rec.engine == {"max_num_seqs": 8, "gpu_memory_utilization": 1}


def test_overrides_win_key_by_key(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("model: m\nadapters: {a: /x}\nengine: {max_loras: 2, dtype: float32}\nsampling: {max_tokens: 9}\n")
    rec = load_recipe(str(path)).with_overrides(
        model=None, adapters={"b": "/y", "a": "/z"}, engine={"max_loras": 8, "dtype": None},
        sampling={"temperature": 0.5},
    )
    assert rec.model == "m" and rec.adapters == {"a": "/z", "b": "/y"}
    assert rec.engine == {"max_loras": 8, "dtype": "float32"}
    assert rec.sampling == {"max_tokens": 9, "temperature": 0.5}
    with pytest.raises(ConfigError, match="engine.max_loras"):
        rec.with_overrides(engine={"max_loras": 0})


def test_builtin_recipes_load_and_match_the_engine_options() -> None:
    names = builtin_recipes()
    assert {"demo", "qwen3-30b-a3b", "mixtral-8x7b", "olmoe-1b-7b", "qwen1.5-moe-a2.7b"} <= set(names)
    for name in names:
        rec = load_recipe(name)
        assert rec.model and rec.source == str(Path(RECIPES_DIR) / f"{name}.yaml")
        assert set(rec.engine) <= set(ENGINE_SCHEMA)
    demo = load_recipe("demo")
    assert demo.model == str(Path(RECIPES_DIR) / "demo" / "model")
    assert set(demo.adapters) == {"reverse", "upper", "rot13", "swapcase"}
    try:  # the engine's own validation agrees with the recipe schema, once it exists
        from lorax.inference.config import EngineConfig
    except ImportError:
        return
    for name in names:
        EngineConfig.from_options(load_recipe(name).engine)


def test_unknown_recipe_name_lists_builtins() -> None:
    with pytest.raises(ConfigError, match="built-in: .*demo"):
        load_recipe("no-such-recipe")
