"""Private Redis, PostgreSQL and MariaDB servers for tests, on free loopback ports.

Tests own these servers, so they can stop and restart them to test outages. Both keep
their data on disk across a restart (Redis with an fsync-always append-only file). When
a binary is missing the tests that need it skip, unless CONVOSTORE_REQUIRE_SERVICES=1
(as in CI), where they fail: a skipped backend is not a tested backend.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK = ipaddress.ip_address("127.0.0.1")
PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def require(what: str) -> None:
    message = f"{what} is not available on this machine"
    if os.environ.get("CONVOSTORE_REQUIRE_SERVICES") == "1":
        pytest.fail(message + " and CONVOSTORE_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(message)


PORT_ATTEMPTS = 3
CLUSTER_CREATE_ATTEMPTS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def _serving(port: int, process: subprocess.Popen[bytes], timeout: float = 20.0) -> bool:
    """True once `port` accepts connections; False if the process exited first (it could
    not bind: a port that `free_port` handed out was taken before the server bound it,
    by another server or by a client connection's ephemeral port)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        require("redis-server")
    return str(binary)


def redis_cli() -> str:
    binary = shutil.which("redis-cli")
    if binary is None:
        require("redis-cli")
    return str(binary)


class RedisServer:
    def __init__(self, *extra: str) -> None:
        self.extra = extra
        self.binary = redis_binary()
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="convostore-redis-")
        self.process: subprocess.Popen[bytes] | None = None
        self.started = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """A first start whose ports were taken meanwhile tries fresh ones; a restart
        keeps its port (a cluster knows its nodes by it)."""
        for _ in range(PORT_ATTEMPTS):
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    self.dir,
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                    *self.extra,
                ],
                stdout=subprocess.DEVNULL,
            )
            if _serving(self.port, self.process):
                self.started = True
                return
            if self.started:
                break
            self._renumber()
        raise RuntimeError(f"redis-server exited instead of listening on port {self.port}")

    def _renumber(self) -> None:
        """New ports: its own (also as `--tls-port`) and its cluster bus port."""
        old, self.port = self.port, free_port()
        extra = list(self.extra)
        for index, flag in enumerate(extra[:-1]):
            if flag == "--tls-port" and extra[index + 1] == str(old):
                extra[index + 1] = str(self.port)
            elif flag == "--cluster-port":
                extra[index + 1] = str(free_port())
        self.extra = tuple(extra)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)
            self.process = None

    def kill(self) -> None:
        """The server dies at once, as in a crash of its machine's process."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=20)
            self.process = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisSentinel(RedisServer):
    """A Redis Sentinel (`redis-server --sentinel`) watching one primary as `service`.

    It fails the primary over after `down_after_ms` without an answer; the config file
    is its own (a Sentinel rewrites it as it learns the topology)."""

    def __init__(self, primary: RedisServer, service: str, down_after_ms: int = 1000) -> None:
        super().__init__()
        self.config = Path(self.dir) / "sentinel.conf"
        self.config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {service} 127.0.0.1 {primary.port} 2\n"
            f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
            f"sentinel failover-timeout {service} 10000\n"
            f"sentinel parallel-syncs {service} 1\n"
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, str(self.config), "--sentinel"], stdout=subprocess.DEVNULL
        )
        wait_for_port(self.port)


@dataclass(frozen=True)
class TlsFiles:
    """A CA and a certificate for 127.0.0.1 signed by it, good for both ends of a
    connection: Redis nodes present theirs to each other on the cluster bus."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def issue(cls, directory: Path) -> TlsFiles:
        now = datetime.datetime.now(datetime.UTC)
        ca_key, key = (
            ec.generate_private_key(ec.SECP256R1()),
            ec.generate_private_key(ec.SECP256R1()),
        )
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "convostore test CA")])
        ca = (
            _certificate(ca_name, ca_name, ca_key.public_key(), now)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        cert = (
            _certificate(name, ca_name, key.public_key(), now)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(LOOPBACK)]), False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        files = cls(directory / "ca.crt", directory / "node.crt", directory / "node.key")
        files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return files


def _certificate(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePublicKey, now: datetime.datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


class RedisClusterNodes:
    """A Redis Cluster on loopback ports: `primaries` primaries, one replica each, made
    by `redis-cli --cluster create`. A node that stops answering for `node_timeout_ms`
    is failed over to its replica.

    With `tls`, every node speaks only TLS (clients, replication and the cluster bus);
    `extra` goes to every node (an ACL `--user`, say)."""

    def __init__(
        self,
        primaries: int = 3,
        node_timeout_ms: int = 2000,
        appendfsync: str = "no",
        tls: TlsFiles | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.primaries = primaries
        self.options = (
            *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
            *("--cluster-node-timeout", str(node_timeout_ms), "--appendfsync", appendfsync),
            *extra,
        )
        self.tls = tls
        self.nodes = self._fresh_nodes()

    def _fresh_nodes(self) -> list[RedisServer]:
        nodes = [
            # the bus port is named: by default it is port + 10000, past 65535 for some
            RedisServer("--cluster-port", str(free_port()), *self.options)
            for _ in range(self.primaries * 2)
        ]
        if self.tls is not None:
            tls = self.tls
            for node in nodes:
                node.extra = (*node.extra, "--port", "0", "--tls-port", str(node.port))
                node.extra += ("--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key))
                node.extra += ("--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "no")
                node.extra += ("--tls-replication", "yes", "--tls-cluster", "yes")
        return nodes

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{node.port}" for node in self.nodes]

    def cli(self, port: int, *args: str) -> list[str]:
        """`redis-cli` with `args`, for the node at `port`."""
        tls = () if self.tls is None else ("--tls", "--cacert", str(self.tls.ca))
        return [redis_cli(), *tls, "-p", str(port), *args]

    def node(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def start(self) -> None:
        """`--cluster create` can fail on a loaded machine (a replica told to follow a
        primary it has not met yet, nodes that do not agree when it checks): the nodes
        it half-configured are thrown away and fresh ones tried."""
        failures = []
        for _ in range(CLUSTER_CREATE_ATTEMPTS):
            for node in self.nodes:
                node.start()
            create = self.cli(self.nodes[0].port, "--cluster", "create", *self.addresses)
            created = subprocess.run(
                [*create, "--cluster-replicas", "1", "--cluster-yes"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if created.returncode == 0:
                break
            failures.append(created.stdout[-2000:] + created.stderr[-2000:])
            self.destroy()
            self.nodes = self._fresh_nodes()
        else:
            raise RuntimeError("redis-cli --cluster create failed:\n" + "\n---\n".join(failures))
        deadline = time.monotonic() + 30
        while not all(self._ready(node.port) for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster's nodes did not agree within 30 s")
            time.sleep(0.1)

    def _ready(self, port: int) -> bool:
        """The node sees the cluster whole and, if it is a replica, has its primary's
        data (a replica that never synced is not allowed to take over)."""
        fields = {}
        for section in (("cluster", "info"), ("info", "replication")):
            info = subprocess.run(
                self.cli(port, *section), capture_output=True, text=True, timeout=10
            ).stdout
            for line in info.splitlines():
                name, _, value = line.strip().partition(":")
                fields[name] = value
        synced = fields.get("role") == "master" or fields.get("master_link_status") == "up"
        return fields.get("cluster_state") == "ok" and synced

    def destroy(self) -> None:
        for node in self.nodes:
            node.destroy()


class PostgresServer:
    """A throw-away cluster made with initdb; as root, it runs as the postgres user."""

    def __init__(
        self, tls: tuple[bytes, bytes] | None = None, standby_of: PostgresServer | None = None
    ) -> None:
        """`tls`: a PEM certificate and key; the server then offers TLS with them.
        `standby_of`: a running server, copied with pg_basebackup into a streaming standby
        of it (`-R`: it starts in recovery, following that server)."""
        bins = [d for d in PG_BIN_DIRS if (d / "initdb").exists()]
        if not bins and not shutil.which("initdb"):
            require("PostgreSQL (initdb)")
        self.bin = bins[0] if bins else Path(str(shutil.which("initdb"))).parent
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="convostore-pg-"))
        self.data = self.dir / "data"
        self._as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as_user:
            shutil.chown(self.dir, "postgres", "postgres")
        if standby_of is None:
            self._run(
                "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"
            )
        else:
            self._run(
                "pg_basebackup",
                "-D",
                str(self.data),
                "-R",
                "--checkpoint=fast",  # else it waits for the primary's next checkpoint
                "-X",
                "stream",
                "-h",
                "127.0.0.1",
                "-p",
                str(standby_of.port),
                "-U",
                "postgres",
            )
        self.options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        if tls is not None:
            for name, pem in zip(("server.crt", "server.key"), tls, strict=True):
                (self.dir / name).write_bytes(pem)
                (self.dir / name).chmod(0o600)
                if self._as_user:
                    shutil.chown(self.dir / name, "postgres", "postgres")
            self.options += (
                f" -c ssl=on -c ssl_cert_file={self.dir / 'server.crt'}"
                f" -c ssl_key_file={self.dir / 'server.key'}"
            )

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self._as_user, str(self.bin / tool), *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def start(self) -> None:
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            self.options,
            "-l",
            str(self.dir / "log"),
            "-w",
            "start",
        )
        wait_for_port(self.port)

    def stop(self, mode: str = "fast") -> None:
        """`fast` disconnects clients and shuts down cleanly; `immediate` kills the server
        as a crash would."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def promote(self) -> None:
        """A standby becomes a primary that accepts writes (returns once it does)."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "promote")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PgBouncer:
    """PgBouncer in transaction mode in front of a PostgreSQL server, set up as
    CloudNativePG's `Pooler` ships it: `pool_mode = transaction` and only
    `extra_float_digits` and `options` among the startup parameters it ignores. Each
    transaction may run on another server connection, so no session state lasts."""

    def __init__(self, upstream: tuple[str, int], pool_size: int = 10) -> None:
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not Path(binary).exists():
            require("PgBouncer")
        self.binary, self.upstream, self.pool_size = binary, upstream, pool_size
        self.dir = Path(tempfile.mkdtemp(prefix="convostore-pgbouncer-"))
        self._as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as_user:  # PgBouncer will not run as root
            shutil.chown(self.dir, "postgres", "postgres")
        (self.dir / "users.txt").write_text('"postgres" ""\n')
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _config(self) -> Path:
        path = self.dir / "pgbouncer.ini"
        path.write_text(
            "[databases]\n"
            f"* = host={self.upstream[0]} port={self.upstream[1]}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.dir / 'users.txt'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\nmax_client_conn = 2000\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            f"logfile = {self.dir / 'log'}\npidfile = {self.dir / 'pid'}\n"
        )
        return path

    def start(self) -> None:
        for _ in range(PORT_ATTEMPTS):
            self.port = free_port()
            self.process = subprocess.Popen(
                [*self._as_user, self.binary, str(self._config())],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if _serving(self.port, self.process):
                return
        raise RuntimeError(f"PgBouncer did not start: {(self.dir / 'log').read_text()}")

    def point_at(self, upstream: tuple[str, int]) -> None:
        """Send new server connections to another PostgreSQL (as a Service that follows
        the primary does after a failover): the config is rewritten and reloaded."""
        assert self.process is not None
        self.upstream = upstream
        self._config()
        os.kill(int((self.dir / "pid").read_text()), signal.SIGHUP)  # not runuser's pid

    def destroy(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


INSTALL = ("--auth-root-authentication-method=normal", "--skip-test-db")
MARIADB_SETTINGS = (
    "--innodb-buffer-pool-size=32M",
    "--innodb-flush-log-at-trx-commit=2",
    "--max-connections=500",
)


class MariaDbServer:
    """A throw-away MariaDB made with mariadb-install-db (Debian's MariaDB 10.11), its
    root user reachable over loopback TCP without a password. InnoDB writes its log at
    every commit (a killed server loses no acknowledged write) without syncing it to
    disk, as the PostgreSQL servers here run with `fsync=off`."""

    def __init__(self) -> None:
        self.binary = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
        installer = shutil.which("mariadb-install-db") or "/usr/bin/mariadb-install-db"
        if not Path(self.binary).exists() or not Path(installer).exists():
            require("MariaDB (mariadbd)")
        self.dir = Path(tempfile.mkdtemp(prefix="convostore-mariadb-"))
        self.data = self.dir / "data"
        self._user = ["--user=root"] if os.geteuid() == 0 else []
        subprocess.run(
            [installer, "--no-defaults", f"--datadir={self.data}", *self._user, *INSTALL],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.dir / "socket"

    def url(self, database: str = "convostore", user: str = "root") -> str:
        return f"mysql+asyncmy://{user}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        fixed = self.port
        for _ in range(PORT_ATTEMPTS):
            self.port = fixed or free_port()
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--no-defaults",
                    f"--datadir={self.data}",
                    *self._user,
                    f"--port={self.port}",
                    "--bind-address=127.0.0.1",
                    f"--socket={self.socket}",
                    f"--pid-file={self.dir / 'pid'}",
                    f"--log-error={self.dir / 'log'}",
                    *MARIADB_SETTINGS,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if _serving(self.port, self.process, timeout=60):
                self.sql("CREATE DATABASE IF NOT EXISTS convostore")
                return
        raise RuntimeError(f"MariaDB did not start: {(self.dir / 'log').read_text()}")

    def sql(self, statement: str) -> str:
        """Run SQL as root over the server's socket; what it printed."""
        client = shutil.which("mariadb") or "/usr/bin/mariadb"
        done = subprocess.run(
            [client, "--no-defaults", f"--socket={self.socket}", "-uroot", "-N", "-e", statement],
            check=True,
            capture_output=True,
            text=True,
        )
        return done.stdout

    def stop(self, kill: bool = False) -> None:
        """A clean shutdown, or with `kill` the process killed as a crash would."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.process.wait(timeout=60)
            self.process = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
