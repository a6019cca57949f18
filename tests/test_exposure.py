"""Starting `convostore sidecar` as a process: it refuses to serve beyond loopback
without a token, can serve a socket alone with a token it makes itself, and stops at
start-up with exit code 2 naming the store and field of anything it cannot use."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from convostore import SidecarSession
from convostore.errors import UnauthorizedError
from convostore_sidecar.http.listener import LONGEST_HEADER
from convostore_sidecar.main import write_new_token

from tests.chart.tools import ROOT
from tests.servers import free_port


def sidecar_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "convostore", "sidecar", *args]


def run_briefly(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump({"stores": {"default": {"backend": "sqlite", "sqlite": {"path": "x.db"}}}})
    )
    return subprocess.run(
        sidecar_command("--config", str(config), *args),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "agent.example.com"])
def test_a_listener_beyond_loopback_without_a_token_is_refused(tmp_path: Path, host: str) -> None:
    result = run_briefly(tmp_path, "--host", host, "--port", str(free_port()))
    assert result.returncode == 2
    assert "listen.host: refusing to serve" in result.stderr
    assert "without a token" in result.stderr
    assert not (tmp_path / "x.db").exists(), "nothing was opened"


def test_tcp_off_needs_a_socket(tmp_path: Path) -> None:
    result = run_briefly(tmp_path, "--no-tcp")
    assert result.returncode == 2
    assert "a socket is needed" in result.stderr


def test_the_sidecar_images_default_command_listens_on_loopback_only() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    [sidecar] = [stage for stage in dockerfile.split("\nFROM ") if " AS sidecar\n" in stage]
    [cmd] = [line for line in sidecar.splitlines() if line.startswith("CMD ")]
    args = json.loads(cmd.removeprefix("CMD "))
    assert args[0] == "sidecar"
    assert "--host" not in args, f"the image's CMD must not widen the listener: {shlex.join(args)}"


def test_issuing_a_token_follows_no_link_planted_beside_it(tmp_path: Path) -> None:
    """Links planted where the token goes, at the token's own name and at the name its
    partial file once had (`.token.<pid>`), point at a file the sidecar must not touch:
    it stays as it was, and the token is a file of the sidecar's own."""
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    victim.chmod(0o600)
    folder = tmp_path / "token"
    folder.mkdir()
    (folder / "token").symlink_to(victim)
    (folder / f".token.{os.getpid()}").symlink_to(victim)
    write_new_token(folder / "token")
    assert victim.read_text() == "keep me\n"
    assert victim.stat().st_mode & 0o777 == 0o600
    assert not (folder / "token").is_symlink()
    assert len((folder / "token").read_text().strip()) >= 32


async def test_a_socket_only_sidecar_issues_its_own_token(tmp_path: Path) -> None:
    """As injected: the socket alone, no TCP port, and a token made at start that only
    the containers sharing its file can present."""
    sock, token = tmp_path / "run" / "sidecar.sock", tmp_path / "token" / "token"
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump({"stores": {"default": {"backend": "sqlite", "sqlite": {"path": "x.db"}}}})
    )
    args = ["--config", str(config), "--port", str(port), "--socket", str(sock), "--no-tcp"]
    process = await asyncio.create_subprocess_exec(
        *sidecar_command(*args, "--issue-token", str(token)), cwd=tmp_path
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert process.returncode is None, "the sidecar exited"
            assert time.monotonic() < deadline, "the socket never appeared"
            await asyncio.sleep(0.05)
        issued = token.read_text().strip()
        assert len(issued) >= 32
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
            pass
        url = f"unix://{sock}"
        with pytest.raises(UnauthorizedError):
            await SidecarSession("s", url=url).get_items()
        await SidecarSession("s", url=url, token_file=str(token)).add_items([{"n": 1}])
        connector = aiohttp.UnixConnector(path=str(sock))
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            http.get("http://localhost/healthz") as probe,
        ):
            assert probe.status == 200, "probes need no token"
    finally:
        process.terminate()
        assert await process.wait() == 0


@pytest.mark.parametrize(
    ("config", "args", "field"),
    [
        ({"path": "afile/x.db"}, [], "sqlite.path"),
        ({"path": "adir"}, [], "sqlite.path"),
        ({"path": "notdb.db"}, [], "sqlite.path"),
        ({"path": "x.db"}, ["--token-file", "/nonexistent/token"], "auth.tokenFile"),
        ({"path": "x.db"}, ["--port", "99999"], "listen.port"),
    ],
    ids=["under-a-file", "a-directory", "not-a-database", "token-file-missing", "port"],
)
def test_start_up_problems_exit_2_naming_the_store_and_field(
    tmp_path: Path, config: dict[str, str], args: list[str], field: str
) -> None:
    (tmp_path / "afile").touch()
    (tmp_path / "adir").mkdir()
    (tmp_path / "notdb.db").write_text("not a database")
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump({"stores": {"default": {"backend": "sqlite", "sqlite": config}}})
    )
    result = subprocess.run(
        sidecar_command("--config", str(path), *args),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert f"field '{field}'" in result.stderr
    assert "Traceback" not in result.stderr
    if field == "sqlite.path":
        assert "store 'default'" in result.stderr


def raw_exchange(port: int, request: bytes, then_close: bool = False) -> bytes:
    """Send bytes as a client would, and read the answer (or leave mid-request)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        if then_close:
            return b""
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer:
                head, _, rest = answer.partition(b"\r\n\r\n")
                length = [
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                ]
                if length and len(rest) >= length[0]:
                    return answer
        return answer


def test_oversized_ids_and_clients_that_leave_get_answers_not_tracebacks(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump({"stores": {"default": {"backend": "sqlite", "sqlite": {"path": "x.db"}}}})
    )
    port = free_port()
    log = tmp_path / "log"
    with log.open("w") as out:
        process = subprocess.Popen(
            sidecar_command("--config", str(config), "--port", str(port)),
            cwd=tmp_path,
            stderr=out,
        )
    try:
        deadline = time.monotonic() + 30
        while "serving" not in log.read_text():
            assert time.monotonic() < deadline, "the sidecar did not start"
            time.sleep(0.05)
        items = b"/v1/stores/default/sessions/"
        host = b"\r\nHost: sidecar"
        long_id = raw_exchange(
            port, b"GET " + items + b"x" * 10000 + b"/items HTTP/1.1" + host + b"\r\n\r\n"
        )
        assert long_id.startswith(b"HTTP/1.1 400")
        assert b'"code":"invalid_session_id"' in long_id
        body = b'{"items":[{}]}'
        for length in (LONGEST_HEADER - 100, LONGEST_HEADER + 1):
            long_key = raw_exchange(
                port,
                b"POST " + items + b"s/items HTTP/1.1" + host + b"\r\nContent-Type: "
                b"application/json\r\nContent-Length: %d\r\nIdempotency-Key: %s\r\n\r\n%s"
                % (len(body), b"k" * length, body),
            )
            if length < LONGEST_HEADER:
                assert b'"code":"invalid_idempotency_key"' in long_key
            else:  # past what any header may hold before the token is checked
                assert long_key[:12] in (b"HTTP/1.1 400", b"HTTP/1.0 400")
        huge = raw_exchange(port, b"GET /" + b"x" * 100000 + b" HTTP/1.1" + host + b"\r\n\r\n")
        assert huge.startswith(b"HTTP/1.1 400") or huge.startswith(b"HTTP/1.0 400")
        raw_exchange(
            port,
            b"POST " + items + b"s/items HTTP/1.1" + host + b"\r\nContent-Type: application/json"
            b'\r\nContent-Length: 1000\r\n\r\n{"items": [',
            then_close=True,
        )
        deadline = time.monotonic() + 10
        while "client left" not in log.read_text():
            assert time.monotonic() < deadline, "the departure was not noticed"
            time.sleep(0.05)
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
    said = log.read_text()
    assert "Traceback" not in said
    assert " ERROR " not in said
