"""What a worker process is given, what it counts and what it holds; how it tells a refusal from an outage.

Stage: runtime: redis. Imports redis (its error types), ``flowdsl.kernel`` (its rules version), this package's
``advance`` (the snapshot size) and ``connection`` (what is transient), ``flowdsl.workers`` (an error's words) and
stdlib. The modules of :class:`~flowdsl.runtime.redis.worker.RedisWorker` share it; it imports none of them:

- :class:`WorkerOptions` (the ``flowdsl worker`` options) and :class:`WorkerStats` (what
  :meth:`~flowdsl.runtime.redis.worker.RedisWorker.serve` returns);
- :class:`Held` — a stream entry the process holds and the task it runs under it (the entry's own, or the next
  step of a chain);
- :func:`serving_gc` — the garbage collector's settings while a worker process serves (``flowdsl worker``);
- :func:`cancel_and_wait` — tasks stopped for sure: a cancellation a library call lost is sent again;
- :data:`REFUSED`, :func:`refusal_of`, :func:`for_now` and :func:`describe` — whether Redis refused or is only
  unreachable or unwell for now, and an error as a log line says it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from flowdsl import kernel
from flowdsl.runtime.redis.advance import SNAPSHOT_BYTES
from flowdsl.runtime.redis.connection import TRANSIENT, server_unwell
from flowdsl.workers import describe_exception

__all__ = ["REFUSED", "Held", "WorkerOptions", "WorkerStats", "cancel_and_wait", "describe", "for_now", "refusal_of",
           "serving_gc"]

#: how often :func:`cancel_and_wait` cancels again the tasks still running
RECANCEL_S = 0.05

#: what Redis answers when it is reachable but will not serve this worker (retrying cannot help)
REFUSED: tuple[type[Exception], ...] = (redis.AuthenticationError, redis.ResponseError, redis.InvalidResponse)


def refusal_of(exc: BaseException) -> BaseException | None:
    """The refusal (:data:`REFUSED`) behind ``exc``, if it is one or was caused by one (redis-py's asyncio
    client reports a failed AUTH as a ConnectionError caused by an AuthenticationError)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, REFUSED):
            return seen
        seen = seen.__cause__
    return None


def for_now(exc: BaseException) -> bool:
    """Whether ``exc`` only says Redis cannot do it now (unreachable, or refusing work: out of memory, …)."""
    return isinstance(exc, TRANSIENT) or server_unwell(exc)


def describe(exc: BaseException, limit: int = 500) -> str:
    text = describe_exception(exc)
    return text if len(text) <= limit else text[:limit - 1] + "…"


async def cancel_and_wait(tasks: Collection[asyncio.Task[Any]], timeout: float | None = None) -> None:
    """Cancel ``tasks`` and wait until they end, or for ``timeout`` seconds (None: no bound); those still running
    are cancelled again every :data:`RECANCEL_S`.

    One cancellation is not always enough: a library call can lose it and return as if none had come. Python
    3.11's ``asyncio.wait_for`` — redis-py sends each command under it when the connection has a socket timeout,
    as the worker's command connection has — returns the result of a call that finished in the same turn of the
    loop and drops the cancellation; the task goes on, ``cancelling()`` set and nothing raised. A loop that lost it
    went round again (the cancel listener, whose subscription takes that path, for ever: serve() cancelled hung in
    its ``finally``), and a step handler could go on to run its step after serve() had returned."""
    pending = {task for task in tasks if not task.done()}
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while pending:
        for task in pending:
            task.cancel()
        wait = RECANCEL_S if deadline is None else min(RECANCEL_S, deadline - loop.time())
        if wait <= 0:
            return
        _, pending = await asyncio.wait(pending, timeout=wait)


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

    @property
    def reply_timeout_s(self) -> float:
        """How long Redis may leave one of the process's connections without a byte while replies are awaited
        before it is presumed dead, closed and opened again (a network path that drops packets gives no other
        sign): the lease, within 2 to 15 s — a connection silent for a lease is of no use, the leases it should
        renew expire meanwhile."""
        return min(15.0, max(2.0, self.lease_s))

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
    rejected: int = 0  # results refused: the lease was lost, or the task had ended (the kernel's result_rejected)
    expired: int = 0  # attempts not started: their step's timeout had passed before they were picked up
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
class Held:
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
