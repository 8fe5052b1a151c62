"""``flowdsl resolve`` of a local run: say that what a run left to do by hand is done.

Stage: runtime (shared), CLI support. Imports stdlib, ``.owner``, ``.parking``, ``.record``, and inside functions
``.rebuild``, ``.summary``, ``.stopped`` and ``.codec``; rich only through the console handed in.

A run that ended ``needs_intervention`` (or with a step in doubt), that was stopped at once, or that crashed (its
process is gone, ``.stopped``) leaves work to a person: ``flowdsl show`` lists it. Once that person has done it,
``flowdsl resolve RUN_ID --note TEXT`` appends one line to the record::

    {"type": "resolved", "run_id": "…", "at": 1700000000000, "by": "ops@web-1", "note": "refunded by hand",
     "status": "needs_intervention"}

(``status``: the state the run was listed in then). ``flowdsl runs --backend local`` then lists it ``resolved``
(so ``--status needs_intervention`` lists the runs still to handle), ``show`` prints the resolution, and ``flowdsl
prune`` may remove the record. A run that completed (or failed, was compensated or cancelled with nothing in doubt),
one already resolved, one whose process still runs it and one parked (``.parking``: it is not over, and nothing is
left to do by hand — ``flowdsl resume`` goes on with it, or cancels it) are refused; so is one whose process cannot
be told (another host), unless ``force``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from flowdsl.runtime.owner import UNKNOWN, by_whom
from flowdsl.runtime.parking import PARKED_STATE
from flowdsl.runtime.record import RESOLVED, RecordError, encode_line, find_record, locked_record

__all__ = ["NotResolvable", "resolution_json", "resolution_text", "resolve_local_command", "resolve_record"]

EXIT_REFUSED = 1
EXIT_USAGE = 2


class NotResolvable(Exception):
    """The run cannot be resolved now: ``kind`` (``NothingToResolve``, ``AlreadyResolved``, ``StillRunning``,
    ``Parked``, ``CannotTell``), the message, and ``status``, the state ``flowdsl runs`` lists the run in."""

    def __init__(self, kind: str, message: str, status: str | None = None):
        super().__init__(message)
        self.kind, self.status = kind, status


def resolution_json(line: dict[str, Any] | None) -> dict[str, Any] | None:
    """A ``resolved`` line as ``show --format json`` gives it (its ``resolved``, as ``flowdsl status`` gives a Redis
    run's): ``at``, ``by``, ``note``, ``status``."""
    if line is None:
        return None
    return {"at": line.get("at"), "by": line.get("by"), "note": line.get("note"), "status": line.get("status")}


def resolution_text(line: dict[str, Any]) -> str:
    """A ``resolved`` line as ``show`` prints it (rich markup; its text escaped)."""
    from rich.markup import escape

    from flowdsl.shown import visible

    at = line.get("at")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at / 1000)) if isinstance(at, int) else "?"
    note = line.get("note")
    said = f": {escape(visible(note))}" if isinstance(note, str) and note else ""
    return (f"[green]resolved[/] {escape(when)} by {escape(visible(line.get('by')))} (it was "
            f"{escape(visible(line.get('status')))}){said}")


def resolve_record(path: Path, *, note: str | None, force: bool = False) -> dict[str, Any]:
    """Append a ``resolved`` line to the record ``path`` and return it (what the run left is done by hand).
    :class:`NotResolvable` when the run has nothing to resolve, is resolved already, still runs, is parked, or (unless
    ``force``) runs, for all that can be told here, elsewhere; ``RecordError`` when the record cannot be read (a
    ``NewerRecord`` too) or written. Taken under an exclusive ``flock`` of the record (``.record.locked_record``), so
    that two at once do not both resolve it; one that grew since it was read is not resolved."""
    with locked_record(path, "resolve") as record:
        was = _resolvable(path, record.header, record.lines, force)
        record.check_writable()
        if record.grown():
            raise NotResolvable("StillRunning", f"run {path.name.removesuffix('.jsonl')} is not over: its record was "
                                "written to while resolve read it; resolve it once it has ended", was)
        run_id = str((record.header or {}).get("run_id") or path.name.removesuffix(".jsonl"))
        line = {"type": RESOLVED, "run_id": run_id, "at": int(time.time() * 1000), "by": by_whom(),
                "note": note or None, "status": was}
        record.append(encode_line(line))
        if record.dropped_cut_line:
            line = {**line, "dropped_cut_line": True}
        return line


def _resolvable(path: Path, header: Any, lines: Any, force: bool) -> str:
    """The state the run is resolved in, or :class:`NotResolvable` saying why it cannot be."""
    from flowdsl.runtime.rebuild import record_result
    from flowdsl.runtime.stopped import settle

    run = path.name.removesuffix(".jsonl")
    if lines.resolutions:
        said = lines.resolutions[-1]
        at = said.get("at")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at / 1000)) if isinstance(at, int) else "?"
        raise NotResolvable("AlreadyResolved", f"run {run} was resolved already, {when} by {said.get('by')}"
                            + (f" ({said.get('note')})" if said.get("note") else ""), "resolved")
    result = record_result(header, lines, path)
    standing = settle(header, lines, result)
    process = standing.process
    if standing.live:
        what = "its runtime still waits, after the run's end, for attempts it had given up on" if standing.ended \
            else f"the run is still going ({result.status})"
        raise NotResolvable("StillRunning", f"run {run} is not over: {process.said if process else ''}, and {what}; "
                            "resolve it once it has ended (stop it with Ctrl-C or SIGTERM to its process)",
                            str(result.status))
    if standing.stopped == PARKED_STATE:  # (before the stopped runs below: a parked run left nothing by hand)
        from flowdsl.runtime.parking import parked_text
        from flowdsl.runtime.summary import show_command

        resume = show_command(path).replace("flowdsl show", "flowdsl resume", 1)
        raise NotResolvable("Parked", f"run {run} is parked: it is not over, and nothing is left to do by hand; it "
                            f"{parked_text(result.parked or {}, resume)}; or cancel it with `{resume} --cancel` "
                            "(what completed is undone)", PARKED_STATE)
    if process is not None and process.state == UNKNOWN and not standing.closed and not force:
        raise NotResolvable("CannotTell", f"run {run} has no end in its record, and {process.said}; resolve it "
                            "there, or add --force once you know that process is gone",
                            "unrecorded" if standing.stopped == "unrecorded" else str(result.status))
    if standing.crashed:
        return "crashed"
    if standing.stopped is not None:
        return standing.stopped
    if standing.ended:
        if result.status == "needs_intervention" or result.in_doubt:
            return str(result.status)
        raise NotResolvable("NothingToResolve", f"run {run} ended {result.status}, with nothing left to do by "
                            "hand: there is nothing to resolve", str(result.status))
    return str(result.status)  # (its process cannot be told, and --force says it is gone)


def resolve_local_command(run: str, directory: str | Path | None, *, note: str | None, force: bool, as_json: bool,
                          console: Any) -> int:
    """``flowdsl resolve RUN_ID`` of a local run record (``run``: its id, or the path of its record): its exit code —
    0 resolved; 1 refused (nothing to resolve, resolved already, still running, parked, its process cannot be told
    without ``force``); 2 no such record, one that cannot be read or written, or a record of a newer flowdsl."""
    from rich.markup import escape

    from flowdsl.runtime.summary import error_console

    errors = error_console(console)

    def fail(text: str, code: int, kind: str, status: str | None = None) -> int:
        from flowdsl.diagnostics import shown
        from flowdsl.shown import visible

        label = "[yellow]note[/]" if kind in ("NothingToResolve", "AlreadyResolved") else "[red]error[/]"
        # (on one line, inert: it quotes a note, a name and a host read from the record)
        errors.print(f"{label}: {escape(visible(shown(text)))}", highlight=False, soft_wrap=True)
        if as_json and code == EXIT_REFUSED:  # (as for a Redis run: the run's state, and why)
            _json_out({"run_id": run, "status": status, "resolved": None, "reason": text, "refused": kind})
        return code  # (exit 2: the command's JSON object is the usage error's, from what was said)

    try:
        path = find_record(run, directory)
    except RecordError as exc:
        hint = "" if "/" in run or run.endswith(".jsonl") else \
            " (a run of the Redis runtime: add --backend redis)"
        return fail(f"{exc}{hint}", EXIT_USAGE, "NoSuchRun")
    try:
        line = resolve_record(path, note=note, force=force)
    except NotResolvable as exc:
        return fail(str(exc), EXIT_REFUSED, exc.kind, exc.status)
    except RecordError as exc:
        from flowdsl.runtime.record import NewerRecord

        return fail(str(exc), EXIT_USAGE, "NewerRecord" if isinstance(exc, NewerRecord) else "RecordError")
    run_id = line["run_id"]
    if as_json:
        _json_out({"run_id": run_id, "status": "resolved", "resolved": resolution_json(line), "record": str(path)})
    else:
        from flowdsl.shown import visible

        console.print(f"run {escape(visible(run_id))}: {resolution_text(line)}", highlight=False, soft_wrap=True)
    if line.get("dropped_cut_line"):
        errors.print("[yellow]note[/]: its record's last line, cut short when its process was killed (and never "
                     "read), was dropped to append the resolution", highlight=False, soft_wrap=True)
    if force and line["status"] not in ("needs_intervention", "crashed", "aborted"):
        errors.print(f"[yellow]note[/]: resolved with --force while its record has no end ({escape(line['status'])}"
                     "): if its process does run elsewhere, it goes on writing to the record", highlight=False,
                     soft_wrap=True)
    return 0


def _json_out(value: Any) -> None:
    from flowdsl.runtime.codec import json_line
    from flowdsl.stdio import write_json

    write_json(json_line(value))
