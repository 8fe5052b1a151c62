"""The local run's waits: signals sent to the run from outside, and what the run says while a wait waits.

Stage: runtime: local. Imports the kernel's end states, ``flowdsl.runtime.execute`` (a payload's JSON check),
``.inputs`` (:class:`~flowdsl.runtime.inputs.InputError`), ``.timing`` (how a duration is written),
``flowdsl.shown`` and stdlib. :class:`Signalling` is mixed into :class:`~flowdsl.runtime.local.LocalRun` (whose
attributes it uses):

- **sending** (:meth:`Signalling.signal`) — a ``signal`` input event (docs/kernel.md, "Waits"), checked first: a
  name a wait of the plan takes, a payload that is a JSON object or None (:func:`check_signal`). Sent before the
  run has started it is held, and applied right after the run's start, before anything else (so are the run's
  ``signals=``) — a resumed run's after the timers that fell due while it stood, which fire first; sent from
  another thread it is handed to the run's event loop, as ``cancel()`` is. It is fed like every input event, so
  the record holds it and ``flowdsl show`` / ``resume`` replay it.
- **its outcome** (:class:`SignalSent`, :class:`SignalOutcome`) — the kernel answers a signal in the decision it
  makes of it (``signal_received``, ``signal_buffered``, ``signal_rejected``): the future ``signal()`` returns is
  settled then. A signal the run never applied (it ended, or was stopped at once, first) is settled
  ``rejected``, saying so; one sent after the run's end never reaches the kernel, and is not recorded.
- **saying it** (:meth:`Signalling._say_waits`) — once per signal wait, as it starts waiting, ``on_notice`` is
  told which signal the run waits for, until when, and how a local run is sent one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from flowdsl.kernel import END_STATES
from flowdsl.runtime.execute import NotJSON, plain_json
from flowdsl.runtime.inputs import InputError
from flowdsl.runtime.timing import duration_text
from flowdsl.shown import visible

if TYPE_CHECKING:
    from pathlib import Path

    from flowdsl.kernel import Program

__all__ = ["SignalOutcome", "SignalSent", "Signalling", "check_signal", "check_signals", "signal_names",
           "waiting_notice"]

#: the kernel's answer to a ``signal`` input event -> :attr:`SignalOutcome.outcome`
_ANSWERS = {"signal_received": "received", "signal_buffered": "buffered", "signal_rejected": "rejected"}

#: what ``signals=`` takes: a mapping name -> payload, or names and (name, payload) pairs
Signals = Mapping[str, Mapping[str, Any] | None] | Iterable[str | tuple[str, Mapping[str, Any] | None]]


@dataclass(frozen=True)
class SignalOutcome:
    """What became of a signal sent to a local run (:meth:`Signalling.signal`; the Redis client's ``signal()``
    answers with a ``SignalOutcome`` of the same fields, and an ``id``).

    ``outcome``: ``received`` (its wait waited and took it: the wait succeeds with the payload), ``buffered`` (its
    wait has not started: it is kept, and the wait takes it as it starts) or ``rejected`` (nothing took it:
    ``reason`` says why — its wait already had one, timed out or was skipped, the run is being stopped or has
    ended). ``wait`` is the wait that took it or will (its key), None when rejected; ``at`` the run's clock (ms
    since the epoch) when the run applied it, None when it never did."""

    run_id: str
    signal: str
    outcome: Literal["received", "buffered", "rejected"]
    wait: str | None = None
    reason: str | None = None
    at: int | None = None

    @property
    def taken(self) -> bool:
        """Whether a wait took the signal or will (``received`` or ``buffered``)."""
        return self.outcome != "rejected"

    def to_json(self) -> dict[str, Any]:
        """The outcome as a JSON object: ``run_id``, ``signal``, ``outcome``, ``wait``, ``reason``, ``at``."""
        return {"run_id": self.run_id, "signal": self.signal, "outcome": self.outcome, "wait": self.wait,
                "reason": self.reason, "at": self.at}

    @classmethod
    def of(cls, event: Mapping[str, Any]) -> SignalOutcome:
        """The outcome a kernel event (``signal_received``, ``signal_buffered``, ``signal_rejected``) says."""
        outcome = _ANSWERS[event["type"]]
        wait = event.get("step") if outcome == "received" else event.get("wait")
        return cls(run_id=str(event["run_id"]), signal=str(event["signal"]), outcome=outcome,  # type: ignore[arg-type]
                   wait=wait, reason=event.get("reason"), at=event.get("at"))


class SignalSent(concurrent.futures.Future[SignalOutcome]):
    """What :meth:`LocalRun.signal` returns: a future of the signal's :class:`SignalOutcome`, settled when the run
    has applied the signal (at once when ``signal()`` is called on the run's own event loop while the run goes;
    else on the run's loop's next turns).

    ``await`` it in async code (on any event loop), or call ``result(timeout)`` from another thread; never block
    on ``result()`` in the run's own event loop thread (the run could not go on to settle it). It is never
    settled with an exception: a signal nothing took is ``rejected``, with the reason."""

    def __init__(self, run_id: str, name: str):
        super().__init__()
        self.run_id, self.signal = run_id, name

    def __await__(self) -> Generator[Any, None, SignalOutcome]:
        return asyncio.wrap_future(self).__await__()

    def _settle(self, outcome: SignalOutcome) -> None:
        if not self.done():  # (a caller may have cancelled it: it no longer waits)
            self.set_result(outcome)

    def _reject(self, reason: str, at: int | None = None) -> None:
        self._settle(SignalOutcome(self.run_id, self.signal, "rejected", reason=reason, at=at))


def signal_names(plan: Mapping[str, Any]) -> dict[str, str]:
    """The signals the plan's waits take: name -> the key of the wait node taking it (at most one each)."""
    return {str(node["signal"]): key for key, node in (plan.get("nodes") or {}).items()
            if isinstance(node, Mapping) and node.get("kind") == "wait" and node.get("signal") is not None}


def check_signal(plan: Mapping[str, Any], name: Any, payload: Any,
                 names: Mapping[str, str] | None = None) -> tuple[str, dict[str, Any] | None]:
    """``(name, a plain copy of payload)`` for a signal to send to a run of ``plan`` (``names``: its
    :func:`signal_names`, when known). Raises ``TypeError`` for a name that is not a string or a payload that is
    neither a mapping nor None, :class:`~flowdsl.runtime.inputs.InputError` (a ``ValueError``) for a payload that
    is not JSON, and ``ValueError`` for a name no wait of the plan takes, naming those it has."""
    if not isinstance(name, str):
        raise TypeError(f"a signal's name must be a string; got {type(name).__name__}")
    names = signal_names(plan) if names is None else names
    if name not in names:
        flow = visible(str((plan.get("flow") or {}).get("name")))
        known = ", ".join(f"'{visible(n)}'" for n in sorted(names))
        raise ValueError(f"no wait of flow '{flow}' takes signal '{visible(name)}': "
                         + (f"its signals are {known}" if known else "the flow waits for no signal"))
    if payload is None:
        return name, None
    if not isinstance(payload, Mapping):
        raise TypeError(f"the payload of signal '{visible(name)}' must be a JSON object (a dict) or None; got "
                        f"{type(payload).__name__}")
    try:  # the run's own copy, as for the run input: what the caller keeps is not shared with the run
        return name, plain_json(dict(payload))
    except NotJSON as exc:
        raise InputError(f"the payload of signal '{visible(name)}' is not a JSON object: {exc}") from None


def check_signals(plan: Mapping[str, Any], signals: Signals | None) -> list[tuple[str, dict[str, Any] | None]]:
    """The ``signals=`` of a run, checked (:func:`check_signal`) and in order: a mapping name -> payload, or an
    iterable of names (no payload) and ``(name, payload)`` pairs. A name given twice is a ``ValueError`` (a signal
    goes to one wait, which takes one); anything else than those shapes a ``TypeError``."""
    if signals is None:
        return []
    if isinstance(signals, str | bytes) or not isinstance(signals, Mapping | Iterable):
        raise TypeError("signals must be a mapping (name -> payload) or a list of names and (name, payload) pairs; "
                        f"got {type(signals).__name__}")
    items = signals.items() if isinstance(signals, Mapping) else signals
    names = signal_names(plan)
    checked: list[tuple[str, dict[str, Any] | None]] = []
    for item in items:
        if isinstance(item, str):
            item = (item, None)
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise TypeError(f"each of signals must be a name or a (name, payload) pair; got {type(item).__name__}"
                            + (f" of {len(item)} items" if isinstance(item, tuple | list) else ""))
        name, payload = check_signal(plan, item[0], item[1], names)
        if any(name == seen for seen, _ in checked):
            raise ValueError(f"signal '{visible(name)}' is given twice: a signal goes to one wait, which takes one")
        checked.append((name, payload))
    return checked


def waiting_notice(plan: Mapping[str, Any], key: str, *, ctrl_c: bool = False, resumed: bool = False,
                   resume: str | None = None) -> str:
    """What a local run says as its wait ``key`` starts waiting for its signal: which, until when, and how a local
    run is sent one (``ctrl_c``: the run takes Ctrl-C, which cancels it; ``resumed``: the run was resumed;
    ``resume``: the ``flowdsl resume`` command that takes the run up again, when Ctrl-\\ (SIGQUIT) ends this process
    leaving the run resumable)."""
    node = plan["nodes"][key]
    name = visible(node["signal"])
    wait = f"wait '{visible(key)}', " if key != node["signal"] else ""
    timeout = node.get("timeout_ms")
    until = (f"{wait}up to {duration_text(timeout)}: then it fails with WaitTimeout" if timeout else
             f"{wait}with no deadline: it waits as long as it takes")
    command = f"when it is resumed, from `flowdsl resume --signal {name}=JSON`" if resumed else \
        f"when it starts, from `flowdsl run --signal {name}=JSON`"
    stop = "; Ctrl-C cancels the run" if ctrl_c else ""
    if ctrl_c and resume is not None:
        stop += f" (Ctrl-\\ ends this process and leaves the run to `{resume} --signal {name}=JSON`)"
    return (f"the run waits for signal '{name}' ({until}); a local run takes a signal from Python "
            f"(LocalRun.signal('{name}', payload)) or, {command}{stop}")


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
    _signals: list[int]
    _resume: Any
    record_path: Path | None
    _recorder: Any
    _feed: Callable[[dict[str, Any]], None]
    _notice: Callable[[str], None]

    def _init_signals(self, signals: Signals | None) -> None:
        checked = check_signals(self.plan, signals)
        #: signals sent before the run started (``signals=`` first): applied right after its start, in order
        self._held_signals: list[tuple[dict[str, Any], SignalSent]] = [
            (_event(name, payload), SignalSent(self.run_id, name)) for name, payload in checked]
        #: the signals handed to the run's loop or queued for the kernel, not yet applied: ``id(event)`` -> (the
        #: event, its future)
        self._unanswered: dict[int, tuple[dict[str, Any], SignalSent]] = {}
        #: set as :meth:`run` returns: a signal sent from then on is rejected at once
        self._signals_closed = False
        self._waits_said: set[str] = set()

    def signal(self, name: str, payload: Mapping[str, Any] | None = None) -> SignalSent:
        """Send signal ``name`` to the run, with ``payload`` (a JSON object, or None for ``{}``): the wait that
        takes it succeeds with the payload as its result — at once if it waits, else as it starts (the signal is
        kept until then). Returns a :class:`SignalSent`: ``await`` it (or ``.result(timeout)`` from another thread)
        for the :class:`SignalOutcome` — ``received``, ``buffered`` or ``rejected`` with the reason; or let it be.

        Raises at once, before anything reaches the run: ``ValueError`` when no wait of the plan takes ``name``
        (naming those it has), ``TypeError`` for a name that is not a string or a payload that is neither a mapping
        nor None, :class:`~flowdsl.runtime.inputs.InputError` (a ``ValueError``) for a payload that is not JSON.
        Sent before the run has started, it is held and applied as the run starts, before anything else (a resumed
        run's timers that fell due while it stood fire first: a deadline passed then is not beaten by it); called
        from another thread than the run's, it is handed to the run's event loop (as :meth:`cancel` is); sent once
        the run is over, it is ``rejected`` and not recorded."""
        name, data = check_signal(self.plan, name, payload, self._program.signals)
        event, sent = _event(name, data), SignalSent(self.run_id, name)
        with self._handoff:
            loop = self._loop
            if self._signals_closed or self._finished:
                sent._reject(self._too_late())
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
                    sent._reject(self._too_late())
                return sent
        self._send_signal(event, sent)
        return sent

    def _send_signal(self, event: dict[str, Any], sent: SignalSent) -> None:
        """On the run's loop: feed the signal to the kernel, unless the run is over (then it is rejected here)."""
        if sent.done():  # (rejected as the run returned)
            return
        if self._finished or self.state.get("status") in END_STATES:
            self._unanswered.pop(id(event), None)
            sent._reject(self._too_late())
            return
        self._feed(event)

    def _send_held(self, resumed: bool) -> None:
        """As the run starts (or is ``resumed``: after the timers that fell due while it stood, fired already): the
        signals held until then go first, before anything queued since. A resumed run's waits that wait for a signal
        not among them are said, as when they started."""
        held, self._held_signals = self._held_signals, []
        if self._finished or self.state.get("status") in END_STATES:  # (its input was refused: it ended at once)
            for _, sent in held:
                sent._reject(self._too_late())
            return
        for event, sent in reversed(held):
            self._unanswered[id(event)] = (event, sent)
            self._inbox.appendleft(event)
        if resumed:
            coming = {sent.signal for _, sent in held}
            for key, entry in (self.state.get("waits") or {}).items():
                if entry.get("signal") is not None and entry["signal"] not in coming:
                    self._say_waiting(key)

    def _signal_answered(self, cause: dict[str, Any], events: list[dict[str, Any]]) -> None:
        """The kernel applied signal ``cause``: settle its future with the answer among ``events``."""
        entry = self._unanswered.pop(id(cause), None)
        if entry is None or entry[0] is not cause:
            return
        answer = next((e for e in events if e["type"] in _ANSWERS and e.get("signal") == cause["name"]), None)
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
            sent._reject(self._too_late(before=True))

    def _too_late(self, before: bool = False) -> str:
        status = self.state.get("status")
        when = "before the signal reached it" if before else ""
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
                if not any(sent.signal == e["signal"] for _, sent in coming):
                    self._say_waiting(e["step"])

    def _say_waiting(self, key: str) -> None:
        if key not in self._waits_said:
            self._waits_said.add(key)
            ctrl_c = signal.SIGINT in self._signals  # (not when Ctrl-C is not the run's: inherited ignored)
            self._notice(waiting_notice(self.plan, self.state["nodes"][key]["node"], ctrl_c=ctrl_c,
                                        resumed=self._resume is not None, resume=self._resume_command()))

    def _resume_command(self) -> str | None:
        """``flowdsl resume RUN`` (with ``--runs-dir`` where needed) when Ctrl-\\ (SIGQUIT) would end this process
        as it is — its default action, not ignored — leaving the run's record to ``flowdsl resume``; else None."""
        quit_signal = getattr(signal, "SIGQUIT", None)
        if (quit_signal is None or self.record_path is None or self._recorder is None
                or threading.current_thread() is not threading.main_thread()):
            return None
        try:
            if signal.getsignal(quit_signal) is not signal.SIG_DFL:
                return None
        except ValueError:
            return None
        from flowdsl.runtime.summary import show_command

        shown = show_command(self.record_path)
        return "flowdsl resume " + shown.removeprefix("flowdsl show ") if shown.startswith("flowdsl show ") else None


def _event(name: str, payload: dict[str, Any] | None) -> dict[str, Any]:
    return {"type": "signal", "name": name, "payload": payload}
