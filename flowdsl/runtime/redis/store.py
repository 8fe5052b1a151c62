"""Reading and writing runs in Redis: load, atomic transition, task pickup, outbox relay, timers.

Stage: runtime: redis. Imports redis (through ``.scripts``), ``.keys``, ``.wire`` (stream entries' fields),
``.connection`` (what is transient, backoff),
``flowdsl.runtime.codec`` (JSON bytes), ``flowdsl.kernel`` (to replay a
journal tail) and stdlib. It knows the data model (docs/runtime.md, "The Redis
data model") but nothing of the kernel's semantics: :mod:`.advance` decides
what to write.

A run's state is not written whole by every transition: a transition writes
its journal entry (the input event, the events) and, when :mod:`.advance`
says so, a snapshot of the state. :meth:`Store.load` reads the snapshot and
replays the input events journaled after it through the kernel, which gives
the current state exactly (the kernel is deterministic). So a long run costs
each transition O(its own change), not O(the whole state).

The outbox is what makes a transition atomic on one Cluster slot: the
commands a transition decides (tasks to queue, timers to set or clear,
cancellations to announce) are written into the run's own ``outbox`` hash by
the same script that writes the state and the journal entry, then *relayed*
to the shared streams and timer set, and only then is the trigger of the
transition (a task's stream entry, a timer claim, a control request)
acknowledged. A process that dies in between leaves the trigger pending; whoever
takes it over relays the outbox first (:meth:`Store.outbox`). A task the
transition gives to the calling process itself (self-dispatch) is not relayed:
its message is kept in the outbox (``s:<task id>``) while it is in flight, and
relayed only if the trigger it was held under is taken over. An outbox entry
relayed is dropped (``HDEL``) without waiting for the reply; a drop lost with its
connection is sent again (:meth:`Store.relay`), so that a finished run keeps
no entry that every later recovery would relay again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import redis.asyncio as aioredis
from orjson import dumps as _orjson
from redis.exceptions import NoScriptError

from flowdsl import kernel
from flowdsl.kernel import apply, check_rules
from flowdsl.runtime.codec import dumps, loads
from flowdsl.runtime.redis.connection import TRANSIENT, Backoff, server_unwell
from flowdsl.runtime.redis.keys import GROUP, WAITS_FIELD, Keys
from flowdsl.runtime.redis.scripts import (
    CLAIM_TIMERS,
    DEAD_LETTER,
    FORGET_CONSUMERS,
    LOAD,
    PICKUP,
    PROBE,
    RECOVER,
    RELAY,
    RELEASE,
    REQUEUE,
    RESOLVE,
    TRANSITION,
    UNLIST,
    Batcher,
    Script,
)
from flowdsl.runtime.redis.wire import entry_fields

if TYPE_CHECKING:
    from flowdsl.runtime.redis.run_waits import WaitsKept

__all__ = ["START_SCAN_LIMIT", "TRANSITION_LIMIT", "Clock", "JournalEntry", "RunDamaged", "RunRecord", "RunTooLarge",
           "Store", "TransitionResult", "cancel_reasons", "decoded", "megabytes", "plan_id", "retrieved", "score_pairs"]

_TRANSITION = Script("transition", TRANSITION)
_LOAD = Script("load", LOAD)
_PICKUP = Script("pickup", PICKUP)
_RELEASE = Script("release", RELEASE)
_RELAY = Script("relay", RELAY)
_RECOVER = Script("recover", RECOVER)
_CLAIM = Script("claim_timers", CLAIM_TIMERS)
_UNLIST = Script("unlist", UNLIST)
_FORGET_CONSUMERS = Script("forget_consumers", FORGET_CONSUMERS)
_DEAD_LETTER = Script("dead_letter", DEAD_LETTER)
_REQUEUE = Script("requeue", REQUEUE)
_PROBE = Script("probe", PROBE)
_RESOLVE = Script("resolve", RESOLVE)
#: the most entries of the control stream (and of the dead letters) read to find the start requests there
#: (:meth:`Store.start_requests`): a longer one is a backlog, not read through
START_SCAN_LIMIT = 10_000
#: how many times a relayed outbox entry's drop lost with its connection is sent again (with backoff: about a
#: minute); beyond, the entry stays, relayed again by a later recovery (a duplicate message, dropped at pickup)
_DROP_TRIES = 30
log = logging.getLogger("flowdsl.redis")


class RunDamaged(ValueError):
    """A run's data in Redis cannot be decoded: a field is not what flowdsl writes there (damaged in Redis, or
    written by something else). The message names the run, the key, the field (and the journal entry), and what
    is wrong with it."""

    def __init__(self, run_id: str, key: str, field: str, problem: str, entry: str | None = None):
        self.run_id, self.key, self.field, self.problem, self.entry = run_id, key, field, problem, entry
        where = f"the key '{key}'" if not field else f"the field '{field}' of the key '{key}'" if entry is None \
            else f"the field '{field}' of the entry {entry} of the key '{key}'"
        super().__init__(f"run {run_id!r} is damaged in Redis: {where} {problem}")


#: the most one transition writes (its state, input events, events, outbox and kept messages together): one Redis
#: value holds at most 512 MB (``proto-max-bulk-len``), and a larger argument makes the server drop the connection
TRANSITION_LIMIT = 512 * 1024 * 1024


def megabytes(size: int) -> str:
    """A size in MB (in KB under one MB), for messages."""
    return f"{size / 2**20:,.0f} MB" if size >= 2**20 else f"{size / 2**10:,.0f} KB"


class RunTooLarge(ValueError):
    """A transition of a run would write more than Redis takes (:data:`TRANSITION_LIMIT`): a result or a context
    too large for the Redis runtime. Nothing was sent; the message says how large, and what to do."""

    def __init__(self, run_id: str, size: int, limit: int = TRANSITION_LIMIT):
        self.run_id, self.size = run_id, size
        held = "what one Redis value holds" if limit >= TRANSITION_LIMIT else \
            "the largest value this Redis server takes: its proto-max-bulk-len"
        super().__init__(f"run {run_id!r}: this step's transition would write {megabytes(size)} to Redis, more than "
                         f"one transition may ({megabytes(limit)}: {held}): "
                         "a result, or the context a step is given, is too large for the Redis runtime — keep large "
                         "data out of runs (store it elsewhere and pass its key; docs/runtime.md, Sizing)")


def decoded(run_id: str, key: str, field: str, raw: bytes, kind: type = dict, entry: str | None = None) -> Any:
    """The JSON value of a run's stored field, of the ``kind`` flowdsl writes there; else :class:`RunDamaged`."""
    try:
        value = loads(raw)
    except (ValueError, RecursionError) as exc:  # (nested too deeply for the decoder: RecursionError)
        text = str(exc) if len(str(exc)) <= 200 else str(exc)[:199] + "…"
        raise RunDamaged(run_id, key, field, f"is not valid JSON ({text})", entry) from None
    if not isinstance(value, kind):
        raise RunDamaged(run_id, key, field, f"is not a JSON {'object' if kind is dict else 'array'}", entry)
    return value


def _number(run_id: str, key: str, field: str, raw: bytes, entry: str | None = None) -> int:
    try:
        return int(raw)
    except ValueError:
        raise RunDamaged(run_id, key, field, f"is not a number ({raw[:40]!r})", entry) from None


def retrieved(future: asyncio.Future[Any]) -> None:
    """Take a future's outcome (so that an error of a command nobody awaits is not reported as unretrieved)."""
    if not future.cancelled():
        future.exception()


def score_pairs(reply: Any) -> list[tuple[bytes, bytes]]:
    """A ``ZRANGE … WITHSCORES`` reply as (member, score) pairs (a flat list on the raw path, pairs through
    redis-py's parsing)."""
    if reply and isinstance(reply[0], list | tuple):
        return [(m, s if isinstance(s, bytes) else repr(s).encode()) for m, s in reply]
    return list(zip(reply[::2], reply[1::2], strict=True))


def plan_id(plan: dict[str, Any]) -> str:
    """A content id of a plan (SHA-256 of its JSON with sorted keys, 16 hex digits): workers cache plans by it."""
    return hashlib.sha256(dumps(plan, sort_keys=True)).hexdigest()[:16]


def cancel_reasons(raw: bytes | str | None) -> tuple[str, ...]:
    """The cancel requests held for a run's start (its ``cancel`` field: a JSON list of reasons; a plain
    string, as versions before it wrote, is one reason)."""
    if not raw:
        return ()
    text = raw.decode() if isinstance(raw, bytes) else raw
    try:
        held = loads(text)
    except ValueError:
        return (text,)
    return tuple(str(r) for r in held) if isinstance(held, list) else (text,)


class Clock:
    """Milliseconds since the epoch on the Redis server's clock: one clock for every machine.

    The offset between this process's monotonic clock and the server's ``TIME``
    is measured at start and every :attr:`resync_s` seconds (halving the round
    trip), so ``now()`` costs no round trip, and a step of this machine's wall
    clock (NTP correcting it, ``date -s``, a VM resumed) cannot move it: timeouts
    would otherwise fire at once, or late, until the next resync. Timer due
    times are compared with ``TIME`` inside the claim script itself.
    """

    resync_s = 30.0

    def __init__(self) -> None:
        self.offset_ms = (time.time() - time.monotonic()) * 1000.0  # this machine's wall clock until the first sync
        self.synced_at: float | None = None

    def now(self) -> int:
        return int(time.monotonic() * 1000.0 + self.offset_ms)

    async def sync(self, client: aioredis.Redis) -> None:
        best: tuple[float, float] | None = None
        for _ in range(3):
            t0 = time.monotonic()
            secs, micros = await client.time()
            t1 = time.monotonic()
            sample = (t1 - t0, secs * 1000.0 + micros / 1000.0 - (t0 + t1) * 500.0)
            if best is None or sample[0] < best[0]:
                best = sample
        assert best is not None
        self.offset_ms = best[1]
        self.synced_at = time.monotonic()

    def stale(self) -> bool:
        return self.synced_at is None or time.monotonic() - self.synced_at > self.resync_s


@dataclass
class RunRecord:
    """A run as a process holds it: the kernel state, its version, the plan and per-run settings; and how
    far its stored snapshot is behind (``snapshot_size`` bytes, written ``since`` transitions ago)."""

    run_id: str
    state: dict[str, Any]
    version: int
    plan: dict[str, Any]
    sts_ms: int | None
    snapshot_size: int = 0
    since: int = 0
    born: str = ""  # the run's generation (SUBMIT's ``born``; '' for a run submitted before it existed)
    packed: bytes = b""  # the start of its TRANSITION calls as RESP, once packed (Store.step)
    waits: WaitsKept | None = None  # what its waits wait for, and its hash's ``w`` field (.run_waits), once known


#: One input event a transition applies: its journal entry (the event, the events it caused, as JSON bytes),
#: and the guard checked before anything is written with the reporter of a late result (see
#: :meth:`Store.transition`): ``(input event, events, (task id, mode, value) or None, reporter or "")``.
JournalEntry = tuple[bytes, bytes, "tuple[str, str, str] | None", str]
#: a change to a run's tasks in flight, as :meth:`Store.transition` takes it
TaskOp = tuple[str, ...] | tuple[str, str, str, bytes]
_NO_GUARD = ("", "", "")


class TransitionResult(NamedTuple):
    """What the transition script said: ``code`` 1 applied, 2 version conflict, 3 guard failed,
    4 already applied (same token), 5 no such run, 6 the run exists (creation refused), 7 a guard of a
    transition of several input events failed (nothing written)."""

    code: int
    version: int = 0
    lease: str = ""  # the task's lease value, when the guard failed
    cancelled_queued: tuple[str, ...] = ()  # task ids cancelled before any worker picked them up
    held_cancels: tuple[str, ...] = ()  # when creating the run: the cancel requests held for its start, now

    @property
    def applied(self) -> bool:
        return self.code in (1, 4)


_new_result = tuple.__new__
#: a TRANSITION call packed as RESP, after its keys: ``*<args>``, the call and the keys (one ``%b``), then the
#: header and the blobs (``$<length>``, the bytes), by the number of blobs
_TRANSITION_HEAD = b"$7\r\nEVALSHA\r\n$40\r\n" + _TRANSITION.sha.encode() + b"\r\n$1\r\n4\r\n"
_BULK = {n: b"*%d\r\n%%b" % (8 + n) + b"$%d\r\n%b\r\n" * (n + 1) for n in range(1, 9)}


#: stands for the run id in the arguments of a :class:`_RunCommand` (never in a run id: keys.check_run_id)
_RUN_MARK = "\x00"


class _RunCommand:
    """The RESP of command arguments that differ only by the run id they name: packed once with a mark for it,
    then, for a run, by one bytes format — hiredis formats each argument's length with ``sprintf`` (~1k
    instructions an argument), and so does a format of its own per argument. ``head``: RESP put before them."""

    __slots__ = ("_format", "_lengths")

    def __init__(self, args: Sequence[str | bytes], head: bytes = b""):
        parts = [head.replace(b"%", b"%%")]
        self._lengths: list[int] = []  # of each argument that names the run, less the run id's own
        for arg in args:
            raw = arg.encode() if isinstance(arg, str) else arg
            if raw.count(_RUN_MARK.encode()) == 1:
                parts.append(b"$%d\r\n" + raw.replace(b"%", b"%%").replace(_RUN_MARK.encode(), b"%b") + b"\r\n")
                self._lengths.append(len(raw) - 1)
            else:
                parts.append((b"$%d\r\n%b\r\n" % (len(raw), raw)).replace(b"%", b"%%"))
        self._format = b"".join(parts)

    def pack(self, run_id: str) -> bytes:
        raw = run_id.encode()
        n = len(raw)
        return self._format % tuple([x for length in self._lengths for x in (length + n, raw)])


#: the fields of a run's hash that :meth:`Store.submission` reads
_SUBMISSION = ("submitted", "pid", "input", "seed", "ret", "sts", "v", "cancel", "born")
#: a RELAY call that only acknowledges a stream entry (a run's end), packed as RESP but for the stream, the entry id
#: and the consumer (:meth:`Store.relay`)
_ACK = b"*9\r\n$7\r\nEVALSHA\r\n$40\r\n" + _RELAY.sha.encode() + b"\r\n$1\r\n1\r\n$%d\r\n%b\r\n" + \
    (b"$%d\r\n%b\r\n$1\r\na\r\n$1\r\n1\r\n" % (len(GROUP), GROUP.encode())).replace(b"%", b"%%") + \
    b"$%d\r\n%b\r\n$%d\r\n%b\r\n"


def _bulk(n: int) -> bytes:
    """The RESP format of a TRANSITION call with ``n`` blobs (:data:`_BULK`, made for more when needed)."""
    found = _BULK.get(n)
    if found is None:
        found = _BULK[n] = b"*%d\r\n%%b" % (8 + n) + b"$%d\r\n%b\r\n" * (n + 1)
    return found


def _transition_result(reply: list[Any] | int) -> TransitionResult:
    """The TRANSITION script's reply as a :class:`TransitionResult`."""
    if type(reply) is int:  # applied: the usual answer, the new version alone (made without NamedTuple's keywords)
        return _new_result(TransitionResult, (1, reply, "", (), ()))
    assert isinstance(reply, list)
    code = int(reply[0])
    if code == 1:
        cancelled = reply[2]
        return _new_result(TransitionResult, (1, int(reply[1]), "", tuple(t.decode() for t in cancelled)
                                              if cancelled else (), cancel_reasons(reply[3] if len(reply) > 3
                                                                                   else None)))
    if code == 3:
        return TransitionResult(3, int(reply[1]), lease=(reply[2] or b"").decode())
    if code in (2, 4, 6, 7):
        return TransitionResult(code, int(reply[1]))
    return TransitionResult(code)

#: how many plans a store keeps decoded (by plan id): the oldest is dropped past that (loaded again if needed)
PLAN_CACHE_SIZE = 256


class Store:
    """The run store of one deployment (one key prefix) on one Redis client.

    Every call goes through a :class:`~flowdsl.runtime.redis.scripts.Batcher`,
    so calls made concurrently share pipelines. Plans are cached by plan id.
    """

    def __init__(self, client: aioredis.Redis, keys: Keys, *, batcher: Batcher | None = None):
        self.client = client
        self.keys = keys
        self.batcher = batcher or Batcher(client)
        #: the largest argument the server takes (its proto-max-bulk-len, when a worker could read it and it is
        #: below TRANSITION_LIMIT: a larger one makes the server drop the connection)
        self.bulk_limit = TRANSITION_LIMIT
        self.plans: dict[str, dict[str, Any]] = {}
        # the calls made once per run, packed here on the lean connection (:class:`_RunCommand`)
        self._run_keys = _RunCommand(keys.run_keys(_RUN_MARK), head=_TRANSITION_HEAD)
        self._submission = _RunCommand(["HMGET", keys.run(_RUN_MARK), *_SUBMISSION], head=b"*%d\r\n" % (
            2 + len(_SUBMISSION)))
        #: plan id -> the futures of the reads waiting for its read in flight
        self._plan_reads: dict[str, list[asyncio.Future[dict[str, Any] | None]]] = {}
        #: outbox entries whose drop was lost with its connection, being sent again (:meth:`_drop_again`)
        self._drops: set[asyncio.Task[None]] = set()

    def call(self, *args: Any) -> asyncio.Future[Any]:
        return self.batcher.call(*args)

    async def load_scripts(self) -> None:
        """Load every script a worker runs into the server's cache (after a restart they are loaded again
        on first use: ``NOSCRIPT``)."""
        await asyncio.gather(*(s.load(self.batcher) for s in (_TRANSITION, _LOAD, _PICKUP, _RELEASE, _RELAY,
                                                               _RECOVER, _CLAIM)))

    async def probe(self, keys: list[str], *, persist: bool = False) -> int:
        """Run a script that writes nothing on ``keys`` (one slot): Redis refuses it (``NOPERM``) unless this
        connection's ACL user may run scripts and read and write every one of them (``persist``: and send
        PERSIST, as a transition does, on those of them that do not exist)."""
        return int(await _PROBE(self.batcher, keys, ["persist" if persist else ""]))

    # --- runs --------------------------------------------------------------------------

    async def plan(self, run_id: str, pid: str) -> dict[str, Any] | None:
        """The plan of a run, from the cache or the run's hash (the same dict object for a plan id)."""
        found = self.plans.get(pid)
        if found is not None:
            return found
        # one read per plan id at a time: a worker starting on a backlog of start requests would otherwise read
        # and decode the same plan (a few KB) once per request in flight, hundreds of times
        waiting = self._plan_reads.get(pid)
        if waiting is not None:
            # a future of its own, which only its own cancellation cancels (as asyncio.shield would make, for
            # three turns of the event loop instead of one)
            mine: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
            waiting.append(mine)
            found = await mine
            # None: that run's hash had no plan (expired) or its read failed: read this run's own
            return found if found is not None else await self._read_plan(run_id, pid)
        waiting = self._plan_reads[pid] = []
        try:
            found = await self._read_plan(run_id, pid)
        finally:
            del self._plan_reads[pid]
            for mine in waiting:
                if not mine.done():  # (cancelled)
                    mine.set_result(found)
        return found

    async def _read_plan(self, run_id: str, pid: str) -> dict[str, Any] | None:
        raw = await self.call("HGET", self.keys.run(run_id), "plan")
        if raw is None:
            return None
        if len(self.plans) >= PLAN_CACHE_SIZE:  # the oldest goes: a long-lived worker sees many plans
            self.plans.pop(next(iter(self.plans)))
        return self.plans.setdefault(pid, decoded(run_id, self.keys.run(run_id), "plan", raw))

    async def load(self, run_id: str) -> RunRecord | None:
        """The run's current state and version, or None when it has not started (or has expired); raises
        :class:`~flowdsl.kernel.NewerVersion` for a run of newer kernel rules than this code knows."""
        raw, version, pid, sts, snapshot_version, tail, *rest = await _LOAD(self.batcher,
                                                                            self.keys.run_keys(run_id)[:2], [])
        if version is None or raw is None or pid is None:
            return None
        plan = await self.plan(run_id, pid.decode())
        if plan is None:
            return None
        run, journal = self.keys.run(run_id), self.keys.journal(run_id)
        state, current = decoded(run_id, run, "state", raw), _number(run_id, run, "v", version)
        check_rules(state.get("kernel", 1), run_id)  # (apply checks too; a snapshot with no tail is read as is)
        at = snapshot = _number(run_id, run, "sv", snapshot_version) if snapshot_version is not None else current
        for entry_id, fields in tail:  # the input events journaled after the snapshot, in order (notes are skipped)
            entry = dict(zip(fields[::2], fields[1::2], strict=True))
            if b"in" not in entry:
                continue
            named = entry_id.decode()
            v = _number(run_id, journal, "v", entry.get(b"v") or b"", named)
            if at < v <= current:
                apply(plan, state, decoded(run_id, journal, "in", entry[b"in"], entry=named))
                at = v
        if at != current:
            raise RunDamaged(run_id, journal, "", f"ends at version {at}, but the field 'v' of the key '{run}' says "
                             f"{current}: journal entries are missing")
        return RunRecord(run_id, state, current, plan, int(sts) if sts else None, len(raw), current - snapshot,
                         born=(rest[0] or b"").decode() if rest else "")

    async def damage(self, run_id: str) -> RunDamaged | None:
        """What is damaged in the run's stored data, if anything: the first of its fields that cannot be decoded
        (the run's ``state``, ``plan`` and ``input``; each journal entry's ``v``, ``in``, ``ev``, ``note`` and
        ``resolved``), as
        the :class:`RunDamaged` reading it would raise. For saying what went wrong once a read failed: it reads
        the whole journal."""
        run, journal = self.keys.run(run_id), self.keys.journal(run_id)
        state, plan, run_input = await self.call("HMGET", run, "state", "plan", "input")
        entries = await self.call("XRANGE", journal, "-", "+")
        try:
            for name, raw in (("state", state), ("plan", plan), ("input", run_input)):
                if raw is not None:
                    decoded(run_id, run, name, raw)
            for entry_id, flat in entries:
                fields = dict(zip(flat[::2], flat[1::2], strict=True)) if isinstance(flat, list) else flat
                named = entry_id.decode()
                for name, kind in (("in", dict), ("ev", list), ("note", dict), ("resolved", dict)):
                    if name.encode() in fields:
                        decoded(run_id, journal, name, fields[name.encode()], kind, named)
                if b"v" in fields:
                    _number(run_id, journal, "v", fields[b"v"], named)
        except RunDamaged as exc:
            return exc
        return None

    async def submission(self, run_id: str) -> dict[str, Any] | None:
        """The submitted start request of a run (plan, input, settings; ``cancel``: the reasons of the cancel
        requests held for its start, in order), or None."""
        key = self.keys.run(run_id)
        read = self.call("HMGET", key, *_SUBMISSION) if self.batcher.wire is None else \
            self.batcher.call_packed(self._submission.pack(run_id))
        # (unpacked, not zipped into a dict: one read per run started)
        submitted, raw_pid, raw_input, seed, ret, sts, version, cancel, born = await read
        if submitted is None or raw_pid is None or raw_input is None:
            return None
        pid = raw_pid.decode()
        plan = await self.plan(run_id, pid)
        if plan is None:
            return None
        return {"plan": plan, "pid": pid, "input": decoded(run_id, key, "input", raw_input),
                "seed": int(seed) if seed else None, "ret": int(ret) if ret else None,
                "sts": int(sts) if sts else None, "started": version is not None,
                "cancel": cancel_reasons(cancel), "born": (born or b"").decode()}

    async def transition(self, run_id: str, *, expected: int, state: bytes, token: str, status: str,
                         entries: Sequence[JournalEntry], outbox: bytes | None = None, finished: bool = False,
                         task_ops: Sequence[TaskOp] = (), meta: Sequence[tuple[str, Any]] = (),
                         born: str = "", record: RunRecord | None = None) -> TransitionResult:
        """Write one transition atomically (the TRANSITION script); see :class:`TransitionResult`.

        ``expected`` is the version the state was computed from (0: create the
        run); ``entries`` are the input events it applied, in order, each
        journaled with its own version (expected + 1, + 2, …); ``state`` is
        written as the run's snapshot, or nothing when empty (:meth:`load` then
        replays the journaled input events); a :data:`JournalEntry`'s guard
        is ``(task id, mode, value)`` with mode ``lease`` (the task must be held
        under lease token ``value``, or no longer be in flight), ``strict`` (held
        under ``value``), ``eq`` (its lease value equals ``value``) or ``new`` (an input event applied once only, a
        signal: "task id" is a field of the run's hash that must not exist; the transition sets it to the event's
        journal entry id). Every guard
        is checked before anything is written. When the one entry's ``lease``
        guard fails and its ``reporter`` (a worker's name) is given, a
        ``result_rejected`` note (reason ``lease_lost``) is journaled, built from
        its input event; with several entries a failed guard writes nothing
        (code 7). ``task_ops`` are ``(s|d|x|g|t, task id, value)``: set, delete, mark
        cancelled, given up (a held lease is kept, marked cancelled, until its holder answers; any other
        is deleted), the attempt's deadline (its timeout timer's due time, ms: :meth:`pickup` starts no attempt
        past it); or ``(c, task id, lease, message)``: a task the caller runs
        itself, held at once, its message kept for recovery. ``meta``: fields of the run's hash to set, ``(name,
        value)`` — an empty value deletes the field. ``born``: the run's generation the state was
        computed from; a run of the id of another generation (the one computed from expired, the id submitted
        again) is a version conflict (code 2), so the caller loads the run again ('': not checked).
        ``record``: the run's record, if the caller has one (its keys are packed once: :meth:`packed`).
        """
        # one flat JSON header for every small argument, then the blobs (see TRANSITION): hiredis formats each
        # argument's length with sprintf, so a step's ~29 arguments cost more to pack than the 11 of this form
        args: list[Any] = [b""]
        if state:
            args.append(state)
        if outbox:
            args.append(outbox)
        header: list[Any] = [expected, token, status, finished, bool(state), bool(outbox), len(entries)]
        for input_event, events, guard, reporter in entries:
            header += guard or _NO_GUARD
            header.append(reporter)
            args += (input_event, events)
        header.append(len(task_ops))
        for op in task_ops:
            if op[0] == "c":
                header += op[:3]
                args.append(op[3])
            else:
                header += op
        header.append(len(meta))
        for name, value in meta:
            header += (name, value if type(value) is str else str(value))
        header.append(born)
        try:
            args[0] = _orjson(header)  # (orjson itself: the codec's wrapper is a call more, and says the same)
        except TypeError:
            args[0] = dumps(header)
        size = sum(map(len, args))
        if size > TRANSITION_LIMIT:
            raise RunTooLarge(run_id, size)
        if self.bulk_limit < TRANSITION_LIMIT and max(map(len, args)) > self.bulk_limit:
            raise RunTooLarge(run_id, max(map(len, args)), self.bulk_limit)
        try:  # (Script's call inlined: a coroutine less per step)
            if self.batcher.wire is None:
                reply = await self.batcher.call("EVALSHA", _TRANSITION.sha, 4, *self.keys.run_keys(run_id), *args)
            else:  # packed here, as step() packs (hiredis formats each argument's length with sprintf)
                parts: list[Any] = [self.packed(record, run_id)]
                for arg in args:
                    parts += (len(arg), arg)
                reply = await self.batcher.call_packed(_bulk(len(args) - 1) % tuple(parts))
        except NoScriptError:  # the server forgot it (restarted, SCRIPT FLUSH): loaded again, called again
            reply = await _TRANSITION(self.batcher, self.keys.run_keys(run_id), args)
        return _transition_result(reply)

    def packed(self, record: RunRecord | None, run_id: str) -> bytes:
        """``EVALSHA <sha> 4 <the run's four keys>`` as RESP: the start of its TRANSITION calls on the lean
        connection, kept in ``record.packed`` (packed once per record)."""
        if record is not None and record.packed:
            return record.packed
        packed = self._run_keys.pack(run_id)
        if record is not None:
            record.packed = packed
        return packed

    async def step(self, record: RunRecord, token: str, status: str, finished_at: int | None, state: bytes,
                   entry: JournalEntry, held: tuple[str, str, bytes] | None, waits: str | None = None
                   ) -> TransitionResult:
        """:meth:`transition` of a chained step of ``record`` (from its version, of its generation), in one
        straight line: one input event ``entry`` whose guard names the task it answers, that task ended (``d``)
        and ``held`` (task id, lease, kept message), the task it dispatched to the caller (``c``), or None; no
        outbox entry; ``finished_at``: the run ended, at that time (its ``finished`` meta field); ``waits``: the
        run's ``w`` meta field, after ``finished`` ('' deletes it; None: not written). The same
        arguments as ``transition``'s for it (tests/redis/test_hot_path.py compares them), so the same writes;
        on the lean connection, packed here (``record.packed``: its keys, packed once)."""
        input_event, events, guard, reporter = entry
        assert guard is not None
        g0, g1, g2 = guard
        finished = finished_at is not None
        if held is None:
            header: list[Any] = [record.version, token, status, finished, bool(state), False, 1, g0, g1, g2,
                                 reporter, 1, "d", g0, ""]
            blobs: tuple[bytes, ...] = (state, input_event, events) if state else (input_event, events)
        else:
            header = [record.version, token, status, finished, bool(state), False, 1, g0, g1, g2, reporter,
                      2, "c", held[0], held[1], "d", g0, ""]
            blobs = (state, input_event, events, held[2]) if state else (input_event, events, held[2])
        if finished_at is None and waits is None:
            header += (0, record.born)
        elif waits is None:
            header += (1, "finished", str(finished_at), record.born)
        elif finished_at is None:
            header += (1, WAITS_FIELD, waits, record.born)
        else:
            header += (2, "finished", str(finished_at), WAITS_FIELD, waits, record.born)
        try:
            head = _orjson(header)
        except TypeError:
            head = dumps(header)
        size = len(head) + sum(map(len, blobs))
        if size > TRANSITION_LIMIT:
            raise RunTooLarge(record.run_id, size)
        if self.bulk_limit < TRANSITION_LIMIT and max(len(head), *map(len, blobs)) > self.bulk_limit:
            raise RunTooLarge(record.run_id, max(len(head), *map(len, blobs)), self.bulk_limit)
        try:
            if self.batcher.wire is None:
                reply = await self.batcher.call("EVALSHA", _TRANSITION.sha, 4, *self.keys.run_keys(record.run_id),
                                                head, *blobs)
            else:
                parts: list[Any] = [record.packed or self.packed(record, record.run_id), len(head), head]
                for blob in blobs:
                    parts += (len(blob), blob)
                reply = await self.batcher.call_packed(_BULK[len(blobs)] % tuple(parts))
        except NoScriptError:
            reply = await _TRANSITION(self.batcher, self.keys.run_keys(record.run_id), [head, *blobs])
        return _transition_result(reply)

    # --- the run index -----------------------------------------------------------------

    async def unlist(self, entries: list[tuple[bytes, bytes]]) -> int:
        """Remove run index entries ``(run id, score)`` (runs found expired), each only while its score is
        unchanged: a run id submitted again since is listed by its new submission and stays."""
        if not entries:
            return 0
        return int(await _UNLIST(self.batcher, [self.keys.runs], [x for pair in entries for x in pair]))

    async def prune_index(self, start: int, page: int = 200, unstarted: list[str] | None = None,
                          before: int = 0) -> tuple[int, bool, int]:
        """Check one page of the run index (from rank ``start``, oldest first) and remove the runs that no
        longer exist (expired); return the rank the next page starts at, whether this was the last page, and
        how many runs it removed. ``unstarted`` gets the ids of the runs of the page submitted before
        ``before`` (ms, the server's clock) and not started (no ``v``).

        The run that ends a run cannot touch the index (another Cluster slot), so worker processes walk it
        page by page (:meth:`~flowdsl.runtime.redis.upkeep.Upkeep._tidy`): it stays about as long as the runs
        it lists."""
        pairs = score_pairs(await self.call("ZRANGE", self.keys.runs, start, start + page - 1, "WITHSCORES"))
        if not pairs:
            return 0, True, 0
        found = await asyncio.gather(*(self.call("HMGET", self.keys.run(r.decode()), "submitted", "v", "status")
                                       for r, _ in pairs))
        removed = await self.unlist([pair for pair, got in zip(pairs, found, strict=True) if got == [None] * 3])
        if unstarted is not None:
            for (run_id, _), (submitted, version, _) in zip(pairs, found, strict=True):
                if version is None and submitted is not None and submitted.isdigit() and int(submitted) < before:
                    unstarted.append(run_id.decode())
        return (0, True, removed) if len(pairs) < page else (start + len(pairs) - removed, False, removed)

    # --- start requests ------------------------------------------------------------------

    def send_start(self, run_id: str) -> asyncio.Future[Any]:
        """Ask for the run's start: a start request on the control stream (a second one for a run already
        started, or being started, is acknowledged and does nothing: :meth:`Advancer.start`)."""
        return self.call("XADD", self.keys.control, "*", "c", dumps({"type": "start", "run_id": run_id}))

    async def start_requests(self, dead: bool = False, limit: int = START_SCAN_LIMIT) -> dict[str, str] | None:
        """The runs the start requests of the control stream name (``dead``: of the dead letters set aside from
        it), each with the id of its first such entry; None when that stream holds more than ``limit`` entries
        (a backlog: not read through). Reads the whole stream, 1,000 entries a page."""
        stream = self.keys.dead if dead else self.keys.control
        field = b"f:c" if dead else b"c"
        if int(await self.call("XLEN", stream)) > limit:
            return None
        found: dict[str, str] = {}
        start = "-"
        while True:
            reply = await self.call("XRANGE", stream, start, "+", "COUNT", 1000)
            for entry_id, raw in reply or ():
                fields = entry_fields(raw)
                if dead and fields.get(b"stream", b"").decode(errors="replace") != self.keys.control:
                    continue
                try:
                    msg = loads(fields.get(field) or b"")
                except (ValueError, RecursionError):
                    continue  # (not a request: a dead letter's business)
                if isinstance(msg, dict) and msg.get("type") == "start" and isinstance(msg.get("run_id"), str):
                    found.setdefault(msg["run_id"], entry_id.decode() if isinstance(entry_id, bytes) else entry_id)
            if not reply or len(reply) < 1000:
                return found
            last = reply[-1][0]
            start = "(" + (last.decode() if isinstance(last, bytes) else last)

    async def resolve(self, run_id: str, by: str, note: str) -> list[Any]:
        """Mark a run that needs a person as resolved, and apply its retention from now (the RESOLVE script: its
        reply)."""
        return list(await _RESOLVE(self.batcher, self.keys.run_keys(run_id), [by, note]))

    async def forget_consumers(self, stream: str, idle_ms: int, keep: str) -> int:
        """Delete the consumer names of ``stream``'s group idle longer than ``idle_ms`` and holding no entry
        (``keep``: this process's own name, kept); returns how many."""
        return int(await _FORGET_CONSUMERS(self.batcher, [stream], [GROUP, idle_ms, keep]))

    # --- tasks ---------------------------------------------------------------------------

    async def pickup(self, run_id: str, task_id: str, trigger: str, token: str,
                     outbox_version: str = "", generation: str = "") -> tuple[int, str]:
        """Take a task's lease: (0 gone | 1 run | 2 answer cancelled | 3 duplicate, lease value | 4 newer kernel
        rules than this code knows, their version; nothing taken | 5 its deadline passed, how many ms ago; nothing
        taken: the attempt is not to run, its timeout timer times it out).

        ``trigger`` names the delivery (:meth:`Keys.trigger`); a lease taken under the same trigger (the
        delivery was taken over from its dead holder) is taken over.

        ``outbox_version`` (the message's ``v``) names the outbox entry that
        dispatched the task: the message exists, so that entry's relay is done and
        it is dropped here (if a crash came between its relay and its own drop).
        ``generation`` (the message's ``g``): a message of another generation of the run id (an expired run
        of the same id left it) is dropped, answered as gone.
        """
        reply = await _PICKUP(self.batcher, [self.keys.tasks(run_id), self.keys.outbox(run_id), self.keys.run(run_id)],
                              [task_id, trigger, token, outbox_version, generation, kernel.STATE_VERSION])
        value = reply[1] if len(reply) > 1 else b""
        return int(reply[0]), (value.decode() if isinstance(value, bytes) else str(value))

    async def leases(self, held: list[tuple[str, str]]) -> list[str]:
        """The lease values of ``(run id, task id)`` pairs ('' for tasks no longer in flight)."""
        replies = await asyncio.gather(*(self.call("HGET", self.keys.tasks(r), t) for r, t in held))
        return [(v or b"").decode() for v in replies]

    async def release(self, run_id: str, task_id: str, token: str) -> bool:
        """Hand a held task back (its lease becomes ``q`` again). False when it was not held under ``token``."""
        return bool(await _RELEASE(self.batcher, [self.keys.tasks(run_id)], [task_id, token]))

    @staticmethod
    def ack_op(stream: str, entry_id: str, consumer: str) -> dict[str, Any]:
        """The relay operation that acknowledges and deletes a stream entry (no trimming ever: an entry
        leaves its stream only once acknowledged) — if it is still ``consumer``'s: a process that was paused
        past the lease finds its delivery taken over, perhaps with tasks held under it, which the taker (or
        whoever takes it over next) acknowledges; deleted, they would be nobody's."""
        return {"o": "ack", "s": stream, "i": entry_id, "c": consumer}

    @staticmethod
    def timer_done_op(member: str) -> dict[str, Any]:
        """The relay operation that ends a timer claim."""
        return {"o": "done", "k": member}

    async def relay(self, run_id: str | None, version: int | None, ops: list[dict[str, Any]]) -> None:
        """Carry out outbox ``ops`` (and acknowledgements) in one RELAY script, then drop the outbox entry
        ``version`` of ``run_id`` (a pickup drops it too: the message it relayed exists; either is enough — an
        entry kept after its relay would be relayed again at every recovery, piling up the messages of a task
        nobody picks up)."""
        if len(ops) == 1 and ops[0]["o"] == "ack" and version is None and self.batcher.wire is not None:
            await self._ack(ops[0])  # (a run's end, or a message dropped: a trigger's acknowledgement alone)
            return
        keys: list[str] = []
        index: dict[str, int] = {}

        def key(name: str) -> int:
            if name not in index:
                keys.append(name)
                index[name] = len(keys)
            return index[name]

        args: list[Any] = [GROUP]
        for op in ops:
            kind = op["o"]
            if kind == "task":
                args += ["x", key(op["q"]), op.get("raw") or dumps(op["m"]), op.get("v", ""), op.get("g", "")]
            elif kind == "timer":
                args += ["z", key(self.keys.timers), op["d"], op["k"]]
            elif kind == "untimer":
                args += ["r", key(self.keys.timers), op["k"]]
            elif kind == "cancel":
                args += ["p", self.keys.cancel_channel, op["t"]]
            elif kind == "ack":
                args += ["a", key(op["s"]), op["i"], op["c"]]
            elif kind == "done":
                args += ["r", key(self.keys.timers_claimed), op["k"]]
        if len(args) > 1:
            await _RELAY(self.batcher, keys, args)
        if run_id is not None and version is not None:  # only once the relay is done; not awaited (waiting for it
            # would hold the handler one more round trip), but never lost to a dropped connection: sent again
            # (_dropped). Left, the entry would be relayed again by every later recovery of the run (a crash in
            # between still leaves it: a duplicate message, dropped at pickup)
            self._drop(run_id, version)

    def _drop(self, run_id: str, version: int) -> None:
        self.call("HDEL", self.keys.outbox(run_id), version).add_done_callback(
            lambda future: self._dropped(future, run_id, version))

    def _dropped(self, future: asyncio.Future[Any], run_id: str, version: int) -> None:
        """An outbox entry's drop answered: when the connection failed it (or Redis refused it for now), it is
        sent again, with backoff, in a task of its own."""
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None or not (isinstance(exc, TRANSIENT) or server_unwell(exc)):
            return  # (dropped; or refused for good — NOPERM, say — which the process's other commands meet too)
        task = asyncio.get_running_loop().create_task(self._drop_again(run_id, version))
        self._drops.add(task)
        task.add_done_callback(self._drops.discard)

    async def _drop_again(self, run_id: str, version: int) -> None:
        """Send the drop of a relayed outbox entry again until Redis takes it (an ``HDEL``: idempotent), at most
        :data:`_DROP_TRIES` times."""
        backoff = Backoff()
        for _ in range(_DROP_TRIES):
            await backoff.wait()
            try:
                await self.call("HDEL", self.keys.outbox(run_id), version)
                return
            except Exception as exc:
                if not (isinstance(exc, TRANSIENT) or server_unwell(exc)):
                    return
        log.debug("run %s: outbox entry %s relayed but not dropped (Redis unreachable): a later recovery of the "
                  "run relays it again (a duplicate message, dropped at pickup)", run_id, version)

    async def settle(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the drops of relayed outbox entries being sent again, then give up
        the rest (a process stopping)."""
        if self._drops:
            await asyncio.wait(set(self._drops), timeout=timeout)
        for task in list(self._drops):
            task.cancel()

    async def _ack(self, op: dict[str, Any]) -> None:
        """:meth:`relay` of one acknowledgement (``ack_op``), packed here (:data:`_ACK`): the same RELAY call."""
        stream, entry_id, consumer = op["s"].encode(), op["i"].encode(), op["c"].encode()
        try:
            await self.batcher.call_packed(_ACK % (len(stream), stream, len(entry_id), entry_id, len(consumer),
                                                   consumer))
        except NoScriptError:
            await _RELAY(self.batcher, [op["s"]], [GROUP, "a", 1, op["i"], op["c"]])

    async def outbox(self, run_id: str, trigger: str = "") -> list[tuple[int | None, list[dict[str, Any]]]]:
        """What a process that died left to relay for the run: its outbox entries, oldest first, then the
        messages of self-run tasks queued again. ``trigger`` (a delivery being taken over) first queues
        again every task held under it (the RECOVER script); its messages are then among those returned."""
        raw = await _RECOVER(self.batcher, [self.keys.tasks(run_id), self.keys.outbox(run_id), self.keys.run(run_id)],
                             [trigger])
        entries: list[tuple[int, list[dict[str, Any]]]] = []
        queued: list[dict[str, Any]] = []
        generation = ""
        for i in range(0, len(raw), 2):
            field, value = raw[i].decode(), raw[i + 1]
            if field == "g":  # (first)
                generation = value.decode()
            elif field.startswith("s:"):
                queued.append({"o": "task", "q": self.keys.queue_of(loads(value)), "raw": value, "v": "",
                               "g": generation})
            else:
                entries.append((int(field), loads(value)))
        entries.sort(key=lambda kv: kv[0])
        return [*entries, *((None, [op]) for op in queued)]

    # --- dead letters --------------------------------------------------------------------------

    async def dead_letter(self, stream: str, entry_id: str, consumer: str, fields: dict[bytes, bytes], *,
                          reason: str, trigger: str, threshold: int = 0,
                          remember_ms: int = 86_400_000) -> tuple[int, int, str | None]:
        """Count a failed handling of a stream entry ``consumer`` holds and, at ``threshold`` failures (0: now),
        set it aside in the dead-letter stream (the DEAD_LETTER script); the count is kept ``remember_ms`` after
        the last failure. Returns (code, failures so far, the dead letter's id): code 0 counted and kept, 1 set
        aside, 2 not pending with the consumer (taken over, or handled by another: nothing done)."""
        args: list[Any] = [GROUP, entry_id, consumer, threshold, reason, remember_ms]
        for name, value in fields.items():
            args += [name, value]
        reply = await _DEAD_LETTER(self.batcher, [stream, self.keys.dead, self.keys.failures(trigger)], args)
        code = int(reply[0])
        failures = int(reply[1]) if len(reply) > 1 else 0
        dead_id = reply[2].decode() if len(reply) > 2 and isinstance(reply[2], bytes) else \
            (str(reply[2]) if len(reply) > 2 else None)
        return code, failures, dead_id

    async def requeue(self, dead_id: str, stream: str, trigger: str) -> tuple[int, str | None]:
        """Put dead letter ``dead_id`` (from ``stream``) back on its stream, to take over ``trigger`` (the REQUEUE
        script). Returns (1, the new entry's id) | (0, None) no such dead letter | (2, None) not from ``stream``."""
        reply = await _REQUEUE(self.batcher, [self.keys.dead, stream], [dead_id, trigger])
        code = int(reply[0])
        if code != 1:
            return code, None
        return 1, reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])

    # --- timers --------------------------------------------------------------------------------

    async def claim_timers(self, lease_ms: int, limit: int = 100) -> tuple[int, list[str], list[str], int | None]:
        """Claim due timers: (server now, due members, re-claimed members of dead firers, next due or None)."""
        reply = await _CLAIM(self.batcher, [self.keys.timers, self.keys.timers_claimed], [lease_ms, limit])
        nxt = reply[3]
        return (int(reply[0]), [m.decode() for m in reply[1]], [m.decode() for m in reply[2]],
                int(float(nxt)) if nxt else None)
