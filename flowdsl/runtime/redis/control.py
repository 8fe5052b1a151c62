"""The worker process's start and cancel requests, and a cancel reaching a task it holds.

Stage: runtime: redis. Imports ``flowdsl.runtime.execute`` (whether a worker can be cancelled), this package's
``advance``, ``connection``, ``keys``, ``reading`` (an entry's JSON field) and ``serving``, and stdlib.
:class:`Control` is mixed into :class:`~flowdsl.runtime.redis.worker.RedisWorker` (whose attributes it uses):

- **start request** (control stream) — starts the run through the kernel; with a free slot the run's first step is
  held here at once and run under the control entry (self-dispatch, :class:`~flowdsl.runtime.redis.advance.Chain`,
  served by :mod:`.tasks`), and the entry is acknowledged with the transition that ends the chain.
- **cancel request** (control or cancels stream) — one transition (``cancel_requested``); a request naming another
  generation of the run (an expired run of the same id) is only acknowledged.
- **a cancel reaching a held task** (:meth:`Control._cancel_requested`, from the cancel listener and the
  heartbeat of :mod:`.upkeep`) — the task is answered cancelled; the worker is interrupted at once when it can be
  (an async worker; a sync worker's job still waiting for a thread), else its real outcome is waited for.
  :meth:`Control._interrupt` also stops a worker whose task is handed back when the process stops.

A request that cannot be read is set aside as a dead letter at once; Redis lost meanwhile is waited out (the entry
is handled again, as taken over, when the process is stopping).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any

from flowdsl.runtime.execute import cancellable
from flowdsl.runtime.redis.advance import Chain, Outcome
from flowdsl.runtime.redis.connection import TRANSIENT, Backoff
from flowdsl.runtime.redis.reading import json_field
from flowdsl.runtime.redis.serving import Held

if TYPE_CHECKING:
    from flowdsl.runtime.redis.advance import Advancer
    from flowdsl.runtime.redis.keys import Keys
    from flowdsl.runtime.redis.serving import WorkerStats
    from flowdsl.runtime.redis.store import Store
    from flowdsl.workers import WorkerRegistry

__all__ = ["Control"]


def _control_message(fields: dict[bytes, bytes]) -> tuple[dict[str, Any] | None, str]:
    """A control stream entry's request, or None and why the entry is not a start or cancel request."""
    msg, problem = json_field(fields, b"c", "a control message carries its request there")
    if msg is not None and msg.get("type") not in ("start", "cancel"):
        return None, f"its request is of no known type ({str(msg.get('type'))[:50]!r}; expected 'start' or 'cancel')"
    return msg, problem


class Control:
    """Start and cancel requests, and cancels reaching held tasks (see the module doc); a mixin of
    ``RedisWorker``."""

    # what the worker provides
    name: str
    keys: Keys
    stats: WorkerStats
    registry: WorkerRegistry
    store: Store
    advancer: Advancer
    _nonces: Iterator[str]
    _starting: set[str]
    _cancelling: set[str]
    _stopping: bool
    _slots: asyncio.Semaphore | None
    _closed_on: Callable[[Backoff, BaseException], Coroutine[Any, Any, None]]
    _serves: Callable[[dict[str, Any]], bool]
    _unhold: Callable[[Held], None]
    _serve: Callable[[Held, list[dict[str, Any]], int], Coroutine[Any, Any, None]]

    if TYPE_CHECKING:
        async def _set_aside(self, stream: str, entry_id: str, fields: dict[bytes, bytes], trigger: str,
                             reason: str, threshold: int = 0) -> None: ...

        def _hold(self, stream: str, entry_id: str, command: dict[str, Any], raw: bytes | None,
                  outbox_version: str, trigger: str | None = None, token: str = "") -> Held: ...

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

    def _cancel_requested(self, held: Held) -> None:
        held.cancel = True
        if cancellable(held.command, self.registry) or held.queued():
            # (a sync worker's job still queued is taken back as the interrupt reaches it: never called; one that
            # began meanwhile is waited for all the same — a running thread cannot be stopped)
            self._interrupt(held)

    @staticmethod
    def _interrupt(held: Held) -> None:
        """Stop the worker the held task is running, if it is running one (its handler then answers)."""
        if held.handler is not None and not held.interrupted:
            held.interrupted = True
            held.handler.cancel()
