"""Assembles the sidecar's aiohttp application from its configuration."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from ..config import SidecarConfig
from ..metrics import Metrics
from ..readiness import Readiness
from ..stores import Stores
from ..tracing import from_environment
from . import branches, compaction, keys, metadata
from .answers import AnswerBudget
from .items import routes
from .middleware import (
    BodyBudget,
    InFlight,
    TokenCheck,
    request_middleware,
)
from .state import (
    ANSWER_BUDGET,
    BODY_BUDGET,
    IN_FLIGHT,
    METRICS,
    READINESS,
    REQUEST_LIMITS,
    STORES,
    TOKEN,
    TRACING,
)

BODY_SLACK = 64 << 10


def build_app(config: SidecarConfig) -> web.Application:
    largest_body = max(store.limits.max_request_bytes for store in config.stores.values())
    app = web.Application(
        middlewares=[request_middleware],
        client_max_size=largest_body + BODY_SLACK,
    )
    app[METRICS] = Metrics()
    app[IN_FLIGHT] = InFlight()
    app[TRACING] = from_environment()
    app[STORES] = Stores(config, app[METRICS], app[TRACING])
    app[TOKEN] = TokenCheck(config.token_file) if config.token_file else None
    app[READINESS] = Readiness()
    app[REQUEST_LIMITS] = config.requests
    app[BODY_BUDGET] = BodyBudget(config.requests.max_buffered_bytes)
    app[ANSWER_BUDGET] = AnswerBudget(config.requests.max_buffered_read_bytes)
    _gauges(app)
    app.cleanup_ctx.append(_stores_lifecycle)
    app.add_routes(routes)
    app.add_routes(branches.routes)
    app.add_routes(compaction.routes)
    app.add_routes(keys.routes)
    app.add_routes(metadata.routes)
    return app


def _gauges(app: web.Application) -> None:
    """The metrics read off the sidecar's state when scraped."""
    metrics, bodies, answers = app[METRICS], app[BODY_BUDGET], app[ANSWER_BUDGET]
    metrics.in_flight.set_function(lambda: app[IN_FLIGHT].count)
    metrics.buffered.labels("request").set_function(lambda: sum(bodies.held.values()))
    metrics.buffered.labels("answer").set_function(lambda: answers.held)
    metrics.buffer_limit.labels("request").set(bodies.limit)
    metrics.buffer_limit.labels("answer").set(answers.limit)


async def _stores_lifecycle(app: web.Application) -> AsyncIterator[None]:
    await app[STORES].open(app[METRICS])
    yield
    await app[STORES].close()
    tracing = app[TRACING]
    if tracing is not None:
        tracing.shutdown()
