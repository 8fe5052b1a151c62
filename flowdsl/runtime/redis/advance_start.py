"""Starting runs: a submitted run's first transition, with the cancel requests held for it before it started.

Stage: runtime: redis. Imports ``flowdsl.kernel`` (``start_run``), ``flowdsl.runtime.plancheck`` (the plan
version), this package's ``advance_common`` and ``store``, and stdlib. :class:`Starting` is mixed into
:class:`~flowdsl.runtime.redis.advance.Advancer` (whose attributes it uses, and whose transitions it writes with
:mod:`.advance_commit`): :meth:`Starting.start` reads the submission, asks the kernel to start the run and writes
the start as one transition — with the cancel requests held in the run's hash applied in it, so that a run
cancelled before it started ends ``cancelled`` having run nothing — and :meth:`Starting._held_cancels` applies a
cancel request held while the start was being computed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any

from flowdsl import kernel
from flowdsl.kernel import END_STATES, NewerVersion, apply, start_event, start_run
from flowdsl.runtime.plancheck import PLAN_VERSION
from flowdsl.runtime.redis.advance_common import (
    _MAX_CONFLICTS,
    _NO_WAITERS,
    Chain,
    Outcome,
    _Applied,
    _release,
    _RunLock,
    _Waiters,
)
from flowdsl.runtime.redis.keys import Keys
from flowdsl.runtime.redis.store import Clock, RunRecord, Store, TransitionResult, cancel_reasons

__all__ = ["Starting"]


class Starting:
    """A run's start (see the module doc); a mixin of ``Advancer``."""

    # what the Advancer provides
    store: Store
    keys: Keys
    clock: Clock
    schedule_timeout_ms: int | None
    retention_ms: int
    rules: int | None
    _cache: OrderedDict[str, RunRecord]
    _locks: dict[str, _Waiters]
    _lock: Callable[[str], _RunLock]
    _record: Callable[[str], Coroutine[Any, Any, RunRecord | None]]
    _commit: Callable[..., Coroutine[Any, Any, tuple[TransitionResult, list[dict[str, Any]]]]]
    _flush: Callable[..., Coroutine[Any, Any, tuple[str, ...]]]
    _tail: Callable[[str, tuple[int, list[dict[str, Any]], tuple[str, ...]] | None, tuple[str, ...],
                     list[dict[str, Any]]], Coroutine[Any, Any, None]]
    relay: Callable[[str | None, int | None, list[dict[str, Any]]], Coroutine[Any, Any, None]]

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
                                     kernel=kernel.rules_for(sub["plan"], self.rules))
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


def _cancelled_at_start(plan: dict[str, Any], state: dict[str, Any], reasons: tuple[str, ...], at: int
                        ) -> list[_Applied]:
    """The input events that cancel a run its start has just begun (``state``), applied to it: each held
    cancel request once, then ``task_cancelled`` for every attempt the kernel asks to cancel — the start
    dispatched them in the same transition, so no worker has them (:func:`.advance_commit._unsent` drops their
    messages)."""
    steps: list[_Applied] = []
    events: list[dict[str, Any]] = [{"type": "cancel_requested", "reason": r, "at": at} for r in reasons]
    while events:
        event = events.pop(0)
        decision = apply(plan, state, event)
        steps.append((event, decision, None, "", None))
        events += [{"type": "task_cancelled", "task_id": c["task_id"], "at": at}
                   for c in decision.commands if c["op"] == "cancel_task"]
    return steps
