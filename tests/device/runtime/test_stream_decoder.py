"""The stream decoder (device/runtime/tokenizer.py): its deltas add up to the whole decode, a
character cut across tokens is never sent half, and each push decodes a short window.

Two tokenizers trained here on text with accents, CJK and emoji, so that characters do split
across tokens: a byte-level BPE (GPT-2, SmolLM2) and a SentencePiece-style Metaspace BPE
(Llama 2, Mistral), whose decoder strips the leading space of the first token.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bundle.manifest import TokenizerRecord
from device.runtime.tokenizer import BundleTokenizer, StreamDecoder

TEXT = ("Le café déjà vu, naïve façade. 東京の天気は晴れです。 Emoji 🤖🚀 and ünïcödé words, "
        "the robot reads the sensor and the camera. ") * 20


def _trained(kind: str) -> Tokenizer:
    if kind == "byte-level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator([TEXT], trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        return tok
    # SentencePiece-style: merges learned on the text, then the 256 byte tokens <0xNN> as plain
    # vocabulary (what byte_fallback reads), as in Llama 2's tokenizer.json
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace()
    learner.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300,
                                                            special_tokens=["<unk>", "<|end|>"]))
    learned = json.loads(learner.to_str())["model"]
    vocab = dict(learned["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens(["<unk>", "<|end|>"])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


@pytest.fixture(scope="module", params=["byte-level", "metaspace"])
def tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> BundleTokenizer:
    folder: Path = tmp_path_factory.mktemp(request.param)
    _trained(request.param).save(str(folder / "tokenizer.json"))
    return BundleTokenizer(folder, TokenizerRecord(path="."))


def _stream(tok: BundleTokenizer, ids: list[int]) -> list[str]:
    d = StreamDecoder(tok)
    return [d.push(i) for i in ids] + [d.flush()]


def test_the_deltas_add_up_to_the_whole_decode(tokenizer: BundleTokenizer) -> None:
    ids = tokenizer.encode(TEXT[:400], add_special_tokens=False)
    assert len(ids) > 50 and "\ufffd" not in tokenizer.decode(ids)
    deltas = _stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)  # no half character was ever sent


def test_random_pieces_and_special_tokens_add_up_too(tokenizer: BundleTokenizer) -> None:
    """Words, characters spelled byte by byte and skipped special tokens in random order."""
    rng = random.Random(0)
    words, end = TEXT.split(), tokenizer.tok.token_to_id("<|end|>")
    for _ in range(20):
        ids: list[int] = []
        for _ in range(rng.randrange(1, 30)):
            pick = rng.random()
            if pick < 0.2:
                ids.append(end)
            elif pick < 0.5:
                ids += _byte_ids(tokenizer, rng.choice("éü東京🤖🚀").encode())
            else:
                ids += tokenizer.encode(" " + rng.choice(words), add_special_tokens=False)
        assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids)


def test_byte_level_random_ids_add_up_even_where_bytes_stay_invalid(tmp_path: Path) -> None:
    """Byte-level decoding maps each byte alone, so any ids at all give what one decode gives,
    U+FFFD where bytes stay invalid. (Byte fallback decodes a run of byte tokens together: an
    invalid run turns bytes already sent into U+FFFD, so any ids cannot hold there, for one
    decode of the whole either.)"""
    _trained("byte-level").save(str(tmp_path / "tokenizer.json"))
    tokenizer = BundleTokenizer(tmp_path, TokenizerRecord(path="."))
    rng = random.Random(0)
    vocab = tokenizer.tok.get_vocab_size()
    for _ in range(20):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
        assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids)


def _byte_ids(tok: BundleTokenizer, data: bytes) -> list[int]:
    """The ids of single-byte tokens: <0xNN> (byte fallback) or GPT-2's byte-to-unicode map."""
    fallback = [tok.tok.token_to_id(f"<0x{b:02X}>") for b in data]
    if None not in fallback:
        return [int(i) for i in fallback]
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {b: chr(b) if b in printable else chr(256 + sorted(set(range(256)) - set(printable)).index(b))
             for b in range(256)}
    return [int(tok.tok.token_to_id(chars[b])) for b in data]


def test_a_character_cut_across_tokens_waits_for_its_last_byte(tokenizer: BundleTokenizer) -> None:
    robot = _byte_ids(tokenizer, "🤖".encode())  # four tokens of one byte each
    ids = tokenizer.encode("ok ", add_special_tokens=False) + robot
    d = StreamDecoder(tokenizer)
    out = [d.push(i) for i in ids]
    assert out[-4:-1] == ["", "", ""] and out[-1].endswith("🤖")
    assert "".join(out) + d.flush() == tokenizer.decode(ids)
    d = StreamDecoder(tokenizer)
    cut = "".join(d.push(i) for i in ids[:-1])
    assert "\ufffd" not in cut and d.flush().endswith("\ufffd")  # cut short: held bytes as U+FFFD


def test_each_push_decodes_a_window_not_the_whole_output(tokenizer: BundleTokenizer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    ids = tokenizer.encode(TEXT * 4, add_special_tokens=False)
    assert len(ids) > 1000
    decoded: list[int] = []
    real = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda xs: decoded.append(len(xs)) or real(xs))
    d = StreamDecoder(tokenizer)
    text = "".join(d.push(i) for i in ids) + d.flush()
    assert text == real(ids)
    assert max(decoded) <= 16  # the window, whatever the length of the output


def test_token_id_prompts_are_checked_against_a_vocabulary_counted_once(tmp_path: Path) -> None:
    """tokenizers builds its whole vocabulary map to count it (SmolLM2: 5 ms), and every prompt
    of token ids paid that before it reached the engine: the count is kept at load."""
    from device.serve.httpd import HTTPError
    from device.serve.openai_api import _check_ids

    _trained("byte-level").save(str(tmp_path / "tokenizer.json"))
    tokenizer = BundleTokenizer(tmp_path, TokenizerRecord(path="."))
    counted = tokenizer.vocab_size
    assert counted == tokenizer.tok.get_vocab_size() > 256

    class NoCount:  # the tokenizer as requests see it: counting again fails the test
        def __getattr__(self, name: str) -> object:
            if name == "get_vocab_size":
                raise AssertionError("the vocabulary was counted again")
            return getattr(real, name)

    real, tokenizer.tok = tokenizer.tok, NoCount()  # type: ignore[assignment]
    assert _check_ids([0, counted - 1], tokenizer, "prompt") == [0, counted - 1]
    with pytest.raises(HTTPError, match=r"token ids must be in \[0, "):
        _check_ids([counted], tokenizer, "prompt")
