"""OpenAI's `logprobs` objects from the engine's per-token records (scheduler.TokenLogprob).

    fmt = LogprobFormatter(tokenizer, chat=True)
    fmt.render(entries)  # chat:        {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}
                         # completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"}

A token's text is its own decoding (special tokens kept); "bytes" are that text's UTF-8, as
OpenAI gives them (a token that is half a multi-byte character decodes to U+FFFD here).
text_offset counts characters from the start of the completion, across a stream's chunks.
"""

from __future__ import annotations

from typing import Any

from device.runtime.sampling import TokenLogprob
from device.runtime.tokenizer import BundleTokenizer


class LogprobFormatter:
    def __init__(self, tokenizer: BundleTokenizer, chat: bool) -> None:
        self.tokenizer, self.chat = tokenizer, chat
        self.offset = 0  # characters of the completion's tokens rendered so far
        self._text: dict[int, str] = {}

    def _token(self, token: int) -> str:
        text = self._text.get(token)
        if text is None:
            text = self._text[token] = str(self.tokenizer.tok.decode([token], skip_special_tokens=False))
        return text

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        text = self._token(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def render(self, entries: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> dict[str, Any]:
        if self.chat:
            return {"content": [{**self._entry(e.token, e.logprob),
                                 "top_logprobs": [self._entry(t, lp) for t, lp in e.top]}
                                for e in entries]}
        tokens = [self._token(e.token) for e in entries]
        offsets = []
        for text in tokens:
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self._token(t): lp for t, lp in e.top} for e in entries],
                "text_offset": offsets}
