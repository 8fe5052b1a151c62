"""Committing transitions: the kernel's decisions written as one atomic transition, and its outbox relayed.

Stage: runtime: redis. Imports ``flowdsl.kernel`` (end states, the decision type), ``flowdsl.runtime.codec``,
orjson, this package's ``advance_common``, ``advance_end``, ``connection``, ``keys``, ``run_waits`` and ``store``,
and stdlib.
:class:`Committing` is mixed into :class:`~flowdsl.runtime.redis.advance.Advancer` (whose attributes it uses):

- **the run's state** — kept in memory, most recently used first (:meth:`Committing._record`);
- **the write** — :meth:`Committing._commit` turns the decisions of one or more input events into one
  transition (``Store.transition``: journal entries, guards, task leases, one outbox entry, the state whole when
  a snapshot is due, see :meth:`Committing._snapshot_due`; the run's ``w`` field when what it waits for
  changed, :mod:`.run_waits`), retried with the same payload while Redis is
  unreachable; :meth:`Committing._commit_step` writes a chained step's result in one straight line
  (``Store.step``). A transition that ends the run is counted and logged (:mod:`.advance_end`);
- **the relay** — :meth:`Committing._tail` carries the outbox out (task messages, timers, cancels), answers the
  cancellations nobody else will answer, then acknowledges the trigger; :meth:`Committing.recover` relays what
  a process that died left behind (:meth:`Committing._flush`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from orjson import dumps as _orjson

from flowdsl.kernel import END_STATES, Decision
from flowdsl.runtime.codec import dumps
from flowdsl.runtime.redis.advance_common import CHAIN_REPLAY, Chain, _Applied, _RunLock
from flowdsl.runtime.redis.advance_end import _ends, _said_refused
from flowdsl.runtime.redis.connection import TRANSIENT, Backoff
from flowdsl.runtime.redis.keys import WAITS_FIELD, Keys
from flowdsl.runtime.redis.run_waits import waits_update
from flowdsl.runtime.redis.store import JournalEntry, RunRecord, Store, TaskOp, TransitionResult, megabytes

__all__ = ["Committing"]

log = logging.getLogger("flowdsl.redis")


class Committing:
    """Transitions written and relayed (see the module doc); a mixin of ``Advancer``."""

    # what the Advancer provides
    store: Store
    keys: Keys
    cache_size: int
    snapshot_bytes: int
    snapshot_limit: int
    on_timer: Callable[[int], None] | None
    on_refused: Callable[[str, str, str, str, dict[str, Any] | None], None] | None
    transitions: int
    snapshots: int
    _cache: OrderedDict[str, RunRecord]
    _tokens: Iterator[str]
    _lock: Callable[[str], _RunLock]
    _ended: Callable[[str, dict[str, Any], dict[str, Any]], None]
    apply_event: Callable[..., Coroutine[Any, Any, str]]

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
            answered = guard[0] if guard is not None and guard[1] != "new" else None  # (new: a signal's id)
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
        # (what the run waits for, for `flowdsl runs`: the waits the events started or ended)
        waits = waits_update(record, [step[1].events for step in steps]) if "waits" in state else None
        if waits is not None:
            meta = [*(meta or ()), (WAITS_FIELD, waits.said)]
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
            if waits is not None:
                waits.written = waits.said
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
        waits = waits_update(record, (decision.events,)) if "waits" in state else None
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
                                               state_raw, entry, held, None if waits is None else waits.said)
                break
            except TRANSIENT as exc:
                log.warning("run %s: Redis unreachable while writing a transition (%s); retrying", record.run_id,
                            exc)
                backoff = backoff or Backoff()
                await backoff.wait()
        if result.code == 1 or result.code == 4:  # (the bookkeeping of _commit, for one input event)
            self.transitions += 1
            if waits is not None:
                waits.written = waits.said
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

    # --- relaying ------------------------------------------------------------------------------------

    async def recover(self, run_id: str, trigger: str = "") -> None:
        """Relay what a process that died left in the run's outbox (before taking over its trigger ``trigger``:
        the tasks it held under it are queued again first)."""
        async with self._lock(run_id):
            self._cache.pop(run_id, None)
            followups = await self._flush(run_id, trigger)
        await self._tail(run_id, None, followups, [])

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

