"""Every call a store makes to its backend, timed (`convostore_backend_call_duration_seconds`)
and, with tracing on, a client span of the request's trace.

It wraps the backend's own driver, inside encryption, so the time and the span are the
backend's alone. Any driver method that is a coroutine is a backend call; the rest pass
through untouched.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .metrics import Metrics
from .tracing import Tracing


class InstrumentedDriver:
    def __init__(
        self, inner: Any, store: str, backend: str, metrics: Metrics, tracing: Tracing | None
    ) -> None:
        self.inner, self._store, self._backend = inner, store, backend
        self._metrics, self._tracing = metrics, tracing

    def __getattr__(self, name: str) -> Any:
        """The driver's attribute; a coroutine method comes back timed and traced, and is
        kept, so the next call finds it without coming here."""
        attribute = getattr(self.inner, name)
        if not inspect.iscoroutinefunction(attribute):
            return attribute
        timed = self._timed(name, attribute)
        setattr(self, name, timed)
        return timed

    def _timed(
        self, operation: str, call: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        latency = self._metrics.backend_latency.labels(self._store, self._backend, operation)
        tracing = self._tracing

        @functools.wraps(call)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                if tracing is None:
                    return await call(*args, **kwargs)
                with tracing.backend_span(self._store, self._backend, operation):
                    return await call(*args, **kwargs)
            finally:
                latency.observe(time.perf_counter() - started)

        return timed
