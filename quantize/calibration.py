"""Calibration and held-out text: read, tokenized with the bundle's own tokenizer, cut into samples.

    text = read_text(path)                         # None -> quantize/data/calibration.txt
    cal = token_windows(text, tokenizer, samples=32, seq_len=128)

The calibration text sets the activation ranges of the static Q/DQ formats (Jetson int8, fp8);
the weight-only formats ignore it. The gate's held-out text (quantize/data/heldout.txt) is a
different text the calibration never sees, so the gate does not grade on the material the
ranges were fitted to.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from bundle.errors import ToolkitError

BUILTIN_CALIBRATION = "calibration.txt"
BUILTIN_HELDOUT = "heldout.txt"
DEFAULT_SAMPLES = 32
DEFAULT_SEQ_LEN = 128
MIN_TOKENS = 16  # below this a text says nothing about activation ranges


@dataclass(frozen=True)
class Text:
    source: str  # the file path, or "builtin:<name>"
    text: str
    sha256: str


@dataclass(frozen=True)
class CalibrationSet:
    """Token windows of one text: `samples` windows of `seq_len` ids, spread over the text."""

    source: str
    sha256: str
    windows: list[list[int]] = field(repr=False)
    seq_len: int
    tokens: int  # tokens the whole text has

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256, "samples": len(self.windows),
                "seq_len": self.seq_len, "text_tokens": self.tokens}


def builtin_text(name: str) -> Text:
    raw = resources.files("quantize").joinpath("data").joinpath(name).read_bytes()  # 3.10: one part
    return Text(f"builtin:{name}", raw.decode("utf-8"), hashlib.sha256(raw).hexdigest())


def read_text(path: Path | None) -> Text:
    """The calibration text: a user's UTF-8 file, or the one the toolkit ships."""
    if path is None:
        return builtin_text(BUILTIN_CALIBRATION)
    path = Path(path)
    if path.is_dir():
        raise ToolkitError(f"the calibration text {path} is a folder; calibration needs a file of "
                           "UTF-8 text",
                           hint="pass a UTF-8 text file with --calibration (e.g. one file from that "
                                "folder), or leave the option out to use the toolkit's own text")
    if not path.is_file():
        raise ToolkitError(f"calibration file {path} does not exist",
                           hint="pass a UTF-8 text file with --calibration, or leave the option "
                                "out to use the toolkit's own calibration text")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ToolkitError(f"calibration file {path} is not UTF-8 text (byte {e.start}: "
                           f"{raw[e.start:e.start + 1]!r})",
                           hint="convert it first, e.g. `iconv -f latin1 -t utf-8 FILE > "
                                "FILE.utf8`, and pass the converted file") from e
    if not text.strip():
        raise ToolkitError(f"calibration file {path} is empty",
                           hint="give it a few KB of text like the prompts the model will see")
    return Text(str(path), text.lstrip("\ufeff"), hashlib.sha256(raw).hexdigest())


def token_windows(text: Text, tokenizer: Any, samples: int = DEFAULT_SAMPLES,
                  seq_len: int = DEFAULT_SEQ_LEN, max_len: int | None = None) -> CalibrationSet:
    """`samples` windows of `seq_len` tokens with evenly spaced starts. When the text is shorter
    than samples x seq_len the windows overlap; when it is shorter than one window, the window
    shrinks to the text. max_len caps seq_len (a decoder's static cache holds max_seq - 1 new
    tokens; an encoder has its position limit)."""
    if samples < 1 or seq_len < 2:
        raise ToolkitError(f"--samples must be >= 1 and --seq-len >= 2 (got {samples}, {seq_len})")
    ids = tokenizer.encode(text.text, add_special_tokens=False)
    if len(ids) < MIN_TOKENS:
        raise ToolkitError(f"calibration text {text.source} has only {len(ids)} tokens",
                           hint=f"give it at least {MIN_TOKENS} tokens; a few KB of text is typical")
    length = min(seq_len, len(ids), max_len or seq_len)
    span = len(ids) - length  # last possible start
    starts = [round(i * span / max(samples - 1, 1)) for i in range(samples)]
    windows = [ids[s:s + length] for s in starts]
    return CalibrationSet(text.source, text.sha256, windows, length, len(ids))


def heldout_sentences(text: Text, limit: int = 48) -> list[str]:
    """Sentences for the encoder gate: split on . ? ! and newlines, short fragments dropped."""
    import re

    parts = re.split(r"(?<=[.?!])\s+|\n+", text.text)
    return [p.strip() for p in parts if len(p.strip().split()) >= 4][:limit]
