"""The Lua scripts that make every state change atomic, and the pipeline batcher that sends them.

Stage: runtime: redis. Imports redis (redis-py) and stdlib.

Why Lua rather than WATCH/MULTI: a transition must check the run's version, the
lease of the task whose result it applies, and the token of the last
transition, then write the state, the journal entry, the outbox and the task
leases — all or nothing. One script does that in one round trip; WATCH/MULTI
would need two round trips and a retry on every concurrent touch of the run's
keys. Every per-run script touches only the four keys of one run (one
``{run_id}`` hash tag, one Cluster slot); the timer script touches the two
timer sets (one ``{prefix}`` hash tag).

Scripts are sent with EVALSHA; after a Redis restart (``NOSCRIPT``) they are
loaded again and the call is repeated. :class:`Batcher` sends every command
issued in the same event-loop tick as one pipeline, so a worker that handles
many tasks at once pays one round trip per tick, not one per command.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from typing import Any

import redis
import redis.asyncio as aioredis

__all__ = ["CANCEL", "CLAIM_TIMERS", "DEAD_LETTER", "FORGET_CONSUMERS", "LOAD", "PICKUP", "PROBE", "RECOVER", "RELAY",
           "RELEASE", "REQUEUE", "RESOLVE", "SIGNAL_ID", "SUBMIT", "TRANSITION", "UNLIST", "Batcher", "Script"]

#: the start of a script that calls a command with ``redis.pcall`` (to take an error reply as an answer): whether
#: such a reply is Redis refusing the command to the ACL user (``NOPERM``; Redis 7.0 says "The user executing the
#: script can't …"), which the script must pass on (``return p``) rather than take for an answer
_REFUSED = r"""
local function refused(p)
  return type(p) == 'table' and type(p.err) == 'string'
    and (p.err:find('NOPERM', 1, true) or p.err:find('user executing the script', 1, true)) ~= nil
end
"""

#: the start of a script that needs to know whether a run's outcome is in doubt: whether its tasks hash holds an attempt
#: the run gave up on (a ``g:<task id>`` mark) that a worker still runs (its lease ``xr:…``) — its answer, a late
#: success perhaps, is still to come. (At a run's end the hash holds nothing else, as a rule: cheap.)
_IN_DOUBT = r"""
local function in_doubt(tasks)
  if redis.call('EXISTS', tasks) == 0 then return false end
  local all = redis.call('HGETALL', tasks)
  local leases = {}
  for i = 1, #all, 2 do leases[all[i]] = all[i + 1] end
  for f, _ in pairs(leases) do
    if string.sub(f, 1, 2) == 'g:' and string.sub(leases[string.sub(f, 3)] or '', 1, 3) == 'xr:' then
      return true
    end
  end
  return false
end
"""

#: KEYS: run, journal, tasks, outbox (one run). ARGV: see :func:`flowdsl.runtime.redis.store.Store.transition`.
#: ARGV[1], the header: one flat JSON array of every small argument (the client packs each argument at a cost; a
#: flat array is also what Lua decodes cheapest): expected version, token, status, finished, has a state, has an
#: outbox entry, then the number of input events n and, for each, ``guard task, guard mode, guard value, reporter``
#: (mode ``new``: the guard's "task" is a field of the run's hash that must not exist — an input event applied once
#: only, a signal — which the transition sets to the event's journal entry id); then the number of task operations
#: and each as ``op, task, value``; then the number of meta fields of the run's hash and each as ``field, value``
#: (strings; an empty value deletes the field: the run's ``w`` once nothing waits); last, the
#: run's generation the state was computed from (its ``born``; '' when unknown: not checked) — another generation's
#: state is a version conflict. Then the blobs, in order: the state (when it has one), the outbox entry (when it has
#: one), each input event and its events, and the message of each ``c`` operation.
#: Task operations: ``s <task> <lease>`` (set), ``c <task> <lease>`` (a task the calling process runs
#: itself: held at once, its dispatch message kept as outbox field ``s:<task>`` for recovery), ``d <task>``
#: (no longer in flight: its lease, any kept message and deadline go), ``x <task>`` (mark cancelled), ``g <task>``
#: (given up on: see the code), ``t <task> <due ms>`` (the attempt's deadline, its timeout timer's due time, kept as
#: field ``d:<task>`` beside its lease: :data:`PICKUP` starts no attempt past it).
#: The n input events become journal entries of versions expected+1 … expected+n (a group commit: the results
#: queued behind one another for a run, applied in one write). Every guard is checked before anything is written.
#: Returns {1, new version, {task ids cancelled while queued}} (when creating the run, a fourth item: its
#: ``cancel`` field as it is now, so that a cancel held while the start was computed is not missed), or, applied
#: with none cancelled and the run not created (the usual answer), the new version alone
#: | {2, version} (version conflict)
#: | {3, version, lease} (the guard failed) | {4, version} (this token was applied already: the last transition,
#: or one of the journal's last 256 entries carries it — a retry after a lost reply) | {5} (no such run)
#: | {6, version} (the run exists: creation refused) | {7, version, index} (a guard of several failed: nothing
#: written, no note). No state writes no snapshot: the state is then what the snapshot
#: (``state`` at version ``sv``, journal entry ``sj``) and the journal's input events after it give (:data:`LOAD`).
#: Retention: a transition that ends the run (``finished``), or of a run that had ended (its ``finished`` field),
#: sets the run's ``ret`` as the TTL of its four keys — except while the run needs a person: ended
#: ``needs_intervention`` and not ``resolved`` (:data:`RESOLVE` applies the retention then; a transition that ends
#: it ``needs_intervention`` again — a late completion — clears ``resolved`` and any TTL, with PERSIST), or while a
#: worker still runs an attempt the run gave up on (a ``g:<task>`` mark, its lease ``xr:``: the outcome is in
#: doubt until it answers, and a late success must still find the run).
TRANSITION = _IN_DOUBT + r"""
local run, journal, tasks, outbox = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local h = cjson.decode(ARGV[1])
local expected, token, status = h[1], h[2], h[3]
local a = 2  -- the next blob
local state, box = '', ''
if h[5] then state = ARGV[a]; a = a + 1 end
if h[6] then box = ARGV[a]; a = a + 1 end
-- entry j's input event is ARGV[a + 2 * (j - 1)], its events the next one
local meta = redis.call('HMGET', run, 'v', 'lt', 'born', 'finished')
local curv = tonumber(meta[1]) or 0
-- a retry of a transition whose reply was lost: was this token written already (perhaps before others)?
local function written()
  if meta[2] == token then return true end
  for _, e in ipairs(redis.call('XREVRANGE', journal, '+', '-', 'COUNT', 256)) do
    local f = e[2]
    for k = 1, #f, 2 do
      if f[k] == 'tk' and f[k + 1] == token then return true end
    end
  end
  return false
end
if expected == 0 then
  if curv ~= 0 then
    if written() then return {4, curv} end
    return {6, curv}
  end
else
  if curv == 0 then return {5} end
  -- the state was computed from another generation of the run id (a cached run that expired, whose id was
  -- submitted again): its version may be the new run's, but never its state
  local born = h[#h]
  if born ~= '' and meta[3] and meta[3] ~= born then return {2, curv} end
  if meta[2] == token then return {4, curv} end
  if curv ~= expected then
    if written() then return {4, curv} end
    return {2, curv}
  end
end
local n = h[7]
local once = {}  -- the 'new' guards of this transition (the same signal twice in one group commit: not both)
for j = 1, n do
  local g = 4 + 4 * j  -- the guard's task; its mode, value and reporter follow
  local gid = h[g]
  if gid ~= '' then
    local mode, want = h[g + 1], h[g + 2]
    local val
    local ok
    if mode == 'new' then
      -- an input event applied once only (a signal): the run's hash has no field of its id yet
      ok = not once[gid] and redis.call('HEXISTS', run, gid) == 0
      once[gid] = true
    elseif mode == 'eq' then
      val = redis.call('HGET', tasks, gid)
      ok = (val == want)
    else
      val = redis.call('HGET', tasks, gid)
      -- a result is taken under its reporter's lease; in 'lease' mode also when no one holds the task, or when
      -- the run gave up on it (a 'g:' mark: the kernel no longer has it in flight, so any answer goes to it), or
      -- when it is a success and the run asked for the attempt's cancellation (an effect made: the kernel must
      -- have it while it can still undo it; the holder's own answer, a cancellation, then finds the task gone)
      ok = (val == 'r:' .. want) or (val == 'xr:' .. want)
        or (mode == 'lease' and (not val or redis.call('HEXISTS', tasks, 'g:' .. gid) == 1))
      if not ok and mode == 'lease' and string.sub(val, 1, 3) == 'xr:' then
        local decoded, ev = pcall(cjson.decode, ARGV[a + 2 * (j - 1)])
        ok = decoded and type(ev) == 'table' and ev['type'] == 'task_succeeded'
      end
    end
    if not ok then
      if n > 1 then return {7, curv, j} end
      if mode == 'lease' and h[g + 3] ~= '' then
        -- a late result (its reporter's lease expired): journal a note, from the input event it carried
        local decoded, ev = pcall(cjson.decode, ARGV[a])
        if not decoded or type(ev) ~= 'table' then ev = {} end
        redis.call('XADD', journal, '*', 'note', cjson.encode({
          type = 'result_rejected', reason = 'lease_lost', run_id = string.match(run, '{(.*)}$'), task_id = gid,
          result_type = ev['type'], at = ev['at'], worker = h[g + 3],
          message = 'the result came from a worker whose lease had expired; another worker holds the task'}))
      end
      return {3, curv, val or ''}
    end
  end
end
local entry
for j = 1, n do
  local b = a + 2 * (j - 1)
  if j == n then  -- the transition's last entry carries its token (a retry after a lost reply finds it)
    entry = redis.call('XADD', journal, '*', 'v', curv + j, 'in', ARGV[b], 'ev', ARGV[b + 1], 'tk', token)
  else
    entry = redis.call('XADD', journal, '*', 'v', curv + j, 'in', ARGV[b], 'ev', ARGV[b + 1])
  end
  if h[5 + 4 * j] == 'new' then redis.call('HSET', run, h[4 + 4 * j], entry) end  -- (applied: never again)
end
local newv = curv + n
if h[5] then
  redis.call('HSET', run, 'state', state, 'sv', newv, 'sj', entry, 'v', newv, 'lt', token, 'status', status)
else
  redis.call('HSET', run, 'v', newv, 'lt', token, 'status', status)
end
if h[6] then redis.call('HSET', outbox, newv, box) end
local cancelled = {}
local m = a + 2 * n  -- the next kept message
local i = 9 + 4 * n  -- the first task operation (op, task, value)
for _ = 1, h[8 + 4 * n] do
  local op, tid = h[i], h[i + 1]
  if op == 's' then
    redis.call('HSET', tasks, tid, h[i + 2])
  elseif op == 'c' then
    redis.call('HSET', tasks, tid, h[i + 2])
    redis.call('HSET', outbox, 's:' .. tid, ARGV[m])
    m = m + 1
  elseif op == 'd' then
    redis.call('HDEL', tasks, tid, 'g:' .. tid, 'd:' .. tid)
    redis.call('HDEL', outbox, 's:' .. tid)
  elseif op == 't' then
    redis.call('HSET', tasks, 'd:' .. tid, h[i + 2])
  elseif op == 'g' then
    local cur = redis.call('HGET', tasks, tid)
    if cur and string.sub(cur, 1, 2) == 'r:' then
      redis.call('HSET', tasks, tid, 'x' .. cur, 'g:' .. tid, '1')
    elseif cur and string.sub(cur, 1, 3) == 'xr:' then
      redis.call('HSET', tasks, 'g:' .. tid, '1')
    else
      redis.call('HDEL', tasks, tid, 'd:' .. tid)
      redis.call('HDEL', outbox, 's:' .. tid)
    end
  else
    local cur = redis.call('HGET', tasks, tid)
    if cur == 'q' then
      redis.call('HSET', tasks, tid, 'xq')
      table.insert(cancelled, tid)
    elseif cur and string.sub(cur, 1, 2) == 'r:' then
      redis.call('HSET', tasks, tid, 'x' .. cur)
    end
  end
  i = i + 3
end
local nmeta = h[i]
for k = i + 1, i + 2 * nmeta, 2 do
  if h[k + 1] == '' then
    redis.call('HDEL', run, h[k])
  else
    redis.call('HSET', run, h[k], h[k + 1])
  end
end
if h[4] or meta[4] then  -- the run ends now, or had ended: its retention (see the comment above the script)
  local kept = redis.call('HMGET', run, 'ret', 'resolved')
  if status == 'needs_intervention' and (h[4] or not kept[2]) then
    if h[4] then  -- (again) something to undo by hand: kept, with no expiry, until someone resolves it
      if kept[2] then redis.call('HDEL', run, 'resolved') end
      for _, key in ipairs(KEYS) do redis.call('PERSIST', key) end
    end
  else
    local ttl = tonumber(kept[1] or '0') or 0
    if ttl > 0 and (kept[2] or not in_doubt(tasks)) then
      for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ttl) end
    end
  end
end
if expected == 0 then return {1, newv, cancelled, redis.call('HGET', run, 'cancel') or ''} end
if #cancelled == 0 then return newv end
return {1, newv, cancelled}
"""

#: KEYS: run, journal (one run). The run's snapshot and what follows it: {state, v, pid, sts, sv, {journal
#: entries after the snapshot's entry}, born} (no entries when the snapshot is the current version; a run written
#: before snapshots had a version of their own has no ``sv``: its state is current).
LOAD = r"""
local m = redis.call('HMGET', KEYS[1], 'state', 'v', 'pid', 'sts', 'sv', 'sj', 'born')
local tail = {}
if m[5] and m[6] and m[5] ~= m[2] then
  tail = redis.call('XRANGE', KEYS[2], '(' .. m[6], '+')
end
return {m[1], m[2], m[3], m[4], m[5], tail, m[7]}
"""

#: KEYS: tasks, outbox, run (one run). ARGV: task id, trigger (:meth:`~flowdsl.runtime.redis.keys.Keys.trigger`
#: of the delivery), lease token (``<trigger>|<consumer>|<nonce>``),
#: the outbox version that dispatched the task ('' if unknown): its relay is done (the message exists), so that
#: outbox entry is dropped; the message's run generation (its ``g``, the run's ``born``; '' if it has none); the
#: newest kernel rules version the caller knows. Returns {0} gone (not in flight, or the message is of another
#: generation: left by an expired run of the same id) | {1} run it | {2} answer task_cancelled (cancel requested
#: before or while it ran) | {3, lease} another stream entry holds it (a duplicate delivery) | {4, rules} the run
#: follows newer kernel rules (its ``k``) than the caller knows: nothing done, the step is an upgraded process's
#: to run | {5, ms} the attempt's deadline (its step's timeout, counted from its dispatch: field ``d:<task>``) passed
#: that many ms ago by the server's clock: not taken, its message to be dropped — the attempt can no longer succeed
#: in time, run now it could only make an effect its timeout timer (due, or being fired) has decided it did not
#: make; that timer times it out. A lease taken under the same trigger (the delivery was taken over) is taken over.
PICKUP = r"""
local run = redis.call('HMGET', KEYS[3], 'born', 'k')
if ARGV[5] ~= '' and run[1] and run[1] ~= ARGV[5] then return {0} end
if run[2] and tonumber(run[2]) > tonumber(ARGV[6]) then return {4, run[2]} end
local got = redis.call('HMGET', KEYS[1], ARGV[1], 'd:' .. ARGV[1])
local v = got[1]
local late = nil
if v == 'q' and got[2] then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if now >= tonumber(got[2]) then late = now - tonumber(got[2]) end
end
if ARGV[4] ~= '' then redis.call('HDEL', KEYS[2], ARGV[4]) end
if not v then return {0} end
if late then return {5, late} end
if v == 'q' then
  redis.call('HSET', KEYS[1], ARGV[1], 'r:' .. ARGV[3])
  return {1}
end
if v == 'xq' then
  redis.call('HSET', KEYS[1], ARGV[1], 'xr:' .. ARGV[3])
  return {2}
end
local pre = 'r:'
if string.sub(v, 1, 3) == 'xr:' then pre = 'xr:' end
local first = string.match(string.sub(v, #pre + 1), '^([^|]*)')
-- held under this trigger; or under its bare entry id (the token of a version before triggers named streams)
if first == ARGV[2] or string.sub(ARGV[2], 1, #first + 1) == first .. '@' then
  redis.call('HSET', KEYS[1], ARGV[1], pre .. ARGV[3])
  if pre == 'xr:' then return {2} end
  return {1}
end
return {3, v}
"""

#: KEYS: the shared keys it touches (task streams, timer sets: one ``{prefix}`` slot). ARGV: the consumer group,
#: then operations: ``x <key#> <message> <outbox version> <generation>`` (XADD a task: fields ``m``, ``v`` and,
#: unless empty, ``g``), ``z <key#> <due> <member>`` (ZADD),
#: ``r <key#> <member>`` (ZREM), ``a <key#> <entry id>`` (XACK + XDEL: the trigger is done), ``p <channel>
#: <message>`` (PUBLISH). Carries out a transition's outbox and acknowledges its trigger, all or nothing.
RELAY = _REFUSED + r"""
local group = ARGV[1]
local i = 2
while i <= #ARGV do
  local op = ARGV[i]
  if op == 'x' then
    if ARGV[i + 4] ~= '' then
      redis.call('XADD', KEYS[tonumber(ARGV[i + 1])], '*', 'm', ARGV[i + 2], 'v', ARGV[i + 3], 'g', ARGV[i + 4])
    else
      redis.call('XADD', KEYS[tonumber(ARGV[i + 1])], '*', 'm', ARGV[i + 2], 'v', ARGV[i + 3])
    end
    i = i + 5
  elseif op == 'z' then
    redis.call('ZADD', KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2], ARGV[i + 3])
    i = i + 4
  elseif op == 'r' then
    redis.call('ZREM', KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2])
    i = i + 3
  elseif op == 'a' then
    -- only while the entry is the caller's (or nobody's): one taken over meanwhile is its new holder's
    local key, id = KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2]
    local p = redis.pcall('XPENDING', key, group, id, id, 1)
    if refused(p) then return p end
    if type(p) ~= 'table' or p.err or p[1] == nil or p[1][2] == ARGV[i + 3] then
      redis.call('XACK', key, group, id)
      redis.call('XDEL', key, id)
    end
    i = i + 4
  else
    redis.call('PUBLISH', ARGV[i + 1], ARGV[i + 2])
    i = i + 3
  end
end
return 1
"""

#: KEYS: tasks, outbox, run (one run). ARGV: the trigger being taken over ('' for none). Every task held under that
#: trigger (a lease ``r:<trigger>|…``, its holder presumed dead) is queued again (``q``; ``xq`` if its
#: cancellation was requested). Returns the outbox to relay as ``{field, value, …}``: every transition's entry
#: (field = version) and the kept message of every self-run task now queued (field ``s:<task>``); first, as
#: field ``g``, the run's generation (``born``) when it has one.
RECOVER = r"""
local tasks, outbox, trigger = KEYS[1], KEYS[2], ARGV[1]
if trigger ~= '' then
  local held, xheld = 'r:' .. trigger .. '|', 'xr:' .. trigger .. '|'
  local all = redis.call('HGETALL', tasks)
  for i = 1, #all, 2 do
    local v = all[i + 1]
    if string.sub(v, 1, #held) == held then
      redis.call('HSET', tasks, all[i], 'q')
    elseif string.sub(v, 1, #xheld) == xheld then
      redis.call('HSET', tasks, all[i], 'xq')
    end
  end
end
local out = {}
local born = redis.call('HGET', KEYS[3], 'born')
if born then
  out[1] = 'g'
  out[2] = born
end
local entries = redis.call('HGETALL', outbox)
for i = 1, #entries, 2 do
  local f = entries[i]
  local keep = true
  if string.sub(f, 1, 2) == 's:' then
    local v = redis.call('HGET', tasks, string.sub(f, 3))
    keep = (v == 'q' or v == 'xq')
  end
  if keep then
    table.insert(out, f)
    table.insert(out, entries[i + 1])
  end
end
return out
"""

#: KEYS: tasks. ARGV: task id, lease token. Hands a held task back (``q`` again). Returns 1, or 0 if not held.
RELEASE = r"""
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v == 'r:' .. ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], 'q')
  return 1
elseif v == 'xr:' .. ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], 'xq')
  return 1
end
return 0
"""

#: KEYS: run, journal, tasks, outbox (one run). ARGV: who, the note ('' for none). Marks a run that needs a person
#: as resolved — one that ended ``needs_intervention``, or that ended while a worker still runs an attempt it
#: gave up on (in doubt) — and from then on applies its retention (``ret``) to its keys:
#: journals a ``resolved`` entry (``{type, at, by, note, status}``, ``at`` by the server's clock), sets the
#: run's ``resolved`` field (that time, ms). Returns {3, at, journal entry id, status} | {0} (no such run)
#: | {1, status} (nothing to resolve) | {2, status, resolved} (resolved already, at that time).
RESOLVE = _IN_DOUBT + r"""
local got = redis.call('HMGET', KEYS[1], 'submitted', 'status', 'ret', 'resolved', 'finished')
if not got[1] then return {0} end
local status = got[2] or 'submitted'
if got[4] then return {2, status, got[4]} end
if status ~= 'needs_intervention' and not (got[5] and in_doubt(KEYS[3])) then
  return {1, status}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local entry = redis.call('XADD', KEYS[2], '*', 'resolved', cjson.encode({
  type = 'resolved', at = now, by = ARGV[1], note = ARGV[2], status = status}))
redis.call('HSET', KEYS[1], 'resolved', now)
local ttl = tonumber(got[3] or '0') or 0
if ttl > 0 then
  for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ttl) end
end
return {3, now, entry, status}
"""

#: KEYS: run. ARGV: plan, plan id, input, flow, seed, retention ms, schedule-to-start ms ('' for none), input id
#: (a digest of the input). Records a submission unless the run id is taken, stamped with the server's clock
#: (ms): ``submitted`` (the listing's time: every submitter's clock is the same one) and ``born``, the run's
#: *generation*: every task message of the run carries it (``g``), and :data:`PICKUP` drops a message with another
#: one (left by an expired run of the same id). Returns {1, submitted} | {0, version or '', plan id, input id or '',
#: flow, seed, retention ms, schedule-to-start ms, submitted} (taken; version '' = not started yet, so the start
#: request may be sent again; the rest lets the caller tell the same submission from another one under the same
#: run id, and list it).
SUBMIT = r"""
if redis.call('HEXISTS', KEYS[1], 'submitted') == 1 then
  local got = redis.call('HMGET', KEYS[1], 'v', 'pid', 'iid', 'flow', 'seed', 'ret', 'sts', 'submitted')
  return {0, got[1] or '', got[2] or '', got[3] or '', got[4] or '', got[5] or '', got[6] or '', got[7] or '',
          got[8] or ''}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'submitted', now, 'plan', ARGV[1], 'pid', ARGV[2], 'input', ARGV[3],
           'flow', ARGV[4], 'status', 'submitted', 'iid', ARGV[8], 'born', now)
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'seed', ARGV[5]) end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'ret', ARGV[6]) end
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'sts', ARGV[7]) end
return {1, now}
"""

#: KEYS: run. ARGV: reason. A cancel request: {0} no such run | {1, status} the run is over | {2} the run has
#: not started: the reason is added to its ``cancel`` field (a JSON list), which the start applies — its
#: first transition ends it ``cancelled`` — so no control message is needed | {3, born} the run has started: the
#: caller sends the cancel request on the control stream (a separate slot), with the run's generation (``born``)
#: the second item gives, so that a request still unread when its run expired cancels no later run of its id.
CANCEL = r"""
local got = redis.call('HMGET', KEYS[1], 'submitted', 'status', 'v', 'cancel')
if not got[1] then return {0} end
local status = got[2] or 'submitted'
if status == 'completed' or status == 'failed' or status == 'compensated' or status == 'cancelled'
    or status == 'needs_intervention' then
  return {1, status}
end
if got[3] then return {3, redis.call('HGET', KEYS[1], 'born') or ''} end
local held = {}
if got[4] then
  local ok, list = pcall(cjson.decode, got[4])
  if ok and type(list) == 'table' then held = list else held = {got[4]} end
end
table.insert(held, ARGV[1])
redis.call('HSET', KEYS[1], 'cancel', cjson.encode(held))
return {2}
"""

#: KEYS: run. ARGV: the field of a signal id (``sigd:<id>``), what a signal sent under it is (the digest of its name
#: and payload, then its name). Records the signal an id is used for, once, before the client sends it: returns what
#: the field holds now — this signal's value (recorded now, or sent before under this id), or another signal's (the
#: id was used for that one: the caller refuses to send) — or false when there is no such run (never creating its
#: hash: a run that expired meanwhile stays gone).
SIGNAL_ID = r"""
if redis.call('HEXISTS', KEYS[1], 'submitted') == 0 then return false end
local had = redis.call('HGET', KEYS[1], ARGV[1])
if had then return had end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return ARGV[2]
"""

#: KEYS: the run index (``{P}:runs``). ARGV: pairs of run id and score (its submission time as listed). Removes
#: each run whose score is still that one (a run id submitted again meanwhile has a new score: it stays).
#: Returns how many were removed.
UNLIST = r"""
local n = 0
for i = 1, #ARGV, 2 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    n = n + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return n
"""

#: KEYS: a stream. ARGV: the consumer group, idle ms, a consumer name to keep. Deletes the group's consumers
#: idle longer than that and holding no entry (deleting one that holds entries would drop them), in one step
#: (no read between the look and the delete). Returns how many were deleted.
FORGET_CONSUMERS = _REFUSED + r"""
local n = 0
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end  -- no stream (none sent yet, or data lost): no consumer
local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if refused(consumers) then return consumers end
if type(consumers) == 'table' and type(consumers.err) == 'string' then
  -- a stream made by an entry sent before any worker made its group (a start request sent again): no consumer
  if consumers.err:find('NOGROUP', 1, true) then return 0 end
  return consumers
end
for _, c in ipairs(consumers) do
  local info = {}
  for k = 1, #c, 2 do info[c[k]] = c[k + 1] end
  if info['name'] ~= ARGV[3] and tonumber(info['pending']) == 0 and tonumber(info['idle']) > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    n = n + 1
  end
end
return n
"""

#: KEYS: a stream, the dead-letter stream, the entry's failure counter (all under the ``{prefix}`` hash tag).
#: ARGV: the consumer group, the entry id, the caller's consumer name, the threshold, the reason, the counter's
#: lifetime (ms), then the entry's fields as name/value pairs. Counts one failure of the entry and, once the count
#: reaches the threshold (at once for a threshold of 0 or 1), sets the entry aside: a dead-letter entry (``stream``,
#: ``id``, ``reason``, ``consumer``, ``deliveries``, ``failures``, then each original field as ``f:<name>``,
#: byte for byte) is added and the entry acknowledged and deleted, all at once. Only while the entry is pending
#: with the caller: one taken over meanwhile is its new holder's to judge, and one no longer pending was handled
#: (acknowledged) by another. Returns {0, failures} (counted, kept) | {1, failures, dead-letter id} | {2} (not the
#: caller's: nothing done).
DEAD_LETTER = _REFUSED + r"""
local stream, dead, counter = KEYS[1], KEYS[2], KEYS[3]
local group, id, consumer = ARGV[1], ARGV[2], ARGV[3]
local p = redis.pcall('XPENDING', stream, group, id, id, 1)
if refused(p) then return p end
if type(p) ~= 'table' or p.err or p[1] == nil or p[1][2] ~= consumer then return {2} end
local deliveries = p[1][4]
local n = 1
local threshold = tonumber(ARGV[4])
if threshold > 1 then
  n = redis.call('INCR', counter)
  redis.call('PEXPIRE', counter, ARGV[6])
  if n < threshold then return {0, n} end
end
local fields = {'stream', stream, 'id', id, 'reason', ARGV[5], 'consumer', consumer, 'deliveries', deliveries,
                'failures', n}
for i = 7, #ARGV, 2 do
  table.insert(fields, 'f:' .. ARGV[i])
  table.insert(fields, ARGV[i + 1])
end
local dead_id = redis.call('XADD', dead, '*', unpack(fields))
redis.call('XACK', stream, group, id)
redis.call('XDEL', stream, id)
redis.call('DEL', counter)
return {1, n, dead_id}
"""

#: KEYS: the dead-letter stream, the stream its entry came from. ARGV: the dead-letter id, the trigger to take
#: over (the original entry's). Puts a dead letter back on its stream as a new entry with its original fields —
#: byte for byte — and, unless it had one already (it was put back before), ``t`` (the trigger: whoever handles
#: the new entry first takes over the tasks held under the old one, as after a crash), and deletes the dead
#: letter — at once. Returns {1, new entry id} | {0} (no such dead letter) | {2}
#: (it came from another stream than KEYS[2]).
REQUEUE = r"""
local got = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #got == 0 then return {0} end
local f = got[1][2]
local fields = {}
local origin
local taken = false
for k = 1, #f, 2 do
  if f[k] == 'stream' then origin = f[k + 1] end
  if string.sub(f[k], 1, 2) == 'f:' then
    table.insert(fields, string.sub(f[k], 3))
    table.insert(fields, f[k + 1])
    if f[k] == 'f:t' then taken = true end
  end
end
if origin ~= KEYS[2] then return {2} end
if not taken then
  table.insert(fields, 't')
  table.insert(fields, ARGV[2])
end
local new_id = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XDEL', KEYS[1], ARGV[1])
return {1, new_id}
"""

#: KEYS: timers, timers:claimed. ARGV: lease ms, limit. Moves due timers to the claimed set (score = lease
#: expiry, Redis server clock) and re-claims timers whose firing process died. Returns
#: {now ms, {due members}, {re-claimed members}, next due ms or ''}.
CLAIM_TIMERS = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
for _, m in ipairs(due) do
  redis.call('ZREM', KEYS[1], m)
  redis.call('ZADD', KEYS[2], now + lease, m)
end
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)
local again = {}
for _, m in ipairs(stale) do
  if redis.call('ZSCORE', KEYS[2], m) then
    redis.call('ZADD', KEYS[2], now + lease, m)
    table.insert(again, m)
  end
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {now, due, again, nxt[2] or ''}
"""

#: KEYS: keys of one slot that a process reads and writes. ARGV: 'persist' to also send PERSIST on each key (a
#: command a transition sends; on keys that do not exist, as a run's that cannot exist, it changes nothing).
#: Writes nothing: calling it is the test. Redis checks the
#: ACL user's read and write permission on every key a script declares (and its permission to run EVALSHA) before
#: the script runs, and each command the script sends as it sends it, so a worker probes its permissions with it at
#: startup. Returns how many of the keys exist.
PROBE = _REFUSED + r"""
local n = 0
for _, key in ipairs(KEYS) do
  local e = redis.call('EXISTS', key)
  n = n + e
  if ARGV[1] == 'persist' and e == 0 then
    local p = redis.pcall('PERSIST', key)
    -- (Redis 7.0 names no command in its refusal: said here)
    if refused(p) then return redis.error_reply('NOPERM this user may not run the PERSIST command: ' .. p.err) end
  end
end
return n
"""


class Script:
    """A Lua script called by SHA-1 (EVALSHA), loaded again when the server has forgotten it."""

    def __init__(self, name: str, source: str):
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def load(self, batcher: Batcher) -> None:
        """Load the script into the server's script cache (so that the first calls find it)."""
        await _script_load(batcher, self.source)

    async def __call__(self, batcher: Batcher, keys: list[str], args: list[Any]) -> Any:
        try:
            return await batcher.call("EVALSHA", self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            await _script_load(batcher, self.source)
            return await batcher.call("EVALSHA", self.sha, len(keys), *keys, *args)


async def _script_load(batcher: Batcher, source: str) -> None:
    """``SCRIPT LOAD``; a server without the command (``rename-command SCRIPT ""``) is said in one sentence — its
    own answer quotes the command's first arguments: the script's source."""
    try:
        await batcher.call("SCRIPT", "LOAD", source)
    except redis.ResponseError as exc:
        if not str(exc).lower().startswith(("unknown command 'script'", "err unknown command 'script'")):
            raise
        raise redis.ResponseError("unknown command 'SCRIPT' (renamed or disabled on this server: rename-command): "
                                  "flowdsl loads its Lua scripts with SCRIPT LOAD and runs them with EVALSHA; "
                                  "give SCRIPT back its name") from None


class Batcher:
    """Sends the commands issued during one event-loop tick as one pipeline (auto-pipelining).

    ``await batcher.call(*args)`` returns the command's reply or raises its
    error (a ``ResponseError`` of that command alone, or the connection error
    that failed the whole pipeline). At most ``parallel`` pipelines are in
    flight at once; each holds at most ``max_batch`` commands.
    """

    def __init__(self, client: aioredis.Redis, *, max_batch: int = 256, parallel: int = 2, wire: Any = None):
        self.client = client
        self.wire = wire  # a WireConnection: the lean path (raw RESP2 replies); else redis-py pipelines
        self.max_batch = max_batch
        self.parallel = parallel
        self._queue: deque[tuple[tuple[Any, ...], asyncio.Future[Any]]] = deque()
        self._inflight = 0
        self._scheduled = False
        self._sending: set[asyncio.Task[None]] = set()  # (the loop keeps only weak references to tasks)

    def call(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command; the returned future resolves with its reply."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((args, future))
        if not self._scheduled and self._inflight < self.parallel:
            self._scheduled = True
            loop.call_soon(self._start)
        return future

    def call_packed(self, packed: bytes) -> asyncio.Future[Any]:
        """:meth:`call` of a command packed already (RESP), sent as it is: on the lean connection only (``wire``;
        redis-py's pipelines take arguments)."""
        assert self.wire is not None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((packed, future))  # type: ignore[arg-type]  # (wire.pack passes bytes through)
        if not self._scheduled and self._inflight < self.parallel:
            self._scheduled = True
            loop.call_soon(self._start)
        return future

    def _start(self) -> None:
        self._scheduled = False
        while self._queue and self._inflight < self.parallel:
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            if self.wire is not None and self.wire.send([args for args, _ in batch], [f for _, f in batch]):
                continue  # written: the connection resolves the futures as the replies arrive
            self._inflight += 1
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            try:
                if self.wire is not None:
                    replies = await self.wire.execute([args for args, _ in batch])
                else:
                    pipe = self.client.pipeline(transaction=False)
                    for args, _ in batch:
                        pipe.execute_command(*args)
                    replies = await pipe.execute(raise_on_error=False)
            except BaseException as exc:  # the connection failed: every command in the batch failed with it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc if isinstance(exc, Exception) else ConnectionError(str(exc)))
                if not isinstance(exc, Exception):
                    raise
                return
            for (_, future), reply in zip(batch, replies, strict=True):
                if future.done():
                    continue
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        finally:
            self._inflight -= 1
            if self._queue and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._start)
