"""A run's outcome for people and programs: the result object, the live view, the summary, timelines.

Stage: runtime (shared by every backend and the CLI). Imports the kernel's
``summary``/``replay`` and stdlib at import time; rich only inside the
functions that draw (so ``flowdsl --help`` and library use stay light).

- :class:`RunResult` — what a runtime returns (and what ``--format json`` prints,
  via :meth:`RunResult.to_json`); :func:`result_from_record` rebuilds one from a
  run record by replaying its input events through the kernel.
- :class:`LiveView` — the progress shown while a run goes: a rich ``Live`` table on
  stderr when stderr is a terminal, plain progress lines otherwise.
- :func:`print_summary` — the end summary: per-step status, attempts and duration,
  what was compensated in which order, wall time against the sum of step times,
  and the measured critical path.
- :func:`print_timeline` — ``flowdsl show``: a recorded run, event by event.

Every piece of text these show that flowdsl did not write — error messages of workers and of the services
behind them, reasons, names read from a record, model replies — goes through ``_esc``: on one line, its
control characters written as JSON writes them (``\\n``, ESC as ``\\u001b``: ``flowdsl.shown.visible``), rich
markup escaped, emoji codes left alone. A message that spans lines is shown on one, ``\\n`` between its lines;
``--format json`` and the record keep it exact.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowdsl.kernel import END_STATES, INPUT_EVENTS, LLM_NOT_CONFIGURED, in_doubt, left_to_undo, replay, summary

__all__ = [
    "EXIT_CODES",
    "NOT_STARTED",
    "LiveView",
    "RunResult",
    "attempt_label",
    "critical_path",
    "exit_code",
    "fallback_reason",
    "fallback_text",
    "in_doubt_items",
    "in_doubt_notice",
    "is_undo_attempt",
    "late_answer_effect",
    "left_to_undo_text",
    "llm_calls_of",
    "may_answer_late",
    "may_complete_late",
    "may_undo_late",
    "print_summary",
    "print_timeline",
    "record_end_note",
    "result_from_record",
    "stopped_at_once",
    "stopped_waiting",
    "stopped_while",
    "timed_out_attempts",
    "timing",
    "undo_begun",
]

#: exit code of ``flowdsl run`` by end state (2 is a rejected spec, input or usage)
EXIT_CODES = {"completed": 0, "failed": 1, "compensated": 1, "cancelled": 1, "needs_intervention": 4}
#: the status of a run that never started: a record holding only its header, a run aborted before its start
NOT_STARTED = "not_started"
STEP_KINDS = ("task", "llm")
_STYLE = {"completed": "green", "succeeded": "green", "compensated": "yellow", "cancelled": "yellow",
          "failed": "red", "needs_intervention": "bold red", "running": "cyan", "retrying": "cyan",
          "cancelling": "yellow", "skipped": "dim", "pending": "dim", "aborting": "yellow",
          "compensating": "yellow", "done": "yellow"}
_MARK = {"succeeded": "✓", "failed": "✗", "skipped": "–", "cancelled": "⊘", "running": "…", "retrying": "↻",
         "pending": "·", "cancelling": "⊘"}
_MAX_ROWS = 40


def exit_code(status: str) -> int:
    """By the end state alone: 0 completed; 1 failed, compensated or cancelled; 4 needs_intervention (anything
    else: 1). A run's own code is :attr:`RunResult.exit_code`: 4 also when a step is in doubt."""
    return EXIT_CODES.get(status, 1)


_WHILE = {"starting": "as it started", "not_started": "before it started", "running": "while it ran",
          "aborting": "while cancelling its steps in flight (before undoing any)",
          "compensating": "while compensating (undoing the steps that completed)"}


def stopped_while(status: str) -> str:
    """When, in words, a run stopped at once (aborted) in state ``status`` stopped: ``while it ran``…"""
    return _WHILE.get(status, f"while {status}")


@dataclass
class RunResult:
    """The outcome of one run.

    ``steps`` maps every node instance (groups too; see ``kernel.summary``) to
    ``{node, kind, status, attempts, started_at, finished_at, error}`` plus
    ``compensation`` for the steps that were undone or tried to be; times are
    milliseconds since the epoch. ``compensated`` lists the instances undone, in
    the order they were undone. ``events`` is every event the kernel emitted.
    ``intervention`` is what is left to undo by hand (``{"steps": [...]}``, docs/kernel.md): after
    ``needs_intervention``, and for a run stopped at once (``RunAborted.result``, or the record of an aborted run),
    whose status is then the state it stopped in, and ``aborted`` why it was stopped (None for a run not stopped
    at once): :meth:`to_json` then gives ``status`` ``"aborted"`` (as ``flowdsl run --format json`` says of it) and
    the state it stopped in as ``stopped_in``.
    ``llm_calls`` maps an LLM step's instance key to its model calls, in order,
    gathered from the events' ``meta.llm`` (see :func:`llm_calls_of`). ``wall_ms``
    is the runtime's own measure of the run. ``record_error`` says why the run's
    record is incomplete — writing it failed (a full disk) and the run went on
    unrecorded — and is None when the record holds the whole run (or there is none).
    ``in_doubt`` lists the steps whose outcome is unknown: an attempt of a compensable step that the run gave up on
    (it timed out) was still running when the runtime stopped waiting for its answer after the run's end (the
    local runtime's ``late_grace``, docs/runtime.md), so it may have completed — each as ``intervention`` lists a
    step (``status: in_flight``, a ``reason``, plus ``task_ids``), to check and, if it took effect, undo by hand;
    or an attempt of an undo that failed for good was still running, so the step may be undone already — its
    ``intervention`` entry with ``undo_in_doubt`` true, to check before undoing the step by hand. It makes
    ``exit_code`` 4.
    """

    run_id: str
    flow: str | None
    status: str
    context: dict[str, Any]
    steps: dict[str, dict[str, Any]]
    compensated: list[str]
    events: list[dict[str, Any]]
    error: dict[str, Any] | None = None
    failed_step: str | None = None
    intervention: dict[str, Any] | None = None
    started_at: int | None = None
    finished_at: int | None = None
    wall_ms: float | None = None
    record_path: Path | None = None
    llm_calls: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    record_error: str | None = None
    in_doubt: list[dict[str, Any]] = field(default_factory=list)
    plan: dict[str, Any] = field(default_factory=dict, repr=False)
    state: dict[str, Any] = field(default_factory=dict, repr=False)
    #: why the run was stopped at once (its ``runtime_aborted`` reason), or None
    aborted: str | None = None
    #: (a local record that ends before its run did) why the run crashed — ``its process (pid 42 on web-1) is
    #: gone`` (``flowdsl.runtime.stopped``) —, or None; like ``aborted``, with ``intervention`` what is left to undo
    crashed: str | None = None

    @classmethod
    def from_state(cls, plan: dict[str, Any], state: dict[str, Any], events: list[dict[str, Any]], *,
                   wall_ms: float | None = None, record_path: Path | None = None,
                   llm_calls: dict[str, list[dict[str, Any]]] | None = None,
                   record_error: str | None = None) -> RunResult:
        """The result of a run as its kernel ``state`` stands (ended or not), with the ``events`` it emitted;
        ``llm_calls`` default to those the events carry."""
        s = summary(plan, state)
        llm_calls = llm_calls or llm_calls_of(events)
        return cls(run_id=s["run_id"], flow=s["flow"], status=s["status"], context=s["context"] or {},
                   steps=s["steps"], compensated=s["compensated"], events=events, error=s["error"],
                   failed_step=s["failed_step"], intervention=s["intervention"], started_at=s["started_at"],
                   finished_at=s["finished_at"], wall_ms=wall_ms, record_path=record_path,
                   llm_calls=llm_calls, record_error=record_error, plan=plan, state=state)

    def __repr__(self) -> str:
        # short on purpose: asyncio formats a finished task's result (signal.getsignal does, on every
        # asyncio.run in Python 3.11), and the full events list of a large run takes milliseconds
        return (f"RunResult(run_id={self.run_id!r}, status={self.status!r}, steps={len(self.steps)}, "
                f"events={len(self.events)})")

    @property
    def ok(self) -> bool:
        """Whether the run completed (every other end, and a run not ended, is not ok)."""
        return self.status == "completed"

    @property
    def exit_code(self) -> int:
        """As :func:`exit_code` of the status; 4 (a person must look) when a step's outcome is in doubt."""
        return EXIT_CODES["needs_intervention"] if self.in_doubt else exit_code(self.status)

    def to_json(self) -> dict[str, Any]:
        """The ``--format json`` object: ``run_id``, ``status``, ``context``, ``steps``, ``compensated``,
        ``events``, plus ``flow``, ``error``, ``failed_step``, ``intervention``, ``in_doubt``, times, ``timing``,
        ``record`` and ``record_error``. ``context`` is the final context, null while the run has not ended (a record
        that ends early, a Redis run still going): the kernel sets it when the run ends. A run stopped at once
        (``aborted``) has ``status`` ``"aborted"``, ``stopped_in`` the state it stopped in and ``aborted`` the
        reason; its ``intervention`` lists what is left to undo by hand. So does a run whose process is gone
        (``crashed``): ``status`` ``"crashed"``, ``stopped_in``, and ``crashed`` saying which process."""
        steps = {}
        for key, row in self.steps.items():
            item = {"status": row["status"], "attempts": row["attempts"], "started_at": row["started_at"],
                    "finished_at": row["finished_at"], "error": row["error"], "kind": row["kind"],
                    "node": row["node"]}
            if "compensation" in row:
                item["compensation"] = row["compensation"]
            steps[key] = item
        stopped = {"stopped_in": self.status, "aborted": self.aborted} if self.aborted is not None else \
            {"stopped_in": self.status, "crashed": self.crashed} if self.crashed is not None else {}
        said = "aborted" if self.aborted is not None else "crashed" if stopped else self.status
        return {
            "run_id": self.run_id, "flow": self.flow, "status": said, **stopped,
            "error": self.error,
            "failed_step": self.failed_step, "context": self.context if self.status in END_STATES else None,
            "steps": steps,
            "compensated": self.compensated, "intervention": self.intervention, "in_doubt": self.in_doubt,
            "started_at": self.started_at, "finished_at": self.finished_at, "timing": timing(self),
            "record": str(self.record_path) if self.record_path else None, "record_error": self.record_error,
            "events": self.events,
        }


def result_from_record(header: Mapping[str, Any] | None, lines: list[dict[str, Any]],
                       path: Path | None = None) -> RunResult:
    """Rebuild a run's result from its record: replay the recorded input events through the kernel.

    The emitted events are the recorded ones. A record holding no input event
    (only its header: the run had not started, or nothing more could be written)
    gives a run of status :data:`NOT_STARTED`, every step pending. A record
    without a plan in its header, or whose input events do not begin with the
    ``start`` line, raises ``ValueError``; so does a line the replay does not
    explain (a ``RecordError`` naming its line when ``lines`` came from
    ``read_record``): of a type flowdsl does not write, or an emitted event
    other than the kernel's at its ``seq``.
    """
    from flowdsl.runtime.plancheck import checked_problem

    if header is None or "plan" not in header:
        raise ValueError("the record has no header with the run's plan")
    problem = checked_problem(header["plan"])  # (once: read_record's check of the same header is remembered)
    if problem is not None:
        raise ValueError(f"the record header's 'plan' is not a flowdsl execution plan: {problem}")
    plan = dict(header["plan"])
    inputs = [e for e in lines if e.get("type") in ("start", *INPUT_EVENTS)]
    if not inputs:
        _check_events(lines, [], path)
        return _not_started(plan, header, path)
    if inputs[0].get("type") != "start":
        raise ValueError("the record has no 'start' event")
    first = inputs[0]
    if not isinstance(first.get("run_id"), str) or not isinstance(first.get("input"), dict) \
            or not isinstance(first.get("at"), int | float) or isinstance(first.get("at"), bool):
        raise ValueError("the record's 'start' event is malformed: it needs 'run_id' (a string), 'input' (an "
                         "object) and 'at' (a time in milliseconds)")
    if "run_id" in header and header["run_id"] != first["run_id"]:
        raise ValueError(f"the record's header is of run {header.get('run_id')!r} but its 'start' event of run "
                         f"{first['run_id']!r}; {_CHANGED}")
    try:
        state, _, replayed = replay(plan, inputs)
    except Exception as exc:  # a record edited by hand, or made by another version: say so, never a traceback
        raise ValueError(f"the recorded events do not replay through the kernel ({type(exc).__name__}: {exc}); "
                         "the record was changed after it was written, or was made by another version") from None
    _check_events(lines, replayed, path)
    emitted = [e for e in lines if "seq" in e]
    wall = None
    if state.get("finished_at") is not None:
        wall = float(state["finished_at"] - state["started_at"])
    result = RunResult.from_state(plan, state, emitted, wall_ms=wall, record_path=path)
    aborted = next((e for e in lines if e.get("type") == "runtime_aborted"), None)
    if result.status not in END_STATES and aborted is not None:
        result.intervention = {"steps": left_to_undo(plan, state)}  # stopped at once: what it left undone
        result.aborted = str(aborted.get("reason") or "stopped at once")
    result.in_doubt = _in_doubt_of_record(plan, state, lines, emitted, path)
    failed = lines[-1] if lines and lines[-1].get("type") == "record_failed" else None
    if failed is not None:  # writing it failed there, and the run went on unrecorded: as the run itself said
        result.record_error = (f"writing the record failed ({failed.get('reason')}); it stops there and the run went "
                               "on unrecorded")
    return result


#: seconds a run's end is awaited, by default, for attempts it gave up on (they timed out) that still run and may
#: still complete a compensable step (``late_grace``; ``$FLOWDSL_LATE_GRACE`` overrides it): the local runtime holds
#: the run's end for them, and following a Redis run waits for them
LATE_GRACE = 30.0
_LATE_GRACE_MAX = 365 * 86400.0


def late_grace_seconds(value: float | None) -> float:
    """The ``late_grace`` option checked, in seconds: ``value``, else ``$FLOWDSL_LATE_GRACE``, else
    :data:`LATE_GRACE`; a ``ValueError`` (``TypeError``) saying what is wrong with it."""
    where = "late_grace"
    if value is None:
        text = os.environ.get("FLOWDSL_LATE_GRACE", "").strip()
        if not text:
            return LATE_GRACE
        where = "$FLOWDSL_LATE_GRACE"
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"$FLOWDSL_LATE_GRACE must be a number of seconds, 0 to {_LATE_GRACE_MAX:.0f} (365 "
                             f"days); got {text!r}") from None
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"late_grace must be a number of seconds or None; got {type(value).__name__}")
    if not (math.isfinite(value) and 0 <= value <= _LATE_GRACE_MAX):
        raise ValueError(f"{where} must be a number of seconds, 0 to {_LATE_GRACE_MAX:.0f} (365 days); got {value!r}")
    return float(value)


#: record lines that are neither kernel input nor emitted by the kernel: a hard stop; the local runtime's wait, after
#: the run's end, for attempts the run gave up on, and its end (docs/runtime.md, "Run records")
RUNTIME_LINES = ("runtime_aborted", "runtime_waiting", "runtime_waited", "record_failed")
#: why the runtime stopped waiting, in a record whose wait has no end (its process stopped during the wait)
_WAIT_CUT = "the record ends during the wait: its process stopped"


def may_complete_late(plan: Mapping[str, Any], state: Mapping[str, Any], step: str, *, any_end: bool = False) -> bool:
    """Whether a success, now, of an attempt of ``step`` that the run gave up on would be a late completion
    (docs/kernel.md, "Late completions"): the step has a compensation, has no late completion yet, the run is under
    rules that have them, and the step ended ``failed`` or ``cancelled`` — or (rules 7) its undo has begun (it
    succeeded, or a late success of it joined the saga, and its compensation was dispatched: a success now would
    complete it again, after its undo). What the local runtime waits for after the run's end. ``any_end``: whatever
    the step's status short of ``succeeded`` (a run stopped at once, which hears nothing more: such a success would
    have an effect nobody undoes)."""
    rec = state["nodes"].get(step)
    if rec is None or "late_completions" not in state:
        return False
    if rec["status"] == "succeeded" or "late_undo" in rec:
        # (before its undo began, a success of an attempt given up on is the same effect, undone with the step's)
        if not undo_begun(state, step):
            return False
    elif rec["status"] not in ("failed", "cancelled") and not any_end:
        return False
    if not (plan["nodes"].get(rec["node"]) or {}).get("compensate"):
        return False
    return all(entry["step"] != step for entry in state["late_completions"])


def undo_begun(state: Mapping[str, Any], step: str) -> bool:
    """Whether ``step``'s undo has begun (its compensation dispatched) under kernel rules 7 or later, which take a
    success of an attempt the run gave up on after that as a late completion: the step completed again after its
    undo (docs/kernel.md, "Late completions")."""
    comp = (state.get("compensations") or {}).get(step)
    return state.get("kernel", 1) >= 7 and comp is not None and comp["attempt"] >= 1


def late_completion_line(e: Mapping[str, Any], *, with_run_status: bool = False) -> str:
    """A ``late_completion`` event as the run display and ``show`` say it (markup): undone in the saga (kernel
    version 4, ``by_hand`` false) or left to run by hand."""
    step = _esc(e.get("step"))
    where = f", run {_esc(e.get('run_status'))}" if with_run_status else ""
    head = f"(attempt {_esc(e.get('attempt'))}{where})"
    if e.get("after_undo"):  # (kernel version 7)
        return (f"[bold red]! {step} completed again after it was undone[/] {head}: its effect stands; "
                f"{_esc(e.get('compensation'))} left to run again by hand")
    if e.get("by_hand", True):
        return (f"[bold red]! {step} completed late[/] {head}: its effect stands; {_esc(e.get('compensation'))} "
                "left to run by hand")
    return f"[yellow]! {step} completed late[/] {head}: undone with the rest by {_esc(e.get('compensation'))}"


def may_undo_late(state: Mapping[str, Any], step: str) -> bool:
    """Whether a success, now, of an attempt of ``step``'s compensation that the run gave up on (it timed out) would
    still be taken: the compensation failed for good, under kernel rules version 5 or later, which then count the step
    undone (docs/kernel.md, "Late completions")."""
    comp = (state.get("compensations") or {}).get(step)
    return state.get("kernel", 1) >= 5 and comp is not None and comp["status"] == "failed"


def is_undo_attempt(task_id: str) -> bool:
    """Whether ``task_id`` is a compensation attempt's (``<run>/<step>#c<n>``)."""
    return task_id.rpartition("#")[2].startswith("c")


def may_answer_late(plan: Mapping[str, Any], state: Mapping[str, Any], attempt: Mapping[str, Any], *,
                    any_end: bool = False) -> bool:
    """Whether the answer of ``attempt`` (``{task_id, step, …}``), which the run gave up on, may still change what the
    run says: a step attempt's success a late completion (:func:`may_complete_late`, ``any_end`` as there), an undo
    attempt's success the step undone (:func:`may_undo_late`: its undo failed for good — or, in a run stopped at
    once, ``any_end``, waits to retry: what it leaves to undo by hand lists the step as failed, not in flight).
    What runtimes wait for after the run's end, and say is in doubt."""
    if is_undo_attempt(attempt["task_id"]):
        comp = (state.get("compensations") or {}).get(attempt["step"])
        return may_undo_late(state, attempt["step"]) or (
            any_end and comp is not None and comp["status"] == "retrying")
    return may_complete_late(plan, state, attempt["step"], any_end=any_end)


def in_doubt_notice(reason: str, items: Iterable[Mapping[str, Any]]) -> str:
    """The notice of a wait for late answers that stopped (``reason``) with ``items`` in doubt
    (:func:`in_doubt_items`): for steps, what they did is unknown — undo them by hand if they took effect; for undos
    (``undo_in_doubt``), whether they ran is unknown — check before undoing their step by hand."""
    items = list(items)
    steps = ", ".join(i["step"] for i in items if not i.get("undo_in_doubt"))
    undos = ", ".join(f"{i['step']} ({i['worker']})" for i in items if i.get("undo_in_doubt"))
    said = []
    if steps:
        said.append(f"what {steps} did is unknown — it may have completed; check it, and undo it by hand if it did")
    if undos:
        said.append(f"whether the undo of {undos} ran is unknown — it may have; check before undoing by hand")
    return f"stopped waiting ({reason}): " + "; ".join(said)


def late_answer_effect(attempts: Iterable[Mapping[str, Any]]) -> str:
    """What the answer of the attempts waited for after the run's end would do, for the notice of the wait: ``if it
    completed, its effect must be undone`` (a step's), ``if an undo completed, its step is undone`` (an undo's)."""
    kinds = {is_undo_attempt(a["task_id"]) for a in attempts}
    return " and ".join(w for w, k in (("if it completed, its effect must be undone", False),
                                       ("if an undo completed, its step is undone", True)) if k in kinds)


def undone_after_failure(e: Mapping[str, Any]) -> str:
    """What a ``compensation_succeeded`` adds when its undo had failed for good (kernel version 5), for the run display
    and ``show``; empty otherwise."""
    if not e.get("after_failure"):
        return ""
    return (f": undo attempt {_esc(e.get('attempt'))}, given up on when it timed out, completed after all — "
            "nothing to undo by hand for it")


def attempt_label(attempt: Mapping[str, Any]) -> str:
    """``attempt 2``, ``fallback attempt 1`` for an attempt of the step's fallback worker (task id ``…#f1``), ``undo
    attempt 1`` for one of its compensation (``…#c1``)."""
    mark = str(attempt.get("task_id", "")).rpartition("#")[2][:1]
    kind = {"f": "fallback ", "c": "undo "}.get(mark, "")
    return f"{kind}attempt {attempt.get('attempt')}"


def timed_out_attempts(events: Iterable[Mapping[str, Any]]) -> set[Any]:
    """The task ids of the attempts that timed out: a step's (``step_timed_out``) or an undo's (its retry or failure
    for ``StepTimeout``)."""
    return {e.get("task_id") for e in events if e.get("type") == "step_timed_out" or (
        e.get("type") in ("compensation_retrying", "compensation_failed")
        and (e.get("error") or {}).get("type") == "StepTimeout")}


def in_doubt_items(plan: dict[str, Any], state: dict[str, Any], attempts: Iterable[Mapping[str, Any]], why: str,
                   events: Iterable[Mapping[str, Any]], *, any_end: bool = False) -> list[dict[str, Any]]:
    """The steps whose outcome is unknown, for :attr:`RunResult.in_doubt`: of ``attempts`` (``{task_id, step,
    attempt}``: attempts the run gave up on that had not answered when ``why``, a clause), those
    whose success would still count (:func:`may_answer_late`, ``any_end`` as there). For step attempts, one item per
    step, latest started first, as ``kernel.in_doubt`` gives it; for undo attempts (``undo_in_doubt``: the step may
    be undone already), the step's item in ``intervention``, after them. Each with ``task_ids`` and a ``reason``
    saying what happened."""
    events = list(events)
    timed_out = timed_out_attempts(events)
    by_step: dict[str, list[Mapping[str, Any]]] = {}
    undos: dict[str, list[Mapping[str, Any]]] = {}
    for attempt in attempts:
        if may_answer_late(plan, state, attempt, any_end=any_end):
            (undos if is_undo_attempt(attempt["task_id"]) else by_step).setdefault(attempt["step"], []).append(attempt)
    order = sorted(by_step, key=lambda k: (-state["nodes"][k].get("t0", 0), k))
    items = in_doubt(plan, state, order)
    for item in items:
        mine = by_step[item["step"]]
        numbers = ", ".join(attempt_label(a) for a in mine)
        what = "timed out" if all(a["task_id"] in timed_out for a in mine) else "timed out or was cancelled"
        item["task_ids"] = [a["task_id"] for a in mine]
        effect = ("it may have completed the step again after the step was undone, so the undo may have to be "
                  "repeated by hand") if item.get("after_undo") else \
            "it may have completed, and its compensation was never run"
        item["reason"] = (f"the run gave up on {numbers} of the step (it {what}), but its worker was still "
                          f"running when {why}: {effect}")
    # (a run stopped at once has no intervention in its state: what it leaves to undo is computed)
    left = (state.get("intervention") or {}).get("steps") or (left_to_undo(plan, state) if undos else [])
    for listed in left:
        mine = undos.get(listed["step"], []) if listed["status"] == "failed" else []
        if mine:
            numbers = ", ".join(attempt_label(a) for a in mine)
            what = "timed out" if all(a["task_id"] in timed_out for a in mine) else "timed out or was cancelled"
            items.append({**listed, "task_ids": [a["task_id"] for a in mine], "undo_in_doubt": True,
                          "reason": f"the run gave up on {numbers} of the step (it {what}), but its worker was still "
                                    f"running when {why}: the step may be undone already — check before undoing it "
                                    "by hand"})
    return items


def _in_doubt_of_record(plan: dict[str, Any], state: dict[str, Any], lines: list[dict[str, Any]],
                        emitted: list[dict[str, Any]], path: Path | None = None) -> list[dict[str, Any]]:
    """What a record's runtime lines say is in doubt: the attempts of its ``runtime_waiting`` line that no input
    event after it answered, or the ``unanswered`` attempts of its ``runtime_aborted`` line (a run stopped at once).
    A runtime line that is malformed, or out of its place, is a ``RecordError`` naming it."""
    from flowdsl.runtime.record import RecordError

    def refuse(i: int, why: str) -> RecordError:
        return RecordError(f"{_where(lines, i, path)}: {why}; {_CHANGED}")

    def attempts_of(i: int, field: str, required: bool = True) -> list[dict[str, Any]]:
        value = lines[i].get(field)
        if value is None and not required:
            return []  # (a record of an earlier version)
        if not isinstance(value, list) or not all(
                isinstance(a, dict) and isinstance(a.get("task_id"), str) and isinstance(a.get("step"), str)
                and a["step"] in state["nodes"] and isinstance(a.get("attempt"), int) for a in value):
            raise refuse(i, f"its '{field}' is not a list of the attempts of this run's steps")
        return value

    finished = next((i for i, e in enumerate(lines) if e.get("type") == "run_finished"), None)
    waiting = aborted = None
    for i, event in enumerate(lines):
        kind = event.get("type")
        if kind == "runtime_waiting":
            if finished is None or i < finished or waiting is not None:
                raise refuse(i, "a 'runtime_waiting' line comes once, after the run's end ('run_finished')")
            waiting = i
            attempts_of(i, "attempts")
        elif kind == "runtime_waited":
            if waiting is None or not isinstance(event.get("reason"), str):
                raise refuse(i, "a 'runtime_waited' line follows a 'runtime_waiting' one and gives a 'reason'")
            attempts_of(i, "unanswered")
        elif kind == "record_failed":
            if i != len(lines) - 1 or not isinstance(event.get("reason"), str):
                raise refuse(i, "a 'record_failed' line is the record's last and gives a 'reason'")
        elif kind == "runtime_aborted":
            if not isinstance(event.get("reason"), str):
                raise refuse(i, "a 'runtime_aborted' line gives a 'reason'")
            aborted = i
            attempts_of(i, "unanswered", required=False)
    if aborted is not None:
        left = attempts_of(aborted, "unanswered", required=False)
        return in_doubt_items(plan, state, left, stopped_at_once(lines[aborted]["reason"]), emitted, any_end=True)
    if waiting is None:
        return []
    rest = lines[waiting + 1:]
    answered = {e.get("task_id") for e in rest if e.get("type") in ("task_succeeded", "task_failed", "task_cancelled")}
    end = next((e for e in rest if e.get("type") == "runtime_waited"), None)
    why = str(end.get("reason")) if end is not None else _WAIT_CUT
    left = [a for a in attempts_of(waiting, "attempts") if a["task_id"] not in answered]
    return in_doubt_items(plan, state, left, stopped_waiting(why), emitted)


def stopped_waiting(reason: str) -> str:
    """The clause of an in-doubt ``reason`` for a wait after the run's end that stopped (``reason``)."""
    return f"the runtime stopped waiting for it ({reason})"


def stopped_at_once(reason: str) -> str:
    """The clause of an in-doubt ``reason`` for a run stopped at once (``reason``: the ``runtime_aborted`` one)."""
    return f"the run was stopped at once ({reason})"


def _where(lines: list[dict[str, Any]], i: int, path: Path | None) -> str:
    """Where line ``i`` of a record is: ``file:line`` when ``lines`` came from ``read_record``."""
    numbers = getattr(lines, "line_numbers", None)
    if numbers is None:
        return f"event {i + 1} of the record"
    return f"{path}:{numbers[i]}" if path is not None else f"line {numbers[i]}"


_CHANGED = "the record was changed after it was written, or was made by another version"
#: what an error says when an expression ran out of its time bound (flowdsl.expr): a bound on CPU time, so a
#: replay on another machine, or the same one busier, may decide otherwise for an expression close to it
_TIMED_OUT = re.compile(r"evaluation timeout after|over its bound of|a regular expression took longer than")


def _changed(lines: list[dict[str, Any]]) -> str:
    """Why a record may not replay as it was written: :data:`_CHANGED`, and, when the record holds an expression
    that ran out of its time bound, that it may have passed it this time (or the other way round)."""
    for line in lines:
        error = line.get("error")
        if isinstance(error, dict) and _TIMED_OUT.search(str(error.get("message", ""))):
            return (f"{_CHANGED}, or an expression close to its time bound (100 ms of CPU time; the record holds "
                    f"one that ran out of it, at step {line.get('step')!r}) decided otherwise when replayed here")
    return _CHANGED


def _decisions(value: Any, top: bool = True) -> Any:
    """``value`` (an event, as JSON) without its prose — an error's ``message`` (at any depth), a late completion's
    ``reason`` — which a later version may word otherwise (an expression error names its option, a late
    completion its cause) without deciding anything differently: what a replay must match. Other reasons
    (``step_skipped``'s, ``step_cancelled``'s) say which way the kernel went, and are compared."""
    if isinstance(value, dict):
        prose = {"message", "reason"} if top and value.get("type") == "late_completion" else {"message"}
        return {k: _decisions(v, False) for k, v in value.items() if not (k in prose and isinstance(v, str))}
    if isinstance(value, list):
        return [_decisions(v, False) for v in value]
    return value


def _check_events(lines: list[dict[str, Any]], replayed: list[dict[str, Any]], path: Path | None) -> None:
    """Refuse a recorded line the replay does not explain: every line is a kernel input event, a runtime line, or
    the event the kernel emitted at its ``seq``, as it emitted it, once — and the emitted events recorded are the
    replay's first ones, none left out before the last (a record cut short ends early; one with a line taken out
    is refused). Names the line when ``lines`` came from ``read_record`` (its ``line_numbers``)."""
    from flowdsl.runtime.record import RecordError, encode_line

    by_seq = {e["seq"]: e for e in replayed}
    known = ("start", *INPUT_EVENTS, *RUNTIME_LINES)
    seen: set[int] = set()
    for i, event in enumerate(lines):
        kind = event.get("type")
        if kind in known:
            continue
        seq = event.get("seq")
        again = by_seq.get(seq) if isinstance(seq, int) and not isinstance(seq, bool) else None
        same = again is not None and (again.get("type"), again.get("step")) == (kind, event.get("step"))
        if same and isinstance(seq, int) and seq not in seen:
            assert again is not None
            written = _decisions(json.loads(encode_line(again)))  # (as the record holds it: JSON, tuples as lists)
            if written != _decisions(event):
                fields = ", ".join(f"'{k}'" for k in sorted(set(written) | set(event), key=str)
                                   if written.get(k) != _decisions(event).get(k))
                raise RecordError(f"{_where(lines, i, path)}: the event {kind!r} ('seq' {seq}) is not what replaying "
                                  f"the run emits there: its {fields} differ; {_changed(lines)}")
            seen.add(seq)
            continue
        if "seq" not in event:
            why = (f"a line of type {kind!r}, which flowdsl does not write: not a kernel input event, and without "
                   "the 'seq' of an event the kernel emitted")
        elif again is None:
            why = f"the event {kind!r} has 'seq' {seq!r}, at which replaying the run emits nothing"
        elif same:
            why = f"the event {kind!r} with 'seq' {seq!r} is recorded twice"
        else:
            why = (f"the event {kind!r} (step {event.get('step')!r}, 'seq' {seq!r}) is not what replaying the run "
                   f"emits there ({again.get('type')!r}, step {again.get('step')!r})")
        raise RecordError(f"{_where(lines, i, path)}: {why}; {_changed(lines)}")
    if seen:
        last = max(seen)  # (once: inside the generator it made the check of a long record quadratic)
        missing = next((e for e in replayed if e["seq"] < last and e["seq"] not in seen), None)
        if missing is not None:
            raise RecordError(f"{path or 'the record'}: the event {missing['type']!r} ('seq' {missing['seq']}) that "
                              f"replaying the run emits is missing, though later ones are there; {_changed(lines)}")


def _not_started(plan: dict[str, Any], header: Mapping[str, Any], path: Path | None) -> RunResult:
    """The result of a run whose record ends before its ``start`` line: nothing ran, every step is pending."""
    run_id = header.get("run_id")
    if not isinstance(run_id, str):
        run_id = path.stem if path is not None else ""
    state = {"run_id": run_id, "flow": plan["flow"].get("name"), "status": NOT_STARTED, "input": header.get("input"),
             "started_at": None, "finished_at": None, "error": None, "failed_step": None, "nodes": {},
             "iterations": {}, "tasks": {}, "timers": {}, "compensations": {}, "compensated": [],
             "intervention": None, "context": None}
    return RunResult.from_state(plan, state, [], record_path=path)


def llm_calls_of(events: Iterable[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The model calls of a run, by step instance, in order: one per event carrying ``meta.llm``.

    Each call is ``{"task_id", "attempt", "outcome", "error"}`` plus the
    ``meta.llm`` fields (``prompt``, ``raw``, ``model``, ``reasoning`` or
    ``field``); ``outcome`` is the type of the event the attempt's answer led to:
    ``step_succeeded``, ``step_retrying``, ``fallback_started`` or ``step_failed``,
    and ``error`` its error. Late answers (``result_rejected``) name no step and
    are left out.
    """
    calls: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        meta = e.get("meta")
        if meta is None:  # nearly every event: skip the (slow, ABC) Mapping check
            continue
        llm = meta.get("llm") if isinstance(meta, Mapping) else None
        if isinstance(llm, Mapping) and e.get("step") is not None:
            calls.setdefault(e["step"], []).append({"task_id": e["task_id"], "attempt": e["attempt"],
                                                    "outcome": e["type"], "error": e["error"], **llm})
    return calls


# --- timing ------------------------------------------------------------------------------


def _span(row: Mapping[str, Any]) -> int | None:
    if row["started_at"] is None or row["finished_at"] is None:
        return None
    return int(row["finished_at"] - row["started_at"])


_PATH_SHOWN = 12  # steps of the critical path the summary names (the JSON object has them all)


def critical_path(plan: Mapping[str, Any], steps: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], int]:
    """The chain of steps through the plan's edges that took longest in this run, and its milliseconds.

    The chain is of step instances (``charge``, ``lines[2]/charge``): inside a ``for_each`` it follows one
    iteration, and the loop weighs what its longest iteration's chain took — time an iteration spent waiting for
    a slot (``concurrency``) is on no chain, so the path is never longer than the run. Steps that did not run
    weigh nothing and are left out. Of chains that took as long, the one with more steps, then the one with fewer
    cancelled steps (a sibling cut short by a failure is not what decided the run's end).
    """
    # per plan vertex, its instances: iteration prefix ("", "lines[2]/") -> (span ms, cancelled)
    spans: dict[str, dict[str, tuple[int, bool]]] = {}
    for key, row in steps.items():
        span = _span(row) if row["kind"] in STEP_KINDS else None
        node = row["node"]
        if span is not None and key.endswith(node) and (len(key) == len(node) or key[-len(node) - 1] == "/"):
            spans.setdefault(node, {})[key[:len(key) - len(node)]] = (span, row.get("status") == "cancelled")
    nodes = plan["nodes"]

    def loops(v: str) -> tuple[str, ...]:  # the for_each nodes around vertex v, outermost first
        key = v.rpartition(":")[0] if v not in nodes and v.endswith((":start", ":end")) else v
        found: list[str] = []
        parent = nodes[key].get("parent") if key in nodes else None
        while parent:
            if nodes[parent]["kind"] == "for_each":
                found.append(parent)
            parent = nodes[parent].get("parent")
        return tuple(reversed(found))

    # the plan's edges are the flow graph: steps plus weightless group-boundary vertices ("g:start", "g:end")
    preds: dict[str, list[str]] = {}
    succs: dict[str, list[str]] = {}
    for a, b in plan.get("edges") or ():
        for v in (a, b):
            preds.setdefault(v, [])
            succs.setdefault(v, [])
        preds[b].append(a)
        succs[a].append(b)

    def rank(v: str) -> int:
        return nodes[v]["order"] if v in nodes else -1

    iterations: dict[str, set[str]] = {}  # a for_each -> the prefixes of its iterations that ran a step
    for node, by_prefix in spans.items():
        for loop in loops(node):
            for prefix in by_prefix:
                at = prefix.find(f"{loop}[")
                while at > 0 and prefix[at - 1] != "/":
                    at = prefix.find(f"{loop}[", at + 1)
                if at >= 0:
                    iterations.setdefault(loop, set()).add(prefix[:prefix.index("/", at) + 1])
    waiting = {k: len(preds[k]) for k in preds}
    ready = sorted((k for k in preds if waiting[k] == 0), key=rank)
    # per vertex and iteration prefix: (longest time to it, steps on that chain, not cancelled ones, the vertex and
    # prefix it came through)
    Best = tuple[int, int, int, "tuple[str, str] | None"]
    best: dict[str, dict[str, Best]] = {}
    while ready:
        v = ready.pop(0)
        inner = loops(v)
        into: dict[str, Best] = {}
        for u in preds[v]:
            outer = loops(u)
            for prefix, (ms, count, kept, _) in best[u].items():
                if len(inner) > len(outer):  # into a loop: every iteration starts from here
                    targets = [p for p in iterations.get(inner[-1], ()) if p.startswith(prefix)] or [prefix]
                elif len(inner) < len(outer):  # out of a loop: its iteration's chain, in the prefix around it
                    targets = [prefix[:prefix.rindex("/", 0, len(prefix) - 1) + 1] if prefix.count("/") > 1
                               else ""]
                else:
                    targets = [prefix]
                for target in targets:
                    if target not in into or (ms, count, kept) > into[target][:3]:
                        into[target] = (ms, count, kept, (u, prefix))
        if not preds[v]:
            into[""] = (0, 0, 0, None)
        mine = spans.get(v, {})
        best[v] = {p: (ms + mine[p][0], count + 1, kept + (not mine[p][1]), via) if p in mine else
                   (ms, count, kept, via) for p, (ms, count, kept, via) in into.items()}
        for nxt in succs[v]:
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                ready.append(nxt)
    ends = [(ms, count, kept, -rank(v), v, p) for v, by in best.items() for p, (ms, count, kept, _) in by.items()]
    if not ends:
        return [], 0
    *_, end, prefix = max(ends)
    total = best[end][prefix][0]
    chain: list[str] = []
    cur: tuple[str, str] | None = (end, prefix)
    while cur is not None:
        v, p = cur
        if p in spans.get(v, {}):
            chain.append(p + v)
        cur = best[v][p][3]
    return list(reversed(chain)), total


def timing(result: RunResult) -> dict[str, Any]:
    """Wall time, the sum of step times, the saving from parallelism and the measured critical path (ms)."""
    spans = [s for row in result.steps.values() if row["kind"] in STEP_KINDS and (s := _span(row)) is not None]
    wall = None
    if result.finished_at is not None and result.started_at is not None:
        wall = int(result.finished_at - result.started_at)
    chain, chain_ms = critical_path(result.plan, result.steps) if result.plan else ([], 0)
    total = sum(spans)
    return {"wall_ms": wall, "step_time_sum_ms": total,
            "parallel_saving_ms": max(0, total - wall) if wall is not None else None,
            "critical_path": chain, "critical_path_ms": chain_ms, "runtime_wall_ms": result.wall_ms}


def _seconds(ms: float | None) -> str:
    if ms is None:
        return "—"
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


# --- the end summary ----------------------------------------------------------------------


def error_console(console: Any) -> Any:
    """Where errors and notes go beside a command's output ``console``: stderr when that console writes to stdout
    (text output goes to stdout, errors never), else that console (stderr, where a ``--format json`` command
    records them, or a file it was given)."""
    import sys

    return _console() if getattr(console, "file", None) is sys.stdout else console


def _console(console: Any = None) -> Any:
    if console is not None:
        return console
    from flowdsl.stdio import console as new_console

    return new_console(stderr=True)


def _esc(text: Any) -> str:
    """Text that is not flowdsl's own as it is shown: on one line, its control characters written as JSON writes
    them (``flowdsl.shown.visible``: no escape sequence reaches the terminal, no line is forged), rich markup
    escaped. Every name, message and reason a summary, timeline or live view shows goes through it."""
    from rich.markup import escape

    from flowdsl.shown import visible

    escaped: str = escape(visible(text))
    return escaped


def _status(status: str) -> str:
    return f"[{_STYLE.get(status, 'white')}]{_esc(status)}[/]"


def _error_text(err: Mapping[str, Any] | None) -> str:
    if not err:
        return ""
    message = str(err.get("message") or "")
    return f"{err.get('type')}: {message}" if message else str(err.get("type"))


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def print_summary(result: RunResult, console: Any = None) -> None:
    """The end summary of a run, on stderr (rich)."""
    from rich.table import Table

    con = _console(console)
    rows = [(k, r) for k, r in result.steps.items() if r["kind"] in STEP_KINDS]
    shown = rows
    hidden = 0
    if len(rows) > _MAX_ROWS:
        shown = [(k, r) for k, r in rows if r["status"] != "succeeded" or "compensation" in r][:_MAX_ROWS]
        hidden = len(rows) - len(shown)
    order = {k: i + 1 for i, k in enumerate(result.compensated)}
    fell_back = {e["step"] for e in result.events if e["type"] == "fallback_started"}
    table = Table(title=None, show_edge=False, pad_edge=False, box=None, header_style="bold")
    table.add_column("step", no_wrap=True, min_width=max((len(k) for k, _ in shown), default=4))
    table.add_column("status", no_wrap=True, min_width=18)
    table.add_column("attempts", justify="right", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True, min_width=8)
    table.add_column("undo", no_wrap=True, min_width=12)
    errors: list[str] = []
    for key, row in shown:
        comp = row.get("compensation")
        undo = ""
        if comp is not None:
            status = comp["status"]
            if key in order:
                undo = f"[yellow]undone #{order[key]}[/]"
            elif status == "failed":
                undo = f"[red]undo failed[/] ×{comp['attempts']}"
            elif status in ("running", "retrying"):
                undo = f"[yellow]undoing[/] #{comp['attempts']}"
            else:
                undo = "[red]not undone[/]"
            if comp.get("error") and key not in order:
                errors.append(f"  {_esc(key)} (undo): {_esc(_clip(_error_text(comp['error']), 200))}")
        if row["error"]:
            errors.append(f"  {_esc(key)}: {_esc(_clip(_error_text(row['error']), 200))}")
        cell = _status(row["status"]) + (" [yellow](fallback)[/]" if key in fell_back else "")
        table.add_row(_esc(key), cell, str(row["attempts"] or ""), _seconds(_span(row)), undo)
    con.print()
    con.print(table)
    if hidden:
        con.print(f"[dim]… and {hidden} more steps that succeeded[/]")
    if errors:
        con.print("errors:")
        for line in errors:
            con.print(line)
    for e in result.events:
        if e["type"] == "fallback_started":
            line, detail = fallback_text(e, result.steps.get(e["step"], {}).get("status"))
            con.print(f"[yellow]⤷[/] {_esc(line)}")
            if detail:
                con.print(f"  [dim]{_esc(_clip(detail, 600))}[/]")
    con.print()
    stopped = result.intervention is not None and result.status not in END_STATES  # aborted: did not end
    state = f"[yellow]stopped at once {stopped_while(result.status)}[/]" if stopped else _status(result.status)
    if stopped and result.crashed is not None:  # (its process died: flowdsl.runtime.stopped)
        state = f"[bold red]crashed {stopped_while(result.status)}[/] ({_esc(result.crashed)})"
    headline = f"[bold]{_esc(result.flow or '')}[/] {_esc(result.run_id)}: {state}"
    if result.error:
        where = f" at {_esc(result.failed_step)}" if result.failed_step else ""
        headline += f"{where} — {_esc(_error_text(result.error))}"
    con.print(headline)
    if result.compensated:
        undone = [f"{_esc(k)} ({_esc(_undo_worker(result, k))})" for k in result.compensated]
        con.print("compensated, in this order: " + " → ".join(undone))
    elif result.status in ("failed", "cancelled") and not result.in_doubt:
        con.print("nothing needed undoing")
    if result.intervention is not None:
        left = result.intervention["steps"]
        if left:
            why = " (the run stopped before they were undone)" if stopped else ""
            con.print(f"[bold red]left to undo by hand[/]{why}, in this order:")
            doubted = {i["step"] for i in result.in_doubt if i.get("undo_in_doubt")}
            for item in left:
                mark = " [yellow](its undo may have run: see below)[/]" if item["step"] in doubted else ""
                con.print(_left_text(item) + mark)
            slow = [_esc(item["step"]) for item in left if item.get("reason") and (item.get("after_undo") or
                    ((result.steps.get(item["step"]) or {}).get("error") or {}).get("type") == "StepTimeout")]
            if slow:
                con.print(f"[dim]hint: {', '.join(slow)} completed after {'its' if len(slow) == 1 else 'their'} "
                          "`timeout`: a worker that outlasts it still makes its effect; give the step a timeout "
                          "longer than its worker takes, or make the worker stop within it[/]")
        elif stopped:
            con.print("no completed step was left undone")
    if result.in_doubt:
        steps = any(not item.get("undo_in_doubt") for item in result.in_doubt)
        con.print("[bold red]outcome unknown[/]: check whether each took effect"
                  + (", and undo by hand the steps that did:" if steps else ":"))
        for item in result.in_doubt:
            con.print(_left_text(item))
    t = timing(result)
    line = f"wall {_seconds(t['wall_ms'])} · sum of step times {_seconds(t['step_time_sum_ms'])}"
    if t["wall_ms"] is not None and t["step_time_sum_ms"] > t["wall_ms"] > 0:
        line += (f" · parallelism saved {_seconds(t['parallel_saving_ms'])} "
                 f"(×{t['step_time_sum_ms'] / t['wall_ms']:.1f})")
    con.print(line)
    if t["critical_path"]:
        chain = t["critical_path"]
        if len(chain) > _PATH_SHOWN:  # a long chain: its ends, and how many steps between
            half = _PATH_SHOWN // 2
            chain = [*chain[:half], f"… {len(chain) - 2 * half} more …", *chain[-half:]]
        path = " → ".join(_esc(k) for k in chain)
        con.print(f"critical path {_seconds(t['critical_path_ms'])}: {path}")
    if result.record_path is not None:
        show = show_command(result.record_path)
        con.print(f"[dim]record: {_esc(result.record_path)}  ({_esc(show)})[/]")
        if result.record_error:
            con.print(f"[yellow]the record is incomplete: {_esc(result.record_error)}[/]")


def _left_text(item: Mapping[str, Any]) -> str:
    """One step left to undo by hand: its undo worker, how far that got, its last error, its idempotency key."""
    worker = _esc(item["worker"])
    if item.get("after_undo"):  # (the step completed again after its undo, or may have: kernel version 7)
        how = f"{worker} ran before that"
    elif item["status"] == "failed":
        how = f"{worker} failed (×{item['attempts']})"
    elif item["status"] == "in_flight" and not item.get("reason"):  # (with a reason: the step was in flight)
        how = f"{worker} was running when the run stopped: it may or may not have taken effect"
    else:
        how = f"{worker} was not run"
    err = f" — {_esc(_error_text(item['last_error']))}" if item["last_error"] else ""
    if item.get("reason"):  # a step that completed late (docs/kernel.md, "Late completions")
        how = f"{how} — {_esc(item['reason'])}"
    keys = f"the step's idempotency key {_esc(item['step_idempotency_key'])}, its undo's " \
        f"{_esc(item['idempotency_key'])}" if item.get("step_idempotency_key") else \
        f"idempotency key {_esc(item['idempotency_key'])}"
    return f"  {_esc(item['step'])}: {how}{err} [dim]({keys})[/]"


def left_to_undo_text(items: Iterable[Mapping[str, Any]]) -> str:
    """What is left to undo by hand (``intervention["steps"]``, ``RunAborted.left_to_undo``) as plain text, for a
    log line: each step in the order to undo it, with its undo worker, how far that got and both idempotency
    keys; ``nothing`` when there is none."""
    said = []
    for item in items:
        if item.get("after_undo"):
            how = f"its undo {item.get('worker')} ran before that"
        elif item.get("status") == "failed":
            how = f"its undo {item.get('worker')} failed (x{item.get('attempts')})"
        elif item.get("status") == "in_flight" and not item.get("reason"):
            how = f"its undo {item.get('worker')} was running: it may or may not have taken effect"
        else:
            how = f"its undo {item.get('worker')} was not run"
        if item.get("reason"):
            how += f" ({item['reason']})"
        keys = f"step key {item['step_idempotency_key']}, undo key {item.get('idempotency_key')}" \
            if item.get("step_idempotency_key") else f"idempotency key {item.get('idempotency_key')}"
        said.append(f"{item.get('step')}: {how} [{keys}]")
    return "; ".join(said) if said else "nothing"


def show_command(record: Path) -> str:
    """The ``flowdsl show`` command that finds the record ``record``: the run id it is looked up by is its file's
    name (``<run_id>.jsonl``; whatever id is inside a copied or renamed record), with ``--runs-dir`` when the record
    is not in the directory ``flowdsl show`` looks in by default ($FLOWDSL_RUNS_DIR or .flowdsl/runs); the
    record's path when its name is not a run id."""
    import shlex

    from flowdsl.runtime.record import RUN_ID_RE, runs_dir

    record = Path(record)
    run_id = record.name.removesuffix(".jsonl")
    if record.suffix != ".jsonl" or not RUN_ID_RE.match(run_id):
        text = str(record)
        return f"flowdsl show {shlex.quote('./' + text if text.startswith('-') else text)}"  # not an option
    try:
        default = runs_dir()
    except ValueError:  # $FLOWDSL_RUNS_DIR set but empty: no default directory to look in
        default = None
    if default is not None and record.parent.resolve() == default.resolve():
        return f"flowdsl show {run_id}"
    return f"flowdsl show {run_id} --runs-dir {shlex.quote(str(record.parent))}"


def fallback_text(event: Mapping[str, Any], status: str | None) -> tuple[str, str]:
    """What a ``fallback_started`` event means, plainly, given the step's final status; and the error behind it.

    ``generate_confirmation: no LM configured — used fallback template_confirmation``
    """
    err = event.get("error") or {}
    why = _fallback_why(err)
    worker = event.get("worker")
    done = {"succeeded": f"used fallback {worker}", "failed": f"its fallback {worker} failed too"}.get(
        str(status), f"fallback {worker} {status or 'started'}")
    return f"{event.get('step')}: {why} — {done}", _error_text(err)


def _fallback_why(err: Mapping[str, Any]) -> str:
    """Why an LLM step went to its fallback, from its last error: an ``LLMNotConfigured`` says whether no model was
    named, or one was but cannot be used (its message tells which), any other error that the call failed."""
    if err.get("type") != LLM_NOT_CONFIGURED:
        return f"the LLM call failed for good ({err.get('type')})"
    from flowdsl.llm import not_configured_why

    return not_configured_why(str(err.get("message") or ""))


def fallback_reason(event: Mapping[str, Any]) -> str:
    """A ``fallback_started`` event's reason as shown: the kernel's, which says ``no LM configured`` for every
    ``LLMNotConfigured``, with what its error says instead (``the model string is invalid — using …``)."""
    reason = str(event.get("reason") or "")
    said = "no LM configured"
    if (event.get("error") or {}).get("type") == LLM_NOT_CONFIGURED and reason.startswith(said):
        return _fallback_why(event["error"]) + reason[len(said):]
    return reason


def _undo_worker(result: RunResult, key: str) -> str:
    node = result.steps.get(key, {}).get("node", key)
    comp = (result.plan.get("nodes", {}).get(node) or {}).get("compensate") or {}
    return str(comp.get("worker", "?"))


# --- the live view --------------------------------------------------------------------------


class LiveView:
    """Progress while a run goes, on stderr: a rich ``Live`` table on a terminal, plain lines otherwise.

    Use as a context manager around the run and pass :meth:`on_event` and
    :meth:`notice` to the runtime. ``mode``: ``auto`` (live on a terminal, lines
    otherwise), ``live``, ``lines`` or ``off``.
    """

    def __init__(self, plan: Mapping[str, Any], *, mode: str = "auto", console: Any = None):
        self.console = _console(console)
        if mode == "auto":
            mode = "live" if self.console.is_terminal else "lines"
        self.mode = mode
        self.plan = plan
        self.rows: dict[str, dict[str, Any]] = {}
        self.undo: dict[str, str] = {}
        self.status = "starting"
        self.run_id = ""
        self.t0: int | None = None
        self._t0_clock = time.monotonic()
        self._live: Any = None
        for key, node in plan["nodes"].items():
            if node["kind"] in STEP_KINDS and not _in_loop(plan, key):
                self.rows[key] = {"status": "pending", "attempt": 0, "start": None, "end": None}

    def __enter__(self) -> LiveView:
        if self.mode == "live":
            from rich.live import Live

            self._live = Live(console=self.console, get_renderable=self._render, refresh_per_second=8,
                              transient=True, redirect_stdout=False, redirect_stderr=False)
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def notice(self, text: str) -> None:
        self.console.print(f"[yellow]{_esc(text)}[/]")

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "run_started":
            self.run_id, self.t0, self.status = event["run_id"], event["at"], "running"
            if self.mode == "lines":
                self.console.print(f"[bold]{_esc(event.get('flow') or '')}[/] run {_esc(event['run_id'])} started")
            return
        if kind == "run_finished":
            self.status = event["status"]
            return
        step = event["step"]
        if step is None or event["kind"] not in STEP_KINDS:
            return
        row = self.rows.setdefault(step, {"status": "pending", "attempt": 0, "start": None, "end": None})
        if kind == "step_scheduled":
            row.update(status="running", attempt=event["attempt"])
            if row["start"] is None:
                row["start"] = event["at"]
        elif kind in ("step_succeeded", "step_failed", "step_cancelled", "step_skipped"):
            row.update(status=kind.removeprefix("step_"), end=event["at"])
        elif kind == "step_retrying":
            row["status"] = "retrying"
        elif kind == "fallback_started":
            row["fallback"] = event["worker"]
        elif kind.startswith("compensation_"):
            self.undo[step] = kind.removeprefix("compensation_")
            if kind == "compensation_started":
                self.status = "compensating"
        if self.mode == "lines":
            self._line(event, row)

    def _line(self, event: dict[str, Any], row: dict[str, Any]) -> None:
        kind, step = event["type"], _esc(event["step"])
        at = f"[dim]+{(event['at'] - (self.t0 or event['at'])) / 1000:7.3f}s[/]"
        err = _esc(_clip(_error_text(event.get("error")), 160))
        if kind == "step_succeeded":
            took = _seconds(row["end"] - row["start"]) if row["start"] is not None else ""
            self.console.print(f"{at} [green]✓[/] {step} [dim]{took}[/]")
        elif kind == "step_failed":
            self.console.print(f"{at} [red]✗ {step}[/] — {err}")
        elif kind == "step_retrying":
            self.console.print(f"{at} [cyan]↻ {step}[/] attempt {event['attempt']} failed ({err}); "
                               f"retrying in {_seconds(event['delay_ms'])}")
        elif kind == "step_timed_out":
            self.console.print(f"{at} [yellow]⏱ {step}[/] timed out on attempt {event['attempt']}")
        elif kind == "step_skipped" and event.get("reason") != "parent":
            self.console.print(f"{at} [dim]– {step} skipped ({_esc(event.get('reason'))})[/]")
        elif kind == "step_cancelled":
            self.console.print(f"{at} [yellow]⊘ {step}[/] cancelled")
        elif kind == "fallback_started":
            self.console.print(f"{at} [yellow]⤷ {step}[/]: {_esc(fallback_reason(event))}")
        elif kind == "compensation_started" and event["attempt"] == 1:
            self.console.print(f"{at} [yellow]↶ undoing {step}[/] with {_esc(event['worker'])}")
        elif kind == "compensation_succeeded":
            self.console.print(f"{at} [yellow]↶ {step} undone[/]{undone_after_failure(event)}")
        elif kind == "compensation_retrying":
            self.console.print(f"{at} [yellow]↶ {step}[/] undo attempt {event['attempt']} failed ({err}); "
                               f"retrying in {_seconds(event['delay_ms'])}")
        elif kind == "compensation_failed":
            self.console.print(f"{at} [red]↶ undoing {step} failed for good[/] — {err}")
        elif kind == "late_completion":
            self.console.print(f"{at} {late_completion_line(event)}")

    def _render(self) -> Any:
        from rich.table import Table
        from rich.text import Text

        elapsed = time.monotonic() - self._t0_clock
        counts: dict[str, int] = {}
        for row in self.rows.values():
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        head = Text.from_markup(f"[bold]{_esc(self.plan['flow'].get('name') or '')}[/] {_esc(self.run_id)} "
                                f"{_status(self.status)} [dim]{elapsed:.1f}s · "
                                + " · ".join(f"{n} {s}" for s, n in sorted(counts.items())) + "[/]", emoji=False)
        height = max(5, self.console.size.height - 4)
        items = list(self.rows.items())
        if len(items) > height:  # keep what is happening in view
            busy = [(k, r) for k, r in items if r["status"] not in ("succeeded", "pending", "skipped")]
            done = [(k, r) for k, r in items if r["status"] in ("succeeded", "skipped")][-max(0, height - len(busy)):]
            items = (busy + done)[:height]
        table = Table(show_edge=False, box=None, pad_edge=False, show_header=False)
        for _ in range(4):
            table.add_column()
        now = (self.t0 or 0) + elapsed * 1000
        for key, row in items:
            took = ""
            if row["start"] is not None:
                took = _seconds((row["end"] if row["end"] is not None else now) - row["start"])
            undo = self.undo.get(key)
            fallback = row.get("fallback")
            table.add_row(f"{_MARK.get(row['status'], ' ')} {_esc(key)}", _status(row["status"]),
                          f"#{row['attempt']}" if row["attempt"] > 1 else "", took
                          + (f"  [yellow]fallback: {_esc(fallback)}[/]" if fallback else "")
                          + (f"  [yellow]undo: {_esc(undo)}[/]" if undo else ""))
        from rich.console import Group

        return Group(head, table)


def _in_loop(plan: Mapping[str, Any], key: str) -> bool:
    scope = plan["nodes"][key].get("scope")
    while scope is not None:
        if plan["nodes"][scope]["kind"] == "for_each":
            return True
        scope = plan["nodes"][scope].get("scope")
    return False


# --- a recorded run's timeline ----------------------------------------------------------------


def print_timeline(result: RunResult, lines: Iterable[dict[str, Any]], console: Any = None, *,
                   live: bool = False) -> None:
    """``flowdsl show``: every recorded event with its time from the start, then the summary. ``live``: the
    run is known to be still going (``flowdsl status`` of a Redis run), so an unfinished one is said to be."""
    con = _console(console)
    items = list(lines)
    t0 = result.started_at if result.started_at is not None else next((e.get("at") for e in items), 0)
    con.print(f"[bold]{_esc(result.flow or '')}[/] run {_esc(result.run_id)}")
    for event in items:
        text = _timeline_text(event)
        if text is None:
            continue
        at = event.get("at")
        stamp = f"+{(at - t0) / 1000:8.3f}s" if isinstance(at, int | float) and t0 is not None else " " * 10
        con.print(f"[dim]{stamp}[/] {text}")
        meta = event.get("meta")
        if isinstance(meta, Mapping) and isinstance(meta.get("llm"), Mapping):
            con.print(" " * 10 + f"   [dim]{_llm_text(meta['llm'])}[/]")
    early = record_end_note(result, items)
    if early is not None and live and result.status != NOT_STARTED:
        con.print(f"[cyan]the run is still going: {_esc(result.status)} so far[/]")
    elif early is not None:
        con.print(f"[yellow]{_esc(early)}[/]")
    print_summary(result, con)


def record_end_note(result: RunResult, lines: Iterable[Mapping[str, Any]]) -> str | None:
    """What to say of a record that ends before its run did (None when it holds the run's end): the run had not
    started, was stopped at once (its ``runtime_aborted`` reason), or its process stopped (or it still goes)."""
    items = list(lines)
    failed = items[-1] if items and items[-1].get("type") == "record_failed" else None
    # why it ends early: writing it failed (the run went on unrecorded), else its process stopped
    stopped = f"writing it failed ({failed.get('reason')}) and the run went on unrecorded" if failed is not None \
        else "its process stopped"
    if result.status != NOT_STARTED and any(e.get("type") == "run_finished" for e in items):
        kinds = {e.get("type") for e in items}
        if "runtime_waiting" in kinds and "runtime_waited" not in kinds:
            return ("the record ends while the runtime waited, after the run's end, for attempts the run had given "
                    f"up on: {stopped}, and what they did is unknown")
        return None
    if failed is not None and result.status in END_STATES:
        return (f"the record ends before the events of the run's end were all written ({stopped}); its input "
                f"events give the run's end: {result.status}")
    if failed is not None:
        return f"the record ends before the run did: {stopped}; state when the record stopped: {result.status}"
    aborted = next((e for e in items if e.get("type") == "runtime_aborted"), None)
    if result.status == NOT_STARTED:
        why = f" ({aborted.get('reason')})" if aborted else ""
        return (f"the record ends before the run started{why}: it holds no step, and the run had not started "
                "when it was written")
    if aborted is not None:
        return (f"the record ends before the run did: it was stopped at once ({aborted.get('reason')}); state when "
                f"it ended: {result.status}")
    if result.status in END_STATES:  # its input events give the end; the events it caused were not all written
        return (f"the record ends before the events of the run's end were all written (its process stopped while "
                f"writing them); its input events give the run's end: {result.status}")
    if result.crashed is not None:
        return f"the record ends before the run did: {result.crashed}, and the run stopped with it; state when it " \
            f"ended: {result.status}"
    return (f"the record ends before the run did: its process stopped without finishing it, or the run is still "
            f"going; state when it ended: {result.status}")


def _llm_text(call: Mapping[str, Any]) -> str:
    """One line about a model call: the model, what was sent, the start of the reply (control characters
    escaped by :func:`_esc`: a reply is untrusted text, which must not drive the terminal)."""
    raw = " ".join(str(call.get("raw") or "").split())
    sent = f", {len(call['prompt'])} message(s) sent" if isinstance(call.get("prompt"), list) else ""
    reply = f", reply: {_esc(raw[:120])}{'…' if len(raw) > 120 else ''}" if "raw" in call else ""
    return f"llm: model {_esc(call.get('model') or '?')}{sent}{reply}"


def _timeline_text(e: Mapping[str, Any]) -> str | None:
    kind = e.get("type")
    step = _esc(e.get("step") or "")
    err = _esc(_error_text(e.get("error")))
    group = e.get("kind") not in STEP_KINDS
    if kind == "run_started":
        return f"[bold]run started[/] (flow {_esc(e.get('flow'))}, seed {_esc(e.get('seed'))})"
    if kind == "run_finished":
        tail = f" — {err}" if err else ""
        return f"[bold]run finished[/]: {_status(str(e.get('status')))}{tail}"
    if kind == "runtime_aborted":
        return f"[red]aborted by the runtime[/]: {_esc(e.get('reason'))}"
    if kind == "record_failed":
        return f"[yellow]the record stops here[/]: writing it failed ({_esc(e.get('reason'))}); the run went on"
    if kind == "runtime_waiting":
        ids = [str(a.get("task_id")) for a in e.get("attempts") or () if isinstance(a, Mapping)]
        grace = e.get("grace_ms")
        bound = _seconds(grace if isinstance(grace, int | float) else None)
        return (f"[yellow]waiting up to {bound} for {len(ids)} attempt(s) the run gave up on to answer[/]: "
                f"{_esc(', '.join(ids))}")
    if kind == "runtime_waited":
        ids = [str(a.get("task_id")) for a in e.get("unanswered") or () if isinstance(a, Mapping)]
        if not ids:
            return f"[dim]stopped waiting: {_esc(e.get('reason'))}[/]"
        return (f"[bold red]stopped waiting[/] ({_esc(e.get('reason'))}): {_esc(', '.join(ids))} did not answer — "
                "outcome unknown")
    if kind == "cancel_requested":
        return f"[yellow]cancel requested[/]: {_esc(e.get('reason') or '')}"
    if kind in INPUT_EVENTS or kind == "start":
        return None
    if kind == "step_started":
        return f"[dim]{step} started ({_esc(e.get('kind'))})[/]" if group else None
    if kind == "step_scheduled":
        who = f" {_esc(e['worker'])}" if e.get("worker") else ""
        return f"{step}: attempt {_esc(e.get('attempt'))} → {_esc(e.get('task_kind'))}{who}"
    if kind == "attempt_started":
        return f"{step}: attempt {_esc(e.get('attempt'))} picked up"
    if kind == "step_succeeded":
        return f"[dim]{step} done[/]" if group else f"[green]✓ {step}[/] succeeded (attempt {_esc(e.get('attempt'))})"
    if kind == "step_failed":
        return f"[red]✗ {step} failed[/] — {err}"
    if kind == "step_retrying":
        return (f"[cyan]↻ {step}[/] attempt {_esc(e.get('attempt'))} failed ({err}); "
                f"attempt {_esc(e.get('next_attempt'))} in {_seconds(e.get('delay_ms'))}")
    if kind == "step_timed_out":
        return f"[yellow]⏱ {step}[/] attempt {_esc(e.get('attempt'))} timed out"
    if kind == "step_skipped":
        return None if e.get("reason") == "parent" else f"[dim]– {step} skipped ({_esc(e.get('reason'))})[/]"
    if kind == "step_cancelled":
        return f"[yellow]⊘ {step} cancelled[/] — {_esc(e.get('reason') or '')}"
    if kind == "fallback_started":
        return f"[yellow]⤷ {step}[/]: {_esc(fallback_reason(e))}"
    if kind == "compensation_started":
        return f"[yellow]↶ {step}[/]: undo attempt {_esc(e.get('attempt'))} → {_esc(e.get('worker'))}"
    if kind == "compensation_succeeded":
        return f"[yellow]↶ {step} undone[/]{undone_after_failure(e)}"
    if kind == "compensation_retrying":
        return (f"[yellow]↶ {step}[/] undo attempt {_esc(e.get('attempt'))} failed ({err}); "
                f"attempt {_esc(e.get('next_attempt'))} "
                f"in {_seconds(e.get('delay_ms'))}")
    if kind == "compensation_failed":
        return f"[red]↶ undoing {step} failed for good[/] — {err}"
    if kind == "result_rejected":
        # not "ignored": a success may go on to be a late completion (the next line), undone or left by hand
        return (f"[dim]late {_esc(e.get('result_type'))} for {_esc(e.get('task_id'))}: not an answer the run "
                f"waits for ({_esc(e.get('reason'))})[/]")
    if kind == "late_completion":
        return late_completion_line(e, with_run_status=True)
    return f"[dim]{_esc(kind)} {step}[/]"
