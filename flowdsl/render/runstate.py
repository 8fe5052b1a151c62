"""Run states for diagrams: each plan node's state in one run, derived from the run's events.

Stage: renderer. Reads the plan and a run's recorded events (JSON lines as the
kernel emits them, see docs/kernel.md); imports stdlib and the record reader
``flowdsl.runtime.record`` (stdlib only itself), which owns the record format.

An event is a flat JSON object with a ``type``, the ``step`` it concerns (an
instance key: the node key, prefixed by ``<for_each instance key>[<i>]/`` for
each enclosing iteration) and, when the kernel knows it, the plan ``node`` key.
Records also hold the input events fed to the kernel (``task_succeeded``, ...,
without a ``step``) and may end with a ``runtime_aborted`` line; both are
understood or ignored. A step's state is its last event's: an attempt that
failed and is retried is running again.
Iterations of a for_each body step aggregate onto the body step's node: the
worst state wins (failed, then cancelled, running, waiting, passed over, compensated,
succeeded, skipped, pending). A step that failed and that the run went on without (``on_failure: continue``,
its ``step_failed`` event ``continued``) is ``passed_over``. A wait node that has started and not ended (it
waits for its signal or its timer) is ``waiting``; a group holding one is ``running``. The signal events
(``signal_received``, ``signal_buffered``, ``signal_rejected``) change no state: the wait's own ``step_*``
events do.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowdsl.render.view import STATES, PlanView, RenderError
from flowdsl.runtime.record import RecordError, read_record

#: event type -> the state of the step instance it leaves behind
STEP_EVENTS = {
    "step_scheduled": "running", "step_started": "running", "attempt_started": "running", "step_retrying": "running",
    "fallback_started": "running", "step_succeeded": "succeeded", "step_failed": "failed",
    "step_timed_out": "failed", "step_skipped": "skipped", "step_cancelled": "cancelled",
}
#: event type -> the state of the instance's compensation
COMPENSATION_EVENTS = {
    "compensation_started": "running", "compensation_retrying": "running",
    "compensation_succeeded": "compensated", "compensation_failed": "failed",
}
#: aggregation order over iterations: the first state present wins
_PRIORITY = ("failed", "cancelled", "running", "waiting", "passed_over", "compensated", "succeeded", "skipped",
             "pending")
_ITERATION = re.compile(r"\[\d+\]")


@dataclass(frozen=True)
class RunStates:
    """The state of every node of a plan in one run.

    ``steps`` maps each node key to one of :data:`flowdsl.render.view.STATES`;
    ``undos`` maps a compensated step's key to the state of its compensation
    (running, compensated when it succeeded, failed); ``status`` is the run's end status (or
    ``running``), ``iterations`` counts for_each instances per node.
    """

    steps: dict[str, str]
    undos: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None
    status: str | None = None
    iterations: dict[str, int] = field(default_factory=dict)

    def state_of(self, key: str, *, wait: bool = False) -> str:
        """The state node ``key`` is drawn in (``pending`` when none is given); a wait node (``wait``)
        given as ``running`` is drawn ``waiting``."""
        state = self.steps.get(key, "pending")
        return "waiting" if wait and state == "running" else state

    def legend(self, waits: bool) -> tuple[str, ...]:
        """The states a legend lists, in :data:`~flowdsl.render.view.STATES` order: all of them, ``waiting``
        only for a plan with wait nodes (``waits``) or when a node is given that state."""
        return tuple(s for s in STATES if s != "waiting" or waits or "waiting" in self.steps.values())

    def caption(self) -> str:
        """``run r-1: compensated`` — the legend's title."""
        name = f"run {self.run_id}" if self.run_id else "run"
        return f"{name}: {self.status}" if self.status else name

    @classmethod
    def of(cls, value: RunStates | Mapping[str, str] | None) -> RunStates | None:
        """Accept either a RunStates or a plain ``{node key: state}`` mapping."""
        if value is None or isinstance(value, RunStates):
            return value
        bad = sorted({str(s) for s in value.values() if s not in STATES})
        if bad:
            raise ValueError(f"unknown run state(s) {', '.join(bad)}; expected one of {', '.join(STATES)}")
        return cls(steps=dict(value))


def node_of(step: str, keys: Iterable[str] | Mapping[str, Any]) -> str | None:
    """The plan node key of an instance key: ``charge_lines[2]/charge_line`` -> ``charge_line``."""
    known = keys if isinstance(keys, Mapping) else set(keys)
    if step in known:
        return step
    bare = _ITERATION.sub("", step)
    if bare in known:
        return bare
    parts = bare.split("/")
    for i in range(1, len(parts)):
        candidate = "/".join(parts[i:])
        if candidate in known:
            return candidate
    return None


def derive_states(plan: Mapping[str, Any], events: Iterable[Mapping[str, Any]]) -> RunStates:
    """Each node's state after ``events`` (in the order recorded); nodes without events are pending."""
    view = PlanView(plan)
    keys = set(view.nodes)
    instances: dict[str, dict[str, str]] = {}  # node key -> instance key -> state
    undo_instances: dict[str, dict[str, str]] = {}
    run_id: str | None = None
    status: str | None = None
    for ev in events:
        kind = ev.get("type")
        if run_id is None and ev.get("run_id"):
            run_id = str(ev["run_id"])
        if kind == "run_started":
            status = "running"
        elif kind == "run_finished":
            status = str(ev.get("status") or "finished")
        elif kind == "runtime_aborted":  # the local runtime stopped without finishing the run
            status = "aborted"
        elif kind == "runtime_resumed":  # ... and another process took it up again (flowdsl resume)
            status = "running"
        step = ev.get("step")
        if not isinstance(step, str):
            continue
        node = ev.get("node") if ev.get("node") in keys else node_of(step, keys)
        if node is None:
            continue
        if kind in STEP_EVENTS:  # (a step that failed and that the run went on without: on_failure: continue)
            instances.setdefault(node, {})[step] = "passed_over" if ev.get("continued") else STEP_EVENTS[kind]
        elif kind in COMPENSATION_EVENTS:
            undo_instances.setdefault(node, {})[step] = COMPENSATION_EVENTS[kind]
            if kind == "compensation_succeeded":
                instances.setdefault(node, {})[step] = "compensated"
    if status not in (None, "running"):  # the kernel settles what was still running as cancelled
        for states in instances.values():
            for inst, state in states.items():
                if state == "running":
                    states[inst] = "cancelled"
    steps: dict[str, str] = {}
    counts: dict[str, int] = {}
    for key in view.all_keys():
        states = instances.get(key, {})
        steps[key] = _worst(states.values())
        if steps[key] == "running" and view.kind(key) == "wait":
            steps[key] = "waiting"
        if view.node(key).get("scope") is not None and len(states) > 1:
            counts[key] = len(states)
    for key in reversed(view.all_keys()):  # groups without events of their own take their children's (inner first)
        if key not in instances and not view.is_leaf(key):
            kids = ["running" if steps[k] == "waiting" else steps[k] for k in view.children(key)]
            steps[key] = _worst(kids) if any(s != "pending" for s in kids) else "pending"
    undos = {key: _undo_worst(states.values()) for key, states in sorted(undo_instances.items())}
    return RunStates(steps=steps, undos=undos, run_id=run_id, status=status, iterations=counts)


def check_run_of(plan: Mapping[str, Any], events: Sequence[Mapping[str, Any]], *, source: str,
                 recorded_flow: str | None = None) -> None:
    """Refuse events that are not a run of ``plan``'s flow, with a :class:`RenderError` saying why.

    ``source`` names where the events came from (a file, a run id), for the message;
    ``recorded_flow`` is the flow name a run record's header gives, when it has one. Refused:
    no events at all; a run of a flow of another name (the record's header, or the
    ``run_started`` event, says which); events most of whose step names the plan does not know.
    A run of the same flow whose spec has changed since is accepted (the caller may warn).
    """
    view = PlanView(plan)
    name = str(view.flow.get("name") or "flow")
    if not events:
        raise RenderError(f"{source} holds no events: there is no run to draw")
    started = next((ev.get("flow") for ev in events if ev.get("type") == "run_started"), None)
    flow = recorded_flow if recorded_flow is not None else started
    if flow is not None and str(flow) != name:
        raise RenderError(f"{source} is a run of flow '{flow}', not of '{name}' (the spec drawn): "
                          f"draw it with the spec of '{flow}'")
    keys = set(view.nodes)
    steps = {str(ev["step"]): ev.get("node") for ev in events if isinstance(ev.get("step"), str)}
    unknown = sorted(s for s, node in steps.items() if node not in keys and node_of(s, keys) is None)
    if not steps and started is None:
        raise RenderError(f"{source} holds no run events of flow '{name}' (no run_started, no step events)")
    if unknown and 2 * len(unknown) > len(steps):
        shown = ", ".join(unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        raise RenderError(f"{source} is not a run of flow '{name}': {len(unknown)} of the {len(steps)} steps "
                          f"it names are not in it ({shown}); "
                          + ("it is a run of another flow" if flow is None else
                             f"it is a run of a flow also named '{flow}' whose steps differ"))


def _worst(states: Iterable[str]) -> str:
    present = set(states)
    for state in _PRIORITY:
        if state in present:
            return state
    return "pending"


def _undo_worst(states: Iterable[str]) -> str:
    present = set(states)
    for state in ("failed", "running", "compensated"):
        if state in present:
            return state
    return "running"


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """The events of a run record (``.jsonl``), its header line left out."""
    return read_record(path)[1]


def record_plan(path: str | Path) -> dict[str, Any] | None:
    """The plan stored in a run record's header line, when it has one."""
    try:
        header = read_record(path)[0]
    except RecordError:
        return None
    plan = header.get("plan") if header else None
    return plan if isinstance(plan, dict) else None
