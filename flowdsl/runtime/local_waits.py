"""The local run's waits: signals sent to the run from outside, and what the run says while a wait waits.

Stage: runtime: local. Imports the kernel's end states, ``.signal_checks`` (a signal checked against the plan,
re-exported here), ``.parking`` (a parked run's line and words), ``.timing`` (how a duration is written),
``flowdsl.shown`` and stdlib. :class:`Signalling` is mixed into :class:`~flowdsl.runtime.local.LocalRun` (whose
attributes it uses):

- **sending** (:meth:`Signalling.signal`) — a ``signal`` input event (docs/kernel.md, "Waits"), checked first: a
  name a wait of the plan takes, a key when that wait is keyed (its ``key:`` tells its instances apart) and none
  when it is not, a payload that is a JSON object or None (``.signal_checks.check_signal``). Sent before the
  run has started it is held, and applied right after the run's start, before anything else (so are the run's
  ``signals=``) — a resumed run's after the timers that fell due while it stood, which fire first; sent from
  another thread it is handed to the run's event loop, as ``cancel()`` is. It is fed like every input event, so
  the record holds it and ``flowdsl show`` / ``resume`` replay it.
- **its outcome** (:class:`SignalSent`, :class:`SignalOutcome`) — the kernel answers a signal in the decision it
  makes of it (``signal_received``, ``signal_buffered``, ``signal_rejected``; the answer of the same name and key):
  the future ``signal()`` returns is settled then. A signal the run never applied (it ended, or was stopped at once,
  first) is settled ``rejected``, saying so; one sent after the run's end never reaches the kernel, and is not recorded.
- **saying it** (:meth:`Signalling._say_waits`) — once per signal wait, as it starts waiting, ``on_notice`` is
  told which signal the run waits for (and with which key), until when, and how a local run is sent one (the
  first ten instances of a keyed wait, then once that more wait).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import threading
from collections import deque
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from flowdsl.kernel import END_STATES
from flowdsl.runtime.parking import SHOWN_WAITS, parked_line, parked_text, signal_named, signal_option
from flowdsl.runtime.signal_checks import (
    KEY_LIMIT,
    Signals,
    check_key,
    check_signal,
    check_signals,
    keyed_signals,
    signal_names,
)
from flowdsl.runtime.timing import duration_text
from flowdsl.shown import visible

if TYPE_CHECKING:
    from pathlib import Path

    from flowdsl.kernel import Program

__all__ = ["KEY_LIMIT", "SignalOutcome", "SignalSent", "Signalling", "check_key", "check_signal", "check_signals",
           "keyed_signals", "signal_names", "waiting_notice"]

#: the kernel's answer to a ``signal`` input event -> :attr:`SignalOutcome.outcome`
_ANSWERS = {"signal_received": "received", "signal_buffered": "buffered", "signal_rejected": "rejected"}

@dataclass(frozen=True)
class SignalOutcome:
    """What became of a signal sent to a local run (:meth:`Signalling.signal`; the Redis client's ``signal()``
    answers with a ``SignalOutcome`` of the same fields, and an ``id``).

    ``outcome``: ``received`` (its wait waited and took it: the wait succeeds with the payload), ``buffered`` (its
    wait has not started: it is kept, and the wait takes it as it starts — for a keyed wait, the instance that
    starts with that key) or ``rejected`` (nothing took it: ``reason`` says why — its wait already had one, timed
    out or was skipped, the run is being stopped or has ended). ``wait`` is the wait that took it (its instance
    key, ``parcels[1]/delivered``) or will (its plan key), None when rejected; ``at`` the run's clock (ms since the
    epoch) when the run applied it, None when it never did; ``key`` the key it was sent with, None when unkeyed."""

    run_id: str
    signal: str
    outcome: Literal["received", "buffered", "rejected"]
    wait: str | None = None
    reason: str | None = None
    at: int | None = None
    key: str | None = None

    @property
    def taken(self) -> bool:
        """Whether a wait took the signal or will (``received`` or ``buffered``)."""
        return self.outcome != "rejected"

    def to_json(self) -> dict[str, Any]:
        """The outcome as a JSON object: ``run_id``, ``signal``, ``key``, ``outcome``, ``wait``, ``reason``,
        ``at``."""
        return {"run_id": self.run_id, "signal": self.signal, "key": self.key, "outcome": self.outcome,
                "wait": self.wait, "reason": self.reason, "at": self.at}

    @classmethod
    def of(cls, event: Mapping[str, Any]) -> SignalOutcome:
        """The outcome a kernel event (``signal_received``, ``signal_buffered``, ``signal_rejected``) says."""
        outcome = _ANSWERS[event["type"]]
        wait = event.get("step") if outcome == "received" else event.get("wait")
        key = event.get("key")
        return cls(run_id=str(event["run_id"]), signal=str(event["signal"]), outcome=outcome,  # type: ignore[arg-type]
                   wait=wait, reason=event.get("reason"), at=event.get("at"), key=None if key is None else str(key))


class SignalSent(concurrent.futures.Future[SignalOutcome]):
    """What :meth:`LocalRun.signal` returns: a future of the signal's :class:`SignalOutcome`, settled when the run
    has applied the signal (at once when ``signal()`` is called on the run's own event loop while the run goes;
    else on the run's loop's next turns).

    ``await`` it in async code (on any event loop), or call ``result(timeout)`` from another thread; never block
    on ``result()`` in the run's own event loop thread (the run could not go on to settle it). It is never
    settled with an exception: a signal nothing took is ``rejected``, with the reason."""

    def __init__(self, run_id: str, name: str, key: str | None = None):
        super().__init__()
        self.run_id, self.signal, self.key = run_id, name, key

    def __await__(self) -> Generator[Any, None, SignalOutcome]:
        return asyncio.wrap_future(self).__await__()

    def _settle(self, outcome: SignalOutcome) -> None:
        if not self.done():  # (a caller may have cancelled it: it no longer waits)
            self.set_result(outcome)

    def _reject(self, reason: str, at: int | None = None) -> None:
        self._settle(SignalOutcome(self.run_id, self.signal, "rejected", reason=reason, at=at, key=self.key))


def waiting_notice(plan: Mapping[str, Any], key: str, *, ctrl_c: bool = False, resumed: bool = False,
                   resume: str | None = None, instance: str | None = None, signal_key: str | None = None,
                   again: str | None = None) -> str:
    """What a local run says as its wait ``key`` (a plan key; ``instance``: the instance that waits, in a for_each)
    starts waiting for its signal: which (``signal_key``: the key a keyed wait takes it with), until when, and how
    a local run is sent one (``ctrl_c``: the run takes Ctrl-C, which cancels it; ``resumed``: the run was resumed;
    ``resume``: the ``flowdsl resume`` command that takes the run up again, when Ctrl-\\ (SIGQUIT) ends this process
    leaving the run resumable; ``again``: that command whatever SIGQUIT does, named for a resumed run)."""
    node = plan["nodes"][key]
    name = visible(node["signal"])
    instance = key if instance is None else instance
    wait = f"wait '{visible(instance)}', " if instance != node["signal"] else ""
    timeout = node.get("timeout_ms")
    until = (f"{wait}up to {duration_text(timeout)}: then it fails with WaitTimeout" if timeout else
             f"{wait}with no deadline: it waits as long as it takes")
    option = signal_option(node["signal"], signal_key)
    if option is None:  # (a key the command line cannot give)
        command = (" only (its key holds '=', which a command line cannot give, or a control character, which it does "
                   "not show safely)")
    else:
        command = f" or, when it is resumed, from `{again or 'flowdsl resume RUN_ID'} {option}`" if resumed else \
            f" or, when it starts, from `flowdsl run {option}`"
    stop = "; Ctrl-C cancels the run" if ctrl_c else ""
    if ctrl_c and resume is not None:
        stop += f" (Ctrl-\\ ends this process and leaves the run to `{resume} {option}`)" if option is not None \
            else " (Ctrl-\\ ends this process and leaves the run to `resume_flow` from Python)"
    python = f"LocalRun.signal('{name}', payload)" if signal_key is None else \
        f"LocalRun.signal('{name}', payload, key={visible(repr(signal_key))})"
    return (f"the run waits for {signal_named(node['signal'], signal_key)} ({until}); a local run takes a signal "
            f"from Python ({python}){command}{stop}")


class Signalling:
    """Signals sent to the run, and what it says of its waits (see the module doc); a mixin of ``LocalRun``."""

    # what the run provides
    plan: dict[str, Any]
    run_id: str
    state: dict[str, Any]
    handle_sigint: bool
    _program: Program
    _loop: asyncio.AbstractEventLoop | None
    _loop_thread: int | None
    _finished: bool
    _handoff: Any
    _inbox: deque[dict[str, Any]]
    _stop_reason: str | None
    _early: tuple[str, str] | None
    _signals: list[int]
    _resume: Any
    record_path: Path | None
    _recorder: Any
    _feed: Callable[[dict[str, Any]], None]
    _notice: Callable[[str], None]
    _write: Callable[[dict[str, Any]], None]
    _close: Callable[[], None]
    _now: Callable[[], int]
    _tasks: dict[str, Any]
    _held: dict[str, Any]
    _park: bool
    _record_failed: Callable[[Exception], None]
    _stops_coming: int
    _due: dict[str, int]
    parked: dict[str, Any] | None

    def _init_signals(self, signals: Signals | None) -> None:
        checked = check_signals(self.plan, signals)
        #: signals sent before the run started (``signals=`` first): applied right after its start, in order
        self._held_signals: list[tuple[dict[str, Any], SignalSent]] = [
            (_event(name, payload, key), SignalSent(self.run_id, name, key)) for name, payload, key in checked]
        #: the signals handed to the run's loop or queued for the kernel, not yet applied: ``id(event)`` -> (the
        #: event, its future)
        self._unanswered: dict[int, tuple[dict[str, Any], SignalSent]] = {}
        #: set as :meth:`run` returns: a signal sent from then on is rejected at once
        self._signals_closed = False
        self._waits_said: set[str] = set()
        #: how many instances of each wait node were said to wait (:meth:`_say_waiting`)
        self._waits_said_of: dict[str, int] = {}

    def signal(self, name: str, payload: Mapping[str, Any] | None = None, *,
               key: str | int | None = None) -> SignalSent:
        """Send signal ``name`` to the run, with ``payload`` (a JSON object, or None for ``{}``): the wait that
        takes it succeeds with the payload as its result — at once if it waits, else as it starts (the signal is
        kept until then). The signal of a keyed wait (one with ``key:``, in a for_each) needs ``key``: the instance
        whose key it is takes it (a string, or an integer taken as its decimal text); an unkeyed wait's takes none.
        Returns a :class:`SignalSent`: ``await`` it (or ``.result(timeout)`` from another thread) for the
        :class:`SignalOutcome` — ``received``, ``buffered`` or ``rejected`` with the reason; or let it be.

        Raises at once, before anything reaches the run: ``ValueError`` when no wait of the plan takes ``name``
        (naming those it has), for a keyed wait's signal without a key, an unkeyed wait's with one, an empty key or
        one longer than :data:`KEY_LIMIT` characters; ``TypeError`` for a name that is not a string, a key neither
        a string nor an integer or a payload that is neither a mapping nor None;
        :class:`~flowdsl.runtime.inputs.InputError` (a ``ValueError``) for a payload that is not JSON.
        Sent before the run has started, it is held and applied as the run starts, before anything else (a resumed
        run's timers that fell due while it stood fire first: a deadline passed then is not beaten by it); called
        from another thread than the run's, it is handed to the run's event loop (as :meth:`cancel` is); sent once
        the run is over, it is ``rejected`` and not recorded."""
        name, data, text = check_signal(self.plan, name, payload, self._program.signals, key=key)
        event, sent = _event(name, data, text), SignalSent(self.run_id, name, text)
        with self._handoff:
            loop = self._loop
            if self._signals_closed or self._finished:
                sent._reject(self._too_late(keyed=sent.key is not None))
                return sent
            if loop is None:
                self._held_signals.append((event, sent))
                return sent
            self._unanswered[id(event)] = (event, sent)  # (settled as the run returns, if its loop never gets to it)
            if self._loop_thread != threading.get_ident():
                try:
                    loop.call_soon_threadsafe(self._send_signal, event, sent)
                except RuntimeError:  # its loop is closed: the run is over
                    self._unanswered.pop(id(event), None)
                    sent._reject(self._too_late(keyed=sent.key is not None))
                return sent
        self._send_signal(event, sent)
        return sent

    def _send_signal(self, event: dict[str, Any], sent: SignalSent) -> None:
        """On the run's loop: feed the signal to the kernel, unless the run is over (then it is rejected here)."""
        if sent.done():  # (rejected as the run returned)
            return
        if self._finished or self.state.get("status") in END_STATES:
            self._unanswered.pop(id(event), None)
            sent._reject(self._too_late(keyed=sent.key is not None))
            return
        self._feed(event)

    def _send_held(self, resumed: bool) -> None:
        """As the run starts (or is ``resumed``: after the timers that fell due while it stood, fired already): the
        signals held until then go first, before anything queued since. A resumed run's waits that wait for a signal
        not among them are said, as when they started."""
        held, self._held_signals = self._held_signals, []
        if self._finished or self.state.get("status") in END_STATES:  # (its input was refused: it ended at once)
            for _, sent in held:
                sent._reject(self._too_late(keyed=sent.key is not None))
            return
        for event, sent in reversed(held):
            self._unanswered[id(event)] = (event, sent)
            self._inbox.appendleft(event)
        if resumed and not (self._early is not None and self._early[0] == "cancel"):  # (cancelled as it goes on:
            # its waits end at once, and are not said)
            coming = {(sent.signal, sent.key) for _, sent in held}
            for key, entry in (self.state.get("waits") or {}).items():
                if entry.get("signal") is not None and (entry["signal"], entry.get("key")) not in coming:
                    self._say_waiting(key)

    def _signal_answered(self, cause: dict[str, Any], events: list[dict[str, Any]]) -> None:
        """The kernel applied signal ``cause``: settle its future with the answer among ``events``."""
        entry = self._unanswered.pop(id(cause), None)
        if entry is None or entry[0] is not cause:
            return
        answer = next((e for e in events if e["type"] in _ANSWERS and e.get("signal") == cause["name"]
                       and e.get("key") == cause.get("key")), None)
        if answer is not None:
            entry[1]._settle(SignalOutcome.of(answer))
        else:  # (the kernel answers every signal it applies: this is a safeguard, never a wait for ever)
            entry[1]._reject("the run did not answer it", cause["at"])

    def _signals_unsent(self) -> None:
        """The run is over (or never started): the signals it never applied are rejected, saying why; any sent
        from now on is rejected at once."""
        with self._handoff:
            self._signals_closed = True
            left = [sent for _, sent in self._held_signals] + [sent for _, sent in self._unanswered.values()]
            self._held_signals, self._unanswered = [], {}
        for sent in left:
            sent._reject(self._too_late(before=True, keyed=sent.key is not None))

    def _too_late(self, before: bool = False, keyed: bool = False) -> str:
        status = self.state.get("status")
        when = "before the signal reached it" if before else ""
        if self.parked is not None:  # (its process let it go: a resume goes on with it, and sends signals)
            from flowdsl.runtime.summary import record_resume_command

            option = "NAME:KEY=JSON" if keyed else "NAME=JSON"
            resume = record_resume_command(self.record_path) if self.record_path is not None else \
                f"flowdsl resume {self.run_id}"
            return (f"the run was parked {when or 'already'}: `{resume} --signal {option}` (or "
                    "resume_flow(..., signals=...)) goes on with it and sends the signal")
        if self._stop_reason is not None:
            return f"the run was stopped at once ({self._stop_reason}) {when or 'already'}".rstrip()
        if status is None:
            return "the run did not start"
        return f"the run has ended ({status})" + (f" {when}" if when else ": it waits for nothing more")

    def _say_waits(self, events: list[dict[str, Any]]) -> None:
        """Tell ``on_notice``, once per wait, that the run waits for a signal (a wait that started and waits) —
        unless that signal is on its way already (sent, not yet applied: ``signals=`` as the run starts)."""
        waits = self.state.get("waits") or {}
        for e in events:
            if e["type"] == "step_started" and e.get("signal") is not None and e["step"] in waits:
                coming = [*self._held_signals, *self._unanswered.values()]
                if not any(sent.signal == e["signal"] and sent.key == e.get("key") for _, sent in coming):
                    self._say_waiting(e["step"])

    def _park_if_idle(self) -> None:
        """With ``park``, once nothing is left but waiting — a wait waits, no attempt runs (not even one the run
        gave up on), nothing is queued for the kernel nor on its way to it — let the run go: write the parked line
        (``.parking``), stop the timers and return from :meth:`run`; ``flowdsl resume`` goes on with it. A run whose
        record could not be written is never parked (it could not go on): it waits in its process, said once."""
        state = self.state
        if (self._inbox or self._tasks or self._held or self._unanswered or self._stops_coming or state.get("tasks")
                or not state.get("waits") or state.get("status") != "running"):
            return
        if self._recorder is not None:  # (what the burst wrote goes to disk first: a full disk is found before)
            try:
                self._recorder.flush()
            except OSError as exc:
                self._record_failed(exc)
        if self._recorder is not None:
            line = parked_line(self.run_id, self._now(), state, self._due)
            self._write(line)
        if self._recorder is None:  # (it failed: said by _record_failed) the run waits here instead, and says so
            self._park = False
            self._notice("the run cannot be parked: its record is incomplete, so it could not go on from it; it "
                         "waits in this process")
            for key, entry in (state.get("waits") or {}).items():
                if entry.get("signal") is not None:
                    self._say_waiting(key)
            return
        self.parked = {key: line[key] for key in ("at", "waits", "due_at")}
        resume = self._resume_command(any_signal=True)
        self._notice(f"run {self.run_id} is parked: it {parked_text(line, resume)}")
        self._close()

    def _say_waiting(self, key: str) -> None:
        """Say that wait instance ``key`` waits — once; for the instances of one keyed wait (a for_each may hold
        thousands), the first :data:`~flowdsl.runtime.parking.SHOWN_WAITS`, then that the others are not said."""
        if self._park or key in self._waits_said:  # (a parked run says what it waits for as it is parked)
            return
        self._waits_said.add(key)
        node = self.state["nodes"][key]["node"]
        said = self._waits_said_of[node] = self._waits_said_of.get(node, 0) + 1
        if said > SHOWN_WAITS:
            if said == SHOWN_WAITS + 1:
                self._notice(f"more instances of wait '{visible(node)}' wait for their signal, each with its key: "
                             "they are not said one by one")
            return
        ctrl_c = signal.SIGINT in self._signals  # (not when Ctrl-C is not the run's: inherited ignored)
        entry = (self.state.get("waits") or {}).get(key) or {}
        self._notice(waiting_notice(self.plan, node, ctrl_c=ctrl_c, resumed=self._resume is not None,
                                    resume=self._resume_command(), instance=key, signal_key=entry.get("key"),
                                    again=self._resume_command(any_signal=True)))

    def _resume_command(self, any_signal: bool = False) -> str | None:
        """``flowdsl resume RUN`` (with ``--runs-dir`` where needed) when Ctrl-\\ (SIGQUIT) would end this process
        as it is — its default action, not ignored — leaving the run's record to ``flowdsl resume`` (``any_signal``:
        whatever SIGQUIT does); else None."""
        quit_signal = getattr(signal, "SIGQUIT", None)
        if self.record_path is None or self._recorder is None:
            return None
        if not any_signal:
            if quit_signal is None or threading.current_thread() is not threading.main_thread():
                return None
            try:
                if signal.getsignal(quit_signal) is not signal.SIG_DFL:
                    return None
            except ValueError:
                return None
        from flowdsl.runtime.summary import record_resume_command

        return record_resume_command(self.record_path)


def _event(name: str, payload: dict[str, Any] | None, key: str | None) -> dict[str, Any]:
    """The ``signal`` input event: ``key`` only when the signal has one (an unkeyed one is as before keys)."""
    if key is None:
        return {"type": "signal", "name": name, "payload": payload}
    return {"type": "signal", "name": name, "key": key, "payload": payload}
