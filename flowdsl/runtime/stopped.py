"""A local run whose process died: how a run record stands, and what a crashed run leaves to undo by hand.

Stage: runtime (shared), for ``flowdsl show``, ``runs``, ``resolve``, ``prune`` and ``resume``. Imports stdlib,
``.owner``, ``.record``, ``.report``, ``.late`` (and the kernel's ``left_to_undo``, which ``.late`` holds already) and,
to read a record again, ``.rebuild``.

A local run lives in its process. When that process is killed (SIGKILL, the OOM killer, a restart) the run stops
where it stood and its record just ends: no ``run_finished``, no ``runtime_aborted``. :func:`settle` tells such a
record apart — the process its header names is gone (``.owner.judge``) — and gives it what a run stopped at once
gets: ``intervention``, every completed step with a compensation not undone in the order to undo it, then the
steps and undos that were in flight (``in_flight``: they may have taken effect), each with its worker, input and
idempotency keys (``kernel.left_to_undo``, as for an aborted run); and ``in_doubt``, the attempts the run had given
up on (they timed out) that never answered (:func:`unanswered`).

A verdict of ``gone`` is about the process now, and the record was read before: a run that ended (and whose process
exited) in between would be taken for a crash. So :func:`settle` reads the record again after such a verdict — a
process that is gone writes no more, so what it holds then is final — and judges that when it holds more than was
read. A record that ends while its runtime waits, after the run's end, for attempts it had given up on, and whose
process still runs, has nothing in doubt yet: the runtime still waits for them (``Standing.awaited``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flowdsl.runtime.owner import GONE, LIVE, Verdict, judge
from flowdsl.runtime.record import RECORD_FAILED, RecordError, owner_of, since_resumed

__all__ = ["Standing", "settle", "unanswered"]

#: how many times :func:`settle` reads a record again after its process was found gone, when it keeps changing (a
#: ``flowdsl resume`` or ``resolve`` writing to it meanwhile): then the last reading is judged
_REREADS = 3

#: the input events that answer an attempt
_ANSWERS = ("task_succeeded", "task_failed", "task_cancelled")
#: the emitted events that dispatch one: a step's attempt (fallback attempts too), an undo's
_DISPATCHES = ("step_scheduled", "compensation_started")


@dataclass(frozen=True)
class Standing:
    """How a local run record stands, for the commands that act on it. ``ended``: the record holds the run's end (a
    ``run_finished``; or its input events give it); ``stopped``: it ends with a ``runtime_aborted`` line (stopped at
    once), a ``runtime_parked`` one (``parked``: its process let it go, only waits being left) or a
    ``record_failed`` one (the run went on unrecorded) before the run's end; ``crashed``: neither, and its process
    is gone (:func:`settle` gave the result its ``crashed`` reason and what is left); ``waiting``: it
    ends while its runtime waited, after the run's end, for attempts it had given up on. ``process`` is what the
    process its header names is, as far as can be told here (asked only when the record is not closed: it does not
    end the run, or it ends waiting). ``awaited``: when it ends waiting and its process still runs (so the runtime
    still waits), the task ids of the attempts waited for, whose answers may still change the run's end."""

    ended: bool
    stopped: str | None
    crashed: bool
    waiting: bool
    process: Verdict | None
    awaited: tuple[str, ...] = ()

    @property
    def live(self) -> bool:
        """Whether the record may still be written to: it is not closed, and its process runs."""
        return self.process is not None and self.process.state == LIVE

    @property
    def closed(self) -> bool:
        """Whether nothing will write to the record any more (besides ``flowdsl resolve``): its run ended (and no
        wait after the end is open), it was stopped at once or parked, or its process is gone."""
        return (self.ended and not self.waiting) or self.stopped in ("aborted", "parked") or (
            self.process is not None and self.process.state == GONE)


def settle(header: Mapping[str, Any] | None, lines: list[dict[str, Any]], result: Any) -> Standing:
    """How the record (``header``, ``lines``: from ``read_record``; ``result``: ``result_from_record`` of them)
    stands. A record that ends before its run did — no end, not stopped at once, writing it did not fail — whose
    process is gone is a crash: ``result`` gets its ``crashed`` reason, its ``intervention`` (what is left to undo
    by hand, as for a run stopped at once) and its ``in_doubt`` (attempts given up on that never answered). One
    that ends while its runtime waits, after the run's end, for attempts the run gave up on, and whose process still
    runs, has nothing in doubt yet: ``result.in_doubt`` is emptied and ``Standing.awaited`` names those attempts.

    When the process is found gone, the record is read again (at ``result.record_path``): a process that is gone
    writes no more, so that reading is final. When it holds more than ``lines`` — the run went on, and perhaps
    ended, between the first reading and the look at its process — ``lines`` (its ``read_record`` attributes too)
    and ``result`` are made what the record holds now, in place, and that is judged. A record that cannot be read
    again, or is no longer the one read (another header, other lines), is judged as it was read."""
    standing = _settled(header, lines, result)
    for _ in range(_REREADS):
        if standing.process is None or standing.process.state != GONE or not _caught_up(header, lines, result):
            break
        standing = _settled(header, lines, result)
    return standing


def _settled(header: Mapping[str, Any] | None, lines: list[dict[str, Any]], result: Any) -> Standing:
    """:func:`settle` of the record as ``lines`` holds it."""
    from flowdsl.kernel import END_STATES
    from flowdsl.runtime.report import NOT_STARTED

    kinds = {e.get("type") for e in lines[since_resumed(lines):]}
    ended = result.status in END_STATES
    waiting = "run_finished" in kinds and "runtime_waiting" in kinds and "runtime_waited" not in kinds
    stopped = "aborted" if result.aborted is not None else \
        "parked" if getattr(result, "parked", None) is not None and not ended else \
        "unrecorded" if lines and lines[-1].get("type") == RECORD_FAILED and not ended else None
    process = None
    if waiting or (not ended and stopped not in ("aborted", "parked")):  # (a parked run's process let it go)
        process = judge(owner_of(header, lines))
    awaited: tuple[str, ...] = ()
    if waiting and process is not None and process.state == LIVE:
        # its runtime still waits for them: they are not in doubt (the record's reading of a wait cut short) until it
        # stops waiting with one unanswered
        awaited = tuple(task for item in result.in_doubt for task in item.get("task_ids") or ())
        result.in_doubt = []
    crashed = not ended and stopped is None and process is not None and process.state == GONE
    if crashed:
        assert process is not None
        result.crashed = process.said
        if result.status == NOT_STARTED:  # nothing ran: nothing to undo
            result.intervention = {"steps": []}
        else:
            _left_by_crash(result, lines, process)
    return Standing(ended=ended, stopped=stopped, crashed=crashed, waiting=waiting, process=process,
                    awaited=awaited)


def _caught_up(header: Mapping[str, Any] | None, lines: list[dict[str, Any]], result: Any) -> bool:
    """Whether the record, read again now that its process is gone, holds more than ``lines`` (the lines read
    before, then judged): then ``lines`` and ``result`` are made what it holds now (in place). False, changing
    nothing, when it holds the same, cannot be read or replayed again, or is not the record read (its header, or
    the lines read, are not there)."""
    from dataclasses import fields

    from flowdsl.runtime.rebuild import result_from_record
    from flowdsl.runtime.record import RecordLines, read_record

    path = getattr(result, "record_path", None)
    if path is None:
        return False
    try:
        again_header, again = read_record(path)
    except RecordError:  # removed meanwhile, say: what was read is all there is to judge
        return False
    before = (len(lines), getattr(lines, "resolutions", []), getattr(lines, "cut_short", False))
    if (len(again), again.resolutions, again.cut_short) == before:
        return False
    if again_header != header or list(again[:len(lines)]) != list(lines):
        return False
    try:
        fresh = result_from_record(again_header, again, path)
    except Exception:  # (it replayed before: what was read is judged, as show would have shown it)
        return False
    lines[:] = again
    if isinstance(lines, RecordLines):
        lines.line_numbers, lines.cut_short, lines.resolutions = again.line_numbers, again.cut_short, again.resolutions
    for field in fields(result):
        setattr(result, field.name, getattr(fresh, field.name))
    return True


def _left_by_crash(result: Any, lines: list[dict[str, Any]], process: Verdict) -> None:
    """What a run whose process died leaves, as a run stopped at once leaves it (``flowdsl.runtime.rebuild``)."""
    from flowdsl.kernel import left_to_undo
    from flowdsl.runtime.late import in_doubt_items

    plan, state = result.plan, result.state
    result.intervention = {"steps": left_to_undo(plan, state)}
    who = f" (pid {process.pid} on {process.host})" if process.pid is not None else ""
    result.in_doubt = in_doubt_items(plan, state, unanswered(state, lines), f"its process{who} died", result.events,
                                     any_end=True)


def unanswered(state: Mapping[str, Any], lines: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The attempts a record's run dispatched that never answered and that the run no longer counted in flight
    (``{task_id, step, attempt}``, in the order dispatched): attempts it had given up on (they timed out) whose
    worker was still running, as far as the record tells — a runtime feeds every answer, a cancel's too."""
    dispatched: dict[str, dict[str, Any]] = {}
    answered: set[Any] = set()
    for e in lines:
        kind = e.get("type")
        if kind in _DISPATCHES and isinstance(e.get("task_id"), str) and isinstance(e.get("step"), str):
            dispatched.setdefault(e["task_id"], {"task_id": e["task_id"], "step": e["step"],
                                                 "attempt": e.get("attempt")})
        elif kind in _ANSWERS:
            answered.add(e.get("task_id"))
    flight = state.get("tasks") or {}
    return [a for task_id, a in dispatched.items() if task_id not in answered and task_id not in flight
            and a["step"] in (state.get("nodes") or {})]
