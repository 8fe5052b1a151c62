"""Listing runs: the local runtime's run records (``flowdsl runs --backend local``) and the table both backends print.

Stage: runtime (shared), CLI support. Imports stdlib, orjson, ``.record``, ``.parking``, and inside functions
``.owner``, ``.codec``, ``.report``, ``.rebuild`` (its replay, as ``flowdsl show`` does it, for a record whose last
lines do not give its end) and ``.summary`` (its error console); rich only inside the printing functions, through
the console handed in. The Redis backend's ``commands`` prints its listing with :func:`print_runs` too; nothing here
imports Redis.

A record is read by its ends: its first two lines (the header, with the flow's name, the time the run was
taken and the process that runs it, and the ``start`` line) and its last 64 KiB, where the run's last
``run_finished`` line (its end state), its ``runtime_aborted`` line (stopped at once), its ``runtime_parked`` line
(parked: its process let it go as it only waited, ``.parking``) or a ``resolved`` line (``flowdsl resolve``) is.
Only a record that ends otherwise — its process was killed, or the run still goes, or
lines after its end are longer than that — is read whole and replayed, as ``show`` does, so that its state is the
one ``show`` gives; and the process its header names is looked for (``.owner``): gone, the run is listed
``crashed`` — once the record is read again and found to hold no more than was judged (a process that is gone
writes no more: a run that ended, and whose process exited, between the reading and the look is read again, and
listed as it ended). A record that ends while its runtime waits, after the run's end, for attempts it had given up
on, and whose process still runs, is listed in its end state marked ``waiting``, not finished yet (a late answer
may still change it).
The listing does not check a record's middle: ``show`` does.

Newest first is by the time the run was taken (the header's ``started_at``). A record's file is written from that
moment on, so its modification time is never earlier: the files are visited by modification time, newest first,
and the listing stops reading once a file's modification time (plus :data:`MTIME_SLACK_MS`) is older than the
``limit`` runs it has found — with thousands of records, ``-n 20`` reads about twenty.
"""

from __future__ import annotations

import heapq
import json
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from flowdsl.runtime.parking import PARKED, PARKED_STATE
from flowdsl.runtime.record import (
    RECORD_FAILED,
    RECORD_FORMAT,
    RESOLVED,
    RESUMED,
    NewerRecord,
    RecordError,
    newer_problem,
    versions_read,
)

__all__ = ["CRASHED", "LOCAL_STATES", "MTIME_SLACK_MS", "NEWER", "PARKED_STATE", "RESOLVED_STATE", "RecordRow",
           "RunRow", "list_records", "local_runs_command", "print_runs", "read_row"]

#: the states a local run is listed in: the kernel's (before its end, and the end states), ``aborted`` (stopped at
#: once: its record ends with ``runtime_aborted``, as ``show`` says), ``parked`` (its record ends with
#: ``runtime_parked``: its process let it go as it only waited, and ``flowdsl resume`` goes on with it),
#: ``not_started`` (a record holding only its header), ``unrecorded``, ``crashed`` (it did not end, and its process is
#: gone), ``resolved`` (``flowdsl resolve`` said what it left to do by hand is done) and ``newer`` (written by a
#: newer flowdsl); what ``flowdsl runs --backend local --status`` takes
LOCAL_STATES = ("not_started", "running", "aborting", "compensating", "completed", "failed", "compensated",
                "cancelled", "needs_intervention", "aborted", PARKED_STATE, "unrecorded", "crashed", "resolved",
                "newer")
#: the state of a run whose record ends before the run did and whose process is gone (a SIGKILL, the OOM killer, a
#: restart): the run stopped with it, and nothing carries it on (``flowdsl show`` gives what is left to undo)
CRASHED = "crashed"
#: the state of a run that a person said is finished by hand: its record has a ``resolved`` line
RESOLVED_STATE = "resolved"
#: the state of a record written by a newer flowdsl, which this one does not read
NEWER = "newer"
#: the state of a run whose record stops where writing it failed (its last line is ``record_failed``) before the
#: run's end: the run went on unrecorded, so its end is unknown here
UNRECORDED = "unrecorded"
_END_STATES = frozenset({"completed", "failed", "compensated", "cancelled", "needs_intervention"})
#: the states of a record that ends before its run did (its process stopped, or the run still goes)
_GOING = frozenset({"running", "aborting", "compensating"})
#: how much of a record's end is read for its ``run_finished`` or ``runtime_aborted`` line
TAIL_BYTES = 1 << 16
#: how many times a record is read again after its process was found gone, when it keeps changing (a ``flowdsl
#: resume`` or ``resolve`` writing to it meanwhile): then the last reading is listed
_REREADS = 3
#: how far a file's modification time may lag the run's start it records (coarse file-system clocks, FAT's 2 s)
MTIME_SLACK_MS = 2000
_CHUNK = 1 << 16
SUFFIX = ".jsonl"


class Row(Protocol):
    """One line of ``flowdsl runs``, as either backend gives it (the Redis client's ``RunInfo`` is one)."""

    @property
    def run_id(self) -> str: ...
    @property
    def flow(self) -> str | None: ...
    @property
    def status(self) -> str: ...
    @property
    def submitted_at(self) -> int | None: ...
    @property
    def started_at(self) -> int | None: ...
    @property
    def finished_at(self) -> int | None: ...


@dataclass(frozen=True)
class RunRow:
    """A local run as ``flowdsl runs --backend local`` lists it; times in milliseconds since the epoch (None when
    not reached). ``submitted_at`` is when the runtime took the run (the header's ``started_at``: a local run
    starts as it is taken), ``started_at`` the run's start (its ``start`` line), ``finished_at`` its end (its last
    ``run_finished``; None while its runtime still waits after it for attempts it gave up on: not final yet)."""

    run_id: str
    flow: str | None
    status: str
    submitted_at: int | None
    started_at: int | None
    finished_at: int | None

    def to_json(self) -> dict[str, Any]:
        """The ``flowdsl runs --format json`` object of this run (both backends): its fields by name."""
        return {"run_id": self.run_id, "flow": self.flow, "status": self.status, "submitted_at": self.submitted_at,
                "started_at": self.started_at, "finished_at": self.finished_at}


@dataclass(frozen=True)
class RecordRow(RunRow):
    """A local run record's listing line, with what the notes of the listing and ``flowdsl prune`` need besides (in the
    JSON object only ``parked``, below): ``why``, a clause saying why it is in its state (whose process is gone, that
    whether it still runs cannot be told, that a newer flowdsl wrote it, who resolved it); ``was``, the state a crashed
    run stopped in, or the one a resolved run was in; ``last_at``, the time of the record's last line (ms); ``process``,
    what :func:`flowdsl.runtime.owner.judge` said of the process its header names when that was asked (``live``,
    ``gone``, ``unknown``); ``doubt``, whether its end left attempts unanswered (steps in doubt), or the record ends
    while its runtime waited for them and its process is not known to run; ``waiting``, whether the run has ended and
    its runtime, whose process runs, still waits for attempts it had given up on — a late answer may still change the
    end, so ``status`` is not final yet, and ``finished_at`` is None until it is (the JSON object keeps the keys of a
    Redis run's: it says so by its ``finished_at``); ``parked``, a parked run's ``{at, waits, due_at}`` as its
    ``runtime_parked`` line gives them (what each wait waits for, and the earliest timer due) — the one of these the
    JSON object has, as ``parked``, and only for a parked run."""

    why: str | None = None
    was: str | None = None
    last_at: int | None = None
    process: str | None = None
    doubt: bool = False
    waiting: bool = False
    parked: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """:meth:`RunRow.to_json`, and for a parked run ``parked``: ``{at, waits: [{wait, signal, key?, due_at}],
        due_at}``, as ``flowdsl show --format json`` gives it."""
        out = super().to_json()
        if self.parked is not None:
            out["parked"] = self.parked
        return out


def _loads(raw: bytes) -> Any:
    """The JSON value of a record line: orjson's reading (a record's header, with its plan, is read about twice as
    fast so), else the standard library's, which reads what orjson refuses (NaN, integers beyond 64 bits) as
    ``show`` does (``ValueError`` or ``RecursionError`` for what is not JSON)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def _ms(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _judged(header: Any) -> Any:
    """How the process running a record's run stands, as its header names it (a record read from its ends holding
    no ``runtime_resumed`` line)."""
    from flowdsl.runtime.owner import judge
    from flowdsl.runtime.record import owner_of

    return judge(owner_of(header if isinstance(header, dict) else None, ()))


def _judged_from_ends(header: Any, tail: _Tail, fh: Any, size: int) -> Any:
    """:func:`_judged` of a record read from its ends: its owner is named by the last ``runtime_resumed`` line the
    tail holds, else by the last one further back (looked for in the file's first ``size`` bytes, those read, a
    resumed run's record being rare), else by the header."""
    from flowdsl.runtime.owner import judge

    if tail.resumed is not None:
        return judge(tail.resumed.get("process"))
    fh.seek(0)
    data = fh.read(size)  # (the bytes judged: those read for its ends)
    at = len(data)
    while (at := data.rfind(b'"' + RESUMED.encode() + b'"', 0, at)) >= 0:  # (the last line of that type)
        begin, end = data.rfind(b"\n", 0, at) + 1, data.find(b"\n", at)
        try:
            line = _loads(data[begin:end if end >= 0 else len(data)])
        except (ValueError, RecursionError):
            continue
        if isinstance(line, dict) and line.get("type") == RESUMED:
            return judge(line.get("process"))
    return _judged(header)


def _resolved_why(line: dict[str, Any]) -> str:
    note = line.get("note")
    return f"resolved by {line.get('by')}" + (f": {note}" if isinstance(note, str) and note else "")


class _Replay(Exception):
    """The ends of the record do not give the run's state: read it whole."""


def read_row(path: Path, size: int | None = None, *, quick: bool = False) -> RecordRow:
    """The listing line of the record ``path`` (a regular file): from its ends, else by replaying it whole.
    :class:`RecordError` says why it is not a run record one can list (it names the file). ``size``: how much of it
    to read (its size when the directory was listed; default: its size now).

    ``quick`` (``flowdsl prune``): the line of a record that ends with its run's end, a resolution or a stop at once
    comes without its flow's name and start times, and its header is not read whole: its first bytes are those this
    flowdsl writes, of a format and plan version it reads (a header begins with them), and its ``start`` line ends
    with a kernel rules version it knows — else it is read as without ``quick``.

    A record whose process is found gone is read again when the file is no longer what was read (it grew, or is
    another file): a process that is gone writes no more, so the run went on — and perhaps ended — between the
    reading and the look at its process, and the record now holds how."""
    row, judged = _read_row(path, size, quick)
    for _ in range(_REREADS):
        if row.process != "gone":
            break
        try:
            now = os.stat(path)
        except OSError:  # removed meanwhile: what was read is all there is
            break
        if (now.st_dev, now.st_ino, now.st_size) == judged:
            break
        row, judged = _read_row(path, None, quick)
    return row


def _read_row(path: Path, size: int | None, quick: bool) -> tuple[RecordRow, tuple[int, int, int]]:
    """:func:`read_row` of the record as it is read once, and what was read: the file's device, inode and the
    number of its bytes judged."""
    try:
        with open(path, "rb") as fh:
            info = os.fstat(fh.fileno())
            if size is None:
                size = info.st_size
            judged = (info.st_dev, info.st_ino, size)
            try:
                if quick:
                    row = _quickly(path, fh, size)
                    if row is not None:
                        return row, judged
                    fh.seek(0)
                return _from_ends(path, fh, size), judged
            except _Replay:
                pass  # its ends do not say how it stands: replayed whole, below
    except OSError as exc:
        raise RecordError(f"cannot read {path}: {exc.strerror or exc}") from None
    return _replayed(path)


def _from_ends(path: Path, fh: Any, size: int) -> RecordRow:
    lines, after, head = _first_lines(fh, size)
    if not lines or not lines[0].strip():
        raise RecordError(f"{path} is empty, not a run record (a run starting at this instant, or one whose process "
                          "stopped before it wrote the record's header)" if size == 0 else
                          f"{path}:1: not a run record: its first line is empty")
    try:
        header = _loads(lines[0])
    except (ValueError, RecursionError):
        cut = " (it ends without its newline: its process may have stopped while writing it)" if len(lines[0]) == size \
            else ""
        raise RecordError(f"{path}:1: not a run record: its first line is not JSON{cut}") from None
    plan = header.get("plan") if isinstance(header, dict) else None
    if not isinstance(header, dict) or header.get("type") != "record" or not isinstance(plan, dict):
        raise RecordError(f"{path}:1: not a run record: its first line is not a record header "
                          '({"type": "record", "plan": …})')
    named = (plan.get("flow") or {}).get("name") if isinstance(plan.get("flow"), dict) else None
    run_id, flow = path.name.removesuffix(SUFFIX), named if isinstance(named, str) else None
    taken = _ms(header.get("started_at"))
    newer = newer_problem(header)
    if newer is not None:
        return RecordRow(run_id, flow, NEWER, taken, None, None, why=newer)
    if len(lines) < 2:
        if after == size:  # the header alone, whole: the run had not started
            return _not_ended(RecordRow(run_id, flow, "not_started", taken, None, None, last_at=taken), header)
        raise _Replay
    try:
        start = _loads(lines[1])
    except (ValueError, RecursionError):
        raise _Replay from None
    began = _ms(start.get("at")) if isinstance(start, dict) and start.get("type") == "start" else None
    if began is None:
        raise _Replay
    newer = newer_problem(header, start)
    if newer is not None:
        return RecordRow(run_id, flow, NEWER, taken, began, None, why=newer)
    taken = taken if taken is not None else began
    tail = _end_lines(fh, size, after, head)
    finished, aborted, resolved = tail.finished, tail.stopped, tail.resolved
    end = _ms(finished.get("at")) if finished is not None else None
    if resolved is not None:
        return RecordRow(run_id, flow, RESOLVED_STATE, taken, began, end, why=_resolved_why(resolved),
                         was=str(resolved.get("status")), last_at=tail.last_at)
    if tail.parked is not None:  # (its process let it go: it is not asked)
        return RecordRow(run_id, flow, PARKED_STATE, taken, began, None, last_at=tail.last_at, parked=tail.parked)
    if finished is not None:
        # (the run's end waits: its process may run — and then it still waits, and nothing is in doubt yet)
        process = _judged_from_ends(header, tail, fh, size).state if tail.waiting else None
        waits = process == "live"
        return RecordRow(run_id, flow, str(finished["status"]), taken, began, None if waits else end,
                         last_at=tail.last_at, process=process, doubt=tail.doubt and not waits, waiting=waits)
    if aborted is not None:
        if aborted.get("type") == RECORD_FAILED:  # the run went on unrecorded: its process may still run it
            return RecordRow(run_id, flow, UNRECORDED, taken, began, None, last_at=tail.last_at,
                             process=_judged_from_ends(header, tail, fh, size).state)
        return RecordRow(run_id, flow, "aborted", taken, began, None, last_at=tail.last_at)
    raise _Replay


#: how a header this flowdsl writes begins (and one of earlier versions, without the first two fields)
_HEAD = re.compile(rb'\{"type":"record",(?:"record_format":([0-9]{1,9}),"flowdsl_version":"[^"\\]*",)?'
                   rb'"plan":\{"plan_version":([0-9]{1,9}),')
#: how a ``start`` line this flowdsl writes ends
_KERNEL = re.compile(rb',"kernel":([0-9]{1,9})\}\Z')


def _quickly(path: Path, fh: Any, size: int) -> RecordRow | None:
    """:func:`read_row`'s ``quick`` line, or None when the record is to be read as without it."""
    lines, after, head = _first_lines(fh, size)
    if len(lines) < 2 or not lines[1].startswith(b'{"type":"start",'):
        return None
    first, kernel = _HEAD.match(lines[0]), _KERNEL.search(lines[1])
    if first is None or kernel is None:
        return None
    plan_version, rules = versions_read()
    if int(first.group(1) or 1) > RECORD_FORMAT or int(first.group(2)) > plan_version or int(kernel.group(1)) > rules:
        return None  # (newer: said as such, below)
    tail = _end_lines(fh, size, after, head)
    run_id = path.name.removesuffix(SUFFIX)
    end = _ms(tail.finished.get("at")) if tail.finished is not None else None
    if tail.resolved is not None:
        return RecordRow(run_id, None, RESOLVED_STATE, None, None, end, why=_resolved_why(tail.resolved),
                         was=str(tail.resolved.get("status")), last_at=tail.last_at)
    if tail.parked is not None:
        return RecordRow(run_id, None, PARKED_STATE, None, None, None, last_at=tail.last_at, parked=tail.parked)
    if tail.finished is not None and not tail.waiting:
        return RecordRow(run_id, None, str(tail.finished["status"]), None, None, end, last_at=tail.last_at,
                         doubt=tail.doubt)
    if tail.stopped is not None and tail.stopped.get("type") != RECORD_FAILED:
        return RecordRow(run_id, None, "aborted", None, None, None, last_at=tail.last_at)
    return None


def _not_ended(row: RecordRow, header: Any) -> RecordRow:
    """``row``, of a record that holds only its header, as its process stands: ``crashed`` when it is gone."""
    from dataclasses import replace

    verdict = _judged(header)
    if verdict.state == "gone":
        return replace(row, status=CRASHED, was=row.status, why=verdict.said, process=verdict.state)
    return replace(row, why=verdict.said, process=verdict.state)


def _first_lines(fh: Any, size: int) -> tuple[list[bytes], int, bytes]:
    """The first two whole lines of the file (fewer when it has fewer), the offset after them, and what was read
    (from the file's beginning: often the whole of a small record)."""
    buf = bytearray()
    ends: list[int] = []
    while len(ends) < 2 and len(buf) < size:
        chunk = fh.read(_CHUNK)
        if not chunk:
            break
        at = len(buf)
        buf += chunk
        while len(ends) < 2:
            found = buf.find(b"\n", at)
            if found < 0:
                break
            ends.append(found)
            at = found + 1
    lines, begin = [], 0
    for end in ends:
        lines.append(bytes(buf[begin:end]))
        begin = end + 1
    if not ends and buf:  # one line without its newline: the header, perhaps cut
        return [bytes(buf)], len(buf), bytes(buf)
    return lines, begin, bytes(buf)


@dataclass
class _Tail:
    """What the end of a record says: its last ``run_finished`` (``finished``), or the ``runtime_aborted`` or
    ``record_failed`` line that stopped it before its end (``stopped``), or the ``runtime_parked`` line it ends with
    (``parked``: its ``{at, waits, due_at}``); its last ``resolved`` line; the time of its last line; whether it ends
    while its runtime waited for attempts after the run's end (``waiting``), and whether attempts were left
    unanswered then (``doubt``)."""

    finished: dict[str, Any] | None = None
    stopped: dict[str, Any] | None = None
    resolved: dict[str, Any] | None = None
    last_at: int | None = None
    waiting: bool = False
    doubt: bool = False
    parked: dict[str, Any] | None = None
    #: the last ``runtime_resumed`` line, when the tail holds one (the lines before it tell of an earlier process)
    resumed: dict[str, Any] | None = None


def _end_lines(fh: Any, size: int, after: int, head: bytes) -> _Tail:
    """From the record's last :data:`TAIL_BYTES` (never before offset ``after``): its last ``run_finished`` line
    when it is there, else its ``runtime_aborted`` line when that says the run was stopped before its end, or its
    ``runtime_parked`` line when it is the last (the run parked), and a ``resolved`` line after them
    (:class:`_Tail`); raises :class:`_Replay` when the end does not say (or a whole line
    there is not JSON: ``show`` names it) and no ``resolved`` line does."""
    begin = max(after, size - TAIL_BYTES)
    first = begin - 1 if begin > after else begin
    if len(head) >= size:  # read already
        data = head[first:size]
    else:
        fh.seek(first)
        data = fh.read(size - first)
    pieces = data.split(b"\n")
    if begin > after:
        pieces = pieces[1:]  # the end of a line that began before: not read whole
    last = pieces.pop() if pieces else b""  # after the last newline: nothing, or a line without it
    lines: list[bytes] = pieces
    if last.strip():
        try:
            _loads(last)
            lines = [*pieces, last]  # whole JSON: read like any line (else it was cut short: left out)
        except (ValueError, RecursionError):
            pass
    tail = _Tail()
    aborted: dict[str, Any] | None = None
    failed: dict[str, Any] | None = None  # the record_failed line, when it is the last
    waited = False
    final = True  # (the record's last line: the one a parked run's record ends with)
    for piece in reversed(lines):
        if not piece.strip():
            continue
        try:
            item = _loads(piece)
        except (ValueError, RecursionError):
            raise _Replay from None
        if not isinstance(item, dict):
            raise _Replay
        kind = item.get("type")
        if tail.last_at is None:
            tail.last_at = _ms(item.get("at"))
        if kind == PARKED:  # (nothing is written after it but a resume's lines: a record otherwise is replayed)
            tail.parked = _parked_of(item) if final else None
            if tail.parked is None:
                raise _Replay
            return tail
        final = False
        if kind == RESOLVED:
            tail.resolved = tail.resolved or item
            continue
        if kind == "runtime_waited":
            waited = True
            tail.doubt = tail.doubt or bool(item.get("unanswered"))
        if kind == "runtime_waiting" and not waited:  # (its process stopped, or still waits)
            tail.waiting = tail.doubt = True
        if kind == RESUMED:  # what comes before it tells of the process before: how the run stands is said after
            tail.resumed = item
            break
        if kind == "run_finished":  # the last one is the run's end (a late completion emits it again)
            if item.get("status") not in _END_STATES:
                raise _Replay
            tail.finished = item
            return tail
        if kind == "runtime_aborted" and aborted is None:
            aborted = item
        if kind == RECORD_FAILED and aborted is None and failed is None:
            failed = item
    if failed is not None and failed.get("status") in _GOING:  # writing it failed before the run's end
        tail.stopped = failed
    elif aborted is not None and aborted.get("status") in _GOING:  # stopped at once before its end
        tail.stopped = aborted
    elif tail.resolved is None:
        raise _Replay  # (stopped after its end, its run_finished further back; or no end: replay it)
    return tail


def _parked_of(line: dict[str, Any]) -> dict[str, Any] | None:
    """A ``runtime_parked`` line's ``{at, waits, due_at}``, or None when it is not of that shape (the replay
    names what is wrong)."""
    waits, due = line.get("waits"), line.get("due_at")
    if _ms(line.get("at")) is None or not isinstance(waits, list) or (due is not None and _ms(due) is None) \
            or not all(isinstance(w, dict) and isinstance(w.get("wait"), str)
                       and (w.get("signal") is None or isinstance(w.get("signal"), str))
                       and (w.get("key") is None or isinstance(w.get("key"), str))
                       and (w.get("due_at") is None or _ms(w.get("due_at")) is not None) for w in waits):
        return None
    return {"at": line["at"], "waits": [{"wait": w["wait"], "signal": w.get("signal"),
                                         **({"key": w["key"]} if w.get("key") is not None else {}),
                                         "due_at": w.get("due_at")} for w in waits], "due_at": due}


def _replayed(path: Path) -> tuple[RecordRow, tuple[int, int, int]]:
    """The listing line of a record whose ends do not give its state: replayed whole, and judged, as ``show`` does
    (``.stopped.settle``: one that ends before its run did is ``crashed`` when its process is gone, ``parked`` when
    it ends with the run parked); and what was read (:func:`_read_row`)."""
    from dataclasses import replace

    from flowdsl.runtime.rebuild import record_result
    from flowdsl.runtime.record import read_record
    from flowdsl.runtime.report import NOT_STARTED
    from flowdsl.runtime.stopped import settle

    run_id = path.name.removesuffix(SUFFIX)
    try:
        with open(path, "rb") as fh:
            info = os.fstat(fh.fileno())
            raw = fh.read()
    except OSError as exc:
        raise RecordError(f"cannot read {path}: {exc.strerror or exc}") from None
    judged = (info.st_dev, info.st_ino, len(raw))
    try:
        header, lines = read_record(path, raw)
    except NewerRecord as exc:
        return RecordRow(run_id, None, NEWER, None, None, None, why=str(exc)), judged
    result = record_result(header, lines, path)
    standing = settle(header, lines, result) if not lines.resolutions else None
    submitted = _ms((header or {}).get("started_at"))
    last = next((at for e in reversed(lines) if (at := _ms(e.get("at"))) is not None), submitted)
    process = standing.process if standing is not None else None
    waits = standing is not None and standing.waiting and standing.live  # (not finished until the wait is over)
    stopped = standing.stopped if standing is not None else None
    status = "aborted" if result.aborted is not None else CRASHED if standing is not None and standing.crashed \
        else UNRECORDED if stopped == "unrecorded" else PARKED_STATE if stopped == PARKED_STATE else result.status
    row = RecordRow(run_id=run_id, flow=result.flow, status=status,
                    submitted_at=submitted if submitted is not None else result.started_at,
                    started_at=result.started_at, finished_at=None if waits else result.finished_at, last_at=last,
                    process=process.state if process is not None else None,
                    doubt=bool(result.in_doubt) and not (standing is not None and standing.crashed),
                    waiting=waits, parked=result.parked if status == PARKED_STATE else None)
    if lines.resolutions:  # (read so, or by settle reading it again)
        said = lines.resolutions[-1]
        return replace(row, status=RESOLVED_STATE, why=_resolved_why(said), was=str(said.get("status")),
                       last_at=max(last or 0, _ms(said.get("at")) or 0), process=None), judged
    if process is not None and status in (*_GOING, NOT_STARTED, CRASHED):
        row = replace(row, why=process.said, was=result.status if status == CRASHED else None)
    return row, judged


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))

Skip = Callable[[str], None]


def list_records(directory: Path, *, limit: int, status: str | None = None, flow: str | None = None,
                 on_skip: Skip | None = None) -> list[RecordRow]:
    """The ``limit`` newest runs recorded in ``directory`` (by the time each was taken, then by run id), only those
    in state ``status`` (one of :data:`LOCAL_STATES`) and of ``flow`` when given.

    A file that is not a run record — named otherwise than ``*.jsonl`` (hidden files and directories are passed
    over in silence), not a regular file, unreadable, or whose ends are not a record's — is skipped, with one
    sentence naming it handed to ``on_skip``. ``OSError`` when the directory itself cannot be read."""
    said: Skip = on_skip or (lambda text: None)
    found: list[tuple[int, str, int]] = []  # (modified, name, size)
    with os.scandir(directory) as entries:
        for entry in entries:
            path = os.path.join(directory, entry.name)
            if not entry.name.endswith(SUFFIX):
                try:
                    passed = entry.name.startswith(".") or entry.is_dir()
                except OSError:
                    passed = False
                if not passed:
                    said(f"{path} is not a run record (a record is named <run id>{SUFFIX})")
                continue
            try:
                info = entry.stat()
            except FileNotFoundError:  # removed since the directory was read: gone, not broken
                if not os.path.lexists(path):
                    continue
                said(f"{path} is a symbolic link to nothing, not a run record")
                continue
            except OSError as exc:
                said(f"cannot read {path}: {exc.strerror or exc}")
                continue
            if not stat.S_ISREG(info.st_mode):
                kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a file")
                said(f"{path} is {kind}, not a run record")
                continue
            found.append((info.st_mtime_ns // 1_000_000, entry.name, info.st_size))
    found.sort(reverse=True)
    best: list[tuple[tuple[int, str], RecordRow]] = []  # a heap: the oldest of the best at its top
    for modified, name, size in found:
        if len(best) >= limit and modified + MTIME_SLACK_MS < best[0][0][0]:
            break  # this record, and every one after it, began before the runs found
        try:
            row = read_row(Path(directory) / name, size)
        except RecordError as exc:
            if not os.path.lexists(os.path.join(directory, name)):
                continue  # removed while the listing ran (a clean-up): passed over in silence
            said(str(exc))
            continue
        if (status is not None and row.status != status) or (flow is not None and row.flow != flow):
            continue
        when = row.submitted_at if row.submitted_at is not None else modified
        item = ((when, row.run_id), row)
        if len(best) < limit:
            heapq.heappush(best, item)
        elif item[0] > best[0][0]:
            heapq.heapreplace(best, item)
    return [row for _, row in sorted(best, key=lambda pair: pair[0], reverse=True)]


def local_runs_command(directory: Path, *, limit: int, status: str | None, flow: str | None, as_json: bool,
                       console: Any) -> int:
    """``flowdsl runs --backend local``: list the run records in ``directory``, newest first; its exit code (0; 2
    when ``status`` is no state of a local run, or ``directory`` is not a directory that can be read). A missing
    directory holds no runs: said, exit 0. Skipped files: one warning line each on stderr."""
    from rich.markup import escape

    from flowdsl.runtime.summary import error_console

    errors = error_console(console)

    def say(text: str, label: str = "error", style: str = "red") -> None:
        from flowdsl.diagnostics import shown  # (a file name's bytes that are not UTF-8 as \xNN)
        from flowdsl.shown import visible  # (and its control characters inert: no escape sequence reaches the terminal)

        errors.print(f"[{style}]{label}[/]: {escape(visible(shown(' '.join(text.split()))))}", highlight=False,
                     soft_wrap=True)

    if status is not None:
        wanted = status.strip().lower()
        if wanted not in LOCAL_STATES:
            say(f"--status {status!r} is not a state of a local run: use one of {', '.join(LOCAL_STATES)}")
            return 2
        status = wanted
    if not os.path.lexists(directory):
        if as_json:
            _json_out([])
        else:
            console.print(f"no runs: {escape(str(directory))} does not exist (the local runtime records each run "
                          "there once one has run; see --runs-dir, $FLOWDSL_RUNS_DIR)", highlight=False, crop=False,
                          soft_wrap=True)
        return 0
    if not os.path.isdir(directory):
        from flowdsl.runtime.record import broken_link

        what = broken_link(directory) if os.path.islink(directory) and not os.path.exists(directory) else \
            "it is not a directory"
        say(f"{directory}: {what}; --runs-dir (or $FLOWDSL_RUNS_DIR) names the directory of run records")
        return 2
    try:
        rows = list_records(directory, limit=limit, status=status, flow=flow,
                            on_skip=lambda text: say(f"{text}; skipped", "warning", "yellow"))
    except OSError as exc:
        say(f"cannot read the directory of run records {directory}: {exc.strerror or exc}")
        return 2
    if as_json:
        _json_out([row.to_json() for row in rows])
    elif rows:
        print_runs(rows, console)
    else:
        which = " and ".join(f"{name} {value!r}" for name, value in (("status", status), ("flow", flow)) if value)
        console.print(f"no runs{escape(f' with {which}' if which else '')} recorded in {escape(str(directory))}",
                      highlight=False, crop=False, soft_wrap=True)
    for said in _notes(rows):
        say(said, "note", "yellow")
    return 0


def _notes(rows: list[RecordRow]) -> list[str]:
    """The notes under a listing: records whose process cannot be told, runs whose runtime still waits after their
    end, parked runs, crashed runs, newer records."""
    def named(ids: list[str]) -> str:
        return f"{len(ids)} {{}} ({', '.join(ids[:3])}{', …' if len(ids) > 3 else ''})"

    said = []
    going = [row.run_id for row in rows if row.status in _GOING and row.process != "live"]
    if going:
        said.append(named(going).format("record(s) end before their run did") + ": the process stopped, or the run "
                    "still goes — which cannot be told here (its process ran on another host or machine or in "
                    "another container, /proc does not show it, or the record is of an earlier flowdsl, which did "
                    "not name its process); each is "
                    "listed in the state its record left it in (`flowdsl show RUN_ID` tells more)")
    waiting = [row.run_id for row in rows if row.waiting]
    if waiting:
        said.append(named(waiting).format("run(s) ended, and their runtime still waits for attempts the run had given "
                    "up on") + ": their answers may still change how the run ends (a late success of a step with an "
                    "undo makes it needs_intervention), so that state is not final yet; each is listed in the state "
                    "it ended in, marked (waiting), not finished yet (with --format json: finished_at null) — "
                    "`flowdsl show RUN_ID` tells more")
    parked = [row.run_id for row in rows if row.status == PARKED_STATE]
    if parked:
        said.append(named(parked).format("run(s) parked") + ": not over, and no process runs them; each line says "
                    "what the run waits for (a signal by its name, `timer` for a timer wait) and when its next timer "
                    "is due. `flowdsl resume RUN_ID --signal NAME=JSON` goes on with one and sends it that signal, "
                    "`flowdsl resume RUN_ID` goes on with it (the timers due by then fire first), `--cancel` cancels "
                    "it; `flowdsl show RUN_ID` tells more")
    crashed = [row.run_id for row in rows if row.status == CRASHED]
    if crashed:
        said.append(named(crashed).format("run(s) crashed") + ": their process is gone, and the run stopped with it; "
                    "`flowdsl resume RUN_ID` goes on with it from its record (the attempts it had in flight run "
                    "again), or `flowdsl show RUN_ID` lists what is left to undo by hand, and `flowdsl resolve RUN_ID` "
                    "says it is done")
    newer = [row.run_id for row in rows if row.status == NEWER]
    if newer:
        said.append(named(newer).format("record(s) were written by a newer flowdsl") + ", in a layout this one does "
                    "not read; read them with that version")
    return said


def _json_out(value: Any) -> None:

    from flowdsl.runtime.codec import json_line
    from flowdsl.stdio import write_json

    write_json(json_line(value))  # (flushed: an error writing it is said, never lost)


def _parked_cell(parked: dict[str, Any]) -> str:
    """What a parked run waits for, in its listing line: each signal by its name (once), ``timer`` for a timer wait,
    then when its next timer is due (local time, as ``submitted``): ``paid, timer; due 12-05 18:30:00``."""
    import time

    names = list(dict.fromkeys(str(w["signal"]) if w.get("signal") is not None else "timer"
                               for w in parked.get("waits") or ()))
    due = parked.get("due_at")
    when = f"due {time.strftime('%m-%d %H:%M:%S', time.localtime(due / 1000))}" if due is not None else ""
    return "; ".join(part for part in (", ".join(names), when) if part)


def print_runs(items: Iterable[Row], console: Any) -> None:
    """The table of ``flowdsl runs``: run, flow, status, submitted (local time), took (finished − started). A local
    run whose runtime still waits after its end (:attr:`RecordRow.waiting`) has its status marked ``(waiting)``; a
    parked one (:attr:`RecordRow.parked`) says what it waits for and when its next timer is due: ``parked (paid,
    timer; due 12-05 18:30:00)``."""
    import time

    from rich.markup import escape
    from rich.table import Table

    from flowdsl.shown import visible

    rows = []
    for i in items:
        when = time.strftime("%m-%d %H:%M:%S", time.localtime(i.submitted_at / 1000)) if i.submitted_at else ""
        took = ""
        if i.started_at is not None and i.finished_at is not None:
            ms = i.finished_at - i.started_at
            took = f"{ms} ms" if ms < 1000 else f"{ms / 1000:.1f} s"
        status = f"{i.status} (waiting)" if getattr(i, "waiting", False) else i.status  # (not final yet)
        parked = getattr(i, "parked", None)
        if parked is not None:
            status = f"{i.status} ({_parked_cell(parked)})"
        rows.append((i.run_id, i.flow or "", status, when, took))
    columns = ("run", "flow", "status", "submitted", "took")
    widest = [max(len(column), *(len(row[n]) for row in rows)) for n, column in enumerate(columns)]
    # in a narrow terminal only the flow's name is shortened (to 8 at least): a run id is what the other commands
    # take, and a state is the point; when even that does not fit, the lines are longer than the terminal
    needed = sum(widest) - widest[1] + min(widest[1], 8) + 2 * (len(columns) - 1)
    whole = sum(widest) + 2 * (len(columns) - 1)
    # not a terminal (a pipe, a file): nothing is shortened, a line is as long as it needs
    width = whole if not console.is_terminal else needed if needed > console.width else None
    table = Table(box=None, show_edge=False, pad_edge=False, header_style="bold", width=width)
    for n, column in enumerate(columns):
        table.add_column(column, no_wrap=True, min_width=None if column == "flow" else widest[n],
                         justify="right" if column == "took" else "left")
    for row in rows:
        table.add_row(*(escape(visible(cell)) for cell in row))
    console.print(table, crop=False)
