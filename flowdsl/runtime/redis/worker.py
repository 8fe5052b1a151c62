"""The worker process: serve task streams, run steps, advance runs, fire timers, survive everything.

Stage: runtime: redis. Imports redis, ``flowdsl.workers`` (the registry), ``flowdsl.llm`` (while serving) and this
package. One :class:`RedisWorker` is one process's loop (``flowdsl worker``); any number of them, on any number of
machines, share the work through consumer groups. This module holds the process itself — what it is made of, what
it starts and stops (:meth:`RedisWorker.serve`, :meth:`RedisWorker.stop`), and what stops it by itself (a loop
that failed, Redis refusing its ACL user) — and its stages are mixins, one module each:

- **reader** and **cancel reader** (:mod:`.reading`) — ``XREADGROUP`` over the control stream, the LLM stream and
  the task stream of every registered worker, no more entries than free slots; over the cancels and signals streams,
  whatever the free slots (a chain holds its slot until its run ends), at most 64 handled at a time. Each message
  gets a handler; an entry that cannot be read, or whose handling fails unexpectedly ``max_failures`` times (it is
  handled again after each lease), is set aside in the dead-letter stream with its fields and the reason
  (:meth:`RedisWorker._guarded`; ``flowdsl dead-letters`` lists them and puts them back); it never stops the process
  nor goes round forever.
- **start and cancel requests, signals** (:mod:`.control`) — a start request starts the run and runs its first step
  here at once, under the control entry; a cancel request is a transition, and a cancel reaching a task held here
  interrupts its worker; a signal is a transition, applied once; signals for runs not started yet wait for them
  (one loop looks for all their runs' starts together).
- **task handler** (:mod:`.tasks`) — takes the task's lease (``PICKUP``: dropped when the task is no longer in
  flight or another delivery holds it), runs it with :func:`flowdsl.runtime.execute.execute`, and applies the
  answer through the kernel with a lease guard, so a result from a worker that lost its lease is rejected and
  journaled; the stream entry is acknowledged (and deleted) only after the transition and its relay are written.
  When that transition dispatches a task this process serves, the task is held here at once (self-dispatch,
  :class:`~flowdsl.runtime.redis.advance.Chain`) and run next, under the same pending entry.
- **late results** (:mod:`.late_results`) — a rejected success is kept and reported again once the task has
  ended, so that the kernel sees it (:meth:`RedisWorker._late_result`).
- **background loops** (:mod:`.upkeep`) — heartbeats (lease renewal, liveness), the reclaimer (``XAUTOCLAIM`` of
  entries idle longer than the lease: they run again here, with the same task id and idempotency key, after the
  tasks held under the entry are queued again and the run's outbox is relayed), timers, and the cancel listener,
  which stops the coroutine of an async worker at once (a sync worker's thread runs to its end and its real
  result is reported, as in the local runtime).
- **startup and shutdown** (:mod:`.lifecycle`) — the startup checks of what Redis lets this process do, retrying
  while Redis is unreachable, the signals, the graceful stop.

What they share — the options, the stats, a held entry (:class:`~flowdsl.runtime.redis.serving.Held`) — is in
:mod:`.serving`, which imports none of them; the mixins import one another not at all (each declares what it uses
of the others), and only this module puts them together.

SIGTERM/SIGINT stop gracefully: no new work, in-flight steps get ``grace`` seconds to finish, the rest are handed
back (lease released, message queued again) so another process picks them up at once; a second signal exits at
once (the entries are reclaimed after the lease), as does cancelling the task running :meth:`RedisWorker.serve`.
The signals are taken only while serving (one ignored stays ignored) and the handlers that were there are put
back. ``burst`` drains the streams and exits. A lost connection is retried with backoff in every loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flowdsl.runtime.redis.advance import Advancer, nonces
from flowdsl.runtime.redis.connection import (
    ACL_DOC,
    TRANSIENT,
    RedisConfigError,
    acl_user,
    connect,
    describe_url,
    no_permission,
    resolve_url,
)
from flowdsl.runtime.redis.control import Control
from flowdsl.runtime.redis.keys import Keys
from flowdsl.runtime.redis.late_results import LateResults
from flowdsl.runtime.redis.lifecycle import Lifecycle
from flowdsl.runtime.redis.reading import Reading
from flowdsl.runtime.redis.scripts import Batcher
from flowdsl.runtime.redis.serving import WorkerOptions, WorkerStats, cancel_and_wait
from flowdsl.runtime.redis.store import Clock, Store
from flowdsl.runtime.redis.tasks import Tasks
from flowdsl.runtime.redis.upkeep import Upkeep
from flowdsl.runtime.redis.wire import WireConnection
from flowdsl.runtime.redis.wire import supported as wire_supported
from flowdsl.workers import WorkerRegistry
from flowdsl.workers import registry as default_registry

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from flowdsl.runtime.redis.serving import Held

__all__ = ["RedisWorker"]

log = logging.getLogger("flowdsl.redis")


class RedisWorker(Reading, Control, Tasks, LateResults, Lifecycle, Upkeep):
    """One worker process. ``await RedisWorker(url, prefix=...).serve()`` runs until stopped.

    ``registry`` (default: the process-wide one) decides which task streams are
    served: one per registered worker name.
    """

    def __init__(self, url: str | None = None, *, prefix: str = "flowdsl", registry: WorkerRegistry | None = None,
                 options: WorkerOptions | None = None):
        self.url = url
        self.keys = Keys(prefix)
        self.registry = registry or default_registry
        self.options = options or WorkerOptions()
        self.name = self.options.name or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"
        self.stats = WorkerStats(name=self.name)
        self._nonces = nonces(3)  # the last part of lease tokens (a delivery can come back to the same process)
        self.streams = [self.keys.control] + ([self.keys.llm] if self.options.llm else []) + \
            [self.keys.queue(w) for w in sorted(self.registry.names())]
        self._task_streams = frozenset(self.streams[1:])
        #: every stream this process reads in its consumer group: the served ones, the cancel requests, the signals
        self._group_streams = [*self.streams, self.keys.cancels, self.keys.signals]
        self._served: dict[Any, bool] = {}
        self.lease_ms = max(100, int(self.options.lease_s * 1000))
        self._held: dict[tuple[str, str], Held] = {}
        self._by_task: dict[str, Held] = {}
        #: control entries being handled that are not (yet) in ``_held``: the reader counts them as taken slots
        self._starting: set[str] = set()
        #: entries of the cancels stream being handled (they take no slot)
        self._cancelling: set[str] = set()
        #: entries of the signals stream being handled (they take no slot either), but for those parked:
        self._signalling: set[str] = set()
        #: entries of the signals stream held until their run starts (``reading._PARKED_SIGNALS`` at most)
        self._parked: set[str] = set()
        self._parked_said = False  # (said in the log that it holds as many as it keeps)
        #: the runs the parked signals wait for (``control._Awaited``, by run id), and what wakes their watch
        self._awaited: dict[str, Any] | None = None
        self._awaited_new: asyncio.Event | None = None
        self._active: set[asyncio.Task[None]] = set()
        self._late: set[asyncio.Task[None]] = set()  # rejected successes waiting to be reported again
        self._late_wake: asyncio.Event | None = None  # set when stopping: each of them tries once more, now
        self._stopping = False
        self._stopped: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._room: asyncio.Event | None = None
        self._regrouping = asyncio.Lock()
        self._regroups = 0  # times the consumer groups were made again (Redis lost its data)
        self._index_size: int | None = None  # runs listed after this process's last tidying round
        self._timer_wake: asyncio.Event | None = None
        self._next_timer: float = 0.0
        self._signals = 0
        self._taken: list[int] = []  # the signals this process took (take_signal), to give back
        self._failed: asyncio.Task[None] | None = None  # the background loop that failed, if one did
        self._refused: RedisConfigError | None = None  # Redis refused this ACL user a command while serving
        self.client: aioredis.Redis | None = None
        self.wire: WireConnection | None = None  # the lean command connection (None: TLS, through redis-py)
        self.started_at = time.time()
        #: called for every step executed here with its command, its answer's type (``task_succeeded``,
        #: ``task_failed``, ``task_cancelled``) and the seconds it ran (:mod:`.metrics` sets it; None: not timed)
        self.on_step: Callable[[dict[str, Any], str, float], None] | None = None

    # --- the public face -------------------------------------------------------------

    async def serve(self) -> WorkerStats:
        """Serve until stopped (a signal, :meth:`stop`, or an idle burst); returns what was done."""
        from flowdsl.llm import ON_REDIS_WORKER  # (an LLM step with no model then points at this worker's --lm)

        serving = ON_REDIS_WORKER.set(True)
        try:
            return await self._serving()
        finally:
            ON_REDIS_WORKER.reset(serving)

    async def _serving(self) -> WorkerStats:
        self._stopped = asyncio.Event()
        self._slots = asyncio.Semaphore(self.options.concurrency)
        self._room = asyncio.Event()
        self._timer_wake = asyncio.Event()
        self._late_wake = asyncio.Event()
        self._awaited, self._awaited_new = {}, asyncio.Event()
        # a connection that stops answering without being closed (a path that drops packets) is given up after
        # reply_s and opened again; the command connection says so, and the readers wait for it meanwhile
        reply_s = self.options.reply_timeout_s
        self.client = connect(self.url, client_name=f"flowdsl-worker:{self.name}", socket_timeout=reply_s)
        reader = connect(self.url, client_name=f"flowdsl-reader:{self.name}")
        url = resolve_url(self.url)
        self.wire = WireConnection(url, client_name=f"flowdsl-worker:{self.name}", reply_timeout=reply_s,
                                   on_silence=self._command_silent, on_answer=self._command_answers) \
            if wire_supported(url) else None
        # the blocking XREADGROUP gets a lean connection of its own (a blocked connection serves nothing else)
        reader_wire = WireConnection(url, client_name=f"flowdsl-reader:{self.name}", reply_timeout=reply_s) \
            if self.wire else None
        # cancel requests are read on their own connection, whether or not a slot is free
        cancels = connect(self.url, client_name=f"flowdsl-cancels:{self.name}")
        cancels_wire = WireConnection(url, client_name=f"flowdsl-cancels:{self.name}", reply_timeout=reply_s) \
            if self.wire else None
        self.store = Store(self.client, self.keys, batcher=Batcher(self.client, wire=self.wire))
        self.clock = Clock()
        schedule_ms = int(self.options.schedule_timeout_s * 1000) if self.options.schedule_timeout_s else None
        self.advancer = Advancer(self.store, self.clock, schedule_timeout_ms=schedule_ms,
                                 retention_ms=int(self.options.retention_s * 1000), on_timer=self._timer_armed,
                                 snapshot_bytes=self.options.snapshot_bytes, rules=self.options.rules,
                                 cache_size=self.options.cache_runs, on_refused=self._result_refused)
        self._install_signals()
        loops: list[asyncio.Task[None]] = []
        try:
            try:
                await self._retrying("connecting", self._setup)
                # every connection up before saying it serves (and before it counts as live for long): a server at
                # its maxclients lets some in and not others, and a loop left unconnected would be silent
                await self._retrying("connecting", lambda: self._connected(reader, reader_wire, cancels,
                                                                           cancels_wire))
            except TRANSIENT:
                if not self._stopping:
                    raise
                log.info("worker %s: stopped before Redis could be reached", self.name)
                return self.stats
            loops = [asyncio.create_task(self._reader(reader, reader_wire), name="reader"),
                     asyncio.create_task(self._cancels_reader(cancels, cancels_wire), name="cancel reader"),
                     asyncio.create_task(self._timers(), name="timers"),
                     asyncio.create_task(self._heartbeat(), name="heartbeat"),
                     asyncio.create_task(self._reclaimer(), name="reclaimer"),
                     asyncio.create_task(self._cancel_listener(), name="cancels"),
                     asyncio.create_task(self._tidier(), name="tidier"),
                     asyncio.create_task(self._parked_watch(), name="parked signals")]
            for task in loops:
                task.add_done_callback(self._loop_ended)
            log.info("worker %s serving %d stream(s) under prefix %r", self.name, len(self.streams),
                     self.keys.prefix)
            await self._stopped.wait()
            await self._shutdown(loops)
        finally:
            # serve() ends (stopped, or its task cancelled): an outright stop, so that every loop also leaves at its
            # next turn by itself and nothing new starts; the step handlers too (serve() cancelled, or a stop that
            # left some): with no heartbeat left to renew their leases they must not go on and report later —
            # another process may be running the same step. A cancellation a Redis call lost (see cancel_and_wait)
            # is sent again: serve() cancelled waited for ever for a loop that had lost it, and a handler could have
            # gone on to run its step after serve() returned
            handlers = set(self._active)
            self.stop(graceful=False)  # (which cancels the handlers and the late results)
            await cancel_and_wait([*loops, *self._late])
            if handlers:  # bounded: a worker that ignores its cancel must not hold the process (as in _shutdown)
                await cancel_and_wait(handlers, timeout=1.0)
            self._remove_signals()
            await self.store.settle(1.0)  # (outbox entries relayed whose drop is being sent again)
            with contextlib.suppress(Exception):
                await self.client.hdel(self.keys.workers, self.name)
            await reader.aclose()
            await cancels.aclose()
            await self.client.aclose()
            for wire in (self.wire, reader_wire, cancels_wire):
                if wire is not None:
                    await wire.aclose()
        self.stats.transitions = self.advancer.transitions
        self.stats.conflicts = self.advancer.conflicts
        if self._refused is not None:
            raise self._refused
        return self.stats

    @property
    def in_flight(self) -> int:
        """How many stream entries this process holds now (a step running or being reported under each)."""
        return len(self._held)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """A background loop ended: by a stop, or by an error nothing caught — then the process would go on
        without it (no reading, no heartbeats: leases expire), so it says why and stops gracefully instead."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        assert exc is not None
        if self._config_error(exc, f"in its {task.get_name()} loop"):
            return
        if self._stopping:
            return
        self._failed = task
        self.stats.failure = f"its {task.get_name()} loop failed: {type(exc).__name__}: {exc}"
        log.critical("worker %s: %s; stopping (in-flight steps are finished or handed back)", self.name,
                     self.stats.failure, exc_info=exc)
        self.stop(graceful=True)

    def _config_error(self, exc: BaseException, where: str) -> bool:
        """Whether ``exc`` is a configuration error met while serving — Redis refusing this process's ACL user a
        command, key or channel (``NOPERM``: an ACL changed, or a permission the startup probe does not cover)
        — which is nobody's message's fault and which retrying cannot mend: then the process stops gracefully,
        and :meth:`serve` raises it as a :class:`RedisConfigError` (``flowdsl worker``: one line, exit 2)."""
        if isinstance(exc, RedisConfigError):
            error = exc
        elif no_permission(exc):
            error = self._acl_error(exc, where)
        else:
            return False
        if self._refused is None:
            self._refused = error
            log.error("worker %s: Redis refused its ACL user %s; stopping (in-flight steps are finished or handed "
                      "back)", self.name, where)
        self.stop(graceful=True)
        return True

    def _acl_error(self, exc: BaseException, where: str) -> RedisConfigError:
        """The one-line error of a ``NOPERM`` answer: what was refused, and what the ACL user needs."""
        url = resolve_url(self.url)
        text = str(exc).removeprefix("NOPERM ").strip()
        runs, shared, channel = self.keys.acl_keys().split()
        return RedisConfigError(
            f"Redis at {describe_url(url)} refused the worker's ACL user {acl_user(url)!r} {where}: {text}; a "
            f"worker's ACL user needs the keys {runs} and {shared}, the channel {channel} and the commands listed "
            f"in {ACL_DOC}")

    def stop(self, graceful: bool = True) -> None:
        """Stop serving: gracefully (finish or hand back in-flight steps) or at once."""
        self._stopping = True
        if not graceful:
            for task in (*self._active, *self._late):
                task.cancel()
        if self._stopped is not None:
            self._stopped.set()
        if self._room is not None:
            self._room.set()
        if self._awaited_new is not None:
            self._awaited_new.set()  # (the watch of parked signals' runs ends, and wakes them: they return)
