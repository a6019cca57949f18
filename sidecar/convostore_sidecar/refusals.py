"""Refusals: calls the core, a driver or compaction turns down for a reason the caller
can act on.

They say what went wrong in the store's terms: a `code` clients match on, a message,
and a kind, which is the class. Which HTTP status each kind becomes is decided in one
place, the HTTP layer's table (`http/errors.py`), so nothing below that layer speaks HTTP.
"""

from __future__ import annotations


class Refused(Exception):
    """A refused call; only its subclasses are raised, each a kind."""

    def __init__(self, code: str, message: str, *, retry_later: bool = False) -> None:
        super().__init__(message)
        self.code, self.message, self.retry_later = code, message, retry_later


class Invalid(Refused):
    """The request itself is wrong (a parameter, a body, an id that names nothing of
    this session's)."""


class NotFound(Refused):
    """The store, session or branch the call names is not there."""


class Conflict(Refused):
    """Valid, but the state of the session or the store does not allow it now."""


class Unprocessable(Refused):
    """Well formed, but an upstream API cannot process it."""


class NotSupported(Refused):
    """The store's backend cannot do this at all."""


class UpstreamFailed(Refused):
    """An API the store relies on (a model, the OpenAI backend) failed or refused."""


class UpstreamTimedOut(Refused):
    """An API the store relies on did not answer in time."""


class UpstreamRefusedKey(Refused):
    """An upstream API refused the sidecar's own credentials: the operator's to fix."""
