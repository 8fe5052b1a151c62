"""The worker process's reading: the stream reading loops, each entry's handler, dead letters, what it holds.

Stage: runtime: redis. Imports redis (its error types), ``flowdsl.kernel`` (its version error), ``flowdsl.shown``,
this package's ``advance``, ``connection``, ``keys``, ``serving``, ``store`` and ``wire``, and stdlib.
:class:`Reading` is mixed into :class:`~flowdsl.runtime.redis.worker.RedisWorker` (whose attributes it uses):

- **reader** — ``XREADGROUP`` over the control stream, the LLM stream and the task stream of every registered
  worker, no more entries than free slots; **cancel reader** — over the cancels and signals streams, whatever the
  free slots, at most :data:`_CANCELS_PER_READ` of each handled at a time (signals parked for runs not started yet
  apart: at most :data:`_PARKED_SIGNALS` of those). Redis unreachable, refusing work for now
  or having lost its consumer groups is waited out (said once, and when it is over); an idle burst stops the
  process. Neither reads while the command connection is not answering (:meth:`Reading._command_silent`): what it
  read could be neither picked up nor renewed, and would wait a lease for another process.
- **entries** — each entry read (or reclaimed) gets its handler (:meth:`Reading._spawn`): a start or cancel request,
  or a signal, that of :mod:`.control`, a task message that of :mod:`.tasks`; an entry that cannot be read is set
  aside at once. Handlers run as tracked tasks (:meth:`Reading._track`). The entries held and their tasks are
  indexed here (:meth:`Reading._hold`: ``_held``, ``_by_task``), and :meth:`Reading._serves` says whether a
  dispatched task is run here (self-dispatch).
- **dead letters** — an entry that cannot be read, or whose handling fails unexpectedly ``max_failures`` times
  (it is handled again after each lease), is set aside in the dead-letter stream with its fields and the reason
  (:meth:`Reading._guarded`, :meth:`Reading._set_aside`); a connection Redis closes at each try to handle an
  entry counts as such a failure (:meth:`Reading._closed_on`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, cast

import redis

from flowdsl.kernel import NewerVersion
from flowdsl.runtime.codec import loads
from flowdsl.runtime.redis.advance import Contended
from flowdsl.runtime.redis.connection import TRANSIENT, Backoff, groups_lost, server_unwell
from flowdsl.runtime.redis.keys import GROUP, Keys, check_run_id
from flowdsl.runtime.redis.serving import Held, describe, refusal_of
from flowdsl.runtime.redis.store import RunTooLarge
from flowdsl.runtime.redis.wire import stream_entries
from flowdsl.shown import visible

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from flowdsl.runtime.redis.serving import WorkerOptions, WorkerStats
    from flowdsl.runtime.redis.store import Store
    from flowdsl.runtime.redis.wire import WireConnection

__all__ = ["Reading", "json_field"]

log = logging.getLogger("flowdsl.redis")

#: cancel requests handled at a time, and signals being applied (they take no slot: each is one transition)
_CANCELS_PER_READ = 64
#: signals held for runs not started yet (*parked*: each waits for its run's start, renewed meanwhile), which never
#: count against :data:`_CANCELS_PER_READ`; with as many, no more signals are read (said once in the log) until
#: fewer are held — so that runs that never start cannot make a process hold signals without bound
_PARKED_SIGNALS = 4096

#: lost connections in a row, while Redis answers other commands, after which handling an entry is a failure
_CLOSED_TRIES = 6

#: how often a reading loop looks again whether the command connection answers, while it does not
_SILENT_POLL_S = 0.1


class _ClosedOnEntry(Exception):
    """Redis closed the connection each time an entry was handled, while it answered other commands."""

    def __init__(self, tries: int, exc: BaseException):
        super().__init__(f"Redis closed the connection at each of {tries} tries to handle it ({exc}), while it "
                         "answers other commands: most likely a reply larger than its client-output-buffer-limit "
                         "for normal clients (a run's plan, input or state is read whole); set "
                         "`client-output-buffer-limit normal 0 0 0` (Redis's default) or keep runs smaller "
                         "(docs/runtime.md, \"The Redis server's settings\")")


def json_field(fields: dict[bytes, bytes], name: bytes, what: str) -> tuple[dict[str, Any] | None, str]:
    raw = fields.get(name)
    if raw is None:
        return None, f"it has no '{name.decode()}' field ({what})"
    try:
        value = loads(raw)
    except (ValueError, RecursionError) as exc:  # (too deeply nested for the stdlib decoder: RecursionError)
        return None, f"its '{name.decode()}' field is not JSON ({describe(exc)})"
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
    command, problem = json_field(fields, b"m", "a task message carries its dispatch command there")
    if command is not None and not (isinstance(command.get("task_id"), str) and command["task_id"]):
        return None, "its dispatch command names no task (a string 'task_id')"
    return command, problem


class Reading:
    """The reading loops and each entry's handling (see the module doc); a mixin of ``RedisWorker``."""

    # what the worker provides
    name: str
    keys: Keys
    options: WorkerOptions
    stats: WorkerStats
    streams: list[str]
    lease_ms: int
    client: aioredis.Redis | None
    wire: WireConnection | None
    store: Store
    _nonces: Iterator[str]
    _task_streams: frozenset[str]
    _served: dict[Any, bool]
    _held: dict[tuple[str, str], Held]
    _by_task: dict[str, Held]
    _starting: set[str]
    _cancelling: set[str]
    _signalling: set[str]
    _parked: set[str]
    _parked_said: bool
    _active: set[asyncio.Task[None]]
    _stopping: bool
    _room: asyncio.Event | None
    _control: Callable[[str, str, dict[bytes, bytes], bool, str], Coroutine[Any, Any, None]]
    _task: Callable[[Held, bool], Coroutine[Any, Any, None]]
    _regroup: Callable[[], Coroutine[Any, Any, None]]
    _idle_now: Callable[[], Coroutine[Any, Any, bool]]
    _config_error: Callable[[BaseException, str], bool]

    if TYPE_CHECKING:
        def stop(self, graceful: bool = True) -> None: ...

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
        await self._read_loop(reader, wire, self.streams, self._free_slots, "tasks and start requests")

    async def _cancels_reader(self, reader: aioredis.Redis, wire: WireConnection | None) -> None:
        """Read cancel requests and signals, whether or not a slot is free: a chain holds its slot until its run
        ends, so a cancel (or a signal) read only when a slot frees would reach a run of a busy fleet after it had
        completed (or wait for as long as the fleet is busy). At most :data:`_CANCELS_PER_READ` of each are
        handled at a time: a stream with as many is not read, and ``COUNT`` (per stream) is the smaller room of the
        streams read. Signals held for runs not started yet (parked, :meth:`Control._signal`) count apart: they
        never keep cancel requests, nor signals to runs going on, from being read; with :data:`_PARKED_SIGNALS` of
        them, the signals stream is not read (:meth:`_parked_full`)."""

        def rooms() -> list[tuple[str, int]]:
            found = []
            if len(self._cancelling) < _CANCELS_PER_READ:
                found.append((self.keys.cancels, _CANCELS_PER_READ - len(self._cancelling)))
            if len(self._signalling) < _CANCELS_PER_READ and not self._parked_full() and \
                    len(self._parked) + len(self._signalling) < _PARKED_SIGNALS:
                # (a signal read may be one to park: never more parked than the bound)
                found.append((self.keys.signals, min(_CANCELS_PER_READ - len(self._signalling),
                                                     _PARKED_SIGNALS - len(self._parked) - len(self._signalling))))
            return found

        await self._read_loop(reader, wire, lambda: [stream for stream, _ in rooms()],
                              lambda: min((room for _, room in rooms()), default=0), "cancel requests and signals")

    def _parked_full(self) -> bool:
        """Whether this process holds as many signals for runs not started yet as it keeps
        (:data:`_PARKED_SIGNALS`): it then reads no more signals — said once, and again only once it has held half
        as many or fewer since."""
        parked = len(self._parked)
        if parked >= _PARKED_SIGNALS:
            if not self._parked_said:
                self._parked_said = True
                log.warning("worker %s: it holds %d signals for runs not started yet, as many as it keeps: it reads "
                            "no more signals until fewer are held (as those runs start; runs that do not start: "
                            "`flowdsl runs --status submitted`, `flowdsl status RUN`)", self.name, parked)
            return True
        if self._parked_said and parked <= _PARKED_SIGNALS // 2:
            self._parked_said = False
        return False

    def _free_slots(self) -> int:
        return self.options.concurrency - len(self._held) - len(self._starting)

    def _command_silent(self, seconds: float, waiting: int) -> None:
        """The command connection was given up: Redis sent nothing on it for ``seconds`` while ``waiting``
        commands waited (:class:`~flowdsl.runtime.redis.wire.WireConnection`'s reply deadline)."""
        log.warning("worker %s: Redis sent nothing for %.1f s on the command connection while %d command(s) waited "
                    "for their replies: the connection was presumed dead (a network path that drops packets without "
                    "a reset, a lost NAT or firewall entry?) and closed; the commands are tried again on a new "
                    "connection, and no new work is read until Redis answers", self.name, seconds, waiting)

    def _command_answers(self, seconds: float) -> None:
        """Redis answers again on the command connection, after ``seconds`` without an answer."""
        log.info("worker %s: Redis answers again on the command connection (it had not for %.1f s); reading new "
                 "work again", self.name, seconds)

    async def _read_loop(self, reader: aioredis.Redis, wire: WireConnection | None,
                         streams: list[str] | Callable[[], list[str]], room: Callable[[], int], what: str) -> None:
        """Read new entries of ``streams`` (or of those ``streams()`` names at each read; ``what`` they hold, for
        the log; at most ``room()`` at a time; none while it is 0) and give each its handler, until stopped; Redis
        unreachable, refusing work for now, or having lost its data is waited out — said once, and when it is over.
        Nothing is read while the command connection does not answer (``wire.stalled``): an entry read then could be
        neither picked up nor renewed, and would wait a lease for another process to take it over."""
        assert self._room is not None
        backoff = Backoff()
        block = min(self.options.block_ms, 100) if self.options.burst else self.options.block_ms
        while not self._stopping:
            free = room()
            if free <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            if self.wire is not None and self.wire.stalled:
                await asyncio.sleep(_SILENT_POLL_S)
                continue
            try:
                reply = await self._read(reader, wire, free, block, streams() if callable(streams) else streams)
            except redis.ResponseError as exc:
                if groups_lost(exc):
                    await self._regroup()
                    continue
                if not server_unwell(exc):
                    raise
                if backoff.failures == 0:
                    log.warning("worker %s: reading %s refused by Redis for now (%s); retrying with backoff",
                                self.name, what, exc)
                await backoff.wait()
                continue
            except TRANSIENT as exc:
                if backoff.failures == 0:
                    log.warning("worker %s: Redis unreachable while reading %s (%s); reconnecting with backoff",
                                self.name, what, exc)
                await backoff.wait()
                continue
            if backoff.failures:
                assert backoff.failing_since is not None
                log.info("worker %s: Redis reachable again: reading %s (after %.1f s)", self.name, what,
                         time.monotonic() - backoff.failing_since)
                backoff.reset()
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
        if backoff.failures >= _CLOSED_TRIES and not refusal_of(exc):
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
                elif stream == self.keys.signals:
                    self._signalling.add(entry_id)
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
            problem = f"it could not be read: {describe(exc)}"
        if problem is not None:
            if stream == self.keys.control:  # (entry ids are per stream: another stream's may be the same)
                self._starting.discard(entry_id)
            elif stream == self.keys.cancels:
                self._cancelling.discard(entry_id)
            elif stream == self.keys.signals:
                self._signalling.discard(entry_id)
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
                            "lease", self.name, entry_id, stream, describe(exc))
                return
            log.error("worker %s: handling entry %s of %s failed", self.name, entry_id, stream, exc_info=True)
            await self._set_aside(stream, entry_id, fields, trigger,
                                  f"handling it failed: {describe(exc)}", max(1, self.options.max_failures))

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
            named, _ = json_field(fields, b"m" if b"m" in fields else b"c", "")
            run_id = named["run_id"] if named is not None else None
            log.error("worker %s: entry %s of %s%s set aside as dead letter %s: %s (`flowdsl dead-letters` lists it "
                      "and can put it back)", self.name, entry_id, stream, f" (run {run_id})" if run_id else "",
                      dead_id, visible(reason), extra={"run_id": run_id, "dead_letter": dead_id, "stream": stream,
                                                       "entry_id": entry_id})
        elif code == 0:
            log.warning("worker %s: entry %s of %s failed %d time(s) of %d; it is handled again after the lease",
                        self.name, entry_id, stream, failures, threshold)

    def _hold(self, stream: str, entry_id: str, command: dict[str, Any], raw: bytes | None,
              outbox_version: str, trigger: str | None = None, token: str = "") -> Held:
        """Hold a stream entry and the task it runs under a lease token (``token``, else a new one)."""
        if trigger is None:
            trigger = Keys.trigger(stream, entry_id)
        held = Held(stream, entry_id, command["run_id"], command["task_id"],
                     token or f"{trigger}|{self.name}|{next(self._nonces)}", command, raw, outbox_version, trigger)
        self._held[(stream, entry_id)] = held
        self._by_task[held.task_id] = held
        return held

    def _unhold(self, held: Held) -> None:
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
