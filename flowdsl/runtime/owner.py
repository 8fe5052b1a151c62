"""Who runs a local run: the process a run record's header names, and whether that process still runs.

Stage: runtime (shared). Imports the stdlib only.

A local run lives in its process: when the process dies (SIGKILL, the OOM killer, a power cut, a container
stopped) the run stops with it, and its record simply ends. To tell such a record from the record of a run that
still goes, the local runtime writes into the header who runs it (:func:`this_process`)::

    "process": {"pid": 4242, "host": "web-1", "boot_id": "6817a6fb-…", "start": 199966, "pid_ns": 4026531836}

``start`` is the process's start time (clock ticks after the machine booted, ``/proc/PID/stat``), so that a
process that later took the same pid is not taken for the run's; ``boot_id`` tells a machine restarted since (every
process of before is gone); ``pid_ns`` the pid namespace (a container: pids of another one mean nothing here).
Those three come from Linux's ``/proc`` and are left out elsewhere: there a pid that is alive is taken for the run's
process (a pid reused since cannot be told from it).

:func:`judge` says what a header's ``process`` means here: ``live`` (that process runs), ``gone`` (it does not: no
such pid, a zombie, another process under that pid, or the machine restarted since) or ``unknown`` (another host,
another pid namespace, or a record written before headers named their process).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = ["GONE", "LIVE", "UNKNOWN", "Verdict", "by_whom", "judge", "this_process"]

LIVE: Final = "live"
GONE: Final = "gone"
UNKNOWN: Final = "unknown"
_PROC = "/proc"


@dataclass(frozen=True)
class Verdict:
    """What a record's ``process`` means here: ``state`` (:data:`LIVE`, :data:`GONE` or :data:`UNKNOWN`), ``said``
    (a clause: ``its process (pid 4242 on web-1) is gone``), and ``pid`` and ``host`` (None when not named)."""

    state: Literal["live", "gone", "unknown"]
    said: str
    pid: int | None = None
    host: str | None = None


def _stat(pid: int | str) -> tuple[str, int] | None:
    """The state letter and start time (clock ticks after boot) of process ``pid`` (``self``) from ``/proc``; None
    when there is no such process (or no ``/proc``)."""
    try:
        with open(f"{_PROC}/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2:].split()  # (the name, in parentheses, may hold spaces and parentheses)
    try:
        return fields[0].decode(), int(fields[19])
    except (IndexError, ValueError):
        return None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read().strip() or None
    except (OSError, ValueError):
        return None


def _pid_ns(pid: int | str) -> int | None:
    try:
        return os.stat(f"{_PROC}/{pid}/ns/pid").st_ino
    except OSError:
        return None


def _host() -> str:
    return socket.gethostname()


_HERE: dict[str, Any] = {}


def _here(name: str) -> Any:
    """This machine's boot id (``boot_id``) or this process's pid namespace (``pid_ns``), read once."""
    if name not in _HERE:
        _HERE[name] = _read(f"{_PROC}/sys/kernel/random/boot_id") if name == "boot_id" else _pid_ns("self")
    return _HERE[name]


_MINE: tuple[int, dict[str, Any]] | None = None


def this_process() -> dict[str, Any]:
    """The ``process`` of a record header written by this process: ``pid`` and ``host``, and where Linux's ``/proc``
    gives them ``boot_id``, ``start`` and ``pid_ns`` (see the module's docstring). Computed once per process (again
    in a forked child)."""
    global _MINE
    pid = os.getpid()
    if _MINE is None or _MINE[0] != pid:
        mine: dict[str, Any] = {"pid": pid, "host": _host()}
        stat = _stat("self")
        if stat is not None:
            mine["boot_id"] = _here("boot_id")
            mine["start"] = stat[1]
            mine["pid_ns"] = _pid_ns("self")
        _MINE = (pid, mine)
    return dict(_MINE[1])


def judge(process: Any) -> Verdict:
    """Whether the process a record header names (its ``process``, or None) still runs, as far as can be told here
    (see :class:`Verdict`)."""
    if not isinstance(process, dict) or not _is_int(process.get("pid")) or not isinstance(process.get("host"), str):
        return Verdict(UNKNOWN, "the record does not name its process (it was written by an earlier flowdsl), so "
                                "whether its run still goes cannot be told")
    pid, host = int(process["pid"]), process["host"]
    who = f"its process (pid {pid} on {host})"
    if host != _host():
        return Verdict(UNKNOWN, f"{who} ran on another host: whether it still runs cannot be told here (look on "
                                f"{host})", pid, host)
    boot = _here("boot_id")
    if isinstance(process.get("boot_id"), str) and boot is not None and process["boot_id"] != boot:
        return Verdict(GONE, f"{who} is gone: this host has restarted since", pid, host)
    mine = _here("pid_ns")
    if _is_int(process.get("pid_ns")) and mine is not None and process["pid_ns"] != mine:
        return Verdict(UNKNOWN, f"{who} ran in another pid namespace (another container on this host): whether it "
                                "still runs cannot be told here", pid, host)
    if os.path.isdir(f"{_PROC}/self"):
        stat = _stat(pid)
        if stat is None or stat[0] in ("Z", "X"):  # (a zombie: dead, not yet reaped by its parent)
            return Verdict(GONE, f"{who} is gone", pid, host)
        if _is_int(process.get("start")) and stat[1] != process["start"]:
            return Verdict(GONE, f"{who} is gone (pid {pid} is now another process)", pid, host)
        return Verdict(LIVE, f"{who} still runs", pid, host)
    try:  # no /proc: a pid that is alive is taken for the run's process
        os.kill(pid, 0)
    except ProcessLookupError:
        return Verdict(GONE, f"{who} is gone", pid, host)
    except (PermissionError, OSError):
        pass
    return Verdict(LIVE, f"{who} still runs", pid, host)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def by_whom() -> str:
    """``user@host``: who is doing this, for a line a command adds to a record (``resolved``)."""
    user = None
    with contextlib.suppress(Exception):  # (no passwd entry for the uid, in a container)
        user = getpass.getuser()
    return f"{user or getattr(os, 'getuid', lambda: '?')()}@{_host()}"
