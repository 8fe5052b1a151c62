"""The local run's end: held for the attempts it gave up on that may still answer late; the loop closed without them.

Stage: runtime: local. Imports ``.late`` (which attempts may answer late, what is in doubt, how it is said),
``flowdsl.runtime.execute`` (whether a worker can be cancelled), ``.local_attempts`` (an attempt) and stdlib.
:class:`LateAnswers` is mixed into :class:`~flowdsl.runtime.local.LocalRun` (whose attributes it uses).

When the kernel ends the run (``finish``) while an attempt it gave up on (it timed out: a sync worker's thread, or
an async worker ignoring its cancel) still runs a step whose success would be a late completion, or an undo that
failed for good, the run's end is held for it (:meth:`LateAnswers._finish`): async attempts first get a quiet
settle (:data:`CANCEL_SETTLE`), then the wait is said (a ``runtime_waiting`` record line and a notice) and bound
by ``late_grace``; what has not answered when the wait stops (the bound, a signal, ``cancel()``, ``abort()``) is
in doubt (``RunResult.in_doubt``), said in a ``runtime_waited`` line. :meth:`LateAnswers._close` ends the run and
:meth:`LateAnswers._release` cancels every timer and task left.

An async worker ignoring its cancel may still run when the run has returned: :func:`run_on_new_loop` (the new
loop that :func:`~flowdsl.runtime.local.run`, ``flowdsl run`` and ``flowdsl resume`` run on) gives the tasks left
:data:`ABANDON_S` seconds to answer their cancel, then closes the loop without them. Both are imported from
:mod:`flowdsl.runtime.local`, their documented home.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from flowdsl.runtime.execute import cancellable
from flowdsl.runtime.late import (
    attempt_label,
    in_doubt_items,
    in_doubt_notice,
    late_answer_effect,
    may_answer_late,
    stopped_waiting,
    timed_out_attempts,
)
from flowdsl.runtime.local_attempts import _attempts

if TYPE_CHECKING:
    from collections import deque

    from flowdsl.runtime.local_attempts import _Attempt
    from flowdsl.workers import WorkerRegistry

__all__ = ["ABANDON_S", "CANCEL_SETTLE", "LateAnswers", "run_on_new_loop"]

#: seconds the end of a run is quietly held for async attempts it gave up on, before their wait is said: they were just
#: cancelled, and an async worker answers its cancel at once unless it ignores it (then the wait of late_grace begins)
CANCEL_SETTLE = 0.1


class LateAnswers:
    """The run's end held for late answers, and closed (see the module doc); a mixin of ``LocalRun``."""

    # what the run provides
    plan: dict[str, Any]
    run_id: str
    registry: WorkerRegistry | None
    late_grace: float
    state: dict[str, Any]
    events: list[dict[str, Any]]
    in_doubt: list[dict[str, Any]]
    _loop: asyncio.AbstractEventLoop | None
    _done: asyncio.Future[None] | None
    _finished: bool
    _draining: bool
    _inbox: deque[dict[str, Any]]
    _tasks: dict[str, _Attempt]
    _timers: dict[str, asyncio.Handle]
    _signals: list[int]
    _lingering: dict[str, _Attempt] | None
    _linger_timer: asyncio.TimerHandle | None
    _settle_timer: asyncio.TimerHandle | None
    _wait_said: bool
    _now: Callable[[], int]
    _write: Callable[[dict[str, Any]], None]
    _notice: Callable[[str], None]
    _cancel_soon: Callable[[_Attempt], None]

    if TYPE_CHECKING:
        @property
        def status(self) -> str: ...

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
