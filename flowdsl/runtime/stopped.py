"""A local run whose process died: how a run record stands, and what a crashed run leaves to undo by hand.

Stage: runtime (shared), for ``flowdsl show``, ``flowdsl resolve`` and ``flowdsl prune``. Imports stdlib,
``.owner``, ``.record``, ``.report`` and ``.late`` (and the kernel's ``left_to_undo``, which ``.late`` holds already).

A local run lives in its process. When that process is killed (SIGKILL, the OOM killer, a restart) the run stops
where it stood and its record just ends: no ``run_finished``, no ``runtime_aborted``. :func:`settle` tells such a
record apart — the process its header names is gone (``.owner.judge``) — and gives it what a run stopped at once
gets: ``intervention``, every completed step with a compensation not undone in the order to undo it, then the
steps and undos that were in flight (``in_flight``: they may have taken effect), each with its worker, input and
idempotency keys (``kernel.left_to_undo``, as for an aborted run); and ``in_doubt``, the attempts the run had given
up on (they timed out) that never answered (:func:`unanswered`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flowdsl.runtime.owner import GONE, LIVE, Verdict, judge
from flowdsl.runtime.record import RECORD_FAILED, owner_of, since_resumed

__all__ = ["Standing", "settle", "unanswered"]

#: the input events that answer an attempt
_ANSWERS = ("task_succeeded", "task_failed", "task_cancelled")
#: the emitted events that dispatch one: a step's attempt (fallback attempts too), an undo's
_DISPATCHES = ("step_scheduled", "compensation_started")


@dataclass(frozen=True)
class Standing:
    """How a local run record stands, for the commands that act on it. ``ended``: the record holds the run's end (a
    ``run_finished``; or its input events give it); ``stopped``: it ends with a ``runtime_aborted`` line (stopped at
    once) or a ``record_failed`` one (the run went on unrecorded) before the run's end; ``crashed``: neither, and
    its process is gone (:func:`settle` gave the result its ``crashed`` reason and what is left); ``waiting``: it
    ends while its runtime waited, after the run's end, for attempts it had given up on. ``process`` is what the
    process its header names is, as far as can be told here (asked only when the record is not closed: it does not
    end the run, or it ends waiting)."""

    ended: bool
    stopped: str | None
    crashed: bool
    waiting: bool
    process: Verdict | None

    @property
    def live(self) -> bool:
        """Whether the record may still be written to: it is not closed, and its process runs."""
        return self.process is not None and self.process.state == LIVE

    @property
    def closed(self) -> bool:
        """Whether nothing will write to the record any more (besides ``flowdsl resolve``): its run ended (and no
        wait after the end is open), it was stopped at once, or its process is gone."""
        return (self.ended and not self.waiting) or self.stopped == "aborted" or (
            self.process is not None and self.process.state == GONE)


def settle(header: Mapping[str, Any] | None, lines: list[dict[str, Any]], result: Any) -> Standing:
    """How the record (``header``, ``lines``: from ``read_record``; ``result``: ``result_from_record`` of them)
    stands. A record that ends before its run did — no end, not stopped at once, writing it did not fail — whose
    process is gone is a crash: ``result`` gets its ``crashed`` reason, its ``intervention`` (what is left to undo
    by hand, as for a run stopped at once) and its ``in_doubt`` (attempts given up on that never answered)."""
    from flowdsl.kernel import END_STATES
    from flowdsl.runtime.report import NOT_STARTED

    kinds = {e.get("type") for e in lines[since_resumed(lines):]}
    ended = result.status in END_STATES
    waiting = "run_finished" in kinds and "runtime_waiting" in kinds and "runtime_waited" not in kinds
    stopped = "aborted" if result.aborted is not None else \
        "unrecorded" if lines and lines[-1].get("type") == RECORD_FAILED and not ended else None
    process = None
    if waiting or (not ended and stopped != "aborted"):
        process = judge(owner_of(header, lines))
    crashed = not ended and stopped is None and process is not None and process.state == GONE
    if crashed:
        assert process is not None
        result.crashed = process.said
        if result.status == NOT_STARTED:  # nothing ran: nothing to undo
            result.intervention = {"steps": []}
        else:
            _left_by_crash(result, lines, process)
    return Standing(ended=ended, stopped=stopped, crashed=crashed, waiting=waiting, process=process)


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
