"""API errors: every failure leaves the sidecar as `{"error": {"code", "message"}}`.

This is the one place where what the store, its driver or compaction refused becomes an
HTTP status (`error_answer`): the layers below raise their own errors and refusals
(`refusals.py`, `drivers/base.py`) and speak no HTTP. `ApiError` is for what only the
HTTP layer decides (a token, a body's size or media type, a full sidecar).
"""

from __future__ import annotations

import logging

from aiohttp import web

from ..drivers.base import (
    CAUSES,
    BackendMisconfigured,
    BackendUnavailable,
    BranchIdUsed,
    BranchNotFound,
    IdempotencyKeyReused,
    TooManyLabels,
    TurnNotFound,
)
from ..jsonbody import dumps
from ..keyring import DecryptionFailed, SubjectErased
from ..refusals import (
    Conflict,
    Invalid,
    NotFound,
    NotSupported,
    Refused,
    Unprocessable,
    UpstreamFailed,
    UpstreamRefusedKey,
    UpstreamTimedOut,
)
from .state import METRICS, READINESS, STORES

log = logging.getLogger("convostore.sidecar")
WRITES = frozenset({"POST", "PATCH", "DELETE"})

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


ERROR_CODE: web.ResponseKey[str] = web.ResponseKey("error_code")


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """The error answer; its code is kept on it for the metrics (`ERROR_CODE`)."""
    response = web.Response(
        status=status,
        body=error_body(code, message),
        content_type="application/json",
        headers=headers,
    )
    response[ERROR_CODE] = code
    return response


def overloaded(message: str) -> ApiError:
    """503 `overloaded`: the sidecar has no room for the request now; clients retry it."""
    return ApiError(503, "overloaded", message, headers={"Retry-After": RETRY_AFTER_SECONDS})


STATUS_OF: dict[type[Refused], int] = {
    Invalid: 400,
    NotFound: 404,
    Conflict: 409,
    Unprocessable: 422,
    UpstreamRefusedKey: 500,
    NotSupported: 501,
    UpstreamFailed: 502,
    UpstreamTimedOut: 504,
}
"""The status of each kind of refusal (`refusals.py`)."""
DOMAIN_ERRORS: dict[type[Exception], tuple[int, str, str]] = {
    BranchNotFound: (404, "branch_not_found", "no branch {0!r} in this session"),
    BranchIdUsed: (
        409,
        "branch_id_used",
        "branch id {0!r} was already used in this session; choose a new one",
    ),
    TurnNotFound: (409, "turn_not_found", "turn {0} does not contain a user message"),
    TooManyLabels: (
        409,
        "too_many_labels",
        "{0}; remove some (set them to null) before adding others",
    ),
    IdempotencyKeyReused: (
        409,
        "idempotency_key_reused",
        "Idempotency-Key {0!r} was already used with a different request body",
    ),
}
"""The drivers' errors that are the request's fault: status, code, and the message,
formatted with the error's first argument."""
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def error_answer(request: web.Request, exc: Exception) -> web.Response:
    """The JSON answer to a request that raised `exc`; re-raises what is not an error
    (aiohttp's redirects)."""
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.code, exc.message, headers=exc.headers)
    if isinstance(exc, Refused):
        retry = {"Retry-After": RETRY_AFTER_SECONDS} if exc.retry_later else None
        return error_response(STATUS_OF[type(exc)], exc.code, exc.message, headers=retry)
    for kind, (status, code, message) in DOMAIN_ERRORS.items():
        if isinstance(exc, kind):
            return error_response(status, code, message.format(exc.args[0]))
    if isinstance(exc, BackendMisconfigured):  # before its base, BackendUnavailable
        _, store = labels(request)
        log.warning("store %s: %s", store, exc)
        return error_response(
            503,
            "backend_misconfigured",
            f"store {store!r}: {exc}; it will answer once its settings are corrected",
        )
    if isinstance(exc, BackendUnavailable):
        return _backend_unavailable(request, exc)
    if isinstance(exc, SubjectErased):
        _, store = labels(request)
        return error_response(
            410,
            "subject_erased",
            f"store {store!r}: the session's items were sealed for a subject since erased;"
            " they cannot be read by anyone",
        )
    if isinstance(exc, DecryptionFailed):
        _, store = labels(request)
        log.error("store %s: decryption failed (key %s): %s", store, exc.key_id, exc.reason)
        return error_response(
            500,
            "decryption_failed",
            f"store {store!r}: an item could not be decrypted: {exc.reason}",
            headers={"X-Convostore-Key-Id": exc.key_id or ""},
        )
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        return error_response(
            exc.status,
            HTTP_CODES.get(exc.status, "http_error"),
            exc.reason,
            headers={"Allow": exc.headers.get("Allow", "")} if exc.status == 405 else None,
        )
    if isinstance(exc, ConnectionResetError):
        # the client left before its request was read whole: nothing was done, the
        # answer goes nowhere, and the fault is not the sidecar's
        log.info("client left during %s %s", request.method, request.path)
        return error_response(400, "incomplete_body", "the client left before its body ended")
    log.error("unexpected error on %s %s", request.method, request.path, exc_info=exc)
    return error_response(500, "internal", "unexpected error in the sidecar; see its log")


def _backend_unavailable(request: web.Request, exc: BackendUnavailable) -> web.Response:
    """503 naming the cause; a refused write marks the store's writes as failing."""
    _, store = labels(request)
    backend = request.app[STORES].get(store).config.backend if store else ""
    request.app[METRICS].backend_errors.labels(store, backend).inc()
    log.warning("store %s: %s: %s", store, exc.cause, exc)
    if store and request.method in WRITES:
        request.app[READINESS].write_refused(store, f"{exc.cause}: {exc}")
        request.app[METRICS].writes_failing.labels(store).set(1)
    return error_response(
        503,
        exc.cause,
        f"the backend of store {store!r} {CAUSES[exc.cause]}; retry later",
        headers={"Retry-After": RETRY_AFTER_SECONDS},
    )


def labels(request: web.Request) -> tuple[str, str]:
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    store = request.match_info.get("store", "")
    return route, store if store in request.app[STORES] else ("unknown" if store else "")
