"""Error codes of the wire protocol and the one exception that carries them."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """The contract's error codes, as sent in ``error.code``."""

    BAD_REQUEST = "bad-request"
    UNSUPPORTED_VERSION = "unsupported-version"
    TOO_LARGE = "too-large"
    UNKNOWN_LOCATION = "unknown-location"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate-limited"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class WireError(Exception):
    """A request the peer got wrong, with the code and sentence to send back."""

    def __init__(self, code: ErrorCode, message: str, request_id: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
