"""The local run's attempts: each dispatch in a task of its own, a sync worker's thread, cancels, and deadlines.

Stage: runtime: local. Imports ``flowdsl.runtime.execute`` (whether a worker can be cancelled, the wait for a
thread, an error's words), ``flowdsl.workers`` (a real Ctrl-C) and stdlib. :class:`Attempts` is mixed into
:class:`~flowdsl.runtime.local.LocalRun` (whose attributes it uses), which creates each attempt
(``LocalRun._dispatch``); this is the runtime's hot path, with the feeding loop there:

- **an attempt** (:class:`_Attempt`, :func:`_attempt_task`) — its command and the task running it, answered from
  inside that task (:meth:`Attempts._attempt`): ``task_succeeded``, ``task_failed``, ``task_cancelled``;
  a sync worker's thread (:class:`_ThreadWait`) is waited for after a cancel while the run is live, and after its
  end while the end is held for it (:mod:`.local_late`).
- **cancel_task** (:meth:`Attempts._cancel_task`) — a held dispatch answers at once; a sync job still queued for a
  thread is taken back, never called; a running thread cannot be stopped (its real answer comes); else the task is
  cancelled after the step of it already queued.
- **timers** (:meth:`Attempts._schedule`, :meth:`Attempts._fire`) — ``loop.call_later`` feeding ``timer_fired``; a
  deadline is held a few turns for an answer already due, and a sync attempt still queued for a thread when its
  timeout fires is failed saying so instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

from flowdsl.runtime.execute import cancellable, error_message, error_types, wait_for_thread, waiting_for_a_thread
from flowdsl.workers import from_sigint

if TYPE_CHECKING:
    from flowdsl.workers import WorkerRegistry

__all__ = ["Attempts"]

#: the timers that are deadlines: an answer already due when one fires is fed first (:meth:`LocalRun._fire`); a
#: wait's deadline fired late, likewise a signal sent before it, still in the loop's queue
_DEADLINES = frozenset({"attempt_timeout", "run_timeout", "flow_timeout", "wait_timeout"})
#: milliseconds past its due time after which a deadline fires late (the loop was held up): it then lets the loop
#: turn :data:`_LATE_TURNS` times first (a timer on time fires at most a millisecond or two late)
_LATE_MS = 20
_LATE_TURNS = 3
#: the most turns of the loop a deadline is held back for answers already due
_HOLD_TURNS = 8


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

    def __init__(self, run: Attempts, attempt: _Attempt):
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


def _attempts(attempts: Iterable[_Attempt]) -> list[dict[str, Any]]:
    """``{task_id, step, attempt}`` of each attempt, for the record and ``in_doubt``."""
    return [{"task_id": a.command["task_id"], "step": a.command["step"], "attempt": a.command["attempt"]}
            for a in attempts]


class Attempts:
    """Attempts, their threads and their timers (see the module doc); a mixin of ``LocalRun``."""

    # what the run provides
    registry: WorkerRegistry | None
    state: dict[str, Any]
    _loop: asyncio.AbstractEventLoop | None
    _done: asyncio.Future[None] | None
    _finished: bool
    _tasks: dict[str, _Attempt]
    _timers: dict[str, asyncio.Handle]
    _held: dict[str, dict[str, Any]]
    _must_answer: set[str]
    _park: bool
    _due: dict[str, int]
    _lingering: dict[str, _Attempt] | None
    _clock: Callable[[], float]
    _now: Callable[[], int]
    _feed: Callable[[dict[str, Any]], None]
    _check_wait: Callable[[], None]

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
        if self._park:  # (what the parked line says of when the run goes on)
            self._due[timer_id] = command["due_at"]

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
