"""Reading and following one run: its result, plan and journal, live to its end and past it while it must.

Stage: runtime: redis. Imports redis, ``flowdsl.runtime.report`` (:class:`RunResult`, the object ``--format json``
prints), ``flowdsl.runtime.late`` (late answers, what is in doubt) and this package's ``client_listing``,
``connection``, ``keys``, ``store`` and ``wire``. :class:`Following` is mixed into
:class:`~flowdsl.runtime.redis.client.RedisClient` (whose attributes it uses): :meth:`Following.result` and
:meth:`Following.plan_of` read a run as it stands, :meth:`Following.follow` waits for its end (surviving lost
connections, noticing a run whose keys were lost: :class:`RunGone`) while a :class:`Journal` takes in what the
run's journal says. ``client`` re-exports :class:`RunGone` and :class:`Journal`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from flowdsl.runtime.late import (
    attempt_label,
    in_doubt_items,
    in_doubt_notice,
    late_answer_effect,
    late_grace_seconds,
    may_answer_late,
    stopped_waiting,
)
from flowdsl.runtime.redis.client_listing import RunInfo, RunNotFound, _text
from flowdsl.runtime.redis.connection import TRANSIENT, Backoff, ServerFacts, server_unwell
from flowdsl.runtime.redis.keys import Keys, check_run_id
from flowdsl.runtime.redis.store import Store, decoded
from flowdsl.runtime.redis.wire import WireConnection, entry_fields, stream_entries
from flowdsl.runtime.report import RunResult

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["Following", "Journal", "RunGone", "read_journal", "reconnect"]

EventHook = Callable[[dict[str, Any]], None]
#: a follower with no news for this long checks that the run still exists (it also does after an outage)
_EXISTS_EVERY_S = 10.0
NoticeHook = Callable[[str], None]


class RunGone(LookupError):
    """A run that existed while it was being followed no longer does (its keys were lost: a Redis restarted
    without persistence, a flushed database, an expiry)."""

    def __init__(self, run_id: str, facts: ServerFacts | None = None):
        causes = (f"{facts.loss_causes()}?" if facts is not None and facts.evicts else
                  "was Redis restarted without persistence, or its database flushed?")
        super().__init__(f"run '{run_id}' no longer exists in Redis ({causes})")
        self.run_id = run_id


@dataclass
class Journal:
    """A run's journal read so far: kernel events, input events and runtime notes, in order."""

    events: list[dict[str, Any]] = field(default_factory=list)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)
    #: the resolutions a person made of the run (``resolved`` entries), oldest first
    resolutions: list[dict[str, Any]] = field(default_factory=list)
    #: input and kernel events in journal order (each entry's input, then the events it caused)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    last_id: str = "0-0"
    finished: bool = False
    run_id: str = ""  # whose journal, and its key: what a damaged entry's error names
    key: str = ""

    def add(self, entry_id: bytes | str, fields: dict[bytes, bytes], hook: EventHook | None = None) -> None:
        """Take one journal entry; raises :class:`~flowdsl.runtime.redis.store.RunDamaged` for one that is not
        what flowdsl writes."""
        self.last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        if b"note" in fields:
            self.notes.append(self._decoded(fields[b"note"], "note", dict))
            return
        if b"resolved" in fields:
            self.resolutions.append(self._decoded(fields[b"resolved"], "resolved", dict))
            return
        if fields.get(b"in"):
            self.inputs.append(self._decoded(fields[b"in"], "in", dict))
            self.timeline.append(self.inputs[-1])
        for event in self._decoded(fields.get(b"ev") or b"[]", "ev", list):
            self.events.append(event)
            self.timeline.append(event)
            if event["type"] == "run_finished":
                self.finished = True
            if hook is not None:
                try:
                    hook(event)
                except Exception:  # a broken observer must not break following
                    hook = None

    def _decoded(self, raw: bytes, name: str, kind: type) -> Any:
        return decoded(self.run_id, self.key, name, raw, kind, self.last_id)

    def llm_calls(self) -> dict[str, list[dict[str, Any]]]:
        scheduled = {e["task_id"]: e for e in self.events if e["type"] in ("step_scheduled", "compensation_started")}
        calls: dict[str, list[dict[str, Any]]] = {}
        for event in self.inputs:
            sched = scheduled.get(event.get("task_id"))
            if "llm" in event and sched is not None:
                call = {"task_id": event["task_id"], "attempt": sched["attempt"], "outcome": event["type"]}
                calls.setdefault(sched["step"], []).append({**call, **event["llm"]})
        return calls


class Following:
    """One run read and followed (see the module doc); a mixin of ``RedisClient``."""

    # what the client provides
    keys: Keys
    redis: aioredis.Redis
    store: Store
    _url: str | None
    _readers: list[WireConnection]
    server_facts: Callable[[], Coroutine[Any, Any, ServerFacts | None]]
    info: Callable[[str], Coroutine[Any, Any, RunInfo]]
    workers: Callable[..., Coroutine[Any, Any, list[dict[str, Any]]]]

    async def result(self, run_id: str) -> tuple[RunResult | None, Journal]:
        """The run's result as it stands (None while it has not started) and its journal."""
        check_run_id(run_id)
        await self.info(run_id)
        journal = Journal(run_id=run_id, key=self.keys.journal(run_id))
        for entry_id, fields in await self.store.call("XRANGE", self.keys.journal(run_id), "-", "+"):
            journal.add(entry_id, entry_fields(fields))
        return await self._result(run_id, journal), journal

    async def plan_of(self, run_id: str) -> dict[str, Any]:
        """The plan a run was submitted with; raises :class:`RunNotFound`."""
        check_run_id(run_id)
        pid = await self.store.call("HGET", self.keys.run(run_id), "pid")
        plan = await self.store.plan(run_id, pid.decode()) if pid is not None else None
        if plan is None:
            raise RunNotFound(run_id, self.keys.prefix, await self.server_facts())
        return plan

    async def follow(self, run_id: str, *, on_event: EventHook | None = None, on_notice: NoticeHook | None = None,
                     timeout_s: float | None = None, hint_after_s: float = 3.0,
                     journal: Journal | None = None, late_grace: float | None = None) -> RunResult:
        """Wait for the run's end, calling ``on_event`` with every kernel event as it is journaled.

        Survives lost connections (retries with backoff), a Redis already unreachable when it is called too
        (``on_notice`` is told; ``timeout_s`` bounds the wait, else it waits for Redis to come back). ``on_notice``
        gets a sentence when the run has not started after ``hint_after_s`` (no worker
        running?). ``journal`` (empty): filled with the run's journal as read, for
        what the result does not carry (rejected late results). Raises
        :class:`RunNotFound`, :class:`RunGone` when the run disappears while
        followed (checked after a lost connection, and every 10 s without
        news), or ``TimeoutError`` after ``timeout_s``.

        When the run has ended while a worker still holds an attempt it gave up on (it timed out: a sync
        worker's thread, an async worker ignoring its cancel) of a step whose success would be a late
        completion, or of an undo that failed for good, following goes on until that attempt answers — a
        success turns the run ``needs_intervention``, or undoes the step — at most ``late_grace`` seconds
        (default ``$FLOWDSL_LATE_GRACE``, else 30; 0 does not wait), as the local runtime holds a run's end; what
        has not answered then is in ``RunResult.in_doubt``. ``on_notice`` is told of the wait. A Redis still
        loading its data after a restart is waited for.
        """
        check_run_id(run_id)
        grace = late_grace_seconds(late_grace)
        t0 = time.monotonic()
        backoff = Backoff()
        while True:
            try:
                await self.info(run_id)
                break
            except TRANSIENT as exc:  # Redis unreachable already, or loading its data: wait for it (as for a
                if timeout_s is not None and time.monotonic() - t0 > timeout_s:  # connection lost later)
                    raise TimeoutError(f"run {run_id} did not finish within {timeout_s:g} s: Redis could not be "
                                       f"reached ({exc})") from exc
                if isinstance(exc, redis.BusyLoadingError):  # a restarted Redis reading its data back
                    if backoff.failures == 0 and on_notice is not None:
                        on_notice("Redis is loading its data (it was restarted); waiting for it")
                    await backoff.wait()
                else:
                    await reconnect(backoff, exc, on_notice)
        journal = journal if journal is not None else Journal()
        journal.run_id, journal.key = run_id, self.keys.journal(run_id)
        reader = (self._readers.pop() if self._readers else WireConnection(self._url, client_name="flowdsl-follow")) \
            if self._url else None
        try:
            await self._follow(run_id, journal, reader, on_event, on_notice, timeout_s, hint_after_s, since=t0)
            result = await self._result(run_id, journal)
            if result is None:
                raise RunGone(run_id)
            return await self._past_the_end(run_id, journal, reader, on_event, on_notice, hint_after_s, grace, result)
        finally:
            if reader is not None:
                self._readers.append(reader)

    async def _past_the_end(self, run_id: str, journal: Journal, reader: WireConnection | None,
                            on_event: EventHook | None, on_notice: NoticeHook | None, hint_after_s: float,
                            grace: float, result: RunResult) -> RunResult:
        """After the run's end: follow on while a worker still runs an attempt the run gave up on that could
        still complete late (:meth:`follow`), at most ``grace`` seconds after a quiet settle; the result as it
        stands then, with what is still running then in ``in_doubt``. Survives lost connections."""
        said = False
        ended = time.monotonic()
        until = ended + max(grace, _CANCEL_SETTLE_S)
        backoff = Backoff()
        while True:
            try:
                held = await self._given_up(run_id, journal)
                if held is None or time.monotonic() >= until:
                    # read what the last transitions wrote: an answer may have come between two of these reads
                    await self._catch_up(run_id, journal, on_event)
                    result = await self._result(run_id, journal) or result
                backoff.reset()
            except TRANSIENT as exc:
                await reconnect(backoff, exc, on_notice)
                continue
            if held is None:
                return result
            attempts = held[2]
            if time.monotonic() >= until:
                reason = "late_grace is 0" if grace <= 0 else f"after {grace:g} s, the late_grace"
                result.in_doubt = in_doubt_items(result.plan, result.state, attempts, stopped_waiting(reason),
                                                 journal.events)
                if on_notice is not None and result.in_doubt:
                    on_notice(in_doubt_notice(reason, result.in_doubt))
                return result
            if not said and on_notice is not None and time.monotonic() - ended >= _CANCEL_SETTLE_S:
                said = True
                names = ", ".join(f"{a['step']} ({attempt_label(a)})" for a in attempts)
                on_notice(f"the run ended {result.status}; waiting up to {grace:g} s for {len(attempts)} "
                          f"attempt(s) it gave up on that a worker still runs: {names} — "
                          f"{late_answer_effect(attempts)}")
            journal.finished = False  # read on (the run has ended: no time limit but the grace's)
            await self._follow(run_id, journal, reader, on_event, on_notice, None, hint_after_s, once=True)
            journal.finished = True

    async def _catch_up(self, run_id: str, journal: Journal, on_event: EventHook | None) -> None:
        """Add to ``journal`` the entries written after the last one it holds."""
        for entry_id, fields in await self.store.call("XRANGE", self.keys.journal(run_id), f"({journal.last_id}",
                                                      "+"):
            journal.add(entry_id, entry_fields(fields), on_event)

    async def _given_up(self, run_id: str, journal: Journal
                        ) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]] | None:
        """The ended run's plan, state and the attempts it gave up on that a worker still holds (a lease ``r:`` or
        ``xr:`` marked given up, ``g:<task id>``) whose success would still count (:func:`may_answer_late`: a step's
        a late completion, an undo's that failed for good its step undone); None when there are none."""
        leases = await self.store.call("HGETALL", self.keys.tasks(run_id))
        if not leases:
            return None
        record = await self.store.load(run_id)
        if record is None:
            return None
        plan, state = record.plan, record.state
        scheduled = {e["task_id"]: e for e in journal.events if e["type"] in ("step_scheduled", "compensation_started")}
        fields = {_text(k): _text(v) for k, v in zip(leases[::2], leases[1::2], strict=True)}
        attempts = []
        for task_id, lease in fields.items():
            event = scheduled.get(task_id)
            if event is None or "g:" + task_id not in fields or not lease.startswith(("r:", "xr:")):
                continue
            attempt = {"task_id": task_id, "step": event["step"], "attempt": event["attempt"]}
            if may_answer_late(plan, state, attempt):
                attempts.append(attempt)
        return (plan, state, attempts) if attempts else None

    async def _follow(self, run_id: str, journal: Journal, reader: WireConnection | None,
                      on_event: EventHook | None, on_notice: NoticeHook | None, timeout_s: float | None,
                      hint_after_s: float, once: bool = False, since: float | None = None) -> None:
        """Read the journal on until the run's end is read; ``once``: one read (blocking at most 0.5 s) at most.
        ``timeout_s`` counts from ``since`` (a ``time.monotonic()``; default: now)."""
        key = self.keys.journal(run_id)
        t0 = checked = time.monotonic()
        if since is not None:
            t0 = since
        hinted = False
        backoff = Backoff()
        while not journal.finished:
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"run {run_id} did not finish within {timeout_s:g} s")
            reply: Any  # [(stream, [(entry id, fields)])] or None
            try:
                reply = await read_journal(self.redis, reader, key, journal.last_id)
                if backoff.failures or time.monotonic() - checked > _EXISTS_EVERY_S:
                    # back after an outage, or quiet for a while: a Redis that lost its data (restarted without
                    # persistence, flushed) has no such run any more, and its journal would stay silent forever
                    checked = time.monotonic()
                    if not reply and not await self.store.call("EXISTS", self.keys.run(run_id)):
                        raise RunGone(run_id, await self.server_facts())
                backoff.reset()
            except TRANSIENT as exc:
                await reconnect(backoff, exc, on_notice)
                continue
            except redis.ResponseError as exc:
                if not server_unwell(exc):  # (a failover: the server became a replica, UNBLOCKED; out of memory)
                    raise
                await reconnect(backoff, exc, on_notice)
                continue
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    journal.add(entry_id, fields, on_event)
            if once:
                return
            if not journal.inputs and not hinted and time.monotonic() - t0 > hint_after_s:
                hinted = True
                if on_notice is not None:
                    live = await self.workers()
                    on_notice("the run has not started yet: " + (
                        "no worker process is connected to this Redis under this prefix; start one with "
                        "`flowdsl worker`" if not live else f"{len(live)} worker process(es) are busy or not serving "
                        "this run's steps"))

    async def _result(self, run_id: str, journal: Journal) -> RunResult | None:
        record = await self.store.load(run_id)
        if record is None:
            return None
        plan, state = record.plan, record.state
        wall = None
        if state.get("finished_at") is not None:
            wall = float(state["finished_at"] - state["started_at"])
        return RunResult.from_state(plan, state, journal.events, wall_ms=wall, llm_calls=journal.llm_calls())


async def read_journal(client: aioredis.Redis, reader: WireConnection | None, key: str, since: str) -> Any:
    """One read of a run's journal after entry ``since`` (at most 1,000 entries, blocking at most 0.5 s): on the
    client's own connection, or on ``reader`` (a connection of its own, so a blocked read holds no pool connection).
    ``[(stream, [(entry id, fields)])]``, or None when nothing came."""
    if reader is None:
        return await client.xread({key: since}, count=1000, block=500)
    return stream_entries(await reader.blocking(("XREAD", "COUNT", 1000, "BLOCK", 500, "STREAMS", key, since), 500))


async def reconnect(backoff: Backoff, exc: Exception, on_notice: NoticeHook | None, said: str = "") -> None:
    """Following lost its connection, or Redis refuses to answer for now (a failover under way, out of memory):
    say so the first time in a row (``said``: what to add to a lost connection's notice), then wait the backoff's
    next delay."""
    if backoff.failures == 0 and on_notice is not None:
        if isinstance(exc, redis.ResponseError):
            on_notice(f"Redis refuses for now ({exc}); the run goes on in the worker processes; reading it again "
                      "with backoff")
        else:
            on_notice(f"lost the connection to Redis ({exc}); reconnecting{said}")
    await backoff.wait()


#: seconds following a run past its end keeps quiet about an attempt it gave up on: one whose worker answers its
#: cancel (an async worker that does not ignore it) lets go of its lease within a round trip or two
_CANCEL_SETTLE_S = 0.5
