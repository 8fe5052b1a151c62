"""The worker process: serve task streams, run steps, advance runs, fire timers, survive everything.

Stage: runtime: redis. Imports redis, ``flowdsl.kernel`` (its version
error), ``flowdsl.runtime.execute`` (to run steps), ``flowdsl.workers`` (the registry), ``flowdsl.shown`` and
this package. One
:class:`RedisWorker` is one process's loop (``flowdsl worker``); any number
of them, on any number of machines, share the work through consumer groups:

- **reader** — ``XREADGROUP`` over the control stream, the LLM stream and the
  task stream of every registered worker, no more entries than free slots;
  each message gets a handler.
- **cancel reader** — ``XREADGROUP`` over the cancels stream, whatever the
  free slots (a chain holds its slot until its run ends), at most 64 handled
  at a time; each request is a transition.
- **task handler** — takes the task's lease (``PICKUP``: dropped when the task
  is no longer in flight or another delivery holds it), runs it with
  :func:`flowdsl.runtime.execute.execute`, and applies the answer through the
  kernel with a lease guard, so a result from a worker that lost its lease is
  rejected and journaled (a success is kept and reported again once the task
  has ended, so that the kernel sees it: :meth:`RedisWorker._late_result`);
  the stream entry is acknowledged (and deleted) only after the transition
  and its relay are written. When that transition dispatches a task this
  process serves, the task is held here at once (self-dispatch,
  :class:`~flowdsl.runtime.redis.advance.Chain`) and run next, under the same
  pending entry; a run's start request does the same with its first step.
- **dead letters** — an entry that cannot be read, or whose handling fails
  unexpectedly ``max_failures`` times (it is handled again after each lease),
  is set aside in the dead-letter stream with its fields and the reason
  (:meth:`RedisWorker._guarded`; ``flowdsl dead-letters`` lists them and puts
  them back); it never stops the process nor goes round forever.
- **background loops** (:mod:`.upkeep`) — heartbeats (lease renewal,
  liveness), the reclaimer (``XAUTOCLAIM`` of entries idle longer than the
  lease: they run again here, with the same task id and idempotency key, after
  the tasks held under the entry are queued again and the run's outbox is
  relayed), timers, and the cancel listener, which stops the coroutine of an
  async worker at once (a sync worker's thread runs to its end and its real
  result is reported, as in the local runtime).

SIGTERM/SIGINT stop gracefully: no new work, in-flight steps get ``grace``
seconds to finish, the rest are handed back (lease released, message queued
again) so another process picks them up at once; a second signal exits at
once (the entries are reclaimed after the lease), as does cancelling the task
running :meth:`RedisWorker.serve`. The signals are taken only while serving
(one ignored stays ignored) and the handlers that were there are put back.
``burst`` drains the streams and exits. A lost connection is retried with
backoff in every loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import redis
import redis.asyncio as aioredis

from flowdsl import kernel
from flowdsl.kernel import NewerVersion, check_rules
from flowdsl.runtime.codec import dumps, loads
from flowdsl.runtime.execute import cancellable, execute, wait_for_thread
from flowdsl.runtime.redis.advance import SNAPSHOT_BYTES, Advancer, Chain, Contended, Outcome, nonces
from flowdsl.runtime.redis.connection import (
    ACL_DOC,
    TRANSIENT,
    Backoff,
    RedisConfigError,
    acl_user,
    connect,
    describe_url,
    groups_lost,
    no_permission,
    resolve_url,
    server_unwell,
    unreachable_reason,
)
from flowdsl.runtime.redis.keys import GROUP, Keys, check_run_id
from flowdsl.runtime.redis.scripts import Batcher
from flowdsl.runtime.redis.store import Clock, RunTooLarge, Store
from flowdsl.runtime.redis.upkeep import Upkeep
from flowdsl.runtime.redis.wire import WireConnection, stream_entries
from flowdsl.runtime.redis.wire import supported as wire_supported
from flowdsl.runtime.signals import give_back_signal, take_signal
from flowdsl.shown import visible
from flowdsl.workers import WorkerRegistry, describe_exception
from flowdsl.workers import registry as default_registry

__all__ = ["RedisWorker", "WorkerOptions", "WorkerStats", "serving_gc"]

log = logging.getLogger("flowdsl.redis")
#: what Redis answers when it is reachable but will not serve this worker (retrying cannot help)
_REFUSED: tuple[type[Exception], ...] = (redis.AuthenticationError, redis.ResponseError, redis.InvalidResponse)
#: the run id whose keys the startup probe names (no run has it: a run id never starts with '-')
_PROBE_RUN = "-acl-probe"
#: cancel requests handled at a time (they take no slot: each is one transition)
_CANCELS_PER_READ = 64


def _refusal(exc: BaseException) -> BaseException | None:
    """The refusal (:data:`_REFUSED`) behind ``exc``, if it is one or was caused by one (redis-py's asyncio
    client reports a failed AUTH as a ConnectionError caused by an AuthenticationError)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, _REFUSED):
            return seen
        seen = seen.__cause__
    return None


#: lost connections in a row, while Redis answers other commands, after which handling an entry is a failure
_CLOSED_TRIES = 6


class _ClosedOnEntry(Exception):
    """Redis closed the connection each time an entry was handled, while it answered other commands."""

    def __init__(self, tries: int, exc: BaseException):
        super().__init__(f"Redis closed the connection at each of {tries} tries to handle it ({exc}), while it "
                         "answers other commands: most likely a reply larger than its client-output-buffer-limit "
                         "for normal clients (a run's plan, input or state is read whole); set "
                         "`client-output-buffer-limit normal 0 0 0` (Redis's default) or keep runs smaller "
                         "(docs/runtime.md, \"The Redis server's settings\")")


def _for_now(exc: BaseException) -> bool:
    """Whether ``exc`` only says Redis cannot do it now (unreachable, or refusing work: out of memory, …)."""
    return isinstance(exc, TRANSIENT) or server_unwell(exc)


def _describe(exc: BaseException, limit: int = 500) -> str:
    text = describe_exception(exc)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _json_field(fields: dict[bytes, bytes], name: bytes, what: str) -> tuple[dict[str, Any] | None, str]:
    raw = fields.get(name)
    if raw is None:
        return None, f"it has no '{name.decode()}' field ({what})"
    try:
        value = loads(raw)
    except (ValueError, RecursionError) as exc:  # (too deeply nested for the stdlib decoder: RecursionError)
        return None, f"its '{name.decode()}' field is not JSON ({_describe(exc)})"
    if not isinstance(value, dict):
        return None, f"its '{name.decode()}' field is not a JSON object"
    run_id = value.get("run_id")
    if not isinstance(run_id, str):
        return None, f"its '{name.decode()}' field names no run (a string 'run_id')"
    try:
        check_run_id(run_id)
    except ValueError as exc:
        return None, f"its run id is not one: {exc}"
    return value, ""


def _text_problem(fields: dict[bytes, bytes]) -> str | None:
    """Why the entry's short fields (``t`` the trigger taken over, ``v`` the outbox version, ``g`` the run's
    generation: ASCII when flowdsl wrote them) cannot be read, or None."""
    for name in (b"t", b"v", b"g"):
        raw = fields.get(name)
        if raw is not None and not (raw.isascii() and len(raw) <= 200):
            return f"its '{name.decode()}' field is not a short ASCII text"
    return None


def _task_message(fields: dict[bytes, bytes]) -> tuple[dict[str, Any] | None, str]:
    """A task stream entry's dispatch command, or None and why the entry is not a task message."""
    command, problem = _json_field(fields, b"m", "a task message carries its dispatch command there")
    if command is not None and not (isinstance(command.get("task_id"), str) and command["task_id"]):
        return None, "its dispatch command names no task (a string 'task_id')"
    return command, problem


def _control_message(fields: dict[bytes, bytes]) -> tuple[dict[str, Any] | None, str]:
    """A control stream entry's request, or None and why the entry is not a start or cancel request."""
    msg, problem = _json_field(fields, b"c", "a control message carries its request there")
    if msg is not None and msg.get("type") not in ("start", "cancel"):
        return None, f"its request is of no known type ({str(msg.get('type'))[:50]!r}; expected 'start' or 'cancel')"
    return msg, problem


@contextlib.contextmanager
def serving_gc() -> Iterator[None]:
    """Collect cyclic garbage less often while a worker process serves (``flowdsl worker`` does this).

    A step allocates a few hundred objects, nearly all freed by reference counting; with the default
    thresholds the collector took ~15 % of a busy worker's CPU, most of it full collections walking its cache
    of run states. Inside: what exists now (the imports) is frozen, never walked again, and collections run
    about 70 times less often: each young collection walks the states of the runs in flight, whatever its
    threshold, so fewer of them cost less (at 50,000 rather than 10,000: ~1.5 % of a worker's instructions per
    step; a step's context and its logger, a cycle, wait longer to be freed: ~1 MB more). The previous settings
    are restored on exit."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


@dataclass
class WorkerOptions:
    """How a worker process behaves (the ``flowdsl worker`` options)."""

    concurrency: int = 32  # steps executing at once in this process
    burst: bool = False  # drain the streams, then exit
    lease_s: float = 30.0  # a held message idle this long is reclaimed by another process
    schedule_timeout_s: float | None = None  # default schedule-to-start deadline of runs that set none
    retention_s: float = 7 * 24 * 3600.0  # default retention of finished runs that set none
    grace_s: float = 10.0  # on SIGTERM: how long in-flight steps may take before they are handed back
    llm: bool = True  # also serve the LLM stream
    lm: object | str | None = None  # the model of LLM steps that name none (--lm)
    block_ms: int = 1000  # XREADGROUP BLOCK
    timer_poll_s: float = 0.05  # how often timers armed by other processes are looked for
    burst_horizon_s: float = 2.0  # burst: keep going while a timer is due within this
    name: str | None = None  # consumer name (default host:pid:random)
    handle_signals: bool = True
    tidy_s: float = 60.0  # how often the process tidies what no transition can (see Upkeep._tidy)
    forget_s: float = 3600.0  # a worker process silent this long is forgotten (its liveness record, and its
    # consumer names in the streams once they hold nothing)
    snapshot_bytes: int = SNAPSHOT_BYTES  # a run's state is written whole once per this many bytes of it (0: at
    # its start and end only); the transitions between are replayed from the journal on load
    late_leases: int = 60  # a success rejected because another process held its task is reported again once per
    # lease, for at most this many leases (30 min by default), until the task has ended (see _late_result)
    max_failures: int = 3  # a message whose handling fails unexpectedly this many times is set aside as a dead
    # letter (a message that cannot be decoded at all, at once); see RedisWorker._guarded
    rules: int | None = None  # the kernel rules version the runs this process starts follow (None: the newest it
    # knows, kernel.STATE_VERSION); an older one while processes that know only it still serve (docs/runtime.md,
    # "Upgrading")
    cache_runs: int = 4096  # the states of the runs this process advanced last that it keeps in memory (0: none):
    # a run not kept is read back from Redis at its next event (docs/runtime.md, "Sizing")

    def __post_init__(self) -> None:
        if type(self.cache_runs) is not int or self.cache_runs < 0:
            raise ValueError(f"cache_runs must be a whole number of runs, 0 or more, not {self.cache_runs!r}")
        if self.rules is not None and (type(self.rules) is not int or not 1 <= self.rules <= kernel.STATE_VERSION):
            raise ValueError(f"rules must be a kernel rules version from 1 to {kernel.STATE_VERSION}, "
                             f"not {self.rules!r}")


@dataclass
class WorkerStats:
    """What a worker process did (returned by :meth:`RedisWorker.serve`)."""

    name: str = ""
    tasks: int = 0  # steps executed
    reclaimed: int = 0  # messages taken over from other processes
    dropped: int = 0  # deliveries of tasks no longer in flight (or held by another delivery)
    rejected: int = 0  # results refused because the lease was lost
    late: int = 0  # rejected successes reported again once their task had ended (given to the kernel)
    timers: int = 0
    runs_started: int = 0
    handed_back: int = 0
    transitions: int = 0
    conflicts: int = 0
    chained: int = 0  # steps this process dispatched to itself (run without a trip through a stream)
    dead_letters: int = 0  # messages this process set aside as dead letters
    starts_resent: int = 0  # start requests sent again, of runs whose submitter never sent them (Upkeep._tidy)
    failure: str | None = None  # why the worker stopped by itself: one of its loops failed (a bug; logged)


@dataclass
class _Held:
    """A stream entry this process holds, and the task it runs under it (the entry's own, or one it
    dispatched to itself since: a chain of steps of one run under one trigger)."""

    stream: str
    entry_id: str
    run_id: str
    task_id: str
    token: str
    command: dict[str, Any]
    raw: bytes | None  # the task's message as delivered (None for a self-dispatched task)
    outbox_version: str
    trigger: str = ""
    generation: str = ""  # the run generation its message carried (``g``; '' if none)
    picked: bool = False
    cancel: bool = False
    hand_back: bool = False
    lost: bool = False
    handler: asyncio.Task[Any] | None = field(default=None, repr=False)  # the task running it, while it runs
    interrupted: bool = False  # we cancelled the handler to stop the worker (cancel request, hand-back)
    #: a sync worker's job in the thread pool (None until queued): while it waits for a free thread, a cancel takes
    #: it back (it is never called); once it runs, its real outcome is waited for
    thread: concurrent.futures.Future[Any] | None = field(default=None, repr=False)

    def __call__(self) -> bool:
        """(``execute.wait_for_thread``:) whether the handler, cancelled while the sync worker's thread runs, goes
        on waiting for its real outcome: when the cancel is the interrupt of a cancel request (it is then taken
        back: handled), not a hand-back's or a stop's."""
        if self.interrupted and self.cancel and not self.hand_back:
            self.interrupted = False
            return True
        return False

    def thread_submitted(self, job: concurrent.futures.Future[Any]) -> None:
        self.thread = job

    def queued(self) -> bool:
        """Whether its sync worker's job still waits for a free thread (not called yet)."""
        job = self.thread
        return job is not None and not (job.running() or job.done())


class RedisWorker(Upkeep):
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
        #: every stream this process reads in its consumer group: the served ones, and the cancel requests
        self._group_streams = [*self.streams, self.keys.cancels]
        self._served: dict[Any, bool] = {}
        self.lease_ms = max(100, int(self.options.lease_s * 1000))
        self._held: dict[tuple[str, str], _Held] = {}
        self._by_task: dict[str, _Held] = {}
        #: control entries being handled that are not (yet) in ``_held``: the reader counts them as taken slots
        self._starting: set[str] = set()
        #: entries of the cancels stream being handled (they take no slot)
        self._cancelling: set[str] = set()
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
        self.started_at = time.time()

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
        self.client = connect(self.url, client_name=f"flowdsl-worker:{self.name}")
        reader = connect(self.url, client_name=f"flowdsl-reader:{self.name}")
        url = resolve_url(self.url)
        self.wire = WireConnection(url, client_name=f"flowdsl-worker:{self.name}") if wire_supported(url) else None
        # the blocking XREADGROUP gets a lean connection of its own (a blocked connection serves nothing else)
        reader_wire = WireConnection(url, client_name=f"flowdsl-reader:{self.name}") if self.wire else None
        # cancel requests are read on their own connection, whether or not a slot is free
        cancels = connect(self.url, client_name=f"flowdsl-cancels:{self.name}")
        cancels_wire = WireConnection(url, client_name=f"flowdsl-cancels:{self.name}") if self.wire else None
        self.store = Store(self.client, self.keys, batcher=Batcher(self.client, wire=self.wire))
        self.clock = Clock()
        schedule_ms = int(self.options.schedule_timeout_s * 1000) if self.options.schedule_timeout_s else None
        self.advancer = Advancer(self.store, self.clock, schedule_timeout_ms=schedule_ms,
                                 retention_ms=int(self.options.retention_s * 1000), on_timer=self._timer_armed,
                                 snapshot_bytes=self.options.snapshot_bytes, rules=self.options.rules,
                                 cache_size=self.options.cache_runs)
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
                     asyncio.create_task(self._tidier(), name="tidier")]
            for task in loops:
                task.add_done_callback(self._loop_ended)
            log.info("worker %s serving %d stream(s) under prefix %r", self.name, len(self.streams),
                     self.keys.prefix)
            await self._stopped.wait()
            await self._shutdown(loops)
        finally:
            # the step handlers too (serve() cancelled, or a stop that left some): with no heartbeat left to renew
            # their leases they must not go on and report later — another process may be running the same step
            handlers = set(self._active)
            for task in (*loops, *handlers, *self._late):
                task.cancel()
            await asyncio.gather(*loops, *self._late, return_exceptions=True)
            if handlers:  # bounded: a worker that ignores its cancel must not hold the process (as in _shutdown)
                await asyncio.wait(handlers, timeout=1.0)
            self._remove_signals()
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

    # --- setup, signals -----------------------------------------------------------------

    async def _setup(self) -> None:
        """Get ready to serve; first check, with commands that change nothing, that Redis lets this process's ACL
        user do what a worker does (a :class:`RedisConfigError` says what it refused)."""
        assert self.client is not None
        keys = self.keys
        await self._allowed("while reading the server clock (TIME)", self.clock.sync(self.client))
        await self._allowed("while loading the runtime's scripts (SCRIPT LOAD)", self.store.load_scripts())
        await self._allowed(f"while subscribing to the channel '{keys.cancel_channel}' (SUBSCRIBE)",
                            self._subscribable())
        await self._allowed(f"while running a script (EVALSHA) on the keys of a run ('{keys.run(_PROBE_RUN)}', …)",
                            self.store.probe(keys.run_keys(_PROBE_RUN), persist=True))
        shared = [*self._group_streams, keys.timers, keys.timers_claimed, keys.runs, keys.workers, keys.dead,
                  keys.failures("probe")]
        await self._allowed(f"while running a script (EVALSHA) on the shared keys ('{keys.control}', …)",
                            self.store.probe(list(dict.fromkeys(shared))))
        for stream in self._group_streams:
            try:
                await self._allowed(f"while creating the consumer group of '{stream}' (XGROUP CREATE)",
                                    self.client.xgroup_create(stream, GROUP, id="0", mkstream=True))
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        await self._allowed(f"while recording its liveness in '{keys.workers}' (HSET)", self._liveness())

    async def _regroup(self) -> None:
        """Make the consumer groups again after Redis lost its data (a restart without persistence, a flush):
        the reader and the reclaimer both meet it; the first makes them, the other waits for that."""
        seen = self._regroups
        async with self._regrouping:
            if self._regroups != seen:
                return  # made again while this one waited
            log.warning("worker %s: Redis lost the consumer groups (its data was lost: %s); making them again",
                        self.name, self._loss_causes())
            await self._retrying("creating consumer groups", self._setup)
            self._regroups += 1

    async def _allowed(self, where: str, step: Awaitable[Any]) -> Any:
        """``await step``; a ``NOPERM`` answer becomes the :class:`RedisConfigError` saying what was refused."""
        try:
            return await step
        except redis.ResponseError as exc:
            if no_permission(exc):
                if "'client|setname'" in str(exc):  # (sent as each connection opens, whatever the first command)
                    where = "while naming its connection to Redis (CLIENT SETNAME, sent as each connection opens)"
                raise self._acl_error(exc, where) from None
            raise

    @staticmethod
    async def _connected(*connections: aioredis.Redis | WireConnection | None) -> None:
        """PING on each of the reading loops' connections (they open their connections themselves)."""
        for connection in connections:
            if isinstance(connection, WireConnection):
                (reply,) = await connection.execute([("PING",)])
                if isinstance(reply, Exception):
                    raise reply
            elif connection is not None:
                await connection.ping()

    async def _subscribable(self) -> None:
        """Subscribe to the cancel channel and unsubscribe (Redis answers ``NOPERM`` to a user without it)."""
        assert self.client is not None
        pubsub = self.client.pubsub()
        try:
            await pubsub.subscribe(self.keys.cancel_channel)
            async with asyncio.timeout(10):  # (no answer: an outage, retried as one)
                while await pubsub.get_message(timeout=1.0) is None:  # the confirmation, or the refusal
                    pass
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    def _install_signals(self) -> None:
        """Take SIGTERM and SIGINT while serving; an ignored one stays ignored, and what was there is put back."""
        if not self.options.handle_signals or threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        self._taken = [sig for sig in (signal.SIGTERM, signal.SIGINT) if take_signal(loop, sig, self._on_signal)]

    def _remove_signals(self) -> None:
        taken, self._taken = self._taken, []
        loop = asyncio.get_running_loop()
        for sig in reversed(taken):
            give_back_signal(loop, sig, self._on_signal)

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("worker %s: %s received, finishing in-flight steps (up to %g s; again to stop at once)",
                     self.name, signal.Signals(sig).name, self.options.grace_s)
            self.stop(graceful=True)
        else:
            log.info("worker %s: stopping at once; its messages will be reclaimed after the lease", self.name)
            self.stop(graceful=False)

    async def _retrying(self, what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        backoff = Backoff()
        while True:
            try:
                result = await fn()
                if backoff.failures:
                    log.info("worker %s: Redis reachable again (%s)", self.name, what)
                return result
            except (*_REFUSED, *TRANSIENT) as exc:
                refusal = _refusal(exc) if what == "connecting" else None
                unwell = server_unwell(refusal or exc)  # out of memory, a read-only replica, …: for now
                if refusal is not None and not unwell:
                    # Redis answered, and said no: a wrong password or user, a missing permission, a database
                    # number it does not have, or not Redis at all. Retrying cannot help: a configuration error.
                    if no_permission(refusal):
                        raise self._acl_error(refusal, f"while {what}") from None
                    raise RedisConfigError(f"Redis at {describe_url(resolve_url(self.url))} refused the worker "
                                           f"while {what}: {type(refusal).__name__}: {refusal}") from None
                if not (isinstance(exc, TRANSIENT) or unwell):
                    raise
                if unwell and what == "connecting":
                    replica = await self._replica_error()  # a replica refuses writes for good: never waited on
                    if replica is not None:
                        raise replica from None
                if backoff.failures == 0:
                    log.warning("worker %s: Redis %s while %s (%s); retrying with backoff", self.name,
                                "refusing work for now" if unwell else "unreachable", what,
                                exc if unwell else await asyncio.to_thread(unreachable_reason,
                                                                           resolve_url(self.url), exc))
                if self._stopping:
                    raise
                await backoff.wait()

    # --- reading ------------------------------------------------------------------------

    async def _read(self, reader: aioredis.Redis, wire: WireConnection | None, count: int, block: int,
                    streams: list[str]) -> list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]:
        """One ``XREADGROUP`` of new entries on ``streams``: [(stream, [(entry id, fields)])]."""
        if wire is None:
            read: Any = await reader.xreadgroup(GROUP, self.name, dict.fromkeys(streams, ">"), count=count,
                                                block=block)
            return read or []
        return stream_entries(await wire.blocking(("XREADGROUP", "GROUP", GROUP, self.name, "COUNT", count, "BLOCK",
                                                   block, "STREAMS", *streams, *[">"] * len(streams)), block))

    async def _reader(self, reader: aioredis.Redis, wire: WireConnection | None) -> None:
        """Read start requests and tasks: no more at a time than there are free slots."""
        await self._read_loop(reader, wire, self.streams, self._free_slots)

    async def _cancels_reader(self, reader: aioredis.Redis, wire: WireConnection | None) -> None:
        """Read cancel requests, whether or not a slot is free: a chain holds its slot until its run ends, so a
        cancel read only when a slot frees would reach a run of a busy fleet after it had completed."""
        await self._read_loop(reader, wire, [self.keys.cancels], lambda: _CANCELS_PER_READ - len(self._cancelling))

    def _free_slots(self) -> int:
        return self.options.concurrency - len(self._held) - len(self._starting)

    async def _read_loop(self, reader: aioredis.Redis, wire: WireConnection | None, streams: list[str],
                         room: Callable[[], int]) -> None:
        """Read new entries of ``streams`` (at most ``room()`` at a time; none while it is 0) and give each
        its handler, until stopped; Redis unreachable, refusing work for now, or having lost its data is waited
        out."""
        assert self._room is not None
        backoff = Backoff()
        block = min(self.options.block_ms, 100) if self.options.burst else self.options.block_ms
        while not self._stopping:
            free = room()
            if free <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                reply = await self._read(reader, wire, free, block, streams)
                backoff.reset()
            except redis.ResponseError as exc:
                if groups_lost(exc):
                    await self._regroup()
                    continue
                if not server_unwell(exc):
                    raise
                if backoff.failures == 0:
                    log.warning("worker %s: reading refused by Redis for now (%s); retrying with backoff", self.name,
                                exc)
                await backoff.wait()
                continue
            except TRANSIENT as exc:
                if backoff.failures == 0:
                    log.warning("worker %s: Redis unreachable (%s); reconnecting with backoff", self.name, exc)
                await backoff.wait()
                continue
            if not reply:
                if self.options.burst and streams is self.streams and await self._idle_now():
                    log.info("worker %s: burst: nothing left to do", self.name)
                    self.stop(graceful=True)
                continue
            for stream, entries in reply:
                name = stream.decode()
                for entry_id, fields in entries:
                    self._spawn(name, entry_id.decode(), fields or {}, recover=False)

    async def _closed_on(self, backoff: Backoff, exc: BaseException) -> None:
        """Wait before handling an entry again after a lost connection; raise :class:`_ClosedOnEntry` when the
        connection was lost at each of :data:`_CLOSED_TRIES` tries while Redis answers other commands — the
        server closes it for this entry (a reply larger than its client-output-buffer-limit): retried at once for
        ever, it would keep the process reconnecting many times a second and its run waiting silently."""
        if backoff.failures >= _CLOSED_TRIES and not _refusal(exc):
            assert self.client is not None
            try:
                await self.client.ping()
            except TRANSIENT:
                pass  # Redis is down: an outage, waited out
            else:
                raise _ClosedOnEntry(backoff.failures, exc) from None
        await backoff.wait()

    def _spawn(self, stream: str, entry_id: str, fields: dict[bytes, bytes], recover: bool) -> None:
        """Give a stream entry its handler — or, when it cannot be read, set it aside: whatever an entry holds,
        it never stops the loop that read it."""
        trigger = Keys.trigger(stream, entry_id)
        problem = _text_problem(fields)
        try:
            if problem is None:
                taken = fields.get(b"t")  # put back from the dead letters: it takes over the tasks held under its
                if taken is not None:  # old name, as after a crash
                    trigger, recover = taken.decode(), True
                if stream == self.keys.control:
                    self._starting.add(entry_id)
                    coro: Awaitable[None] = self._control(stream, entry_id, fields, recover, trigger)
                elif stream == self.keys.cancels:
                    self._cancelling.add(entry_id)
                    coro = self._control(stream, entry_id, fields, recover, trigger)
                else:
                    command, why = _task_message(fields)
                    if command is None:
                        problem = why
                    else:
                        held = self._hold(stream, entry_id, command, fields[b"m"],
                                          (fields.get(b"v") or b"").decode(), trigger)
                        held.generation = (fields.get(b"g") or b"").decode()
                        coro = self._task(held, recover)
        except Exception as exc:  # a safety net: the checks above are meant to catch what cannot be read
            problem = f"it could not be read: {_describe(exc)}"
        if problem is not None:
            if stream == self.keys.control:  # (entry ids are per stream: another stream's may be the same)
                self._starting.discard(entry_id)
            elif stream == self.keys.cancels:
                self._cancelling.discard(entry_id)
            coro = self._set_aside(stream, entry_id, fields, trigger, problem)
        self._track(self._guarded(coro, stream, entry_id, fields, trigger))

    async def _guarded(self, coro: Awaitable[None], stream: str, entry_id: str, fields: dict[bytes, bytes],
                       trigger: str) -> None:
        """Handle one stream entry; when handling it fails unexpectedly (a bug, data damaged in Redis), count
        the failure: the entry, left pending, is handled again after the lease, and set aside as a dead letter
        at ``max_failures`` failures — so that a message nobody can handle neither stops a process nor is
        retried forever, and is never lost (``flowdsl dead-letters`` shows it and puts it back)."""
        try:
            await coro
        except TRANSIENT:
            raise  # Redis went away while stopping: not the message's fault
        except NewerVersion as exc:  # a newer flowdsl's run (a rolling upgrade): never apply older rules to it
            log.warning("worker %s: entry %s of %s left for an upgraded worker: %s; it is handled again after the "
                        "lease", self.name, entry_id, stream, exc)
        except _ClosedOnEntry as exc:  # counted as a failure of the entry: a dead letter at max_failures
            log.error("worker %s: entry %s of %s: %s", self.name, entry_id, stream, exc)
            await self._set_aside(stream, entry_id, fields, trigger, str(exc), max(1, self.options.max_failures))
        except RunTooLarge as exc:  # handled again, it would run its step again for the same result: set aside now
            log.error("worker %s: entry %s of %s cannot be handled: %s", self.name, entry_id, stream, exc)
            await self._set_aside(stream, entry_id, fields, trigger, str(exc))
        except Exception as exc:
            if self._config_error(exc, f"while handling entry {entry_id} of '{stream}' (left pending)"):
                return  # not the message's fault: never a dead letter; it is handled again after the lease
            if isinstance(exc, redis.ResponseError) and "invalid bulk length" in str(exc):  # handled again, it
                # would run its step again for the same refusal: set aside now, naming the setting
                reason = (f"Redis refused a value larger than its proto-max-bulk-len ({exc}): a result, or the "
                          "context a step is given, is too large for this server — keep large data out of runs, or "
                          "raise proto-max-bulk-len")
                log.error("worker %s: entry %s of %s cannot be handled: %s", self.name, entry_id, stream, reason)
                await self._set_aside(stream, entry_id, fields, trigger, reason)
                return
            if server_unwell(exc) or isinstance(exc, Contended):  # not the message's fault either
                log.warning("worker %s: handling entry %s of %s failed for now (%s); it is handled again after the "
                            "lease", self.name, entry_id, stream, _describe(exc))
                return
            log.error("worker %s: handling entry %s of %s failed", self.name, entry_id, stream, exc_info=True)
            await self._set_aside(stream, entry_id, fields, trigger,
                                  f"handling it failed: {_describe(exc)}", max(1, self.options.max_failures))

    async def _set_aside(self, stream: str, entry_id: str, fields: dict[bytes, bytes], trigger: str, reason: str,
                         threshold: int = 0) -> None:
        """Count a failure of the entry; set it aside at ``threshold`` failures (0: now, it cannot be handled)."""
        try:
            # the count outlives the gaps between failures (a lease each, and the handling): a day, or ten leases
            code, failures, dead_id = await self.store.dead_letter(
                stream, entry_id, self.name, fields, reason=reason, trigger=trigger, threshold=threshold,
                remember_ms=max(86_400_000, 10 * self.lease_ms))
        except TRANSIENT as exc:  # left pending: handled again after the lease
            log.warning("worker %s: could not set entry %s of %s aside (%s); it is handled again after the lease",
                        self.name, entry_id, stream, exc)
            return
        if code == 1:
            self.stats.dead_letters += 1
            named, _ = _json_field(fields, b"m" if b"m" in fields else b"c", "")
            run_id = named["run_id"] if named is not None else None
            log.error("worker %s: entry %s of %s%s set aside as dead letter %s: %s (`flowdsl dead-letters` lists it "
                      "and can put it back)", self.name, entry_id, stream, f" (run {run_id})" if run_id else "",
                      dead_id, visible(reason), extra={"run_id": run_id, "dead_letter": dead_id, "stream": stream,
                                                       "entry_id": entry_id})
        elif code == 0:
            log.warning("worker %s: entry %s of %s failed %d time(s) of %d; it is handled again after the lease",
                        self.name, entry_id, stream, failures, threshold)

    def _hold(self, stream: str, entry_id: str, command: dict[str, Any], raw: bytes | None,
              outbox_version: str, trigger: str | None = None, token: str = "") -> _Held:
        """Hold a stream entry and the task it runs under a lease token (``token``, else a new one)."""
        if trigger is None:
            trigger = Keys.trigger(stream, entry_id)
        held = _Held(stream, entry_id, command["run_id"], command["task_id"],
                     token or f"{trigger}|{self.name}|{next(self._nonces)}", command, raw, outbox_version, trigger)
        self._held[(stream, entry_id)] = held
        self._by_task[held.task_id] = held
        return held

    def _unhold(self, held: _Held) -> None:
        self._held.pop((held.stream, held.entry_id), None)
        if self._by_task.get(held.task_id) is held:
            del self._by_task[held.task_id]

    def _serves(self, command: dict[str, Any]) -> bool:
        """Whether this process runs a dispatched task itself (self-dispatch) rather than queue it."""
        if self._stopping:
            return False
        worker = command.get("worker") if command.get("kind") != "llm" else None
        served = self._served.get(worker)
        if served is None:  # one stream per worker name: decided once per name
            served = self._served[worker] = self.keys.queue_of(command) in self._task_streams
        return served

    def _track(self, coro: Awaitable[Any]) -> None:
        # (the loop's create_task: asyncio.ensure_future is four calls more in Python, once per stream entry)
        task = asyncio.get_running_loop().create_task(cast("Coroutine[Any, Any, Any]", coro))
        self._active.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._active.discard(task)
        if self._room is not None:
            self._room.set()
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            assert exc is not None
            if not self._config_error(exc, "while handling a stream entry or a timer"):
                log.error("worker %s: a handler failed: %s: %s", self.name, type(exc).__name__, exc)

    # --- handlers -------------------------------------------------------------------------

    async def _control(self, stream: str, entry_id: str, fields: dict[bytes, bytes], recover: bool,
                       trigger: str) -> None:
        """A start or cancel request of the control stream, or a cancel request of the cancels stream."""
        if recover:  # a start or cancel taken over — with the steps a dead process was chaining under it
            self.stats.reclaimed += 1
        try:
            ack = [self.store.ack_op(stream, entry_id, self.name)]
            msg, problem = _control_message(fields)
            if msg is not None and stream == self.keys.cancels and msg.get("type") != "cancel":
                msg, problem = None, "the cancels stream holds cancel requests only (a start request is sent on " \
                    "the control stream)"
            if msg is None:
                await self._set_aside(stream, entry_id, fields, trigger, problem)
                return
            run_id = msg["run_id"]
            backoff = Backoff()
            while True:
                try:
                    if msg.get("type") == "start":
                        await self._start(run_id, entry_id, trigger, ack, recover)
                    elif msg.get("type") == "cancel":
                        if msg.get("g") and (await self.store.call("HGET", self.keys.run(run_id), "born") or b"") \
                                not in (b"", str(msg["g"]).encode()):
                            await self.advancer.relay(None, None, ack)  # for an expired run of the same id
                            return
                        event = {"type": "cancel_requested", "reason": str(msg.get("reason") or "cancel requested")}
                        await self.advancer.apply_event(run_id, event, ack=ack, recover=recover, trigger=trigger)
                    return
                except TRANSIENT as exc:
                    if self._stopping:
                        return  # the entry stays pending: reclaimed after the lease
                    recover = True
                    await self._closed_on(backoff, exc)
        finally:
            (self._cancelling if stream == self.keys.cancels else self._starting).discard(entry_id)

    async def _start(self, run_id: str, entry_id: str, trigger: str, ack: list[dict[str, Any]],
                     recover: bool) -> None:
        """Start a run; with a free slot, run its first step here at once, under the control entry."""
        assert self._slots is not None
        chain = None
        if not self._stopping:
            # the reader reads no more entries than there are free slots, so this wait is short; with the slot,
            # the run's first step runs here at once instead of going through its stream
            await self._slots.acquire()
            if self._stopping:
                self._slots.release()
            else:
                chain = Chain(f"{trigger}|{self.name}|{next(self._nonces)}", self._serves)
        try:
            if await self.advancer.start(run_id, ack=ack, recover=recover, trigger=trigger,
                                         chain=chain) == Outcome.APPLIED:
                self.stats.runs_started += 1
            if chain is None or chain.command is None:
                return
            self.stats.chained += 1
            held = self._hold(self.keys.control, entry_id, chain.command, None, "", trigger, chain.token)
            self._starting.discard(entry_id)  # counted in _held from here on
            try:
                await self._serve(held, ack, 1)
            except TRANSIENT:
                pass  # Redis went away mid-way and we are stopping: the entry is reclaimed after the lease
            finally:
                self._unhold(held)
        finally:
            if chain is not None:
                self._slots.release()

    async def _task(self, held: _Held, recover: bool) -> None:
        assert self._slots is not None
        try:
            async with self._slots:
                if self._stopping:
                    if not recover:
                        await self._hand_back(held)
                    # a delivery taken over from a process that may have died is left pending, not handed
                    # back: its task may be held under it, with an outbox to relay, which only a taker's
                    # recovery (RECOVER, then _flush) puts right; another process takes it after the lease
                    return
                await self._run_task(held, recover)
        except TRANSIENT:
            pass  # Redis went away mid-way and we are stopping: the entry is reclaimed after the lease
        finally:
            self._unhold(held)

    async def _run_task(self, held: _Held, recover: bool) -> None:
        ack = [self.store.ack_op(held.stream, held.entry_id, self.name)]
        if recover:
            self.stats.reclaimed += 1
        backoff = Backoff()
        while True:
            try:
                if recover:
                    await self.advancer.recover(held.run_id, held.trigger)
                code, value = await self.store.pickup(held.run_id, held.task_id, held.trigger, held.token,
                                                      held.outbox_version, held.generation)
                break
            except TRANSIENT as exc:
                if self._stopping:
                    raise
                recover = True
                await self._closed_on(backoff, exc)
        log.debug("pickup %s entry %s recover=%s: %s", held.task_id, held.entry_id, recover, code)
        if code == 4:  # a newer flowdsl's run: its step is not run here (left pending: see _guarded)
            check_rules(int(value), held.run_id)
        if code in (0, 3):
            self.stats.dropped += 1
            await self.advancer.relay(None, None, ack)
            return
        await self._serve(held, ack, code)

    async def _serve(self, held: _Held, ack: list[dict[str, Any]], code: int) -> None:
        """Run the held task (``code`` 2: answer it cancelled) and report its outcome; while the transition
        hands this process the run's next task (self-dispatch), run that one too, under the same entry."""
        held.picked = True
        # one chain offer (its token is the entry's throughout) and one look-up of the handler's task serve every
        # step of the chain: a chained step makes neither again
        offer = Chain(held.token, self._serves)
        handler = asyncio.current_task()
        wait_for_thread.set(held)  # (a sync worker's job is kept on it; see _cancel_requested)
        while True:
            event = await self._execute(held, code == 2, handler)
            if event is None:
                return  # handed back
            offer.command = None  # (a transition that takes no task leaves it as it is)
            chain = None if self._stopping else offer
            await self._report(held, event, ack, chain)
            if chain is None or chain.command is None:
                return  # the entry was acknowledged with the transition's relay
            self.stats.chained += 1
            if self._by_task.get(held.task_id) is held:
                del self._by_task[held.task_id]
            held.task_id, held.command, held.raw, held.outbox_version = chain.command["task_id"], chain.command, \
                None, ""
            held.cancel, held.thread, code = False, None, 1
            self._by_task[held.task_id] = held
            if self._stopping:
                await self._hand_back(held)  # held already: give it to another process at once
                return

    async def _execute(self, held: _Held, cancelled: bool, handler: asyncio.Task[Any] | None
                       ) -> dict[str, Any] | None:
        """The input event answering the held task, or None when it was handed back (graceful stop).
        ``handler``: the task running this (``asyncio.current_task()``)."""
        if cancelled or held.cancel:
            return {"type": "task_cancelled", "task_id": held.task_id}
        self.stats.tasks += 1
        # the worker runs in this handler's own task (no task of its own: no extra turns of the loop); to stop
        # it, _interrupt cancels the handler while it is here, and the cancellation is taken back below
        held.handler = handler
        try:
            event = await execute(held.command, registry=self.registry, lm=self.options.lm)
        except asyncio.CancelledError:
            handler, held.handler = held.handler, None  # from here on, nothing more to interrupt
            if not held.interrupted or handler is None or handler.uncancel() > 0:
                raise  # cancelled from outside (stopping at once)
            held.interrupted = False
            if held.hand_back:
                await self._hand_back(held)
                return None
            return {"type": "task_cancelled", "task_id": held.task_id}
        finally:
            held.handler = None
        if held.interrupted:  # the worker swallowed the interrupt's cancellation and returned: take that cancel
            # back too, else the handler stays "being cancelled": a task chained here next could not be
            # interrupted, and a CancelledError it raised itself would pass for a cancellation
            held.interrupted = False
            if handler is not None:
                handler.uncancel()
        return event

    async def _report(self, held: _Held, event: dict[str, Any], ack: list[dict[str, Any]],
                      chain: Chain | None) -> None:
        mode = "strict" if event["type"] == "task_cancelled" else "lease"
        backoff: Backoff | None = None
        while True:  # report until Redis takes it (the heartbeat keeps the lease meanwhile): a result in hand is
            # never dropped for an outage or a refusal for now (out of memory, …) — the step would run again
            try:
                if chain is not None and backoff is None:  # (the usual case: apply_event's straight line)
                    outcome = await self.advancer.report(held.run_id, event, (held.task_id, mode, held.token),
                                                         self.name if mode == "lease" else "", ack, chain)
                else:
                    outcome = await self.advancer.apply_event(
                        held.run_id, event, guard=(held.task_id, mode, held.token),
                        reporter=self.name if mode == "lease" else "", ack=ack, recover=backoff is not None,
                        chain=chain)
                break
            except Exception as exc:
                if not (_for_now(exc) or isinstance(exc, Contended)):
                    raise
                if backoff is None:
                    backoff = Backoff()
                    log.warning("worker %s: reporting %s failed for now (%s); retrying with backoff", self.name,
                                held.task_id, _describe(exc))
                try:
                    await backoff.wait()
                except asyncio.CancelledError:  # stopping: the result in hand is dropped — say so
                    log.warning("worker %s: the %s result of %s was never taken by Redis (%s) and is dropped as the "
                                "process stops: another process runs the step again after the lease, with the same "
                                "idempotency key", self.name, event["type"], held.task_id, _describe(exc))
                    raise
        if outcome == Outcome.MISSING:
            log.warning("worker %s: the %s result of %s is dropped: its run is gone from Redis (%s)%s", self.name,
                        event["type"], held.task_id, self._loss_causes(),
                        "; its effect, if it has one, is undone by nobody (idempotency key "
                        f"{held.command.get('idempotency_key', '?')})" if event["type"] == "task_succeeded" else "")
        if outcome == Outcome.REJECTED and mode == "lease":
            self.stats.rejected += 1
            log.warning("worker %s: result of %s rejected: its lease had been lost", self.name, held.task_id)
            if event["type"] == "task_succeeded":  # its effect may have to be undone: the kernel must see it
                task = asyncio.ensure_future(self._late_result(held.run_id, dict(event), held.token,
                                                               held.generation))
                self._late.add(task)
                task.add_done_callback(self._late_done)

    def _late_done(self, task: asyncio.Task[None]) -> None:
        self._late.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            assert exc is not None
            if not self._config_error(exc, "while reporting a late result again"):
                log.error("worker %s: reporting a late result again failed: %s: %s", self.name, type(exc).__name__,
                          exc)

    async def _late_result(self, run_id: str, event: dict[str, Any], token: str, generation: str) -> None:
        """Report again a success the lease guard rejected because another process held its task (its lease
        had expired; docs/runtime.md, "A lease is not a fence"): once per lease, for at most ``late_leases``
        leases, until the guard lets it through — the task has ended (its entry in the tasks hash is gone), and
        the kernel sees a result for a task not in flight: a duplicate of a success is rejected, a success of a
        step recorded cancelled or failed is a late completion. It stops when the run is gone (expired, or
        another run of the same id: its ``born`` differs). Stopping, the process tries once more, then gives
        up. No reporter: a rejection journals no second ``lease_lost`` note (the first one did). The guard
        is the task id's (``…#<attempt>``): never applied to another attempt of the step."""
        assert self._late_wake is not None
        task_id = event["task_id"]
        ours = (f"r:{token}".encode(), f"xr:{token}".encode())
        if not generation:  # (a chain begun by a start request holds none) the run's, read now: it exists now
            with contextlib.suppress(*TRANSIENT):
                generation = ((await self.store.call("HGET", self.keys.run(run_id), "born")) or b"").decode()
            if not generation:
                return
        for _ in range(max(1, self.options.late_leases)):
            final = self._late_wake.is_set()
            if not final:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.lease_ms / 1000):
                        await self._late_wake.wait()
                final = self._late_wake.is_set()
            try:
                (version, born), lease = await asyncio.gather(
                    self.store.call("HMGET", self.keys.run(run_id), "v", "born"),
                    self.store.call("HGET", self.keys.tasks(run_id), task_id))
                if version is None or born is None or born.decode() != generation:
                    return  # the run is gone (expired; or another run of the same id has started since)
                if lease is not None and lease not in ours and not lease.startswith(b"xr:"):
                    outcome = Outcome.REJECTED  # held by another, not being cancelled: the script would refuse it
                else:
                    outcome = await self.advancer.apply_event(run_id, event, guard=(task_id, "lease", token))
            except Exception as exc:
                if not _for_now(exc):
                    raise
                outcome = Outcome.REJECTED  # tried again next lease
            if outcome == Outcome.APPLIED:
                self.stats.late += 1
                log.warning("worker %s: the late result of %s was reported again, its task having ended",
                            self.name, task_id)
            if outcome != Outcome.REJECTED or final:
                return
        log.warning("worker %s: gave up reporting the late result of %s again: another process held its task "
                    "for %d leases", self.name, task_id, self.options.late_leases)

    async def _hand_back(self, held: _Held) -> None:
        """Give a task back: release its lease, queue its message again, acknowledge this delivery."""
        if held.picked:
            await self.store.release(held.run_id, held.task_id, held.token)
        raw = held.raw if held.raw is not None else dumps(held.command)
        generation = held.generation if held.raw is not None else \
            ((await self.store.call("HGET", self.keys.run(held.run_id), "born")) or b"").decode()
        await self.advancer.relay(None, None, [{"o": "task", "q": self.keys.queue_of(held.command), "raw": raw,
                                                "v": held.outbox_version, "g": generation},
                                               self.store.ack_op(held.stream, held.entry_id, self.name)])
        self.stats.handed_back += 1

    def _cancel_requested(self, held: _Held) -> None:
        held.cancel = True
        if cancellable(held.command, self.registry) or held.queued():
            # (a sync worker's job still queued is taken back as the interrupt reaches it: never called; one that
            # began meanwhile is waited for all the same — a running thread cannot be stopped)
            self._interrupt(held)

    @staticmethod
    def _interrupt(held: _Held) -> None:
        """Stop the worker the held task is running, if it is running one (its handler then answers)."""
        if held.handler is not None and not held.interrupted:
            held.interrupted = True
            held.handler.cancel()

    # --- stopping ------------------------------------------------------------------------------

    async def _shutdown(self, loops: list[asyncio.Task[None]]) -> None:
        # the loops that start handlers: each ends at its next turn, so that nothing starts after the wait below
        waited = {"reader", "cancel reader", "timers", "reclaimer"}
        for task in [loop for loop in loops if loop.get_name() in waited]:
            try:
                async with asyncio.timeout(self.options.block_ms / 1000 + 1):
                    await asyncio.shield(task)
            except TimeoutError:
                pass
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not task.cancelled() or (current is not None and current.cancelling()):
                    raise  # serve() itself is cancelled: stop at once (its finally cancels what is left)
            except Exception as exc:
                if task is self._failed or no_permission(exc) or isinstance(exc, RedisConfigError):
                    pass  # (said by _loop_ended already)
                elif _for_now(exc):  # Redis unreachable or refusing work (a read-only replica, …) as it stopped
                    log.warning("worker %s: its %s loop ended while stopping: %s", self.name, task.get_name(),
                                _describe(exc))
                else:
                    log.exception("worker %s: its %s loop failed while stopping", self.name, task.get_name())
        if self._active:
            await asyncio.wait(set(self._active), timeout=self.options.grace_s)
        if self._active:
            for held in list(self._held.values()):
                held.hand_back = True
                self._interrupt(held)
            await asyncio.wait(set(self._active), timeout=5.0)
        for task in list(self._active):
            task.cancel()
        if self._active:
            await asyncio.wait(set(self._active), timeout=1.0)
        if self._late_wake is not None:
            self._late_wake.set()  # the late results waiting to be reported again: one more try each, now
        if self._late:
            await asyncio.wait(set(self._late), timeout=5.0)
