"""Prometheus metrics of one sidecar, in a registry of its own (not the global one)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self._children: dict[tuple[str, str, str, int], tuple[Any, Any]] = {}
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "convostore_requests",
            "API requests handled, by route, store, method and status.",
            ["route", "store", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "convostore_request_duration_seconds",
            "Time to answer an API request, by route and store.",
            ["route", "store"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "convostore_errors",
            "Requests answered with an error, by route, store and error code.",
            ["route", "store", "code"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "convostore_requests_in_flight",
            "API requests inside their handlers now (turned away past requests.maxConcurrent).",
            registry=self.registry,
        )
        self.buffered = Gauge(
            "convostore_buffered_bytes",
            "Bytes of request bodies (`request`) and answers (`answer`) held in memory now, "
            "within requests.maxBufferedBytes and requests.maxBufferedReadBytes.",
            ["kind"],
            registry=self.registry,
        )
        self.buffer_limit = Gauge(
            "convostore_buffered_bytes_limit",
            "The most bytes of request bodies (`request`) and answers (`answer`) held at once.",
            ["kind"],
            registry=self.registry,
        )
        self.sweeps = Counter(
            "convostore_sweeps",
            "Retention sweeps of a store, by outcome (`done`, or `skipped` while the backend "
            "was unavailable).",
            ["store", "outcome"],
            registry=self.registry,
        )
        self.last_sweep = Gauge(
            "convostore_sweep_last_done_timestamp_seconds",
            "When a store's last retention sweep finished (Unix time).",
            ["store"],
            registry=self.registry,
        )
        self.backend_latency = Histogram(
            "convostore_backend_call_duration_seconds",
            "Time of one call to a store's backend, by store, backend and the driver's "
            "operation (append_to, latest_in, ...).",
            ["store", "backend", "operation"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.backend_errors = Counter(
            "convostore_backend_errors",
            "Backend calls that failed because the backend was unavailable.",
            ["store", "backend"],
            registry=self.registry,
        )
        self.writes_failing = Gauge(
            "convostore_store_writes_failing",
            "1 while a store's backend refuses its writes (since the last refusal, with no "
            "write done); the cause is in /readyz's details and the log.",
            ["store"],
            registry=self.registry,
        )
        self.items_appended = Counter(
            "convostore_items_appended",
            "Items stored by appends (replayed appends are not counted again).",
            ["store"],
            registry=self.registry,
        )
        self.items_popped = Counter(
            "convostore_items_popped", "Items removed by pops.", ["store"], registry=self.registry
        )
        self.compactions = Counter(
            "convostore_compactions",
            "Compaction requests, by store and outcome (`compacted`, why not, or the "
            "failure's code).",
            ["store", "outcome"],
            registry=self.registry,
        )
        self.sessions_expired = Counter(
            "convostore_sessions_expired",
            "Sessions deleted by the retention sweep.",
            ["store"],
            registry=self.registry,
        )
        self.sessions_erased = Counter(
            "convostore_sessions_erased",
            "Sessions erased whole because they carried the labels an erasure named.",
            ["store"],
            registry=self.registry,
        )

    def observe(self, route: str, store: str, method: str, status: int, started: float) -> None:
        """Count one request and its latency; label children are looked up once."""
        key = (route, store, method, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(route, store, method, str(status)),
                self.latency.labels(route, store),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(time.perf_counter() - started)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
