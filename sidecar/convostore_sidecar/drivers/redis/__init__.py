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

from .driver import RedisDriver, open_driver
from .settings import Settings

__all__ = ["RedisDriver", "Settings", "open_driver"]
