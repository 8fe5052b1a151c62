"""Simulated runs: a flow driven through the kernel on a virtual clock, each attempt scripted or real.

Stage: runtime. Imports ``flowdsl.kernel``, ``.execute`` (an attempt left to its real worker), ``.inputs`` (the
run input's check), ``.report`` (:class:`RunResult`), ``flowdsl.workers`` and stdlib. Nothing here sleeps: the
clock jumps from one due answer or timer to the next, so a flow whose retries wait minutes, whose steps time out
after an hour or whose run is cancelled after a day is simulated in milliseconds — and the same way every time.

An attempt does what its :class:`Outcome` says: succeed with a result, fail with an error type, never answer
(``hang``: only its timeout or a cancel ends it), or call the real worker (``real``, the default for an attempt
with no script: it is awaited at once and takes no virtual time). ``after`` delays the answer on the virtual
clock; ``ignores_cancel`` makes it come even after the run cancelled the attempt (a sync worker's thread runs to
its end), which is how a late completion is simulated. Events due at the same virtual time are applied in the
order they were scheduled, so a simulation is deterministic: the same plan, input, script and seed give the same
events, byte for byte.

The runtime contract of docs/kernel.md holds: every dispatch is answered once (or never, for ``hang``), a
``task_started`` follows each dispatch, timers fire at their due time unless cancelled, a cancelled attempt
answers ``task_cancelled`` at once unless it ignores the cancel.

A run's ``wait`` nodes get the :class:`Signal` events its script sends (``Script.signals``), each at its time from
the run's start (a keyed wait's with its key), and, for the signals ``Script.keyed_at_start`` names, each keyed
wait's signal as it starts, with the key it took; a timer wait's timer fires on the virtual clock as any other (a
wait of 2 h takes no real time). A run whose signal wait waits for a signal nobody sends never ends
(``Simulation.waits`` names it). A signal due after the run has ended never reaches it, as on the local runtime
(which answers one sent to a run that is over ``rejected`` without recording it): it is not among the run's events.
"""

from __future__ import annotations

import asyncio
import builtins
import heapq
import itertools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from flowdsl.kernel import END_STATES, apply, key_text, start_run
from flowdsl.runtime.execute import WORKER_KINDS, NotJSON, copy_json, error_types, execute, plain_json
from flowdsl.runtime.inputs import check_input
from flowdsl.runtime.report import RunResult
from flowdsl.workers import WorkerRegistry
from flowdsl.workers import registry as default_registry

__all__ = ["SIM_EPOCH_MS", "Call", "Outcome", "Script", "Signal", "Simulation", "SimulationError",
           "error_types_of", "simulate", "simulate_flow"]

#: where a simulated run's clock starts: 2026-01-01T00:00:00Z, in ms (the kernel's times are epoch milliseconds)
SIM_EPOCH_MS = 1_767_225_600_000
#: answers, timers and cancel requests a simulation applies at most (``task_started`` notes aside) before it gives
#: up: every flow ends or waits well before (a 100,000-item for_each of two steps, each retried, is a few hundred
#: thousand), so reaching it means the kernel keeps deciding without end
MAX_EVENTS = 5_000_000

OutcomeKind = Literal["ok", "fail", "hang", "real"]


@dataclass(frozen=True)
class Outcome:
    """What one simulated attempt does.

    ``kind``: ``ok`` (succeeds with ``result``), ``fail`` (fails with ``error_type`` and ``message``; retry
    filters match ``error_type`` and the names in ``is_a``, then ``Exception`` — or, for a built-in exception
    such as ``TimeoutError``, its built-in parents: :func:`error_types_of`), ``hang`` (never answers) or
    ``real`` (calls the step's registered worker, or its model for an LLM step, at once). ``after_ms``: virtual
    milliseconds from the dispatch to the answer. ``ignores_cancel``: the answer still comes when the run
    cancels the attempt (a timeout, a sibling's failure, a cancel request), as a sync worker's does; a ``real``
    attempt's answer always does (the call has made its effect before the run could cancel it).
    """

    kind: OutcomeKind = "real"
    result: Mapping[str, Any] | None = None
    error_type: str = ""
    message: str = ""
    is_a: tuple[str, ...] = ()
    after_ms: int = 0
    ignores_cancel: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("ok", "fail", "hang", "real"):
            raise ValueError(f"an outcome is ok, fail, hang or real, not {self.kind!r}")
        if type(self.after_ms) is not int or self.after_ms < 0:
            raise ValueError(f"after_ms is a whole number of milliseconds, 0 or more; got {self.after_ms!r}")
        if self.kind == "ok":
            if self.result is not None and not isinstance(self.result, Mapping):
                raise ValueError(f"an ok outcome's result is a mapping (or None for {{}}), not "
                                 f"{type(self.result).__name__}: a step's result is a JSON object")
            try:  # what a worker's result must be, or the attempt fails OutputInvalid (flowdsl.runtime.execute)
                object.__setattr__(self, "result", plain_json(dict(self.result or {})))
            except NotJSON as exc:
                raise ValueError(f"an ok outcome's result is not JSON: {exc}") from None
        if self.kind == "fail" and not (isinstance(self.error_type, str) and self.error_type.isidentifier()):
            raise ValueError(f"a fail outcome's error type is an exception class name, not {self.error_type!r}")

    @classmethod
    def ok(cls, result: Mapping[str, Any] | None = None, *, after_ms: int = 0,
           ignores_cancel: bool = False) -> Outcome:
        """An attempt that succeeds with ``result`` (``None``: ``{}``)."""
        return cls("ok", result=result, after_ms=after_ms, ignores_cancel=ignores_cancel)

    @classmethod
    def fail(cls, error_type: str, message: str = "", *, is_a: Sequence[str] = (), after_ms: int = 0,
             ignores_cancel: bool = False) -> Outcome:
        """An attempt that raises an exception of class name ``error_type``."""
        return cls("fail", error_type=error_type, message=message or f"simulated {error_type}", is_a=tuple(is_a),
                   after_ms=after_ms, ignores_cancel=ignores_cancel)

    @classmethod
    def hang(cls) -> Outcome:
        """An attempt that never answers: its timeout, or a cancel, ends it."""
        return cls("hang")

    @classmethod
    def real(cls, *, after_ms: int = 0) -> Outcome:
        """An attempt that calls the real worker (or model) at once, its answer due ``after_ms`` later (a cancel
        meanwhile does not stop it: the call has made its effect)."""
        return cls("real", after_ms=after_ms)


def error_types_of(error_type: str, is_a: Sequence[str] = ()) -> list[str]:
    """The class names a scripted failure stands for, most specific first, as a raised exception's ``types``
    are (docs/kernel.md): ``error_type``, then ``is_a``, then — for a built-in exception's name — its built-in
    parents, else ``Exception``."""
    found = getattr(builtins, error_type, None)
    parents = error_types(found.__new__(found))[1:] if isinstance(found, type) and issubclass(found, BaseException) \
        else ["Exception"]
    return list(dict.fromkeys([error_type, *is_a, *parents]))


@dataclass(frozen=True)
class Signal:
    """A signal sent to a simulated run from outside (docs/kernel.md, "Waits"): its ``name``, its ``data`` (the wait's
    result: a JSON object; None for ``{}``), when — ``at_ms`` virtual milliseconds after the run's start (0: at once,
    kept until its wait starts) — and, for a keyed wait's signal, its ``key`` (a non-empty string of at most
    ``KEY_LIMIT`` characters; a whole number is taken as its decimal text): the instance of the wait that took that key
    takes it. The run's wait of that name takes it; a signal no wait can take (none waits for that name, it came
    already, its wait has ended, a key missing or one the wait does not take) is rejected, as a runtime's would be
    (``signal_rejected``), and changes nothing else. One due after the run has ended never reaches it (it is not among
    the run's events), as the local runtime feeds none to a run that is over.
    """

    name: str
    data: Mapping[str, Any] | None = None
    at_ms: int = 0
    key: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a signal's name is a non-empty string, not {self.name!r}")
        if self.key is not None:  # (as a wait's key: a whole number is its decimal text, at most KEY_LIMIT long)
            if isinstance(self.key, bool) or not isinstance(self.key, str | int | float):
                raise ValueError(f"signal {self.name!r}: its key is a non-empty string or a whole number (or None "
                                 f"for none), not {self.key!r}")
            try:
                object.__setattr__(self, "key", key_text(self.key, "it is"))
            except ValueError as exc:
                raise ValueError(f"signal {self.name!r}: its key {exc}") from None
        if type(self.at_ms) is not int or self.at_ms < 0:
            raise ValueError(f"at_ms is a whole number of milliseconds, 0 or more; got {self.at_ms!r}")
        if self.data is not None and not isinstance(self.data, Mapping):
            raise ValueError(f"a signal's data is a mapping (or None for {{}}), not {type(self.data).__name__}: "
                             "it is its wait's result, a JSON object")
        try:
            object.__setattr__(self, "data", plain_json(dict(self.data or {})))
        except NotJSON as exc:
            raise ValueError(f"signal {self.name!r}: its data is not JSON: {exc}") from None


@dataclass(frozen=True)
class Script:
    """The scripted outcomes of a run's attempts, by step, and the signals sent to it.

    Each table maps a step's instance key (``lines[2]/charge``) or plan key (``charge``: every instance of it)
    to the outcomes of its attempts 1, 2, …; past the end of the list its last outcome repeats. An instance key
    is looked up before its plan key. ``steps`` scripts a step's own attempts (its worker, or its model),
    ``undo`` its compensation's, ``fallback`` its fallback worker's. An attempt with no script is ``real``.
    ``signals``: the :class:`Signal` events sent to the run, each at its time (at the same time, in this order).
    ``keyed_at_start``: signal names of keyed waits, each instance of which is sent its signal as it starts (at
    that virtual time, with ``{}`` and the key it took) — unless ``signals`` send that signal with that key.
    """

    steps: Mapping[str, Sequence[Outcome]] = field(default_factory=dict)
    undo: Mapping[str, Sequence[Outcome]] = field(default_factory=dict)
    fallback: Mapping[str, Sequence[Outcome]] = field(default_factory=dict)
    signals: Sequence[Signal] = ()
    keyed_at_start: Collection[str] = frozenset()

    def __post_init__(self) -> None:
        signals = tuple(self.signals)
        wrong = next((s for s in signals if not isinstance(s, Signal)), None)
        if wrong is not None:
            raise ValueError(f"a script's signals are Signal objects, not {type(wrong).__name__}")
        object.__setattr__(self, "signals", signals)
        if isinstance(self.keyed_at_start, str):
            raise ValueError("a script's keyed_at_start is a collection of signal names, not one string")
        object.__setattr__(self, "keyed_at_start", frozenset(self.keyed_at_start))

    def outcome(self, command: Mapping[str, Any]) -> Outcome:
        """The outcome of the attempt a ``dispatch`` command starts."""
        kind = command["kind"]
        table = self.undo if kind == "compensate" else self.fallback if kind == "fallback" else self.steps
        found = table.get(command["step"])
        if found is None:
            found = table.get(command["node"])
        if not found:
            return _REAL
        return found[min(int(command["attempt"]), len(found)) - 1]


_REAL = Outcome()


@dataclass(frozen=True)
class Call:
    """One attempt the simulated run dispatched: when (virtual ms from the run's start), which, with what ``input``
    (as the kernel gave it: read-only, shared with the run's state) and what it did."""

    at_ms: int
    kind: str
    step: str
    node: str
    attempt: int
    worker: str | None
    task_id: str
    input: Any
    outcome: OutcomeKind


@dataclass
class Simulation:
    """A simulated run: its :class:`RunResult` (``status`` ``running`` when it never ended), the attempts it
    dispatched in order (``calls``), the virtual time it took (``elapsed_ms``, None when it never ended) and,
    when it never ended, the attempts it was still waiting for (``waiting``: task ids) and its waits still waiting
    for a signal (``waits``: instance key -> the signal's name)."""

    result: RunResult
    calls: list[Call]
    elapsed_ms: int | None
    waiting: list[str]
    waits: dict[str, str] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        """Whether the run reached an end state."""
        return self.result.status in END_STATES

    def __repr__(self) -> str:
        # short on purpose, as RunResult's: asyncio formats a finished task's result (signal.getsignal does, on
        # every asyncio.run in Python 3.11), and the calls of a wide run take seconds to print
        return (f"Simulation(status={self.result.status!r}, calls={len(self.calls)}, "
                f"elapsed_ms={self.elapsed_ms!r})")


class SimulationError(Exception):
    """The simulation could not be carried out as scripted: an attempt left to a worker that is not registered,
    or a run still going after :data:`MAX_EVENTS` answers and timers. The message says which."""


class _Clock:
    """The virtual clock and what is due on it: input events by (due time, order scheduled)."""

    def __init__(self, start: int):
        self.now = start
        self._due: list[tuple[int, int, dict[str, Any]]] = []
        self._order = itertools.count()
        #: answers not yet applied, by task id: (its queue entry, whether a cancel leaves it due)
        self.answers: dict[str, tuple[dict[str, Any], bool]] = {}
        #: timer id -> the generation of its one armed entry (scheduling it again, or cancelling it, makes the
        #: entries of earlier generations stale)
        self.timers: dict[str, int] = {}
        self._generations = itertools.count(1)

    def arm(self, timer_id: str, due_at: int) -> None:
        generation = self.timers[timer_id] = next(self._generations)
        self.at(due_at, {"type": "timer_fired", "timer_id": timer_id, "_generation": generation})

    def disarm(self, timer_id: str) -> None:
        self.timers.pop(timer_id, None)

    def at(self, when: int, event: dict[str, Any]) -> None:
        event["at"] = when
        heapq.heappush(self._due, (when, next(self._order), event))

    def next(self) -> dict[str, Any] | None:
        while self._due:
            when, _, event = heapq.heappop(self._due)
            if event.get("_dropped"):
                continue
            if event["type"] == "timer_fired":
                if self.timers.get(event["timer_id"]) != event.pop("_generation"):
                    continue  # cancelled, or armed again since
                del self.timers[event["timer_id"]]
            self.now = when
            if event["type"] in ("task_succeeded", "task_failed", "task_cancelled"):
                self.answers.pop(event["task_id"], None)
            return event
        return None


class _Simulator:
    """Carries out a simulated run's commands: scripted answers put on the clock, real workers called."""

    def __init__(self, script: Script, registry: WorkerRegistry | None, lm: object | None,
                 lms: Mapping[str, object] | None, adapter: object | None, clock: _Clock):
        self.script, self.clock = script, clock
        self.registry = registry or default_registry
        self.lm, self.lms, self.adapter = lm, lms, adapter
        self.calls: list[Call] = []
        self.start = clock.now
        self.hanging: set[str] = set()
        #: the (signal, key) pairs the script's signals send: a keyed wait of one is not sent its signal as it starts
        self.sent_keys = {(s.name, s.key) for s in script.signals if s.key is not None}

    def keyed_started(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Send each keyed wait among ``events`` that started (``step_started`` with a key) its signal now, with
        ``{}`` and its key, when ``Script.keyed_at_start`` names that signal and the script does not send it."""
        names = self.script.keyed_at_start
        if not names:
            return
        for event in events:
            if event["type"] == "step_started" and event.get("key") is not None and event.get("signal") in names \
                    and (event["signal"], event["key"]) not in self.sent_keys:
                self.clock.at(self.clock.now, {"type": "signal", "name": event["signal"], "key": event["key"],
                                               "payload": {}})

    async def carry_out(self, commands: Sequence[Mapping[str, Any]]) -> None:
        for command in commands:
            op = command["op"]
            if op == "dispatch":
                await self._dispatch(command)
            elif op == "schedule_timer":
                self.clock.arm(command["timer_id"], int(command["due_at"]))
            elif op == "cancel_timer":
                self.clock.disarm(command["timer_id"])
            elif op == "cancel_task":
                self._cancel(command["task_id"])

    async def _dispatch(self, command: Mapping[str, Any]) -> None:
        outcome = self.script.outcome(command)
        task_id, now = command["task_id"], self.clock.now
        # (the command's input as the kernel made it: read-only data, shared with the run's state, not copied —
        # a wide for_each would otherwise hold a copy of its context per attempt)
        self.calls.append(Call(now - self.start, command["kind"], command["step"], command["node"],
                               int(command["attempt"]), command.get("worker"), task_id, command["input"],
                               outcome.kind))
        self.clock.at(now, {"type": "task_started", "task_id": task_id})
        if outcome.kind == "hang":
            self.hanging.add(task_id)
            return
        if outcome.kind == "real":
            answer = await self._real(command)
            if answer is None:  # it outlasted its step's timeout: it counts as not answering
                self.hanging.add(task_id)
                return
        elif outcome.kind == "ok":
            answer = {"type": "task_succeeded", "task_id": task_id, "result": copy_json(outcome.result)}
        else:
            answer = {"type": "task_failed", "task_id": task_id,
                      "error": {"type": outcome.error_type, "message": outcome.message,
                                "types": error_types_of(outcome.error_type, outcome.is_a)}}
        # a real call made its effect before it returned: a cancel after that never takes it back
        self.clock.answers[task_id] = (answer, outcome.ignores_cancel or outcome.kind == "real")
        self.clock.at(now + outcome.after_ms, answer)

    async def _real(self, command: Mapping[str, Any]) -> dict[str, Any] | None:
        if command["kind"] in WORKER_KINDS and self.registry.get(command.get("worker") or "") is None:
            which = {"compensate": "the undo of step", "fallback": "the fallback of step"}.get(command["kind"], "step")
            raise SimulationError(f"{which} {command['step']!r} has no scripted outcome and its worker "
                                  f"{command.get('worker')!r} is not registered: script it, or import the module "
                                  "that registers the worker")
        call = execute(command, registry=self.registry, lm=self.lm, lms=self.lms, adapter=self.adapter)
        limit = command.get("timeout_ms")
        if limit is None:
            return await call
        try:
            async with asyncio.timeout(limit / 1000):
                return await call
        except TimeoutError:
            return None

    def _cancel(self, task_id: str) -> None:
        if task_id in self.hanging:
            self.hanging.discard(task_id)
            self.clock.at(self.clock.now, {"type": "task_cancelled", "task_id": task_id})
            return
        pending = self.clock.answers.get(task_id)
        if pending is None or pending[1]:  # answered already, or it answers whatever the run does
            return
        pending[0]["_dropped"] = True
        del self.clock.answers[task_id]
        self.clock.at(self.clock.now, {"type": "task_cancelled", "task_id": task_id})


async def simulate_flow(plan: dict[str, Any], run_input: dict[str, Any], *, script: Script | None = None,
                        run_id: str = "simulated", seed: int | None = 0, cancel_at_ms: int | None = None,
                        cancel_reason: str = "cancelled by the test", registry: WorkerRegistry | None = None,
                        lm: object | str | None = None, lms: Mapping[str, object] | None = None,
                        adapter: object | None = None, max_events: int = MAX_EVENTS) -> Simulation:
    """Run ``plan`` with ``run_input`` on a virtual clock, each attempt as ``script`` says (unscripted: the real
    worker from ``registry``, or the model for an LLM step — ``lm``, ``lms`` and ``adapter`` as for
    :func:`flowdsl.run_flow`); return the :class:`Simulation`.

    The clock starts at :data:`SIM_EPOCH_MS`; ``cancel_at_ms`` (virtual ms after the start) requests a cancel
    of the run then, with ``cancel_reason``; the script's signals are sent at their times (after a cancel due at
    the same time). ``seed`` drives retry jitter (None: derived from ``run_id``).
    Raises :class:`~flowdsl.runtime.inputs.InputError` for an input the flow's schema refuses and
    :class:`SimulationError` as that class says. Runs on the running event loop; real workers are awaited
    one at a time, in the order the run dispatches them.
    """
    if cancel_at_ms is not None and (type(cancel_at_ms) is not int or cancel_at_ms < 0):
        raise ValueError(f"cancel_at_ms is a whole number of milliseconds, 0 or more; got {cancel_at_ms!r}")
    check_input(plan, run_input)
    clock = _Clock(SIM_EPOCH_MS)
    sim = _Simulator(script or Script(), registry, lm, lms, adapter, clock)
    decision = start_run(plan, run_id, run_input, at=clock.now, seed=seed)
    events = list(decision.events)
    if cancel_at_ms is not None:
        clock.at(clock.now + cancel_at_ms, {"type": "cancel_requested", "reason": cancel_reason})
    for sent in sim.script.signals:  # (one due after the run's end never reaches it: skipped below)
        clock.at(clock.now + sent.at_ms, {"type": "signal", "name": sent.name, "payload": copy_json(sent.data)}
                 | ({"key": sent.key} if sent.key is not None else {}))
    sim.keyed_started(decision.events)
    await sim.carry_out(decision.commands)
    state = decision.state
    applied = 0
    while (event := clock.next()) is not None:
        applied += event["type"] != "task_started"
        if applied > max_events:
            raise SimulationError(f"the run was still going after {max_events:,} simulated answers and timers (at "
                                  f"{(clock.now - sim.start) / 1000:g} s of virtual time)")
        if state["status"] in END_STATES and event["type"] in ("task_started", "timer_fired", "cancel_requested",
                                                                "signal"):
            continue  # nothing left for them to change: only a late answer can (a signal sent to a run that is over
            # never reaches it on the local runtime: it is answered rejected, and not recorded)
        decision = apply(plan, state, event)
        state = decision.state
        events.extend(decision.events)
        sim.keyed_started(decision.events)
        await sim.carry_out(decision.commands)
    result = RunResult.from_state(plan, state, events)
    ended = state["status"] in END_STATES
    elapsed = state["finished_at"] - state["started_at"] if ended and state.get("finished_at") is not None \
        else None
    waiting = [] if ended else sorted(state.get("tasks") or ())
    waits = {} if ended else {k: w["signal"] for k, w in sorted((state.get("waits") or {}).items())
                              if w["signal"] is not None}
    return Simulation(result, sim.calls, elapsed, waiting, waits)


def simulate(plan: dict[str, Any], run_input: dict[str, Any], *, script: Script | None = None,
             run_id: str = "simulated", seed: int | None = 0, cancel_at_ms: int | None = None,
             cancel_reason: str = "cancelled by the test", registry: WorkerRegistry | None = None,
             lm: object | str | None = None, lms: Mapping[str, object] | None = None, adapter: object | None = None,
             max_events: int = MAX_EVENTS) -> Simulation:
    """:func:`simulate_flow` on a new event loop, with the same options; inside a running event loop (``async``
    code, a pytest-asyncio test) this raises ``RuntimeError``: ``await`` :func:`simulate_flow` there."""
    try:
        asyncio.get_running_loop()
        running = True
    except RuntimeError:
        running = False
    if running:
        raise RuntimeError("flowdsl.simulate() cannot be called from a running event loop (it runs one of its own): "
                           "in async code, use `await flowdsl.simulate_flow(plan, run_input, ...)`, which takes the "
                           "same options")
    return asyncio.run(simulate_flow(plan, run_input, script=script, run_id=run_id, seed=seed,
                                     cancel_at_ms=cancel_at_ms, cancel_reason=cancel_reason, registry=registry,
                                     lm=lm, lms=lms, adapter=adapter, max_events=max_events))
