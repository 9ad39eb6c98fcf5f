"""OpenAI's `logprobs` objects from the engine's per-token records (scheduler.TokenLogprob).

    fmt = LogprobFormatter(tokenizer, chat=True)
    fmt.render(entries)  # chat:        {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}
                         # completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"}

A token's text is what it adds to the completion after the tokens before it (special tokens
kept), so the tokens join to the text and text_offset indexes it, as OpenAI's do. Decoding a
token alone is not that: a SentencePiece or word-level decoder drops the space a token carries
when it comes first, so "Paris" came out where the text had " Paris". The alternatives in
top_logprobs are decoded after the same tokens. "bytes" are that text's UTF-8, as OpenAI gives
them (a token that is half a multi-byte character decodes to U+FFFD here).
text_offset counts characters from the start of the completion, across a stream's chunks.
"""

from __future__ import annotations

from typing import Any

from device.runtime.sampling import TokenLogprob
from device.runtime.tokenizer import BundleTokenizer

# Tokens of context a token is decoded after: enough for a decoder's spacing and for a
# multi-byte character split over a few byte tokens, few enough to stay cheap per token
# (the scheduler's StreamDecoder decodes a window of the same kind).
CONTEXT = 4


class LogprobFormatter:
    def __init__(self, tokenizer: BundleTokenizer, chat: bool) -> None:
        self.tokenizer, self.chat = tokenizer, chat
        self.offset = 0  # characters of the completion's tokens rendered so far
        self.context: list[int] = []  # the last CONTEXT tokens rendered, across render calls

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.tok.decode(ids, skip_special_tokens=False))

    def _texts(self, tokens: list[int]) -> list[str]:
        """Each token's text after the current context (the same context for all of them)."""
        before = self._decode(self.context)
        return [self._decode([*self.context, t])[len(before):] for t in tokens]

    @staticmethod
    def _entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _step(self, e: TokenLogprob) -> tuple[str, list[tuple[str, float]]]:
        """One position: the chosen token's text and its alternatives', then advance."""
        texts = self._texts([e.token, *(t for t, _ in e.top)])
        self.context = [*self.context, e.token][-CONTEXT:]
        return texts[0], [(text, lp) for text, (_, lp) in zip(texts[1:], e.top)]

    def render(self, entries: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> dict[str, Any]:
        steps = [(e, *self._step(e)) for e in entries]
        if self.chat:
            # refusal: required (nullable) beside content in OpenAI's chat logprobs object
            return {"content": [{**self._entry(text, e.logprob),
                                 "top_logprobs": [self._entry(t, lp) for t, lp in top]}
                                for e, text, top in steps], "refusal": None}
        offsets = []
        for _, text, _ in steps:
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": [text for _, text, _ in steps],
                "token_logprobs": [e.logprob for e, _, _ in steps],
                "top_logprobs": [dict(top) for _, _, top in steps],
                "text_offset": offsets}
