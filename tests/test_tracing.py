"""Traces from the agent to the backend: an agent run in an OpenTelemetry span, its
session calls through the real client to `convostore sidecar` run as in a pod, which
exports over OTLP to a receiver of the test's own. One trace holds the agent's span,
the sidecar's server span under it, and the backend's span under that."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from agents import Agent, RunConfig, Runner, set_tracing_disabled
from agents.testing import ScriptedModel, assistant_message
from agents.tracing import get_trace_provider, set_trace_processors
from convostore import SidecarSession
from convostore.tracing import AgentRunSpans
from convostore_sidecar.tracing import from_environment
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support import Receiver, SidecarProcess, attributes, otlp_receiver, unique

SYSTEMS = {"sqlite": "sqlite", "redis": "redis", "postgres": "postgresql"}
SECRET = "words-only-the-store-should-hold"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with otlp_receiver() as got:
        yield got


@pytest.fixture
def traced_sidecar(
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    store_config: Callable[..., dict[str, Any]],
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
) -> Callable[..., SidecarProcess]:
    """`convostore sidecar` with the `OTEL_*` environment a pod would give it."""

    def start(backend: str, **env: str) -> SidecarProcess:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "chat-sidecar")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        sidecar = sidecar_process({"stores": {"default": store_config(backend)}})
        sidecar.start()
        return sidecar

    return start


async def spans_until(receiver: Receiver, done: Callable[[list[Span]], bool]) -> list[Span]:
    deadline = asyncio.get_running_loop().time() + 30
    while not done(receiver.spans):
        assert asyncio.get_running_loop().time() < deadline, [s.name for s in receiver.spans]
        await asyncio.sleep(0.05)
    return receiver.spans


@pytest.mark.parametrize("backend", sorted(SYSTEMS))
async def test_one_trace_runs_from_the_agents_span_to_the_backend(
    backend: str, receiver: Receiver, traced_sidecar: Callable[..., SidecarProcess]
) -> None:
    sidecar = traced_sidecar(backend)
    tracer = TracerProvider().get_tracer("the agent")
    session_id = unique("chat")
    agent = Agent(name="a", model=ScriptedModel([[assistant_message("hi")]]))
    with tracer.start_as_current_span("agent run") as agent_span:
        session = SidecarSession(session_id, url=sidecar.url)
        await Runner.run(agent, SECRET, session=session)
    trace_id = agent_span.get_span_context().trace_id.to_bytes(16, "big")
    parent = agent_span.get_span_context().span_id.to_bytes(8, "big")

    def complete(spans: list[Span]) -> bool:
        servers = [s for s in spans if s.trace_id == trace_id and s.parent_span_id == parent]
        served = {s.span_id for s in servers}
        return len(servers) >= 2 and any(s.parent_span_id in served for s in spans)

    spans = await spans_until(receiver, complete)
    mine = [s for s in spans if s.trace_id == trace_id]
    servers = [s for s in mine if s.parent_span_id == parent]
    assert {s.kind for s in servers} == {Span.SpanKind.SPAN_KIND_SERVER}
    names = {s.name for s in servers}
    assert "GET /v1/stores/{store}/sessions/{session_id}/items" in names
    assert "POST /v1/stores/{store}/sessions/{session_id}/items" in names
    for span in servers:
        found = attributes(span)
        assert found["convostore.store"] == "default"
        assert found["convostore.session.id"] != session_id  # a digest, by default
        if span.name.endswith("/items"):
            assert found["http.response.status_code"] == 200, span.name
    under = [s for s in mine if s.parent_span_id in {s.span_id for s in servers}]
    assert {s.kind for s in under} == {Span.SpanKind.SPAN_KIND_CLIENT}
    assert {attributes(s)["db.system.name"] for s in under} == {SYSTEMS[backend]}
    assert {"append_to", "latest_in"} <= {attributes(s)["db.operation.name"] for s in under}
    assert {r["service.name"] for r in receiver.resources} == {"chat-sidecar"}
    everything = b"".join(s.SerializeToString() for s in spans)
    assert SECRET.encode() not in everything
    assert session_id.encode() not in everything


async def test_session_ids_are_in_spans_as_given_only_when_asked(
    receiver: Receiver, traced_sidecar: Callable[..., SidecarProcess]
) -> None:
    sidecar = traced_sidecar("sqlite", CONVOSTORE_TRACE_SESSION_IDS="plain")
    async with aiohttp.ClientSession() as http:
        for probe in ("/healthz", "/readyz", "/metrics"):
            async with http.get(sidecar.url + probe) as resp:
                assert resp.status == 200
    session_id = unique("chat")
    await SidecarSession(session_id, url=sidecar.url).add_items([{"role": "user", "content": "x"}])
    spans = await spans_until(receiver, lambda spans: any(s.name.startswith("POST") for s in spans))
    posted = next(s for s in spans if s.name.startswith("POST"))
    assert sorted(s.name.split()[0] for s in spans) == ["POST", "append_to"], "no probe is traced"
    assert attributes(posted)["convostore.session.id"] == session_id
    assert posted.parent_span_id == b"", "a call from outside any trace starts its own"


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "none"},
    ],
)
def test_without_an_endpoint_or_switched_off_nothing_traces(env: dict[str, str]) -> None:
    assert from_environment(env) is None


def test_an_endpoint_alone_turns_tracing_on() -> None:
    tracing = from_environment({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    assert tracing is not None
    tracing.shutdown()


@pytest.fixture
def agent_run_spans() -> Iterator[InMemorySpanExporter]:
    """`AgentRunSpans` as the only processor of the SDK's traces, for one test."""
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    before = get_trace_provider()._multi_processor._processors  # type: ignore[attr-defined]
    set_trace_processors([AgentRunSpans(provider)])
    set_tracing_disabled(False)  # the suite turns the SDK's tracing off (conftest)
    yield exporter
    set_tracing_disabled(True)
    set_trace_processors(list(before))


async def test_an_agent_run_made_a_span_holds_its_session_calls(
    receiver: Receiver,
    traced_sidecar: Callable[..., SidecarProcess],
    agent_run_spans: InMemorySpanExporter,
) -> None:
    """With the SDK's tracing bridged by `AgentRunSpans` (and no span of the app's own),
    the sidecar's spans of the session calls the run makes are children of its span."""
    sidecar = traced_sidecar("redis")
    agent = Agent(name="planner", model=ScriptedModel([[assistant_message("hi")]]))
    session = SidecarSession(unique("chat"), url=sidecar.url)
    traced = RunConfig(workflow_name="trip planning")
    await Runner.run(agent, "hello", session=session, run_config=traced)
    [run] = agent_run_spans.get_finished_spans()
    assert run.name == "agent run: trip planning"
    run_id = run.context.span_id.to_bytes(8, "big")

    def under_the_run(spans: list[Span]) -> list[Span]:
        return [s for s in spans if s.parent_span_id == run_id]

    await spans_until(receiver, lambda spans: len(under_the_run(spans)) >= 2)
    names = {s.name for s in under_the_run(receiver.spans)}
    # the run's writes; the SDK reads the session's history before its trace begins
    assert "POST /v1/stores/{store}/sessions/{session_id}/items" in names
    assert {s.trace_id for s in under_the_run(receiver.spans)} == {
        run.context.trace_id.to_bytes(16, "big")
    }
