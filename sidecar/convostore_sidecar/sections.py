"""Reading a configuration mapping field by field, with errors that say where.

The drivers parse their own sections with it, below the store configuration that
assembles them (`config.py`), so it depends on nothing of the sidecar's.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any, NoReturn, overload
from urllib.parse import urlsplit

_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?$")
_DURATION_UNITS = (86400, 3600, 60, 1)


class ConfigError(ValueError):
    """A configuration value that the sidecar cannot honour, with where it is."""


class Section:
    """A mapping read field by field, remembering its path for error messages."""

    def __init__(self, data: Any, where: str, store: str | None = None) -> None:
        self.store = store
        self.where = where
        if not isinstance(data, Mapping):
            self.fail(None, f"must be a mapping, got {type(data).__name__}")
        self._data: Mapping[str, Any] = data
        self._read: set[str] = set()

    def fail(self, key: str | None, message: str) -> NoReturn:
        path = ".".join(p for p in (self.where, key) if p)
        prefix = f"store {self.store!r}: " if self.store else ""
        raise ConfigError(f"{prefix}field {path!r}: {message}" if path else prefix + message)

    def _get(self, key: str) -> Any:
        self._read.add(key)
        return self._data.get(key)

    def has(self, key: str) -> bool:
        return key in self._data

    @overload
    def string(self, key: str, default: str, *, pattern: re.Pattern[str] | None = None) -> str: ...
    @overload
    def string(
        self, key: str, default: None = None, *, pattern: re.Pattern[str] | None = None
    ) -> str | None: ...
    def string(
        self, key: str, default: str | None = None, *, pattern: re.Pattern[str] | None = None
    ) -> str | None:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            self.fail(key, f"must be a non-empty string, got {value!r}")
        if pattern is not None and not pattern.fullmatch(value):
            self.fail(key, f"must match {pattern.pattern}, got {value!r}")
        return str(value)

    def choice(self, key: str, choices: tuple[str, ...], default: str | None = None) -> str:
        value = self._get(key)
        if value is None and default is not None:
            return default
        if value not in choices:
            self.fail(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return str(value)

    @overload
    def integer(self, key: str, default: int, *, low: int, high: int) -> int: ...
    @overload
    def integer(self, key: str, default: None, *, low: int, high: int) -> int | None: ...
    def integer(self, key: str, default: int | None, *, low: int, high: int) -> int | None:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(key, f"must be an integer from {low} to {high}, got {value!r}")
        return int(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, got {value!r}")
        return bool(value)

    @overload
    def duration(self, key: str, default: float, *, low: float, high: float) -> float: ...
    @overload
    def duration(self, key: str, default: None, *, low: float, high: float) -> float | None: ...
    def duration(self, key: str, default: float | None, *, low: float, high: float) -> float | None:
        """Seconds, given as a number or as text such as `90s`, `15m`, `24h`, `7d`, `1h30m`."""
        value = self._get(key)
        if value is None:
            return default
        seconds: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str) and value.strip():
            match = _DURATION.fullmatch(value.strip())
            if match:
                parts = zip(match.groups(), _DURATION_UNITS, strict=True)
                seconds = sum(float(part) * unit for part, unit in parts if part)
        if seconds is None or not low <= seconds <= high:
            self.fail(
                key,
                f"must be a duration from {low:g}s to {high:g}s (a number of seconds or "
                f"text such as 90s, 15m, 24h, 7d), got {value!r}",
            )
        return seconds

    def api_url(self, key: str) -> str | None:
        """The base URL of an API that gets a key with every request: https://, or
        http:// to a loopback address only."""
        url = self.string(key)
        if url is not None:
            parts = urlsplit(url)
            plain_local = parts.scheme == "http" and is_loopback_host(parts.hostname or "")
            if not (parts.scheme == "https" and parts.hostname) and not plain_local:
                self.fail(
                    key,
                    "must be https:// (http:// only to a loopback address): the API key "
                    "goes with every request",
                )
        return url

    def section(self, key: str, *, store: str | None = None) -> Section:
        """The mapping under `key`; naming a `store` starts a store's own field paths."""
        value = self._get(key)
        if store is not None:
            return Section({} if value is None else value, "", store)
        where = f"{self.where}.{key}" if self.where else key
        return Section({} if value is None else value, where, self.store)

    def keys(self) -> list[str]:
        return list(self._data)

    def raw(self, key: str) -> Any:
        """A value read as it is, for fields with a shape of their own."""
        return self._get(key)

    def done(self) -> None:
        unknown = sorted(set(self._data) - self._read)
        if unknown:
            self.fail(None, f"unknown field(s) {', '.join(map(repr, unknown))}")


def is_loopback_host(host: str) -> bool:
    """True for `localhost` and loopback addresses: traffic that never leaves the pod."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
