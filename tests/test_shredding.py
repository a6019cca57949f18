"""Crypto-shredding: with a subject label, each subject's items are sealed under a key
of their own, and erasing the subject destroys it. Through the real client and sidecar
on every backend that keeps labels; the backup a store keeps is played by the bytes
the backend held before the erasure, opened afterwards with every key the store has."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from convostore import AdvancedSidecarSession, SidecarSession, SidecarStore
from convostore.errors import RequestRejectedError
from convostore_sidecar.config import parse_config
from convostore_sidecar.drivers.base import SubjectKey
from convostore_sidecar.encryption import EncryptedDriver
from convostore_sidecar.http.state import STORES
from convostore_sidecar.keyring import (
    DecryptionFailed,
    Keyring,
    SubjectErased,
    envelope_of,
    generate_key,
)
from convostore_sidecar.sections import ConfigError
from convostore_sidecar.subjects import Subjects

from tests.support import (
    POSTGRES_POOLED,
    REDIS_CLUSTER,
    RunningSidecar,
    SidecarProcess,
    StartSidecar,
    raw_contents,
    unique,
)

LABELLED = ("sqlite", "postgres", "redis", REDIS_CLUSTER, POSTGRES_POOLED, "sqlalchemy")
K1, K2 = generate_key(), generate_key()
StoreConfig = Callable[..., dict[str, Any]]


def sealing(**extra: Any) -> dict[str, Any]:
    return {"keys": [{"id": "k1", "value": K1}], "subjectLabel": "user_id", **extra}


@pytest.fixture(params=LABELLED)
async def shredding(
    request: pytest.FixtureRequest, start_sidecar: StartSidecar, store_config: StoreConfig
) -> RunningSidecar:
    config = store_config(request.param, encryption=sealing())
    return await start_sidecar({"stores": {"chat": config}})


def served(sidecar: RunningSidecar) -> EncryptedDriver:
    driver = sidecar.app[STORES].get("chat").driver
    assert isinstance(driver, EncryptedDriver)
    return driver


async def stored(driver: EncryptedDriver, session_id: str) -> list[bytes]:
    """Every item of the session as the backend holds it: each branch, the archive
    (once each: Redis also keeps a copy of each user message, by its turn)."""
    held: list[bytes] = []
    await driver.inner.rewrite(session_id, held.append)  # answers None: changes nothing
    return list(dict.fromkeys(held))


async def subject_keys(driver: EncryptedDriver) -> list[SubjectKey]:
    inner: Any = driver.inner
    found, cursor = [], ""
    while True:
        page, cursor = await inner.subject_keys(cursor, 100)
        found += page
        if not cursor:
            return found


def opened(
    ring: Keyring, driver: EncryptedDriver, session_id: str, items: list[bytes], keys: Any
) -> list[bytes]:
    return [ring.decrypt(driver.store, session_id, data, keys) for data in items]


async def test_a_subjects_items_are_sealed_under_their_own_key(shredding: RunningSidecar) -> None:
    driver = served(shredding)
    alice, nobody = unique("alice"), unique("s")
    mine = AdvancedSidecarSession(unique(), "chat", shredding.url, metadata={"user_id": alice})
    await mine.add_items([{"role": "user", "content": "hello"}])
    await mine.create_branch_from_turn(1, "alt")
    await mine.add_items([{"role": "user", "content": "other way"}])  # on "alt", now current
    plain = SidecarSession(nobody, "chat", shredding.url)
    await plain.add_items([{"role": "user", "content": "no one's"}])

    assert await mine.get_items(branch_id="alt") == [{"role": "user", "content": "other way"}]
    assert await plain.get_items() == [{"role": "user", "content": "no one's"}]
    envelopes = [envelope_of(d) for d in await stored(driver, mine.session_id)]
    assert len(envelopes) == 2  # main's, and alt's own (a branch from turn 1 copies none)
    assert all(e is not None and e.subject for e in envelopes)
    assert len({e.subject for e in envelopes if e is not None}) == 1
    unlabelled = [envelope_of(d) for d in await stored(driver, nobody)]
    assert all(e is not None and e.key_id == "k1" and e.subject is None for e in unlabelled)
    keys = await subject_keys(driver)
    assert [k.subject for k in keys] == [envelopes[0].subject if envelopes[0] else None]
    assert alice.encode() not in b"".join(k.subject.encode() + k.wrapped for k in keys)
    assert driver.keyring.wrapped_with(keys[0].wrapped) == "k1"


async def test_erasing_a_subject_shreds_every_copy_of_their_items(
    shredding: RunningSidecar,
) -> None:
    """The backup (the bytes held before the erasure) keeps the erased subject's items
    readable only while the store key that wrapped their key is kept: after a rotation
    retires it, they open under no key, and another subject's still open."""
    driver = served(shredding)
    alice, bob = unique("alice"), unique("bob")
    sessions: dict[str, list[str]] = {alice: [], bob: []}
    for person in (alice, alice, bob):
        chat = AdvancedSidecarSession(unique(), "chat", shredding.url, metadata={"user_id": person})
        await chat.add_items([{"role": "user", "content": f"{person} says hi"}])
        await chat.add_items([{"role": "assistant", "content": f"hello {person}"}])
        await chat.create_branch_from_turn(1, "alt")
        sessions[person].append(chat.session_id)
    backup = {sid: await stored(driver, sid) for sid in sessions[alice] + sessions[bob]}
    backup_keys = {k.subject: k.wrapped for k in await subject_keys(driver)}
    assert len(backup_keys) == 2

    erased = await SidecarStore("chat", shredding.url).erase({"user_id": alice})
    assert erased["erased_sessions"] == 2

    assert len(await subject_keys(driver)) == 1
    assert driver.subjects is not None
    alice_subject = driver.subjects.subject_of(alice)
    assert alice_subject.encode() not in await raw_contents(shredding)
    assert f"{alice} says hi".encode() not in await raw_contents(shredding)
    for sid in sessions[alice]:
        assert await SidecarSession(sid, "chat", shredding.url).get_items() == []
        copy = backup[sid]
        with pytest.raises(SubjectErased):
            opened(driver.keyring, driver, sid, copy, await driver._subject_keys(copy))
    bob_sid = sessions[bob][0]
    live_keys = await driver._subject_keys(backup[bob_sid])
    bobs = {f'{{"role":"user","content":"{bob} says hi"}}'.encode()}
    bobs.add(f'{{"role":"assistant","content":"hello {bob}"}}'.encode())
    assert set(opened(driver.keyring, driver, bob_sid, backup[bob_sid], live_keys)) == bobs

    # The backup's own wrapped key opens while k1 is kept: the rotation finishes it.
    assert driver.keyring.unwrap(driver.store, alice_subject, backup_keys[alice_subject])
    both = Keyring({**driver.keyring.keys, "k2": bytes(range(32))}, "k2", subject_label="user_id")
    rewrapped = await Subjects(driver.inner, both, driver.store).rewrap(20)  # type: ignore[arg-type]
    assert rewrapped == (1, True)
    retired = Keyring({"k2": both.keys["k2"]}, "k2", subject_label="user_id")
    with pytest.raises(DecryptionFailed, match="'k1' is not in this store's keyring"):
        retired.unwrap(driver.store, alice_subject, backup_keys[alice_subject])
    live = await Subjects(driver.inner, retired, driver.store).keys_for(live_keys)  # type: ignore[arg-type]
    assert set(opened(retired, driver, bob_sid, backup[bob_sid], live)) == bobs


async def test_an_erasure_by_tenant_shreds_only_subjects_left_with_no_session(
    shredding: RunningSidecar,
) -> None:
    driver = served(shredding)
    alice, bob, acme, other = unique("alice"), unique("bob"), unique("acme"), unique("other")
    for person, tenant in ((alice, acme), (bob, acme), (bob, other)):
        chat = SidecarSession(
            unique(), "chat", shredding.url, metadata={"user_id": person, "tenant": tenant}
        )
        await chat.add_items([{"role": "user", "content": f"{person} at {tenant}"}])
    assert driver.subjects is not None
    before = {k.subject for k in await subject_keys(driver)}
    assert before == {driver.subjects.subject_of(alice), driver.subjects.subject_of(bob)}

    await SidecarStore("chat", shredding.url).erase({"tenant": acme})

    assert {k.subject for k in await subject_keys(driver)} == {driver.subjects.subject_of(bob)}
    found = SidecarStore("chat", shredding.url).find_sessions(labels={"user_id": bob})
    left = [r["session_id"] async for r in found]
    assert len(left) == 1
    assert await SidecarSession(left[0], "chat", shredding.url).get_items() == [
        {"role": "user", "content": f"{bob} at {other}"}
    ]


async def test_a_subject_set_after_the_first_items_seals_them_and_then_stays(
    shredding: RunningSidecar,
) -> None:
    driver = served(shredding)
    subjects = driver.subjects
    assert subjects is not None
    carol = unique("carol")
    chat = SidecarSession(unique(), "chat", shredding.url)
    await chat.add_items([{"role": "user", "content": "before"}])
    held = [envelope_of(d) for d in await stored(driver, chat.session_id)]
    assert {(e.key_id, e.subject) for e in held if e} == {("k1", None)}

    await chat.set_metadata({"user_id": carol})

    held = [envelope_of(d) for d in await stored(driver, chat.session_id)]
    assert {(e.key_id, e.subject) for e in held if e} == {(None, subjects.subject_of(carol))}
    assert await chat.get_items() == [{"role": "user", "content": "before"}]
    for change in ({"user_id": unique("dave")}, {"user_id": None}):
        with pytest.raises(RequestRejectedError) as refused:
            await chat.set_metadata(change)
        assert refused.value.status == 409
        assert refused.value.code == "subject_fixed"
    record = await chat.get_metadata()
    assert record is not None
    assert record["labels"]["user_id"] == carol
    await chat.set_metadata({"user_id": carol, "plan": "free"})  # the same value: allowed
    await chat.clear_session()
    await chat.set_metadata({"user_id": unique("erin")})  # a cleared session starts anew


async def test_a_store_that_requires_a_subject_refuses_unlabelled_writes(
    start_sidecar: StartSidecar, store_config: StoreConfig
) -> None:
    config = store_config("sqlite", encryption=sealing(requireSubject=True))
    sidecar = await start_sidecar({"stores": {"chat": config}})
    anonymous = SidecarSession(unique(), "chat", sidecar.url)
    with pytest.raises(RequestRejectedError) as refused:
        await anonymous.add_items([{"role": "user", "content": "who am I"}])
    assert refused.value.status == 409
    assert refused.value.code == "subject_required"
    assert "'user_id'" in str(refused.value)
    assert await anonymous.get_items() == []
    known = SidecarSession(unique(), "chat", sidecar.url, metadata={"user_id": unique("u")})
    await known.add_items([{"role": "user", "content": "hi"}])
    assert await known.get_items() == [{"role": "user", "content": "hi"}]


async def test_a_restored_backup_reads_only_the_subjects_not_erased_since(
    start_sidecar: StartSidecar, store_config: StoreConfig, tmp_path: Path
) -> None:
    """The SQLite file copied before an erasure, served again beside the live subject
    keys: the erased subject's sessions answer 410 subject_erased, the other's read."""
    config = store_config("sqlite", encryption=sealing())
    live = await start_sidecar({"stores": {"chat": config}})
    alice, bob = unique("alice"), unique("bob")
    for person in (alice, bob):
        chat = SidecarSession(person, "chat", live.url, metadata={"user_id": person})
        await chat.add_items([{"role": "user", "content": f"{person} was here"}])
    path = Path(config["sqlite"]["path"])
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    backup = tmp_path / "backup.db"
    shutil.copy(path, backup)
    await SidecarStore("chat", live.url).erase({"user_id": alice})

    with sqlite3.connect(backup) as conn:  # restore the items, keep the live keys
        conn.execute("ATTACH ? AS live", (str(path),))
        conn.execute("DELETE FROM convostore_subject_keys")
        conn.execute(
            "INSERT INTO convostore_subject_keys SELECT * FROM live.convostore_subject_keys"
        )
    restored = await start_sidecar(
        {"stores": {"chat": {**config, "sqlite": {"path": str(backup)}}}}
    )
    assert await SidecarSession(bob, "chat", restored.url).get_items() == [
        {"role": "user", "content": f"{bob} was here"}
    ]
    async with aiohttp.ClientSession() as http:
        url = f"{restored.url}/v1/stores/chat/sessions/{alice}/items"
        async with http.get(url) as resp:
            assert resp.status == 410
            assert (await resp.json())["error"]["code"] == "subject_erased"
        async with http.get(f"{restored.url}/v1/stores/chat/sessions/{alice}/keys") as resp:
            assert await resp.json() == {"sealed": {}, "plaintext": 0, "shredded": 1}


def run_keys(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "convostore", "keys", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_a_rotation_rewraps_subject_keys_and_leaves_their_items_as_they_are(
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess], tmp_path: Path
) -> None:
    """`convostore keys rotate` against the sidecar entrypoint: the subjects' keys move
    to the new primary key, their items' bytes do not change, the census names the old
    key as safe to remove, and with it removed every subject still reads."""
    db = tmp_path / "shred.db"
    store = {"backend": "sqlite", "sqlite": {"path": str(db)}}

    def keyring(*keys: tuple[str, str], primary: str) -> dict[str, Any]:
        listed = [{"id": kid, "value": value} for kid, value in keys]
        encryption = {"keys": listed, "primary": primary, "subjectLabel": "user_id"}
        return {"stores": {"conf": {**store, "encryption": encryption}}}

    first = sidecar_process(keyring(("k1", K1), primary="k1"))
    first.start()
    people = [f"person-{n}" for n in range(3)]
    for person in people:
        chat = SidecarSession(person, "conf", first.url, metadata={"user_id": person})
        asyncio.run(chat.add_items([{"role": "user", "content": person}]))
    asyncio.run(SidecarSession("nobody", "conf", first.url).add_items([{"n": 1}]))
    first.stop()

    def items() -> list[bytes]:
        with sqlite3.connect(db) as conn:
            return [bytes(r[0]) for r in conn.execute("SELECT data FROM convostore_items")]

    before = items()
    both = sidecar_process(keyring(("k1", K1), ("k2", K2), primary="k2"))
    both.start()
    rotate = run_keys("rotate", "--url", both.url, "--store", "conf")
    assert rotate.returncode == 0, rotate.stderr
    assert "3 subject keys re-wrapped" in rotate.stderr
    assert "done: 4 sessions, 1 items re-encrypted" in rotate.stderr
    assert rotate.stdout.splitlines() == [
        "k1: 0 items",
        "k2 (primary): 4 items, 3 subject keys",
        "safe to remove: k1",
    ]
    after = items()
    assert len(set(before) & set(after)) == 3, "the subjects' items were not sealed again"
    both.stop()

    only_new = sidecar_process(keyring(("k2", K2), primary="k2"))
    only_new.start()
    for person in people:
        chat = SidecarSession(person, "conf", only_new.url)
        assert asyncio.run(chat.get_items()) == [{"role": "user", "content": person}]


@pytest.mark.parametrize(
    ("encryption", "labels", "message"),
    [
        ({"subjectLabel": "user id"}, {}, "subjectLabel"),
        ({"subjectLabel": "x" * 64}, {}, "subjectLabel"),
        ({"requireSubject": True}, {}, "requireSubject': needs subjectLabel"),
        ({"subjectLabel": "user_id"}, {"allowed": ["tenant"]}, "not among labels.allowed"),
    ],
)
def test_bad_subject_settings_are_refused(
    encryption: dict[str, Any], labels: dict[str, Any], message: str
) -> None:
    keys = {"keys": [{"id": "k1", "value": K1}]}
    store = {"backend": "sqlite", "encryption": {**keys, **encryption}, "labels": labels}
    with pytest.raises(ConfigError, match=message):
        parse_config({"stores": {"chat": store}})


def test_a_subject_label_needs_a_backend_that_keeps_labels() -> None:
    keys = {"keys": [{"id": "k1", "value": K1}], "subjectLabel": "user_id"}
    dapr = {"backend": "dapr", "dapr": {"stateStore": "statestore"}, "encryption": keys}
    with pytest.raises(ConfigError, match="the dapr backend keeps no labels"):
        parse_config({"stores": {"chat": dapr}})
