"""The local runtime: one run, in-process, on asyncio — a thin I/O shell around the kernel.

Stage: runtime backend. Imports the kernel, ``flowdsl.runtime.execute`` (to carry out dispatches), ``.plancheck``
(the shape of a plan handed in), ``.inputs`` (:func:`check_input`), ``.record`` (run records), ``.report`` (the
result object), ``.late`` (the ``late_grace`` bound), ``.signals``, ``flowdsl.workers`` and the modules of
:class:`LocalRun` listed below (``.local_stop`` imports ``.summary``, for its ``show_command``; no rich at import).
It decides nothing about the run: every decision is the kernel's (docs/kernel.md); this module turns its commands
into asyncio work and the outcomes back into input events::

    dispatch        -> an asyncio task awaiting execute(); its answer is fed back
    schedule_timer  -> loop.call_later(...) feeding timer_fired (a deadline held a few turns for an answer
                       already due: a thread that returned before it, or, fired late, attempts woken with it;
                       a sync attempt still queued for a thread is failed saying so instead: _fire)
    cancel_timer    -> the handle is cancelled
    cancel_task     -> task.cancel(), answered by task_cancelled (or by the real
                       result when the work finished anyway; a sync worker's
                       thread cannot be stopped, so a run being aborted waits for it,
                       and one that timed out is still answered while the run is live)
    finish          -> the run is over; but while an attempt the run gave up on (it timed
                       out: a sync worker's thread, or an async worker ignoring its
                       cancel) still runs a compensable step, whose success
                       would be a late completion (the step did not succeed, or
                       its undo has begun), its end is held for it, at most
                       ``late_grace`` seconds: what has not answered then is in doubt
                       (``RunResult.in_doubt``)

Input events carry ``at`` = the wall clock in integer milliseconds (a monotonic clock anchored at the run's start).
Every input event — a ``signal`` sent to a wait (:meth:`LocalRun.signal`) too — and every emitted event goes to the
run record (``.flowdsl/runs/<run_id>.jsonl``, after a header with the plan and the input), so ``kernel.replay``
over the recorded input events reproduces the run's decisions exactly.

Cancelling: :meth:`LocalRun.cancel` (and, with ``handle_sigint``, the first
Ctrl-C; with ``handle_sigterm``, the first SIGTERM or SIGHUP) feeds ``cancel_requested``: in-flight steps are
cancelled and every completed step with a compensation is undone, then the run ends ``cancelled``.
:meth:`LocalRun.abort` (a second Ctrl-C or SIGTERM — a SIGHUP never counts —, or cancelling the task awaiting
the run) stops at once, compensating nothing; the record then ends with a ``runtime_aborted`` line. Either one
asked before the run has started is held: a cancel is applied as the run starts (its first dispatches are held,
never carried out, and answered ``task_cancelled``), an abort makes :meth:`LocalRun.run` raise at once.

A record write that fails mid-run (a full disk) closes the record and the run goes on unrecorded
(``RunResult.record_error`` says why): a run must never stop half-way, its state moved on and its commands not
carried out.

The run is :class:`LocalRun`: here its options, :meth:`LocalRun.run` and the feeding loop (each input event
applied through the kernel, what it decided recorded and carried out, a dispatch started), and the entry points
(:func:`run_flow`, :func:`run`, :func:`check_input`). The rest of it is in modules of their own, five mixins of
:class:`LocalRun` and the errors they share; of one another they import only the attempt (``.local_attempts``)
and ``RunAborted`` (``.local_errors``), and only this module puts them together:

- :mod:`.local_attempts` — the attempts: each in a task of its own, a sync worker's thread, ``cancel_task``, and
  the timers, a deadline held for an answer already due;
- :mod:`.local_late` — the run's end, held for the attempts it gave up on that may still answer (``late_grace``),
  and :func:`run_on_new_loop`, which closes the loop without those left when the run has returned;
- :mod:`.local_stop` — :meth:`LocalRun.cancel`, :meth:`LocalRun.abort`, a hard failure, and Ctrl-C, SIGTERM and
  SIGHUP;
- :mod:`.local_record` — the run record: created whole, written, given up when a write fails;
- :mod:`.local_waits` — signals sent to the run (:meth:`LocalRun.signal`, ``signals=``) and what the run says of
  its waits;
- :mod:`.local_errors` — :class:`RunAborted`, :class:`WorkersMissing` and :class:`RunIdInUse`, and the run ids
  in progress in this process.

What those modules define that other code uses (:func:`run_on_new_loop`, the exceptions, ``NOTICED``…) is
imported from this module, its documented home.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowdsl.kernel import INPUT_EVENTS, Decision, apply, check_seed, prepare, start_event, start_run
from flowdsl.runtime.execute import (
    NotJSON,
    copy_json,
    execute,
    json_problem,
    marking_sigint,
    missing_workers,
    plain_json,
    warm_llm,
)
from flowdsl.runtime.inputs import InputError
from flowdsl.runtime.inputs import check_input as check_plan_input
from flowdsl.runtime.late import LATE_GRACE, late_grace_seconds
from flowdsl.runtime.local_attempts import _EAGER, Attempts, _Attempt, _attempt_task
from flowdsl.runtime.local_errors import (
    _LIVE,
    RunAborted,
    RunIdInUse,
    WorkersMissing,
    _claim,
    _registered_elsewhere,
    _release_id,
)
from flowdsl.runtime.local_late import ABANDON_S, LateAnswers, _loop_running, run_on_new_loop
from flowdsl.runtime.local_late import CANCEL_SETTLE as CANCEL_SETTLE
from flowdsl.runtime.local_record import NOTICED as NOTICED
from flowdsl.runtime.local_record import Recording
from flowdsl.runtime.local_stop import Stopping
from flowdsl.runtime.local_waits import Signalling, SignalOutcome, SignalSent
from flowdsl.runtime.plancheck import require_plan
from flowdsl.runtime.record import RunRecorder, check_records_dir, check_run_id, new_run_id, record_path
from flowdsl.runtime.report import NOT_STARTED, RunResult
from flowdsl.runtime.signal_checks import Signals
from flowdsl.runtime.signals import TERM_SIGNALS, signal_said
from flowdsl.workers import WorkerImportError, WorkerRegistry, import_worker_modules

if TYPE_CHECKING:
    from flowdsl.runtime.resume import Resumption

__all__ = ["ABANDON_S", "LATE_GRACE", "RECORDED_INPUTS", "TERM_SIGNALS", "InputError", "LocalRun", "RunAborted",
           "RunIdInUse", "SignalOutcome", "SignalSent", "WorkersMissing", "check_input", "new_run_id", "run",
           "run_flow", "run_on_new_loop", "signal_said"]

#: the record lines that are kernel input events (``start`` first): what ``kernel.replay`` takes
RECORDED_INPUTS = frozenset({"start", *INPUT_EVENTS})

EventHook = Callable[[dict[str, Any]], None]
NoticeHook = Callable[[str], None]


#: held while a plan's kernel indexes are looked up or built (the kernel's cache is not safe from several threads)
_PREPARING = threading.Lock()
#: input events applied in a row before the runtime lets the event loop run other callbacks
_BURST = 64
_log = logging.getLogger("flowdsl.local")


class LocalRun(Attempts, LateAnswers, Stopping, Recording, Signalling):
    """One run of a plan on the running event loop. Create it, then ``await run.run()`` once.

    Parameters are those of :func:`run_flow`. Raises ``TypeError`` when ``plan`` is not a dict or ``run_input``
    not a dict, ``PlanError`` (a ``ValueError``) naming the field when ``plan`` is not shaped like an execution
    plan, :class:`WorkersMissing` when a worker the plan names is not registered,
    :class:`~flowdsl.runtime.inputs.InputError` (a ``ValueError``) for a run input that is not JSON, ``ValueError``
    for a bad run id, ``FileExistsError`` when a record for ``run_id`` already exists, ``WorkerImportError`` when
    ``import_workers`` is true and a worker module of the plan cannot be imported, and what :meth:`signal` raises
    for one of ``signals``.
    """

    def __init__(self, plan: dict[str, Any], run_input: dict[str, Any], *, run_id: str | None = None,
                 lm: object | str | None = None, record: bool = True, runs_dir: str | Path | None = None,
                 on_event: EventHook | None = None, on_notice: NoticeHook | None = None,
                 seed: int | None = None, registry: WorkerRegistry | None = None, adapter: object | None = None,
                 handle_sigint: bool = False, import_workers: bool = True, lms: Mapping[str, object] | None = None,
                 spec_path: str | os.PathLike[str] | None = None, handle_sigterm: bool = False,
                 late_grace: float | None = None, resumption: Resumption | None = None,
                 signals: Signals | None = None, park: bool = False):
        require_plan(plan)
        if not isinstance(park, bool):
            raise TypeError(f"park must be a bool; got {type(park).__name__}")
        if park and not record:
            raise ValueError("a parked run goes on from its record: park=True needs record=True")
        if not isinstance(run_input, dict):
            raise TypeError(f"run_input must be a dict (a JSON object); got {type(run_input).__name__}")
        if run_id is not None and not isinstance(run_id, str):
            raise TypeError(f"run_id must be a string or None; got {type(run_id).__name__}")
        for name, path in (("spec_path", spec_path), ("runs_dir", runs_dir)):
            if path is not None and not isinstance(path, str | os.PathLike):  # (bytes made a directory "b'")
                raise TypeError(f"{name} must be a str, an os.PathLike or None; got {type(path).__name__}")
        for name, hook in (("on_event", on_event), ("on_notice", on_notice)):
            if hook is not None and (not callable(hook) or inspect.iscoroutinefunction(hook)):
                raise TypeError(f"{name} must be a plain function or None (it is called, not awaited); got "
                                + ("an async function" if callable(hook) else type(hook).__name__))
        if registry is not None and not isinstance(registry, WorkerRegistry):  # ({} stood for the default one)
            raise TypeError(f"registry must be a flowdsl.workers.WorkerRegistry or None; got "
                            f"{type(registry).__name__}")
        if import_workers:  # from the current directory, then the spec's, as `flowdsl run` does (checks.py)
            spec_dir = os.path.dirname(os.path.abspath(os.fspath(spec_path))) if spec_path is not None else None
            try:
                import_worker_modules(plan["flow"].get("workers") or (), os.getcwd(), (spec_dir,))
            except WorkerImportError as exc:
                if exc.found or spec_dir is not None:
                    raise
                raise WorkerImportError(exc.module, f"{exc.reason}; give spec_path= (the spec file) to search "
                                        "its directory too", found=False, searched=exc.searched,
                                        suggestion=exc.suggestion) from None
        #: the spec file the plan was compiled from, when given: named in the record, where ``flowdsl resume``
        #: finds the worker modules again
        self.spec_path = os.path.abspath(os.fspath(spec_path)) if spec_path is not None else None
        self.late_grace = late_grace_seconds(late_grace)
        problems = missing_workers(plan, registry)
        if problems:
            raise WorkersMissing(problems, elsewhere=_registered_elsewhere(plan, registry))
        try:  # the run's own plain copy: what the caller keeps is not shared with the run
            self.run_input: dict[str, Any] = plain_json(run_input)
        except NotJSON as exc:
            raise InputError(f"the run input is not a JSON object: {exc}") from None
        self.plan = plan
        with _PREPARING:  # the kernel's indexes of the plan, built once (cached by the plan's identity) and handed
            self._program = prepare(plan)  # to every apply(): not looked up again at each event
        self.run_id = run_id if run_id is not None else new_run_id(plan)
        self._init_signals(signals)
        if self.run_id in _LIVE:  # (checked again, and taken, as the run starts: run())
            raise RunIdInUse(self.run_id)
        #: the run read back from its record, to go on with (:func:`flowdsl.runtime.resume.resume_flow`), or None;
        #: and its attempts run again, which are never cancelled nor taken back (:meth:`_cancel_task`)
        self._resume = resumption
        self._must_answer: set[str] = set()
        self.record_path: Path | None = record_path(self.run_id, runs_dir) if record else None
        if resumption is not None:
            self.record_path = resumption.path
        elif self.record_path is not None:
            if self.record_path.exists():
                raise FileExistsError(f"a record of run '{self.run_id}' already exists: {self.record_path}")
            check_records_dir(self.record_path)
        if not record:
            check_run_id(self.run_id)  # still check the id's shape
        self.runs_dir = runs_dir
        self.lm = lm
        self.lms = lms
        check_seed(seed)
        self.seed = seed
        self.registry = registry
        self.adapter = adapter
        self.handle_sigint = handle_sigint
        self.handle_sigterm = handle_sigterm
        self.on_event = on_event
        self.on_notice = on_notice
        self.state: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self._tasks: dict[str, _Attempt] = {}
        self._inbox: deque[dict[str, Any]] = deque()
        self._draining = False
        #: the armed timers' handles (a timer held back a turn of the loop, :meth:`_fire`, is a plain ``Handle``)
        self._timers: dict[str, asyncio.Handle] = {}
        self._recorder: RunRecorder | None = None
        self._done: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finished = False
        self._loop_thread: int | None = None
        self._started = False
        self._interrupts = 0
        #: the cancels and aborts asked from other threads, handed to the loop, not yet arrived (no parking till then)
        self._stops_coming = 0
        self._signals: list[int] = []  # the stop signals this run took, in the order it took them
        #: what cancel() or abort() asked before the run started: ("cancel" | "abort", reason)
        self._early: tuple[str, str] | None = None
        #: held while cancel() or abort() decides, from any thread, between holding its request and handing it to
        #: the run's loop, and while run() makes the loop known: a request is never held after run() looked
        self._handoff = threading.RLock()
        self._holding = False  # dispatches are held, not carried out (a cancel asked before the start)
        self._held: dict[str, dict[str, Any]] = {}
        #: why the run record is incomplete (a write failed: the run went on unrecorded), or None
        self.record_error: str | None = None
        #: after the run's end: the attempts it gave up on that its end is held for (None: not held), and the bound
        self._lingering: dict[str, _Attempt] | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        #: the quiet first part of that wait, for async attempts only, which answer their cancel at once unless they
        #: ignore it (then the wait is said and recorded): its timer, and whether the wait has been said
        self._settle_timer: asyncio.TimerHandle | None = None
        self._wait_said = False
        #: the steps whose outcome is unknown when the runtime stopped waiting (RunResult.in_doubt)
        self.in_doubt: list[dict[str, Any]] = []
        self._stop_reason: str | None = None  # why the run was stopped at once (_stop)
        #: park the run once it has nothing left but waiting (:meth:`_park_if_idle`); the due time of each timer
        #: armed (kept only then: the parked line says when the run goes on); the parked line, once parked
        self._park = park
        self._due: dict[str, int] = {}
        self.parked: dict[str, Any] | None = None
        self._marking: contextlib.AbstractContextManager[None] | None = None
        self._perf0 = 0.0
        self._wall0 = 0.0

    # --- the public face ----------------------------------------------------------------

    async def run(self) -> RunResult:
        """Run to an end state and return the result.

        A plan with LLM steps that ask a model by name has DSPy imported and those model strings checked first,
        before the run's clock starts (``on_notice`` is told when that takes a while): a step's ``timeout`` then
        measures its model call, not the import.

        Raises :class:`RunAborted` after :meth:`abort` (asked before the run started: at once, nothing having
        run or been recorded), :class:`RunIdInUse` when another run of this id is in progress in this process
        (nothing runs), and ``RecordWriteError`` (an ``OSError``) when the record cannot be created or
        its first lines written (then nothing ran and no record is left). The record appears with its first lines
        or not at all, and a ``KeyboardInterrupt`` before the run's first step (a stop signal as it starts) leaves
        none either: nothing ran. A record that cannot be written later
        does not stop the run: it goes on unrecorded, and the result's ``record_error`` says why the record is
        incomplete.
        """
        if self._started:
            raise RuntimeError("a LocalRun runs once")
        self._started = True
        _claim(self.run_id)
        try:
            return await self._run()
        finally:
            _release_id(self.run_id)
            self._signals_unsent()

    async def _run(self) -> RunResult:
        # before the run's clock starts (a cancel or abort meanwhile is one asked before the start)
        await warm_llm(self.plan, lm=self.lm, lms=self.lms, notice=self._notice)
        with self._handoff:  # from here on, cancel() and abort() go to the loop
            if self._early is not None and self._early[0] == "abort":
                self._finished = True
                raise RunAborted(self.run_id, NOT_STARTED, None)
            try:
                loop = self._loop = asyncio.get_running_loop()
            except RuntimeError:  # awaited from trio, curio, or a coroutine driven by hand
                raise RuntimeError("flowdsl runs on asyncio: no asyncio event loop is running in this thread "
                                   "(under trio, run the flow in a thread with flowdsl.run(), or through "
                                   "trio-asyncio)") from None
            self._loop_thread = threading.get_ident()
        self._done = loop.create_future()
        self._perf0, self._wall0 = time.perf_counter(), time.time() * 1000.0
        if self._resume is not None:  # a clock behind the record's (another host's, one set back) never runs backwards
            self._wall0 = max(self._wall0, float(self._resume.last_at))
        at = self._now()
        start: dict[str, Any] | None = None
        if self._resume is not None:
            self._recorder = RunRecorder.appending(self._resume.path, self._resume.begin(at))
        else:
            start = start_event(self.run_id, self.run_input, at=at, seed=self.seed)
        begun = False  # whether the run's first step may have been taken: its record is then kept whatever comes
        try:
            if start is not None and self.record_path is not None:
                self._open_record(start)
            self._install_signals()
            if signal.SIGINT not in self._signals:  # a real Ctrl-C raising in a worker stops the run, not the step
                self._marking = marking_sigint()
                self._marking.__enter__()
            begun = True
            self._draining = True
            # cancelled before it started: call no worker — but a resumed run's attempts in flight, whose answer must
            # say what their first run did (_must_answer)
            self._holding = self._early is not None and self._resume is None
            try:
                if self._resume is not None:
                    self._carry_out_again(self._resume)
                else:
                    self._absorb(start_run(self._program, self.run_id, copy_json(self.run_input), at=at,
                                           seed=self.seed))
            except Exception as exc:  # a plan the shape check let through but the kernel cannot run
                self._fail_hard(exc)
            finally:
                self._draining = self._holding = False
            self._send_held(self._resume is not None)
            if self._early is not None and not self._finished:
                self._inbox.append({"type": "cancel_requested", "reason": self._early[1]})
            self._drain()
            try:
                await self._done
            except (asyncio.CancelledError, KeyboardInterrupt) as exc:  # (a real Ctrl-C a worker's task handed on)
                cancelled = isinstance(exc, asyncio.CancelledError)
                if self._lingering is not None:  # the run had ended: only the wait for its late answers stops
                    self._stop_waiting("the task running the run was cancelled" if cancelled else
                                       signal_said(signal.SIGINT))
                elif not self._finished:
                    self._stop("the task running it was cancelled" if cancelled else signal_said(signal.SIGINT))
                    try:  # (what is raised stays the CancelledError or KeyboardInterrupt)
                        self._warn_stopped(cancelled)
                    except Exception as warn_exc:
                        _log.warning("run %s was stopped at once (%s); saying what it left to undo failed: %r",
                                     self.run_id, self._stop_reason, warn_exc)
                raise
            wall_ms = (time.perf_counter() - self._perf0) * 1000.0
            if self._resume is not None and self.state.get("finished_at") is not None:  # (across the outage)
                wall_ms = float(self.state["finished_at"] - self.state["started_at"])
        except BaseException:
            if not begun and self._resume is None:  # a stop signal (KeyboardInterrupt) before anything ran: the
                self._discard_record()  # header and start line of a run that never began would be listed crashed
            raise
        finally:
            self._remove_signals()
            if self._marking is not None:
                self._marking.__exit__(None, None, None)
                self._marking = None
            if self._recorder is not None:
                try:
                    self._recorder.close()
                except OSError as exc:  # its last lines could not be written
                    self._record_failed(exc)
        result = RunResult.from_state(self.plan, self.state, self.events, wall_ms=wall_ms,
                                      record_path=self.record_path, record_error=self.record_error)
        result.in_doubt = self.in_doubt
        result.parked = self.parked
        if self._resume is not None:
            result.resumed = self._resume.resumed
            result.in_doubt = self._resume.in_doubt(self.state, self.events, self.in_doubt)
        return result

    @property
    def status(self) -> str:
        """The run's state now: ``starting`` before it has started, then the kernel's (``running``,
        ``compensating``…, an end state once over)."""
        return str(self.state.get("status", "starting"))

    @property
    def ended(self) -> bool:
        """Whether the run is over: it reached its end state (and stopped waiting for the attempts it gave up on),
        or was stopped at once. From then on a stop signal it takes changes nothing, and once it has given the
        signals back (as :meth:`run` returns) its result is all there is to report: ``flowdsl run`` holds them
        until that is written."""
        return self._finished

    # --- feeding the kernel ---------------------------------------------------------------

    def _now(self) -> int:
        return int(self._clock())

    def _clock(self) -> float:
        """The run's clock, in milliseconds (``_now`` without the rounding); any thread may read it."""
        return self._wall0 + (time.perf_counter() - self._perf0) * 1000.0

    def _carry_out_again(self, resumption: Resumption) -> None:
        """A resumed run: its state as replayed from its record, its timers armed again and the attempts it had in
        flight carried out again (``.resume``). The timers that fell due while the run stood (a retry's backoff, a
        wait's end, a signal wait's deadline, the run's timeout) fire here, in the order they fell due — before
        anything sent to the resumed run (``signals=``, ``--signal``: applied next, :meth:`_send_held`) and before
        the answers of the attempts run again: a deadline that passed while the process was down is never beaten
        by a signal sent at the resume (as on Redis, where it fires as a worker takes the run up again). What they
        dispatch is carried out once they have all fired."""
        self.state = resumption.state
        self.events = list(resumption.events)
        self._must_answer = {command["task_id"] for command in resumption.dispatches}
        now = self._now()
        # (an attempt's timeout is given afresh from the resume, Resumption.begin: never overdue here)
        overdue = sorted((c for c in resumption.timers if c["due_at"] <= now
                          and self.state["timers"].get(c["timer_id"], {}).get("purpose") != "attempt_timeout"),
                         key=lambda c: c["due_at"])  # (stable: timers due at once keep the kernel's order)
        for command in resumption.timers:
            if not any(command is c for c in overdue):
                self._schedule(command)
        for command in resumption.dispatches:
            self._dispatch(command)
        # what the overdue timers start waits until they have all fired: a step one of them starts is never called
        # once a later one (the run's timeout, due before the step could have started) has stopped the run — it is
        # answered task_cancelled, as the kernel then asks (_cancel_task)
        self._holding = True
        try:
            for command in overdue:
                if self._finished:
                    return
                if command["timer_id"] in self.state["timers"]:  # (an earlier one may have cancelled it: the run's
                    self._apply({"type": "timer_fired", "timer_id": command["timer_id"]})  # timeout, a wait's)
        finally:
            self._holding = False
        held, self._held = self._held, {}
        for command in held.values():
            if not self._finished and command["task_id"] in self.state["tasks"]:
                self._dispatch(command)

    def _feed(self, event: dict[str, Any]) -> None:
        """Queue one input event; apply it now unless a decision is being carried out (then after it)."""
        self._inbox.append(event)
        if not self._draining:
            self._drain()

    def _drain(self) -> None:
        """Apply queued input events one at a time, in order; yield to the loop after a burst."""
        self._draining = True
        try:
            burst = 0
            while self._inbox and not self._finished:
                if burst == _BURST:  # a long chain of steps that never wait: let timers and signals in
                    assert self._loop is not None
                    self._loop.call_soon(self._drain)
                    return
                burst += 1
                self._apply(self._inbox.popleft())
            if self._park and not self._finished:
                self._park_if_idle()
        finally:
            self._draining = False
            if self._recorder is not None:
                try:
                    self._recorder.flush()
                except OSError as exc:
                    self._record_failed(exc)

    def _apply(self, event: dict[str, Any]) -> None:
        """Apply one input event and carry out what the kernel decided."""
        event["at"] = self._now()
        try:
            decision = apply(self._program, self.state, event)
        except Exception as exc:  # a kernel bug: stop the run loudly rather than hang
            self._write(event)
            self._fail_hard(exc)
            return
        try:
            self._absorb(decision, event)
        except Exception as exc:  # a runtime bug: raised here, it would kill the task answering an attempt
            self._fail_hard(exc, "carrying out a decision of")  # (the run would hang) or escape run() half-way

    def _absorb(self, decision: Decision, cause: dict[str, Any] | None = None) -> None:
        self.state = decision.state
        events = decision.events
        if self._recorder is not None:  # the input event, then what it caused (flushed after the burst)
            try:
                self._recorder.write_many((cause, *events) if cause is not None else events)
            except Exception as exc:  # not only OSError: a line the encoder refuses must not stop the run either
                self._record_failed(exc)
        self.events.extend(events)
        if cause is not None and cause["type"] == "signal":
            self._signal_answered(cause, events)
        hook = self.on_event
        if hook is not None:
            for event in events:
                try:
                    hook(event)
                except (Exception, asyncio.CancelledError, GeneratorExit) as exc:
                    # a broken observer must not break the run (a CancelledError from it — a cancelled future's
                    # result() — killed the attempt's task and left the run waiting for ever)
                    self.on_event = None
                    _log.warning("run %s: the on_event hook raised %s: %s; it is no longer called", self.run_id,
                                 type(exc).__name__, exc, exc_info=exc)
                    self._notice("the on_event hook raised; it is no longer called")
                    break
            if self._finished:
                return  # the hook stopped the run at once (abort()): nothing more of this decision is carried out
        if self._program.signals:
            self._say_waits(events)
        for command in decision.commands:
            op = command["op"]
            if op == "dispatch":
                self._dispatch(command)
            elif op == "schedule_timer":
                self._schedule(command)
            elif op == "cancel_timer":
                handle = self._timers.pop(command["timer_id"], None)
                if handle is not None:
                    handle.cancel()
            elif op == "cancel_task":
                self._cancel_task(command["task_id"])
            elif op == "finish":
                self._finish()

    # --- commands ---------------------------------------------------------------------------

    def _dispatch(self, command: dict[str, Any]) -> None:
        assert self._loop is not None
        if self._holding:  # the run was cancelled before it started: this attempt is cancelled, never run
            self._held[command["task_id"]] = command
            return
        attempt = _Attempt(command)
        self._tasks[command["task_id"]] = attempt
        if _EAGER and self._recorder is not None:  # the worker is called right here, inside this burst: its
            try:  # dispatch goes to disk first, as it does before the loop's next turn where tasks start lazily
                self._recorder.flush()
            except OSError as exc:
                self._record_failed(exc)
        attempt.task = _attempt_task(self._loop, self._attempt(attempt, execute(
            command, registry=self.registry, lm=self.lm, lms=self.lms, adapter=self.adapter)))


def check_input(plan: dict[str, Any], run_input: Any) -> None:
    """Check a run input against the plan's input schema before starting anything, as ``flowdsl run`` does:
    raises :class:`~flowdsl.runtime.inputs.InputError` (``flowdsl.InputError``) listing every violation, each
    with its JSON path (``at /amount: 'x' is not of type 'number'``), or saying why the input is not a JSON
    object at all. A web app can answer 400 with it; a run started with a bad input instead writes a record (or
    a Redis run) and ends ``failed`` (``InputInvalid``), naming one violation only.

    Raises ``TypeError`` / ``PlanError`` for a ``plan`` that is not an execution plan (as :func:`run_flow`).
    """
    require_plan(plan)
    if not isinstance(run_input, dict):
        raise InputError(f"the run input must be a JSON object (a dict), got {type(run_input).__name__}")
    problem = json_problem(run_input)
    if problem is not None:
        raise InputError(f"the run input is not a JSON object: {problem}")
    check_plan_input(plan, run_input)


async def run_flow(plan: dict[str, Any], run_input: dict[str, Any], *, run_id: str | None = None,
                   lm: object | str | None = None, record: bool = True, runs_dir: str | Path | None = None,
                   on_event: EventHook | None = None, on_notice: NoticeHook | None = None,
                   seed: int | None = None, registry: WorkerRegistry | None = None, adapter: object | None = None,
                   handle_sigint: bool = False, import_workers: bool = True,
                   lms: Mapping[str, object] | None = None,
                   spec_path: str | os.PathLike[str] | None = None, handle_sigterm: bool = False,
                   late_grace: float | None = None, signals: Signals | None = None,
                   park: bool = False) -> RunResult:
    """Run ``plan`` with ``run_input`` on the running event loop and return its :class:`RunResult`.

    - ``run_id``: default :func:`new_run_id`; it prefixes every idempotency key.
    - ``lm``: the model for LLM steps that name none (``--lm``): a model string
      or a ``dspy.BaseLM``; ``adapter``: a DSPy adapter for them.
    - ``lms``: LM objects by model name: a step whose model (its ``llm.lm``,
      ``lm``, ``defaults.llm.lm`` or ``$FLOWDSL_LM``) is a key uses that object
      instead of ``dspy.LM(name)`` — custom engines, test models.
    - ``record``: write ``<runs_dir>/<run_id>.jsonl`` (``runs_dir`` default:
      ``$FLOWDSL_RUNS_DIR`` or ``.flowdsl/runs``).
    - ``on_event``: called with every event the kernel emits, in order;
      ``on_notice``: called with a sentence when the runtime has something to say
      (Ctrl-C handling).
    - ``seed``: retry jitter seed (default: derived from the run id).
    - ``registry``: where workers are looked up (default: the process-wide one);
      ``import_workers``: import the plan's worker modules first, from the current
      directory, then from the directory of ``spec_path`` (the spec file the plan
      was compiled from, when given), as ``flowdsl run`` does.
    - ``handle_sigint``: Ctrl-C cancels the run (and compensates); a second one aborts (raises
      :class:`RunAborted`, whose ``result.intervention`` lists what is left to undo by hand).
    - ``handle_sigterm``: SIGTERM and SIGHUP do the same, but a SIGHUP only ever cancels (a closing terminal
      may send two; it never aborts) (off by default: an application owns its SIGTERM;
      ``flowdsl run`` turns it on). Both take the signal in the main thread only, while the run goes, leave
      an ignored signal ignored, and put back the handler that was there.
    - ``late_grace``: seconds (0 to 365 days) the run's end is held for attempts it gave up on (they timed out)
      that still run — a sync worker's thread, an async worker ignoring its cancel — and may still complete a
      step with a compensation: a success is fed as a late
      completion (the run turns ``needs_intervention``); what has not answered by then (or when a stop signal,
      ``cancel()`` or ``abort()`` ends the wait) is listed in ``RunResult.in_doubt``. Default
      ``$FLOWDSL_LATE_GRACE``, else :data:`LATE_GRACE` (30 s); 0 does not wait.
    - ``signals``: signals sent to the run as it starts, before anything else — a mapping name -> payload (a JSON
      object, or None), or a list of names, ``(name, payload)`` pairs and ``(name, payload, key)`` triples (a keyed
      wait's signal: the key of the instance it is for) —, each kept until its wait starts
      (docs/runtime.md, "Waits and signals"); checked first, as :meth:`LocalRun.signal` checks one. To send one
      while the run goes, create a :class:`LocalRun` and call its ``signal()``.
    - ``park``: once the run has nothing left but waiting — a wait waits for its signal or timer, no attempt runs —
      let it go: its record gets a ``runtime_parked`` line and this returns a result whose ``parked`` says what
      the run waits for (``status`` is the kernel's, ``running``; ``exit_code`` 5); :func:`resume_flow` (``flowdsl
      resume``) goes on with it later, sending it signals (docs/runtime.md, "Parking a run that only waits").
      A flow with no wait is never parked. Needs ``record`` (a ``ValueError`` without).

    Cancelling the task that awaits this (``asyncio.wait_for``, ``asyncio.timeout``, a shutdown) aborts the run
    at once (nothing is compensated), logs a WARNING on ``flowdsl.local`` naming the run, its record and what is
    left to undo by hand, and re-raises ``CancelledError``; for a deadline, use :class:`LocalRun` and call its
    ``cancel()`` on a timer: a graceful, compensating cancel.
    """
    return await LocalRun(plan, run_input, run_id=run_id, lm=lm, record=record, runs_dir=runs_dir,
                          on_event=on_event, on_notice=on_notice, seed=seed, registry=registry, adapter=adapter,
                          handle_sigint=handle_sigint, import_workers=import_workers, lms=lms,
                          spec_path=spec_path, handle_sigterm=handle_sigterm, late_grace=late_grace,
                          signals=signals, park=park).run()


def run(plan: dict[str, Any], run_input: dict[str, Any], *, run_id: str | None = None,
        lm: object | str | None = None, record: bool = True, runs_dir: str | Path | None = None,
        on_event: EventHook | None = None, on_notice: NoticeHook | None = None,
        seed: int | None = None, registry: WorkerRegistry | None = None, adapter: object | None = None,
        handle_sigint: bool | None = None, import_workers: bool = True, lms: Mapping[str, object] | None = None,
        spec_path: str | os.PathLike[str] | None = None, handle_sigterm: bool = False,
        late_grace: float | None = None, signals: Signals | None = None, park: bool = False) -> RunResult:
    """:func:`run_flow` on a new event loop (:func:`run_on_new_loop`), with the same options; ``handle_sigint``
    defaults to on in the main thread, ``handle_sigterm`` to off (SIGTERM stays the application's). Inside a
    running event loop (``async`` code), ``await`` :func:`run_flow` instead: this raises ``RuntimeError``
    there, saying so."""
    if _loop_running():
        raise RuntimeError("flowdsl.run() cannot be called from a running event loop (it runs one of its own): "
                           "in async code, use `await flowdsl.run_flow(plan, run_input, ...)`, which takes the "
                           "same options")
    if handle_sigint is None:
        handle_sigint = threading.current_thread() is threading.main_thread()
    return run_on_new_loop(run_flow(plan, run_input, run_id=run_id, lm=lm, record=record, runs_dir=runs_dir,
                                    on_event=on_event, on_notice=on_notice, seed=seed, registry=registry,
                                    adapter=adapter, handle_sigint=handle_sigint, import_workers=import_workers,
                                    lms=lms, spec_path=spec_path, handle_sigterm=handle_sigterm,
                                    late_grace=late_grace, signals=signals, park=park))
