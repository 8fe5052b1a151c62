"""The ``flowdsl`` command's entry point: a stop signal while the CLI is still loading ends it cleanly.

Stage: cli (its first step). Imports only the stdlib until it imports ``flowdsl.cli`` — typer, rich and
the rest take a few tenths of a second to import, and a Ctrl-C, SIGTERM or SIGHUP meanwhile would
otherwise print a Python traceback (or kill the process without a word) instead of the documented
``interrupted`` and exit 130, with the one JSON object under ``--format json`` (docs/runtime.md).
"""

from __future__ import annotations

import os
import signal
import sys

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: the fewer imports before main() takes
# the stop signals, the shorter the window in which one still ends the process with a traceback)
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

#: what a stop signal did, said as the commands say it once they handle signals themselves
_SAID = {"SIGTERM": "terminated (SIGTERM)", "SIGHUP": "hung up (SIGHUP)"}

#: the commands whose ``--format json`` gives one JSON object however they end (docs/runtime.md)
REPORTING = frozenset({"run", "resume", "show", "status", "runs", "cancel", "signal", "dead-letters", "resolve",
                       "prune", "workers", "test"})


def wants_json(argv: Sequence[str]) -> bool:
    """Whether the command line is one of a :data:`REPORTING` command asking for ``--format json`` (``-f
    json``, ``--format=json``)."""
    if not argv or argv[0] not in REPORTING:
        return False
    for i, arg in enumerate(argv):
        if arg == "--":
            return False
        if arg in ("--format", "-f") and i + 1 < len(argv) and argv[i + 1] == "json":
            return True
        if arg in ("--format=json", "-fjson"):
            return True
    return False


def stopped(message: str, argv: Sequence[str]) -> None:
    """End the command for a stop signal: ``message`` on stderr, the JSON error object when asked, exit 130."""
    sys.stderr.write(message + "\n")
    said(argv, {"status": "error", "error": {"type": "KeyboardInterrupt", "message": message}})
    sys.exit(130)


def said(argv: Sequence[str], value: dict[str, Any]) -> None:
    """Write ``value`` as the command's one JSON object when ``argv`` asks for it (:func:`wants_json`); a reader
    that went away (``| head``) is let go quietly."""
    if not wants_json(argv):
        return
    import json

    from flowdsl.stdio import OutputError

    try:
        sys.stdout.write(json.dumps(value) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, OutputError):  # (the error, said on stderr, is the command's: its exit code stays)
        let_go()


def let_go() -> None:
    """The reader of stdout went away (``| head``), or stdout cannot be written: point it at /dev/null, so that
    nothing more written to it (nor the interpreter's flush at exit) raises."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):
        pass


def program_name() -> str:
    """How the command was called, for usage lines: ``flowdsl``, or ``python -m flowdsl``."""
    if os.path.basename(sys.argv[0] if sys.argv else "") == "__main__.py":
        return "python -m flowdsl"
    return "flowdsl"


_taken: list[int] = []  # the signals whose handlers main() set, until release()


def _raise_stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(_SAID.get(signal.Signals(signum).name, "interrupted"))


def release() -> None:
    """Give SIGTERM and SIGHUP back their default action: called once the CLI is built, before the command runs
    (commands that take these signals take them from the default, and the others are stopped by them as any
    program is)."""
    while _taken:
        signum = _taken.pop()
        if signal.getsignal(signum) is _raise_stop:
            signal.signal(signum, signal.SIG_DFL)


def main() -> None:
    """Console entry point: load the CLI, then run it (``flowdsl.cli.main``, which calls :func:`release` once the
    command is built)."""
    argv = sys.argv[1:]
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:  # (one inherited as ignored stays ignored)
            signal.signal(signum, _raise_stop)
            _taken.append(signum)
    try:
        from flowdsl import stdio

        stdio.install()  # (before anything opens a file: a closed fd 0, 1 or 2 is taken by /dev/null)
        from flowdsl.cli import main as cli_main
    except KeyboardInterrupt as exc:
        stopped(str(exc) or "interrupted", argv)
    cli_main()
