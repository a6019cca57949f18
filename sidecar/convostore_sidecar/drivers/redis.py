"""Redis driver: a list and a sequence counter per session, changed only by Lua scripts.

Keys of one session share a hash tag, `<prefix>:{<session id>}:...`, so they live in one
Redis Cluster slot and a script may touch them all atomically. An append pushes the
batch, bumps the sequence, trims to `maxItems`, refreshes the TTL and records the
idempotency key in one script; no other client can observe half of it. The latest N
items are `LRANGE -N -1`, which Redis serves from the list's tail without walking it.

Structure lives beside each branch's item list (`items`, and `items@<branch>` for the
others), under the same hash tag: a parallel `meta` list (`turn<TAB>kind<TAB>tool<TAB>time`
per item), the user messages by position in a hash with their turns in a sorted set
(so a branch's turns are read without its other items), usage per branch and turn in
one hash per session (`<branch><TAB><turn>`, so a session's usage is one read), and
the count of items trimmed from the head (a position minus it is a list index), and
the items compaction replaced (`archive`). A compaction's summary takes the ids of the
first items it replaces and the trimmed count grows by what it saved, so every other
item keeps its position. The
`branches` hash reserves every branch id ever used. The scripts build these key names
from the session's base key, so they all stay in the session's slot, and are given
every one of them as KEYS: on a Redis Cluster, a slot in migration is then refused
(TRYAGAIN) while a session's keys are split between two nodes, instead of written on
one of them beside keys still on the other.

Session ids are also kept in one sorted set per store (all scores 0, so ordered by
bytes) for paged listing. It lives outside the session's slot, so it is updated after
the script, and only when the script reports that the append started the session; an
id whose session has expired is pruned from it when a listing meets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    ConnectionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    TimeoutError,
    TryAgainError,
    WatchError,
)

from .base import (
    MAIN,
    AppendResult,
    BackendUnavailable,
    BranchIdUsed,
    BranchInfo,
    BranchNotFound,
    Cause,
    Check,
    Idempotency,
    Items,
    ItemShape,
    KeepsStructure,
    Meta,
    Sealed,
    Transform,
    TurnNotFound,
    TurnUsage,
    Usage,
    UserTurn,
    replay_of,
    scoped_prefix,
    stored,
    stored_at,
)

if TYPE_CHECKING:
    from ..config import StoreConfig
    from ..sections import Section

T = TypeVar("T")

COMMON = """
local base = KEYS[1]
local usage = base .. ':usage'
local function keys_of(sfx)
  return base .. ':items' .. sfx, base .. ':meta' .. sfx, base .. ':users' .. sfx,
         base .. ':turns' .. sfx, base .. ':trim' .. sfx, base .. ':archive' .. sfx
end
local function usage_field(sfx, turn)
  return (sfx == '' and 'main' or string.sub(sfx, 2)) .. '\t' .. turn
end
local function live(sfx)
  return sfx == '' or redis.call('HGET', base .. ':branches', string.sub(sfx, 2)) == '1'
end
local function field(entry, n)
  local i = 0
  for part in string.gmatch(entry, '([^\t]*)\t?') do
    i = i + 1
    if i == n then return part end
  end
end
local function turn_of(entry) return tonumber(string.match(entry, '^(%d+)')) end
local function id_of(entry) return tonumber(string.match(entry, '(%d+)$')) end
local function touch(ttl_ms)
  if ttl_ms <= 0 then return end
  local sfxs = {''}
  for _, b in ipairs(redis.call('HKEYS', base .. ':branches')) do sfxs[#sfxs + 1] = '@' .. b end
  for _, sfx in ipairs(sfxs) do
    for _, key in ipairs({keys_of(sfx)}) do redis.call('PEXPIRE', key, ttl_ms) end
  end
  for _, key in ipairs({base .. ':seq', base .. ':ids', base .. ':branches', usage}) do
    redis.call('PEXPIRE', key, ttl_ms)
  end
end
-- the id of the turn's first item: its user message, or the branch's first item for turn 0
local function turn_start(sfx, turn)
  local items, meta, users, turns = keys_of(sfx)
  if turn == 0 then
    local first = redis.call('LINDEX', meta, 0)
    return first and turn_of(first) == 0 and id_of(first) or false
  end
  local found = redis.call('ZRANGEBYSCORE', turns, turn, turn)
  return found[1] and tonumber(found[1]) or false
end
-- every key a script may touch is declared, each branch's too, so that during a slot
-- migration Redis sees them all (TRYAGAIN while they are split, never a write beside
-- keys still on the other node); a branch the caller did not know of: it asks again
local function undeclared()
  local declared = {}
  for _, key in ipairs(KEYS) do declared[key] = true end
  for _, b in ipairs(redis.call('HKEYS', base .. ':branches')) do
    if not declared[base .. ':items@' .. b] then return true end
  end
  return false
end
local function forget(users, turns, shapes)
  for _, entry in ipairs(shapes) do
    local id = id_of(entry)
    redis.call('HDEL', users, id)
    redis.call('ZREM', turns, id)
  end
end
"""

APPEND = (
    COMMON
    + """
if undeclared() then return {5} end
local sfx, use_idem, fingerprint = ARGV[1], ARGV[2] == '1', ARGV[3]
local idem_ms, ttl_ms, max_items = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local now, n = ARGV[7], tonumber(ARGV[8])
local expected = tonumber(ARGV[9 + 2 * n])
if use_idem then
  local seen = redis.call('GET', KEYS[2])
  if seen then return {0, seen} end
end
if not live(sfx) then return {2} end
if expected >= 0 and tonumber(redis.call('GET', base .. ':ids') or '0') ~= expected then
  return {3}
end
local items, meta, users, turns, trim = keys_of(sfx)
local pos = tonumber(redis.call('GET', trim) or '0') + redis.call('LLEN', items)
local id = redis.call('INCRBY', base .. ':ids', n) - n
local last = redis.call('LINDEX', meta, -1)
local turn = last and turn_of(last) or 0
local anchor = false
for i = 1, n do
  local data, shape = ARGV[8 + i], ARGV[8 + n + i]
  id = id + 1
  if string.sub(shape, 1, 5) == 'user\t' then
    turn, anchor = turn + 1, id
    redis.call('HSET', users, id, pos .. '\t' .. now .. '\t' .. data)
    redis.call('ZADD', turns, turn, id)
  end
  redis.call('RPUSH', items, data)
  redis.call('RPUSH', meta, turn .. '\t' .. shape .. '\t' .. now .. '\t' .. id)
  pos = pos + 1
end
if max_items > 0 then
  local excess = redis.call('LLEN', items) - max_items
  if excess > 0 then
    forget(users, turns, redis.call('LRANGE', meta, 0, excess - 1))
    redis.call('LTRIM', items, excess, -1)
    redis.call('LTRIM', meta, excess, -1)
    redis.call('INCRBY', trim, excess)
  end
end
local total = redis.call('INCRBY', base .. ':seq', n)
touch(ttl_ms)
if use_idem then redis.call('SET', KEYS[2], fingerprint .. ' ' .. n, 'PX', idem_ms) end
if not anchor then anchor = turn_start(sfx, turn) end
return {1, total == n and 1 or 0, turn, anchor}
"""
)

POP = (
    COMMON
    + """
if undeclared() then return {5} end
local sfx, ttl_ms, expect, expected = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
if not live(sfx) then return {2} end
local items, meta, users, turns = keys_of(sfx)
if expect ~= 'any' then
  local newest = redis.call('LINDEX', items, -1)
  if (expect == 'none') ~= (newest == false) or (newest and newest ~= expected) then
    return {6}
  end
end
local data = redis.call('RPOP', items)
if not data then return {1} end
local entry = redis.call('RPOP', meta)
forget(users, turns, {entry})
local newest = redis.call('LINDEX', meta, -1)
if not newest or turn_of(newest) ~= turn_of(entry) then
  redis.call('HDEL', usage, usage_field(sfx, turn_of(entry)))
end
touch(ttl_ms)
return {1, data}
"""
)

CREATE_BRANCH = (
    COMMON
    + """
if undeclared() then return {5} end
local source, new, turn = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now, ttl_ms = ARGV[4], tonumber(ARGV[5])
if not live(source) then return {2} end
local items, meta, users, turns, trim = keys_of(source)
local start = redis.call('ZRANGEBYSCORE', turns, turn, turn)[1]
if not start then return {3} end
if new == 'main' or redis.call('HEXISTS', base .. ':branches', new) == 1 then return {4} end
local to_items, to_meta, to_users, to_turns = keys_of('@' .. new)
local first = tonumber(redis.call('GET', trim) or '0')
local count = tonumber(field(redis.call('HGET', users, start), 1)) - first
for offset = 0, count - 1, 1000 do
  local stop = math.min(offset + 999, count - 1)
  redis.call('RPUSH', to_items, unpack(redis.call('LRANGE', items, offset, stop)))
  local shapes = redis.call('LRANGE', meta, offset, stop)
  for i, entry in ipairs(shapes) do
    shapes[i] = table.concat({field(entry, 1), field(entry, 2), field(entry, 3), now,
                              field(entry, 5)}, '\t')
  end
  redis.call('RPUSH', to_meta, unpack(shapes))
end
local before = redis.call('ZRANGEBYSCORE', turns, '-inf', '(' .. turn, 'WITHSCORES')
for i = 1, #before, 2 do
  local id = before[i]
  local user = redis.call('HGET', users, id)
  local data = string.match(user, '^[^\t]*\t[^\t]*\t(.*)$')
  local position = tonumber(field(user, 1)) - first
  redis.call('HSET', to_users, id, position .. '\t' .. now .. '\t' .. data)
  redis.call('ZADD', to_turns, before[i + 1], id)
end
redis.call('HSET', base .. ':branches', new, '1')
touch(ttl_ms)
return {1}
"""
)

DELETE_BRANCH = (
    COMMON
    + """
if undeclared() then return {5} end
local sfx = ARGV[1]
if not live(sfx) then return {2} end
redis.call('DEL', keys_of(sfx))
local prefix = usage_field(sfx, '')
for _, f in ipairs(redis.call('HKEYS', usage)) do
  if string.sub(f, 1, #prefix) == prefix then redis.call('HDEL', usage, f) end
end
redis.call('HSET', base .. ':branches', string.sub(sfx, 2), '0')
return {1}
"""
)

CLEAR = (
    COMMON
    + """
if undeclared() then return {5} end
redis.call('DEL', base .. ':seq', usage, keys_of(''))
for _, b in ipairs(redis.call('HKEYS', base .. ':branches')) do
  redis.call('DEL', keys_of('@' .. b))
  redis.call('HSET', base .. ':branches', b, '0')
end
return {1}
"""
)

COMPACT = (
    COMMON
    + """
if undeclared() then return {5} end
local sfx, ttl_ms, now = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local n, k = tonumber(ARGV[4]), tonumber(ARGV[5])
if not live(sfx) then return {2} end
local items, meta, users, turns, trim, archive = keys_of(sfx)
local current = redis.call('LRANGE', items, 0, n - 1)
local shapes = redis.call('LRANGE', meta, 0, n - 1)
if #current ~= n then return {3} end
for i = 1, n do
  if current[i] ~= ARGV[5 + i] then return {3} end
end
for i = 1, k do
  if tostring(id_of(shapes[i])) ~= ARGV[5 + n + k + i] then return {3} end
end
local head = 0
while head < n and field(shapes[head + 1], 2) == 'compacted' do head = head + 1 end
for i = head + 1, n do redis.call('RPUSH', archive, current[i]) end
forget(users, turns, shapes)
redis.call('LTRIM', items, n, -1)
redis.call('LTRIM', meta, n, -1)
redis.call('INCRBY', trim, n - k)
local turn = turn_of(shapes[n])
for i = k, 1, -1 do
  redis.call('LPUSH', items, ARGV[5 + n + i])
  redis.call('LPUSH', meta, turn .. '\tcompacted\t\t' .. now .. '\t' .. id_of(shapes[i]))
end
touch(ttl_ms)
return {1}
"""
)

READ = """
local limit, most = tonumber(ARGV[1]), tonumber(ARGV[2])
local out, total = {}, 0
local function full()
  return (limit >= 0 and #out >= limit) or (most >= 0 and total > most)
end
local function take(key, meta)
  local stop, size = -1, 16
  if limit >= 0 then size = math.min(size, limit - #out) end
  while not full() do
    local first = stop - size + 1
    local page = redis.call('LRANGE', key, first, stop)
    local shapes = meta and redis.call('LRANGE', meta, first, stop)
    for i = #page, 1, -1 do
      if not (shapes and string.match(shapes[i], '^[^\t]*\t([^\t]*)') == 'compacted') then
        out[#out + 1] = page[i]
        total = total + #page[i]
        if full() then return end
      end
    end
    if #page < size then return end
    stop = first - 1
    size = 1024
    if most >= 0 and total > 0 then
      size = math.max(16, math.min(size, math.floor((most - total) * #out / total) + 1))
    end
    if limit >= 0 then size = math.min(size, limit - #out) end
  end
end
take(KEYS[1], KEYS[2])
if KEYS[3] then take(KEYS[3]) end
local n = #out
for i = 1, math.floor(n / 2) do out[i], out[n + 1 - i] = out[n + 1 - i], out[i] end
return out
"""
"""Items newest first from a branch (KEYS[1], skipping those a compaction wrote when its
meta is KEYS[2]) and then from its archive (KEYS[3]), up to ARGV[1] items (-1: all) and
past ARGV[2] bytes (-1: no cap) by one item (see `latest`), returned oldest first. Pages
grow to what the byte cap leaves, so large items never fill a page of their own."""

RECORD_USAGE = (
    COMMON
    + """
if undeclared() then return {5} end
local sfx, turn, anchor = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local usage_json, ttl_ms = ARGV[4], tonumber(ARGV[5])
if not live(sfx) then return {2} end
local items, meta, users, turns = keys_of(sfx)
if not turn then
  local newest = redis.call('LINDEX', meta, -1)
  if not newest then return {1} end
  turn = turn_of(newest)
  anchor = turn_start(sfx, turn)
elseif turn == 0 then
  if turn_start(sfx, 0) ~= anchor then anchor = false end
elseif tonumber(redis.call('ZSCORE', turns, anchor)) ~= turn then
  anchor = false
end
if not anchor then return {1} end
redis.call('HSET', usage, usage_field(sfx, turn), usage_json)
touch(ttl_ms)
return {1, turn}
"""
)

_UNAVAILABLE = (ConnectionError, TimeoutError, BusyLoadingError, OSError)
_RESHAPING = (ClusterError, TryAgainError, AskError, RedisClusterException)
"""A cluster failing over or moving slots, for longer than the client follows it, or
none of its nodes reachable (redis-py's own exception, not a RedisError)."""
OPTIMISTIC_ATTEMPTS = 50
UNDECLARED = 5
"""What a script answers when the session has a branch whose keys were not declared."""
NEWER_ARRIVED = 6
"""What the pop script answers when the newest item is no longer the one checked."""
KNOWN_BRANCHES_KEPT = 4096
SESSION_KEYS = ("seq", "ids", "branches", "usage")
BRANCH_KEYS = ("items", "meta", "users", "turns", "trim", "archive")


@dataclass(frozen=True)
class Settings:
    url: str = "redis://127.0.0.1:6379/0"
    username: str | None = None
    password_file: str | None = None
    key_prefix: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    connect_timeout: float = 1.0
    timeout: float = 2.0
    max_connections: int = 64
    idle_timeout: float = 30.0
    """Connections are closed once the store has made no call for this long, so an idle
    sidecar holds none: in a fleet every pod's connections add up on the server."""
    wait_replicas: int = 0
    """Appends and clears are answered only once this many replicas hold them (WAIT)."""
    wait_timeout: float = 1.0
    sentinel: SentinelSettings | None = None
    """Where the primary is found when Sentinels watch it (instead of `url`)."""
    cluster: ClusterSettings | None = None
    """The seed nodes of a Redis Cluster (instead of `url`)."""

    @classmethod
    def parse(cls, s: Section) -> Settings:
        url = s.string("url", cls.url)
        if not url.startswith(("redis://", "rediss://", "unix://")):
            s.fail("url", "must start with redis://, rediss:// or unix://")
        prefix = s.string("keyPrefix")
        if prefix is not None and ("{" in prefix or "}" in prefix):
            s.fail("keyPrefix", "must not contain { or }: they would break the hash tags")
        sentinel = SentinelSettings.parse(s.section("sentinel")) if s.has("sentinel") else None
        cluster = ClusterSettings.parse(s.section("cluster")) if s.has("cluster") else None
        if sentinel is not None and s.has("url"):
            s.fail("sentinel", "give either url or sentinel: the Sentinels name the primary")
        if sentinel is not None and s.has("tls"):
            s.fail("tls", "TLS to Sentinel-watched servers is not supported yet")
        if cluster is not None and (s.has("url") or sentinel is not None):
            s.fail("cluster", "give one of url, sentinel and cluster")
        tls = s.section("tls")
        settings = cls(
            sentinel=sentinel,
            cluster=cluster,
            url=url,
            username=s.string("username"),
            password_file=s.string("passwordFile"),
            key_prefix=prefix,
            ca_file=tls.string("caFile"),
            cert_file=tls.string("certFile"),
            key_file=tls.string("keyFile"),
            connect_timeout=s.duration("connectTimeout", cls.connect_timeout, low=0.01, high=60),
            timeout=s.duration("timeout", cls.timeout, low=0.01, high=300),
            max_connections=s.integer("maxConnections", cls.max_connections, low=1, high=10_000),
            idle_timeout=s.duration("idleTimeout", cls.idle_timeout, low=0.1, high=86_400),
            wait_replicas=s.integer("waitReplicas", cls.wait_replicas, low=0, high=100),
            wait_timeout=s.duration("waitTimeout", cls.wait_timeout, low=0.001, high=300),
        )
        tls.done()
        if settings.wait_replicas and settings.wait_timeout >= settings.timeout:
            s.fail("waitTimeout", f"must be shorter than timeout ({settings.timeout:g}s)")
        if (settings.ca_file or settings.cert_file) and not settings.tls:
            s.fail("tls", "TLS files need a rediss:// url (or cluster.tls: true)")
        return settings

    @property
    def tls(self) -> bool:
        if self.cluster is not None:
            return self.cluster.tls
        return self.url.startswith("rediss://")


HOST_PORT = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+)):(?P<port>[0-9]{1,5})"
)
SERVICE_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")


@dataclass(frozen=True)
class SentinelSettings:
    hosts: tuple[tuple[str, int], ...]
    service_name: str
    database: int = 0
    username: str | None = None
    """For the Sentinels themselves; `redis.username` and `passwordFile` are the data
    nodes'."""
    password_file: str | None = None

    @classmethod
    def parse(cls, s: Section) -> SentinelSettings:
        parsed = _host_ports(s, "hosts", "Sentinels")
        service = s.string("serviceName", pattern=SERVICE_NAME)
        if service is None:
            s.fail("serviceName", "is required: the name the Sentinels monitor the primary by")
        settings = cls(
            hosts=parsed,
            service_name=service,
            database=s.integer("database", 0, low=0, high=10_000),
            username=s.string("username"),
            password_file=s.string("passwordFile"),
        )
        s.done()
        return settings


@dataclass(frozen=True)
class ClusterSettings:
    nodes: tuple[tuple[str, int], ...]
    """Where the client first asks for the cluster's layout; it learns the rest."""
    tls: bool = False

    @classmethod
    def parse(cls, s: Section) -> ClusterSettings:
        settings = cls(nodes=_host_ports(s, "nodes", "seed nodes"), tls=s.boolean("tls", False))
        s.done()
        return settings


def _host_ports(s: Section, name: str, what: str) -> tuple[tuple[str, int], ...]:
    entries = s.raw(name)
    if not isinstance(entries, list) or not 1 <= len(entries) <= 16:
        s.fail(name, f"must list 1 to 16 {what} as host:port, got {entries!r}")
    parsed = []
    for entry in entries:
        match = HOST_PORT.fullmatch(entry) if isinstance(entry, str) else None
        if match is None or not 0 < int(match["port"]) < 65536:
            s.fail(name, f"each must be host:port (a name, an IPv4 or [IPv6]), got {entry!r}")
        parsed.append((match["v6"] or match["host"], int(match["port"])))
    return tuple(parsed)


def _cluster(cluster: ClusterSettings, options: dict[str, Any]) -> RedisCluster:
    """redis-py's cluster client: it follows MOVED and ASK, waits out TRYAGAIN, and after
    a node fails asks the others for the layout again. A MOVED only moves its slot
    (`reinitialize_steps=0`): the default relearns the whole layout every fifth MOVED by
    closing every connection, those of calls still in flight included, and concurrent
    writers then fail with broken connections (seen with 16 of them)."""
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in cluster.nodes],
        ssl=cluster.tls,
        reinitialize_steps=0,
        **{**options, "retry": Retry(NoBackoff(), 1)},
    )


def open_driver(store: StoreConfig) -> RedisDriver:
    return RedisDriver(store)


class RedisDriver(KeepsStructure):
    def __init__(self, store: StoreConfig) -> None:
        settings: Settings = store.settings
        self.retention = store.retention
        self.prefix = scoped_prefix(settings.key_prefix, store, ":", "convostore:")
        options: dict[str, Any] = {
            "username": settings.username,
            "socket_connect_timeout": settings.connect_timeout,
            "socket_timeout": settings.timeout,
            "retry": Retry(NoBackoff(), 0),
            "max_connections": settings.max_connections,
        }
        if settings.password_file:
            options["password"] = Path(settings.password_file).read_text("utf-8").strip()
        if settings.tls:
            options.update(
                ssl_ca_certs=settings.ca_file,
                ssl_certfile=settings.cert_file,
                ssl_keyfile=settings.key_file,
            )
        self._sentinels: list[aioredis.Redis] = []
        self._cluster = None if settings.cluster is None else _cluster(settings.cluster, options)
        if self._cluster is not None:
            # the cluster client speaks the same commands as a plain one to this driver
            self.client: aioredis.Redis = cast(aioredis.Redis, self._cluster)
        elif settings.sentinel is not None:
            self.client = self._watched_primary(settings.sentinel, options)
        else:
            self.client = aioredis.Redis.from_url(settings.url, **options)
        self._known_branches: dict[str, tuple[str, ...]] = {}
        self._wait = (settings.wait_replicas, settings.wait_timeout)
        self._timeout = settings.timeout
        self._idle_timeout = settings.idle_timeout
        self._last_call = time.monotonic()
        self._idle_closer: asyncio.Task[None] | None = None
        self._append = self.client.register_script(APPEND)
        self._pop = self.client.register_script(POP)
        self._create_branch = self.client.register_script(CREATE_BRANCH)
        self._delete_branch = self.client.register_script(DELETE_BRANCH)
        self._clear = self.client.register_script(CLEAR)
        self._record_usage = self.client.register_script(RECORD_USAGE)
        self._compact = self.client.register_script(COMPACT)
        self._read = self.client.register_script(READ)
        self._index = f"{self.prefix}:sessions"

    def _watched_primary(
        self, sentinel: SentinelSettings, options: dict[str, Any]
    ) -> aioredis.Redis:
        """A client of whichever server the Sentinels name primary: each new connection
        asks them, and connections to a primary that was demoted are dropped (redis-py's
        Sentinel pool), so after a failover retried calls reach the new one."""
        own = {key: options[key] for key in ("socket_connect_timeout", "socket_timeout", "retry")}
        if sentinel.username:
            own["username"] = sentinel.username
        if sentinel.password_file:
            own["password"] = Path(sentinel.password_file).read_text("utf-8").strip()
        manager = Sentinel(  # type: ignore[no-untyped-call]
            list(sentinel.hosts), sentinel_kwargs=own, **options
        )
        self._sentinels = manager.sentinels
        return cast(aioredis.Redis, manager.master_for(sentinel.service_name, db=sentinel.database))

    def _declared(
        self, session_id: str, branches: Sequence[str], extra: Sequence[str]
    ) -> list[str]:
        """A script's KEYS: the session's name, then `extra`, then every key of the
        session, each branch's included (see `undeclared` in the scripts)."""
        base = self._base(session_id)
        keys = [base, *extra, *(f"{base}:{kind}" for kind in SESSION_KEYS)]
        for sfx in ("", *(f"@{name}" for name in branches)):
            keys.extend(f"{base}:{kind}{sfx}" for kind in BRANCH_KEYS)
        return keys

    async def _session_script(
        self,
        script: AsyncScript,
        session_id: str,
        args: Sequence[Any],
        *,
        extra: Sequence[str] = (),
    ) -> Any:
        """Runs a session's script with its keys declared for the branches this driver
        last saw there; when a branch it did not know has appeared, with them all."""
        branches = self._known_branches.get(session_id, ())
        for _ in range(OPTIMISTIC_ATTEMPTS):
            keys = self._declared(session_id, branches, extra)
            call = functools.partial(script, keys=keys, args=list(args), client=self.client)
            outcome = await self._through_migration(call)
            if outcome[0] != UNDECLARED:
                return outcome
            names = await self.client.hkeys(f"{self._base(session_id)}:branches")
            branches = tuple(sorted(name.decode() for name in cast(list[bytes], names)))
            if len(self._known_branches) >= KNOWN_BRANCHES_KEPT:
                self._known_branches.clear()
            self._known_branches[session_id] = branches
        raise BackendUnavailable(f"redis: session {session_id!r} changed too often to write")

    def keys(self, session_id: str) -> tuple[str, str]:
        base = f"{self.prefix}:{{{session_id}}}"
        return f"{base}:items", f"{base}:seq"

    def _ttl_ms(self) -> int:
        ttl = self.retention.ttl_seconds
        return int(ttl * 1000) if ttl else 0

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        self._last_call = time.monotonic()
        try:
            return await fn()
        except _UNAVAILABLE as exc:
            full = "max number of clients reached" in str(exc)
            cause = Cause.TOO_MANY_CONNECTIONS if full else Cause.UNAVAILABLE
            raise BackendUnavailable(f"redis: {exc}", cause) from exc
        except ReadOnlyError as exc:
            raise BackendUnavailable(f"redis: {exc}", Cause.READ_ONLY) from exc
        except OutOfMemoryError as exc:
            raise BackendUnavailable(f"redis: {exc}", Cause.OUT_OF_MEMORY) from exc
        except _RESHAPING as exc:
            raise BackendUnavailable(f"redis cluster: {type(exc).__name__}: {exc}") from exc

    async def open(self) -> None:
        """Nothing to prepare: the client connects on first use."""
        self._idle_closer = asyncio.create_task(self._close_when_idle())

    async def _close_when_idle(self) -> None:
        idle = self._idle_timeout
        while True:
            await asyncio.sleep(max(idle - (time.monotonic() - self._last_call), idle / 4))
            if time.monotonic() - self._last_call >= idle:
                with contextlib.suppress(*_UNAVAILABLE):  # a broken one is gone anyway
                    await self._close_free_connections()

    async def _close_free_connections(self) -> None:
        """The connections no call is using; a call after this connects again."""
        if self._cluster is not None:
            nodes = self._cluster.get_nodes()
            await asyncio.gather(*(node.disconnect_free_connections() for node in nodes))
        else:
            await self.client.connection_pool.disconnect(inuse_connections=False)

    async def close(self) -> None:
        if self._idle_closer is not None:
            self._idle_closer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._idle_closer
        await self.client.aclose()
        for sentinel in self._sentinels:
            await sentinel.aclose()

    async def ping(self) -> None:
        cluster = self._cluster
        if cluster is None:
            await self._call(self.client.ping)
            return
        info = await self._call(lambda: cluster.cluster_info(target_nodes=RedisCluster.RANDOM))
        if info.get("cluster_state") != "ok":
            raise BackendUnavailable(f"redis cluster: state is {info.get('cluster_state')!r}")

    def _base(self, session_id: str) -> str:
        return f"{self.prefix}:{{{session_id}}}"

    async def _through_migration(self, call: Callable[[], Awaitable[T]]) -> T:
        """Asks again, for up to `timeout`, while Redis refuses a call because its slot is
        moving: TRYAGAIN while the keys are split between two nodes, or redirections
        beyond redis-py's own limit. A refused call did not run, so asking again cannot
        apply a write twice. A slot moves in moments, but may hold more keys than
        redis-py's 0.4 s of asking covers."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        while True:
            try:
                return await call()
            except (TryAgainError, ClusterError) as exc:
                if isinstance(exc, ClusterDownError) or loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def _replicated(self, session_id: str, write: Callable[[], Awaitable[T]]) -> T:
        """Runs `write`; with `waitReplicas`, answers only once that many replicas hold
        it. Fewer in time: BackendUnavailable, and the client's retry, carrying the same
        Idempotency-Key, is a replay that waits again."""
        replicas, timeout = self._wait
        result = await write()
        if replicas:
            acknowledged = await self._replicas_holding(session_id)
            if acknowledged < replicas:
                raise BackendUnavailable(
                    f"redis: the write reached {acknowledged} of {replicas} replica(s) "
                    f"within waitTimeout ({timeout:g}s)",
                    Cause.OUTCOME_UNKNOWN,
                )
        return result

    async def _replicas_holding(self, session_id: str) -> int:
        """How many replicas hold the session's last write. WAIT counts only the writes
        of its own connection, and the write may have run on another one, or written
        nothing (the replay of an append, which must wait for the original all the
        same). So a marker is written in the session's slot and WAIT sent after it, on
        one connection to that slot's primary: the marker follows every earlier write
        of the session in the primary's replication stream."""
        replicas, timeout = self._wait
        marker, ms = f"{self._base(session_id)}:replicated", int(timeout * 1000)
        if self._cluster is None:
            async with self.client.pipeline(transaction=False) as pipe:  # one connection
                pipe.set(marker, b"", px=ms + 1000)
                pipe.wait(replicas, ms)
                return cast(int, (await pipe.execute())[1])
        sent = [
            PipelineCommand(0, "SET", marker, b"", "PX", ms + 1000),
            PipelineCommand(1, "WAIT", replicas, ms),
        ]
        primary = self._cluster.get_node_from_key(marker)
        if primary is None:
            raise BackendUnavailable("redis cluster: no primary serves the session's slot")
        await primary.execute_pipeline(sent)
        for command in sent:
            if isinstance(command.result, Exception):
                raise BackendUnavailable(
                    f"redis cluster: cannot wait for replicas: {command.result}"
                )
        return cast(int, sent[1].result)

    async def _script(self, script: AsyncScript, session_id: str, *args: Any) -> Any:
        return await self._call(lambda: self._session_script(script, session_id, args))

    async def append_to(
        self,
        session_id: str,
        branch: str,
        items: Items,
        meta: Sequence[Meta],
        idempotency: Idempotency | None,
    ) -> AppendResult:
        idem_key = f"{self._base(session_id)}:idem:" + (
            hashlib.sha256(idempotency.key.encode()).hexdigest()[:40] if idempotency else ""
        )
        head: list[Any] = [
            _suffix(branch),
            "1" if idempotency else "0",
            idempotency.fingerprint if idempotency else "",
            int(idempotency.ttl_seconds * 1000) if idempotency else 0,
            self._ttl_ms(),
            self.retention.max_items or 0,
            f"{time.time():.6f}",
            len(items),
        ]
        shapes = [f"{_clean(m.kind)}\t{_clean(m.tool or '')}" for m in meta]

        async def run() -> Any:
            """Sealed items are bound to their ids: read the id counter, seal, and append
            only if no other append took those ids meanwhile (else again)."""
            for attempt in range(OPTIMISTIC_ATTEMPTS):
                expected = -1
                if isinstance(items, Sealed):
                    if attempt:
                        await asyncio.sleep(random.uniform(0, 0.001 * min(attempt, 20)))
                    expected = int(await self.client.get(f"{self._base(session_id)}:ids") or 0)
                args = [*head, *stored(items, expected + 1), *shapes, expected]
                outcome = await self._session_script(
                    self._append, session_id, args, extra=[idem_key]
                )
                if outcome[0] != 3:
                    break
            else:
                raise BackendUnavailable(
                    f"redis: session {session_id!r} changed too often to append"
                )
            if outcome[0] == 1 and outcome[1] == 1:
                index = {session_id: 0}
                await self._through_migration(lambda: self.client.zadd(self._index, index))
            return outcome

        outcome = await self._call(lambda: self._replicated(session_id, run))
        if outcome[0] == 2:
            raise BranchNotFound(branch)
        if outcome[0] == 0:
            assert idempotency is not None
            fingerprint, _, count = outcome[1].decode().partition(" ")
            return replay_of(idempotency, fingerprint, int(count))
        return AppendResult(len(items), replayed=False, turn=outcome[2], anchor=outcome[3])

    async def latest_in(
        self, session_id: str, branch: str, limit: int | None, max_bytes: int | None = None
    ) -> list[bytes]:
        await self._require_branch(session_id, branch)
        items_key = f"{self._base(session_id)}:items{_suffix(branch)}"
        if max_bytes is None:
            start = 0 if limit is None else -limit
            return cast(
                list[bytes], await self._call(lambda: self.client.lrange(items_key, start, -1))
            )
        return await self._read_newest([items_key], limit, max_bytes)

    async def _read_newest(
        self, keys: list[str], limit: int | None, max_bytes: int | None
    ) -> list[bytes]:
        args = [-1 if limit is None else limit, -1 if max_bytes is None else max_bytes]
        read = functools.partial(self._read, keys=keys, args=args, client=self.client)
        return cast(list[bytes], await self._call(read))

    async def _require_branch(self, session_id: str, branch: str) -> None:
        if not await self.branch_exists(session_id, branch):
            raise BranchNotFound(branch)

    async def branch_exists(self, session_id: str, branch: str) -> bool:
        if branch == MAIN:
            return True
        key = f"{self._base(session_id)}:branches"
        live = await self._call(lambda: self.client.hget(key, branch))
        return live == b"1"

    async def pop_from(self, session_id: str, branch: str, check: Check | None) -> bytes | None:
        return await self._call(functools.partial(self._checked_pop, session_id, branch, check))

    async def _checked_pop(self, session_id: str, branch: str, check: Check | None) -> bytes | None:
        """Without a check one script pops. With one, the newest item is read and checked
        first, then popped by the script only if it is still the newest (else again)."""
        items_key = f"{self._base(session_id)}:items{_suffix(branch)}"
        for attempt in range(OPTIMISTIC_ATTEMPTS):
            if attempt:  # poppers that lost the race spread out instead of colliding again
                await asyncio.sleep(random.uniform(0, 0.001 * min(attempt, 20)))
            expect: list[Any] = ["any", ""]
            if check is not None:
                newest = cast(bytes | None, await self.client.lindex(items_key, -1))
                if newest is not None:
                    check(newest)
                expect = ["none", ""] if newest is None else ["item", newest]
            args = [_suffix(branch), self._ttl_ms(), *expect]
            outcome = await self._session_script(self._pop, session_id, args)
            if outcome[0] == NEWER_ARRIVED:
                continue
            if outcome[0] == 2:
                raise BranchNotFound(branch)
            return cast(bytes, outcome[1]) if len(outcome) > 1 else None
        raise BackendUnavailable(f"redis: session {session_id!r} changed too often to pop")

    async def clear(self, session_id: str) -> None:
        async def run() -> None:
            await self._session_script(self._clear, session_id, [])
            await self.client.zrem(self._index, session_id)

        await self._call(lambda: self._replicated(session_id, run))

    async def branches(self, session_id: str) -> list[BranchInfo]:
        base = self._base(session_id)
        names = await self._live_branches(base)

        async def read() -> list[Any]:
            async with self.client.pipeline(transaction=True) as pipe:
                for name in names:
                    sfx = _suffix(name)
                    pipe.llen(f"{base}:items{sfx}")
                    pipe.zcard(f"{base}:turns{sfx}")
                    pipe.lindex(f"{base}:meta{sfx}", 0)
                return await pipe.execute()

        counts = await self._call(read)
        found = []
        for index, name in enumerate(names):
            count, users, first = counts[index * 3 : index * 3 + 3]
            if count:
                found.append(BranchInfo(name, count, users, float(first.split(b"\t")[3])))
        return sorted(found, key=lambda b: (b.created_at, b.branch_id))

    async def _live_branches(self, base: str) -> list[str]:
        """`main` and every live branch, by id."""
        registry = await self._call(lambda: self.client.hgetall(f"{base}:branches"))
        return [MAIN, *_live(cast(dict[bytes, bytes], registry))]

    async def create_branch(self, session_id: str, source: str, turn: int, new: str) -> None:
        args = [_suffix(source), new, turn, f"{time.time():.6f}", self._ttl_ms()]
        new_keys = self._declared(session_id, [new], [])[-len(BRANCH_KEYS) :]
        outcome = await self._call(
            lambda: self._session_script(self._create_branch, session_id, args, extra=new_keys)
        )
        if outcome[0] == 2:
            raise BranchNotFound(source)
        if outcome[0] == 3:
            raise TurnNotFound(turn)
        if outcome[0] == 4:
            raise BranchIdUsed(new)

    async def delete_branch(self, session_id: str, branch: str) -> None:
        outcome = await self._script(self._delete_branch, session_id, _suffix(branch))
        if outcome[0] == 2:
            raise BranchNotFound(branch)

    async def compact(
        self, session_id: str, branch: str, expected: Sequence[bytes], replacement: Items
    ) -> bool:
        """The summary takes the ids (positions) of the first items it replaces: read
        first, to seal it, and checked by the script with the items themselves."""
        n, k = len(expected), len(replacement)
        meta_key = f"{self._base(session_id)}:meta{_suffix(branch)}"

        async def run() -> Any:
            shapes = cast(list[bytes], await self.client.lrange(meta_key, 0, k - 1))
            ids = [int(entry.rsplit(b"\t", 1)[1]) for entry in shapes]
            if len(ids) < k:
                return [3]
            head = [_suffix(branch), self._ttl_ms(), f"{time.time():.6f}", n, k]
            args = [*head, *expected, *stored_at(replacement, ids), *ids]
            return await self._session_script(self._compact, session_id, args)

        outcome = await self._call(lambda: self._replicated(session_id, run))
        if outcome[0] == 2:
            raise BranchNotFound(branch)
        return bool(outcome[0] == 1)

    async def full_history(
        self, session_id: str, branch: str, limit: int, max_bytes: int | None = None
    ) -> list[bytes]:
        """The live items from the newest back, of which those a compaction wrote (only
        ever at the front) are left out, then the archived ones, in one script."""
        await self._require_branch(session_id, branch)
        base, sfx = self._base(session_id), _suffix(branch)
        keys = [f"{base}:items{sfx}", f"{base}:meta{sfx}", f"{base}:archive{sfx}"]
        return await self._read_newest(keys, limit, max_bytes)

    async def user_turns(self, session_id: str, branch: str) -> list[UserTurn]:
        await self._require_branch(session_id, branch)
        base, sfx = self._base(session_id), _suffix(branch)

        async def read() -> tuple[list[Any], list[Any]]:
            ids: list[Any] = await self.client.zrange(f"{base}:turns{sfx}", 0, -1, withscores=True)
            if not ids:
                return [], []
            users = await self.client.hmget(f"{base}:users{sfx}", [i[0] for i in ids])
            return ids, users

        ids, users = await self._call(read)
        turns = []
        for (_, turn), user in zip(ids, users, strict=True):
            if user is not None:
                _, created, data = user.split(b"\t", 2)
                turns.append(UserTurn(int(turn), data, float(created)))
        return turns

    async def shapes(self, session_id: str, branch: str) -> list[ItemShape]:
        await self._require_branch(session_id, branch)
        key = f"{self._base(session_id)}:meta{_suffix(branch)}"
        entries = await self._call(lambda: self.client.lrange(key, 0, -1))
        shapes = []
        for entry in cast(list[bytes], entries):
            turn, kind, tool, _, _ = entry.decode().split("\t")
            shapes.append(ItemShape(int(turn), kind, tool or None))
        return shapes

    async def record_usage(
        self, session_id: str, branch: str, turn: int | None, anchor: int | None, usage: Usage
    ) -> int | None:
        outcome = await self._script(
            self._record_usage,
            session_id,
            _suffix(branch),
            "" if turn is None else turn,
            "" if anchor is None else anchor,
            _encode_usage(usage),
            self._ttl_ms(),
        )
        if outcome[0] == 2:
            raise BranchNotFound(branch)
        return int(outcome[1]) if len(outcome) > 1 else None

    async def usage(self, session_id: str, branch: str | None) -> list[TurnUsage]:
        key = f"{self._base(session_id)}:usage"
        entries = await self._call(lambda: self.client.hgetall(key))
        rows = []
        for field, value in cast(dict[bytes, bytes], entries).items():
            name, turn = field.decode().split("\t")
            if branch is None or name == branch:
                rows.append(TurnUsage(name, int(turn), _decode_usage(value)))
        return sorted(rows, key=lambda row: (row.branch, row.turn))

    async def list_sessions(self, prefix: str, after: str | None, limit: int) -> list[str]:
        low = f"({after}" if after and after >= prefix else f"[{prefix}"
        found: list[str] = []
        while len(found) < limit:
            ids, alive = await self._call(
                functools.partial(self._index_page, low, prefix, limit - len(found))
            )
            if not ids:
                break
            found.extend(alive)
            low = f"({ids[-1]}"
        return found

    async def _index_page(self, low: str, prefix: str, count: int) -> tuple[list[str], list[str]]:
        """Ids from the index, and those of them whose session still exists."""
        raw = await self.client.zrange(
            self._index, low, f"({prefix}\x7f", bylex=True, offset=0, num=count
        )
        ids = [r.decode() for r in cast(list[bytes], raw)]
        if not ids:
            return [], []
        async with self.client.pipeline(transaction=False) as pipe:
            for session_id in ids:
                pipe.exists(self.keys(session_id)[1])
            exists = await pipe.execute()
        gone = [sid for sid, ok in zip(ids, exists, strict=True) if not ok]
        if gone:
            await self.client.zrem(self._index, *gone)
        return ids, [sid for sid, ok in zip(ids, exists, strict=True) if ok]

    async def sweep(self) -> int:
        """Redis expires keys itself; listings prune the index as they go."""
        return 0

    async def rewrite(self, session_id: str, transform: Transform) -> int:
        return await self._call(functools.partial(self._rewrite, session_id, transform))

    async def _rewrite(self, session_id: str, transform: Transform) -> int:
        """Every branch's items, archived ones included, and the copies of user messages,
        in one transaction."""
        base = self._base(session_id)
        for _ in range(OPTIMISTIC_ATTEMPTS):
            async with self.client.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(f"{base}:branches")
                    registry = cast(dict[bytes, bytes], await pipe.hgetall(f"{base}:branches"))
                    sfxs = ["", *(_suffix(name) for name in _live(registry))]
                    lists = [f"{base}:{kind}{sfx}" for sfx in sfxs for kind in ("items", "archive")]
                    keys = [*lists, *(f"{base}:users{sfx}" for sfx in sfxs)]
                    await pipe.watch(*keys)
                    changed = 0
                    writes: list[tuple[str, Any, bytes]] = []
                    for key in lists:
                        items = await pipe.lrange(key, 0, -1)
                        for index, item in enumerate(cast(list[bytes], items)):
                            if (new := transform(item)) is not None:
                                writes.append((key, index, new))
                                changed += 1
                    for sfx in sfxs:
                        users = await pipe.hgetall(f"{base}:users{sfx}")
                        for user_id, user in cast(dict[bytes, bytes], users).items():
                            position, created, data = user.split(b"\t", 2)
                            if (new := transform(data)) is not None:
                                value = b"\t".join((position, created, new))
                                writes.append((f"{base}:users{sfx}", user_id, value))
                    pipe.multi()  # type: ignore[no-untyped-call]
                    for key, where, value in writes:
                        if key.rsplit(":", 1)[-1].startswith(("items", "archive")):
                            pipe.lset(key, where, cast(str, value))
                        else:
                            pipe.hset(key, where, value)
                    await pipe.execute()
                    return changed
                except WatchError:
                    continue
        raise BackendUnavailable(f"redis: session {session_id!r} changed too often to rewrite")


def _live(registry: dict[bytes, bytes]) -> list[str]:
    return sorted(name.decode() for name, live in registry.items() if live == b"1")


def _suffix(branch: str) -> str:
    return "" if branch == MAIN else f"@{branch}"


def _clean(text: str) -> str:
    """Kinds and tool names go into tab-separated entries."""
    return text.replace("\t", " ")


def _encode_usage(usage: Usage) -> bytes:
    return orjson.dumps(
        {
            "requests": usage.requests,
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "total_tokens": usage.total_tokens,
            "input_details": None if usage.input_details is None else usage.input_details.decode(),
            "output_details": (
                None if usage.output_details is None else usage.output_details.decode()
            ),
        }
    )


def _decode_usage(raw: bytes) -> Usage:
    value = orjson.loads(raw)
    details = [value[k] for k in ("input_details", "output_details")]
    return Usage(
        value["requests"],
        value["input_tokens"],
        value["output_tokens"],
        value["total_tokens"],
        *(None if d is None else d.encode() for d in details),
    )
