"""The Lua scripts that make every change to a session (see the package's docstring
for the key layout), and what they answer."""

from __future__ import annotations

from enum import IntEnum


class Outcome(IntEnum):
    """What a script answers first: the same names in Lua (`COMMON` declares them from
    this class) and here, so no number means two things."""

    REPLAYED = 0
    """An append whose `Idempotency-Key` was seen: what it stored then follows."""
    DONE = 1
    NO_BRANCH = 2
    POSITIONS_MOVED = 3
    """Sealed items were sealed for positions that other appends have taken since."""
    BRANCH_ID_USED = 4
    UNDECLARED = 5
    """The session has a branch whose keys the call did not declare."""
    NEWER_ARRIVED = 6
    """The newest item is no longer the one a pop checked."""
    TURN_NOT_FOUND = 7
    HISTORY_CHANGED = 8
    """The items a compaction read were changed meanwhile."""
    TOO_MANY_LABELS = 9


_OUTCOMES = "local {} = {}\n".format(
    ", ".join(o.name for o in Outcome), ", ".join(str(o.value) for o in Outcome)
)
SESSION_KEYS = ("seq", "ids", "branches", "usage", "about")
BRANCH_KEYS = ("items", "meta", "users", "turns", "trim", "archive")
"""The keys of a session, and of each of its branches, under its hash tag."""


COMMON = (
    _OUTCOMES
    + """
local base = KEYS[1]
local usage = base .. ':usage'
local about = base .. ':about'
-- the session's record: 'created' and 'updated' (times), 'l:<name>' (its labels); a
-- first write sets 'created' and answers 1, so the caller adds it to the listings
local function stamp(now)
  local began = redis.call('HSETNX', about, 'created', now)
  redis.call('HSET', about, 'updated', now)
  return began
end
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
  for _, key in ipairs({base .. ':seq', base .. ':ids', base .. ':branches', usage, about}) do
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
)

APPEND = (
    COMMON
    + """
if undeclared() then return {UNDECLARED} end
local sfx, use_idem, fingerprint = ARGV[1], ARGV[2] == '1', ARGV[3]
local idem_ms, ttl_ms, max_items = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local now, n = ARGV[7], tonumber(ARGV[8])
local expected = tonumber(ARGV[9 + 2 * n])
if use_idem then
  local seen = redis.call('GET', KEYS[2])
  if seen then return {REPLAYED, seen} end
end
if not live(sfx) then return {NO_BRANCH} end
if expected >= 0 and tonumber(redis.call('GET', base .. ':ids') or '0') ~= expected then
  return {POSITIONS_MOVED}
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
local began = stamp(now)
touch(ttl_ms)
if use_idem then redis.call('SET', KEYS[2], fingerprint .. ' ' .. n, 'PX', idem_ms) end
if not anchor then anchor = turn_start(sfx, turn) end
return {DONE, total == n and 1 or 0, turn, anchor, began, redis.call('HGET', about, 'created')}
"""
)

POP = (
    COMMON
    + """
if undeclared() then return {UNDECLARED} end
local sfx, ttl_ms, expect, expected = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
if not live(sfx) then return {NO_BRANCH} end
local items, meta, users, turns = keys_of(sfx)
if expect ~= 'any' then
  local newest = redis.call('LINDEX', items, -1)
  if (expect == 'none') ~= (newest == false) or (newest and newest ~= expected) then
    return {NEWER_ARRIVED}
  end
end
local data = redis.call('RPOP', items)
if not data then return {DONE} end
local entry = redis.call('RPOP', meta)
forget(users, turns, {entry})
local newest = redis.call('LINDEX', meta, -1)
if not newest or turn_of(newest) ~= turn_of(entry) then
  redis.call('HDEL', usage, usage_field(sfx, turn_of(entry)))
end
touch(ttl_ms)
return {DONE, data}
"""
)

CREATE_BRANCH = (
    COMMON
    + """
if undeclared() then return {UNDECLARED} end
local source, new, turn = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now, ttl_ms = ARGV[4], tonumber(ARGV[5])
if not live(source) then return {NO_BRANCH} end
local items, meta, users, turns, trim = keys_of(source)
local start = redis.call('ZRANGEBYSCORE', turns, turn, turn)[1]
if not start then return {TURN_NOT_FOUND} end
if new == 'main' or redis.call('HEXISTS', base .. ':branches', new) == 1 then
  return {BRANCH_ID_USED}
end
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
return {DONE}
"""
)

DELETE_BRANCH = (
    COMMON
    + """
if undeclared() then return {UNDECLARED} end
local sfx = ARGV[1]
if not live(sfx) then return {NO_BRANCH} end
redis.call('DEL', keys_of(sfx))
local prefix = usage_field(sfx, '')
for _, f in ipairs(redis.call('HKEYS', usage)) do
  if string.sub(f, 1, #prefix) == prefix then redis.call('HDEL', usage, f) end
end
redis.call('HSET', base .. ':branches', string.sub(sfx, 2), '0')
return {DONE}
"""
)

CLEAR = (
    COMMON
    + """
if undeclared() then return {UNDECLARED} end
redis.call('DEL', base .. ':seq', usage, about, keys_of(''))
for _, b in ipairs(redis.call('HKEYS', base .. ':branches')) do
  redis.call('DEL', keys_of('@' .. b))
  redis.call('HSET', base .. ':branches', b, '0')
end
return {DONE}
"""
)

COMPACT = (
    COMMON
    + """
if undeclared() then return {UNDECLARED} end
local sfx, ttl_ms, now = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local n, k = tonumber(ARGV[4]), tonumber(ARGV[5])
if not live(sfx) then return {NO_BRANCH} end
local items, meta, users, turns, trim, archive = keys_of(sfx)
local current = redis.call('LRANGE', items, 0, n - 1)
local shapes = redis.call('LRANGE', meta, 0, n - 1)
if #current ~= n then return {HISTORY_CHANGED} end
for i = 1, n do
  if current[i] ~= ARGV[5 + i] then return {HISTORY_CHANGED} end
end
for i = 1, k do
  if tostring(id_of(shapes[i])) ~= ARGV[5 + n + k + i] then return {HISTORY_CHANGED} end
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
return {DONE}
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
if undeclared() then return {UNDECLARED} end
local sfx, turn, anchor = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local usage_json, ttl_ms = ARGV[4], tonumber(ARGV[5])
if not live(sfx) then return {NO_BRANCH} end
local items, meta, users, turns = keys_of(sfx)
if not turn then
  local newest = redis.call('LINDEX', meta, -1)
  if not newest then return {DONE} end
  turn = turn_of(newest)
  anchor = turn_start(sfx, turn)
elseif turn == 0 then
  if turn_start(sfx, 0) ~= anchor then anchor = false end
elseif tonumber(redis.call('ZSCORE', turns, anchor)) ~= turn then
  anchor = false
end
if not anchor then return {DONE} end
redis.call('HSET', usage, usage_field(sfx, turn), usage_json)
touch(ttl_ms)
return {DONE, turn}
"""
)

LABEL = (
    COMMON
    + """
if undeclared() then return {UNDECLARED} end
local now, ttl_ms, most, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local before = {}
local fields = redis.call('HGETALL', about)
for i = 1, #fields, 2 do
  if string.sub(fields[i], 1, 2) == 'l:' then before[string.sub(fields[i], 3)] = fields[i + 1] end
end
local after, count = {}, 0
for name, value in pairs(before) do after[name] = value end
for i = 0, n - 1 do
  local name, value = ARGV[5 + 2 * i], ARGV[6 + 2 * i]
  if value == '' then after[name] = nil else after[name] = value end
end
for _ in pairs(after) do count = count + 1 end
if count > most then return {TOO_MANY_LABELS} end
local began = stamp(now)
for name, _ in pairs(before) do
  if after[name] == nil then redis.call('HDEL', about, 'l:' .. name) end
end
local flat = {}
for name, value in pairs(after) do
  redis.call('HSET', about, 'l:' .. name, value)
  flat[#flat + 1] = name
  flat[#flat + 1] = value
end
touch(ttl_ms)
local gone = {}
for name, value in pairs(before) do
  if after[name] ~= value then gone[#gone + 1] = name; gone[#gone + 1] = value end
end
return {DONE, began, redis.call('HGET', about, 'created'), now, flat, gone}
"""
)

ERASE = (
    COMMON
    + """
if undeclared() then return {UNDECLARED} end
local idle_since = ARGV[1]
if idle_since ~= '' then
  local written = redis.call('HGET', about, 'updated')
  if written and tonumber(written) > tonumber(idle_since) then return {DONE, -1, {}} end
end
local held, labels = 0, {}
local fields = redis.call('HGETALL', about)
for i = 1, #fields, 2 do
  if string.sub(fields[i], 1, 2) == 'l:' then
    labels[#labels + 1] = string.sub(fields[i], 3)
    labels[#labels + 1] = fields[i + 1]
  end
end
local sfxs = {''}
for _, b in ipairs(redis.call('HKEYS', base .. ':branches')) do sfxs[#sfxs + 1] = '@' .. b end
for _, sfx in ipairs(sfxs) do
  local items, _, _, _, _, archive = keys_of(sfx)
  held = held + redis.call('LLEN', items) + redis.call('LLEN', archive)
  redis.call('DEL', keys_of(sfx))
end
redis.call('DEL', base .. ':seq', base .. ':ids', base .. ':branches', usage, about)
return {DONE, held, labels}
"""
)


SUBJECTS = "!subjects"
"""The hash tag of the store's subject keys: a `!` no session id holds, so its slot's
keys are never a session's."""
KEEP_SUBJECT_KEY = """
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
return redis.call('HGET', KEYS[1], ARGV[1])
"""
REPLACE_SUBJECT_KEY = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""
