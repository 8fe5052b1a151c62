"""The local runtime: one run, in-process, on asyncio — a thin I/O shell around the kernel.

Stage: runtime backend. Imports the kernel, ``flowdsl.runtime.execute`` (to
carry out dispatches), ``.plancheck`` (the shape of a plan handed in), ``.inputs`` (:func:`check_input`),
``.record`` (run records), ``.report`` (the result
object), ``.late`` (late answers, what is in doubt), ``.summary`` (its ``show_command``; no rich at import)
and ``flowdsl.workers``. It decides nothing about
the run: every decision is the kernel's (docs/kernel.md); this module turns
its commands into asyncio work and the outcomes back into input events::

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

Input events carry ``at`` = the wall clock in integer milliseconds (a
monotonic clock anchored at the run's start). Every input event and every
emitted event goes to the run record (``.flowdsl/runs/<run_id>.jsonl``, after
a header with the plan and the input), so ``kernel.replay`` over the recorded
input events reproduces the run's decisions exactly.

Cancelling: :meth:`LocalRun.cancel` (and, with ``handle_sigint``, the first
Ctrl-C; with ``handle_sigterm``, the first SIGTERM or SIGHUP) feeds ``cancel_requested``: in-flight steps are
cancelled and every completed step with a compensation is undone, then the run ends ``cancelled``.
:meth:`LocalRun.abort` (a second Ctrl-C or SIGTERM — a SIGHUP never counts —, or cancelling the task awaiting
the run) stops at once, compensating nothing; the record then ends with a
``runtime_aborted`` line. Either one asked before the run has started is
held: a cancel is applied as the run starts (its first dispatches are held,
never carried out, and answered ``task_cancelled``), an abort makes
:meth:`LocalRun.run` raise at once.

A record write that fails mid-run (a full disk) closes the record and the run
goes on unrecorded (``RunResult.record_error`` says why): a run must never
stop half-way, its state moved on and its commands not carried out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import inspect
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from flowdsl.kernel import INPUT_EVENTS, Decision, apply, check_seed, left_to_undo, prepare, start_event, start_run
from flowdsl.runtime.execute import (
    NotJSON,
    cancellable,
    copy_json,
    error_message,
    error_types,
    execute,
    json_problem,
    marking_sigint,
    missing_workers,
    plain_json,
    wait_for_thread,
    waiting_for_a_thread,
    warm_llm,
    worker_references,
)
from flowdsl.runtime.inputs import InputError
from flowdsl.runtime.inputs import check_input as check_plan_input
from flowdsl.runtime.late import (
    LATE_GRACE,
    attempt_label,
    in_doubt_items,
    in_doubt_notice,
    late_answer_effect,
    late_grace_seconds,
    left_to_undo_text,
    may_answer_late,
    stopped_at_once,
    stopped_waiting,
    stopped_while,
    timed_out_attempts,
)
from flowdsl.runtime.plancheck import require_plan
from flowdsl.runtime.record import (
    RECORD_FAILED,
    RecordError,
    RecordWriteError,
    RunRecorder,
    check_records_dir,
    check_run_id,
    new_run_id,
    record_path,
)
from flowdsl.runtime.report import NOT_STARTED, RunResult
from flowdsl.runtime.signals import SIGNAL_WORDS, TERM_SIGNALS, give_back_signal, signal_said, take_signal
from flowdsl.runtime.summary import show_command
from flowdsl.workers import WorkerImportError, WorkerRegistry, from_sigint, import_worker_modules
from flowdsl.workers import registry as default_registry

if TYPE_CHECKING:
    from flowdsl.runtime.resume import Resumption

__all__ = ["ABANDON_S", "LATE_GRACE", "RECORDED_INPUTS", "TERM_SIGNALS", "InputError", "LocalRun", "RunAborted",
           "RunIdInUse", "WorkersMissing", "check_input", "new_run_id", "run", "run_flow", "run_on_new_loop",
           "signal_said"]

#: the record lines that are kernel input events (``start`` first): what ``kernel.replay`` takes
RECORDED_INPUTS = frozenset({"start", *INPUT_EVENTS})

EventHook = Callable[[dict[str, Any]], None]
NoticeHook = Callable[[str], None]


class RunAborted(Exception):
    """The run was stopped at once (a second Ctrl-C or stop signal, :meth:`LocalRun.abort`): steps in flight
    were abandoned and nothing more was compensated.

    ``status`` is the state it stopped in; ``result`` the run as it stood then (None when it had not started),
    its ``intervention`` listing what is left to undo by hand: the completed steps with a compensation that were
    not undone, in the order to undo them (``kernel.left_to_undo``), also in ``left_to_undo``.
    """

    def __init__(self, run_id: str, status: str, record: Path | None, *, result: RunResult | None = None):
        where = f"; its record ends at {record}" if record else ""
        left: list[dict[str, Any]] = (result.intervention or {}).get("steps", []) if result is not None else []
        if status == NOT_STARTED:
            super().__init__(f"run {run_id} was aborted before it started: nothing ran{where}")
        else:
            todo = ("left to undo by hand: " + ", ".join(str(item["step"]) for item in left)) if left else \
                "no completed step was left undone"
            resume = f" (`flowdsl resume {run_id}` goes on with it from there)" if record else ""
            super().__init__(f"run {run_id} was aborted {stopped_while(status)}: steps in flight were abandoned "
                             f"and nothing more was compensated; {todo}{where}{resume}")
        self.run_id = run_id
        self.status = status
        self.record = record
        self.result = result
        self.left_to_undo = left


class WorkersMissing(ValueError):
    """The plan names workers that are not registered: the run does not start.

    ``problems``: one sentence per missing worker. ``elsewhere``: the names of those that are registered in the
    process-wide registry (``flowdsl.workers.registry``, where ``@flowdsl.worker`` and the spec's ``workers:``
    modules register) while the run was given another one (``registry=``), which it looks them up in alone.
    """

    def __init__(self, problems: list[str], *, elsewhere: Iterable[str] = ()):
        self.problems = problems
        self.elsewhere = sorted(set(elsewhere))
        hints = []
        if self.elsewhere:
            names = ", ".join(f"'{name}'" for name in self.elsewhere)
            hints.append(f"{names} {'is' if len(self.elsewhere) == 1 else 'are'} registered in the process-wide "
                         "registry (@flowdsl.worker, and the spec's 'workers:' modules when import_workers is true, "
                         "register there), not in the registry passed as registry=, the only one the run looks in: "
                         "register them in that registry (registry.register(name, fn), or "
                         "@flowdsl.worker(name, registry_=registry)), or pass no registry")
        if len(self.elsewhere) < len(problems):
            hints.append("register workers with @flowdsl.worker in a module that the spec's 'workers:' lists")
        super().__init__("the run cannot start: " + "; ".join(problems) + " (" + "; ".join(hints) + ")")


class RunIdInUse(ValueError):
    """A run with this id is in progress in this process: a second one would hand its workers the same idempotency
    keys (two orders, one key: a payment gateway takes the second for a repeat of the first). ``run_id``: the id."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        super().__init__(f"run id '{run_id}' is in use by a run in progress in this process: two runs of one id "
                         "would hand their workers the same idempotency keys; give each run an id of its own (or "
                         "none: a new one is made)")


#: the ids of the runs in progress in this process (:meth:`LocalRun.run`), and the lock taking one
_LIVE: set[str] = set()
_LIVE_LOCK = threading.Lock()
#: held while a plan's kernel indexes are looked up or built (the kernel's cache is not safe from several threads)
_PREPARING = threading.Lock()


def _claim(run_id: str) -> None:
    with _LIVE_LOCK:
        if run_id in _LIVE:
            raise RunIdInUse(run_id)
        _LIVE.add(run_id)


def _release_id(run_id: str) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(run_id)


#: input events applied in a row before the runtime lets the event loop run other callbacks
_BURST = 64
#: the timers that are deadlines: an answer already due when one fires is fed first (:meth:`LocalRun._fire`)
_DEADLINES = frozenset({"attempt_timeout", "run_timeout", "flow_timeout"})
#: milliseconds past its due time after which a deadline fires late (the loop was held up): it then lets the loop
#: turn :data:`_LATE_TURNS` times first (a timer on time fires at most a millisecond or two late)
_LATE_MS = 20
_LATE_TURNS = 3
#: the most turns of the loop a deadline is held back for answers already due
_HOLD_TURNS = 8
#: seconds the end of a run is quietly held for async attempts it gave up on, before their wait is said: they were just
#: cancelled, and an async worker answers its cancel at once unless it ignores it (then the wait of late_grace begins)
CANCEL_SETTLE = 0.1
_log = logging.getLogger("flowdsl.local")
#: the attribute of a warning on :data:`_log` that ``on_notice`` was told too (true), so that a program that shows
#: both — ``flowdsl run``'s progress — can say it once
NOTICED = "flowdsl_noticed"


#: whether an attempt's task takes its first step at once, inside the burst that dispatched it (Python 3.12+)
_EAGER = sys.version_info >= (3, 12)


def _attempt_task(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """The task running one attempt: the worker's own from its first step, since what it enters there binds to the
    current task (``asyncio.timeout``, a ``TaskGroup``, an HTTP client's timer). Python 3.12+ runs that step at
    once (``eager_start``: a worker that answers without waiting costs no turn of the loop); 3.11 has no way to,
    short of its private API, so there the step waits for the loop's next turn."""
    if _EAGER:
        return asyncio.Task(coro, loop=loop, eager_start=True)  # type: ignore[call-arg,unused-ignore]
    return loop.create_task(coro)


class _Attempt:
    """A dispatched attempt: its command, the task running it and, for a sync worker, its thread's job (None until
    queued) and when that job returned (the run's clock, ``LocalRun._clock``; None until it has)."""

    __slots__ = ("answered", "cancelled", "command", "returned_at", "task", "thread")

    def __init__(self, command: dict[str, Any]):
        self.command = command
        self.task: asyncio.Task[None] | None = None
        self.thread: concurrent.futures.Future[Any] | None = None
        self.returned_at: float | None = None
        #: the runtime answered it itself (it timed out still queued for a thread): its task's answer is not fed
        self.answered = False
        self.cancelled = False  # the runtime cancelled its task (LocalRun._cancel_soon)

    def returned_by(self, at: float) -> bool:
        """Whether its sync worker's thread had returned by ``at`` (the run's clock): its answer is due, if not
        yet fed (an attempt answered is no longer the run's)."""
        done = self.returned_at
        return done is not None and done <= at

    def called(self) -> bool:
        """Whether its sync worker was called (its thread's job began; it may have finished), not still queued
        for a free thread — or cancelled there, never to run."""
        job = self.thread
        return job is not None and not job.cancelled() and (job.running() or job.done())


class _ThreadWait:
    """``execute.wait_for_thread`` for one attempt: whether to go on waiting for its thread after a cancel
    (:meth:`LocalRun._waits_for`), and where its thread's job is kept."""

    __slots__ = ("attempt", "run")

    def __init__(self, run: LocalRun, attempt: _Attempt):
        self.run = run
        self.attempt = attempt

    def __call__(self) -> bool:
        return self.run._waits_for(self.attempt.command["task_id"])

    def thread_submitted(self, job: concurrent.futures.Future[Any]) -> None:
        self.attempt.thread = job
        job.add_done_callback(self._returned)

    def _returned(self, job: concurrent.futures.Future[Any]) -> None:
        """(In the worker's thread, as it returns:) note when, on the run's clock — before the answer is handed
        to the loop."""
        if not job.cancelled():
            self.attempt.returned_at = self.run._clock()


class LocalRun:
    """One run of a plan on the running event loop. Create it, then ``await run.run()`` once.

    Parameters are those of :func:`run_flow`. Raises ``TypeError`` when ``plan``
    is not a dict or ``run_input`` not a dict, ``PlanError`` (a ``ValueError``)
    naming the field when ``plan`` is not shaped like an execution plan,
    :class:`WorkersMissing` when a worker the plan names is not registered,
    :class:`~flowdsl.runtime.inputs.InputError` (a ``ValueError``) for a run input that is not JSON, ``ValueError``
    for a bad run id, ``FileExistsError`` when a record
    for ``run_id`` already exists, and ``WorkerImportError`` when
    ``import_workers`` is true and a worker module of the plan cannot be imported.
    """

    def __init__(self, plan: dict[str, Any], run_input: dict[str, Any], *, run_id: str | None = None,
                 lm: object | str | None = None, record: bool = True, runs_dir: str | Path | None = None,
                 on_event: EventHook | None = None, on_notice: NoticeHook | None = None,
                 seed: int | None = None, registry: WorkerRegistry | None = None, adapter: object | None = None,
                 handle_sigint: bool = False, import_workers: bool = True, lms: Mapping[str, object] | None = None,
                 spec_path: str | os.PathLike[str] | None = None, handle_sigterm: bool = False,
                 late_grace: float | None = None, resumption: Resumption | None = None):
        require_plan(plan)
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
        if self._resume is not None:
            result.resumed = self._resume.resumed
            result.in_doubt = self._resume.in_doubt(self.state, self.events, self.in_doubt)
        return result

    def cancel(self, reason: str = "cancel requested") -> None:
        """Cancel the run: stop what is in flight, undo what completed, end ``cancelled``.

        Asked before the run has started (before :meth:`run`, or before the task running it has taken its
        first step), the request is held and applied as the run starts: no worker is called — the first
        steps are cancelled as they are dispatched — and the run ends ``cancelled``. Ignored when the run is
        already being aborted or compensated, or is over. After the run's end, while the runtime waits for the
        attempts it gave up on (``late_grace``), it stops waiting: what has not answered is in doubt. Called from
        another thread than the run's, it is handed to the run's event loop.
        """
        with self._handoff:
            if self._elsewhere(self.cancel, reason):
                return
            if self._loop is None:
                if self._early is None:
                    self._early = ("cancel", reason)
                return
        if self._lingering is not None:
            self._stop_waiting(f"cancelled: {reason}")
        elif not self._finished:
            self._feed({"type": "cancel_requested", "reason": reason})

    def abort(self, reason: str = "aborted") -> None:
        """Stop at once: abandon what is in flight and compensate nothing; :meth:`run` raises RunAborted.

        Asked before the run has started, :meth:`run` raises RunAborted at once: nothing runs and no record
        is written. Ignored when the run is over. After the run's end, while the runtime waits for the attempts
        it gave up on (``late_grace``), it stops waiting, as :meth:`cancel` does, and :meth:`run` returns. Called
        from another thread than the run's, it is handed to the run's event loop.
        """
        with self._handoff:
            if self._elsewhere(self.abort, reason):
                return
            if self._loop is None:
                self._early = ("abort", reason)
                return
        if self._lingering is not None:
            self._stop_waiting(f"aborted: {reason}")
        elif not self._finished:
            self._stop(reason)
            assert self._done is not None
            if not self._done.done():
                self._done.set_exception(RunAborted(self.run_id, self.state.get("status", "starting"),
                                                    self.record_path, result=self._stopped_result()))

    def _elsewhere(self, method: Callable[[str], None], reason: str) -> bool:
        """Hand ``method(reason)`` to the run's loop when called from another thread (the run's state is the loop
        thread's alone); whether it did."""
        loop = self._loop
        if loop is None or self._loop_thread == threading.get_ident() or loop.is_closed():
            return False
        loop.call_soon_threadsafe(method, reason)
        return True

    def _stopped_result(self) -> RunResult | None:
        """The run as it stands when stopped at once, with what it leaves to undo by hand as ``intervention``."""
        if not self.state:
            return None
        result = RunResult.from_state(self.plan, self.state, self.events,
                                      wall_ms=(time.perf_counter() - self._perf0) * 1000.0,
                                      record_path=self.record_path, record_error=self.record_error)
        result.intervention = {"steps": left_to_undo(self._program, self.state)}
        result.in_doubt = self.in_doubt
        result.aborted = self._stop_reason
        return result

    def _warn_stopped(self, cancelled: bool) -> None:
        """The task awaiting the run was cancelled (a deadline — ``asyncio.wait_for``, ``asyncio.timeout`` —, a
        shutdown, a framework dropping a request) or a Ctrl-C was raised in it: the run was stopped at once and its
        caller gets a bare ``CancelledError`` (``KeyboardInterrupt``). Say so on the ``flowdsl.local`` logger (a
        WARNING) and to ``on_notice``: the run, its record, and what it leaves to undo by hand — as
        ``RunAborted.left_to_undo`` lists it — with the idempotency keys."""
        result = self._stopped_result()
        left = (result.intervention or {}).get("steps", []) if result is not None else []
        why = "the task awaiting it was cancelled" if cancelled else "a Ctrl-C was raised in it"
        where = f"its record, {self.record_path}, says so (`{show_command(self.record_path)}`)" \
            if self.record_path is not None and self._recorder is not None else \
            "it has no record" if self.record_path is None else f"its record {self.record_path} is incomplete"
        doubt = f"; outcome unknown, check: {left_to_undo_text(self.in_doubt)}" if self.in_doubt else ""
        hint = (" (for a deadline that compensates, call LocalRun.cancel() on a timer instead of cancelling the "
                "awaiting task)") if cancelled else ""
        text = (f"run {self.run_id} was stopped at once {stopped_while(self.status)}: {why}; steps in flight were "
                f"abandoned and nothing more was compensated; left to undo by hand, in this order: "
                f"{left_to_undo_text(left)}{doubt}; {where}{hint}")
        _log.warning("%s", text)
        self._notice(text)

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

    def _open_record(self, start: dict[str, Any]) -> None:
        """Create the record with its header and the ``start`` line, on disk before anything runs: written under a
        temporary name, then put in place whole (``RunRecorder.publish``), so that no listing finds it empty or
        with its header alone, and a stop signal meanwhile leaves nothing behind."""
        try:
            recorder = self._recorder = RunRecorder(self.run_id, self.runs_dir)
        except (RecordWriteError, RecordError) as exc:  # (a FileExistsError passes: another run took the id)
            code = getattr(exc, "errno", None)
            hint = (f" (each recorded run in progress holds a file descriptor, its record: raise the limit on open "
                    f"files — `ulimit -n`, now {_open_files_limit()} —, or run with record=False)"
                    if code in (errno.EMFILE, errno.ENFILE) else "")
            raise RecordWriteError(code, f"{exc}; the run did not start{hint}") from None
        try:
            spec = {"spec": self.spec_path} if self.spec_path is not None else {}
            if isinstance(self.lm, str):  # (a model's name: `flowdsl resume` goes on with it)
                spec["lm"] = self.lm
            recorder.header(self.plan, self.run_input, run_id=self.run_id, runtime="local",
                            started_at=int(self._wall0), **spec)
            recorder.write_many((start,))
            recorder.flush()
            recorder.publish()
        except BaseException as exc:  # nothing has run (a full disk, the id taken meanwhile, a stop signal): no
            self._discard_record()  # record is left behind
            if isinstance(exc, OSError) and not isinstance(exc, FileExistsError | RecordWriteError):
                raise RecordWriteError(exc.errno, f"cannot write the run record {recorder.path}: "
                                       f"{exc.strerror or exc}; the run did not start") from exc
            if isinstance(exc, RecordWriteError):
                raise RecordWriteError(exc.errno, f"{exc}; the run did not start") from None
            raise

    def _discard_record(self) -> None:
        """Remove the record of a run that never began (nothing ran: its record would only mislead)."""
        recorder, self._recorder = self._recorder, None
        if recorder is not None:
            recorder.discard()

    def _carry_out_again(self, resumption: Resumption) -> None:
        """A resumed run: its state as replayed from its record, its timers armed again and the attempts it had in
        flight carried out again (``.resume``)."""
        self.state = resumption.state
        self.events = list(resumption.events)
        self._must_answer = {command["task_id"] for command in resumption.dispatches}
        for command in resumption.timers:
            self._schedule(command)
        for command in resumption.dispatches:
            self._dispatch(command)

    def _record_failed(self, exc: Exception) -> None:
        """A record write failed (a full disk, a file size limit, a line that could not be encoded): close the
        record and go on without it.

        The run must not stop half-way — its state has moved on, and the commands of that decision (a
        compensation among them) must still be carried out — so it goes on unrecorded, and says so."""
        recorder, self._recorder = self._recorder, None
        why = (exc.strerror or str(exc)) if isinstance(exc, OSError) else f"{type(exc).__name__}: {error_message(exc)}"
        if recorder is not None:  # back to its last whole line, ended by a line saying why when that fits
            recorder.stop({"type": RECORD_FAILED, "run_id": self.run_id, "at": self._now(),
                           "status": self.state.get("status") if self.state else None, "reason": why})
        self.record_error = f"writing the record failed ({why}); it stops there and the run went on unrecorded"
        _log.warning("run %s: %s: %s", self.run_id, self.record_path, self.record_error,
                     extra={NOTICED: self.on_notice is not None})
        self._notice(f"the run record {self.record_path} cannot be written ({why}): the run goes on unrecorded")

    def _write(self, item: dict[str, Any]) -> None:
        if self._recorder is not None:
            try:
                self._recorder.write_many((item,))
                self._recorder.flush()
            except Exception as exc:  # not only OSError: a line the encoder refuses must not stop the run either
                self._record_failed(exc)

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

    async def _attempt(self, attempt: _Attempt, work: Coroutine[Any, Any, dict[str, Any]]) -> None:
        """One dispatch, answered from inside its own task (no extra turn of the loop).

        A sync worker's attempt cancelled while its thread runs (the kernel gave up on it: it timed out) goes on
        waiting for the thread as long as the run is live, and its real answer is fed like any late answer (an
        async worker that ignores its cancel comes back the same way): the kernel rejects it, or records a late
        completion. Once the run is over, a cancel stops the wait and nothing is fed — unless the run's end is
        held for this attempt (:meth:`_finish`)."""
        task_id = attempt.command["task_id"]
        wait_for_thread.set(_ThreadWait(self, attempt))
        try:
            event = await work
        except asyncio.CancelledError:
            event = {"type": "task_cancelled", "task_id": task_id}
            if not attempt.cancelled and self._loop is not None:  # cancelled by something else than the run:
                # most likely the event loop shutting down (asyncio.run() returning cancels every task, this
                # run's own in the same turn, in no set order): its answer waits a turn, so that the run, stopped
                # at once meanwhile, records no failure of the step and no undo that will never run — only an
                # attempt cancelled by anything else (the worker's own code) is fed, then
                self._tasks.pop(task_id, None)
                if not attempt.answered:
                    self._loop.call_soon(self._answer, task_id, event)
                return
        except GeneratorExit:  # the coroutine closed (a task left behind when the loop closes): nothing to answer
            raise
        except BaseException as exc:  # execute() answers worker failures itself; this is the net under it: an
            if from_sigint(exc):  # attempt that never answers would hang the run (a real Ctrl-C stops it)
                if self._done is None or self._done.done():
                    raise
                self._done.set_exception(exc)  # raised where the run is awaited, through its cleanup
                return
            event = {"type": "task_failed", "task_id": task_id,
                     "error": {"type": type(exc).__name__, "message": error_message(exc), "types": error_types(exc)}}
        self._tasks.pop(task_id, None)
        if not attempt.answered:
            self._answer(task_id, event)

    def _waits_for(self, task_id: str) -> bool:
        """Whether attempt ``task_id``, cancelled while its sync worker's thread runs, goes on waiting for the
        thread: while the run is live, and after its end while the end is held for that attempt."""
        if self._finished:
            return False
        return self._lingering is None or task_id in self._lingering

    def _answer(self, task_id: str, event: dict[str, Any]) -> None:
        if self._finished:
            return
        held = self._lingering is not None and self._lingering.pop(task_id, None) is not None
        # every answer is fed, a cancel of an attempt the kernel gave up on too (it records it rejected), as the
        # Redis runtime feeds it: both record the same events (docs/kernel.md, "What the runtime promises")
        self._feed(event)
        if held:
            self._check_wait()

    def _cancel_task(self, task_id: str) -> None:
        if self._held.pop(task_id, None) is not None:  # never started: it answers at once
            self._answer(task_id, {"type": "task_cancelled", "task_id": task_id})
            return
        if task_id in self._must_answer:  # run again after its process stopped: what it did there may have taken
            return  # effect, so it runs to a real answer (a cancel now would say `cancelled`: nothing to undo)
        attempt = self._tasks.get(task_id)
        if attempt is None or attempt.task is None:
            return  # already answered
        if task_id in self.state["tasks"] and not cancellable(attempt.command, self.registry):
            if self._take_back(task_id):  # still queued for a free thread: it is never called
                self._answer(task_id, {"type": "task_cancelled", "task_id": task_id})
            elif attempt.thread is None:  # not queued yet (its task has not begun): taken back as it is queued
                self._cancel_soon(attempt)
            return  # a sync worker's running thread cannot be stopped: wait for its real outcome
        self._cancel_soon(attempt)  # (a sync worker's running thread is still waited for: see _attempt)

    def _take_back(self, task_id: str) -> bool:
        """Take sync attempt ``task_id`` off the queue of jobs waiting for a free worker thread, if it is there: its
        worker is never called, and the answer is the caller's to give (its task now ends in a ``CancelledError``
        nobody asked for, which is not fed). False when it is not queued (its job has begun, or ended)."""
        attempt = self._tasks.get(task_id)
        if task_id in self._must_answer or attempt is None or attempt.thread is None or not attempt.thread.cancel():
            return False
        attempt.answered = True
        del self._tasks[task_id]
        return True

    def _cancel_soon(self, attempt: _Attempt) -> None:
        """Cancel an attempt's task after the step of it already queued: a task cancelled before it has
        taken its first step never runs its coroutine at all — the worker would not see CancelledError at
        its await (its cleanup would not run) and the attempt would never answer task_cancelled."""
        assert self._loop is not None and attempt.task is not None
        attempt.cancelled = True
        self._loop.call_soon(attempt.task.cancel)

    def _schedule(self, command: dict[str, Any]) -> None:
        assert self._loop is not None
        delay = max(0.0, (command["due_at"] - self._now()) / 1000.0)
        timer_id = command["timer_id"]
        old = self._timers.pop(timer_id, None)
        if old is not None:
            old.cancel()
        self._timers[timer_id] = self._loop.call_later(delay, self._fire, timer_id, command["due_at"])

    def _fire(self, timer_id: str, due_at: float, turns: int = 0) -> None:
        """A timer is due: feed ``timer_fired`` — unless it is a deadline (:data:`_DEADLINES`) that an answer
        already due must beat, then it is held back a turn of the loop (``turns``: how many it was), at most
        :data:`_HOLD_TURNS`, the answer going first.

        Answers that are due but not yet fed: a sync attempt whose thread returned before the deadline
        (its answer reaches the loop through ``call_soon_threadsafe``, then wakes the attempt's task one turn
        later, behind this timer), and — when the timer fires late, the loop having been held up (a worker
        blocking it, a burst of run starts) past the deadline — any attempt woken in the same turn (a worker's
        ``asyncio.sleep`` that ended before the deadline wakes its task one turn after its own timer ran, while
        every timer due during the stall is run in the same turn): a late deadline gives the loop
        :data:`_LATE_TURNS` turns. A timer on time, with no such thread, fires at once, as it always did. What
        is recorded is the order the events were fed in, so replay is unchanged."""
        handle = self._timers.get(timer_id)
        if handle is None:
            return
        if turns < _HOLD_TURNS and self._holds(timer_id, due_at, turns):
            assert self._loop is not None
            self._timers[timer_id] = self._loop.call_soon(self._fire, timer_id, due_at, turns + 1)
            return
        del self._timers[timer_id]
        self._feed(self._never_called(timer_id) or {"type": "timer_fired", "timer_id": timer_id})

    def _never_called(self, timer_id: str) -> dict[str, Any] | None:
        """When ``timer_id`` is the timeout of a sync attempt still waiting for a free worker thread (every one is
        busy: :mod:`flowdsl.runtime.execute`), its answer instead of ``timer_fired``: that job is taken off the
        queue (it is never called) and the attempt fails with ``StepTimeout`` saying so — not that the worker was
        slow — as the kernel would have failed it (or, a step being cancelled, ``task_cancelled``). None otherwise
        (the job has begun: it cannot be taken back)."""
        timer = self.state.get("timers", {}).get(timer_id)
        if timer is None or timer.get("purpose") != "attempt_timeout":
            return None
        task_id = timer.get("task_id", "")
        attempt, task = self._tasks.get(task_id), self.state["tasks"].get(task_id)
        if attempt is None or task is None or not self._take_back(task_id):
            return None
        if task["kind"] != "compensate" and self.state["nodes"][task["step"]]["status"] == "cancelling":
            return {"type": "task_cancelled", "task_id": task_id}
        timeout = attempt.command.get("timeout_ms")
        return {"type": "task_failed", "task_id": task_id,
                "error": {"type": "StepTimeout", "message": waiting_for_a_thread(timeout)}}

    def _holds(self, timer_id: str, due_at: float, turns: int) -> bool:
        """Whether deadline ``timer_id`` (due at ``due_at``, the run's clock) waits a turn for answers already
        due (:meth:`_fire`)."""
        timer = self.state.get("timers", {}).get(timer_id)
        if timer is None or timer.get("purpose") not in _DEADLINES:
            return False
        if timer["purpose"] == "attempt_timeout":
            attempt = self._tasks.get(timer.get("task_id", ""))
            if attempt is None:
                return False
            if attempt.thread is not None:  # a sync worker's: known to the millisecond, late timer or not
                return attempt.returned_by(due_at)
        if turns < _LATE_TURNS and self._clock() - due_at > _LATE_MS:
            return True
        if timer["purpose"] == "attempt_timeout":
            return False
        return any(attempt.returned_by(due_at) for attempt in self._tasks.values())

    def _finish(self) -> None:
        """The kernel ended the run (or, while its end is held, ended it again: a late completion came).

        A sync worker's thread cannot be stopped, and an async worker may ignore its cancel: when an attempt the
        run gave up on (it timed out) still runs, for a step whose success would be a late completion (it has a
        compensation and did not succeed, or — rules 7 — its undo has begun), or of an undo that failed for good
        (:func:`~flowdsl.runtime.late.may_answer_late`), the run's end is held for it, at most ``late_grace``
        seconds, and its answer is fed as any late answer: a step's success makes the run ``needs_intervention``,
        an undo's counts its step undone."""
        if self._lingering is None:
            held = self._hung()
            if held:
                self._linger(held)
                return
        elif not self._finished:
            self._check_wait()
            return
        self._close()

    def _hung(self, late_only: bool = True) -> dict[str, _Attempt]:
        """The attempts the kernel gave up on (it no longer counts them in flight) that have not been heard from,
        whose success would still count (``late_only``: a step's a late completion, an undo's that failed for good
        its step undone): a sync worker's that was called — its
        thread still runs, or its answer is on its way — and an async worker's still running, whatever its cancel
        does to it. Or (a run stopped at once: nothing will hear them) the sync ones of every step with a
        compensation that has not succeeded (or, rules 7, whose undo has begun): an async attempt cancelled then is
        cancelled as the loop ends."""
        hung = {}
        for task_id, attempt in self._tasks.items():
            if attempt.task is None or attempt.task.done() or task_id in self.state["tasks"]:
                continue
            if not (attempt.called() if not cancellable(attempt.command, self.registry) else late_only):
                continue
            if may_answer_late(self.plan, self.state, attempt.command, any_end=not late_only):
                hung[task_id] = attempt
        return hung

    def _close(self) -> None:
        self._finished = True
        self._release()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _linger(self, held: dict[str, _Attempt]) -> None:
        """Hold the ended run's end for the attempts ``held``. When they are all async, first a quiet settle: they
        were just cancelled, and a worker that does not ignore its cancel answers it at once — then the run ends
        with no wait to say. Otherwise (or when the settle passes with one still running) the wait is said."""
        assert self._loop is not None
        self._lingering = held
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        for task_id, attempt in self._tasks.items():  # the others the run gave up on are not waited for
            if task_id not in held and attempt.task is not None:
                self._cancel_soon(attempt)
        if all(cancellable(a.command, self.registry) for a in held.values()):
            self._settle_timer = self._loop.call_later(CANCEL_SETTLE, self._say_wait)
        else:
            self._say_wait()

    def _wait_line(self) -> list[dict[str, Any]]:
        """Record the wait for the attempts still held (the ``runtime_waiting`` line); they are returned."""
        assert self._lingering is not None
        if self._settle_timer is not None:
            self._settle_timer.cancel()
            self._settle_timer = None
        self._wait_said = True
        attempts = _attempts(self._lingering.values())
        self._write({"type": "runtime_waiting", "at": self._now(), "run_id": self.run_id, "status": self.status,
                     "grace_ms": int(self.late_grace * 1000), "attempts": attempts})
        return attempts

    def _say_wait(self) -> None:
        """The wait for the attempts the run gave up on, said: record it, notice it, arm the bound."""
        assert self._loop is not None and self._lingering is not None
        held = self._lingering
        attempts = self._wait_line()
        if self.late_grace <= 0:
            self._stop_waiting("late_grace is 0")
            return
        self._linger_timer = self._loop.call_later(self.late_grace, self._stop_waiting,
                                                   f"after {self.late_grace:g} s, the late_grace")
        timed_out = timed_out_attempts(self.events)
        said = ", ".join(f"{a['step']} ({attempt_label(a)}{' timed out' if a['task_id'] in timed_out else ''})"
                         for a in attempts)
        kinds = {cancellable(a.command, self.registry) for a in held.values()}
        why = " and ".join(w for w, k in (("a sync worker cannot be interrupted", False),
                                          ("an async worker that ignores its cancel goes on", True)) if k in kinds)
        stops = next((f"; {'Ctrl-C' if s == signal.SIGINT else signal.Signals(s).name} stops waiting"
                      for s in self._signals if s != getattr(signal, "SIGHUP", None)), "")
        self._notice(f"the run ended {self.status}; waiting up to {self.late_grace:g} s for "
                     f"{len(attempts)} attempt(s) it gave up on to answer: {said} — {why}, and "
                     f"{late_answer_effect(attempts)}{stops}")

    def _check_wait(self) -> None:
        """After an answer (or a late completion) while the end is held: stop waiting for attempts whose success
        would no longer matter; end the run when none is left."""
        lingering = self._lingering
        if lingering is None or self._finished:
            return
        for task_id in [t for t, a in lingering.items() if not may_answer_late(self.plan, self.state, a.command)]:
            del lingering[task_id]
        if lingering:
            return
        if self._draining or self._inbox:  # an answer still to apply: end the wait after it
            assert self._loop is not None
            self._loop.call_soon(self._check_wait)
            return
        self._stop_waiting(None)

    def _stop_waiting(self, why: str | None) -> None:
        """End the wait for the attempts the ended run gave up on — every one answered (``why`` None), or the bound
        passed, a signal, cancel() or abort() stopped it (``why``) — and the run: what has not answered is in doubt."""
        if self._finished or self._lingering is None:
            return
        if not self._wait_said:
            if why is None:  # every async attempt answered while it settled: there was no wait to say
                self._close()
                return
            self._wait_line()  # (stopped while it settled: the record says what was left unanswered)
        left = _attempts(self._lingering.values())
        reason = why or "every attempt waited for answered"
        self._write({"type": "runtime_waited", "at": self._now(), "run_id": self.run_id, "status": self.status,
                     "reason": reason, "unanswered": left})
        if left:
            self.in_doubt = in_doubt_items(self.plan, self.state, left, stopped_waiting(reason), self.events)
        if self.in_doubt:
            self._notice(in_doubt_notice(reason, self.in_doubt))
        self._close()

    def _release(self) -> None:
        """Cancel every timer and every task still running (attempts the kernel gave up on)."""
        for timer in (self._linger_timer, self._settle_timer):
            if timer is not None:
                timer.cancel()
        self._linger_timer = self._settle_timer = None
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        for attempt in self._tasks.values():
            if attempt.task is not None:
                self._cancel_soon(attempt)

    def _stop(self, reason: str) -> None:
        self._stop_reason = reason
        unanswered = _attempts(self._hung(late_only=False).values()) if self.state else []
        if unanswered:  # nothing will hear these threads: what they did is unknown
            self.in_doubt = in_doubt_items(self.plan, self.state, unanswered, stopped_at_once(reason), self.events,
                                           any_end=True)
        self._finished = True
        self._release()
        self._write({"type": "runtime_aborted", "at": self._now(), "run_id": self.run_id, "reason": reason,
                     "status": self.state.get("status"), "unanswered": unanswered})

    def _fail_hard(self, exc: Exception, what: str = "the kernel rejected an event of") -> None:
        said = f"{type(exc).__name__}: {error_message(exc)}"
        self._stop(f"internal error: {said}")
        if self._done is not None and not self._done.done():
            self._done.set_exception(RuntimeError(f"{what} run {self.run_id}: {said}"))

    # --- Ctrl-C, SIGTERM, SIGHUP ------------------------------------------------------------------

    def _install_signals(self) -> None:
        """Take Ctrl-C (``handle_sigint``), SIGTERM and SIGHUP (``handle_sigterm``) on the loop while the run goes."""
        if threading.current_thread() is not threading.main_thread():
            return
        wanted = ((signal.SIGINT,) if self.handle_sigint else ()) + (TERM_SIGNALS if self.handle_sigterm else ())
        for signum in wanted:
            self._take_signal(signum)

    def _take_signal(self, signum: int) -> None:
        """Take ``signum`` while the run goes (unless it is ignored, or the loop cannot take signals: then Ctrl-C
        raises as usual); runs nested on one loop hand it back to each other (:mod:`flowdsl.runtime.signals`)."""
        assert self._loop is not None
        if take_signal(self._loop, signum, self._on_signal):
            self._signals.append(signum)

    def _remove_signals(self) -> None:
        loop = self._loop
        taken, self._signals = self._signals, []
        if loop is None:
            return
        for signum in reversed(taken):
            give_back_signal(loop, signum, self._on_signal)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        verb, label = SIGNAL_WORDS.get(name, ("stopped", name))
        if self._lingering is not None and not self._finished:  # the run has ended: only the wait stops
            if name == "SIGHUP":  # nobody may be watching any more: waiting out the bound harms nothing, and a
                # closing terminal's second hangup would otherwise find the run returned and kill the process
                self._notice(f"{verb}: still waiting for the attempts the run gave up on, at most "
                             f"{self.late_grace:g} s (Ctrl-C or SIGTERM stops waiting)")
                return
            self._notice(f"{verb}: no longer waiting for the attempts the run gave up on")
            self._stop_waiting(f"{label} stopped the wait")
            return
        # a SIGHUP only ever cancels: a closing terminal often sends two in a row (the tty's hangup and the shell
        # passing it on), which must not stop the run at once; only a second Ctrl-C or SIGTERM does
        hangup = name == "SIGHUP"
        if self._finished:  # the run has ended (its handlers not yet removed): nothing is left to stop
            self._notice(f"{verb}: the run has already ended {self.status}")
            return
        if not hangup:
            self._interrupts += 1
            if self._interrupts > 1:
                self._notice(f"{verb} again: stopping at once, nothing more is compensated")
                self.abort("interrupted twice (Ctrl-C)" if signum == signal.SIGINT else f"{verb} again ({label})")
                return
        if signum == signal.SIGINT:
            again = "press Ctrl-C again to stop at once"
        else:
            again = "two SIGTERMs stop at once" if hangup else f"a second {label} stops at once"
        if self.status == "running":
            self._notice(f"{verb}: cancelling the run and undoing the steps that completed ({again})")
        else:
            self._notice(f"{verb}: the run is already {self.status}; letting it finish ({again})")
        self.cancel(f"{verb} ({label})")
        self._notice_waiting()

    def _notice_waiting(self) -> None:
        """Say which steps the cancelled run waits for: sync workers, which cannot be interrupted."""
        waiting = [a.command for task_id, a in self._tasks.items()
                   if a.task is not None and a.command["kind"] != "compensate" and task_id in self.state["tasks"]
                   and not cancellable(a.command, self.registry)]
        if not waiting:
            return
        parts = []
        for command in waiting:
            timeout = command.get("timeout_ms")
            parts.append(f"{command['step']} (times out {timeout / 1000:g} s after it started)" if timeout
                         else f"{command['step']} (no timeout)")
        self._notice(f"waiting for {'step' if len(parts) == 1 else 'steps'} {', '.join(parts)} to return: "
                     "a sync worker cannot be interrupted")

    def _notice(self, text: str) -> None:
        if self.on_notice is not None:
            try:
                self.on_notice(text)
            except Exception:
                self.on_notice = None


def _open_files_limit() -> str:
    """This process's limit on open files (``ulimit -n``), as said in an error."""
    try:
        import resource

        return str(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    except (ImportError, OSError, ValueError):
        return "unknown"


def _registered_elsewhere(plan: dict[str, Any], registry: WorkerRegistry | None) -> list[str]:
    """The workers the plan names that ``registry`` (one given instead of the process-wide one) lacks but the
    process-wide registry has."""
    if registry is None or registry is default_registry:
        return []
    return sorted({name for _, _, name in worker_references(plan) if name not in registry and name in default_registry})


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


def _attempts(attempts: Iterable[_Attempt]) -> list[dict[str, Any]]:
    """``{task_id, step, attempt}`` of each attempt, for the record and ``in_doubt``."""
    return [{"task_id": a.command["task_id"], "step": a.command["step"], "attempt": a.command["attempt"]}
            for a in attempts]


async def run_flow(plan: dict[str, Any], run_input: dict[str, Any], *, run_id: str | None = None,
                   lm: object | str | None = None, record: bool = True, runs_dir: str | Path | None = None,
                   on_event: EventHook | None = None, on_notice: NoticeHook | None = None,
                   seed: int | None = None, registry: WorkerRegistry | None = None, adapter: object | None = None,
                   handle_sigint: bool = False, import_workers: bool = True,
                   lms: Mapping[str, object] | None = None,
                   spec_path: str | os.PathLike[str] | None = None, handle_sigterm: bool = False,
                   late_grace: float | None = None) -> RunResult:
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

    Cancelling the task that awaits this (``asyncio.wait_for``, ``asyncio.timeout``, a shutdown) aborts the run
    at once (nothing is compensated), logs a WARNING on ``flowdsl.local`` naming the run, its record and what is
    left to undo by hand, and re-raises ``CancelledError``; for a deadline, use :class:`LocalRun` and call its
    ``cancel()`` on a timer: a graceful, compensating cancel.
    """
    return await LocalRun(plan, run_input, run_id=run_id, lm=lm, record=record, runs_dir=runs_dir,
                          on_event=on_event, on_notice=on_notice, seed=seed, registry=registry, adapter=adapter,
                          handle_sigint=handle_sigint, import_workers=import_workers, lms=lms,
                          spec_path=spec_path, handle_sigterm=handle_sigterm, late_grace=late_grace).run()


def run(plan: dict[str, Any], run_input: dict[str, Any], *, run_id: str | None = None,
        lm: object | str | None = None, record: bool = True, runs_dir: str | Path | None = None,
        on_event: EventHook | None = None, on_notice: NoticeHook | None = None,
        seed: int | None = None, registry: WorkerRegistry | None = None, adapter: object | None = None,
        handle_sigint: bool | None = None, import_workers: bool = True, lms: Mapping[str, object] | None = None,
        spec_path: str | os.PathLike[str] | None = None, handle_sigterm: bool = False,
        late_grace: float | None = None) -> RunResult:
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
                                    late_grace=late_grace))


def _loop_running() -> bool:
    """Whether an event loop runs in this thread (then neither ``asyncio.run`` nor :func:`run_on_new_loop` can)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


#: seconds the tasks left when a run has returned (attempts it gave up on whose worker ignores its cancel) get to
#: answer their cancel before :func:`run_on_new_loop` closes the loop without them
ABANDON_S = 0.5
_T = TypeVar("_T")


def run_on_new_loop(main: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run(main)``, without waiting for ever on what a run left behind: an async worker that ignores its
    cancellation runs on after the run has returned (which held its end for it at most ``late_grace``), and
    ``asyncio.run`` waits for every task to finish — the process held as long as that worker, and a stop signal
    meanwhile turning the run's outcome into an interruption. Here the tasks left get :data:`ABANDON_S` seconds to
    answer their cancel; the loop then closes without those that did not (they are never resumed)."""
    if _loop_running():
        main.close()
        raise RuntimeError("run_on_new_loop() cannot be called from a running event loop")
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(loop.create_task(main))
    finally:
        try:
            left = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in left:
                task.cancel()
            if left:
                loop.run_until_complete(asyncio.wait(left, timeout=ABANDON_S))
            for task in left:
                if not task.done():  # closed now rather than whenever the collector finds it (on 3.11, inside a
                    task._log_destroy_pending = False  # type: ignore[attr-defined]  # compile: a SystemError)
                    coro = task.get_coro()  # (None from 3.12 on for an eager task that finished: not one here)
                    if coro is not None:
                        with contextlib.suppress(RuntimeError):  # (one that swallows GeneratorExit too)
                            coro.close()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
