"""Finding a store's sessions by labels and time on Redis.

A session's record is a hash under its hash tag (`about`: `created`, `updated`, and
`l:<name>` per label), written by the session's scripts with the rest of it. Listings
read sorted sets outside the session's slot, scored by creation time: one of every
session (`<prefix>:created`) and one per label value (`<prefix>:label:<name>=<value>`).
They are written after the script that changed the record, so they may briefly hold
more than the records say, never less: a listing reads each candidate's record and
keeps only what it admits, and an entry whose record no longer has it is removed, then
put back if a write gave it back meanwhile (the writer's order, record then index, makes
one of the two see the other's step).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

from ..base import SessionInfo, SessionQuery
from ..finding import fewest_first

PAGE = 200


def record_of(session_id: str, fields: Mapping[bytes, bytes]) -> SessionInfo | None:
    if b"created" not in fields:
        return None
    labels = {k[2:].decode(): v.decode() for k, v in fields.items() if k.startswith(b"l:")}
    created = float(fields[b"created"])
    return SessionInfo(session_id, created, float(fields.get(b"updated", created)), labels)


class Listings:
    """The sorted sets that list one store's sessions."""

    def __init__(
        self,
        client: Any,
        prefix: str,
        about: Callable[[str], str],
        guarded: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]],
    ) -> None:
        self.client, self.prefix, self._about, self._guarded = client, prefix, about, guarded
        self.created = f"{prefix}:created"

    def of_label(self, name: str, value: str) -> str:
        return f"{self.prefix}:label:{name}={value}"

    async def added(
        self,
        session_id: str,
        created: float,
        began: bool,
        labels: Sequence[tuple[str, str]],
        gone: Sequence[tuple[str, str]] = (),
    ) -> None:
        """After a script changed the session's record: list it where it now belongs."""
        keys = ([self.created] if began else []) + [self.of_label(n, v) for n, v in labels]
        for key in keys:
            await self._guarded(functools.partial(self.client.zadd, key, {session_id: created}))
        for name, value in gone:
            key = self.of_label(name, value)
            await self._guarded(functools.partial(self.client.zrem, key, session_id))

    async def removed(self, session_id: str, labels: Sequence[tuple[str, str]]) -> None:
        """After the session was erased: out of every listing."""
        for key in [self.created, *(self.of_label(n, v) for n, v in labels)]:
            await self._guarded(functools.partial(self.client.zrem, key, session_id))

    async def records(self, session_ids: Sequence[str]) -> list[SessionInfo | None]:
        async with self.client.pipeline(transaction=False) as pipe:
            for session_id in session_ids:
                pipe.hgetall(self._about(session_id))
            found = await pipe.execute()
        return [
            record_of(sid, cast(Mapping[bytes, bytes], fields))
            for sid, fields in zip(session_ids, found, strict=True)
        ]

    async def find(self, query: SessionQuery) -> list[SessionInfo]:
        if len(query.labels) > 1:
            async with self.client.pipeline(transaction=False) as pipe:
                for name, value in query.labels.items():
                    pipe.zcard(self.of_label(name, value))
                query = fewest_first(query, await pipe.execute())
        label = next(iter(query.labels.items()), None)
        key = self.created if label is None else self.of_label(*label)
        high = "+inf"
        if query.created_before is not None:
            high = f"({query.created_before!r}"
        if query.cursor is not None and (
            query.created_before is None or query.cursor[0] < query.created_before
        ):
            high = repr(query.cursor[0])
        low = "-inf" if query.created_after is None else f"({query.created_after!r}"
        found: list[SessionInfo] = []
        last, seen_at_last = None, set[str]()  # where the previous batch ended
        while len(found) < query.limit:
            num = PAGE + len(seen_at_last)  # ties at one time are rare; never stuck on them
            batch = await self.client.zrange(
                key, high, low, desc=True, byscore=True, offset=0, num=num, withscores=True
            )
            entries = [
                (sid, score)
                for sid, score in ((m.decode(), float(s)) for m, s in batch)
                if not (score == last and sid in seen_at_last)
            ]
            if not entries:
                break
            records = await self.records([sid for sid, _ in entries])
            stale = []
            for (session_id, score), info in zip(entries, records, strict=True):
                if info is None or (label is not None and info.labels.get(label[0]) != label[1]):
                    stale.append(session_id)
                elif info.created_at == score and query.admits(info):
                    found.append(info)
            if stale:
                await self._prune(key, label, stale)
            if entries[-1][1] != last:
                last, seen_at_last = entries[-1][1], set()
            seen_at_last |= {sid for sid, score in entries if score == last}
            high = repr(last)
            if len(batch) < num:
                break
        return found[: query.limit]

    async def _prune(self, key: str, label: tuple[str, str] | None, stale: list[str]) -> None:
        """Remove entries whose record does not have them; put back any that a write
        gave them back to meanwhile."""
        await self.client.zrem(key, *stale)
        for info in await self.records(stale):
            if info is not None and (label is None or info.labels.get(label[0]) == label[1]):
                await self.client.zadd(key, {info.session_id: info.created_at})
