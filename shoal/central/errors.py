"""The one exception central's parts raise to answer a request with an error."""

from __future__ import annotations


class HttpError(Exception):
    """Answer ``status`` with ``{"error": message}`` and these extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


RETRY_SOON = {"retry-after": "1"}
