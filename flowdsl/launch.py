"""The ``flowdsl`` command's entry point: a stop signal while the CLI is still loading ends it cleanly.

Stage: cli (its first step). Imports only the stdlib until it imports ``flowdsl.cli`` — typer, rich and
the rest take a few tenths of a second to import, and a Ctrl-C, SIGTERM or SIGHUP meanwhile would
otherwise print a Python traceback (or kill the process without a word) instead of the documented
``interrupted`` and exit 130, with the one JSON object under ``--format json`` (docs/runtime.md).
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Sequence
from typing import Any

#: what a stop signal did, said as the commands say it once they handle signals themselves
_SAID = {"SIGTERM": "terminated (SIGTERM)", "SIGHUP": "hung up (SIGHUP)"}

#: the commands whose ``--format json`` gives one JSON object however they end (docs/runtime.md)
REPORTING = frozenset({"run", "show", "status", "runs", "cancel", "dead-letters"})


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
    if wants_json(argv):
        sys.stdout.write(json.dumps({"status": "error", "error": {"type": "KeyboardInterrupt",
                                                                 "message": message}}) + "\n")
    sys.stdout.flush()
    sys.exit(130)


def _raise_stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(_SAID.get(signal.Signals(signum).name, "interrupted"))


def main() -> None:
    """Console entry point: load the CLI, then run it (``flowdsl.cli.main``)."""
    argv = sys.argv[1:]
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:  # (one inherited as ignored stays ignored)
            signal.signal(signum, _raise_stop)
    try:
        from flowdsl.cli import main as cli_main
    except KeyboardInterrupt as exc:
        stopped(str(exc) or "interrupted", argv)
    # the handlers stay until a command sets its own (``run`` and ``worker`` do, for the whole of their work)
    cli_main()
