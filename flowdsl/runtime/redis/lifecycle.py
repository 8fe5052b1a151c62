"""The worker process's start and stop: startup checks, signals, retrying Redis, graceful shutdown.

Stage: runtime: redis. Imports redis (its error types), ``flowdsl.runtime.signals``, this package's
``connection``, ``keys``, ``serving`` and ``wire``, and stdlib. :class:`Lifecycle` is mixed into
:class:`~flowdsl.runtime.redis.worker.RedisWorker` (whose attributes it uses):

- **startup checks** (:meth:`Lifecycle._setup`) — with commands that change nothing, that Redis lets this process's
  ACL user do what a worker does (``TIME``, ``SCRIPT LOAD``, ``SUBSCRIBE``, ``EVALSHA`` on a run's keys and on the
  shared ones), then the consumer groups and the liveness record; a refusal is a
  :class:`~flowdsl.runtime.redis.connection.RedisConfigError` saying what was refused. The groups are made again
  when Redis lost its data (:meth:`Lifecycle._regroup`).
- **retrying** (:meth:`Lifecycle._retrying`) — Redis unreachable or refusing work for now is waited out with
  backoff; a refusal that retrying cannot mend (a wrong password, a missing permission, a replica) is raised.
- **signals** — SIGTERM/SIGINT are taken only while serving (one ignored stays ignored; what was there is put
  back): the first stops gracefully, a second at once.
- **graceful shutdown** (:meth:`Lifecycle._shutdown`) — the loops that start handlers end, in-flight steps get
  ``grace_s`` to finish, the rest are handed back (interrupted), the late results get one more try.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import redis

from flowdsl.runtime.redis.connection import (
    TRANSIENT,
    Backoff,
    RedisConfigError,
    describe_url,
    no_permission,
    resolve_url,
    server_unwell,
    unreachable_reason,
)
from flowdsl.runtime.redis.keys import GROUP
from flowdsl.runtime.redis.serving import REFUSED, cancel_and_wait, describe, for_now, refusal_of
from flowdsl.runtime.redis.wire import WireConnection
from flowdsl.runtime.signals import give_back_signal, take_signal

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from flowdsl.runtime.redis.keys import Keys
    from flowdsl.runtime.redis.serving import Held, WorkerOptions
    from flowdsl.runtime.redis.store import Clock, Store

__all__ = ["Lifecycle"]

log = logging.getLogger("flowdsl.redis")

#: the run id whose keys the startup probe names (no run has it: a run id never starts with '-')
_PROBE_RUN = "-acl-probe"


class Lifecycle:
    """Startup checks, signals, retrying, graceful shutdown (see the module doc); a mixin of ``RedisWorker``."""

    # what the worker provides
    name: str
    url: str | None
    keys: Keys
    options: WorkerOptions
    client: aioredis.Redis | None
    store: Store
    clock: Clock
    _group_streams: list[str]
    _held: dict[tuple[str, str], Held]
    _active: set[asyncio.Task[None]]
    _late: set[asyncio.Task[None]]
    _late_wake: asyncio.Event | None
    _stopping: bool
    _failed: asyncio.Task[None] | None
    _regrouping: asyncio.Lock
    _regroups: int
    _signals: int
    _taken: list[int]
    _liveness: Callable[[], Coroutine[Any, Any, None]]
    _replica_error: Callable[[], Coroutine[Any, Any, RedisConfigError | None]]
    _loss_causes: Callable[[], str]
    _acl_error: Callable[[BaseException, str], RedisConfigError]
    _interrupt: Callable[[Held], None]

    if TYPE_CHECKING:
        def stop(self, graceful: bool = True) -> None: ...

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
            except (*REFUSED, *TRANSIENT) as exc:
                refusal = refusal_of(exc) if what == "connecting" else None
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
                elif for_now(exc):  # Redis unreachable or refusing work (a read-only replica, …) as it stopped
                    log.warning("worker %s: its %s loop ended while stopping: %s", self.name, task.get_name(),
                                describe(exc))
                else:
                    log.exception("worker %s: its %s loop failed while stopping", self.name, task.get_name())
        if self._active:
            await asyncio.wait(set(self._active), timeout=self.options.grace_s)
        if self._active:
            for held in list(self._held.values()):
                held.hand_back = True
                self._interrupt(held)
            await asyncio.wait(set(self._active), timeout=5.0)
        await cancel_and_wait(set(self._active), timeout=1.0)  # (again while a Redis call lost the cancellation)
        if self._late_wake is not None:
            self._late_wake.set()  # the late results waiting to be reported again: one more try each, now
        if self._late:
            await asyncio.wait(set(self._late), timeout=5.0)
