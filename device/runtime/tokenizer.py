"""The device-side tokenizer: `tokenizers` + jinja2 only, no transformers and no torch.

Importing transformers would cost the daemon seconds at start and hundreds of MB of RSS on a
board with 8 GB shared by CPU and GPU. The bundle carries tokenizer.json and the chat template
that transformers wrote at convert time; this reproduces what transformers does with them:
  encode(text)             = tokenizer(text)["input_ids"]          (special tokens added)
  chat(messages)           = apply_chat_template(..., add_generation_prompt=True, tokenize=True)
  (the rendered template is tokenized without adding special tokens, as transformers does)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bundle.errors import ToolkitError
from bundle.manifest import TokenizerRecord


class BundleTokenizer:
    def __init__(self, folder: Path, info: TokenizerRecord) -> None:
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self.tok = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        # ids it knows, added tokens included: counted once, since tokenizers builds the whole
        # vocabulary map to count it (SmolLM2: 5 ms a call, which every request of token ids
        # paid before its prompt reached the engine: 40 % of a 2-token request's time)
        self.vocab_size: int = self.tok.get_vocab_size()
        cfg_path = self.folder / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.stop_ids: list[int] = list(info.stop_token_ids)
        template = self.folder / "chat_template.jinja"
        self.template_src: str | None = (template.read_text(encoding="utf-8") if template.exists()
                                         else self.config.get("chat_template"))
        self._template: Any = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=True))

    def token_text(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)

    @property
    def renders_tools(self) -> bool:
        """The chat template reads a `tools` variable (transformers passes tools=... to it)."""
        return "tools" in (self.template_src or "")

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> str:
        if not self.template_src:
            raise ToolkitError("this model has no chat template",
                               hint="use /v1/completions with a plain prompt instead")
        if self._template is None:
            self._template = _compile_template(self.template_src)
        special = {k: _token_str(self.config.get(k)) for k in
                   ("bos_token", "eos_token", "unk_token", "pad_token")}
        # tools and documents are always defined, None when not given, as transformers passes
        # them: a template's `tools is not none` (or `documents is not none`) is then false, where
        # an undefined name made it true and rendered an empty tool section into every prompt
        return str(self._template.render(messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **special))

    def encode_chat(self, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        return self.encode(self.render_chat(messages, tools=tools), add_special_tokens=False)


def _compile_template(source: str) -> Any:
    """The template in the jinja environment transformers renders it in (chat_template_utils.
    _compile_jinja_template): real templates rely on its additions, and without them the device
    rendered another prompt than the model was trained on, or refused the template:
      tojson        json.dumps, unsorted, non-ASCII kept, nothing HTML-escaped (jinja's own sorts
                    keys and writes \\u003c for "<": Llama 3.1's and Qwen2.5's tool lists differed)
      strftime_now  today's date (Llama 3.2 wrote its fallback "26 Jul 2024"; Granite 3 failed)
      loopcontrols  {% break %} / {% continue %}
      generation    {% generation %}...{% endgeneration %} (transformers' assistant-mask tag;
                    rendered as its body, as transformers does when no mask is asked for)"""
    from datetime import datetime

    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.parser import Parser
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser: Parser) -> nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise ToolkitError(f"chat template: {message}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def _token_str(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return "" if value is None else str(value)


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, holding back an incomplete UTF-8
    sequence (decoded as U+FFFD) until the next token completes it.

    Each push decodes a short window, not the whole output (that was O(n^2) over a stream: a
    2,048-token answer decoded ~2 million ids on the scheduler's thread). The window is the
    incremental detokenization of TGI and vLLM: `prefix` is where the last emitted window
    began and `read` where it ended, so decode(ids[prefix:]) minus decode(ids[prefix:read]) is the
    new text, with the same context on both sides (a SentencePiece decoder strips the leading
    space of a window's first token from both alike). Written here rather than with
    tokenizers.decoders.DecodeStream because that holds an incomplete character back with no
    way to flush it when the stream ends."""

    def __init__(self, tokenizer: BundleTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window: the previous emission's start
        self.read = 0  # the ids up to here are emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        done, text = self._window()
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""  # nothing new yet, or a character cut in half: wait for the next token
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """Whatever is held back (an incomplete character comes out as U+FFFD)."""
        done, text = self._window()
        self.prefix = self.read = len(self.ids)
        return text[len(done):]

    def _window(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        return decode(self.ids[self.prefix:self.read]), decode(self.ids[self.prefix:])
