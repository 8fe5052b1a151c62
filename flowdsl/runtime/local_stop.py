"""Stopping a local run: cancel, abort, a hard failure, and Ctrl-C, SIGTERM and SIGHUP.

Stage: runtime: local. Imports the kernel (what is left to undo), ``.late`` (what is in doubt, how a stop is
said), ``.report`` (the result object), ``.signals`` (taking and giving back a signal), ``.summary`` (its
``show_command``), ``flowdsl.runtime.execute`` (whether a worker can be cancelled, an error's words),
``.local_errors`` (:class:`~flowdsl.runtime.local.RunAborted`), ``.local_attempts`` (an attempt) and stdlib.
:class:`Stopping` is mixed into :class:`~flowdsl.runtime.local.LocalRun` (whose attributes it uses):

- **cancel** (:meth:`Stopping.cancel`) — feeds ``cancel_requested``: in-flight steps are cancelled and what
  completed is undone; asked before the run started it is held; called from another thread it is handed to the
  run's loop.
- **abort** (:meth:`Stopping.abort`, :meth:`Stopping._stop`) — stops at once, compensating nothing: a
  ``runtime_aborted`` record line, and :meth:`~flowdsl.runtime.local.LocalRun.run` raises
  :class:`~flowdsl.runtime.local.RunAborted`; the task awaiting the run cancelled is said on the
  ``flowdsl.local`` logger (:meth:`Stopping._warn_stopped`); a runtime or kernel bug stops it the same way
  (:meth:`Stopping._fail_hard`).
- **signals** — Ctrl-C (``handle_sigint``), SIGTERM and SIGHUP (``handle_sigterm``), taken on the loop while the
  run goes: the first cancels, a second Ctrl-C or SIGTERM aborts (a SIGHUP never does); after the run's end, while
  it waits for late answers, a signal stops the wait. ``on_notice`` is told (:meth:`Stopping._notice`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowdsl.kernel import left_to_undo
from flowdsl.runtime.execute import cancellable, error_message
from flowdsl.runtime.late import in_doubt_items, left_to_undo_text, stopped_at_once, stopped_while
from flowdsl.runtime.local_attempts import _attempts
from flowdsl.runtime.local_errors import RunAborted
from flowdsl.runtime.report import RunResult
from flowdsl.runtime.signals import SIGNAL_WORDS, TERM_SIGNALS, give_back_signal, take_signal
from flowdsl.runtime.summary import show_command

if TYPE_CHECKING:
    from flowdsl.kernel import Program
    from flowdsl.runtime.local_attempts import _Attempt
    from flowdsl.runtime.record import RunRecorder
    from flowdsl.workers import WorkerRegistry

__all__ = ["Stopping"]

_log = logging.getLogger("flowdsl.local")


class Stopping:
    """Cancel, abort, a hard failure and the stop signals (see the module doc); a mixin of ``LocalRun``."""

    # what the run provides
    plan: dict[str, Any]
    run_id: str
    registry: WorkerRegistry | None
    record_path: Path | None
    record_error: str | None
    handle_sigint: bool
    handle_sigterm: bool
    late_grace: float
    on_notice: Callable[[str], None] | None
    state: dict[str, Any]
    events: list[dict[str, Any]]
    in_doubt: list[dict[str, Any]]
    _program: Program
    _recorder: RunRecorder | None
    _loop: asyncio.AbstractEventLoop | None
    _loop_thread: int | None
    _done: asyncio.Future[None] | None
    _finished: bool
    _tasks: dict[str, _Attempt]
    _lingering: dict[str, _Attempt] | None
    _interrupts: int
    _stops_coming: int
    parked: dict[str, Any] | None
    _signals: list[int]
    _early: tuple[str, str] | None
    _handoff: contextlib.AbstractContextManager[Any]
    _stop_reason: str | None
    _perf0: float
    _now: Callable[[], int]
    _feed: Callable[[dict[str, Any]], None]
    _write: Callable[[dict[str, Any]], None]
    _hung: Callable[..., dict[str, _Attempt]]
    _release: Callable[[], None]
    _stop_waiting: Callable[[str | None], None]

    if TYPE_CHECKING:
        @property
        def status(self) -> str: ...

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
        self._stops_coming += 1  # (the run parks for none until it has arrived: _park_if_idle)
        try:
            loop.call_soon_threadsafe(self._stop_arrives, method, reason)
        except RuntimeError:  # its loop closed meanwhile: the run is over
            self._stops_coming -= 1  # (under _handoff: the callers hold it)
        return True

    def _stop_arrives(self, method: Callable[[str], None], reason: str) -> None:
        """On the run's loop: a cancel or abort asked from another thread; one that finds the run parked (it was
        parked before it was asked) is said, with how to cancel the parked run."""
        with self._handoff:  # (counted up under it, in the asking thread)
            self._stops_coming -= 1
        if self.parked is not None:
            what = "cancel" if method == self.cancel else "abort"
            self._notice(f"{what} asked after the run was parked ({reason}): nothing runs it; cancel it with "
                         f"`flowdsl resume {self.run_id} --cancel` (resume_flow(..., cancel=True))")
            return
        method(reason)

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
        if self._finished:  # the run has ended, or was parked (its handlers not yet removed): nothing is left to stop
            self._notice(f"{verb}: the run has already been parked" if self.parked is not None
                         else f"{verb}: the run has already ended {self.status}")
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
