"""Options that another option's value makes meaningless: refused with one error line and a hint
(they used to be ignored, silently); left at their defaults they never are. The daemon's:
tests/device/serve/test_config.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from toolkit.cli import main


def run(*args: str) -> Any:
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.output and not isinstance(result.exception, (AttributeError, TypeError))
    return result


# --- toolkit convert --precision fp32: nothing is quantized -------------------------------------

@pytest.mark.parametrize("option,value", [("--calibration", "prompts.txt"), ("--min-top1", "0.9"),
                                          ("--max-ppl-increase", "2"), ("--min-cosine", "0.99"),
                                          ("--min-greedy", "0.5")])
def test_convert_refuses_quantize_options_without_a_precision(tmp_path: Path, option: str,
                                                               value: str) -> None:
    out = tmp_path / "b"
    result = run("convert", "smollm2-135m", "--target", "cpu", "-o", str(out), option, value)
    assert result.exit_code == 1, result.output
    assert f"error: {option} apply to quantizing, and --precision fp32" in result.output
    assert f"hint: drop {option}" in result.output and not out.exists()


# --- toolkit generate --temperature 0: greedy, nothing is sampled -------------------------------

@pytest.mark.parametrize("args", [["--top-k", "40"], ["--top-p", "0.9"], ["--seed", "1"],
                                  ["--temperature", "0", "--top-k", "5", "--seed", "2"]])
def test_generate_refuses_sampling_options_when_greedy(tmp_path: Path, args: list[str]) -> None:
    """Refused before any connection: the socket does not exist, and the error is not that."""
    result = run("generate", "--socket", str(tmp_path / "none.sock"), *args, "hello")
    assert result.exit_code == 1, result.output
    assert "shape sampling, and --temperature 0 (the default) is greedy" in result.output
    assert "hint: add --temperature 0.7" in result.output and "no daemon" not in result.output


def test_generate_takes_sampling_options_with_a_temperature(tmp_path: Path) -> None:
    result = run("generate", "--socket", str(tmp_path / "none.sock"), "--temperature", "0.7",
                 "--top-k", "40", "--seed", "1", "hello")
    assert result.exit_code == 1 and "no daemon is listening" in result.output  # got past the check
