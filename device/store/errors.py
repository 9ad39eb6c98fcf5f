"""The store's one error type, in its own module so that the store's helpers (space.py) can
raise it without importing the store."""

from __future__ import annotations

from typing import Any

from bundle.errors import ToolkitError


class StoreError(ToolkitError):
    """A refused store operation; `status` is the HTTP status it maps to, `code` a stable word
    the host can act on (e.g. "gap": resume from `held`)."""

    def __init__(self, message: str, hint: str | None = None, status: int = 400,
                 code: str = "invalid_request", **extra: Any) -> None:
        super().__init__(message, hint)
        self.status, self.code, self.extra = status, code, extra
