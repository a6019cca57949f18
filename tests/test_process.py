"""`convostore sidecar` and `convostore sessions` as real processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from convostore import SidecarSession
from convostore_sidecar.keyring import generate_key

from tests.support import SidecarProcess

Make = Callable[[dict[str, Any]], SidecarProcess]


def sqlite_config(path: Path) -> dict[str, Any]:
    return {"stores": {"default": {"backend": "sqlite", "sqlite": {"path": str(path)}}}}


def test_restart_keeps_the_history(sidecar_process: Make, tmp_path: Path) -> None:
    proc = sidecar_process(sqlite_config(tmp_path / "keep.db"))
    proc.start()
    asyncio.run(SidecarSession("u", url=proc.url).add_items([{"n": 1}, {"n": 2}]))
    assert proc.stop() == 0
    proc.start()
    assert asyncio.run(SidecarSession("u", url=proc.url).get_items()) == [{"n": 1}, {"n": 2}]


def test_sigterm_finishes_requests_in_flight_and_exits_zero(
    sidecar_process: Make, tmp_path: Path
) -> None:
    proc = sidecar_process(sqlite_config(tmp_path / "term.db"))
    proc.start()
    assert proc.process is not None
    pid = proc.process.pid
    body = json.dumps({"items": [{"n": n, "pad": "x" * 1000} for n in range(200)]}).encode()

    async def slow_body() -> AsyncIterator[bytes]:
        yield body[:1000]
        await asyncio.sleep(0.3)
        os.kill(pid, signal.SIGTERM)
        await asyncio.sleep(0.5)
        yield body[1000:]

    async def append_slowly() -> int:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                proc.url + "/v1/stores/default/sessions/slow/items",
                data=slow_body(),
                headers={"Content-Type": "application/json"},
            ) as resp,
        ):
            return resp.status

    assert asyncio.run(append_slowly()) == 200
    assert proc.process.wait(timeout=30) == 0
    proc.close_log()
    proc.process = None
    proc.start()
    assert len(asyncio.run(SidecarSession("slow", url=proc.url).get_items())) == 200


def test_two_sidecars_share_one_sqlite_file(sidecar_process: Make, tmp_path: Path) -> None:
    config = sqlite_config(tmp_path / "shared.db")
    first, second = sidecar_process(config), sidecar_process(config)
    first.start()
    second.start()

    async def write(url: str, writer: int) -> None:
        session = SidecarSession("shared", url=url)
        for batch in range(25):
            await session.add_items([{"w": writer, "b": batch, "i": i} for i in range(4)])

    async def both() -> list[Any]:
        await asyncio.gather(*(write(p.url, w) for w, p in enumerate([first, second] * 2)))
        return await SidecarSession("shared", url=second.url).get_items()

    items = asyncio.run(both())
    assert len(items) == 4 * 25 * 4
    for start in range(0, len(items), 4):
        run = items[start : start + 4]
        assert [i["i"] for i in run] == [0, 1, 2, 3]
        assert len({(i["w"], i["b"]) for i in run}) == 1


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "convostore", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_sessions_commands_list_show_export_import_and_clear(
    sidecar_process: Make, tmp_path: Path
) -> None:
    source = sidecar_process(sqlite_config(tmp_path / "source.db"))
    target = sidecar_process(sqlite_config(tmp_path / "target.db"))
    source.start()
    target.start()

    async def fill() -> None:
        await SidecarSession("alice", url=source.url).add_items([{"n": n} for n in range(3)])
        await SidecarSession("bob", url=source.url).add_items([{"text": "héllo 🚀"}])

    asyncio.run(fill())
    listed = run_cli("sessions", "--url", source.url, "ls")
    assert listed.stdout.split() == ["alice", "bob"]
    shown = run_cli("sessions", "--url", source.url, "show", "alice", "--limit", "2")
    assert json.loads(shown.stdout) == [{"n": 1}, {"n": 2}]
    export = tmp_path / "export.jsonl"
    assert run_cli("sessions", "--url", source.url, "export", "-o", str(export)).returncode == 0
    lines = [json.loads(line) for line in export.read_text().splitlines()]
    assert lines[-1] == {"session_id": "bob", "item": {"text": "héllo 🚀"}}
    first = run_cli("sessions", "--url", target.url, "import", str(export))
    assert first.stderr.strip() == "imported 4 items"
    repeated = run_cli("sessions", "--url", target.url, "import", str(export))
    assert repeated.returncode == 0
    assert repeated.stderr.strip() == (
        "imported 0 items; 4 were imported before and left as they were"
    ), "a repeated import duplicates nothing and says so"
    again = tmp_path / "again.jsonl"
    run_cli("sessions", "--url", target.url, "export", "-o", str(again))
    assert again.read_text() == export.read_text()
    assert run_cli("sessions", "--url", target.url, "clear", "alice").returncode == 0
    assert run_cli("sessions", "--url", target.url, "ls").stdout.split() == ["bob"]


def test_cli_errors_are_one_clear_line(sidecar_process: Make, tmp_path: Path) -> None:
    proc = sidecar_process(sqlite_config(tmp_path / "e.db"))
    proc.start()
    missing = run_cli("sessions", "--url", proc.url, "--store", "nope", "ls")
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        "convostore: store_not_found: this sidecar serves no store named 'nope'"
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"session_id": "a"}\n')
    broken = run_cli("sessions", "--url", proc.url, "import", str(bad))
    assert broken.returncode == 1
    assert "line 1: not a record: expected 'item'" in broken.stderr


def test_shared_options_go_before_or_after_the_action(
    sidecar_process: Make, tmp_path: Path
) -> None:
    proc = sidecar_process(sqlite_config(tmp_path / "o.db"))
    proc.start()
    asyncio.run(SidecarSession("x", url=proc.url).add_items([{"n": 1}]))
    before = run_cli("sessions", "--url", proc.url, "--store", "default", "ls")
    after = run_cli("sessions", "ls", "--store", "default", "--url", proc.url)
    assert before.stdout.split() == after.stdout.split() == ["x"]
    shown = run_cli("sessions", "show", "--url", proc.url, "x")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == [{"n": 1}], "the URL is not read as the session id"
    wrong_then_right = run_cli("sessions", "--url", "http://127.0.0.1:9", "ls", "--url", proc.url)
    assert wrong_then_right.stdout.split() == ["x"], "the action's own option wins"


def test_a_closed_pipe_ends_the_command_quietly(sidecar_process: Make, tmp_path: Path) -> None:
    proc = sidecar_process(sqlite_config(tmp_path / "p.db"))
    proc.start()

    async def fill() -> None:
        for batch in range(3):
            items = [{"n": n} for n in range(batch * 1000, batch * 1000 + 1000)]
            await SidecarSession("long", url=proc.url).add_items(items)

    asyncio.run(fill())
    command = [sys.executable, "-m", "convostore", "sessions", "--url", proc.url, "export"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as export:
        assert export.stdout is not None
        assert export.stderr is not None
        export.stdout.readline()
        export.stdout.close()  # as `| head -1` does
        stderr = export.stderr.read().decode()
        assert export.wait(timeout=60) == 1
    assert stderr == ""


def test_an_import_checks_every_line_before_it_writes(
    sidecar_process: Make, tmp_path: Path
) -> None:
    proc = sidecar_process(sqlite_config(tmp_path / "i.db"))
    proc.start()
    lines = [
        json.dumps({"session_id": "a", "item": {"n": 1}}),
        json.dumps({"session_id": "b", "item": {"n": 2}}),
        json.dumps({"session_id": "c", "item": [3]}),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    refused = run_cli("sessions", "--url", proc.url, "import", str(bad))
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        "convostore: line 3: 'item' must be a JSON object; nothing was imported"
    )
    assert run_cli("sessions", "--url", proc.url, "ls").stdout == ""

    too_long = "s" * 300  # over the sidecar's session id limit: refused by the sidecar
    lines[2] = json.dumps({"session_id": too_long, "item": {"n": 3}})
    bad.write_text("\n".join(lines) + "\n")
    stopped = run_cli("sessions", "--url", proc.url, "import", str(bad))
    assert stopped.returncode == 1
    message = stopped.stderr.strip()
    assert message.startswith(f"convostore: line 3, session {too_long!r}: invalid_session_id: ")
    assert message.endswith("imported 2 items before it (running the import again skips them)")
    assert run_cli("sessions", "--url", proc.url, "ls").stdout.split() == ["a", "b"]


def test_a_sqlite_path_in_a_missing_directory_is_refused_at_start(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    missing = tmp_path / "no-such-dir" / "chat.db"
    config.write_text(f"stores:\n  chat:\n    backend: sqlite\n    sqlite: {{path: '{missing}'}}\n")
    result = run_cli("sidecar", "--config", str(config))
    assert result.returncode == 2
    assert "store 'chat': field 'sqlite.path': cannot keep a database at" in result.stderr
    assert f"its directory {str(missing.parent)!r} does not exist" in result.stderr
    assert not missing.parent.exists(), "nothing was created"


def test_invalid_config_exits_2_with_the_field(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("stores:\n  chat:\n    backend: redis\n    redis: {url: 'http://x'}\n")
    result = run_cli("sidecar", "--config", str(config))
    assert result.returncode == 2
    assert "store 'chat': field 'redis.url': must start with redis://" in result.stderr


def test_sigint_also_stops_cleanly(sidecar_process: Make, tmp_path: Path) -> None:
    proc = sidecar_process(sqlite_config(tmp_path / "int.db"))
    proc.start()
    assert proc.stop(signal.SIGINT) == 0


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["probe", "--url", "http://127.0.0.1:9"], {}, "cannot reach the sidecar at"),
        (["keys", "generate", "--id", "k2"], {}, "--id names the key's file, with --dir"),
        (["keys", "generate", "--dir", ".", "--id", "../evil"], {}, "--id must be 1 to 64"),
        (["operator", "run"], {"KUBECONFIG": "/nonexistent"}, "no Kubernetes cluster"),
    ],
    ids=["probe-dead-port", "id-without-dir", "id-escaping", "operator-without-cluster"],
)
def test_command_errors_say_what_is_wrong_in_one_line(
    args: list[str], env: dict[str, str], says: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "convostore", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "KUBERNETES_SERVICE_HOST": "", **env},
    )
    assert result.returncode == 1
    assert says in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path.parent / "evil").exists()


def test_a_yaml_error_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("stores:\n  chat: {backend: sqlite\n")
    result = run_cli("sidecar", "--config", str(config))
    assert result.returncode == 2
    assert "<unicode string>" not in result.stderr
    assert str(config) in result.stderr


def test_a_sidecar_restart_is_not_an_agent_error(sidecar_process: Make, tmp_path: Path) -> None:
    """With the client's defaults, calls made while the sidecar restarts wait for it."""
    proc = sidecar_process(sqlite_config(tmp_path / "restart.db"))
    proc.start()
    session = SidecarSession("patient", url=proc.url)
    asyncio.run(session.add_items([{"n": 1}]))
    assert proc.stop() == 0

    def restart_later() -> None:
        time.sleep(1.0)  # the sidecar is down meanwhile, as during a rolling restart
        proc.start()

    restarting = threading.Thread(target=restart_later)
    restarting.start()
    try:
        assert asyncio.run(session.get_items()) == [{"n": 1}]
        asyncio.run(session.add_items([{"n": 2}]))
    finally:
        restarting.join()
    assert asyncio.run(session.get_items()) == [{"n": 1}, {"n": 2}]


def open_connection(port: int, sent: bytes = b"") -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sendall(sent)
    return conn


def read_until_closed(conn: socket.socket) -> bytes:
    """What the sidecar sends before it closes the connection (a 10 s socket timeout
    fails the test if it never does)."""
    received = b""
    while chunk := conn.recv(65536):
        received += chunk
    return received


def test_slow_headers_and_idle_connections_are_cut_off(
    sidecar_process: Make, tmp_path: Path
) -> None:
    proc = sidecar_process({"requests": {"idleTimeout": "1s"}, **sqlite_config(tmp_path / "c.db")})
    proc.start()
    opened = time.monotonic()
    with (
        open_connection(
            proc.port, b"GET /v1/stores/default/sessions/s/items HTTP/1.1\r\nHo"
        ) as slow,
        open_connection(proc.port) as idle,
    ):
        assert read_until_closed(slow) == b""
        assert read_until_closed(idle) == b""
    waited = time.monotonic() - opened
    assert waited < 9, f"the connections were held {waited:.1f} s"
    with urllib.request.urlopen(proc.url + "/healthz", timeout=5) as answer:
        assert answer.status == 200


def test_connections_past_the_cap_are_told_to_retry_and_closed(
    sidecar_process: Make, tmp_path: Path
) -> None:
    proc = sidecar_process({"requests": {"maxConnections": 3}, **sqlite_config(tmp_path / "c.db")})
    proc.start()
    held = [open_connection(proc.port) for _ in range(3)]
    with open_connection(proc.port) as fourth:
        refused = read_until_closed(fourth)
    head, _, body = refused.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503")
    assert b"Retry-After: 1" in head
    assert json.loads(body)["error"]["code"] == "overloaded"
    held.pop().close()
    deadline = time.monotonic() + 10
    while True:
        request = b"GET /healthz HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n"
        with (
            contextlib.suppress(ConnectionResetError),  # refused before the slot freed
            open_connection(proc.port, request) as conn,
        ):
            if read_until_closed(conn).startswith(b"HTTP/1.1 200"):
                break
        assert time.monotonic() < deadline, "a freed connection slot was never reused"
    for conn in held:
        conn.close()


def loaded_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


OPTIONAL = ("/cryptography/", "/asyncpg/", "/grpc/", "/hiredis/", "/pydantic_core/")


def test_a_plain_sqlite_sidecar_loads_no_library_its_stores_do_not_use(
    sidecar_process: Make, tmp_path: Path
) -> None:
    """Each backend's client library, and cryptography, cost resident memory in every
    pod: they are loaded when a store uses them, not before."""
    plain = sidecar_process(sqlite_config(tmp_path / "plain.db"))
    plain.start()
    assert plain.process is not None
    with urllib.request.urlopen(plain.url + "/v1/stores/default/sessions/s/items") as answer:
        assert answer.status == 200
    maps = loaded_libraries(plain.process.pid)
    assert [lib for lib in OPTIONAL if lib in maps] == []
    config = sqlite_config(tmp_path / "secret.db")
    config["stores"]["default"]["encryption"] = {"keys": [{"id": "k1", "value": generate_key()}]}
    secret = sidecar_process(config)
    secret.start()
    assert secret.process is not None
    asyncio.run(SidecarSession("s", url=secret.url).add_items([{"n": 1}]))
    assert "/cryptography/" in loaded_libraries(secret.process.pid)


def test_sessions_are_labelled_and_listed_by_label_from_the_command_line(
    sidecar_process: Make, tmp_path: Path
) -> None:
    proc = sidecar_process(sqlite_config(tmp_path / "l.db"))
    proc.start()
    for name, user in (("a", "u1"), ("b", "u2"), ("c", "u1")):
        chat = SidecarSession(name, url=proc.url, metadata={"user_id": user, "tenant": "t"})
        asyncio.run(chat.add_items([{"n": name}]))
    listed = run_cli("sessions", "ls", "--url", proc.url, "--label", "user_id=u1")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["c", "a"]
    labelled = run_cli(
        "sessions", "label", "--url", proc.url, "a", "plan=free", "--remove", "tenant"
    )
    assert labelled.returncode == 0, labelled.stderr
    assert json.loads(labelled.stdout)["labels"] == {"plan": "free", "user_id": "u1"}
    long = run_cli(
        "sessions",
        "ls",
        "--url",
        proc.url,
        "--label",
        "plan=free",
        "--label",
        "user_id=u1",
        "--long",
    )
    assert [json.loads(line)["session_id"] for line in long.stdout.splitlines()] == ["a"]
    created = json.loads(long.stdout)["created_at"]
    newer = run_cli("sessions", "ls", "--url", proc.url, "--created-after", created)
    assert newer.stdout.split() == ["c", "b"]
    for bad, message in (
        (["--label", "user_id"], "is not NAME=VALUE"),
        (["--created-after", "yesterday"], "is not an RFC 3339 time"),
        (["--label", "user_id=u1", "--prefix", "a"], "does not combine"),
        (["--label", "bad name=x"], "invalid_labels"),
    ):
        refused = run_cli("sessions", "ls", "--url", proc.url, *bad)
        assert refused.returncode != 0
        assert message in refused.stderr
