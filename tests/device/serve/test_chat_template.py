"""Chat templates on the device (device/runtime/tokenizer.py) against transformers'
apply_chat_template: the same text for the same conversation, rendered the way
/v1/chat/completions renders it (device/serve/openai_api.py).

The templates are excerpts of real ones (Llama 3.1/3.2, Qwen2.5, Granite 3, SmolLM3-style
{% generation %} blocks), each reduced to the construct under test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bundle.manifest import TokenizerRecord
from device.runtime.tokenizer import BundleTokenizer
from tests.support.tiny_models import word_tokenizer

CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi"}, {"role": "user", "content": "paris"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather <now> & 'here', in Zürich or 東京",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

LOOP = "{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}"
TEMPLATES = {
    # Qwen2.5 / Llama 3.1: tool specs through tojson (unsorted keys, "<" and non-ASCII as is)
    "tojson": "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}" + LOOP,
    "tojson-indent": "{% for t in tools %}{{ t | tojson(indent=4) }}{% endfor %}" + LOOP,
    # Llama 3.2: today's date from strftime_now when the renderer defines it
    "strftime_now": ('{%- if strftime_now is defined %}{%- set date_string = strftime_now("%d %b %Y") %}'
                     '{%- else %}{%- set date_string = "26 Jul 2024" %}{%- endif %}'
                     "Today Date: {{ date_string }}\n" + LOOP),
    # Granite 3: strftime_now called without a guard
    "strftime_now-unguarded": "{{ strftime_now('%B %d, %Y') }}\n" + LOOP,
    # jinja2.ext.loopcontrols, which transformers enables
    "break": "{% for m in messages %}{% if m.role == 'assistant' %}{% break %}{% endif %}{{ m.content }};"
             "{% endfor %}",
    # transformers' assistant-mask tag, rendered as its body
    "generation": "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
                  "{% endgeneration %}{% else %}{{ m.content }}{% endif %};{% endfor %}",
}


def _device(folder: Path, template: str) -> BundleTokenizer:
    """The tiny word tokenizer as convert writes it into a bundle, with this template."""
    hf = word_tokenizer()
    hf.chat_template = template
    folder.mkdir()
    hf.save_pretrained(str(folder))
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    return BundleTokenizer(folder, TokenizerRecord(path=".", stop_token_ids=[2]))


def _transformers(template: str, messages: list[dict[str, Any]],
                  tools: list[dict[str, Any]] | None = None) -> str:
    hf = word_tokenizer()
    hf.chat_template = template
    return str(hf.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False))


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_the_template_renders_as_transformers_renders_it(tmp_path: Path, name: str) -> None:
    template = TEMPLATES[name]
    device = _device(tmp_path / "tok", template)
    assert device.render_chat(CONVERSATION, tools=TOOLS) == _transformers(template, CONVERSATION, TOOLS)


@pytest.mark.parametrize("template", [
    # Mistral-style guards: a tool or document section only when the caller gave some
    "{% if tools is not none %}[AVAILABLE_TOOLS]{{ tools | length }}[/AVAILABLE_TOOLS]{% endif %}" + LOOP,
    "{% if documents is not none %}<documents>{{ documents | length }}</documents>{% endif %}" + LOOP,
], ids=["tools", "documents"])
def test_no_tools_and_no_documents_are_none_as_in_transformers(tmp_path: Path, template: str) -> None:
    device = _device(tmp_path / "tok", template)
    assert device.render_chat(CONVERSATION) == _transformers(template, CONVERSATION)
    assert "[AVAILABLE_TOOLS]" not in device.render_chat(CONVERSATION)
