"""``flowdsl prune``: remove old local run records, never one that may still matter.

Stage: runtime (shared), CLI support. Imports stdlib and ``.listing`` (which reads a record by its ends), and
inside functions ``.record``, ``.rebuild`` (a record's replay), ``.summary`` (its error console) and
``.stopped``; rich only through the console handed in.

A record is removed when it was last written more than ``older_than`` ago (by its file's modification time and by
the time of its last line, both) and its run is in one of the states pruned — by default the end states that need
nothing more (``completed``, ``failed``, ``compensated``, ``cancelled``) and ``resolved`` runs. Whatever the
states asked for, a record is kept when:

- its run may still go: its record has no end (or its runtime waits, after the run's end, for attempts it had
  given up on) and its process runs — or whether it runs cannot be told here (another host or container, a record
  of an earlier flowdsl): deleting the file of a live run would lose the rest of its record; or the run is parked
  (its record ends with ``runtime_parked``): no process runs it, and ``flowdsl resume`` goes on with it from its
  record, the only place it is kept;
- a person still has work to do: the run ended ``needs_intervention``, a step's outcome is in doubt, or it crashed
  or was stopped at once with something left to undo — until ``flowdsl resolve`` says it is done;
- it was written by a newer flowdsl, or changed while prune ran (or ``flowdsl resolve`` holds it locked: a record is
  removed under an exclusive ``flock`` of it, which resolve takes to append).

Files that are not run records are never removed (and are named, as ``flowdsl runs`` names them) — but for the
hidden temporary file a record is first written under (``.<run id>.jsonl.<hex>.tmp``, ``.record.staged_run_id``),
which a process killed as it created its record leaves behind: nothing of that run began, and once it is older than
``older_than`` it goes too (one being written now is recent, and locked). Each record is
read by its ends (``.listing.read_row``: its first two lines and last 64 KiB), and a file modified within
``older_than`` is not read at all; only a crashed or stopped record in a state asked for is replayed whole, to
know whether something is left to undo.
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowdsl.runtime.listing import (
    CRASHED,
    NEWER,
    PARKED_STATE,
    RESOLVED_STATE,
    SUFFIX,
    UNRECORDED,
    RecordRow,
    read_row,
)
from flowdsl.runtime.record import RecordError, staged_run_id

__all__ = ["DEFAULT_PRUNED", "PRUNABLE", "REASONS", "PruneReport", "parse_age", "prune", "prune_command"]

#: the states pruned when none are asked for: runs that ended needing nothing more, and resolved ones
DEFAULT_PRUNED = ("completed", "failed", "compensated", "cancelled", RESOLVED_STATE)
#: the states ``--status`` takes: a record in any other state is never removed
PRUNABLE = (*DEFAULT_PRUNED, CRASHED, "aborted", UNRECORDED)
#: why a record is kept, in the order the report lists them, with what the text report says of each
REASONS = {
    "recent": "last written less than {age} ago",
    "status": "in a state not pruned",
    "live": "still running: its process runs",
    "parked": "parked: not over, and no process runs it; `flowdsl resume RUN_ID` goes on with it (or `--cancel`s it)",
    "unknown_process": "no end in the record, and whether its process still runs cannot be told here (another host, "
                       "machine or container, another user's process /proc does not show, or a record of an earlier "
                       "flowdsl): `flowdsl resolve RUN_ID --force` once you "
                       "know it is gone",
    "needs_intervention": "needs_intervention, not resolved: finish it by hand (`flowdsl show RUN_ID`), then "
                          "`flowdsl resolve RUN_ID`",
    "in_doubt": "a step's outcome is in doubt, not resolved: check it (`flowdsl show RUN_ID`), then "
                "`flowdsl resolve RUN_ID`",
    "left_to_undo": "crashed or stopped at once with something left to undo, not resolved: `flowdsl show RUN_ID`, "
                    "then `flowdsl resolve RUN_ID`",
    "newer": "written by a newer flowdsl: prune it with that version",
    "changed": "changed while prune ran, or being resolved",
}
#: the reasons whose runs the text report names (a few of each): those that ask something of a person
_NAMED = ("live", "parked", "unknown_process", "needs_intervention", "in_doubt", "left_to_undo", "newer", "changed")

_AGE_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|d|h|m|s)")
_AGE_MS = {"d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}
_AGE_UNITS = list(_AGE_MS)
MAX_AGE_MS = 3650 * 86_400_000
_AGE_FORM = "write a number with a unit — 30d, 12h, 90m, 45s — or several, largest first: 1d12h"


def parse_age(text: str) -> int:
    """The milliseconds of an age written as the language writes durations (``90m``, ``1h30m``, ``45s``, ``250ms``:
    units largest first, each once, the last part alone with a fraction) with days too (``30d``, ``1d12h``); more
    than 0, at most 3650 days. ``ValueError`` saying what is wrong."""
    written = text.strip()
    pos = 0
    units: list[str] = []
    total = 0.0
    fraction = False
    for m in _AGE_PART.finditer(written):
        if m.start() != pos:
            break
        unit = m.group(2)
        if unit in units or (units and _AGE_UNITS.index(unit) < _AGE_UNITS.index(units[-1])):
            raise ValueError(f"'{text}' has its units out of order or twice; {_AGE_FORM}")
        if fraction:
            raise ValueError(f"'{text}' has a fraction in a part that is not its last; only the last part may have "
                             "one")
        fraction = "." in m.group(1)
        units.append(unit)
        total += float(m.group(1)) * _AGE_MS[unit]
        pos = m.end()
    if not written or pos != len(written):
        if re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", written):
            raise ValueError(f"'{text}' has no unit: write {written}d (days), {written}h, {written}m or {written}s")
        raise ValueError(f"'{text}' is not an age; {_AGE_FORM}")
    if not total < MAX_AGE_MS + 1:  # (also a number too long for a float: infinite)
        raise ValueError(f"'{text}' is more than the longest age, 3650d (10 years)")
    ms = round(total)
    if ms <= 0:
        raise ValueError(f"'{text}' is no age: it must be more than 0")
    if ms > MAX_AGE_MS:
        raise ValueError(f"'{text}' is more than the longest age, 3650d (10 years)")
    return int(ms)


@dataclass
class PruneReport:
    """What :func:`prune` did (or, ``dry_run``, would do): ``removed`` (run id, bytes) pairs, ``kept`` run ids by
    reason (:data:`REASONS`), ``skipped`` sentences naming files that are not run records (never removed),
    ``errors`` (run id, why) for records that could not be removed, and ``leftovers`` (file name, bytes): the
    temporary files of records never begun that were removed."""

    directory: Path
    older_than: str
    statuses: tuple[str, ...]
    dry_run: bool
    removed: list[tuple[str, int]] = field(default_factory=list)
    kept: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    leftovers: list[tuple[str, int]] = field(default_factory=list)

    def keep(self, reason: str, run_id: str) -> None:
        self.kept.setdefault(reason, []).append(run_id)

    def to_json(self) -> dict[str, Any]:
        """The ``flowdsl prune --format json`` object."""
        kept = {reason: {"count": len(self.kept[reason]), "runs": sorted(self.kept[reason])}
                for reason in REASONS if reason in self.kept}
        return {"directory": str(self.directory), "older_than": self.older_than, "statuses": list(self.statuses),
                "dry_run": self.dry_run,
                "removed": {"count": len(self.removed), "bytes": sum(size for _, size in self.removed),
                            "runs": sorted(run_id for run_id, _ in self.removed)},
                "kept": {"count": sum(len(ids) for ids in self.kept.values()), "by_reason": kept},
                "skipped": list(self.skipped),
                "errors": [{"run_id": run_id, "error": why} for run_id, why in self.errors],
                "leftovers": {"count": len(self.leftovers), "bytes": sum(size for _, size in self.leftovers),
                              "files": sorted(name for name, _ in self.leftovers)}}


def prune(directory: Path, *, older_than_ms: int, older_than: str = "", statuses: tuple[str, ...] = DEFAULT_PRUNED,
          dry_run: bool = False, now_ms: int | None = None) -> PruneReport:
    """Remove (``dry_run``: only tell) the run records of ``directory`` last written more than ``older_than_ms``
    ago whose runs are in one of ``statuses`` (a subset of :data:`PRUNABLE`), keeping every record that may still
    matter (see the module's docstring). ``OSError`` when the directory cannot be read."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    cutoff = now - older_than_ms
    report = PruneReport(directory, older_than, statuses, dry_run)
    with os.scandir(directory) as entries:
        listed = list(entries)
    for entry in listed:
        name = entry.name
        if not name.endswith(SUFFIX):
            if staged_run_id(name) is not None:
                _prune_leftover(entry, cutoff, dry_run, report)
            elif not name.startswith(".") and not _is_dir(entry):
                report.skipped.append(f"{entry.path} is not a run record (a record is named <run id>{SUFFIX})")
            continue
        if name.startswith("."):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # removed meanwhile
        except OSError as exc:
            report.skipped.append(f"cannot read {entry.path}: {exc.strerror or exc}")
            continue
        if not stat.S_ISREG(info.st_mode):
            what = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file"
            report.skipped.append(f"{entry.path} is {what}, not a run record prune removes")
            continue
        run_id = name.removesuffix(SUFFIX)
        if info.st_mtime_ns // 1_000_000 > cutoff:
            report.keep("recent", run_id)
            continue
        path = Path(entry.path)
        try:
            row = read_row(path, info.st_size, quick=True)
        except RecordError as exc:
            if os.path.lexists(path):
                report.skipped.append(str(exc))
            continue
        reason = _kept_because(row, path, statuses, cutoff)
        if reason is not None:
            report.keep(reason, run_id)
            continue
        try:
            outcome = _remove(path, info, dry_run)
        except OSError as exc:
            report.errors.append((run_id, exc.strerror or str(exc)))
            continue
        if outcome == "changed":
            report.keep("changed", run_id)
        if outcome != "removed":
            continue
        report.removed.append((run_id, info.st_size))
    return report


def _remove(path: Path, info: os.stat_result, dry_run: bool) -> str:
    """Remove the record ``path`` (``dry_run``: only check that it could be) when it is still the file read —
    ``info``, its ``lstat`` then —, under an exclusive ``flock`` of it, which ``flowdsl resolve`` holds while it
    appends: ``removed``, ``changed`` (written to, replaced, or being resolved) or ``gone`` (removed meanwhile).
    ``OSError`` when it cannot be removed."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return "gone"
    except OSError:  # (replaced by a link — ELOOP —, or by something else that cannot be opened)
        return "changed" if os.path.lexists(path) else "gone"
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # (flowdsl resolve appends to it)
            return "changed"
        except (ImportError, OSError):  # (no flock here, or a file system without locks)
            pass
        held = os.fstat(fd)
        if held.st_nlink == 0:
            return "gone"
        try:
            named = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return "gone"
        if (held.st_mtime_ns, held.st_size, held.st_ino, held.st_dev) != \
                (info.st_mtime_ns, info.st_size, info.st_ino, info.st_dev) or \
                (named.st_ino, named.st_dev) != (held.st_ino, held.st_dev):
            return "changed"
        if not dry_run:
            try:
                os.unlink(path)  # (under the lock: a resolve waiting for it then finds it removed)
            except FileNotFoundError:
                return "gone"
        return "removed"
    finally:
        os.close(fd)


def _prune_leftover(entry: os.DirEntry[str], cutoff: int, dry_run: bool, report: PruneReport) -> None:
    """Remove (``dry_run``: only tell) the temporary file of a record never begun — its process was killed as it
    wrote the record's first lines, before putting it in place — once it was last written before ``cutoff``. One
    being written now is left alone: it is recent, and its process holds it locked (``_remove`` sees it changed)."""
    try:
        info = entry.stat(follow_symlinks=False)
    except OSError:
        return  # (gone meanwhile: put in place, or removed)
    if not stat.S_ISREG(info.st_mode) or info.st_mtime_ns // 1_000_000 > cutoff:
        return
    try:
        outcome = _remove(Path(entry.path), info, dry_run)
    except OSError as exc:
        report.skipped.append(f"cannot remove {entry.path}, left by a run killed as it started: "
                              f"{exc.strerror or exc}")
        return
    if outcome == "removed":
        report.leftovers.append((entry.name, info.st_size))


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _kept_because(row: RecordRow, path: Path, statuses: tuple[str, ...], cutoff: int) -> str | None:
    """Why the record of ``row`` is kept (a key of :data:`REASONS`), or None: it goes."""
    if row.status == NEWER:
        return "newer"
    if row.last_at is not None and row.last_at > cutoff:
        return "recent"
    if row.process == "live":
        return "live"
    if row.status == PARKED_STATE:
        return "parked"
    not_ended = row.status in ("running", "aborting", "compensating", "not_started", UNRECORDED)
    if not_ended and row.process != "gone":
        return "unknown_process" if row.process == "unknown" else "live"
    if row.status == "needs_intervention":
        return "needs_intervention"
    if row.doubt and row.status != RESOLVED_STATE:
        return "in_doubt"
    if row.status not in statuses:
        return "status"
    if row.status in (CRASHED, "aborted") and _left_to_undo(path):
        return "left_to_undo"
    return None


def _left_to_undo(path: Path) -> bool:
    """Whether the record of a crashed or stopped run leaves something to undo or in doubt (read whole and
    replayed, as ``flowdsl show`` does; a record that does not replay is kept)."""
    from flowdsl.runtime.rebuild import result_from_record
    from flowdsl.runtime.record import read_record
    from flowdsl.runtime.stopped import settle

    try:
        header, lines = read_record(path)
        result = result_from_record(header, lines, path)
        settle(header, lines, result)
    except Exception:
        return True
    return bool((result.intervention or {}).get("steps") or result.in_doubt)


def prune_command(directory: Path, *, older_than: str, statuses: list[str] | None, dry_run: bool, as_json: bool,
                  console: Any) -> int:
    """``flowdsl prune``: its exit code — 0 done (also when nothing was old enough), 1 a record could not be removed,
    2 a bad option or a directory that cannot be read."""
    from rich.markup import escape

    from flowdsl.runtime.summary import error_console

    errors = error_console(console)

    def say(text: str, label: str = "error", style: str = "red") -> None:
        from flowdsl.diagnostics import shown
        from flowdsl.shown import visible

        errors.print(f"[{style}]{label}[/]: {escape(visible(shown(' '.join(text.split()))))}", highlight=False,
                     soft_wrap=True)

    try:
        age = parse_age(older_than)
    except ValueError as exc:
        say(f"--older-than: {exc}")
        return 2
    wanted: list[str] = []
    for given in statuses or ():
        for one in given.split(","):
            state = one.strip().lower()
            if state not in PRUNABLE:
                say(f"--status {one.strip()!r}: prune removes records of runs in these states only: "
                    f"{', '.join(PRUNABLE)} (a run that may still go, or that needs a person, is never removed)")
                return 2
            if state not in wanted:
                wanted.append(state)
    chosen = tuple(wanted) or DEFAULT_PRUNED
    if not os.path.lexists(directory):
        report = PruneReport(directory, older_than, chosen, dry_run)
        if as_json:
            _json_out(report.to_json())
        else:
            console.print(f"nothing to prune: {escape(str(directory))} does not exist", highlight=False,
                          soft_wrap=True)
        return 0
    if not os.path.isdir(directory):
        say(f"{directory}: it is not a directory; --runs-dir (or $FLOWDSL_RUNS_DIR) names the directory of run "
            "records")
        return 2
    try:
        report = prune(directory, older_than_ms=age, older_than=older_than.strip(), statuses=chosen, dry_run=dry_run)
    except OSError as exc:
        say(f"cannot read the directory of run records {directory}: {exc.strerror or exc}")
        return 2
    for text in report.skipped:
        say(f"{text}; skipped", "warning", "yellow")
    for run_id, why in report.errors:
        say(f"cannot remove the record of run {run_id}: {why}")
    if as_json:
        _json_out(report.to_json())
    else:
        _print_report(report, console)
    return 1 if report.errors else 0


def _print_report(report: PruneReport, console: Any) -> None:
    from rich.markup import escape

    from flowdsl.shown import visible

    size = sum(n for _, n in report.removed)
    verb = "would remove" if report.dry_run else "removed"
    states = ", ".join(report.statuses)
    named = states if len(report.statuses) < 2 else \
        f"{', '.join(report.statuses[:-1])} or {report.statuses[-1]}"
    console.print(f"{verb} {len(report.removed):,} run record(s) ({_bytes(size)}) from {escape(str(report.directory))}"
                  f": runs {escape(named)}, last written more than {escape(report.older_than)} ago"
                  + (" (dry run: nothing removed)" if report.dry_run else ""), highlight=False, soft_wrap=True)
    if report.leftovers:
        console.print(f"{verb} {len(report.leftovers):,} temporary file(s) of records never begun "
                      f"({_bytes(sum(n for _, n in report.leftovers))}): left by runs killed as they started",
                      highlight=False, soft_wrap=True)
    kept = sum(len(ids) for ids in report.kept.values())
    if not kept:
        return
    console.print(f"kept {kept:,}:", highlight=False)
    width = len(f"{max(len(ids) for ids in report.kept.values()):,}")
    for reason, text in REASONS.items():
        ids = report.kept.get(reason)
        if not ids:
            continue
        said = text.format(age=report.older_than)
        if reason == "status":
            said += f" (--status: {states})"
        if reason in _NAMED:
            first = sorted(ids)
            said += f" ({', '.join(visible(i) for i in first[:3])}{', …' if len(first) > 3 else ''})"
        console.print(f"  {len(ids):>{width},}  {escape(said)}", highlight=False, soft_wrap=True)


def _bytes(size: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def _json_out(value: Any) -> None:
    from flowdsl.runtime.codec import json_line
    from flowdsl.stdio import write_json

    write_json(json_line(value))
