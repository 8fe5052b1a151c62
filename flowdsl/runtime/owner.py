"""Who runs a local run: the process a run record's header names, and whether that process still runs.

Stage: runtime (shared). Imports the stdlib only.

A local run lives in its process: when the process dies (SIGKILL, the OOM killer, a power cut, a container
stopped) the run stops with it, and its record simply ends. To tell such a record from the record of a run that
still goes, the local runtime writes into the header who runs it (:func:`this_process`)::

    "process": {"pid": 4242, "host": "web-1", "machine_id": "3d12…", "boot_id": "6817a6fb-…", "start": 199966,
                "pid_ns": 4026531836, "time_ns": 4026531834}

``start`` is the process's start time (clock ticks after the machine booted, ``/proc/PID/stat``), so that a
process that later took the same pid is not taken for the run's; ``boot_id`` tells a machine restarted since (every
process of before is gone) — when ``machine_id`` (``/etc/machine-id``) says it is this machine, not another one of
the same host name; ``pid_ns`` the pid namespace (a container: pids of another one mean nothing here); ``time_ns``
the time namespace (``start`` is read as seen from the reader's: from another one it cannot be compared). Those
come from Linux's ``/proc`` and are left out elsewhere: there a pid that is alive is taken for the run's process (a
pid reused since cannot be told from it).

:func:`judge` says what a header's ``process`` means here: ``live`` (that process runs), ``gone`` (it does not: no
such pid, a zombie with no thread left, another process under that pid, or this machine restarted since) or
``unknown`` (another host or machine, another boot of a machine that cannot be told to be this one, another pid or
time namespace, a process ``/proc`` does not show (``hidepid``: another user's), or a record written before
headers named their process). Whatever cannot be told is ``unknown``, never ``gone``: ``gone`` lets ``flowdsl
resolve`` and ``flowdsl prune`` act on a record nothing writes to any more.
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


def _ns(pid: int | str, kind: str = "pid") -> int | None:
    try:
        return os.stat(f"{_PROC}/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


def _machine_id() -> str | None:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        found = _read(path)
        if found is not None:
            return found
    return None


def _threads_run(pid: int) -> bool:
    """Whether a thread of process ``pid`` (whose first thread is a zombie: it ended while others go on) still runs."""
    try:
        tasks = os.listdir(f"{_PROC}/{pid}/task")
    except OSError:
        return False
    return any((stat := _stat(f"{pid}/task/{tid}")) is not None and stat[0] not in ("Z", "X") for tid in tasks)


def _host() -> str:
    return socket.gethostname()


_HERE: dict[str, Any] = {}


def _here(name: str) -> Any:
    """This machine's boot id (``boot_id``) or machine id (``machine_id``), or this process's pid or time namespace
    (``pid_ns``, ``time_ns``), read once."""
    if name not in _HERE:
        _HERE[name] = _read(f"{_PROC}/sys/kernel/random/boot_id") if name == "boot_id" else \
            _machine_id() if name == "machine_id" else _ns("self", name.removesuffix("_ns"))
    return _HERE[name]


_MINE: tuple[int, dict[str, Any]] | None = None


def this_process() -> dict[str, Any]:
    """The ``process`` of a record header written by this process: ``pid`` and ``host``, ``machine_id`` where the
    machine has one, and where Linux's ``/proc`` gives them ``boot_id``, ``start``, ``pid_ns`` and ``time_ns`` (see
    the module's docstring). Computed once per process (again in a forked child)."""
    global _MINE
    pid = os.getpid()
    if _MINE is None or _MINE[0] != pid:
        mine: dict[str, Any] = {"pid": pid, "host": _host()}
        if _here("machine_id") is not None:
            mine["machine_id"] = _here("machine_id")
        stat = _stat("self")
        if stat is not None:
            mine["boot_id"] = _here("boot_id")
            mine["start"] = stat[1]
            mine["pid_ns"] = _ns("self")
            mine["time_ns"] = _ns("self", "time")
        _MINE = (pid, mine)
    return dict(_MINE[1])


def judge(process: Any) -> Verdict:
    """Whether the process a record header names (its ``process``, or None) still runs, as far as can be told here
    (see :class:`Verdict`)."""
    if not isinstance(process, dict) or not _is_int(process.get("pid")) or not 0 < process["pid"] < 1 << 31 \
            or not isinstance(process.get("host"), str):  # (a pid of 0 or less would signal a group: never one)
        return Verdict(UNKNOWN, "the record does not name its process (it was written by an earlier flowdsl), so "
                                "whether its run still goes cannot be told")
    pid, host = int(process["pid"]), process["host"]
    who = f"its process (pid {pid} on {host})"
    if host != _host():
        return Verdict(UNKNOWN, f"{who} ran on another host: whether it still runs cannot be told here (look on "
                                f"{host})", pid, host)
    machine = _here("machine_id")
    named = process.get("machine_id") if isinstance(process.get("machine_id"), str) else None
    if named is not None and machine is not None and named != machine:
        return Verdict(UNKNOWN, f"{who} ran on another machine named {host} (its machine id differs): whether it "
                                "still runs cannot be told here (look on that machine)", pid, host)
    boot = _here("boot_id")
    if isinstance(process.get("boot_id"), str) and boot is not None and process["boot_id"] != boot:
        if named is not None and named == machine:
            return Verdict(GONE, f"{who} is gone: this host has restarted since", pid, host)
        return Verdict(UNKNOWN, f"{who} ran under another boot id: this host has restarted since, or it ran on "
                                f"another machine named {host} — which cannot be told here (no machine id says "
                                "which)", pid, host)
    if _other_ns(process, "pid_ns"):
        return Verdict(UNKNOWN, f"{who} ran in another pid namespace (another container on this host): whether it "
                                "still runs cannot be told here", pid, host)
    if os.path.isdir(f"{_PROC}/self"):
        stat = _stat(pid)
        if stat is None:  # no such process — or /proc does not show it (hidepid: another user's)
            return _signalled(pid, who, host, "/proc does not show it (mounted hidepid)")
        if _is_int(process.get("start")) and stat[1] != process["start"]:
            if _other_ns(process, "time_ns"):  # (its start is read shifted by the reader's boot time offset)
                return Verdict(UNKNOWN, f"{who} ran in another time namespace, so its start time cannot be compared: "
                                        f"whether pid {pid} is still that process cannot be told here", pid, host)
            return Verdict(GONE, f"{who} is gone (pid {pid} is now another process)", pid, host)
        if stat[0] in ("Z", "X") and not _threads_run(pid):  # (a zombie: dead, not yet reaped by its parent)
            return Verdict(GONE, f"{who} is gone", pid, host)
        return Verdict(LIVE, f"{who} still runs", pid, host)
    return _signalled(pid, who, host, "there is no /proc to compare its start time")  # a pid alive is the run's


def _other_ns(process: dict[str, Any], name: str) -> bool:
    """Whether the record's namespace ``name`` (``pid_ns``, ``time_ns``) is known, as is this process's, and is
    another one."""
    mine = _here(name)
    return _is_int(process.get(name)) and mine is not None and process[name] != mine


def _signalled(pid: int, who: str, host: str, unseen: str) -> Verdict:
    """What signal 0 says of ``pid``: no such process (gone), one this user may signal (live: taken for the run's
    process, as nothing here can say otherwise), or one of another user (``unseen`` says why nothing tells more)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return Verdict(GONE, f"{who} is gone", pid, host)
    except OSError:  # (EPERM: a process runs under that pid, of another user)
        return Verdict(UNKNOWN, f"{who} cannot be looked at here: a process of another user has pid {pid} and "
                                f"{unseen}, so whether it is the run's cannot be told", pid, host)
    return Verdict(LIVE, f"{who} still runs", pid, host)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def by_whom() -> str:
    """``user@host``: who is doing this, for a line a command adds to a record (``resolved``)."""
    user = None
    with contextlib.suppress(Exception):  # (no passwd entry for the uid, in a container)
        user = getpass.getuser()
    return f"{user or getattr(os, 'getuid', lambda: '?')()}@{_host()}"
