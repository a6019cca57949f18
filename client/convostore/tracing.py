"""Agent runs as OpenTelemetry spans, so a session's calls appear under the run that made
them: `AgentRunSpans`, a tracing processor for the Agents SDK.

The SDK traces each `Runner.run` in a tracing system of its own, and a bridge that only
exports those traces leaves nothing current in OpenTelemetry while the run goes on. This
processor opens an OpenTelemetry span when a run's trace starts, makes it current in the
run's own context, and ends it with the trace; the client's calls made meanwhile carry
it as their `traceparent`, and the sidecar's spans continue it (the SDK reads a
session's history before it starts the run's trace: that read is not under it).
Register it with `agents.add_trace_processor(AgentRunSpans())` (the `tracing` and
`agents` extras).
"""

from __future__ import annotations

from typing import Any

from agents.tracing import Span, Trace, TracingProcessor
from opentelemetry import context, trace


class AgentRunSpans(TracingProcessor):
    def __init__(self, tracer_provider: Any = None) -> None:
        self._tracer = trace.get_tracer("convostore.agents", tracer_provider=tracer_provider)
        self._open: dict[str, tuple[Any, object]] = {}

    def on_trace_start(self, run: Trace) -> None:
        span = self._tracer.start_span(f"agent run: {run.name}")
        token = context.attach(trace.set_span_in_context(span))
        self._open[run.trace_id] = (span, token)

    def on_trace_end(self, run: Trace) -> None:
        opened = self._open.pop(run.trace_id, None)
        if opened is None:
            return
        span, token = opened
        context.detach(token)  # type: ignore[arg-type]
        span.end()

    def on_span_start(self, span: Span[Any]) -> None:
        """The run's own spans (model calls, tools) are the SDK's or another bridge's."""

    def on_span_end(self, span: Span[Any]) -> None:
        """As `on_span_start`."""

    def shutdown(self) -> None:
        for span, _ in self._open.values():
            span.end()
        self._open.clear()

    def force_flush(self) -> None:
        """Nothing is batched here."""
