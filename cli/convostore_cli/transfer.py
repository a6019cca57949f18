"""Moving sessions between stores without losing their structure: the export format and
the import that restores it.

The format (version 2) is JSON Lines. The first line is `{"convostore_export": 2}`; then,
per session, its `main` branch and then each other branch, every line naming its
`session_id` (and its `branch`, when not `main`):

- `{"session_id", "branch"}` opens a branch other than `main`;
- `{"session_id", "item"}` is one item, in conversation order; on a store that
  compacts, the items compaction archived come first (the conversation as it was said);
- `{"session_id", "turn", "usage"}` is the usage recorded for that user turn, right
  after the turn's last item;
- `{"session_id", "labels": {...}}`, first of a session's records when it carries
  labels, sets them;
- `{"session_id", "archive": {"count", "summary"}}`, after every branch of the session
  (a branch is made from `main`'s first user turn, which a restored compaction would
  have moved to the archive), says a branch was compacted: its first `count` items went
  to the archive, and `summary` took their place.

A file of version 1 (item lines alone, no header) imports as `main` items.

On a store that seals each subject's items under a key of their own (crypto-shredding),
the items of a session with a subject are exported sealed, as the sidecar seals them
for an export: `{"type": "convostore.sealed", "subject", "opens_turn", "sealed"}`.
Erasing the subject makes them unreadable; until then they import into the store that
exported them (its sidecar opens them), and nowhere else. `--plaintext` writes them in
clear instead, to read them or to move sessions to a store with other keys.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import quote

from convostore.errors import ConvostoreError
from convostore.session import encode_items

from .wire import Sidecar, json_body

FORMAT = 2
MAIN = "main"
SEALED = "convostore.sealed"
"""The type of an item exported sealed (the sidecar's `exports` module makes them)."""
SEALED_REFUSALS = ("subject_erased", "sealed_elsewhere", "subject_required")
"""A sealed item's store will not open it."""
IMPORT_BATCH = 500
USAGE_FIELDS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "input_tokens_details",
    "output_tokens_details",
)


def session_path(sidecar: Sidecar, session_id: str) -> str:
    return f"{sidecar.store_path}/sessions/{quote(session_id, safe='')}"


async def export(
    sidecar: Sidecar, prefix: str, full: bool, out: TextIO, *, sealed: bool = True
) -> None:
    """`sealed`: a subject's items as their store seals them for an export."""
    write(out, {"convostore_export": FORMAT})
    sealing = {"sealed": "true"} if sealed else {}
    async for session_id in sidecar.session_ids(prefix):
        for record in await session_records(sidecar, session_id, full, sealing):
            write(out, record)


def write(out: TextIO, record: dict[str, Any]) -> None:
    out.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")


async def session_records(
    sidecar: Sidecar, session_id: str, full: bool, sealing: dict[str, str]
) -> list[dict[str, Any]]:
    path = session_path(sidecar, session_id)
    try:
        listed = await sidecar.get(path + "/branches")
    except ConvostoreError as exc:
        if exc.code != "not_supported":
            raise
        items = await whole(sidecar, session_id, sealing)  # a backend that keeps items alone
        return [{"session_id": session_id, "item": item} for item in items]
    others = [b["branch_id"] for b in listed["branches"] if b["branch_id"] != MAIN]
    records: list[dict[str, Any]] = []
    labels = (await sidecar.get(path + "/metadata"))["labels"]
    if labels:
        records.append({"session_id": session_id, "labels": labels})
    for branch in [MAIN, *others]:
        records += await branch_records(sidecar, session_id, branch, full, sealing)
    return sorted(records, key=lambda record: "archive" in record)  # stable: archives last


async def branch_records(
    sidecar: Sidecar, session_id: str, branch: str, full: bool, sealing: dict[str, str]
) -> list[dict[str, Any]]:
    path, where = session_path(sidecar, session_id), {"branch": branch, **sealing}
    named: dict[str, Any] = {"session_id": session_id}
    if branch != MAIN:
        named["branch"] = branch
    live = await whole(sidecar, session_id, where)
    items, archive = live, None
    if full:
        items = await whole(sidecar, session_id, {**where, "view": "full"})
        shape = await sidecar.get(f"{path}/branches/{quote(branch, safe='')}/shape")
        kinds = [item["type"] for item in shape["items"]]
        summary = next((i for i, kind in enumerate(kinds) if kind != "compacted"), len(kinds))
        archived = len(items) - (len(live) - summary)
        if archived:
            archive = {"count": archived, "summary": live[:summary]}
    usage = await sidecar.get(f"{path}/branches/{quote(branch, safe='')}/usage")
    by_turn = {row.pop("user_turn_number"): row for row in usage["turns"]}
    records: list[dict[str, Any]] = [] if branch == MAIN else [dict(named)]
    for turn, item, last_of_turn in numbered(items):
        records.append(named | {"item": item})
        if last_of_turn and turn in by_turn:
            records.append(named | {"turn": turn, "usage": by_turn.pop(turn)})
    records += [named | {"turn": turn, "usage": row} for turn, row in sorted(by_turn.items())]
    if archive:
        records.append(named | {"archive": archive})
    return records


async def whole(sidecar: Sidecar, session_id: str, where: dict[str, str]) -> list[Any]:
    """Every item of the read, or a ValueError: an export never leaves items out."""
    answer = await sidecar.get(session_path(sidecar, session_id) + "/items", where)
    if answer.get("truncated"):
        branch = where.get("branch", MAIN)
        raise ValueError(
            f"session {session_id!r} (branch {branch!r}) holds more than the sidecar answers "
            "in one read (the store's limits.maxReadItems and limits.maxReadBytes): raise "
            "them for the export; nothing of it was left out silently, the export stopped"
        )
    items: list[Any] = answer["items"]
    return items


def numbered(items: list[Any]) -> Iterator[tuple[int, Any, bool]]:
    """Each item with its user turn (a user message opens the next; what comes before
    the first is turn 0), and whether it is its turn's last."""
    turns, turn = [], 0
    for item in items:
        turn += opens_turn(item)
        turns.append(turn)
    for index, item in enumerate(items):
        yield turns[index], item, index + 1 == len(items) or turns[index + 1] != turns[index]


def opens_turn(item: Any) -> bool:
    """A user message; a sealed item says whether it was one."""
    if not isinstance(item, dict):
        return False
    if is_sealed(item):
        return item.get("opens_turn") is True
    return item.get("role") == "user"


def is_sealed(item: Any) -> bool:
    return isinstance(item, dict) and item.get("type") == SEALED


@dataclass(frozen=True)
class Record:
    line: int
    session_id: str
    branch: str
    kind: str  # "item", "branch", "usage", "archive" or "labels"
    value: Any = None
    turn: int = 0
    count: int = 0


def parse(text: str) -> list[Record]:
    """Every line checked before anything is written: a ValueError names the first bad one."""
    records: list[Record] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except ValueError as exc:
            raise refused(number, f"not a record: not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise refused(number, "not a record: a record is a JSON object")
        if "convostore_export" in raw:
            check_header(number, raw, records)
            continue
        records.append(record(number, raw))
    return records


def check_header(number: int, raw: dict[str, Any], records: list[Record]) -> None:
    version = raw["convostore_export"]
    if records or number != 1:
        raise refused(number, "the header must be the file's first line")
    if version != FORMAT or len(raw) != 1:
        raise refused(number, f"export format {version!r} is not one this version reads ({FORMAT})")


def record(number: int, raw: dict[str, Any]) -> Record:
    session_id, branch = raw.get("session_id"), raw.get("branch", MAIN)
    if not isinstance(session_id, str) or not session_id:
        raise refused(number, "'session_id' must be a non-empty string")
    if not isinstance(branch, str) or not branch:
        raise refused(number, "'branch' must be a non-empty string")
    kinds = set(raw) - {"session_id", "branch"}
    if kinds == {"item"}:
        if not isinstance(raw["item"], dict):
            raise refused(number, "'item' must be a JSON object")
        return Record(number, session_id, branch, "item", raw["item"])
    if not kinds and "branch" in raw and branch != MAIN:
        return Record(number, session_id, branch, "branch")
    if kinds == {"turn", "usage"}:
        return usage_record(number, session_id, branch, raw)
    if kinds == {"archive"}:
        return archive_record(number, session_id, branch, raw["archive"])
    if kinds == {"labels"} and "branch" not in raw:
        labels = raw["labels"]
        if not isinstance(labels, dict) or not labels:
            raise refused(number, "'labels' must be a non-empty object of names to values")
        if not all(isinstance(v, str) for v in labels.values()):
            raise refused(number, "'labels' must map names to string values")
        return Record(number, session_id, MAIN, "labels", labels)
    raise refused(
        number,
        "not a record: expected 'item', 'turn' with 'usage', 'archive', 'labels', or a "
        "branch alone, "
        "beside 'session_id' (as `sessions export` writes them)",
    )


def usage_record(number: int, session_id: str, branch: str, raw: dict[str, Any]) -> Record:
    turn, usage = raw["turn"], raw["usage"]
    if isinstance(turn, bool) or not isinstance(turn, int) or turn < 0:
        raise refused(number, "'turn' must be a non-negative integer")
    if not isinstance(usage, dict) or not set(usage) <= set(USAGE_FIELDS):
        raise refused(number, f"'usage' must be an object of {', '.join(USAGE_FIELDS)}")
    return Record(number, session_id, branch, "usage", usage, turn)


def archive_record(number: int, session_id: str, branch: str, archive: Any) -> Record:
    count = archive.get("count") if isinstance(archive, dict) else None
    summary = archive.get("summary") if isinstance(archive, dict) else None
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise refused(number, "'archive.count' must be a positive integer")
    if not isinstance(summary, list) or not all(isinstance(i, dict) for i in summary):
        raise refused(number, "'archive.summary' must be a list of JSON objects")
    return Record(number, session_id, branch, "archive", summary, count=count)


def refused(number: int, why: str) -> ValueError:
    return ValueError(f"line {number}: {why}; nothing was imported")


class ImportStopped(ValueError):
    """A record the sidecar refused; the message names where, and what was written."""


@dataclass
class Tally:
    items: int = 0
    before: int = 0
    branches: int = 0
    usage: int = 0
    usage_skipped: int = 0
    archives: int = 0
    labelled: int = 0

    def __str__(self) -> str:
        said = f"imported {self.items} items"
        if self.before:
            said += f"; {self.before} were imported before and left as they were"
        if self.branches or self.usage or self.archives or self.labelled:
            said += (
                f"; {self.branches} branches, {self.usage} usage records, "
                f"{self.archives} compactions restored, {self.labelled} sessions labelled"
            )
        if self.usage_skipped:
            said += (
                f"; {self.usage_skipped} usage records left out (their turn was not written now)"
            )
        return said


@dataclass
class Batch:
    session_id: str
    branch: str
    lines: list[int] = field(default_factory=list)
    items: list[Any] = field(default_factory=list)

    def halves(self) -> tuple[Batch, Batch]:
        half = len(self.items) // 2
        return (
            Batch(self.session_id, self.branch, self.lines[:half], self.items[:half]),
            Batch(self.session_id, self.branch, self.lines[half:], self.items[half:]),
        )


class Importer:
    """Writes parsed records in order: items in batches (each with an idempotency key
    from the file and its line, so a re-run appends nothing twice; halved while the
    sidecar finds one too large), then what follows them. A record the sidecar refuses
    stops it, naming the line and session."""

    def __init__(self, sidecar: Sidecar, text: str) -> None:
        self.sidecar = sidecar
        self.digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
        self.tally = Tally()
        self.batch: Batch | None = None
        self.answers: dict[tuple[str, str], dict[str, Any]] = {}
        self.present: dict[tuple[str, str], deque[Any]] = {}
        """Items a branch already held when it was opened, which its records repeat."""
        self.sealed: set[str] = set()
        """Sessions whose items come sealed: what they hold is compared sealed."""
        self.labelled: set[str] = set()

    async def run(self, records: list[Record]) -> Tally:
        self.sealed = {r.session_id for r in records if r.kind == "item" and is_sealed(r.value)}
        for entry in records:
            try:
                await self.take(entry)
            except ConvostoreError as exc:
                raise self.stopped(
                    entry.line, entry.session_id, f"{exc.code}: {exc.message}"
                ) from None
        await self.flush()
        return self.tally

    def stopped(self, line: int, session_id: str, why: str) -> ImportStopped:
        return ImportStopped(
            f"line {line}, session {session_id!r}: {why}; {self.tally} before it "
            "(running the import again skips them)"
        )

    async def take(self, entry: Record) -> None:
        key = (entry.session_id, entry.branch)
        if entry.kind == "item":
            await self.add_item(entry, key)
            return
        await self.flush()
        if entry.kind == "branch":
            await self.open_branch(entry)
        elif entry.kind == "usage":
            await self.record_usage(entry, key)
        elif entry.kind == "labels":
            path = session_path(self.sidecar, entry.session_id) + "/metadata"
            await self.sidecar.patch(path, json_body({"labels": entry.value}))
            self.labelled.add(entry.session_id)
            self.tally.labelled += 1
        else:
            await self.restore_archive(entry)

    async def add_item(self, entry: Record, key: tuple[str, str]) -> None:
        present = self.present.get(key)
        if present:
            if present.popleft() != entry.value:
                why = f"branch {entry.branch!r} holds other items already"
                raise self.stopped(entry.line, entry.session_id, why)
            self.tally.before += 1
            return
        batch = self.batch
        if (
            batch is None
            or (batch.session_id, batch.branch) != key
            or len(batch.items) >= IMPORT_BATCH
        ):
            await self.flush()
            self.batch = batch = Batch(entry.session_id, entry.branch)
        batch.lines.append(entry.line)
        batch.items.append(entry.value)

    async def flush(self) -> None:
        batch, self.batch = self.batch, None
        if batch is not None:
            await self.write(batch)

    async def write(self, batch: Batch) -> None:
        path = session_path(self.sidecar, batch.session_id) + "/items"
        try:
            answer = await self.sidecar.post(
                path,
                encode_items(batch.items),
                {"branch": batch.branch},
                key=f"import-{self.digest}-{batch.lines[0]}",
            )
        except ConvostoreError as exc:
            if exc.code == "request_too_large" and len(batch.items) > 1:
                for half in batch.halves():
                    await self.write(half)
                return
            if exc.code in SEALED_REFUSALS:
                await self.unlabel(batch.session_id)
            why = f"{exc.code}: {exc.message}"
            raise self.stopped(batch.lines[0], batch.session_id, why) from None
        self.answers[(batch.session_id, batch.branch)] = answer
        if answer.get("replayed"):
            self.tally.before += len(batch.items)
        else:
            self.tally.items += len(batch.items)

    async def unlabel(self, session_id: str) -> None:
        """A session this run labelled, whose sealed items its store will not open (its
        subject erased, say), is removed again if it holds nothing: the labels of an
        erased subject do not come back with an old export."""
        if session_id not in self.labelled or any(s == session_id for s, _ in self.answers):
            return
        held = await self.sidecar.get(session_path(self.sidecar, session_id) + "/items")
        if not held["items"]:
            await self.sidecar.store.session(session_id).clear_session()
            self.labelled.discard(session_id)
            self.tally.labelled -= 1

    async def open_branch(self, entry: Record) -> None:
        """An empty branch made from `main`'s first user turn; on a re-run, the one made
        before. The items it holds already (copies of what precedes that turn, or what
        an earlier run wrote) are the first of its records, and are not written again."""
        path = session_path(self.sidecar, entry.session_id)
        try:
            await self.sidecar.get(f"{path}/branches/{quote(entry.branch, safe='')}")
        except ConvostoreError as exc:
            if exc.code != "branch_not_found":
                raise
            body = {"from_branch": MAIN, "turn": 1, "branch_id": entry.branch}
            await self.sidecar.post(path + "/branches", json_body(body))
            self.tally.branches += 1
        where = {"branch": entry.branch, "view": "full"}
        if entry.session_id in self.sealed:
            where["sealed"] = "true"
        held = await self.sidecar.get(path + "/items", where)
        self.present[(entry.session_id, entry.branch)] = deque(held["items"])

    async def record_usage(self, entry: Record, key: tuple[str, str]) -> None:
        """For the turn the last append wrote, at the anchor it answered with."""
        answer = self.answers.get(key, {})
        if answer.get("turn") != entry.turn or answer.get("replayed"):
            self.tally.usage_skipped += 1
            return
        path = f"{session_path(self.sidecar, entry.session_id)}/branches/"
        body = {"turn": entry.turn, "anchor": answer["anchor"], **entry.value}
        await self.sidecar.post(path + quote(entry.branch, safe="") + "/usage", json_body(body))
        self.tally.usage += 1

    async def restore_archive(self, entry: Record) -> None:
        path = session_path(self.sidecar, entry.session_id)
        shape = await self.sidecar.get(f"{path}/branches/{quote(entry.branch, safe='')}/shape")
        if shape["items"] and shape["items"][0]["type"] == "compacted":
            return  # restored by an earlier run
        where = {"branch": entry.branch, "count": str(entry.count)}
        await self.sidecar.post(path + "/items:archive", encode_items(entry.value), where)
        self.tally.archives += 1
