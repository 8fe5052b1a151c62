"""A run's result rebuilt from its record: the recorded input events replayed through the kernel, and checked.

Stage: runtime (shared by every backend and the CLI: ``flowdsl show``, ``runs``, ``resolve``, ``prune``). Imports
the kernel's ``replay``, ``left_to_undo`` and event names, ``.report`` (:class:`RunResult`), ``.late`` (what is in
doubt) and stdlib; ``.plancheck`` and ``.record`` inside the functions that use them.

:func:`result_from_record` replays a record's input events through the kernel and refuses a line the replay does
not explain — of a type flowdsl does not write, an emitted event other than the kernel's at its ``seq``, one left
out — naming it; the record's runtime lines (:data:`RUNTIME_LINES`) give what a run stopped at once left, and what
is in doubt after a wait for late answers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flowdsl.kernel import END_STATES, INPUT_EVENTS, left_to_undo, replay
from flowdsl.runtime.late import died_in_doubt, in_doubt_items, stopped_at_once, stopped_waiting
from flowdsl.runtime.parking import PARKED
from flowdsl.runtime.report import NOT_STARTED, RunResult

__all__ = ["RUNTIME_LINES", "record_result", "result_from_record"]


#: record lines that are neither kernel input nor emitted by the kernel: a hard stop; the local runtime's wait, after
#: the run's end, for attempts the run gave up on, and its end; a write that failed; the run resumed by another
#: process (``flowdsl resume``: the lines before it tell of the process before); the run parked, its process letting
#: it go (``.parking``) (docs/runtime.md, "Run records")
RUNTIME_LINES = ("runtime_aborted", "runtime_waiting", "runtime_waited", "record_failed", "runtime_resumed", PARKED)
#: why the runtime stopped waiting, in a record whose wait has no end (its process stopped during the wait)
_WAIT_CUT = "the record ends during the wait: its process stopped"


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
    from flowdsl.runtime.record import resumptions, since_resumed

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
    aborted = next((e for e in lines[since_resumed(lines):] if e.get("type") == "runtime_aborted"), None)
    if result.status not in END_STATES and aborted is not None:
        result.intervention = {"steps": left_to_undo(plan, state)}  # stopped at once: what it left undone
        result.aborted = str(aborted.get("reason") or "stopped at once")
    result.in_doubt = _in_doubt_of_record(plan, state, lines, emitted, path)
    parked = next((e for e in lines[since_resumed(lines):] if e.get("type") == PARKED), None)
    if parked is not None and result.status not in END_STATES:  # its process let it go: `flowdsl resume` goes on
        result.parked = {key: parked.get(key) for key in ("at", "waits", "due_at")}
    result.resumed = resumptions(lines)
    failed = lines[-1] if lines and lines[-1].get("type") == "record_failed" else None
    if failed is not None:  # writing it failed there, and the run went on unrecorded: as the run itself said
        result.record_error = (f"writing the record failed ({failed.get('reason')}); it stops there and the run went "
                               "on unrecorded")
    return result


def record_result(header: Mapping[str, Any] | None, lines: list[dict[str, Any]], path: Path) -> RunResult:
    """:func:`result_from_record` for the commands that act on a record (``runs``, ``resolve``, ``resume``): whatever
    keeps it from replaying — a header without a plan, events that do not replay — is a ``RecordError`` naming the
    file, as ``show`` says it."""
    from flowdsl.runtime.record import RecordError

    try:
        return result_from_record(header, lines, path)
    except RecordError:
        raise
    except Exception as exc:
        raise RecordError(f"cannot read the run record {path}: {exc}") from None


def _in_doubt_of_record(plan: dict[str, Any], state: dict[str, Any], lines: list[dict[str, Any]],
                        emitted: list[dict[str, Any]], path: Path | None = None) -> list[dict[str, Any]]:
    """What a record's runtime lines say is in doubt: the attempts of its ``runtime_waiting`` line that no input
    event after it answered, or the ``unanswered`` attempts of its ``runtime_aborted`` line (a run stopped at once);
    and the ``unanswered`` attempts of its ``runtime_resumed`` lines, which died with the process before
    (``.late.died_in_doubt``). A runtime line that is malformed, or out of its place, is a ``RecordError`` naming
    it."""
    from flowdsl.runtime.record import RESUMED, RecordError, since_resumed

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
    died: list[tuple[list[dict[str, Any]], str]] = []  # each resume's attempts that died unanswered, and how
    now = since_resumed(lines)  # (a runtime_aborted line before the run was resumed tells of the process before)
    for i, event in enumerate(lines):
        kind = event.get("type")
        if kind == RESUMED:
            if (finished is not None and i > finished) or not isinstance(event.get("at"), int) \
                    or not isinstance(event.get("process"), dict):
                raise refuse(i, "a 'runtime_resumed' line comes before the run's end ('run_finished') and gives "
                             "'at' (a time in milliseconds) and 'process' (the process that resumed the run)")
            attempts_of(i, "attempts")
            died.append((attempts_of(i, "unanswered", required=False), str(event.get("stopped") or
                                                                           "its process stopped")))
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
        elif kind == PARKED:
            waits = event.get("waits")
            due = event.get("due_at")
            if (finished is not None and i > finished) or not isinstance(event.get("at"), int) \
                    or not isinstance(waits, list) or not all(isinstance(w, dict) for w in waits) \
                    or not (due is None or (isinstance(due, int) and not isinstance(due, bool))) \
                    or not (i == len(lines) - 1 or lines[i + 1].get("type") == RESUMED):
                raise refuse(i, "a 'runtime_parked' line comes before the run's end, gives 'at' (a time in "
                             "milliseconds), 'waits' (a list) and 'due_at' (a time, or null), and is the record's "
                             "last line or followed by a 'runtime_resumed' one")
        elif kind == "runtime_aborted":
            if not isinstance(event.get("reason"), str):
                raise refuse(i, "a 'runtime_aborted' line gives a 'reason'")
            if i >= now:
                aborted = i
            attempts_of(i, "unanswered", required=False)
    items: list[dict[str, Any]] = []
    if aborted is not None:
        left = attempts_of(aborted, "unanswered", required=False)
        items = in_doubt_items(plan, state, left, stopped_at_once(lines[aborted]["reason"]), emitted, any_end=True)
    elif waiting is not None:
        rest = lines[waiting + 1:]
        answered = {e.get("task_id") for e in rest
                    if e.get("type") in ("task_succeeded", "task_failed", "task_cancelled")}
        end = next((e for e in rest if e.get("type") == "runtime_waited"), None)
        why = str(end.get("reason")) if end is not None else _WAIT_CUT
        left = [a for a in attempts_of(waiting, "attempts") if a["task_id"] not in answered]
        items = in_doubt_items(plan, state, left, stopped_waiting(why), emitted)
    for left, why in died:  # (as the resumed run said them: flowdsl.runtime.resume.Resumption.in_doubt)
        items += died_in_doubt(plan, state, left, why, emitted, [item["step"] for item in items])
    return items


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
