"""The worker process's background loops: heartbeats, reclaiming, timers, cancellations, burst idleness.

Stage: runtime: redis. Imports redis (its error types; commands go through the worker's client),
``flowdsl.kernel`` (its version error), this package's ``connection``, ``keys``, ``store`` and ``wire``, and
stdlib.
:class:`Upkeep` is mixed into :class:`~flowdsl.runtime.redis.worker.RedisWorker`
(whose attributes it uses); each loop runs as its own task while the worker
serves and ends soon after it stops:

- **heartbeat** — every lease/3: renews the stream lease of every entry the
  process holds (``XCLAIM … JUSTID`` resets the idle time) while its task lease
  is still its own (or it has moved on to the next task of its chain);
  notices cancellations it missed; records liveness; resyncs the clock. At
  start, and with every clock resync, it reads the server's settings: a policy
  that evicts keys, no persistence, a restart of the server are said. Failing
  beats are said once, and so are leases gone unrenewed for longer than a
  lease (other processes may take the entries over) and the first beat that
  works again.
- **reclaimer** — ``XAUTOCLAIM`` of entries idle longer than the lease: they
  are handled here again, as taken over (``recover``).
- **timers** — claims due timers (server clock) and fires them; a claim whose
  firer died is re-claimed after the lease.
- **cancel listener** — pub/sub of cancelled task ids: interrupts the held task once its own lease (in this
  database, under this prefix) says it is being cancelled — pub/sub is server-wide, not per database.
- **tidier** — every ``tidy_s``: removes from the run index the runs that
  expired, up to 2,000 a round, and forgets worker processes silent for
  ``forget_s`` (liveness records; consumer names holding nothing); sends
  again the start request of a run submitted :data:`RESEND_AFTER_LEASES`
  leases ago that never started and whose request is nowhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Any

import redis

from flowdsl.kernel import NewerVersion
from flowdsl.runtime.codec import dumps, loads
from flowdsl.runtime.redis.connection import (
    TRANSIENT,
    Backoff,
    RedisConfigError,
    ServerFacts,
    acl_user,
    groups_lost,
    no_permission,
    replica_error,
    resolve_url,
    server_facts,
    server_unwell,
)
from flowdsl.runtime.redis.keys import GROUP, Keys, TimerMember
from flowdsl.runtime.redis.store import START_SCAN_LIMIT, TRANSITION_LIMIT
from flowdsl.runtime.redis.wire import entry_fields

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from flowdsl.runtime.redis.advance import Advancer
    from flowdsl.runtime.redis.serving import Held, WorkerOptions, WorkerStats
    from flowdsl.runtime.redis.store import Clock, Store
    from flowdsl.workers import WorkerRegistry

__all__ = ["Upkeep"]

log = logging.getLogger("flowdsl.redis")
_UNREACHABLE_OR_REFUSED: tuple[type[BaseException], ...] = (*TRANSIENT, redis.ResponseError)


#: pages of the run index (200 runs each) a tidying round checks besides those it finds mostly expired: those
#: cost nothing against this budget, so a round removes every run that expired in a row, however many (the
#: index is in submission order: runs of one retention expire in it from the front), while a long index of
#: runs still kept is walked 2,000 runs a minute; every process tidies
_INDEX_PAGES = 10
#: cancel requests taken over at a time, and signals (they take no slot)
_CANCELS_PER_CLAIM = 64
_INDEX_PAGE = 200
#: a run submitted this many leases ago and not started, whose start request is nowhere (its submitter stopped
#: between recording it and sending the request), has its start request sent again by a tidying round
RESEND_AFTER_LEASES = 10
#: at most this many start requests are sent again by one tidying round of one process
_RESENDS_PER_ROUND = 100
#: a process that found the start request of every run not started it meets waiting (queued, held by a process,
#: a dead letter) reads the streams again only after this many rounds — unless it meets another such run
_RESCAN_ROUNDS = 10


def _seen(record: bytes) -> int:
    """When a liveness record was last written (0 if unreadable: such a record is forgotten)."""
    try:
        return int(loads(record).get("seen", 0))
    except (ValueError, TypeError, AttributeError):
        return 0


class Upkeep:
    """The background loops of a worker process (see the module doc); a mixin of ``RedisWorker``."""

    #: the server's settings as last read (:meth:`_check_server`)
    _server_facts: ServerFacts | None = None

    # what the worker provides
    name: str
    url: str | None
    keys: Keys
    options: WorkerOptions
    stats: WorkerStats
    registry: WorkerRegistry
    streams: list[str]
    lease_ms: int
    started_at: float
    client: aioredis.Redis | None
    store: Store
    clock: Clock
    advancer: Advancer
    _held: dict[tuple[str, str], Held]
    _by_task: dict[str, Held]
    _starting: set[str]
    _cancelling: set[str]
    _signalling: set[str]
    _parked: set[str]
    _group_streams: list[str]
    _index_size: int | None
    #: the runs not started whose start request this process's last look found waiting, and the rounds since
    _waiting_starts: frozenset[str] = frozenset()
    _rounds_since_look = 0
    _active: set[asyncio.Task[None]]
    _stopping: bool
    _stopped: asyncio.Event | None
    _timer_wake: asyncio.Event | None
    _next_timer: float
    _spawn: Callable[[str, str, dict[bytes, bytes], bool], None]
    _track: Callable[[Awaitable[Any]], None]
    _cancel_requested: Callable[[Held], None]
    _config_error: Callable[[BaseException, str], bool]
    _regroup: Callable[[], Awaitable[None]]
    _parked_full: Callable[[], bool]

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less when the worker stops meanwhile (so that stopping waits for no loop).

        A loop whose task is being cancelled (serve() cancelled: its ``finally`` cancels every loop) stops here,
        even when the cancellation did not reach it as a ``CancelledError``: one that lands in a Redis call can
        come out as that call's ``TimeoutError`` or connection error, which the loop takes for Redis's and goes
        round again — then serve() waited for it a whole pause (a minute, for the tidier)."""
        assert self._stopped is not None
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopped.wait()
        if task is not None and task.cancelling():  # (3.11: a cancel landing as the timeout fires)
            raise asyncio.CancelledError

    async def _heartbeat(self) -> None:
        interval = max(0.05, self.options.lease_s / 3)
        await self._check_server()
        renewed = time.monotonic()  # when the leases were last renewed
        failing: float | None = None  # since when the beats fail (Redis unreachable), said once
        expired = False  # (said once per outage) the leases have gone unrenewed for longer than a lease
        while not self._stopping:
            await self._pause(interval)
            try:
                await self._renew()
                last, renewed = renewed, time.monotonic()
                await self._liveness()  # (it always sends a command; _renew sends none when nothing is held)
                if failing is not None:
                    log.info("worker %s: heartbeat: Redis reachable again, leases renewed (%.1f s after the last "
                             "renewal)", self.name, renewed - last)
                    failing, expired = None, False
                if self.clock.stale():
                    assert self.client is not None
                    await self.clock.sync(self.client)
                    await self._check_server()
            except TRANSIENT as exc:
                if failing is None:
                    failing = time.monotonic()
                    log.warning("worker %s: heartbeat failed (%s); trying again every %.1f s", self.name, exc,
                                interval)
                else:
                    log.debug("worker %s: heartbeat failed again (%s)", self.name, exc)
                unrenewed = time.monotonic() - renewed
                if not expired and unrenewed > self.options.lease_s and (self._held or self._starting):
                    expired = True  # (while partitioned: other processes may be taking this one's work over)
                    log.warning("worker %s: its leases have not been renewed for %.1f s, longer than the lease "
                                "(%g s): other processes may take over the %d entr(ies) it holds and run their "
                                "steps again; results of its own for those are then rejected", self.name, unrenewed,
                                self.options.lease_s, len(self._held) + len(self._starting))
            except Exception as exc:  # never let the heartbeat die: without it every lease of this process expires
                if no_permission(exc):
                    raise  # (unless Redis refuses this ACL user: then the process stops, see RedisWorker._loop_ended)
                if server_unwell(exc) or groups_lost(exc):  # (the reader makes lost groups again)
                    log.warning("worker %s: heartbeat refused by Redis for now (%s)", self.name, exc)
                else:
                    log.exception("worker %s: heartbeat failed unexpectedly; trying again next beat", self.name)

    async def _check_server(self) -> None:
        """Read the server's settings (``INFO``; ``CONFIG GET`` where allowed): at start, say once each setting
        under which the runtime cannot keep its guarantees (eviction, no persistence); later (with every clock
        resync), say when the server restarted — its ``run_id`` changed — and what that may have cost."""
        assert self.client is not None
        try:
            facts = await server_facts(self.client, config_get=acl_user(resolve_url(self.url)) == "default")
        except _UNREACHABLE_OR_REFUSED as exc:
            log.debug("worker %s: the server's settings could not be read (%s)", self.name, exc)
            return
        if facts is None:
            return
        before, self._server_facts = self._server_facts, facts
        if facts.proto_max_bulk_len:  # (a smaller largest value than Redis's 512 MB: the transitions' size check)
            store: Any = self.store  # (loosely typed: a Store without bulk_limit takes it and ignores it)
            store.bulk_limit = min(TRANSITION_LIMIT, facts.proto_max_bulk_len)
        if before is None:
            for warning in facts.warnings():
                log.warning("worker %s: %s", self.name, warning)
        elif before.run_id and facts.run_id and before.run_id != facts.run_id:
            log.warning("worker %s: the Redis server restarted (its run_id changed): %s", self.name,
                        facts.restart_note())
            if facts.warnings() != before.warnings():
                for warning in facts.warnings():
                    log.warning("worker %s: %s", self.name, warning)

    def _loss_causes(self) -> str:
        """The likely causes of data gone from Redis (a lost consumer group, a missing run), by the server's
        settings as last read."""
        facts = self._server_facts
        return facts.loss_causes() if facts is not None else "Redis restarted without persistence, or flushed"

    async def _replica_error(self) -> RedisConfigError | None:
        """The configuration error of a worker pointed at a read-only replica (which refuses every write for
        good: waiting cannot help), or None (a primary, or the server will not say)."""
        assert self.client is not None
        try:
            facts = await server_facts(self.client)
        except _UNREACHABLE_OR_REFUSED:
            return None
        return replica_error(resolve_url(self.url), facts) if facts is not None else None

    async def _renew(self) -> None:
        held = list(self._held.values())
        picked = [(h, h.task_id) for h in held if h.picked]
        values = await self.store.leases([(h.run_id, t) for h, t in picked]) if picked else []
        renew: dict[str, list[Any]] = defaultdict(list)  # stream → entry ids
        for (h, task_id), value in zip(picked, values, strict=True):
            if h.task_id != task_id and not h.lost:
                renew[h.stream].append(h.entry_id)  # it has moved on to the run's next task: still ours
            elif value == "r:" + h.token:
                renew[h.stream].append(h.entry_id)
            elif value == "xr:" + h.token:
                renew[h.stream].append(h.entry_id)
                if not h.cancel:
                    self._cancel_requested(h)  # a cancellation whose notice was missed
            elif value and not h.lost:
                h.lost = True  # reclaimed by another process: stop renewing; our result will be rejected
                log.warning("worker %s: lease of %s lost (another process took its entry over); its result will be "
                            "rejected", self.name, h.task_id, extra={"run_id": h.run_id})
            elif not value and not h.lost:
                # no longer in flight: its result was just written (a chain's next task may already be held
                # under this entry, before this process has taken note of it) or the kernel gave up on it. The
                # entry is still ours until acknowledged: keep it, or a stalled relay would let it be taken over
                renew[h.stream].append(h.entry_id)
        for h in held:
            if not h.picked:
                renew[h.stream].append(h.entry_id)
        if self._starting:  # start requests being handled (or waiting for a slot)
            renew[self.keys.control].extend(self._starting)
        if self._cancelling:
            renew[self.keys.cancels].extend(self._cancelling)
        if self._signalling:
            renew[self.keys.signals].extend(self._signalling)
        if self._parked:  # (signals waiting for their run's start)
            renew[self.keys.signals].extend(self._parked)
        assert self.client is not None
        for stream, ids in renew.items():  # resets the idle time of our own entries: the stream lease
            await self.client.xclaim(stream, GROUP, self.name, 0, ids, justid=True)

    async def _liveness(self) -> None:
        assert self.client is not None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": int(self.started_at * 1000),
                  "seen": self.clock.now(), "lease_ms": self.lease_ms, "concurrency": self.options.concurrency,
                  "workers": sorted(self.registry.names()), "llm": self.options.llm}
        await self.store.call("HSET", self.keys.workers, self.name, dumps(record))

    async def _reclaimer(self) -> None:
        interval = max(0.05, self.options.lease_s / 4)
        while not self._stopping:
            await self._pause(interval)
            if self._stopping:
                continue
            try:
                # cancel requests and signals take no slot: taken over whether or not one is free
                await self._reclaim(self.keys.cancels, _CANCELS_PER_CLAIM, self._cancelling)
                if not self._parked_full():  # (else it reads no signals either)
                    await self._reclaim(self.keys.signals, _CANCELS_PER_CLAIM, self._signalling | self._parked)
                free = self.options.concurrency - len(self._held) - len(self._starting)
                for stream in self.streams:
                    if free <= 0:
                        break
                    free -= await self._reclaim(stream, free, self._starting if stream == self.keys.control else ())
            except TRANSIENT as exc:
                log.warning("worker %s: reclaiming failed (%s)", self.name, exc)
            except redis.ResponseError as exc:
                if groups_lost(exc):
                    await self._regroup()
                    continue
                if not server_unwell(exc):
                    raise
                log.warning("worker %s: reclaiming refused by Redis for now (%s)", self.name, exc)

    async def _reclaim(self, stream: str, room: int, handling: Collection[str]) -> int:
        """Take over up to ``room`` entries of ``stream`` idle past the lease (their holder died, or hung) and
        give each its handler; returns how many. ``handling``: ids of the stream's entries this process handles
        already outside ``_held``."""
        start, taken = "0-0", 0
        while taken < room and not self._stopping:
            reply = await self.store.call("XAUTOCLAIM", stream, GROUP, self.name, self.lease_ms, start, "COUNT",
                                          room - taken)
            start = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
            for entry_id, fields in reply[1]:
                eid = entry_id.decode()
                if (stream, eid) in self._held or eid in handling:
                    continue  # ours already
                taken += 1
                self._spawn(stream, eid, entry_fields(fields), True)
            if start == "0-0":
                break
        return taken

    async def _tidier(self) -> None:
        cursor = 0
        while not self._stopping:
            await self._pause(self.options.tidy_s)
            if self._stopping:
                break
            try:
                cursor = await self._tidy(cursor)
            except TRANSIENT as exc:
                log.warning("worker %s: tidying failed (%s)", self.name, exc)
            except Exception as exc:  # tidying can wait: never stop serving for it (but for a refused ACL user)
                if no_permission(exc):
                    raise
                if groups_lost(exc):  # (the reader makes them again)
                    log.warning("worker %s: tidying failed (%s); trying again later", self.name, exc)
                    continue
                log.exception("worker %s: tidying failed unexpectedly; trying again later", self.name)

    async def _tidy(self, cursor: int) -> int:
        """What no transition can do (a transition touches one run's keys; these are shared): drop the expired
        runs of the run index — from its oldest, page after page while pages are mostly expired runs (runs
        expire about in the order they were submitted), then from rank ``cursor`` on, page after page while
        pages are mostly expired runs and for :data:`_INDEX_PAGES` other pages plus as many as runs were listed
        since this process's last round (returns where the next round starts: the runs that expire out of order,
        a shorter retention say, or behind runs that do not expire, are found as the rounds go round the index)
        — and forget the worker
        processes silent for ``forget_s`` — their liveness records, and their consumer names in the streams
        this process reads once they hold no entry (a name holding entries is kept: deleting it would drop
        them). Every process does it; each step is safe to repeat.

        (With ten pages a round and no more, an index whose runs still kept fill more pages than that, and that
        grows by more than that each round — a busy deployment — had the cursor trail its end forever: the runs
        it had walked while they were kept stayed listed once expired, without bound.)"""
        front, removed, last = 0, 0, False
        unstarted: list[str] = []  # runs submitted long ago and never started, met on the way
        before = self.clock.now() - RESEND_AFTER_LEASES * self.lease_ms
        while not self._stopping:
            front, last, dropped = await self.store.prune_index(front, _INDEX_PAGE, unstarted, before)
            removed += dropped
            if last or 2 * dropped < _INDEX_PAGE:
                break
        # from where the last round stopped (its rank moved down by what was removed before it), or the end; for
        # ten pages of runs kept and as many more as runs were listed since that round, so that the cursor gains
        # on the index's end and goes round it: runs that do not expire (never started, a longer retention) at
        # its front stop the walk above, and only the cursor reaches the runs expired behind them
        cursor = 0 if last else max(front, cursor - removed)
        budget = 0
        if not last:
            size = int(await self.store.call("ZCARD", self.keys.runs))
            grown = size - self._index_size if self._index_size is not None else 0
            budget = _INDEX_PAGES + -(-max(0, grown) // _INDEX_PAGE)
        while budget > 0 and not self._stopping:
            cursor, last, removed = await self.store.prune_index(cursor, _INDEX_PAGE, unstarted, before)
            if last:  # the end of the index: the next round starts again from its oldest runs
                break
            if 2 * removed < _INDEX_PAGE:  # mostly runs still kept: this page counts against the budget
                budget -= 1
        self._index_size = int(await self.store.call("ZCARD", self.keys.runs))
        if unstarted and not self._stopping:
            await self._resend_starts(list(dict.fromkeys(unstarted)))
        assert self.client is not None
        forget_ms = max(int(self.options.forget_s * 1000), 10 * self.lease_ms)  # never a process still beating
        now = self.clock.now()
        raw = await self.store.call("HGETALL", self.keys.workers)
        items = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
        silent = [name for name, value in items if now - _seen(value) > forget_ms]
        if silent:
            await self.store.call("HDEL", self.keys.workers, *silent)
        for stream in dict.fromkeys([*self._group_streams, self.keys.control]):
            await self.store.forget_consumers(stream, forget_ms, self.name)
        return cursor

    async def _resend_starts(self, unstarted: list[str]) -> None:
        """Send again the start request of each of ``unstarted`` (runs submitted more than
        :data:`RESEND_AFTER_LEASES` leases ago and not started) that none is waiting for: no start request for it in
        the control stream, none among the dead letters (a request set aside waits for a person: sent again, it
        would only fail again). Its submitter stopped between recording the run and sending the request (killed,
        out of memory, its connection cut), or Redis lost the request. At most :data:`_RESENDS_PER_ROUND` a round.

        Nothing here needs to be atomic: a second start request is harmless — the run started meanwhile (by the
        request this round did not see, or the submitter's own, sent late) skips it, and two requests for a run not
        started start it once (:meth:`~flowdsl.runtime.redis.advance.Advancer.start`). Neither stream is read when
        it holds more than :data:`~flowdsl.runtime.redis.store.START_SCAN_LIMIT` entries (a backlog the request
        may be in): the runs wait for a later round.

        What that costs is bounded and paced: at most twice :data:`~flowdsl.runtime.redis.store.START_SCAN_LIMIT`
        entries read a round, by a process that met a run not started; and a run whose request waits for good (a
        dead letter waiting for a person, a run of a newer flowdsl waiting for an upgraded worker) does not make
        every process read both streams every round: a process reads them again only when it meets a run not
        started that its last look did not find waiting, or :data:`_RESCAN_ROUNDS` rounds after that look."""
        self._rounds_since_look += 1
        if self._rounds_since_look < _RESCAN_ROUNDS and self._waiting_starts.issuperset(unstarted):
            return
        self._rounds_since_look = 0
        lengths = await asyncio.gather(self.store.call("XLEN", self.keys.control),
                                       self.store.call("XLEN", self.keys.dead))
        queued = dead = None
        if max(int(n) for n in lengths) <= START_SCAN_LIMIT:  # (else neither is read: one would be wasted)
            queued = await self.store.start_requests()
            dead = await self.store.start_requests(dead=True) if queued is not None else None
        if queued is None or dead is None:
            self._waiting_starts = frozenset()
            log.debug("worker %s: %d run(s) submitted long ago have not started; the control stream (or the dead "
                      "letters) is too long to look for their start requests now", self.name, len(unstarted))
            return
        self._waiting_starts = frozenset(r for r in unstarted if r in queued or r in dead)
        lost = [run_id for run_id in unstarted if run_id not in queued and run_id not in dead][:_RESENDS_PER_ROUND]
        if not lost:
            return
        versions = await asyncio.gather(*(self.store.call("HGET", self.keys.run(r), "v") for r in lost))
        for run_id, version in zip(lost, versions, strict=True):
            if version is not None:
                continue  # started meanwhile
            await self.store.send_start(run_id)
            self.stats.starts_resent += 1
            log.warning("worker %s: run %s was submitted more than %d leases ago and has not started, and no start "
                        "request for it was waiting: its submitter stopped before sending it (or Redis lost it); "
                        "its start request was sent again", self.name, run_id, RESEND_AFTER_LEASES,
                        extra={"run_id": run_id})

    def _timer_armed(self, due: int) -> None:
        if self._timer_wake is not None and due < self._next_timer:
            self._timer_wake.set()

    async def _timers(self) -> None:
        assert self._timer_wake is not None
        backoff = Backoff()
        while not self._stopping:
            try:
                now, due, again, nxt = await self.store.claim_timers(self.lease_ms)
                backoff.reset()
            except TRANSIENT:
                await backoff.wait()
                continue
            except redis.ResponseError as exc:
                if not server_unwell(exc):
                    raise
                if backoff.failures == 0:
                    log.warning("worker %s: claiming timers refused by Redis for now (%s)", self.name, exc)
                await backoff.wait()
                continue
            for raw, recover in [(m, False) for m in due] + [(m, True) for m in again]:
                member = TimerMember.decode(raw)
                if member is None:  # not one of ours: nothing could ever fire it
                    log.error("worker %s: dropped timer %r of the timer set: not a timer member (t|<run id>|<timer "
                              "id> or s|<run id>|<task id>)", self.name, raw)
                    await self.advancer.relay(None, None, [self.store.timer_done_op(raw)])
                    continue
                self.stats.timers += 1
                self._track(self._fire(member, recover))
            if due or again:
                continue
            wait = self.options.timer_poll_s
            if nxt is not None:
                wait = min(wait, max(0.0, (nxt - now) / 1000.0))
            self._next_timer = self.clock.now() + wait * 1000.0
            self._timer_wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._timer_wake.wait()

    async def _fire(self, member: TimerMember, recover: bool) -> None:
        while True:
            try:
                await self.advancer.fire(member, recover=recover)
                return
            except NewerVersion as exc:  # its claim expires and another process (an upgraded one) fires it
                log.warning("worker %s: timer %s left for an upgraded worker: %s", self.name, member.encode(), exc)
                return
            except _UNREACHABLE_OR_REFUSED as exc:
                if isinstance(exc, redis.ResponseError) and not server_unwell(exc):
                    if self._config_error(exc, f"while firing the timer '{member.encode()}'"):
                        return  # its claim expires and another process fires it
                    raise
                if self._stopping:
                    return  # the claim expires and another process fires it
                recover = True
                await Backoff().wait()

    async def _cancel_listener(self) -> None:
        assert self.client is not None
        backoff = Backoff()
        while not self._stopping:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(self.keys.cancel_channel)
                backoff.reset()
                while not self._stopping:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                    if message and message.get("type") == "message":
                        task_id = message["data"].decode(errors="replace")
                        held = self._by_task.get(task_id)
                        if held is not None and not held.cancel:
                            self._track(self._cancel_if_ours(held, task_id))
            except TRANSIENT:
                await backoff.wait()
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _cancel_if_ours(self, held: Held, task_id: str) -> None:
        """Interrupt ``held`` for a cancel notice of its task id, if its own run asks for it: the lease of the
        task in this deployment's tasks hash is ``xr:`` with this attempt's token. Pub/sub channels are
        server-wide — every database of the server shares them — so a notice may come from another database
        under the same prefix (a staging deployment in db 4 beside production in db 3), and a run id used again
        gives the same task ids to another generation of the run: the task id alone proves nothing, the lease
        token (unique to this attempt) does. A notice that cannot be checked now is left to the heartbeat, which
        reads the same lease every lease/3."""
        try:
            (value,) = await self.store.leases([(held.run_id, task_id)])
        except _UNREACHABLE_OR_REFUSED:
            return
        if value == "xr:" + held.token and held.task_id == task_id and not held.cancel \
                and self._by_task.get(task_id) is held:
            self._cancel_requested(held)
        elif value != "xr:" + held.token:
            log.debug("worker %s: cancel notice for %s ignored: not this attempt's (another database or another "
                      "run of the id)", self.name, task_id)

    async def _idle_now(self) -> bool:
        """:meth:`_idle`, False while Redis cannot say (unreachable, or refusing work for now)."""
        try:
            return await self._idle()
        except TRANSIENT:
            return False
        except redis.ResponseError as exc:
            if not server_unwell(exc):
                raise
            return False

    async def _idle(self) -> bool:
        """Burst mode: nothing here, nothing in any stream served, no timer due soon."""
        if self._active or self._held:
            return False
        lengths = await asyncio.gather(*(self.store.call("XLEN", s) for s in self._group_streams))
        if any(lengths):
            return False
        if await self.store.call("ZCARD", self.keys.timers_claimed):
            return False
        first = await self.store.call("ZRANGE", self.keys.timers, 0, 0, "WITHSCORES")
        if first:
            due = float(first[1])
            if due - self.clock.now() < self.options.burst_horizon_s * 1000:
                return False
        return not self._active
