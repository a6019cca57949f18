"""Traces: a server span per API request that continues the caller's W3C trace context
(`traceparent`), a client span per backend call and one per compaction model call,
exported over OTLP.

Tracing is configured as OpenTelemetry always is, by its standard environment variables
(`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, over HTTP with
protobuf; `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`, the
`OTEL_BSP_*` batching), and runs with the `sidecar-tracing` extra installed. With no
endpoint, `OTEL_TRACES_EXPORTER=none` or `OTEL_SDK_DISABLED=true`, OpenTelemetry is not
even imported: the request path checks one None.

Spans name the store, the route, the backend (`db.system.name`) and the operation
(`db.operation.name`), never an item or a label. A session id goes in as a digest of
store and id, which correlates a session's calls without naming it;
`CONVOSTORE_TRACE_SESSION_IDS=plain` puts the id itself, `none` leaves it out.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger("convostore.sidecar")
SESSION_IDS = ("hashed", "plain", "none")
DB_SYSTEMS = {
    "sqlite": "sqlite",
    "postgres": "postgresql",
    "redis": "redis",
    "sqlalchemy": "other_sql",
    "dapr": "dapr",
    "openai": "openai",
}
"""Each backend as OpenTelemetry's database conventions name it (`db.system.name`)."""


class Tracing:
    def __init__(self, provider: TracerProvider, session_ids: str) -> None:
        self._provider = provider
        self._tracer: Tracer = provider.get_tracer("convostore.sidecar")
        self._session_ids = session_ids

    @contextlib.contextmanager
    def request_span(
        self, headers: Mapping[str, str], method: str, route: str, store: str, session_id: str
    ) -> Iterator[Span]:
        """The server span of one API request, a child of the caller's span if it sent
        one; the caller sets the status code on it."""
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind

        attributes: dict[str, Any] = {"http.request.method": method, "http.route": route}
        if store:
            attributes["convostore.store"] = store
        if session_id and self._session_ids != "none":
            attributes["convostore.session.id"] = self._session_id(store, session_id)
        with self._tracer.start_as_current_span(
            f"{method} {route}",
            context=propagate.extract(headers),
            kind=SpanKind.SERVER,
            attributes=attributes,
        ) as span:
            yield span

    @contextlib.contextmanager
    def backend_span(self, store: str, backend: str, operation: str) -> Iterator[None]:
        """A call to the store's backend, under the current span; none outside a request
        (a readiness ping, a sweep), which would each start a trace of their own."""
        from opentelemetry.trace import SpanKind, get_current_span

        if not get_current_span().get_span_context().is_valid:
            yield
            return

        system = DB_SYSTEMS.get(backend, backend)
        attributes = {
            "db.system.name": system,
            "db.operation.name": operation,
            "db.namespace": store,
        }
        with self._tracer.start_as_current_span(
            f"{operation} {store}", kind=SpanKind.CLIENT, attributes=attributes
        ):
            yield

    @contextlib.contextmanager
    def model_span(self, store: str, model: str) -> Iterator[None]:
        """The compaction's call to the model, under the request's span."""
        from opentelemetry.trace import SpanKind

        attributes = {
            "gen_ai.operation.name": "compact",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": model,
            "convostore.store": store,
        }
        with self._tracer.start_as_current_span(
            f"compact {model}", kind=SpanKind.CLIENT, attributes=attributes
        ):
            yield

    def _session_id(self, store: str, session_id: str) -> str:
        if self._session_ids == "plain":
            return session_id
        return hashlib.sha256(f"{store}\x00{session_id}".encode()).hexdigest()[:16]

    def shutdown(self) -> None:
        """Export what is batched, within the exporter's timeout."""
        self._provider.shutdown()


def from_environment(env: Mapping[str, str] = os.environ) -> Tracing | None:
    """Tracing as the `OTEL_*` variables configure it; None when they configure none."""
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    off = env.get("OTEL_SDK_DISABLED", "").lower() == "true"
    if not endpoint or off or env.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return None
    session_ids = env.get("CONVOSTORE_TRACE_SESSION_IDS", "hashed").lower()
    if session_ids not in SESSION_IDS:
        log.warning(
            "CONVOSTORE_TRACE_SESSION_IDS=%r is not one of %s: session ids are hashed",
            session_ids,
            ", ".join(SESSION_IDS),
        )
        session_ids = "hashed"
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "an OTLP endpoint is set, but tracing is not installed: no traces are sent "
            "(pip install 'convostore[sidecar-tracing]'; the sidecar image has it)"
        )
        return None
    named = {"service.name": env.get("OTEL_SERVICE_NAME", "convostore-sidecar")}
    provider = TracerProvider(resource=Resource.create(named))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return Tracing(provider, session_ids)
