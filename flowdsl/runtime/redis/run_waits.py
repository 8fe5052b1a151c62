"""What a Redis run waits for, in one small field of its hash: written with the transitions, read by ``flowdsl runs``.

Stage: runtime: redis. Imports ``flowdsl.runtime.codec`` and stdlib (and ``.store``'s run record, as a type
only). A run's waits live in its kernel state (``state["waits"]``, docs/kernel.md, "Waits"), which a listing of
many runs cannot afford to load; so a transition that changes what the run waits for writes a summary of it in the
run's hash, field :data:`~flowdsl.runtime.redis.keys.WAITS_FIELD` (``w``), in the same ``TRANSITION`` call
(:func:`waits_update`, from :mod:`.advance_commit`; :class:`WaitsKept` keeps it beside the state in memory), and
deletes it once nothing waits. The summary is JSON::

    {"s": [signal name, ...], "t": timer waits, "d": the earliest deadline (ms)}

``s`` the names of the signals the waits waiting take, each once (in plan order; absent when none), ``t`` how
many timer waits wait (absent when none), ``d`` the earliest of their timers' due times — a timer wait's end, a
signal wait's ``timeout`` — by the Redis server's clock (absent when none has one). Its size is bounded by the plan
whatever the run: names are said once, however many waits (the instances of a for_each body) take them, and timer
waits are counted. A run without the field (one that never waited, or one written before it existed) reads as
waiting for nothing said (:func:`read_waits`).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flowdsl.runtime.codec import dumps, loads

if TYPE_CHECKING:
    from flowdsl.runtime.redis.store import RunRecord

__all__ = ["RunWaits", "WaitsKept", "read_waits", "waits_update"]


@dataclass(frozen=True)
class RunWaits:
    """What a run that is running waits for (:attr:`RunInfo.waits <flowdsl.runtime.redis.client.RunInfo>`): the
    signals its waits take (each name once, in plan order), how many timer waits it has, and the earliest due time
    of their timers (ms, the Redis server's clock; None when none has one: signal waits without a ``timeout``)."""

    signals: tuple[str, ...]
    timers: int
    due_at: int | None

    def to_json(self) -> dict[str, Any]:
        """The ``waits`` object of a ``flowdsl runs --format json`` row: ``signals``, ``timers``, ``due_at``."""
        return {"signals": list(self.signals), "timers": self.timers, "due_at": self.due_at}


class WaitsKept:
    """What a run's waits wait for, kept beside its state by the process that holds it (``RunRecord.waits``), so
    that a transition pays for the waits its events started or ended, not for every wait that waits (a for_each of
    thousands of timer waits); and ``written``, the field's value as this process last wrote it (None: not known,
    as after a load — then written again, once)."""

    __slots__ = ("due", "ends", "names", "said", "signals", "waiting", "written")

    def __init__(self) -> None:
        self.waiting: dict[str, None] = {}  # the instance keys of the waits that wait
        self.ends: dict[str, int] = {}  # of those, each one's timer's due time, when it has a timer
        self.due: list[tuple[int, str]] = []  # a heap of (due time, key), of the ends and of some gone since
        self.signals: dict[str, tuple[int, str]] = {}  # of those, each signal wait's plan order and signal
        self.names: dict[tuple[int, str], int] = {}  # how many of them take each (plan order, signal)
        self.said: str | None = None  # the field's value for them (None: not worked out yet)
        self.written: str | None = None

    def value(self, plan: dict[str, Any], state: dict[str, Any], emitted: Iterable[Sequence[dict[str, Any]]]
              ) -> str:
        """The field's value for a run in kernel ``state`` of ``plan`` (see the module doc; '' when nothing waits),
        ``emitted`` being the events of the input events applied since it was last asked (in the order they were
        applied): only the waits they name are looked at — all of them the first time, or should the count not
        match the state's."""
        waits = state.get("waits") or {}
        waiting = self.waiting
        changed = False
        for events in emitted if self.said is not None else ():
            for event in events:
                if event.get("kind") == "wait":  # (it started, or ended: the state says which, as it is now)
                    key = event["step"]
                    if key in waits and key not in waiting:
                        self._add(plan, state, key)
                        changed = True
                    elif key in waiting and key not in waits:
                        self._drop(key)
                        changed = True
        if self.said is None or len(waiting) != len(waits):  # (all of them: the first time, or one was missed)
            changed = True
            for key in [key for key in waiting if key not in waits]:
                self._drop(key)
            for key in waits:
                if key not in waiting:
                    self._add(plan, state, key)
        if not changed and self.said is not None:
            return self.said
        due = self.due
        while due and self.ends.get(due[0][1]) != due[0][0]:  # (the heap's top ended: gone)
            heapq.heappop(due)
        said: dict[str, Any] = {}
        if self.names:
            said["s"] = [name for _, name in sorted(self.names)]
        if len(waiting) > len(self.signals):
            said["t"] = len(waiting) - len(self.signals)
        if due:
            said["d"] = due[0][0]
        self.said = dumps(said).decode() if said else ""
        return self.said

    def _add(self, plan: dict[str, Any], state: dict[str, Any], key: str) -> None:
        self.waiting[key] = None
        rec = state["nodes"].get(key) or {}
        node = plan["nodes"].get(rec.get("node")) or {}
        signal = state["waits"][key].get("signal")
        if signal is None:
            span = node.get("delay_ms")
        else:
            named = self.signals[key] = (node.get("order", 0), signal)
            self.names[named] = self.names.get(named, 0) + 1
            span = node.get("timeout_ms")
        started = rec.get("started_at")
        if isinstance(span, int) and isinstance(started, int):  # (its timer was armed as it started)
            self.ends[key] = started + span
            heapq.heappush(self.due, (started + span, key))

    def _drop(self, key: str) -> None:
        del self.waiting[key]
        self.ends.pop(key, None)  # (its heap entry goes once it is at the top)
        named = self.signals.pop(key, None)
        if named is not None:
            if self.names[named] == 1:
                del self.names[named]
            else:
                self.names[named] -= 1


def waits_update(record: RunRecord, emitted: Iterable[Sequence[dict[str, Any]]]) -> WaitsKept | None:
    """What a transition of ``record`` must write in the field, its state being as the transition leaves it and
    ``emitted`` the events of the input events it applied: its :class:`WaitsKept` (made here), whose ``said`` is the
    value — '' to delete the field — or None when the field says it already (as far as this process knows). Once the
    transition is written, the caller sets ``written``."""
    state = record.state
    if "waits" not in state:  # (a run that never waited: the key appears once a wait starts, and stays)
        return None
    kept = record.waits
    if kept is None:
        kept = record.waits = WaitsKept()
    return None if kept.value(record.plan, state, emitted) == kept.written else kept


def read_waits(raw: bytes | None) -> RunWaits | None:
    """The field as read from a run's hash, or None when it is absent, empty, or not what :class:`WaitsKept` says
    (a listing never fails on it)."""
    if not raw:
        return None
    try:
        said = loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(said, dict):
        return None
    signals, timers, due = said.get("s", []), said.get("t", 0), said.get("d")
    if not (isinstance(signals, list) and all(isinstance(s, str) for s in signals)) or type(timers) is not int or \
            not (due is None or type(due) is int) or not (signals or timers):
        return None
    return RunWaits(tuple(signals), timers, due)
