"""Advancing runs: feed one input event to the kernel and write the outcome atomically, then relay it.

Stage: runtime: redis. Imports ``flowdsl.kernel``, ``flowdsl.runtime.plancheck``
(the plan version), ``flowdsl.shown`` (logged text made inert), ``.store``, ``.keys`` and stdlib. Every
decision is the kernel's; this module only turns a
:class:`~flowdsl.kernel.Decision` into one atomic write (state, journal
entry, task leases, outbox) and carries the outbox out::

    dispatch        -> a message on the worker's task stream (lease "q"), plus a
                       schedule-to-start deadline when the run has one; or, for one
                       task the calling process serves, held by it at once (a
                       :class:`Chain`: lease "r:<token>", message kept in the outbox)
    schedule_timer  -> a member of the timer set, due at the command's due_at
    cancel_timer    -> the member is removed
    cancel_task     -> the lease is marked cancelled (q -> xq, r:tok -> xr:tok) and the
                       task id is published; a task no worker has picked up yet is
                       answered task_cancelled at once (nobody else would answer it)
    finish          -> the run's keys get their retention TTL (not while the run needs a person: ended
                       needs_intervention and not resolved, or an attempt it gave up on still held);
                       the end is logged (:func:`said_end`)

The state is written whole (a snapshot) only while that is cheap: a state of
S bytes is written once every ⌈S / snapshot_bytes⌉ versions, i.e. input events
applied (every transition while it is under ``snapshot_bytes``), and always at a run's start
and end; the transitions in between are replayed from the journal when a
process loads the run (``Store.load``). While a run is a chain whose one task
in flight this process runs itself, nobody else is about to load it: its
snapshot then waits for ``CHAIN_REPLAY`` transitions. A long run (a for_each
over thousands of items) so writes O(one step's change) per transition, not
O(its state).

Within one process the events of a run are applied one at a time (a lock per
run), and those that queued up behind the lock are written by one transition
(a group commit, :meth:`Advancer.apply_event`); across processes the version check of the transition script serialises
them (a conflict re-reads the state and applies the event again). A process
keeps recently used states in memory, so a run whose steps follow one another
on the same worker costs no state read.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import Any

from orjson import dumps as _orjson

from flowdsl import kernel
from flowdsl.kernel import END_STATES, Decision, NewerVersion, apply, start_event, start_run
from flowdsl.runtime.codec import dumps
from flowdsl.runtime.plancheck import PLAN_VERSION
from flowdsl.runtime.redis.connection import TRANSIENT, Backoff
from flowdsl.runtime.redis.keys import Keys, TimerMember
from flowdsl.runtime.redis.store import (
    Clock,
    JournalEntry,
    RunRecord,
    Store,
    TaskOp,
    TransitionResult,
    cancel_reasons,
    megabytes,
)
from flowdsl.shown import visible

__all__ = ["CHAIN_REPLAY", "GROUP_COMMIT", "SCHEDULE_TO_START_TIMEOUT", "SNAPSHOT_BYTES", "SNAPSHOT_LIMIT", "Advancer",
           "Chain", "Contended", "Outcome", "said_end"]

class Contended(RuntimeError):
    """A run's event could not be applied: other processes wrote the run every time first (a storm of version
    conflicts). Nobody's fault, least of all the message's: its trigger stays pending for its next holder."""


#: the error type of an attempt no worker picked up before the run's schedule-to-start deadline
SCHEDULE_TO_START_TIMEOUT = "ScheduleToStartTimeout"
#: a state is written whole every transition while under this size, every ⌈size / this⌉ transitions above it
SNAPSHOT_BYTES = 16 * 1024
#: a state larger than this is not written whole after a run's first transition (one Redis value holds at most
#: 512 MB, one command 1 GB): loading the run replays its journal from the last snapshot instead
SNAPSHOT_LIMIT = 256 * 1024 * 1024
#: a chain (the run's one task in flight runs in the process that dispatched it) writes the state whole
#: at most once per this many transitions: the process has it cached, and a taker replays at most these
CHAIN_REPLAY = 16
#: at most this many input events queued for one run are written by one transition (a group commit)
GROUP_COMMIT = 64
#: version conflicts in a row after which an event is left to its trigger's next holder (after the lease);
#: between conflicts the process backs off (0-50 ms, jittered) so that one process hammering a run with its
#: cached state cannot starve another one's result
_MAX_CONFLICTS = 1000
log = logging.getLogger("flowdsl.redis")


class Outcome:
    """What happened to an input event: applied, rejected by a guard, or not applicable."""

    APPLIED = "applied"  # written (the kernel may still have rejected a stale result: result_rejected)
    REJECTED = "rejected"  # a guard failed (a lost lease, a task picked up meanwhile)
    SKIPPED = "skipped"  # nothing to do (a timer no longer armed, a run already started)
    MISSING = "missing"  # no such run (never started, or expired)
    INVALID = "invalid"  # the kernel refused the event (ValueError); logged


def nonces(random_bytes: int) -> Iterator[str]:
    """Strings unique to this process (a random prefix, drawn once) and to each draw (a counter after it)."""
    prefix = secrets.token_hex(random_bytes)
    return (f"{prefix}.{n:x}" for n in itertools.count())


class Chain:
    """An offer to run, in the calling process, the next task a transition dispatches (self-dispatch).

    The transition that dispatches a task ``serves(command)`` accepts takes the task's lease at once under
    ``token`` (``<trigger>|<consumer>|<nonce>``: the stream entry that triggered it stays pending, so the
    task is found again if the process dies) and keeps its message in the run's outbox instead of queueing
    it; ``command`` is then a fresh copy of that dispatch command, and the trigger is not acknowledged.
    """

    __slots__ = ("command", "serves", "token")

    def __init__(self, token: str, serves: Callable[[dict[str, Any]], bool]):
        self.token = token
        self.serves = serves
        self.command: dict[str, Any] | None = None


class Advancer:
    """Applies input events to runs through the kernel, atomically, and relays the outcome.

    ``schedule_timeout_ms`` and ``retention_ms`` are the defaults written into a
    run when it starts, if its submission set none. ``on_timer`` is called with
    a due time (ms) whenever this process arms a timer (the worker's timer loop
    wakes up for it). ``snapshot_bytes``: see the module's docstring (0: write
    the state at a run's start and end only, and replay everything between).
    ``rules``: the kernel rules version of the runs it starts (None: the newest it knows).
    ``on_refused(run_id, task_id, result type, reason, late completion event or None)`` is called when a
    result reported with a ``reporter`` is written and the kernel rejected it (``result_rejected``: its attempt
    was no longer in flight, or the run had ended).
    """

    def __init__(self, store: Store, clock: Clock, *, schedule_timeout_ms: int | None = None,
                 retention_ms: int = 7 * 24 * 3600 * 1000, cache_size: int = 4096,
                 on_timer: Callable[[int], None] | None = None, snapshot_bytes: int = SNAPSHOT_BYTES,
                 rules: int | None = None,
                 on_refused: Callable[[str, str, str, str, dict[str, Any] | None], None] | None = None):
        self.store = store
        self.keys: Keys = store.keys
        self.clock = clock
        self.schedule_timeout_ms = schedule_timeout_ms
        self.retention_ms = retention_ms
        self.cache_size = cache_size
        self.on_timer = on_timer
        self.on_refused = on_refused
        self.snapshot_bytes = snapshot_bytes
        self.snapshot_limit = SNAPSHOT_LIMIT
        self.rules = rules
        self._cache: OrderedDict[str, RunRecord] = OrderedDict()
        self._locks: dict[str, _Waiters] = {}
        # transition tokens: unique per process (random) and per transition (counter), with no system call each
        self._tokens = nonces(6)
        self.transitions = 0
        self.snapshots = 0
        self.conflicts = 0
        self.grouped = 0  # input events written by group commits (several in one transition)
        #: runs whose end this process wrote, by end state (the ``flowdsl_runs_finished_total`` metric)
        self.finished: dict[str, int] = {}
        self._queued: dict[str, list[_Queued]] = {}

    @property
    def cached_runs(self) -> int:
        """How many run states this process keeps in memory now."""
        return len(self._cache)

    # --- the one way in ---------------------------------------------------------------

    async def apply_event(self, run_id: str, event: dict[str, Any], *, guard: tuple[str, str, str] | None = None,
                          reporter: str = "", ack: list[dict[str, Any]] = (),  # type: ignore[assignment]
                          precheck: Callable[[dict[str, Any]], bool] | None = None,
                          recover: bool = False, trigger: str = "", chain: Chain | None = None) -> str:
        """Apply ``event`` (``at`` is set here) to run ``run_id`` and relay what the kernel decided.

        ``guard`` is checked atomically with the write (see ``Store.transition``;
        ``reporter``, a worker's name, has a failed ``lease`` guard journaled as a
        late result rejected); ``ack`` are the commands that acknowledge the trigger, sent after the
        relay — or at once when the event is skipped, the run is missing, or the
        kernel refuses the event; never when a guard failed because another
        holder has the task (the trigger is then theirs). ``precheck(state)``
        false skips the event. ``recover`` (the trigger was taken over from a
        process that may have died) re-reads the state and relays the run's
        outbox first, after queueing again the tasks held under ``trigger``.
        ``chain``: see :class:`Chain` (when it takes a task, ``ack`` is not
        sent). Returns an :class:`Outcome` value.

        Events that arrive for a run while another is being applied wait for the
        run's lock together, and whoever takes it next applies them all in one
        transition (a group commit, at most ``GROUP_COMMIT`` events: each its own
        journal entry and guard, one write and one relay), unless the kernel
        refuses one or a guard fails, when they are applied one at a time.
        ``recover`` and ``precheck`` events are always applied alone.
        """
        locks = self._locks
        if not recover and precheck is None and run_id not in locks:
            # the lock is free (the usual case): taken at once, with no lock object and no coroutine for it
            locks[run_id] = _NO_WAITERS
            try:
                queued = _Queued(event, guard, reporter, ack, chain)
                outcome, relay, acked = _alone(queued, *await self._write(run_id, [queued], None))
            except BaseException:
                self._cache.pop(run_id, None)  # the kernel may have changed the cached state: never trust it
                raise
            finally:
                _release(locks, run_id)
            done = _acks(ack, acked, chain)
            if done or (relay is not None and (relay[1] or relay[2])):  # (else: a chain's step)
                await self._tail(run_id, relay, (), done)
            return outcome
        if recover or precheck is not None:  # applied alone (waiting for the lock, if held)
            followups: tuple[str, ...] = ()
            async with self._lock(run_id):
                if recover:
                    self._cache.pop(run_id, None)
                    followups = await self._flush(run_id, trigger)
                try:
                    queued = _Queued(event, guard, reporter, ack, chain)
                    outcome, relay, acked = _alone(queued, *await self._write(run_id, [queued], precheck))
                except BaseException:
                    self._cache.pop(run_id, None)  # the kernel may have changed the cached state: never trust it
                    raise
            done = _acks(ack, acked, chain)
            if followups or done or (relay is not None and (relay[1] or relay[2])):  # (else: a chain's step)
                await self._tail(run_id, relay, followups, done)
            return outcome
        # the run is being advanced: queue the event; whoever takes the lock next applies all that are queued
        mine = _Queued(event, guard, reporter, ack, chain)
        self._queued.setdefault(run_id, []).append(mine)
        tails: list[_Tail] = []
        try:
            async with self._lock(run_id):
                if mine.outcome is None:
                    tails = await self._apply_queued(run_id, mine)
        except BaseException:
            if mine.outcome is None:  # cancelled while waiting, or failed: nobody is to apply it any more
                queue = self._queued.get(run_id)
                if queue is not None and mine in queue:
                    queue.remove(mine)
                    if not queue:
                        del self._queued[run_id]
            raise
        for relay, done in tails:
            if done or (relay is not None and (relay[1] or relay[2])):
                await self._tail(run_id, relay, (), done)
        assert mine.outcome is not None  # applied by this call or by the holder of the lock before it
        return mine.outcome

    async def report(self, run_id: str, event: dict[str, Any], guard: tuple[str, str, str], reporter: str,
                     ack: list[dict[str, Any]], chain: Chain) -> str:
        """:meth:`apply_event` of a worker's result under a chain offer (not ``recover``, no ``precheck``): the
        same outcome, writes and relay, in one straight line for the usual case — the run's lock free, its
        state cached, the kernel's decision a chained step's (:meth:`_commit_step`); else the general way."""
        locks = self._locks
        record = self._cache.get(run_id)
        if record is None or run_id in locks:
            return await self.apply_event(run_id, event, guard=guard, reporter=reporter, ack=ack, chain=chain)
        locks[run_id] = _NO_WAITERS
        relay: tuple[int, list[dict[str, Any]], tuple[str, ...]] | None = None
        acked = True
        try:
            self._cache.move_to_end(run_id)
            event["at"] = self.clock.now()
            try:
                decision = apply(record.plan, record.state, event)
            except NewerVersion:
                raise
            except Exception as exc:  # (as _write)
                self._cache.pop(run_id, None)
                log.error("run %s: the kernel refused %s: %s: %s", run_id, event.get("type"), type(exc).__name__,
                          exc)
                outcome = Outcome.INVALID
            else:
                done = await self._commit_step(record, event, decision, guard, reporter, chain)
                result, ops = done if done is not None else \
                    await self._commit(record, [(event, decision, guard, reporter, chain)])
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("run %s: %s %s -> %s v%s", run_id, event["type"], event.get("task_id"), result.code,
                              result.version)
                if result.code == 1 or result.code == 4:
                    outcome, relay = Outcome.APPLIED, (result.version, ops, result.cancelled_queued)
                else:
                    self._cache.pop(run_id, None)
                    queued = _Queued(event, guard, reporter, ack, chain)
                    if result.code == 2:  # a version conflict: loaded again and re-applied, as _write goes on
                        outcome, relay, acked = _alone(queued, *await self._write(run_id, [queued], None, True))
                    else:
                        outcome, relay, acked = _alone(queued, Outcome.REJECTED, result, [])
        except BaseException:
            self._cache.pop(run_id, None)  # the kernel may have changed the cached state: never trust it
            raise
        finally:
            _release(locks, run_id)
        if acked and chain.command is None and ack:  # (else, with nothing to relay: a chain's step)
            await self._tail(run_id, relay, (), list(ack))
        elif relay is not None and (relay[1] or relay[2]):
            await self._tail(run_id, relay, (), [])
        return outcome

    async def start(self, run_id: str, *, ack: list[dict[str, Any]] = (),  # type: ignore[assignment]
                    recover: bool = False, trigger: str = "", chain: Chain | None = None) -> str:
        """Start a submitted run (the kernel's ``start_run``); a run already started is left alone.
        ``recover``, ``trigger`` and ``chain`` as for :meth:`apply_event`.

        A run cancelled before it started (cancel requests held in its ``cancel`` field) is started and
        cancelled by one transition: ``start``, each ``cancel_requested`` once, and ``task_cancelled`` for
        the attempts the start dispatched (no worker ever saw them: their messages are never sent), so it
        ends ``cancelled`` having run nothing."""
        followups: tuple[str, ...] = ()
        relay = None
        late = False  # a cancel request may have been held after the submission was read: apply it now
        if run_id in self._locks:
            await self._lock(run_id).__aenter__()
        else:
            self._locks[run_id] = _NO_WAITERS  # free (the usual case): taken at once, with no coroutine for it
        try:
            if recover:
                followups = await self._flush(run_id, trigger)
            sub = await self.store.submission(run_id)
            if sub is None or sub["started"]:
                outcome = Outcome.MISSING if sub is None else Outcome.SKIPPED
                late = sub is not None
            else:
                version = sub["plan"].get("plan_version")
                if type(version) is int and version > PLAN_VERSION:
                    raise NewerVersion(f"run {run_id!r} was submitted with a plan of plan_version {version}, newer "
                                       f"than this flowdsl reads ({PLAN_VERSION}): a newer flowdsl submitted it "
                                       "(upgrade this one)")
                at = self.clock.now()
                decision = start_run(sub["plan"], run_id, sub["input"], at=at, seed=sub["seed"],
                                     kernel=self.rules if self.rules is not None else kernel.STATE_VERSION)
                start = start_event(run_id, sub["input"], at=at, seed=decision.state["seed"])
                sts = sub["sts"] if sub["sts"] is not None else self.schedule_timeout_ms
                record = RunRecord(run_id, decision.state, 0, sub["plan"], sts, born=sub["born"])
                meta: list[tuple[str, Any]] = [("started", at), ("k", decision.state["kernel"])]  # (see PICKUP)
                if sub["ret"] is None:
                    meta.append(("ret", self.retention_ms))
                if sts is not None and sub["sts"] is None:
                    meta.append(("sts", sts))
                held = sub["cancel"]
                steps: list[_Applied] = [(start, decision, None, "", None if held else chain)]
                if held:
                    chain = None  # cancelled before it started: nothing to run here
                    steps += _cancelled_at_start(sub["plan"], decision.state, held, at)
                    meta.append(("cc", len(held)))
                result, ops = await self._commit(record, steps, meta=meta)
                outcome = Outcome.APPLIED if result.applied else Outcome.SKIPPED
                if result.applied:
                    relay = (result.version, ops, result.cancelled_queued)
                    late = len(result.held_cancels) > len(held) or result.code == 4  # (4: not said: look)
        finally:
            _release(self._locks, run_id)
        acks = [] if chain is not None and chain.command else list(ack)
        if not late:
            if acks or followups or (relay is not None and (relay[1] or relay[2])):  # (else: a chain's start)
                await self._tail(run_id, relay, followups, acks)
            return outcome
        # the start request is acknowledged only once the late cancel is written: a process that dies
        # before leaves it pending, and whoever takes it over finds the cancel still to apply
        await self._tail(run_id, relay, followups, [])
        await self._held_cancels(run_id)
        await self.relay(None, None, acks)
        return outcome

    async def _held_cancels(self, run_id: str) -> None:
        """Apply the cancel requests held for a started run's start that its start did not apply (one was
        held while the start was being computed); ``cc`` in the run's hash counts those applied."""
        for _ in range(_MAX_CONFLICTS):
            async with self._lock(run_id):
                version, applied, raw = await self.store.call("HMGET", self.keys.run(run_id), "v", "cc", "cancel")
                held = cancel_reasons(raw)
                done = int(applied or 0)
                if version is None or len(held) <= done:
                    return
                self._cache.pop(run_id, None)
                record = await self._record(run_id)
                if record is None or record.state["status"] in END_STATES:
                    return  # over already: nothing left to cancel
                if record.version != int(version):
                    continue  # written meanwhile: read again
                steps: list[_Applied] = []
                for reason in held[done:]:
                    event = {"type": "cancel_requested", "reason": reason, "at": self.clock.now()}
                    steps.append((event, apply(record.plan, record.state, event), None, "", None))
                result, ops = await self._commit(record, steps, meta=[("cc", len(held))])
                if not result.applied:
                    self._cache.pop(run_id, None)
                    continue
                relay = (result.version, ops, result.cancelled_queued)
            await self._tail(run_id, relay, (), [])
            return

    async def recover(self, run_id: str, trigger: str = "") -> None:
        """Relay what a process that died left in the run's outbox (before taking over its trigger ``trigger``:
        the tasks it held under it are queued again first)."""
        async with self._lock(run_id):
            self._cache.pop(run_id, None)
            followups = await self._flush(run_id, trigger)
        await self._tail(run_id, None, followups, [])

    async def fire(self, member: TimerMember, *, recover: bool = False) -> str:
        """Fire one claimed timer: a kernel timer (``timer_fired``) or a schedule-to-start deadline."""
        done = [self.store.timer_done_op(member.encode())]
        if member.kind == "t":
            timer_id = member.ident
            outcome = await self.apply_event(member.run_id, {"type": "timer_fired", "timer_id": timer_id}, ack=done,
                                             precheck=lambda state: timer_id in state["timers"], recover=recover)
            log.debug("timer %s fired: %s", member.encode(), outcome)
            return outcome
        record = await self._record(member.run_id)
        worker = _worker_of(record, member.ident) if record is not None else None
        if worker == "":
            needed = "LLM steps (`flowdsl worker --lm MODEL`)"
        else:
            needed = f"worker '{worker}'" if worker else "this attempt's worker"
        error = {"type": SCHEDULE_TO_START_TIMEOUT,
                 "message": f"no worker process picked up the attempt before the run's schedule-to-start deadline: "
                            f"is a process serving {needed} running?"}
        outcome = await self.apply_event(member.run_id, {"type": "task_failed", "task_id": member.ident,
                                                         "error": error},
                                         guard=(member.ident, "eq", "q"), ack=done, recover=recover)
        if outcome == Outcome.REJECTED:
            await self.relay(None, None, done)  # picked up in time: the deadline is moot
        return outcome

    # --- internals ---------------------------------------------------------------------------------

    async def _record(self, run_id: str) -> RunRecord | None:
        record = self._cache.get(run_id)
        if record is not None:
            self._cache.move_to_end(run_id)
            return record
        record = await self.store.load(run_id)
        if record is not None:
            self._remember(record)
        return record

    def _remember(self, record: RunRecord) -> None:
        self._cache[record.run_id] = record
        self._cache.move_to_end(record.run_id)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def _commit(self, record: RunRecord, steps: list[_Applied], meta: list[tuple[str, Any]] | None = None
                      ) -> tuple[TransitionResult, list[dict[str, Any]]]:
        """Write the decisions of ``steps`` (input events applied in order to ``record.state``) as one
        transition: their journal entries, guards and task changes, one outbox entry, one state."""
        run_id = record.run_id
        version = record.version + len(steps)  # the version the transition writes (its outbox entry's)
        ops: list[dict[str, Any]] = []
        task_ops: list[TaskOp] = []
        entries: list[JournalEntry] = []
        held: list[tuple[Chain, dict[str, Any]]] = []  # the chain offers that took a task, and the task
        finished = over = False  # the transition ends the run; the run's state is an end state
        for event, decision, guard, reporter, chain in steps:
            at = event["at"]
            held_command: dict[str, Any] | None = None
            for command in decision.commands:
                op = command["op"]
                if op == "dispatch" and held_command is None and chain is not None and chain.serves(command):
                    held_command = command
                    try:
                        kept_message = _orjson(command)
                    except TypeError:
                        kept_message = dumps(command)
                    task_ops.append(("c", command["task_id"], "r:" + chain.token, kept_message))
                elif op == "dispatch":
                    task_ops.append(("s", command["task_id"], "q"))
                    ops.append({"o": "task", "q": self.keys.queue_of(command), "m": command, "v": version,
                                "g": record.born})
                    if record.sts_ms:
                        ops.append({"o": "timer", "k": Keys.start_deadline(run_id, command["task_id"]),
                                    "d": at + record.sts_ms})
                elif op == "schedule_timer":
                    ops.append({"o": "timer", "k": Keys.kernel_timer(run_id, command["timer_id"]),
                                "d": command["due_at"]})
                    if command.get("purpose") == "attempt_timeout":  # (its timer is '<task id>@timeout')
                        # the attempt's deadline beside its lease, on the run's slot: PICKUP starts no attempt
                        # whose timeout has passed (the timer set is another slot; a claimed timer leaves it)
                        task_ops.append(("t", command["timer_id"].removesuffix("@timeout"), str(command["due_at"])))
                elif op == "cancel_timer":
                    ops.append({"o": "untimer", "k": Keys.kernel_timer(run_id, command["timer_id"])})
                elif op == "cancel_task":
                    ops.append({"o": "cancel", "t": command["task_id"]})
                    task_ops.append(("x", command["task_id"], ""))
            answered = guard[0] if guard is not None else None
            for task_id in decision.ended:  # (with the dispatches above: every change to the tasks in flight)
                # an attempt given up on (it timed out) that a worker runs keeps its lease, marked cancelled,
                # until that worker answers: following the run knows it may still complete (RedisClient.follow)
                task_ops.append(("d" if task_id == answered else "g", task_id, ""))
                if record.sts_ms:
                    ops.append({"o": "untimer", "k": Keys.start_deadline(run_id, task_id)})
            if answered is not None and answered not in decision.ended and answered not in decision.state["tasks"]:
                task_ops.append(("d", answered, ""))  # the late answer of an attempt given up on: its lease goes
            if decision.finished:
                over = True
                if _ends(decision):  # (not a late answer to a run that had ended, which changes nothing)
                    finished = True
                    meta = [*(meta or ()), ("finished", at)]
            if held_command is not None:
                held.append((chain, held_command))  # type: ignore[arg-type]
            try:  # (orjson itself: the codec's wrapper is a call more per encoding, and says the same)
                entries.append((_orjson(event), _orjson(decision.events), guard, reporter))
            except TypeError:  # what orjson refuses: the codec encodes it
                entries.append((dumps(event), dumps(decision.events), guard, reporter))
        if len(steps) > 1:
            ops, task_ops = _unsent(run_id, ops, task_ops)
        state = record.state
        kept = bool(held) and len(state["tasks"]) == 1  # a chain: the run's one task in flight runs here
        snapshot = over or record.version == 0 or self._snapshot_due(record, kept, len(steps))
        state_raw = self._snapshot(record, state) if snapshot else b""
        snapshot = bool(state_raw)
        token = next(self._tokens)
        outbox = dumps(ops) if ops else None
        backoff: Backoff | None = None
        while True:  # the same payload (and token) until Redis answers: an unknown outcome is never applied twice
            try:
                result = await self.store.transition(
                    run_id, expected=record.version, state=state_raw, token=token, status=state["status"],
                    entries=entries, outbox=outbox, finished=finished, task_ops=task_ops, meta=meta or (),
                    born=record.born, record=record)
                break
            except TRANSIENT as exc:
                log.warning("run %s: Redis unreachable while writing a transition (%s); retrying", run_id, exc)
                backoff = backoff or Backoff()
                await backoff.wait()
        if result.code == 4:  # written by an earlier try whose reply was lost: what it said is lost with it
            # the tasks this transition cancelled may have been queued (answered by _tail: harmless if not)
            result = result._replace(cancelled_queued=tuple(op[1] for op in task_ops if op[0] == "x"))
        if result.code == 1 or result.code == 4:  # (result.applied)
            self.transitions += 1
            if snapshot:
                self.snapshots += 1
                record.snapshot_size, record.since = len(state_raw), 0
            else:
                record.since += len(steps)
            for chain, command in held:
                # the kernel's own command (read-only: it shares data with the cached state; the worker gets
                # a copy of its input from execute)
                chain.command = command
            if self.on_refused is not None:
                for event, decision, guard, reporter, _ in steps:
                    if reporter and guard is not None and guard[0] not in decision.ended:  # (ended: taken)
                        _said_refused(self.on_refused, run_id, guard[0], event, decision)
            stale = result.version != record.version + len(steps)  # others wrote after it (a code 4)
            record.version = result.version
            if over or stale:
                self._cache.pop(run_id, None)  # (stale: the cached state is behind what Redis holds)
            else:
                self._remember(record)
            if finished:
                self._ended(run_id, record.plan, state)
        return result, ops

    async def _commit_step(self, record: RunRecord, event: dict[str, Any], decision: Decision,
                           guard: tuple[str, str, str], reporter: str, chain: Chain
                           ) -> tuple[TransitionResult, list[dict[str, Any]]] | None:
        """:meth:`_commit` of one result whose decision is a chained step's — it ended the answered task and
        nothing else, and dispatched one task ``chain`` takes, or nothing (perhaps ending the run); no
        schedule-to-start deadline — in
        one straight line (:meth:`Store.step`): the same transition. None, having done nothing, otherwise."""
        ended = decision.ended
        commands = decision.commands
        if record.sts_ms or len(ended) != 1 or ended[0] != guard[0] or len(commands) > 1:
            return None
        command = commands[0] if commands else None
        if command is not None and command["op"] == "finish":
            command = None  # (nothing to write for it but the run's end, which its state says)
        elif command is not None and (command["op"] != "dispatch" or not chain.serves(command)):
            return None
        state = record.state
        over = state["status"] in END_STATES
        finished = over and _ends(decision)  # (as _commit)
        try:  # (orjson itself, as _commit)
            entry = (_orjson(event), _orjson(decision.events), guard, reporter)
        except TypeError:
            entry = (dumps(event), dumps(decision.events), guard, reporter)
        held: tuple[str, str, bytes] | None = None
        if command is not None:
            try:
                held = (command["task_id"], "r:" + chain.token, _orjson(command))
            except TypeError:
                held = (command["task_id"], "r:" + chain.token, dumps(command))
        snapshot = over or record.version == 0 or \
            self._snapshot_due(record, command is not None and len(state["tasks"]) == 1)
        state_raw = self._snapshot(record, state) if snapshot else b""
        snapshot = bool(state_raw)
        token = next(self._tokens)
        backoff: Backoff | None = None
        while True:  # (as _commit: the same payload and token until Redis answers)
            try:
                result = await self.store.step(record, token, state["status"], event["at"] if finished else None,
                                               state_raw, entry, held)
                break
            except TRANSIENT as exc:
                log.warning("run %s: Redis unreachable while writing a transition (%s); retrying", record.run_id,
                            exc)
                backoff = backoff or Backoff()
                await backoff.wait()
        if result.code == 1 or result.code == 4:  # (the bookkeeping of _commit, for one input event)
            self.transitions += 1
            if snapshot:
                self.snapshots += 1
                record.snapshot_size, record.since = len(state_raw), 0
            else:
                record.since += 1
            chain.command = command
            stale = result.version != record.version + 1
            record.version = result.version
            if over or stale:
                self._cache.pop(record.run_id, None)
            else:
                self._remember(record)
            if finished:
                self._ended(record.run_id, record.plan, state)
        return result, []

    def _ended(self, run_id: str, plan: dict[str, Any], state: dict[str, Any]) -> None:
        """This process wrote the transition that ended the run: counted, and logged (:func:`said_end`; a
        completed run costs the level check alone, at INFO)."""
        status = state["status"]
        self.finished[status] = self.finished.get(status, 0) + 1
        if status != "completed" or log.isEnabledFor(logging.DEBUG):
            said_end(run_id, plan, state)

    def _snapshot(self, record: RunRecord, state: dict[str, Any]) -> bytes:
        """The state to write whole — or nothing, past a run's first transition, when it is larger than
        ``snapshot_limit``: the run is then loaded from its last snapshot and the journal after it, and the next
        try waits as long as a snapshot of that size would (:meth:`_snapshot_due`)."""
        raw = dumps(state)
        if len(raw) <= self.snapshot_limit or not record.version:
            return raw
        if record.snapshot_size <= self.snapshot_limit:  # (said once per run and process)
            log.warning("run %s: its state is %s, more than is written whole (%s): it is loaded from its last "
                        "snapshot and the journal after it (docs/runtime.md, Sizing)", record.run_id,
                        megabytes(len(raw)), megabytes(self.snapshot_limit))
        record.snapshot_size, record.since = len(raw), 0  # (counted from now: not one try per transition)
        return b""

    def _snapshot_due(self, record: RunRecord, kept: bool, events: int = 1) -> bool:
        """Whether a transition of ``events`` input events (neither a run's first nor its last) writes the
        state whole.

        ``kept``: the run's only task in flight is the one this process runs itself (a chain), so nobody
        else is about to load the run; its snapshot can wait until ``CHAIN_REPLAY`` transitions wait to be
        replayed (a process that takes the chain over after a crash replays them). Otherwise a state of S
        bytes is written every ⌈S / snapshot_bytes⌉ versions (input events), so that a load replays at most
        those, whatever the transitions that wrote them.
        """
        every = self.snapshot_bytes
        if every <= 0:
            return False
        since = record.since + events
        return since * every >= record.snapshot_size and (not kept or since >= CHAIN_REPLAY)

    async def _apply_queued(self, run_id: str, mine: _Queued) -> list[_Tail]:
        """Under the run's lock: apply ``mine`` and the events queued with it (at most ``GROUP_COMMIT``), in
        one transition when they can be (else one at a time); give each its outcome, return what to relay."""
        # the lock passes in the order the events were queued, so its holder's own event comes first
        queue = self._queued.pop(run_id)
        batch, rest = queue[:GROUP_COMMIT], queue[GROUP_COMMIT:]
        if rest:
            self._queued[run_id] = rest
        try:
            if len(batch) > 1:
                together = await self._apply_many(run_id, batch)
                if together is not None:
                    return [together]
            tails: list[_Tail] = []
            for queued in batch:  # one at a time (also what a refused group commit falls back to)
                outcome, relay, acked = _alone(queued, *await self._write(run_id, [queued], None))
                queued.outcome = outcome
                tails.append((relay, _acks(queued.ack, acked, queued.chain)))
            return tails
        except BaseException:
            self._cache.pop(run_id, None)  # the kernel may have changed the cached state: never trust it
            # the events not applied go back to the queue for the next holder of the lock
            left = [queued for queued in batch if queued.outcome is None and queued is not mine]
            if left:
                self._queued[run_id] = left + self._queued.get(run_id, [])
            raise

    async def _apply_many(self, run_id: str, batch: list[_Queued]) -> _Tail | None:
        """A group commit: the queued events applied in order, written as one transition. None (nothing
        written, no outcome given) when that cannot be: the kernel refused one of them, or a guard failed."""
        outcome, result, ops = await self._write(run_id, batch, None)
        if outcome != Outcome.APPLIED:
            return None  # one at a time: each then gets the outcome (and the log line) it would have alone
        assert result is not None
        self.grouped += len(batch)
        for queued in batch:
            queued.outcome = Outcome.APPLIED
        return (result.version, ops, result.cancelled_queued), \
            [op for queued in batch for op in _acks(queued.ack, True, queued.chain)]

    async def _write(self, run_id: str, batch: list[_Queued], precheck: Callable[[dict[str, Any]], bool] | None,
                     conflicted: bool = False) -> tuple[str, TransitionResult | None, list[dict[str, Any]]]:
        """Under the run's lock: apply ``batch``'s events in order to the run's state and write them as one
        transition, loading the run again and re-applying them after a version conflict (another process
        wrote meanwhile). Returns (outcome, the script's answer or None, the outbox ops): APPLIED (written);
        REJECTED (nothing written: a guard failed or the run is gone, the answer says which); MISSING (no
        such run); SKIPPED (``precheck(state)`` false); INVALID (the kernel refused an event: logged when
        it is the only one). ``conflicted``: a first try (:meth:`report`'s) met a version conflict: go on
        from there."""
        backoff: Backoff | None = None
        fresh = False  # the record was read from Redis by this call (not a cached state)
        if conflicted:
            self.conflicts += 1
            backoff = Backoff(base=0.001, cap=0.05, floor=0.0)
            await backoff.wait()
        for _ in range(_MAX_CONFLICTS - conflicted):
            record = self._cache.get(run_id) if not fresh else None  # (usually cached: no coroutine, see _record)
            if record is not None:
                self._cache.move_to_end(run_id)
            else:
                self._cache.pop(run_id, None)
                record = await self._record(run_id)
                fresh = True
            if record is None:
                return Outcome.MISSING, None, []
            if precheck is not None and not precheck(record.state):
                if not fresh:  # a cached state may be behind another process's writes: read it once
                    fresh = True
                    continue
                return Outcome.SKIPPED, None, []
            steps: list[_Applied] = []
            try:
                for queued in batch:
                    event = queued.event
                    event["at"] = self.clock.now()
                    steps.append((event, apply(record.plan, record.state, event), queued.guard, queued.reporter,
                                  queued.chain))
            except NewerVersion:  # not the event's fault: the run is a newer process's to advance (nothing changed)
                raise
            except Exception as exc:  # a malformed event (ValueError) or a kernel bug: never crash the worker
                self._cache.pop(run_id, None)  # the kernel may have changed the cached state: never trust it
                if len(batch) == 1:
                    log.error("run %s: the kernel refused %s: %s: %s", run_id, batch[0].event.get("type"),
                              type(exc).__name__, exc)
                return Outcome.INVALID, None, []
            result, ops = await self._commit(record, steps)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("run %s: %s -> %s v%s", run_id, ", ".join(
                    f"{q.event['type']} {q.event.get('task_id') or q.event.get('timer_id')}" for q in batch),
                    result.code, result.version)
            if result.code == 1 or result.code == 4:  # (result.applied)
                return Outcome.APPLIED, result, ops
            self._cache.pop(run_id, None)
            if result.code != 2:
                return Outcome.REJECTED, result, []
            self.conflicts += 1  # another process wrote meanwhile: let it go on, then load the run and re-apply
            backoff = backoff or Backoff(base=0.001, cap=0.05, floor=0.0)
            await backoff.wait()
        raise Contended(f"run {run_id}: gave up after {_MAX_CONFLICTS} version conflicts in a row")

    async def _flush(self, run_id: str, trigger: str = "") -> tuple[str, ...]:
        """Relay every outbox entry of the run a dead process may have left behind (after queueing again
        the tasks it held under ``trigger``); return the task ids whose cancellation may still need
        answering. Duplicate task messages are harmless: a message whose task is no longer ``q`` is dropped
        at pickup."""
        cancelled: list[str] = []
        for version, ops in await self.store.outbox(run_id, trigger):
            log.debug("run %s: relaying outbox entry %s left behind: %s", run_id, version, ops)
            await self.relay(run_id, version, ops)
            self._timers_armed(ops)
            cancelled.extend(op["t"] for op in ops if op["o"] == "cancel")
        return tuple(cancelled)

    async def _tail(self, run_id: str, relay: tuple[int, list[dict[str, Any]], tuple[str, ...]] | None,
                    followups: tuple[str, ...], ack: list[dict[str, Any]]) -> None:
        """Relay a transition, answer cancellations nobody else will answer, then acknowledge the trigger.

        With cancellations to answer, the outbox entry is dropped only once they are written: a process that
        dies between the two leaves the entry, and whoever takes its trigger over relays it again and answers
        them (``_flush``) — dropped first, they would be nobody's."""
        kept: int | None = None  # an outbox entry relayed, to drop after the follow-ups
        if relay is not None:
            version, ops, cancelled = relay
            followups = cancelled + followups
            self._timers_armed(ops)
            outbox = version if ops else None  # the transition wrote an outbox entry only if it had ops
            if not followups:
                await self.relay(run_id, outbox, ops + ack)  # the usual case: one script, trigger included
                return
            await self.relay(None, None, ops)
            kept = outbox
        for task_id in dict.fromkeys(followups):
            await self.apply_event(run_id, {"type": "task_cancelled", "task_id": task_id},
                                   guard=(task_id, "eq", "xq"))
        await self.relay(run_id if kept is not None else None, kept, ack)

    def _timers_armed(self, ops: list[dict[str, Any]]) -> None:
        if self.on_timer is not None:
            for op in ops:
                if op["o"] == "timer":
                    self.on_timer(op["d"])

    async def relay(self, run_id: str | None, version: int | None, ops: list[dict[str, Any]]) -> None:
        """Carry out relay operations (outbox commands, acknowledgements), retrying with backoff while Redis
        is unreachable (each is idempotent, or harmless when repeated)."""
        if not ops and version is None:
            return
        backoff: Backoff | None = None
        while True:
            try:
                await self.store.relay(run_id, version, ops)
                return
            except TRANSIENT as exc:
                if backoff is None:
                    backoff = Backoff()
                    log.warning("Redis unreachable while relaying (%s); retrying", exc)
                await backoff.wait()

    def _lock(self, run_id: str) -> _RunLock:
        return _RunLock(self._locks, run_id)


#: at most this many characters of an error message, and this many steps left to undo, are logged at a run's end
_LOGGED_MESSAGE = 300
_LOGGED_STEPS = 10


def said_end(run_id: str, plan: dict[str, Any], state: dict[str, Any]) -> None:
    """Log a run's end, as the transition that ended it was written: WARNING for ``needs_intervention`` (the steps
    left to undo by hand, in order, each with its undo worker), INFO for ``failed``, ``compensated`` and
    ``cancelled`` (the error's type and message), DEBUG for ``completed``. Every record carries ``run_id``,
    ``flow`` and ``status`` as attributes (``extra``), and ``error_type`` or ``left_to_undo`` (the steps' keys)
    where it says them; text that is not flowdsl's own (an error message, names) is bounded and made inert
    (:func:`flowdsl.shown.visible`)."""
    status = str(state.get("status"))
    flow = visible(str((plan.get("flow") or {}).get("name") or "?"))
    extra: dict[str, Any] = {"run_id": run_id, "flow": flow, "status": status}
    if status == "needs_intervention":
        items = [item for item in (state.get("intervention") or {}).get("steps") or () if isinstance(item, dict)]
        extra["left_to_undo"] = [str(item.get("step")) for item in items]
        shown = [visible(f"{item.get('step')} (undo worker {item.get('worker')})") for item in items[:_LOGGED_STEPS]]
        if len(items) > _LOGGED_STEPS:
            shown.append(f"and {len(items) - _LOGGED_STEPS} more")
        log.warning("run %s (flow %s) ended needs_intervention: left to undo by hand, in this order: %s; "
                    "`flowdsl status %s` says how, `flowdsl resolve %s --backend redis` once done", run_id, flow,
                    ", ".join(shown) or "nothing listed", run_id, run_id, extra=extra)
    elif status == "completed":
        log.debug("run %s (flow %s) completed", run_id, flow, extra=extra)
    else:
        raw = state.get("error")
        error: dict[str, Any] = raw if isinstance(raw, dict) else {}
        kind = visible(str(error.get("type") or "?"))
        message = str(error.get("message") or "")
        if len(message) > _LOGGED_MESSAGE:
            message = message[:_LOGGED_MESSAGE - 1] + "…"
        extra["error_type"] = kind
        failed = f" at step {visible(state['failed_step'])}" if state.get("failed_step") else ""
        log.info("run %s (flow %s) ended %s%s: %s: %s", run_id, flow, status, failed, kind, visible(message),
                 extra=extra)


def _said_refused(on_refused: Callable[[str, str, str, str, dict[str, Any] | None], None], run_id: str,
                  task_id: str, event: dict[str, Any], decision: Decision) -> None:
    """Call ``on_refused`` when ``decision`` rejected ``event``, the result of ``task_id`` (``result_rejected``),
    with the late completion it made of it, if any."""
    rejected = late = None
    for emitted in decision.events:
        if emitted.get("task_id") == task_id:
            if emitted.get("type") == "result_rejected":
                rejected = emitted
            elif emitted.get("type") == "late_completion":
                late = emitted
    if rejected is not None:
        on_refused(run_id, task_id, str(event.get("type")), str(rejected.get("reason")), late)


def _ends(decision: Decision) -> bool:
    """Whether ``decision`` (whose state is an end state) ends the run: it says so (``run_finished``) — the run's
    end, or a late completion that turns a run that had ended ``needs_intervention`` (again). A late answer that
    changes nothing for a run that had ended does not: its transition leaves the run's ``finished`` time, its
    retention (a resolution among it) and its end's log line as they were."""
    return any(event.get("type") == "run_finished" for event in decision.events)


def _worker_of(record: RunRecord, task_id: str) -> str | None:
    """The worker the attempt ``task_id`` of the run is dispatched to ('' for an LLM step's own attempt, None when
    the run no longer has that attempt in flight)."""
    task = record.state["tasks"].get(task_id)
    rec = record.state["nodes"].get(task["step"]) if task is not None else None
    node = record.plan["nodes"].get(rec["node"]) if rec is not None else None
    if node is None:
        return None
    kind = task["kind"]
    if kind == "fallback":
        return str(node["fallback"])
    if kind == "compensate":
        return str(node["compensate"]["worker"])
    return "" if kind == "llm" else str(node.get("worker") or "")


def _cancelled_at_start(plan: dict[str, Any], state: dict[str, Any], reasons: tuple[str, ...], at: int
                        ) -> list[_Applied]:
    """The input events that cancel a run its start has just begun (``state``), applied to it: each held
    cancel request once, then ``task_cancelled`` for every attempt the kernel asks to cancel — the start
    dispatched them in the same transition, so no worker has them (:func:`_unsent` drops their messages)."""
    steps: list[_Applied] = []
    events: list[dict[str, Any]] = [{"type": "cancel_requested", "reason": r, "at": at} for r in reasons]
    while events:
        event = events.pop(0)
        decision = apply(plan, state, event)
        steps.append((event, decision, None, "", None))
        events += [{"type": "task_cancelled", "task_id": c["task_id"], "at": at}
                   for c in decision.commands if c["op"] == "cancel_task"]
    return steps


def _unsent(run_id: str, ops: list[dict[str, Any]], task_ops: list[TaskOp]
            ) -> tuple[list[dict[str, Any]], list[TaskOp]]:
    """Drop what one transition both did and undid: the attempts it dispatched and ended (a run cancelled
    by the transition that starts it), with their messages and deadlines, and the timers it set and cleared."""
    dispatched = {op[1] for op in task_ops if op[0] in ("s", "c")}
    gone = dispatched & {op[1] for op in task_ops if op[0] in ("d", "g")}
    deadlines = {Keys.start_deadline(run_id, task_id) for task_id in gone}
    dropped: set[int] = set()  # positions in ops
    armed: dict[str, int] = {}  # timer key -> position of the op of this transition that set it
    for i, op in enumerate(ops):
        kind = op["o"]
        if (kind == "task" and op["m"]["task_id"] in gone) or (kind == "cancel" and op["t"] in gone) or \
                (kind in ("timer", "untimer") and op["k"] in deadlines):
            dropped.add(i)
        elif kind == "timer":
            armed[op["k"]] = i
        elif kind == "untimer" and op["k"] in armed:  # set, then cleared, by this transition: moot
            dropped.update((armed.pop(op["k"]), i))
    if not dropped and not gone:
        return ops, task_ops
    return [op for i, op in enumerate(ops) if i not in dropped], [op for op in task_ops if op[1] not in gone]


#: an input event applied: (event, the kernel's decision, guard, reporter, chain offer)
_Applied = tuple[dict[str, Any], Decision, "tuple[str, str, str] | None", str, "Chain | None"]
#: what to relay after a transition: ((version, outbox ops, tasks cancelled while queued) or None, acks)
_Tail = tuple["tuple[int, list[dict[str, Any]], tuple[str, ...]] | None", list[dict[str, Any]]]


def _alone(queued: _Queued, outcome: str, result: TransitionResult | None, ops: list[dict[str, Any]]
           ) -> tuple[str, tuple[int, list[dict[str, Any]], tuple[str, ...]] | None, bool]:
    """What :meth:`Advancer._write` of one event means for it: (outcome, (version, ops, cancelled-while-queued)
    to relay or None, whether to acknowledge its trigger)."""
    if result is None:
        return outcome, None, True
    if outcome == Outcome.APPLIED:
        return outcome, (result.version, ops, result.cancelled_queued), True
    if result.code == 3:
        # no longer in flight (nothing left to answer): acknowledge; held by another: theirs to finish
        guard = queued.guard
        return Outcome.REJECTED, None, result.lease == "" and guard is not None and guard[1] != "lease"
    return Outcome.MISSING, None, True


class _Queued:
    """An input event waiting for its run's lock (see :meth:`Advancer.apply_event`), and its outcome."""

    __slots__ = ("ack", "chain", "event", "guard", "outcome", "reporter")

    def __init__(self, event: dict[str, Any], guard: tuple[str, str, str] | None, reporter: str,
                 ack: list[dict[str, Any]], chain: Chain | None):
        self.event = event
        self.guard = guard
        self.reporter = reporter
        self.ack = ack
        self.chain = chain
        self.outcome: str | None = None


def _acks(ack: list[dict[str, Any]], acked: bool, chain: Chain | None) -> list[dict[str, Any]]:
    """The trigger's acknowledgement, unless it is not to be sent (a guard failed for another holder) or the
    transition handed the caller a task under it (a chain)."""
    return list(ack) if acked and (chain is None or chain.command is None) else []


#: the waiters for a run's lock, in order — or :data:`_NO_WAITERS`
_Waiters = deque[asyncio.Future[None]] | tuple[()]
#: a run's lock held with nobody waiting (the usual case): no queue is made until someone waits
_NO_WAITERS: tuple[()] = ()


class _RunLock:
    """A per-run lock that exists only while held: uncontended (the usual case) it costs a dict entry and no
    future; waiters queue in FIFO order and are handed the lock directly."""

    __slots__ = ("run_id", "table")

    def __init__(self, table: dict[str, _Waiters], run_id: str):
        self.table = table
        self.run_id = run_id

    async def __aenter__(self) -> None:
        waiters = self.table.get(self.run_id)
        if waiters is None:
            self.table[self.run_id] = _NO_WAITERS
            return
        if not isinstance(waiters, deque):  # (held, and the first to wait: the queue is made now)
            waiters = self.table[self.run_id] = deque()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed the lock as we were cancelled: pass it on
            elif waiter in waiters:  # (a release may have dropped it already)
                waiters.remove(waiter)
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        _release(self.table, self.run_id)


def _release(table: dict[str, _Waiters], run_id: str) -> None:
    """Release a run's lock: to its first waiter still waiting, else the lock goes (see :class:`_RunLock`)."""
    waiters = table[run_id]
    if isinstance(waiters, deque):
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the lock passes to it
                return
    del table[run_id]
