"""A pod's network and PID namespace for one operator replica, without a container engine.

`python -m tests.operator.sandbox --dir D --api-socket S -- convostore operator run ...`,
started under `unshare --net --pid --fork`, runs as PID 1 of a fresh PID namespace with
its own loopback, as a container's entrypoint does: it brings `lo` up, forks a relay
(the API server's unix socket S reachable as 127.0.0.1:6443 inside; the replica's ports
8080 and 9443 reachable from outside as D/8080.sock and D/9443.sock), then becomes the
command by `exec`, so the command is PID 1 and receives SIGTERM as the kubelet sends it.
Each replica then binds the chart's fixed ports on a loopback of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

API_PORT = 6443
EXPOSED_PORTS = (8080, 9443)
Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


def loopback_up() -> None:
    """`ip link set lo up`, without needing iproute2."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH", b"lo", 0).ljust(40, b"\0")
        flags = struct.unpack("16sH", fcntl.ioctl(sock, siocgifflags, request)[:18])[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH", b"lo", flags | iff_up).ljust(40, b"\0"))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


def relay_to(open_peer: Opener) -> Callable[..., Awaitable[None]]:
    """A connection handler that joins each accepted connection to a new peer connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer_reader, peer_writer = await open_peer()
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, peer_writer), _pipe(peer_reader, writer))

    return handle


async def relay_unix_to_tcp(path: Path, host: str, port: int) -> asyncio.Server:
    return await asyncio.start_unix_server(
        relay_to(lambda: asyncio.open_connection(host, port)), str(path)
    )


async def relay_tcp_to_unix(host: str, port: int, path: Path) -> asyncio.Server:
    return await asyncio.start_server(
        relay_to(lambda: asyncio.open_unix_connection(str(path))), host, port
    )


async def _relays(directory: Path, api_socket: Path, ready: int) -> None:
    servers = [await relay_tcp_to_unix("127.0.0.1", API_PORT, api_socket)]
    for port in EXPOSED_PORTS:
        servers.append(await relay_unix_to_tcp(directory / f"{port}.sock", "127.0.0.1", port))
    os.write(ready, b"1")
    os.close(ready)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--api-socket", type=Path, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    loopback_up()
    ready_read, ready_write = os.pipe()
    if os.fork() == 0:
        os.close(ready_read)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_relays(args.dir, args.api_socket, ready_write))
        os._exit(0)
    os.close(ready_write)
    if os.read(ready_read, 1) != b"1":
        raise SystemExit("the sandbox's relays did not start")
    os.close(ready_read)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
