"""Advancing runs: feed one input event to the kernel and write the outcome atomically, then relay it.

Stage: runtime: redis. Imports ``flowdsl.kernel``, this package's ``advance_common``, ``advance_start``,
``advance_commit``, ``advance_end``, ``connection``, ``keys`` and ``store``, and stdlib. Every
decision is the kernel's; the :class:`Advancer` only turns a
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

The :class:`Advancer` is put together here from mixins, one module each; a mixin imports no other (each declares
what it uses of the others) and only this module puts them together. What they share is in
:mod:`.advance_common` (the outcomes, the limits, :class:`Chain`, the per-run lock), whose public names are
re-exported here:

- **applying input events** (this module) — :meth:`Advancer.apply_event`, the one way in, with its group commit;
  :meth:`Advancer.report`, a worker's result in one straight line; :meth:`Advancer.fire`, a timer;
- **starting runs** (:mod:`.advance_start`) — a submitted run's first transition, with the cancel requests held
  for it;
- **committing transitions** (:mod:`.advance_commit`) — the write, the snapshots, the cached states, the relay
  of the outbox and the recovery of what a dead process left in it;
- **ending runs** (:mod:`.advance_end`) — a run's end counted and logged (:func:`said_end`), a refused result
  said.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from flowdsl.kernel import NewerVersion, apply
from flowdsl.runtime.redis.advance_commit import Committing
from flowdsl.runtime.redis.advance_commit import _unsent as _unsent  # (re-exported: tested here)
from flowdsl.runtime.redis.advance_common import (
    _MAX_CONFLICTS,
    _NO_WAITERS,
    CHAIN_REPLAY,
    GROUP_COMMIT,
    SCHEDULE_TO_START_TIMEOUT,
    SNAPSHOT_BYTES,
    SNAPSHOT_LIMIT,
    Chain,
    Contended,
    Outcome,
    _Applied,
    _release,
    _RunLock,
    _Waiters,
)
from flowdsl.runtime.redis.advance_common import nonces as nonces
from flowdsl.runtime.redis.advance_end import Ending, said_end
from flowdsl.runtime.redis.advance_start import Starting
from flowdsl.runtime.redis.connection import Backoff
from flowdsl.runtime.redis.keys import Keys, TimerMember
from flowdsl.runtime.redis.store import Clock, RunRecord, Store, TransitionResult

__all__ = ["CHAIN_REPLAY", "GROUP_COMMIT", "SCHEDULE_TO_START_TIMEOUT", "SNAPSHOT_BYTES", "SNAPSHOT_LIMIT", "Advancer",
           "Chain", "Contended", "Outcome", "said_end"]

log = logging.getLogger("flowdsl.redis")


class Advancer(Starting, Committing, Ending):
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

    def _lock(self, run_id: str) -> _RunLock:
        return _RunLock(self._locks, run_id)


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

