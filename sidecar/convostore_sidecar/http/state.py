"""Typed keys of the application state, set once at start-up."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from ..config import RequestLimits
    from ..metrics import Metrics
    from ..readiness import Readiness
    from ..stores import Stores
    from ..tracing import Tracing
    from .answers import AnswerBudget
    from .middleware import BodyBudget, InFlight, TokenCheck

STORES: web.AppKey[Stores] = web.AppKey("stores")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
TOKEN: web.AppKey[TokenCheck | None] = web.AppKey("token")
IN_FLIGHT: web.AppKey[InFlight] = web.AppKey("in_flight")
READINESS: web.AppKey[Readiness] = web.AppKey("readiness")
REQUEST_LIMITS: web.AppKey[RequestLimits] = web.AppKey("request_limits")
BODY_BUDGET: web.AppKey[BodyBudget] = web.AppKey("body_budget")
ANSWER_BUDGET: web.AppKey[AnswerBudget] = web.AppKey("answer_budget")
TRACING: web.AppKey[Tracing | None] = web.AppKey("tracing")
