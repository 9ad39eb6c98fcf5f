"""The daemon's settings (device/serve/config.py): an option that another option's value makes
meaningless is refused, not silently ignored; left at its default it never is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from bundle.errors import ToolkitError
from device.serve.config import ServeConfig
from toolkit.cli import main


def serve(*args: str) -> Any:
    return CliRunner().invoke(main, ["serve", *args])


def test_baud_without_serial_is_refused(tmp_path: Path) -> None:
    """--baud sets the serial port's speed; without --serial the daemon opened no port and the
    flag did nothing."""
    with pytest.raises(ToolkitError, match="--baud sets the speed of the --serial port") as e:
        ServeConfig(bundle=tmp_path, baud=115200)
    assert e.value.hint
    result = serve(str(tmp_path), "--socket", str(tmp_path / "d.sock"), "--baud", "9600")
    assert result.exit_code == 1 and "error: --baud sets the speed" in result.output
    assert "hint: drop --baud" in result.output and not (tmp_path / "d.sock").exists()


def test_baud_with_serial_is_taken_and_defaults_when_not_given(tmp_path: Path) -> None:
    from device.serve.serial_link import DEFAULT_BAUD as BAUD

    store = tmp_path / "store"
    given = ServeConfig(bundle=None, store=store, serial="/dev/ttyGS0", token_file=tmp_path / "t",
                        baud=115200)
    assert given.serial_baud == 115200
    default = ServeConfig(bundle=None, store=store, serial="/dev/ttyGS0", token_file=tmp_path / "t")
    assert default.serial_baud == BAUD
    assert ServeConfig(bundle=tmp_path).serial_baud == BAUD  # the default never trips the check


@pytest.mark.parametrize("baud", [0, -9600])
def test_a_baud_that_is_no_speed_is_refused(tmp_path: Path, baud: int) -> None:
    with pytest.raises(ToolkitError, match="--baud must be a positive speed"):
        ServeConfig(bundle=None, store=tmp_path, serial="/dev/ttyGS0", token_file=tmp_path / "t", baud=baud)


def test_draft_tokens_with_speculate_off_is_refused(tmp_path: Path) -> None:
    """--speculate off drafts nothing: --draft-tokens K beside it set nothing, silently."""
    with pytest.raises(ToolkitError, match="--speculate off drafts nothing") as e:
        ServeConfig(bundle=tmp_path, speculate="off", draft_tokens=4)
    assert e.value.hint
    result = serve(str(tmp_path), "--socket", str(tmp_path / "d.sock"), "--speculate", "off",
                   "--draft-tokens", "4")
    assert result.exit_code == 1 and "error: --draft-tokens sets the length of drafts" in result.output
    assert "hint: drop --draft-tokens" in result.output and not (tmp_path / "d.sock").exists()


def test_draft_tokens_default_applies_only_when_not_given(tmp_path: Path) -> None:
    from device.serve.config import DRAFT_TOKENS

    assert ServeConfig(bundle=tmp_path, speculate="off").draft_limit == DRAFT_TOKENS  # default: no error
    assert ServeConfig(bundle=tmp_path).draft_limit == DRAFT_TOKENS
    assert ServeConfig(bundle=tmp_path, speculate="ngram", draft_tokens=4).draft_limit == 4


@pytest.mark.parametrize("option,error,hint", [
    ("--tcp", "error: --tcp '' is not HOST:PORT", "hint: e.g. --tcp"),  # was: no TCP listener, silently
    ("--serial", "error: --serial is empty", "hint: give the serial port"),  # was: no serial link, silently
    ("--socket", "error: --socket is empty", "hint: give the socket's path"),  # was: ". is not a socket"
])
def test_an_empty_listener_option_is_refused(tmp_path: Path, option: str, error: str, hint: str) -> None:
    store = tmp_path / "store"
    args = ["--store", str(store), "--token-file", str(tmp_path / "token")]
    if option != "--socket":
        args += ["--socket", str(tmp_path / "d.sock")]
    result = serve(*args, option, "")
    assert result.exit_code == 1 and error in result.output and hint in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "d.sock").exists() and not store.exists()


def test_the_socket_default_is_taken_only_when_not_given(tmp_path: Path) -> None:
    from device.serve.httpd import default_socket_path

    assert ServeConfig(bundle=tmp_path).socket_path == default_socket_path()
    assert ServeConfig(bundle=tmp_path, socket=str(tmp_path / "d.sock")).socket_path == tmp_path / "d.sock"
    with pytest.raises(ToolkitError, match="--socket is empty"):
        ServeConfig(bundle=tmp_path, socket="")
