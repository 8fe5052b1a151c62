"""A run's outcome for people and programs: the result object and its JSON.

Stage: runtime (shared by every backend and the CLI). Imports the kernel's ``summary`` and ``END_STATES``,
``.timing`` (the ``timing`` object of the JSON), ``.parking`` (a parked run's status) and stdlib; nothing that
draws, and no runtime backend.

- :class:`RunResult` — what a runtime returns (and what ``--format json`` prints,
  via :meth:`RunResult.to_json`); ``flowdsl.runtime.rebuild.result_from_record`` rebuilds one from a
  run record by replaying its input events through the kernel.
- :data:`EXIT_CODES` and :func:`exit_code` — a run's exit code by its end state (:data:`PARKED_EXIT` for a run
  parked); :data:`NOT_STARTED`, the status of a run that never started.
- :func:`llm_calls_of` — the model calls of a run, gathered from its events.

What else shows a run lives beside it: ``.late`` (late answers, what is in doubt, what is left to undo by hand),
``.timing`` (wall time and the critical path), ``.summary`` (the end summary) and ``.timeline`` (the live view and
``flowdsl show``'s timeline).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowdsl.kernel import END_STATES, summary
from flowdsl.runtime.parking import PARKED_STATE
from flowdsl.runtime.timing import timing

__all__ = [
    "EXIT_CODES",
    "NOT_STARTED",
    "PARKED_EXIT",
    "RunResult",
    "exit_code",
    "llm_calls_of",
]


#: exit code of ``flowdsl run`` by end state (2 is a rejected spec, input or usage)
EXIT_CODES = {"completed": 0, "failed": 1, "compensated": 1, "cancelled": 1, "needs_intervention": 4}
#: the exit code of a run parked (``park=True``, ``flowdsl run --park``): not over; ``flowdsl resume`` goes on with it
PARKED_EXIT = 5
#: the status of a run that never started: a record holding only its header, a run aborted before its start
NOT_STARTED = "not_started"


def exit_code(status: str) -> int:
    """By the end state alone: 0 completed; 1 failed, compensated or cancelled; 4 needs_intervention (anything
    else: 1). A run's own code is :attr:`RunResult.exit_code`: 4 also when a step is in doubt."""
    return EXIT_CODES.get(status, 1)


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
    #: (a local run whose process stopped before its end, resumed by another: ``flowdsl resume``) each time it was
    #: resumed, in order: ``{at, by, was, pid, host, attempts}`` (``was``: ``crashed``, ``aborted``, ``parked`` or
    #: ``gone``; ``attempts``: the task ids run again)
    resumed: list[dict[str, Any]] = field(default_factory=list)
    #: (a local run parked: ``park=True``, ``flowdsl run --park``) what its ``runtime_parked`` line says — ``at``,
    #: ``waits`` (``{wait, signal, key?, due_at}`` each) and ``due_at``, the earliest timer
    #: (``flowdsl.runtime.parking``) —, or None: the run is not over, and ``flowdsl resume`` goes on with it
    parked: dict[str, Any] | None = None

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
        """As :func:`exit_code` of the status; 4 (a person must look) when a step's outcome is in doubt;
        :data:`PARKED_EXIT` when the run was parked."""
        if self.parked is not None:
            return PARKED_EXIT
        return EXIT_CODES["needs_intervention"] if self.in_doubt else exit_code(self.status)

    def _wait_fields(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """A wait's row adds the ``signal`` it takes (null for a timer), the ``key`` a keyed wait's instance takes
        it with (null for an unkeyed wait, and for a keyed one not started) and ``wait_ms`` (its timer's delay, or
        its signal's deadline, or null); a wait that waits is ``waiting`` (the kernel's ``running``)."""
        node = (self.plan.get("nodes") or {}).get(row["node"]) or {}
        signal = row.get("signal", node.get("signal"))
        fields: dict[str, Any] = {"signal": signal, "key": row.get("key"),
                                  "wait_ms": node.get("delay_ms") if signal is None else node.get("timeout_ms")}
        if row["status"] == "running":
            fields["status"] = "waiting"
        return fields

    def to_json(self) -> dict[str, Any]:
        """The ``--format json`` object: ``run_id``, ``status``, ``context``, ``steps``, ``compensated``,
        ``events``, plus ``flow``, ``error``, ``failed_step``, ``intervention``, ``in_doubt``, times, ``timing``,
        ``record`` and ``record_error``. ``context`` is the final context, null while the run has not ended (a record
        that ends early, a Redis run still going): the kernel sets it when the run ends. A run stopped at once
        (``aborted``) has ``status`` ``"aborted"``, ``stopped_in`` the state it stopped in and ``aborted`` the
        reason; its ``intervention`` lists what is left to undo by hand. So does a run whose process is gone
        (``crashed``): ``status`` ``"crashed"``, ``stopped_in``, and ``crashed`` saying which process. ``resumed``
        lists each time another process took the run up again (``flowdsl resume``; ``[]`` when never). A wait's row
        in ``steps`` also has ``signal``, ``key`` and ``wait_ms``, and the status ``waiting`` while it waits."""
        steps = {}
        for key, row in self.steps.items():
            item = {"status": row["status"], "attempts": row["attempts"], "started_at": row["started_at"],
                    "finished_at": row["finished_at"], "error": row["error"], "kind": row["kind"],
                    "node": row["node"]}
            if "compensation" in row:
                item["compensation"] = row["compensation"]
            if row.get("continued"):
                item["continued"] = True
                if row.get("completed_late"):
                    item["completed_late"] = True
            if row["kind"] == "wait":
                item.update(self._wait_fields(row))
            steps[key] = item
        stopped = {"stopped_in": self.status, "aborted": self.aborted} if self.aborted is not None else \
            {"stopped_in": self.status, "crashed": self.crashed} if self.crashed is not None else \
            {"stopped_in": self.status, "parked": self.parked} if self.parked is not None else {}
        said = "aborted" if self.aborted is not None else "crashed" if self.crashed is not None else \
            PARKED_STATE if self.parked is not None else self.status
        return {
            "run_id": self.run_id, "flow": self.flow, "status": said, **stopped,
            "error": self.error,
            "failed_step": self.failed_step, "context": self.context if self.status in END_STATES else None,
            "steps": steps,
            "compensated": self.compensated, "intervention": self.intervention, "in_doubt": self.in_doubt,
            "started_at": self.started_at, "finished_at": self.finished_at, "timing": timing(self),
            "record": str(self.record_path) if self.record_path else None, "record_error": self.record_error,
            "resumed": self.resumed, "events": self.events,
        }


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
