"""Refusals: calls the core, a driver or compaction turns down for a reason the caller
can act on.

They say what went wrong in the store's terms: a `code` clients match on, a message,
and a kind. Which HTTP status each kind becomes is decided in one place, the HTTP
layer's table (`http/errors.py`), so nothing below that layer speaks HTTP.
"""

from __future__ import annotations

from typing import ClassVar


class Refused(Exception):
    """A refused call; subclasses name its kind."""

    kind: ClassVar[str] = "invalid"

    def __init__(self, code: str, message: str, *, retry_later: bool = False) -> None:
        super().__init__(message)
        self.code, self.message, self.retry_later = code, message, retry_later


class Invalid(Refused):
    """The request itself is wrong (a parameter, a body, an id that names nothing of
    this session's)."""


class NotFound(Refused):
    kind = "not_found"


class Conflict(Refused):
    """Valid, but the state of the session or the store does not allow it now."""

    kind = "conflict"


class Unprocessable(Refused):
    """Well formed, but an upstream API cannot process it."""

    kind = "unprocessable"


class NotSupported(Refused):
    """The store's backend cannot do this at all."""

    kind = "not_supported"


class UpstreamFailed(Refused):
    """An API the store relies on (a model, the OpenAI backend) failed or refused."""

    kind = "upstream_failed"


class UpstreamTimedOut(Refused):
    kind = "upstream_timed_out"


class UpstreamRefusedKey(Refused):
    """An upstream API refused the sidecar's own credentials: the operator's to fix."""

    kind = "upstream_refused_key"
