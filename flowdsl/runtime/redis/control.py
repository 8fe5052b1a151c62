"""The worker process's start and cancel requests, signals sent to runs, and a cancel reaching a task it holds.

Stage: runtime: redis. Imports redis (its error types), ``flowdsl.runtime.execute`` (whether a worker can be
cancelled), this package's ``advance``, ``connection``, ``keys``, ``reading`` (an entry's JSON field) and
``serving``, and stdlib.
:class:`Control` is mixed into :class:`~flowdsl.runtime.redis.worker.RedisWorker` (whose attributes it uses):

- **start request** (control stream) — starts the run through the kernel; with a free slot the run's first step is
  held here at once and run under the control entry (self-dispatch, :class:`~flowdsl.runtime.redis.advance.Chain`,
  served by :mod:`.tasks`), and the entry is acknowledged with the transition that ends the chain.
- **cancel request** (control or cancels stream) — one transition (``cancel_requested``); a request naming another
  generation of the run (an expired run of the same id) is only acknowledged.
- **signal** (signals stream) — one transition (the kernel's ``signal`` input event, with the message's ``key``
  when it has one: a keyed wait's signal), guarded so that it is applied once whatever happens
  (:meth:`Control._signal`: its id's ``sig:<id>`` field in the run's hash, set by the transition that applies it,
  refuses it again); a signal for a run not started yet waits for its start, held
  (and renewed) meanwhile — *parked*: counted apart from the signals being applied, so that it never keeps them
  from being read (:mod:`.reading`); one for a run gone, or for another generation of it, is only acknowledged.
- **the watch of parked signals' runs** (:meth:`Control._parked_watch`, a background loop) — one look per run
  however many signals are parked for it, the runs due looked at together (one pipelined round trip); a run this
  process starts wakes its parked signals at once (:meth:`Control._start`).
- **a cancel reaching a held task** (:meth:`Control._cancel_requested`, from the cancel listener and the
  heartbeat of :mod:`.upkeep`) — the task is answered cancelled; the worker is interrupted at once when it can be
  (an async worker; a sync worker's job still waiting for a thread), else its real outcome is waited for.
  :meth:`Control._interrupt` also stops a worker whose task is handed back when the process stops.

A request that cannot be read is set aside as a dead letter at once; Redis lost meanwhile is waited out (the entry
is handled again, as taken over, when the process is stopping).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from flowdsl.runtime.execute import cancellable
from flowdsl.runtime.redis.advance import Chain, Outcome
from flowdsl.runtime.redis.connection import TRANSIENT, Backoff, server_unwell
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

#: how soon a run that signals were parked for is first looked at (whether it has started), then twice as late at
#: each look (a run's start is often a moment away: its start request was sent just before the signal) …
_PARKED_FIRST_S = 0.02
#: … up to this: from then on it is looked at in the round at each whole multiple of it (on the process's monotonic
#: clock), with every other run waited for as long — one HMGET per run, all in one pipelined round trip
_PARKED_EVERY_S = 1.0


@dataclass
class _Awaited:
    """A run not started yet that signals parked here wait for (:meth:`Control._until_started`), of generation
    ``born`` when the first of them parked; ``woken`` is set once it has started, is gone, or is of another
    generation (each signal then reads the run itself, once)."""

    born: bytes
    due: float  # when it is looked at next (time.monotonic())
    looks: int = 0
    woken: asyncio.Event = field(default_factory=asyncio.Event)


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
    """Why a signal message (``{"type": "signal", "run_id", "name", "payload", "id", "g", "key"?}``) cannot be
    applied, or None: a name and an id that are non-empty strings, a payload that is an object or null, a key (a
    keyed wait's signal) absent, null or a non-empty string, each string of at most 200 characters. Whether the
    run's wait takes that key is the kernel's to say (it rejects the signal, saying why)."""
    for name in ("name", "id"):
        value = msg.get(name)
        if not (isinstance(value, str) and value and len(value) <= 200):
            return f"its signal has no '{name}' (a non-empty string of at most 200 characters)"
    if not isinstance(msg.get("payload"), dict | None):
        return "its signal's 'payload' is not a JSON object (nor null)"
    key = msg.get("key")
    if key is not None and not (isinstance(key, str) and key and len(key) <= 200):
        return "its signal's 'key' is not a non-empty string of at most 200 characters (nor null)"
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
    #: the runs parked signals wait for, by id (:meth:`_until_started`); None once the watch is over
    _awaited: dict[str, _Awaited] | None
    _awaited_new: asyncio.Event | None  # set when a run is added to them, and when the process stops
    #: while the watch sleeps, until when (monotonic; inf: until told), else -inf: a run added that is due
    #: earlier wakes it — only such a run (a burst of thousands of signals wakes it not once each)
    _awaited_until: float = -math.inf
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
        after the lease. A parked signal reads the run again only once told that it has started (or is gone, or of
        another generation): by the watch of the runs parked signals wait for (:meth:`_parked_watch`), or by this
        process starting it. A run gone (expired) or of another generation than the one the signal was sent to is
        only acknowledged."""
        key = self.keys.run(run_id)
        generation = str(msg.get("g") or "").encode()
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
            if not await self._until_started(run_id, born or b""):  # (its start is on the control stream)
                return  # the process stops: left pending, as above
        event = {"type": "signal", "name": msg["name"], "payload": msg.get("payload"), "id": msg["id"]}
        if msg.get("key") is not None:  # (a keyed wait's signal: an unkeyed one's event is as before keys)
            event["key"] = msg["key"]
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
            outcome = await self.advancer.start(run_id, ack=ack, recover=recover, trigger=trigger, chain=chain)
            self._run_started(run_id)  # (signals parked here for it: applied now, not at their run's next look)
            if outcome == Outcome.APPLIED:
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

    async def _until_started(self, run_id: str, born: bytes) -> bool:
        """Wait until run ``run_id`` (of generation ``born``, not started when it was read) has started, is gone or
        is of another generation — as the watch finds it (:meth:`_parked_watch`: one look per run, however many
        signals wait for it), or as this process starts it (:meth:`_run_started`); False when the process stops
        (the watch is over)."""
        awaited = self._awaited
        if awaited is None or self._stopping:
            return False
        entry = awaited.get(run_id)
        if entry is None:
            entry = awaited[run_id] = _Awaited(born, time.monotonic() + _PARKED_FIRST_S)
            if self._awaited_new is not None and entry.due < self._awaited_until:
                self._awaited_new.set()
        await entry.woken.wait()
        return not self._stopping

    def _run_started(self, run_id: str) -> None:
        """This process has started run ``run_id`` (or found it started, or gone): wake the signals parked for it."""
        entry = self._awaited.pop(run_id, None) if self._awaited else None
        if entry is not None:
            entry.woken.set()

    async def _parked_watch(self) -> None:
        """The background loop that looks whether the runs parked signals wait for have started: each run first
        :data:`_PARKED_FIRST_S` after its first signal parked, then twice as late at each look, then in the round at
        each whole :data:`_PARKED_EVERY_S` — the runs due looked at together, one ``HMGET`` each in one round trip —
        and wakes the signals of those that have started, are gone or are of another generation. Redis unreachable
        is waited out. When it ends (the process stops), every parked signal is woken, and returns."""
        assert self._awaited is not None and self._awaited_new is not None
        awaited, new = self._awaited, self._awaited_new
        backoff = Backoff()
        try:
            while not self._stopping:
                now = time.monotonic()
                due = [run_id for run_id, entry in awaited.items() if entry.due <= now + 0.005]
                if not due:
                    new.clear()
                    nxt = min((entry.due for entry in awaited.values()), default=math.inf)
                    self._awaited_until = nxt
                    try:
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(None if nxt == math.inf else nxt - now):
                                await new.wait()
                    finally:
                        self._awaited_until = -math.inf
                    continue
                try:
                    got = await asyncio.gather(*(self.store.call("HMGET", self.keys.run(run_id), "submitted", "v",
                                                                 "born") for run_id in due))
                except (*TRANSIENT, redis.ResponseError) as exc:
                    if isinstance(exc, redis.ResponseError) and not server_unwell(exc):
                        raise
                    if backoff.failures == 0:
                        log.debug("worker %s: looking whether runs have started failed (%s); retrying", self.name,
                                  exc)
                    await backoff.wait()
                    continue
                backoff.reset()
                now = time.monotonic()
                for run_id, (submitted, version, born) in zip(due, got, strict=True):
                    entry = awaited.get(run_id)
                    if entry is None:
                        continue  # (started here meanwhile: woken already)
                    if submitted is None or version is not None or (born or b"") != entry.born:
                        del awaited[run_id]
                        entry.woken.set()
                        continue
                    entry.looks += 1
                    later = _PARKED_FIRST_S * 2 ** entry.looks
                    entry.due = now + later if later < _PARKED_EVERY_S else \
                        (now // _PARKED_EVERY_S + 1) * _PARKED_EVERY_S
        finally:
            self._awaited = None
            for entry in awaited.values():
                entry.woken.set()

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
