"""The worker process's start and cancel requests, signals sent to runs, and a cancel reaching a task it holds.

Stage: runtime: redis. Imports ``flowdsl.runtime.execute`` (whether a worker can be cancelled), this package's
``advance``, ``connection``, ``keys``, ``reading`` (an entry's JSON field) and ``serving``, and stdlib.
:class:`Control` is mixed into :class:`~flowdsl.runtime.redis.worker.RedisWorker` (whose attributes it uses):

- **start request** (control stream) — starts the run through the kernel; with a free slot the run's first step is
  held here at once and run under the control entry (self-dispatch, :class:`~flowdsl.runtime.redis.advance.Chain`,
  served by :mod:`.tasks`), and the entry is acknowledged with the transition that ends the chain.
- **cancel request** (control or cancels stream) — one transition (``cancel_requested``); a request naming another
  generation of the run (an expired run of the same id) is only acknowledged.
- **signal** (signals stream) — one transition (the kernel's ``signal`` input event), guarded so that it is applied
  once whatever happens (:meth:`Control._signal`: its id's ``sig:<id>`` field in the run's hash, set by the
  transition that applies it, refuses it again); a signal for a run not started yet waits for its start, held
  (and renewed) meanwhile — *parked*: counted apart from the signals being applied, so that it never keeps them
  from being read (:mod:`.reading`); one for a run gone, or for another generation of it, is only acknowledged.
- **a cancel reaching a held task** (:meth:`Control._cancel_requested`, from the cancel listener and the
  heartbeat of :mod:`.upkeep`) — the task is answered cancelled; the worker is interrupted at once when it can be
  (an async worker; a sync worker's job still waiting for a thread), else its real outcome is waited for.
  :meth:`Control._interrupt` also stops a worker whose task is handed back when the process stops.

A request that cannot be read is set aside as a dead letter at once; Redis lost meanwhile is waited out (the entry
is handled again, as taken over, when the process is stopping).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any

from flowdsl.runtime.execute import cancellable
from flowdsl.runtime.redis.advance import Chain, Outcome
from flowdsl.runtime.redis.connection import TRANSIENT, Backoff
from flowdsl.runtime.redis.keys import SIGNAL_FIELD, Keys
from flowdsl.runtime.redis.reading import json_field
from flowdsl.runtime.redis.serving import Held

if TYPE_CHECKING:
    from flowdsl.runtime.redis.advance import Advancer
    from flowdsl.runtime.redis.serving import WorkerStats
    from flowdsl.runtime.redis.store import Store
    from flowdsl.workers import WorkerRegistry

__all__ = ["Control", "signal_problem"]

log = logging.getLogger("flowdsl.redis")


def _control_message(fields: dict[bytes, bytes], stream: str, keys: Keys) -> tuple[dict[str, Any] | None, str]:
    """The request of an entry of the control, cancels or signals stream, or None and why the entry is not one of
    the requests that stream carries."""
    msg, problem = json_field(fields, b"c", "a control message carries its request there")
    if msg is None:
        return msg, problem
    kind = msg.get("type")
    if stream == keys.signals:
        if kind != "signal":
            return None, "the signals stream holds signals only (a request of type 'signal')"
        return (msg, "") if (why := signal_problem(msg)) is None else (None, why)
    if kind not in ("start", "cancel"):
        return None, f"its request is of no known type ({str(kind)[:50]!r}; expected 'start' or 'cancel')"
    if stream == keys.cancels and kind != "cancel":
        return None, "the cancels stream holds cancel requests only (a start request is sent on the control stream)"
    return msg, ""


def signal_problem(msg: dict[str, Any]) -> str | None:
    """Why a signal message (``{"type": "signal", "run_id", "name", "payload", "id", "g"}``) cannot be applied, or
    None: a name and an id that are non-empty strings, a payload that is an object or null."""
    for name in ("name", "id"):
        value = msg.get(name)
        if not (isinstance(value, str) and value and len(value) <= 200):
            return f"its signal has no '{name}' (a non-empty string of at most 200 characters)"
    if not isinstance(msg.get("payload"), dict | None):
        return "its signal's 'payload' is not a JSON object (nor null)"
    return None


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
    _signalling: set[str]
    _parked: set[str]
    _room: asyncio.Event | None
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
        """A start or cancel request of the control stream, a cancel request of the cancels stream, or a signal of
        the signals stream."""
        if recover:  # a start, cancel or signal taken over — with the steps a dead process was chaining under it
            self.stats.reclaimed += 1
        try:
            ack = [self.store.ack_op(stream, entry_id, self.name)]
            msg, problem = _control_message(fields, stream, self.keys)
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
                    else:
                        await self._signal(run_id, entry_id, msg, ack, recover, trigger)
                    return
                except TRANSIENT as exc:
                    if self._stopping:
                        return  # the entry stays pending: reclaimed after the lease
                    recover = True
                    await self._closed_on(backoff, exc)
        finally:
            if stream == self.keys.signals:
                self._signalling.discard(entry_id)
                self._parked.discard(entry_id)
            else:
                (self._cancelling if stream == self.keys.cancels else self._starting).discard(entry_id)

    async def _signal(self, run_id: str, entry_id: str, msg: dict[str, Any], ack: list[dict[str, Any]],
                      recover: bool, trigger: str) -> None:
        """Apply a signal sent to a run (the kernel's ``signal`` input event), once: the transition's ``new`` guard
        refuses it when the run's hash has its ``sig:<id>`` field — set by the transition that applied it — so a
        signal taken over after its applier died between that transition and the acknowledgement, one applied by
        a process paused past the lease, or one sent twice under one id is acknowledged without a second
        application. A run not started yet is waited for: the entry is held and renewed meanwhile, *parked*
        (moved from ``_signalling``, the signals being applied, to ``_parked``, which has a room of its own: the
        signals to runs going on are read all the same); a process stopping leaves it pending, to be taken over
        after the lease. A run gone (expired) or of another generation than the one the signal was sent to is only
        acknowledged."""
        key = self.keys.run(run_id)
        generation = str(msg.get("g") or "").encode()
        backoff = Backoff(base=0.02, cap=1.0, floor=0.0)
        while True:
            submitted, version, born = await self.store.call("HMGET", key, "submitted", "v", "born")
            if submitted is None:
                log.warning("worker %s: signal %r for run %s dropped: the run it was sent to no longer exists "
                            "(expired)", self.name, msg["name"], run_id, extra={"run_id": run_id})
                await self.advancer.relay(None, None, ack)
                return
            if generation and (born or b"") not in (b"", generation):
                log.warning("worker %s: signal %r for run %s dropped: it was sent to another run of that id (its "
                            "generation %s; the run's is %s: the run it was sent to expired and its id was submitted "
                            "again since, or the message is not flowdsl's)", self.name, msg["name"], run_id,
                            generation.decode(errors="replace")[:50], (born or b"").decode(errors="replace"),
                            extra={"run_id": run_id})
                await self.advancer.relay(None, None, ack)
                return
            if version is not None:
                break
            if self._stopping:
                return  # left pending: another process takes it over after the lease
            if entry_id in self._signalling:  # parked: no longer counted among the signals being applied
                self._signalling.discard(entry_id)
                self._parked.add(entry_id)
                if self._room is not None:
                    self._room.set()  # (the reader may wait for room on the signals stream)
            await backoff.wait()  # submitted, not started yet: its start is on the control stream
        event = {"type": "signal", "name": msg["name"], "payload": msg.get("payload"), "id": msg["id"]}
        outcome = await self.advancer.apply_event(run_id, event, guard=(SIGNAL_FIELD + msg["id"], "new", ""),
                                                  ack=ack, recover=recover, trigger=trigger)
        if outcome == Outcome.REJECTED:
            log.info("worker %s: signal %r (id %s) for run %s was applied already: not applied again", self.name,
                     msg["name"], msg["id"], run_id, extra={"run_id": run_id})

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
