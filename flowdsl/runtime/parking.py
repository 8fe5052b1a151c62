"""Parking a local run that has nothing left to do but wait: what its record says, and how it is told.

Stage: runtime (shared by the local runtime, the record readers and the CLI). Imports ``flowdsl.shown`` and stdlib.

A local run lives in its process, and so do its waits. With ``park`` (``flowdsl run --park``, ``flowdsl resume
--park``, ``LocalRun(park=True)``) the process lets the run go as soon as nothing is left but waiting — a wait
waits for its signal or its timer, no attempt runs and no input event is queued: it writes a :data:`PARKED` line
to the run's record, stops its timers and returns; ``flowdsl resume`` goes on with the run later, from its record
(docs/runtime.md, "Parking a run that only waits"). The line (:func:`parked_line`)::

    {"type": "runtime_parked", "run_id", "at", "status",
     "waits": [{"wait": key, "signal": name | null, "key"?: text, "due_at": ms | null}, ...], "due_at": ms | null}

``waits`` lists every wait that waits, as the run state holds them: the signal it takes (null for a timer wait), the
key a keyed wait takes it with (``key``, only for a keyed wait) and when its timer is due (a timer wait's end, a
signal wait's deadline; null for a signal wait without one); ``due_at`` is the earliest of every timer armed (a
wait's, a retry's backoff, the run's timeout), null when none is. Like a ``runtime_aborted`` line it tells of the
process before a later ``runtime_resumed`` line.

:func:`signal_option` is the ``--signal NAME[:KEY]=JSON`` option that sends a wait its signal, as every reader of a
parked run shows it.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Mapping
from typing import Any

from flowdsl.shown import UNSAFE, visible

__all__ = [
    "PARKED",
    "PARKED_STATE",
    "SHOWN_WAITS",
    "at_text",
    "go_on_commands",
    "parked_line",
    "parked_text",
    "signal_named",
    "signal_option",
    "timer_said",
]

#: the record line written as a run is parked
PARKED = "runtime_parked"
#: what a parked run is listed as (``flowdsl runs --backend local``), and its ``status`` in ``--format json``
PARKED_STATE = "parked"
#: the waits a parked run's notice names, at most (a for_each of keyed waits may hold thousands)
SHOWN_WAITS = 10

#: what a shell takes as it is, unquoted, in ``--signal NAME:KEY=JSON``
_SHELL_SAFE = re.compile(r"[A-Za-z0-9_.,:/@%+-]+\Z")


def parked_line(run_id: str, at: int, state: Mapping[str, Any], due: Mapping[str, int]) -> dict[str, Any]:
    """The :data:`PARKED` record line of run ``run_id`` parked at ``at`` as its kernel ``state`` stands; ``due``
    maps the id of each timer the runtime armed to when it is due (ms)."""
    armed = state.get("timers") or {}
    waits = [{"wait": key, "signal": entry.get("signal"),
              **({"key": entry["key"]} if entry.get("key") is not None else {}),
              "due_at": due.get(entry["timer"]) if entry.get("timer") in armed else None}
             for key, entry in (state.get("waits") or {}).items()]
    times = [due[t] for t in armed if t in due]
    return {"type": PARKED, "run_id": run_id, "at": at, "status": state.get("status"), "waits": waits,
            "due_at": min(times) if times else None}


def at_text(ms: int | None) -> str:
    """A time of the run's clock (ms since the epoch) as this machine's local time, ``2026-12-05 18:30:00``."""
    if ms is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def signal_option(name: str, key: str | None = None) -> str | None:
    """The ``--signal`` option that sends signal ``name`` (with ``key``, for a keyed wait) and a payload:
    ``--signal paid=JSON``, ``--signal delivered:1Z9=JSON`` (``NAME:KEY`` quoted for a shell when it must be); None
    for a key the command line cannot give — one holding ``=`` (where its payload starts) — or show safely — one
    holding a control character: such a signal is said to be sent from Python (``LocalRun.signal``,
    ``resume_flow(..., signals=...)``)."""
    if key is None:
        return f"--signal {visible(name)}=JSON"
    if "=" in key or UNSAFE.search(key) is not None:
        return None
    named = f"{visible(name)}:{key}"
    return f"--signal {named if _SHELL_SAFE.match(named) else shlex.quote(named)}=JSON"


def signal_named(name: str, key: str | None = None) -> str:
    """A signal as people read it (text of the run's: escape it to show it as markup): ``signal 'paid'``,
    ``signal 'delivered' key '1Z9'``."""
    return f"signal '{visible(name)}'" + (f" key '{visible(key)}'" if key is not None else "")


def go_on_commands(parked: Mapping[str, Any], resume: str) -> list[str]:
    """The commands that go on with a parked run, ``resume`` being its ``flowdsl resume RUN`` command: one per
    signal a wait waits for (``… --signal NAME=JSON``, ``… --signal NAME:KEY=JSON`` for a keyed wait; none for a
    key the command line cannot give, :func:`signal_option`), and ``resume`` alone when a timer is armed (it goes on
    once the timer is due: the resumed run waits for it, or fires it at once when it fell due meanwhile)."""
    options = [signal_option(str(w["signal"]), _key(w)) for w in parked.get("waits") or ()
               if w.get("signal") is not None]
    commands = [f"{resume} {option}" for option in options if option is not None]
    if parked.get("due_at") is not None:
        commands.append(resume)
    return commands


def parked_text(parked: Mapping[str, Any], resume: str | None) -> str:
    """What a parked run waits for, and how to go on with it: ``waits for signal 'paid' (until 2026-12-08
    18:00:00: then it fails with WaitTimeout), and the end of wait 'cool' (2026-12-05 20:00:00); go on with
    `flowdsl resume r1 --signal paid=JSON`; or, from 2026-12-05 20:00:00, when its next timer is due, `flowdsl resume
    r1` ``
    (``resume``: its ``flowdsl resume`` command, None to leave the way on out)."""
    parts = []
    waits = list(parked.get("waits") or ())
    for w in waits[:SHOWN_WAITS]:
        key, signal, due_at = visible(str(w.get("wait"))), w.get("signal"), w.get("due_at")
        if signal is None:
            parts.append(f"the end of wait '{key}' ({at_text(due_at)})")
            continue
        named = signal_named(str(signal), _key(w)) + (f" (wait '{key}')" if signal != w.get("wait") else "")
        parts.append(named + (f" (until {at_text(due_at)}: then it fails with WaitTimeout)" if due_at is not None
                              else " (no deadline)"))
    if len(waits) > SHOWN_WAITS:
        parts.append(f"{len(waits) - SHOWN_WAITS} more waits (`--format json` lists them all)")
    said = "waits for " + (", and ".join(parts) if parts else "nothing")
    if resume is None:
        return said
    signals = [f"`{c}`" for c in go_on_commands({"waits": waits[:SHOWN_WAITS]}, resume)]
    if any(w.get("signal") is not None and signal_option(str(w["signal"]), _key(w)) is None
           for w in waits[:SHOWN_WAITS]):
        signals.append("resume_flow(..., signals=[(NAME, payload, KEY)]) from Python, for a key a command line cannot "
                       "give (one holding '=') or show safely (one holding a control character)")
    due_at = parked.get("due_at")
    if due_at is None:
        return f"{said}; go on with {' or '.join(signals)}" if signals else said
    timer = f"from {at_text(due_at)}, when its next timer is due, `{resume}`"
    return f"{said}; go on with {' or '.join(signals)}; or, {timer}" if signals else f"{said}; go on {timer}"


def _key(wait: Mapping[str, Any]) -> str | None:
    key = wait.get("key")
    return str(key) if key is not None else None


#: what a timer is, by its ``purpose`` in the kernel's state (``{}``: the step, wait or sub-flow it is for)
_PURPOSES = {"wait": "the end of wait '{}'", "wait_timeout": "the deadline of wait '{}' (it fails with WaitTimeout)",
             "retry": "the retry backoff of step '{}'", "run_timeout": "the run's timeout",
             "flow_timeout": "the timeout of sub-flow '{}'", "attempt_timeout": "the timeout of step '{}'"}


def timer_said(timer: Mapping[str, Any]) -> str:
    """What a timer (a ``schedule_timer`` command, or a timer of the run state) is, for people: ``the end of wait
    'cool'``, ``the deadline of wait 'paid' (it fails with WaitTimeout)``, ``the run's timeout``."""
    said = _PURPOSES.get(str(timer.get("purpose")), "a timer of '{}'")
    return said.format(visible(str(timer.get("step"))))
