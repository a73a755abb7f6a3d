"""Chat templates: render OpenAI-style `messages` into a prompt string, as Hugging Face tokenizers do.

A template is the Jinja2 source found in a model's (or adapter's) tokenizer_config.json
(`chat_template`, a string or a list of named templates), in a `chat_template.jinja` file next to it,
or given by the user. Rendering follows transformers' `apply_chat_template`, so templates written for
it produce the same text here:
- a sandboxed, immutable environment with `trim_blocks` and `lstrip_blocks`, plus loop controls;
- variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `tools` and `documents`
  (None unless given), plus any extra kwargs (`chat_template_kwargs`);
- the `tojson` filter as `json.dumps` (non-ASCII kept, optional indent), `raise_exception(msg)` and
  `strftime_now(fmt)` globals, and the `{% generation %}` tag rendered as its plain body.
The rendered text already holds whatever special tokens the template writes, so callers tokenize it
without adding special tokens again (a second BOS would change the prompt).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from lorax.errors import ConfigError

_TEMPLATE_FILE = "chat_template.jinja"


class ChatTemplateError(ValueError):
    """A template that raised (via `raise_exception`) or failed for these messages."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(source: str) -> Any:
    # jinja2 is imported here so that `lorax --help` never pays for it.
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks: render the body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return str(caller())

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(f"chat template does not parse: line {err.lineno}: {err.message}") from err


def check_template(source: str) -> None:
    """Compile `source` now, so that a broken template fails at start-up rather than on every line."""
    _compile(source)


def render_chat(
    template: str,
    messages: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """Render `messages` with `template`; raise ChatTemplateError with the template's own message."""
    import jinja2

    compiled = _compile(template)
    # transformers always defines these (None when absent); templates test `tools is not none`.
    extra.setdefault("tools", None)
    extra.setdefault("documents", None)
    try:
        return str(
            compiled.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=bos_token,
                eos_token=eos_token,
                **extra,
            )
        )
    except ChatTemplateError:
        raise
    except (jinja2.TemplateError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise ChatTemplateError(f"chat template failed: {type(err).__name__}: {err}") from err


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check the OpenAI message shape (list of {role, content}); raise ValueError naming the bad item."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"messages[{i}] must be an object, got {type(msg).__name__}")
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}] needs a string 'role'")
        content = msg.get("content")
        if isinstance(content, list):
            # OpenAI content parts: only text parts can feed a text model.
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ValueError(f"messages[{i}].content[{j}]: only {{'type': 'text', 'text': ...}} parts are supported")
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
    return [_flatten_content(m) for m in messages]


def _flatten_content(msg: dict[str, Any]) -> dict[str, Any]:
    # Most templates expect `content` as a string; join text parts the way vLLM does (newline).
    content = msg.get("content")
    if isinstance(content, list):
        msg = dict(msg)
        msg["content"] = "\n".join(part["text"] for part in content)
    return msg


def template_from_dir(directory: str | Path) -> str | None:
    """The chat template shipped in a model or adapter directory, or None.

    `chat_template.jinja` wins over tokenizer_config.json (transformers writes the file form since 4.50);
    a list of named templates picks "default".
    """
    d = Path(directory)
    if not d.is_dir():
        return None
    jinja_file = d / _TEMPLATE_FILE
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    cfg_file = d / "tokenizer_config.json"
    if not cfg_file.is_file():
        return None
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{cfg_file}: not valid JSON: {err}") from err
    value = cfg.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def load_template_arg(value: str, base_dir: Path | None = None) -> str:
    """`--chat-template` / recipe `chat_template`: a file path (relative to base_dir) or the template itself."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if path.is_dir():
        found = template_from_dir(path)
        if found is None:
            raise ConfigError(f"chat template: {path} holds no chat_template.jinja or tokenizer_config.json template")
        return found
    if not path.is_file():
        raise ConfigError(f"chat template: {value!r} is neither a file nor a Jinja template")
    return path.read_text(encoding="utf-8")
