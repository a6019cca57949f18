"""Errors raised by the client, each carrying the sidecar's error code and message.

Agent code usually only needs to tell two situations apart: the store is unavailable
for now (retrying later may help) and the request was rejected (retrying cannot help).
"""

from __future__ import annotations


class ConvostoreError(Exception):
    """Base class: `code` is the sidecar's machine-readable error code."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


class StoreUnavailableError(ConvostoreError):
    """The sidecar or its backend could not be reached; the request may be retried later."""


class RequestRejectedError(ConvostoreError):
    """The sidecar refused the request as given (bad input, over a limit, unauthorized)."""


class NotFoundError(RequestRejectedError):
    """The named store (or route) does not exist on this sidecar."""


class UnauthorizedError(RequestRejectedError):
    """The sidecar requires a bearer token and the one sent (if any) was wrong."""


class SessionClosedError(ConvostoreError, RuntimeError):
    """The session object was closed with `close()`; make a new one to go on. A
    `RuntimeError` too, as the SDK's closed sessions raise."""
