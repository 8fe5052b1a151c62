"""The saga kernel: every run semantic, as a pure deterministic state machine.

Stage: kernel — pure; imports ``flowdsl.expr`` and jsonschema only (through
the ``kernel_*`` modules it is split into); no I/O, no clock, no global
randomness. Runtimes (local asyncio, Redis) are thin shells that feed it input
events and carry out the commands it returns::

    d = start_run(plan, "r1", {"order": {...}}, at=now_ms())
    while d.state["status"] not in END_STATES:
        ...carry out d.commands, wait for the next input event...
        d = apply(plan, d.state, {"type": "task_succeeded", "task_id": tid, "at": now_ms(), "result": {...}})

``(plan, state, event) -> (state, commands, events)``; the state is plain JSON
data and a run is fully determined by its input events (:func:`replay`).
docs/kernel.md is the reference: state, input events, commands, emitted
events, compensation order, end states, idempotency keys.

Module map: ``kernel_program`` (per-plan indexes, retry arithmetic),
``kernel_core`` (data rules, emission, :class:`Decision`), ``kernel_engine``
(starting nodes, attempts, the straight line), ``kernel_saga`` (abort,
compensation, finishing).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable
from typing import Any

from flowdsl.kernel_chain import chain_step
from flowdsl.kernel_core import END_STATES, Decision, RunState
from flowdsl.kernel_engine import LLM_NOT_CONFIGURED, Machine
from flowdsl.kernel_program import _CACHE as _PROGRAMS
from flowdsl.kernel_program import Program, prepare, retry_delay
from flowdsl.kernel_saga import LATE_REASON
from flowdsl.kernel_wait import (
    KEY_LIMIT,
    KEY_RULES,
    WAIT_KEY_INVALID,
    WAIT_KEY_TAKEN,
    WAIT_RULES,
    WAIT_TIMEOUT,
    key_text,
)

__all__ = [
    "CONTINUE_RULES", "END_STATES", "INPUT_EVENTS", "KEY_LIMIT", "KEY_RULES", "LATE_REASON", "LLM_NOT_CONFIGURED",
    "STATE_VERSION", "WAIT_KEY_INVALID", "WAIT_KEY_TAKEN", "WAIT_RULES", "WAIT_TIMEOUT", "Decision", "NewerVersion",
    "Program", "apply", "check_rules", "check_seed", "in_doubt", "key_text", "left_to_undo", "prepare", "replay",
    "retry_delay", "rules_for", "start_event", "start_run", "summary",
]

#: version of the run-state layout and of the rules (``state["kernel"]``, and the ``start`` event's ``kernel``):
#: 2 added late completions (docs/kernel.md, "Late completions"), 3 no retry of an LLM step's ``InputInvalid``, 4 a
#: late completion joins the saga when nothing it follows has been undone, 5 a late success of an undo that failed
#: for good completes it, 6 ``$steps.<id>`` reads for_each and sub-flow nodes' results too (null before), 7 a success
#: of an attempt given up on, of a step whose undo has begun, is a late completion (the step completed again after
#: its undo; before, it changed nothing), 8 a step's ``on_failure: continue`` (its failure for good does not fail
#: the run), 9 wait nodes and the ``signal`` input event (docs/kernel.md, "Waits"), 10 keyed waits (a signal wait's
#: ``key``, one in a for_each body: its signal names the key of its instance); a run started under an earlier
#: version — a record or journal written before — replays and goes on under that version's rules, so its decisions
#: stay what they were
STATE_VERSION = 10
#: the rules that brought ``on_failure: continue``: a run of a plan with it never starts under older ones
CONTINUE_RULES = 8
#: the input event types :func:`apply` accepts (``start`` is :func:`start_run`'s, for :func:`replay`)
INPUT_EVENTS = ("task_started", "task_succeeded", "task_failed", "task_cancelled", "timer_fired",
                "cancel_requested", "signal")

Plan = dict[str, Any] | Program
#: a new run's state, less what is the run's own (set by :func:`start_run`, in this key order)
_NEW_STATE: dict[str, Any] = {
    "kernel": None, "run_id": None, "flow": None, "seed": None, "input": None, "status": "running",
    "started_at": None, "finished_at": None, "error": None, "failed_step": None, "abort": None, "clock": 0,
    "seq": 0, "remaining": 0, "nodes": None, "iterations": None, "tasks": None, "timers": None, "saga": None,
    "compensations": None, "compensated": None, "intervention": None, "context": None,
}


class NewerVersion(ValueError):
    """A run state, start event or plan of a version newer than this code knows: a newer flowdsl wrote it.

    Applying this kernel's older rules to it would make decisions the run was not started under, so
    :func:`apply` and :func:`start_run` refuse it; a runtime sharing runs with newer processes (Redis, during a
    rolling upgrade) leaves such a run to them instead of treating the event as malformed.
    """


def rules_for(plan: Plan, pinned: int | None = None) -> int:
    """The rules a run of ``plan`` starts under when a runtime is told to start runs under ``pinned`` (a rolling
    upgrade's first step, docs/runtime.md): ``pinned``, raised to the rules the plan needs — a plan with
    ``on_failure: continue`` is of a layout only processes that know :data:`CONTINUE_RULES` read, so its runs may
    start under them whatever the pin, one with a wait node likewise under :data:`WAIT_RULES`, and one with a keyed
    wait under :data:`KEY_RULES`; None: the
    newest, :data:`STATE_VERSION`."""
    if pinned is None:
        return STATE_VERSION
    program = prepare(plan)
    if program.keyed:
        return max(pinned, KEY_RULES)
    if program.waits:
        return max(pinned, WAIT_RULES)
    return max(pinned, CONTINUE_RULES) if program.continues else pinned


def check_rules(version: int, run_id: object = None) -> None:
    """Raise :class:`NewerVersion` when ``version`` (a run state's ``kernel``) is newer than :data:`STATE_VERSION`."""
    if version > STATE_VERSION:
        raise NewerVersion(f"run {run_id!r} follows kernel rules version {version}, newer than this flowdsl knows "
                           f"(1 to {STATE_VERSION}): a newer flowdsl started it (upgrade this one)")


def check_seed(seed: object) -> None:
    """A ``ValueError`` unless ``seed`` is an integer (the retry jitter's seed) or None (derived from the run id)."""
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"the seed must be an integer or None; got {seed!r}")


def start_run(plan: Plan, run_id: str, input: dict[str, Any], *, at: int | float,
              seed: int | None = None, kernel: int = STATE_VERSION) -> Decision:
    """Start a run: check its input, schedule its run timeout, dispatch its first steps.

    ``at`` is the caller's clock in integer milliseconds since the Unix epoch;
    ``seed`` drives retry jitter (default: derived from ``run_id``). A run
    input that is not an object or does not match the flow's input schema ends
    the run ``failed`` at once with error type ``InputInvalid``. ``kernel``: the
    rules' version the run was started under (:data:`STATE_VERSION`; an older one
    for :func:`replay` of a run recorded before).
    """
    # (the checks of check_rules, check_seed, prepare and _time skipped or inline in their usual case)
    if type(kernel) is not int or kernel != STATE_VERSION:
        if type(kernel) is int:
            check_rules(kernel, run_id)
        if kernel not in range(1, STATE_VERSION + 1):
            raise ValueError(f"unknown kernel version {kernel!r} (this kernel knows 1 to {STATE_VERSION})")
    if seed is not None:
        check_seed(seed)
    hit = _PROGRAMS.get(id(plan))
    program = hit[1] if hit is not None and hit[0] is plan else prepare(plan)
    if program.continues and kernel < CONTINUE_RULES:
        raise ValueError(f"run {run_id!r}: step {min(program.continues)!r} has 'on_failure: continue', which kernel "
                         f"rules {CONTINUE_RULES} brought; the run was to start under rules {kernel} (a worker "
                         f"started with --rules {kernel}: start it under {CONTINUE_RULES} or later)")
    if program.waits and kernel < WAIT_RULES:
        raise ValueError(f"run {run_id!r}: node {min(program.waits)!r} is a wait, which kernel rules {WAIT_RULES} "
                         f"brought; the run was to start under rules {kernel} (a worker started with --rules "
                         f"{kernel}: start it under {WAIT_RULES} or later)")
    if program.keyed and kernel < KEY_RULES:
        wait = program.signals[min(program.keyed)]
        raise ValueError(f"run {run_id!r}: wait {wait!r} is keyed, which kernel rules {KEY_RULES} brought; the run "
                         f"was to start under rules {kernel} (a worker started with --rules {kernel}: start it under "
                         f"{KEY_RULES} or later)")
    if type(at) is not int:
        at = _time(at)
    if seed is None:
        seed = int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:4], "big")
    state = RunState(_NEW_STATE)  # (copied, then what is the run's own set: one statement per key)
    state["kernel"] = kernel
    state["run_id"] = run_id
    state["flow"] = program.flow.get("name")
    state["seed"] = seed
    state["input"] = input
    state["started_at"] = at
    state["nodes"] = {}
    state["iterations"] = {}
    state["tasks"] = {}
    state["timers"] = {}
    state["compensations"] = {}
    state["compensated"] = []
    if kernel >= 2:
        state["late_completions"] = []  # (its presence turns the rule on: a version-1 state has none)
    machine = Machine(program, state, at)
    machine.start()
    return Decision(state, machine.commands, machine.events)


def apply(plan: Plan, state: dict[str, Any], event: dict[str, Any]) -> Decision:
    """Apply one input event (docs/kernel.md, "Input events") to a run state.

    The state is updated **in place** and returned as ``Decision.state`` (copy
    it first to keep the old one: ``copy.deepcopy`` or a JSON round trip).
    Commands and events share data with the state: treat them as read-only.
    A result for a task that is not in flight (a stale attempt, a run already
    over) is rejected with a ``result_rejected`` event and changes nothing
    else — except a *late completion* (a success of a compensable step the run
    recorded as cancelled, failed or timed out; under rules 7 also of an attempt
    given up on, of a step whose undo has begun), which is also recorded and
    makes the run end, or be at once, ``needs_intervention`` (docs/kernel.md,
    "Late completions"); a timer that is no longer armed is ignored. A state of newer rules than
    :data:`STATE_VERSION` raises :class:`NewerVersion` and is left unchanged.
    """
    # (the checks of check_rules, prepare and _time, inline for their usual case: apply runs once per event)
    rules = state.get("kernel", 1)
    if type(rules) is not int or rules > STATE_VERSION:
        check_rules(rules, state.get("run_id"))
    hit = _PROGRAMS.get(id(plan))
    program = hit[1] if hit is not None and hit[0] is plan else prepare(plan)
    at = event.get("at")
    if type(at) is not int:
        at = _time(at)
    if event.get("type") == "task_succeeded":  # the straight line first: no Machine for a chained step
        decided = chain_step(program, state, event, at)
        if decided is not None:
            return decided
    machine = Machine(program, state, at)
    machine.handle(event)
    return Decision(state, machine.commands, machine.events, machine.ended)


def start_event(run_id: str, input: dict[str, Any], *, at: int | float, seed: int | None = None) -> dict[str, Any]:
    """The ``start`` input event a runtime records so that :func:`replay` can restart the run (``kernel``: the
    rules' version it starts under; a start recorded without it is version 1's)."""
    return {"type": "start", "run_id": run_id, "input": input, "at": at, "seed": seed, "kernel": STATE_VERSION}


def replay(plan: Plan, input_events: Iterable[dict[str, Any]]
           ) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Re-run recorded input events (a ``start`` event first) and return the final state and every
    command and event, in order — identical to what the original run produced."""
    events = iter(input_events)
    first = next(events, None)
    if first is None or first.get("type") != "start":
        raise ValueError("replay needs the run's 'start' event first")
    d = start_run(plan, first["run_id"], copy.deepcopy(first["input"]), at=first["at"], seed=first.get("seed"),
                  kernel=first.get("kernel", 1))
    commands, emitted = list(d.commands), list(d.events)
    state = d.state
    for event in events:
        d = apply(plan, state, event)
        commands.extend(d.commands)
        emitted.extend(d.events)
    return state, commands, emitted


def summary(plan: Plan, state: dict[str, Any]) -> dict[str, Any]:
    """What a person (or the CLI) wants to know about a run.

    ``steps`` maps every node instance (groups included; nodes never reached
    outside for_each bodies as ``pending``) to its kind, status, attempts,
    start and finish times and last error, in plan order; ``compensated`` lists
    the steps undone, in the order they were undone.
    """
    program = prepare(plan)
    nodes: dict[str, dict[str, Any]] = state["nodes"]
    comps: dict[str, dict[str, Any]] = state["compensations"]
    rows: list[tuple[list[int], str, dict[str, Any]]] = []
    for ikey, rec in nodes.items():
        row = {"node": rec["node"], "kind": program.kind[rec["node"]], "status": rec["status"],
               "attempts": rec.get("attempts", 0), "started_at": rec["started_at"],
               "finished_at": rec["finished_at"], "error": rec["error"]}
        if rec["node"] in program.waits:  # the signal it takes, null for a timer; a keyed one's key, once it has one
            row["signal"] = program.nodes[rec["node"]].get("signal")
            if "key" in rec:
                row["key"] = rec["key"]
        if ikey in comps:
            c = comps[ikey]
            row["compensation"] = {"status": c["status"], "attempts": c["attempt"], "error": c["error"]}
        if "continued" in rec:  # failed, and passed over (on_failure: continue)
            row["continued"] = True
            if "late_undo" in rec:  # an attempt the run had given up on succeeded afterwards: its effect stands
                row["completed_late"] = True
        rows.append((_sort_key(program, state, ikey), ikey, row))
    reached = {rec["node"] for rec in nodes.values()}
    for key in program.nodes:
        if key not in reached and not _in_loop(program, key):
            row = {"node": key, "kind": program.kind[key], "status": "pending", "attempts": 0, "started_at": None,
                   "finished_at": None, "error": None}
            if key in program.waits:
                row["signal"] = program.nodes[key].get("signal")
            rows.append(([program.order[key]], key, row))
    rows.sort(key=lambda r: (r[0], r[1]))
    return {
        "run_id": state["run_id"], "flow": state["flow"], "status": state["status"],
        "started_at": state["started_at"], "finished_at": state["finished_at"], "error": state["error"],
        "failed_step": state["failed_step"], "steps": {ikey: row for _, ikey, row in rows},
        "compensated": list(state["compensated"]), "intervention": state["intervention"],
        "context": state["context"],
    }


def left_to_undo(plan: Plan, state: dict[str, Any]) -> list[dict[str, Any]]:
    """What undoing a run that stops now would leave undone: every completed step with a compensation not yet
    undone, in the order to undo it, each as ``state["intervention"]["steps"]`` lists it, then every compensable
    step with an attempt still in flight (``in_flight``: it may have completed) (docs/kernel.md).

    For a runtime that stops a run at once (its process aborted, mid-run or mid-compensation); read-only.
    """
    return Machine(prepare(plan), state, 0).left_to_undo()


def in_doubt(plan: Plan, state: dict[str, Any], steps: Iterable[str]) -> list[dict[str, Any]]:
    """Each of ``steps`` (instance keys of compensable steps) as :func:`left_to_undo` lists a step with an attempt
    in flight: ``status: in_flight``, ``attempts: 0``, the ``reason`` it gives, ``step_result`` null and the
    ``input`` built from the context the step saw (its result is not known).

    For a runtime that knows an attempt of the step is still running although the kernel has given up on it (a
    sync worker's thread, after the attempt timed out) and stops waiting for its answer: the step may have
    completed. Read-only; changes no decision (the runtime says so itself, docs/runtime.md).
    """
    machine = Machine(prepare(plan), state, 0)
    return [machine.in_flight_item(step) for step in steps]


def _sort_key(program: Program, state: dict[str, Any], ikey: str) -> list[int]:
    rec = state["nodes"][ikey]
    tail = [program.order[rec["node"]]]
    iteration = rec["iter"]
    while iteration:
        it = state["iterations"][iteration]
        tail = [program.order[state["nodes"][it["fe"]]["node"]], it["index"], *tail]
        iteration = it["iter"]
    return tail


def _in_loop(program: Program, key: str) -> bool:
    scope = program.scope[key]
    while scope is not None:
        if program.kind[scope] == "for_each":
            return True
        scope = program.scope[scope]
    return False


def _time(at: Any) -> int | float:
    if isinstance(at, bool) or not isinstance(at, (int, float)) or (isinstance(at, float) and not at.is_integer()):
        raise ValueError(f"'at' must be whole milliseconds since the Unix epoch (an integer), found {at!r}")
    return at
