"""Chat templates render exactly as transformers' apply_chat_template does (transformers is the oracle)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorax.errors import ConfigError
from lorax.inference.chat import ChatTemplateError, load_template_arg, render_chat, template_from_dir

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA_LIKE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system = "" %}
{%- endif %}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if loop.index0 == 0 and system %}{{ '[SYS]' + system + '[/SYS]' }}{% endif %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + message['content'] | trim + ' [/INST]' }}
    {%- else %}
        {% generation %}{{- ' ' + message['content'] | trim + eos_token }}{% endgeneration %}
    {%- endif %}
{%- endfor %}
"""
TOJSON = "{% for m in messages %}{{ m | tojson }}{% if loop.last %}{% break %}{% endif %}\n{% endfor %}" \
         "{{ tools | tojson(indent=2) if tools is defined else '' }}"

CONVS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
     {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "héllo \"q\""}],
]


@pytest.mark.parametrize("template", [CHATML, LLAMA_LIKE, TOJSON], ids=["chatml", "llama-like", "tojson"])
@pytest.mark.parametrize("conv", CONVS, ids=["one-turn", "multi-turn"])
@pytest.mark.parametrize("gen", [True, False])
def test_render_matches_transformers(template: str, conv: list[dict[str, str]], gen: bool) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    [want], _ = render_jinja_template([conv], chat_template=template, add_generation_prompt=gen,
                                      bos_token="<s>", eos_token="</s>")
    got = render_chat(template, conv, add_generation_prompt=gen, bos_token="<s>", eos_token="</s>")
    assert got == want


def test_raise_exception_surfaces_the_template_message() -> None:
    bad = [{"role": "assistant", "content": "first"}]
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat(LLAMA_LIKE, bad)


def test_sandbox_blocks_attribute_escapes() -> None:
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        render_chat(evil, CONVS[0])


def test_broken_template_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="does not parse"):
        render_chat("{% for m in messages %}", CONVS[0])


def test_template_sources(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    (a / "tokenizer_config.json").write_text(json.dumps({"chat_template": "A"}))
    assert template_from_dir(a) == "A"
    (a / "chat_template.jinja").write_text("J")
    assert template_from_dir(a) == "J"  # the file form wins, as in transformers
    b = tmp_path / "b"
    b.mkdir()
    (b / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "T"},
                                                                           {"name": "default", "template": "D"}]}))
    assert template_from_dir(b) == "D"
    assert template_from_dir(tmp_path / "missing") is None
    assert load_template_arg("{{ x }}") == "{{ x }}"
    assert load_template_arg("chat_template.jinja", base_dir=a) == "J"
    assert load_template_arg(str(b)) == "D"
    with pytest.raises(ConfigError, match="neither a file"):
        load_template_arg("nope.jinja", base_dir=tmp_path)
