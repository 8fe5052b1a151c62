"""``--signal NAME[:KEY][=JSON]`` of ``flowdsl run`` and ``flowdsl resume`` (the local runtime): read, checked against
the plan's waits, and the note on a signal wait that nothing will signal.

Stage: CLI. Imports ``flowdsl.runtime.inputs`` (reading a JSON object, :class:`InputError`),
``flowdsl.runtime.local_waits`` (the names a plan's waits take, the check of a signal), ``flowdsl.runtime.timing``
and ``flowdsl.shown``.

A local run lives in its process, so a signal reaches it from the command line only as it starts (or is resumed):
each ``--signal`` is sent then, before anything else (a resumed run's timers that fell due while it stood fire
first), and kept until its wait starts (docs/runtime.md, "Waits and signals"). A payload is inline, in a file
(``NAME=@FILE``) or on stdin (``NAME=@-``), which is read once: for one ``--signal``, and not with ``--input -``.
The signal of a keyed wait (``key:``, in a for_each) is given with the key of the instance it is for,
``NAME:KEY``: the name ends at the first ``:``, the key at the first ``=`` — so a key holding ``=`` cannot be given
here (``LocalRun.signal`` and ``resume_flow(..., signals=...)`` take any key).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flowdsl.runtime.inputs import InputError, read_json_object
from flowdsl.runtime.signal_checks import Checked, check_signal, check_signals, keyed_signals, signal_names
from flowdsl.runtime.timing import duration_text
from flowdsl.shown import visible

__all__ = ["check_stdin", "read_signals", "stdin_signals", "unsent_notes"]

#: the largest payload file (``--signal NAME=@FILE``) read, in bytes: a signal's payload is kept in the run's state
#: and record, as its input is
_FILE_LIMIT = 64 * 1024 * 1024


def read_signals(items: Iterable[str], plan: Mapping[str, Any], *,
                 input_from_stdin: bool = False) -> list[Checked]:
    """The ``--signal`` options given, read and checked against ``plan``'s waits: ``NAME`` (no payload),
    ``NAME=JSON`` (a JSON object) or ``NAME=@FILE`` (a JSON object in a file, ``@-`` for stdin), each with
    ``:KEY`` after the name for a keyed wait's signal (``NAME:KEY=JSON``): ``(name, payload, key)`` each, key None
    when unkeyed. Raises :class:`InputError` saying which option is wrong and why: not of that form, a payload that
    is not a JSON object, a name no wait of the flow takes, a key missing (a keyed wait's signal), given to an
    unkeyed wait's signal, empty or too long, a signal given twice (the same name and key), stdin read twice
    (:func:`check_stdin`; ``input_from_stdin``: the run input is read from it, ``--input -``)."""
    items = list(items)
    check_stdin(items, input_from_stdin=input_from_stdin)
    names = signal_names(plan)
    read: list[tuple[str, dict[str, Any] | None, str | None]] = []
    for item in items:
        named, sep, raw = item.partition("=")
        name, colon, key = named.partition(":")
        if not name:
            raise InputError(f"--signal {visible(item)}: expected NAME, NAME=JSON or NAME=@FILE (a signal's name, "
                             "then its payload: a JSON object), with NAME:KEY for a keyed wait's signal")
        try:
            checked = check_signal(plan, name, None, names, key=key if colon else None)
        except ValueError as exc:
            cut = colon and not key and name in keyed_signals(plan)
            raise InputError(f"--signal {visible(named)}: {exc}"
                             + (" (here the key ends at the first '=': a key holding '=' is sent from Python)"
                                if cut else "")) from None
        read.append((name, _payload(named, raw) if sep else None, checked[2]))
    try:
        return check_signals(plan, read)
    except (TypeError, ValueError) as exc:
        raise InputError(f"--signal: {exc}") from None


def stdin_signals(items: Iterable[str]) -> list[str]:
    """The ``--signal`` options among ``items`` whose payload is read from stdin (``NAME=@-``, ``NAME:KEY=@-``), as
    given."""
    return [item for item in items if item.partition("=")[2] == "@-" and item.partition("=")[0]]


def check_stdin(items: Iterable[str], *, input_from_stdin: bool = False) -> None:
    """Stdin is read once: :class:`InputError` when two ``--signal NAME=@-`` read it, or one does and the run
    input is read from it too (``input_from_stdin``: ``--input -``) — the second reader would find it empty."""
    readers = stdin_signals(items)
    if input_from_stdin and readers:
        raise InputError(f"--signal {visible(readers[0])}: stdin is read for the run input already (--input -): "
                         "give the signal's payload inline (NAME=JSON) or from a file (NAME=@FILE)")
    if len(readers) > 1:
        raise InputError(f"--signal {visible(readers[1])}: stdin is read for the payload of --signal "
                         f"{visible(readers[0])} already: give one of them inline (NAME=JSON) or from a file "
                         "(NAME=@FILE)")


def _payload(name: str, raw: str) -> dict[str, Any]:
    where = f"--signal {visible(name)}"
    example = "NAME='{\"ok\": true}' (or NAME alone for none)"
    if raw == "@-":
        return read_json_object(f"{where}=@- (stdin)", file="-", example=example, limit=_FILE_LIMIT)
    if raw.startswith("@"):
        return read_json_object(f"{where}=@{visible(raw[1:])}", file=raw[1:], example=example, limit=_FILE_LIMIT)
    return read_json_object(where, text=raw, example=example)


def unsent_notes(plan: Mapping[str, Any], given: Iterable[str], state: Mapping[str, Any] | None = None, *,
                 ctrl_c: bool = True, park: bool = False) -> list[str]:
    """A note for each signal wait of ``plan`` whose signal is not among ``given`` (the ``--signal`` names; a keyed
    wait's signal is among them when it is given with any key): nothing else can send it to this run, so it waits
    until its deadline, or for ever — or, with ``park`` (``--park``), the run is parked once it only waits, and
    ``flowdsl resume --signal`` sends it then. ``state``: a resumed run's (said of ``flowdsl resume``), whose waits
    that have started (the run says those that wait) or whose signal is kept already are left out. ``ctrl_c``:
    Ctrl-C cancels the run (not when SIGINT is inherited ignored)."""
    sent = set(given)
    started: set[str] = set()
    if state is not None:
        sent |= set(state.get("signals") or ()) | {name for name, kept in (state.get("kept") or {}).items() if kept}
        started = {rec.get("node") for rec in (state.get("nodes") or {}).values()}
    notes = []
    keyed_names = keyed_signals(plan)
    for name, key in sorted(signal_names(plan).items(), key=lambda item: plan["nodes"][item[1]]["order"]):
        if name in sent or key in started:
            continue
        node = plan["nodes"][key]
        keyed = name in keyed_names
        option = f"--signal {visible(name)}:KEY=JSON" if keyed else f"--signal {visible(name)}=JSON"
        timeout = node.get("timeout_ms")
        then = (f"if the run reaches it, it waits {duration_text(timeout)} and fails (WaitTimeout)" if timeout else
                "if the run reaches it, it waits for ever" + (" (Ctrl-C cancels the run)" if ctrl_c else ""))
        said = [f"signal '{visible(name)}'"] * (name != key) + ["by key"] * keyed
        wait = f"wait '{visible(key)}'" + (f" ({', '.join(said)})" if said else "")
        what = "signals (one per instance, with its key)" if keyed else "a signal"
        if park:
            within = f" (within {duration_text(timeout)} of the wait's start: then it fails with WaitTimeout)" \
                if timeout else ""
            notes.append(f"{wait} waits for {what} this command does not send: if the run reaches it, the run is "
                         f"parked there once nothing else goes on (--park), and `flowdsl resume … {option}` sends "
                         f"it{within}")
            continue
        command = "flowdsl run" if state is None else "flowdsl resume"
        notes.append(f"{wait} waits for {what} this command does not send: a local run takes one only from "
                     f"Python (LocalRun.signal) or as it starts (`{command} … {option}`); {then}")
    return notes
