"""A listing of sessions newest first, by labels and time, as SQL text for the drivers
that write their own (SQLite, PostgreSQL).

The first label of the query drives the read along the labels index (store, name,
value, created_at, session_id), in the order the listing wants, so a page reads about a
page of rows whatever the store holds; each further label is one primary-key probe per
row (a subquery the planner cannot turn into a join that reads the other label's every
row). With several labels, the drivers put first the one fewest sessions carry (counted
along the same index, up to `COUNT_CAP`): a user's sessions within a large tenant are
found from the user's few, not by probing the tenant's many.
Without labels the read goes along the sessions' (store, created_at, session_id) index.
The creation time is copied into each label row for that reason: it never changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from .base import SessionQuery

Bind = Callable[[object], str]
COUNT_CAP = 1_000
"""Sessions counted per label, at most, to choose the one that drives a listing."""


@dataclass(frozen=True)
class Dialect:
    sessions: str
    labels: str
    epoch: str
    """A time column as seconds since the epoch, `{}` for the column."""
    instant: Callable[[float], object]
    """A time as the database compares it."""


def find_sql(
    query: SessionQuery,
    d: Dialect,
    bind: Bind,
    store: str,
    alive: Callable[[Bind], str] | None,
) -> str:
    """The ids, creation and update times of one page of `query`. `bind` adds a
    parameter and answers its placeholder, in the order they appear; `alive` makes the
    condition (on the sessions, `s`) that they have not expired."""
    if query.labels:
        (first_name, first_value), *others = query.labels.items()
        driving = (
            f"FROM {d.labels} AS f JOIN {d.sessions} AS s"
            " ON s.store = f.store AND s.session_id = f.session_id"
            f" WHERE f.store = {bind(store)} AND f.name = {bind(first_name)}"
            f" AND f.value = {bind(first_value)}"
        )
    else:
        others = []
        driving = f"FROM {d.sessions} AS s WHERE s.store = {bind(store)}"
    order = "f" if query.labels else "s"
    created = f"{order}.created_at"
    where = [driving]
    if alive is not None:
        where.append(f"AND {alive(bind)}")
    if query.cursor is not None:
        at, session_id = query.cursor
        where.append(
            f"AND ({created}, {order}.session_id) < ({bind(d.instant(at))}, {bind(session_id)})"
        )
    for column, bound, op in (
        (created, query.created_after, ">"),
        (created, query.created_before, "<"),
        ("s.updated_at", query.updated_after, ">"),
        ("s.updated_at", query.updated_before, "<"),
    ):
        if bound is not None:
            where.append(f"AND {column} {op} {bind(d.instant(bound))}")
    for name, value in others:  # a scalar subquery: a probe per row, never a join
        where.append(
            f"AND (SELECT o.value FROM {d.labels} AS o WHERE o.store = s.store"
            f" AND o.session_id = s.session_id AND o.name = {bind(name)}) = {bind(value)}"
        )
    return (
        f"SELECT s.session_id, {d.epoch.format(created)}, {d.epoch.format('s.updated_at')} "
        + " ".join(where)
        + f" ORDER BY {created} DESC, {order}.session_id DESC LIMIT {bind(query.limit)}"
    )


def count_sql(d: Dialect, bind: Bind, store: str, name: str, value: str) -> str:
    """How many sessions carry the label, up to `COUNT_CAP`."""
    return (
        f"SELECT count(*) FROM (SELECT 1 FROM {d.labels} WHERE store = {bind(store)}"
        f" AND name = {bind(name)} AND value = {bind(value)} LIMIT {COUNT_CAP}) AS c"
    )


def fewest_first(query: SessionQuery, counts: Sequence[int]) -> SessionQuery:
    """The query with its labels in the order of `counts` (one per label, as given)."""
    ordered = sorted(zip(counts, query.labels.items(), strict=True), key=lambda pair: pair[0])
    return replace(query, labels=dict(label for _, label in ordered))
