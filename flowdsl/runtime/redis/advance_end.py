"""Ending runs: the end a process wrote counted and logged, and the results the kernel refused said.

Stage: runtime: redis. Imports ``flowdsl.kernel`` (the decision type), ``flowdsl.shown`` (logged text made inert)
and stdlib. :class:`Ending` is mixed into :class:`~flowdsl.runtime.redis.advance.Advancer` (whose ``finished``
count it keeps); :mod:`.advance_commit` calls it when a transition it wrote ended a run (:func:`_ends`), and
says through :func:`_said_refused` the results the kernel rejected. :func:`said_end` logs a run's end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flowdsl.kernel import Decision
from flowdsl.shown import visible

__all__ = ["Ending", "said_end"]

log = logging.getLogger("flowdsl.redis")


class Ending:
    """A run's end as this process wrote it: counted and logged (see the module doc); a mixin of ``Advancer``."""

    # what the Advancer provides
    finished: dict[str, int]

    def _ended(self, run_id: str, plan: dict[str, Any], state: dict[str, Any]) -> None:
        """This process wrote the transition that ended the run: counted, and logged (:func:`said_end`; a
        completed run costs the level check alone, at INFO)."""
        status = state["status"]
        self.finished[status] = self.finished.get(status, 0) + 1
        if status != "completed" or log.isEnabledFor(logging.DEBUG):
            said_end(run_id, plan, state)


#: at most this many characters of an error message, and this many steps left to undo, are logged at a run's end
_LOGGED_MESSAGE = 300
_LOGGED_STEPS = 10


def said_end(run_id: str, plan: dict[str, Any], state: dict[str, Any]) -> None:
    """Log a run's end, as the transition that ended it was written: WARNING for ``needs_intervention`` (the steps
    left to undo by hand, in order, each with its undo worker), INFO for ``failed``, ``compensated`` and
    ``cancelled`` (the error's type and message), DEBUG for ``completed``. Every record carries ``run_id``,
    ``flow`` and ``status`` as attributes (``extra``), and ``error_type`` or ``left_to_undo`` (the steps' keys)
    where it says them; text that is not flowdsl's own (an error message, names) is bounded and made inert
    (:func:`flowdsl.shown.visible`)."""
    status = str(state.get("status"))
    flow = visible(str((plan.get("flow") or {}).get("name") or "?"))
    extra: dict[str, Any] = {"run_id": run_id, "flow": flow, "status": status}
    if status == "needs_intervention":
        items = [item for item in (state.get("intervention") or {}).get("steps") or () if isinstance(item, dict)]
        extra["left_to_undo"] = [str(item.get("step")) for item in items]
        shown = [visible(f"{item.get('step')} (undo worker {item.get('worker')})") for item in items[:_LOGGED_STEPS]]
        if len(items) > _LOGGED_STEPS:
            shown.append(f"and {len(items) - _LOGGED_STEPS} more")
        log.warning("run %s (flow %s) ended needs_intervention: left to undo by hand, in this order: %s; "
                    "`flowdsl status %s` says how, `flowdsl resolve %s --backend redis` once done", run_id, flow,
                    ", ".join(shown) or "nothing listed", run_id, run_id, extra=extra)
    elif status == "completed":
        log.debug("run %s (flow %s) completed", run_id, flow, extra=extra)
    else:
        raw = state.get("error")
        error: dict[str, Any] = raw if isinstance(raw, dict) else {}
        kind = visible(str(error.get("type") or "?"))
        message = str(error.get("message") or "")
        if len(message) > _LOGGED_MESSAGE:
            message = message[:_LOGGED_MESSAGE - 1] + "…"
        extra["error_type"] = kind
        failed = f" at step {visible(state['failed_step'])}" if state.get("failed_step") else ""
        log.info("run %s (flow %s) ended %s%s: %s: %s", run_id, flow, status, failed, kind, visible(message),
                 extra=extra)


def _said_refused(on_refused: Callable[[str, str, str, str, dict[str, Any] | None], None], run_id: str,
                  task_id: str, event: dict[str, Any], decision: Decision) -> None:
    """Call ``on_refused`` when ``decision`` rejected ``event``, the result of ``task_id`` (``result_rejected``),
    with the late completion it made of it, if any."""
    rejected = late = None
    for emitted in decision.events:
        if emitted.get("task_id") == task_id:
            if emitted.get("type") == "result_rejected":
                rejected = emitted
            elif emitted.get("type") == "late_completion":
                late = emitted
    if rejected is not None:
        on_refused(run_id, task_id, str(event.get("type")), str(rejected.get("reason")), late)


def _ends(decision: Decision) -> bool:
    """Whether ``decision`` (whose state is an end state) ends the run: it says so (``run_finished``) — the run's
    end, or a late completion that turns a run that had ended ``needs_intervention`` (again). A late answer that
    changes nothing for a run that had ended does not: its transition leaves the run's ``finished`` time, its
    retention (a resolution among it) and its end's log line as they were."""
    return any(event.get("type") == "run_finished" for event in decision.events)

