"""API errors: every failure leaves the sidecar as `{"error": {"code", "message"}}`."""

from __future__ import annotations

from aiohttp import web

from .jsonbody import dumps

RETRY_AFTER_SECONDS = "1"


class ApiError(Exception):
    """A request the sidecar refuses, with the HTTP status and the code clients match on."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers


def error_body(code: str, message: str) -> bytes:
    return dumps({"error": {"code": code, "message": message}})


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(code, message),
        content_type="application/json",
        headers=headers,
    )


def overloaded(message: str) -> ApiError:
    """503 `overloaded`: the sidecar has no room for the request now; clients retry it."""
    return ApiError(503, "overloaded", message, headers={"Retry-After": RETRY_AFTER_SECONDS})
