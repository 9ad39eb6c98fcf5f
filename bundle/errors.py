"""The one user-facing error type.

Library code raises `ToolkitError("what was wrong (value=...)", hint="what to do")`.
Only the CLI catches it, prints it without a traceback and exits non-zero.
Anything else escaping is a bug and keeps its traceback.

Ctrl-C (KeyboardInterrupt) is not an error: the CLI prints one `interrupted` line and exits 130
(128 + SIGINT). A command that keeps something worth naming (an upload that resumes) raises
`Interrupted("what was kept")` from the KeyboardInterrupt instead; it is a KeyboardInterrupt, so
every cleanup on the way up treats it as one.
"""

from __future__ import annotations


class ToolkitError(Exception):
    """An error the user can act on: a message and, optionally, what to do next."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a command Ctrl-C stopped


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what the interrupted work kept or how to go on (`kept`, may be empty)."""

    def __init__(self, kept: str = "") -> None:
        super().__init__(kept)
        self.kept = kept
