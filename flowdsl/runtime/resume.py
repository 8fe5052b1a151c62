"""Resuming a local run whose process stopped before the run's end: the run goes on in this process, from its record.

Stage: runtime: local — :func:`resume_flow` and :func:`resume` (``flowdsl resume``). Imports the kernel
(``replay``, event names), stdlib, ``.owner`` and ``.record``; the local runtime (``.local``, ``.local_late``),
``.rebuild``, ``.stopped`` and ``.report`` inside the functions that use them.

A local run lives in its process. When that process dies (kill -9, the OOM killer, a reboot: the run is listed
``crashed``), stops the run at once (a second Ctrl-C: ``aborted``) or lets it go once it has nothing left but
waiting (``park``: ``parked``), the run stands where its record left it. Its
record holds every input event, so replaying them through the kernel gives the run's state back exactly
(docs/kernel.md, "Replay"); :func:`prepare_resumption` does that and finds what the run waited for:

- the attempts in flight (a step's, a fallback's, an undo's) run **again**, as the same attempt — same task id,
  attempt number and idempotency key — since what they did before their process stopped is not known (at least
  once, as on the Redis runtime after a worker's crash; a worker keyed on its idempotency key does its effect once);
  such an attempt is never cancelled (the local runtime's ``_must_answer``), so that its answer says what it did;
- the armed timers are armed again at the times they were due, but an attempt's timeout, which is given afresh to
  the attempt run again; those that fell due while the run stood (a retry's wait, a run timeout, a wait's end or
  deadline) fire at once, in the order they fell due, before anything sent to the resumed run (``signals=``): a
  deadline that passed while the process was down is never beaten by a signal sent at the resume;
- attempts the run had given up on (they timed out) are not waited for: their process is gone, and they with it;
  what they did is not known, so :meth:`Resumption.in_doubt` lists the steps for which that still matters once the
  resumed run ends (``.late.died_in_doubt``).

:meth:`Resumption.begin` then takes the record under its lock (``.record.locked_record``: two resumes of one run
never both go on with it), checks it has not changed since it was read, completes it — a last line cut short as the
process died is dropped, the events the kernel emitted for the last input event recorded but that were not written
are written — and appends a ``runtime_resumed`` line naming this process, which runs the run from there: ``flowdsl
runs`` and ``show`` then judge the run by this process. A run that ended, still runs, was resolved by hand, whose
record stopped where writing it failed (the run went on unrecorded), or that had not started is refused
(:class:`NotResumable`); so is one whose process cannot be told to be gone (another host), and one stopped at once
whose process still runs (a thread the stop abandoned may still run an attempt there), unless ``force``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from flowdsl.kernel import INPUT_EVENTS, replay
from flowdsl.runtime.late import died_in_doubt
from flowdsl.runtime.owner import GONE, LIVE, UNKNOWN, by_whom, judge, this_process
from flowdsl.runtime.record import (
    RESUMED,
    RecordError,
    encode_line,
    locked_record,
    owner_of,
    read_record,
    resumptions,
)

__all__ = ["CANCELLED_AS_RESUMED", "NotResumable", "Resumption", "prepare_resumption"]

#: the reason of the cancel that ``resume_flow(cancel=True)`` (``flowdsl resume --cancel``) applies as it resumes
CANCELLED_AS_RESUMED = "cancelled as it was resumed"


class NotResumable(Exception):
    """The run cannot be resumed (it may be resumed once it crashed, was stopped at once, or parked): ``kind``
    (``Ended``, ``StillRunning``, ``Resolved``, ``NotStarted``,
    ``Unrecorded``, ``CannotTell``, ``Changed``), the message, and ``status``, the state ``flowdsl runs`` lists
    the run in."""

    def __init__(self, kind: str, message: str, status: str | None = None):
        super().__init__(message)
        self.kind, self.status = kind, status


@dataclass
class Resumption:
    """A run read back from its record, to go on with in this process: its ``plan``, ``run_input`` and ``state``
    (replayed), the ``events`` it emitted (all of them, those the record lacked included), the ``dispatches`` to
    carry out again and the ``timers`` to arm again (commands, as the kernel gave them; an attempt's timeout due
    afresh from :meth:`begin`), and ``was``: how its process stopped (``crashed``, ``aborted``, ``parked`` — its
    process let it go, only waits being left —, or ``gone`` — told by ``force``)."""

    path: Path
    run_id: str
    plan: dict[str, Any]
    run_input: dict[str, Any]
    state: dict[str, Any]
    events: list[dict[str, Any]]
    dispatches: list[dict[str, Any]]
    timers: list[dict[str, Any]]
    was: str
    #: the spec file the run's plan was compiled from, as its record names it (its directory holds the worker
    #: modules), or None
    spec: str | None = None
    #: the record's bytes when read: :meth:`begin` goes on only with the record as it was then
    raw: bytes = field(repr=False, default=b"")
    #: the emitted events the record lacks (the last decision's, cut short as its process died)
    missing: list[dict[str, Any]] = field(repr=False, default_factory=list)
    #: after :meth:`begin`: each time the run was resumed, this one last (``RunResult.resumed``)
    resumed: list[dict[str, Any]] = field(default_factory=list)
    #: attempts the run had given up on (they timed out) that never answered before its process stopped
    #: (``{task_id, step, attempt}``), and how that process stopped (a clause): what they did is not known
    unanswered: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = "its process stopped"
    #: the latest time the record holds (ms): the resumed run's clock starts no earlier, whatever this host's says
    last_at: int = 0
    #: the model the run was started with (``--lm``), as its record names it, or None
    lm: str | None = None

    def begin(self, at: int) -> BinaryIO:
        """Take the record over (under its lock): complete it and append the ``runtime_resumed`` line (``at``: the
        run's clock now); returns the record, open for appending, for the run's recorder. :class:`NotResumable`
        (``Changed``) when the record is not as it was read — another resume took it, or its process wrote on —;
        ``RecordError`` when it cannot be written. Arms each attempt's timeout afresh from ``at``."""
        with locked_record(self.path, "resume") as record:
            if record.raw != self.raw:
                raise NotResumable("Changed", f"the record {self.path} changed while resume read it (another "
                                   "`flowdsl resume` took the run, or its process wrote on): nothing was resumed; "
                                   "see how it stands with `flowdsl show`", None)
            record.check_writable()
            line = {"type": RESUMED, "run_id": self.run_id, "at": at, "by": by_whom(), "was": self.was,
                    "process": this_process(),
                    "attempts": [{"task_id": c["task_id"], "step": c["step"], "attempt": c["attempt"]}
                                 for c in self.dispatches],
                    "unanswered": self.unanswered, "stopped": self.stopped}
            record.append(b"".join([*(encode_line(e) for e in self.missing), encode_line(line)]))
            self.resumed = resumptions([*record.lines, line])
            _unlock(record.fd)  # (the run goes on: resolve and prune may read it, and find it live)
            fh = os.fdopen(os.dup(record.fd), "ab", buffering=0)
        again = {c["task_id"] for c in self.dispatches}
        self.timers = [{**t, "due_at": at + int(t["delay_ms"])}
                       if t.get("purpose") == "attempt_timeout" and self.state["timers"][t["timer_id"]].get("task_id")
                       in again else t for t in self.timers]
        return fh

    def in_doubt(self, state: dict[str, Any], events: list[dict[str, Any]],
                 known: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``known`` (what the resumed run's runtime found in doubt), then what :attr:`unanswered` leaves in doubt
        as the run stands in ``state`` (``.late.died_in_doubt``)."""
        return [*known, *died_in_doubt(self.plan, state, self.unanswered, self.stopped, events,
                                       [item["step"] for item in known])]


def prepare_resumption(path: Path, *, force: bool = False) -> Resumption:
    """Read the record ``path`` and make ready to resume its run (:class:`Resumption`); nothing is written yet.

    :class:`NotResumable` says why the run cannot be resumed; ``RecordError`` (a ``NewerRecord`` too) that the record
    cannot be read, or does not replay."""
    from flowdsl.runtime.rebuild import record_result
    from flowdsl.runtime.report import NOT_STARTED
    from flowdsl.runtime.stopped import settle, unanswered

    run = path.name.removesuffix(".jsonl")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecordError(f"cannot read the run record {path}: {exc.strerror or exc}") from None
    header, lines = read_record(path, raw)
    result = record_result(header, lines, path)
    standing = settle(header, lines, result)
    status = str(result.status)
    if lines.resolutions:
        said = lines.resolutions[-1]
        raise NotResumable("Resolved", f"run {run} was resolved by hand ({said.get('by')}"
                           + (f": {said.get('note')}" if said.get("note") else "") + "): a person finished what it "
                           "left; resuming it would do that again", "resolved")
    process = standing.process
    if standing.live:
        raise NotResumable("StillRunning", f"run {run} is not over, and {process.said if process else ''}: it is "
                           f"still going ({status}); only a run whose process stopped can be resumed", status)
    if standing.ended:
        left = " (what it left to do by hand: `flowdsl show`; `flowdsl resolve` once done)" \
            if status == "needs_intervention" or result.in_doubt else ""
        raise NotResumable("Ended", f"run {run} ended {status}: there is nothing to resume{left}", status)
    if status == NOT_STARTED:
        raise NotResumable("NotStarted", f"run {run} had not started when its process stopped: no step ran; run "
                           f"it again, under another run id (or once its record {path} is removed)",
                           "crashed" if standing.crashed else status)
    if standing.stopped == "unrecorded":
        raise NotResumable("Unrecorded", f"run {run}'s record stops where writing it failed, and the run went on "
                           "unrecorded: what it did after that is not known, so it cannot go on from its record",
                           "unrecorded")
    if standing.stopped == "aborted" and not force:  # (settle() does not ask: a run stopped at once has ended there)
        process = judge(owner_of(header, lines))
        if process.state != GONE:
            raise NotResumable("StillRunning" if process.state == LIVE else "CannotTell",
                               f"run {run} was stopped at once, and {process.said}: attempts the stop abandoned may "
                               "still run there (a sync worker's thread); resume it once that process has ended, or "
                               "add --force if you know none does (an attempt running twice at once would make its "
                               "effect twice)", "aborted")
    if standing.crashed:
        was = "crashed"
    elif standing.stopped == "parked":  # (its process let it go, having nothing in flight: nothing to wait for)
        was = "parked"
    elif standing.stopped == "aborted":
        was = "aborted"
    elif process is not None and process.state == UNKNOWN and force:
        was = "gone"
    else:
        clause = process.said if process is not None else "its process cannot be told"
        raise NotResumable("CannotTell", f"run {run} has no end in its record, and {clause}; resume it only once "
                           "you know that process is gone: then add --force (two processes running one run would "
                           "run its steps twice)", status)
    plan = dict(header["plan"]) if header is not None else {}
    inputs = [e for e in lines if e.get("type") in ("start", *INPUT_EVENTS)]
    state, commands, emitted = replay(plan, inputs)
    last_seq = max((e["seq"] for e in lines if isinstance(e.get("seq"), int)), default=-1)
    dispatched: dict[str, dict[str, Any]] = {}
    armed: dict[str, dict[str, Any]] = {}
    for command in commands:
        if command["op"] == "dispatch":
            dispatched[command["task_id"]] = command
        elif command["op"] == "schedule_timer":
            armed[command["timer_id"]] = command
    dispatches = [dispatched[t] for t in state["tasks"] if t in dispatched]
    timers = [armed[t] for t in state["timers"] if t in armed]
    if not dispatches and not timers and not state.get("waits"):  # (the kernel never leaves a live run waiting on
        # nothing but a wait for a signal, which holds no timer without its deadline)
        raise RecordError(f"{path}: the run is {status} with no attempt in flight, no timer armed and no wait "
                          "waiting for a signal: its record does not say what the run waited for, and it cannot go "
                          "on from there")
    before = process if process is not None else judge(owner_of(header, lines))
    who = f" (pid {before.pid} on {before.host})" if before.pid is not None else ""
    stopped = {"crashed": f"its process{who} died", "aborted": f"the run was stopped at once in its process{who}",
               "gone": f"its process{who} stopped", "parked": f"its process{who} parked it"}[was]
    times = [at for e in lines if isinstance(at := e.get("at"), int) and not isinstance(at, bool)]
    named = (header or {}).get("lm")
    return Resumption(path=path, run_id=str(state["run_id"]), plan=plan, run_input=dict(inputs[0]["input"]),
                      state=state, events=emitted, dispatches=dispatches, timers=timers, was=was,
                      spec=spec if isinstance(spec := (header or {}).get("spec"), str) else None, raw=raw,
                      missing=[e for e in emitted if e["seq"] > last_seq], unanswered=unanswered(state, lines),
                      stopped=stopped, last_at=max(times, default=0), lm=named if isinstance(named, str) else None)


def _unlock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:
        return
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)


async def resume_flow(run: str | os.PathLike[str], *, runs_dir: str | Path | None = None,
                      lm: object | str | None = None,
                      on_event: Any = None, on_notice: Any = None, registry: Any = None, adapter: object | None = None,
                      handle_sigint: bool = False, import_workers: bool = True, lms: Any = None,
                      spec_path: str | os.PathLike[str] | None = None, handle_sigterm: bool = False,
                      late_grace: float | None = None, force: bool = False, signals: Any = None,
                      park: bool = False, cancel: bool | str = False) -> Any:
    """Resume, on the running event loop, the local run ``run`` (its id, in ``runs_dir``, or its record's path)
    whose process stopped before the run's end — it crashed, stopped the run at once, or parked it — and return its
    :class:`~flowdsl.runtime.report.RunResult` when it ends (module docstring: what runs again).

    The options are :func:`~flowdsl.runtime.local.run_flow`'s (``on_event`` is told the events emitted from here
    on; the result's ``events`` are all of the run's; ``spec_path`` defaults to the spec file the record names,
    whose directory is searched for the worker modules after the current one); ``force`` resumes a run whose
    process cannot be told to be gone from here (another host); ``signals`` are sent to the run as it is resumed,
    right after the timers that fell due while it stood (which fire first, in the order they fell due: a signal
    wait whose deadline passed then has failed, and its signal is rejected), before anything else (as
    :func:`~flowdsl.runtime.local.run_flow`'s are as a run starts); ``park`` parks it again once it has nothing
    left but waiting (as ``run_flow``'s); ``cancel`` (True, or the reason to give) cancels it as it is resumed,
    right after those timers and signals: its waits end, what completed is compensated. Raises
    :class:`NotResumable` (nothing was written), ``RecordError`` (the record cannot be read, replayed or written),
    and what :class:`~flowdsl.runtime.local.LocalRun` raises (its workers cannot be imported, are missing…) before
    anything runs."""
    from flowdsl.runtime.local import LocalRun
    from flowdsl.runtime.record import find_record

    path = find_record(os.fspath(run), runs_dir)
    resumption = prepare_resumption(path, force=force)
    local = LocalRun(resumption.plan, resumption.run_input, run_id=resumption.run_id,
                     lm=lm if lm is not None else resumption.lm, runs_dir=runs_dir,
                     on_event=on_event, on_notice=on_notice, registry=registry, adapter=adapter,
                     handle_sigint=handle_sigint, import_workers=import_workers, lms=lms,
                     spec_path=spec_path if spec_path is not None else resumption.spec,
                     handle_sigterm=handle_sigterm, late_grace=late_grace, resumption=resumption, signals=signals,
                     park=park)
    if cancel:
        local.cancel(cancel if isinstance(cancel, str) else CANCELLED_AS_RESUMED)
    return await local.run()


def resume(run: str | os.PathLike[str], **options: Any) -> Any:
    """:func:`resume_flow` on a new event loop, as :func:`~flowdsl.runtime.local.run` is :func:`run_flow` on one
    (``handle_sigint`` defaults to on in the main thread)."""
    import threading

    from flowdsl.runtime.local_late import _loop_running, run_on_new_loop

    if _loop_running():
        raise RuntimeError("flowdsl.resume() cannot be called from a running event loop (it runs one of its own): "
                           "in async code, use `await flowdsl.resume_flow(run, ...)`, which takes the same options")
    options.setdefault("handle_sigint", threading.current_thread() is threading.main_thread())
    return run_on_new_loop(resume_flow(run, **options))
