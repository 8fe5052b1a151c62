"""The ``flowdsl`` command: a thin layer over the public API, and its entry point.

Its commands are defined by topic — :mod:`flowdsl.cli_spec` (validate, plan, convert), :mod:`flowdsl.cli_test`
(test), :mod:`flowdsl.cli_run` (run, show), :mod:`flowdsl.cli_resume` (resume), :mod:`flowdsl.cli_redis` (worker,
status, runs, workers, cancel, signal, dead-letters), :mod:`flowdsl.cli_records` (resolve, prune) and
:mod:`flowdsl.render.command` (diagram) — on the app of :mod:`flowdsl.cli_common`, imported here in the order
``flowdsl --help`` lists them.

Stage: CLI. Imports the API facade and, lazily inside each command, the stage
it drives. Exit codes: 0 ok; 1 diagnostics found or run not completed; 2 usage
error, unreadable file or rejected spec for a command that needs a valid one;
3 stdout could not be written; 141 stdout's reader went away (``flowdsl.stdio``).
Human output goes to stderr (rich), machine output to stdout.
"""

from __future__ import annotations

import sys

import typer

from flowdsl import cli_common
from flowdsl.cli_common import _JsonChannel, app
from flowdsl.cli_files import write_outputs
from flowdsl.launch import let_go, program_name, release, said, stopped
from flowdsl.render.command import diagram as _diagram  # (typer + stdlib only)

# each module registers its commands: the order here is the order of `flowdsl --help`
# isort: off
from flowdsl import cli_spec, cli_test, cli_run, cli_resume, cli_redis, cli_records  # noqa: F401
# isort: on

__all__ = ["_JsonChannel", "app", "main", "write_outputs"]

app.command(name="diagram")(_diagram)


#: the reporting commands that do not take SIGTERM and SIGHUP themselves (``run`` does, and ``status --follow``,
#: ``cancel --wait``, ``signal`` take them from here): they keep raising KeyboardInterrupt, so that such a command,
#: stopped, still says so — and gives its one JSON object — instead of dying without a word
_SAID_WHEN_STOPPED = frozenset({"show", "status", "runs", "cancel", "signal", "dead-letters", "resolve", "prune",
                                "test"})


def main() -> None:
    """Console entry point (``flowdsl.launch.main`` loads it).

    Runs the command as typer would, but says what typer leaves unsaid: a stop signal while the command is
    built, or a Ctrl-C the command does not handle itself (typer exits 130 without a word; here
    ``interrupted``, exit 130, and the one JSON object under ``--format json``), and a command line that is
    wrong (the usage error, and also that JSON object, as every other failure of a reporting command gives)."""
    cli_common._WHOLE_PROCESS = True
    argv = sys.argv[1:]
    from flowdsl.stdio import EXIT_BROKEN_PIPE, OutputError, report

    try:
        from typer import rich_utils

        try:
            from typer._click.exceptions import ClickException  # typer 0.2x carries its own click
        except ImportError:
            from click import ClickException
        command = typer.main.get_command(app)
    except KeyboardInterrupt as exc:
        stopped(str(exc) or "interrupted", argv)
    try:
        try:
            ctx = command.make_context(program_name(), list(argv))
        finally:  # the command line read (or refused, or --help said): SIGTERM and SIGHUP the default again, for
            if not argv or argv[0] not in _SAID_WHEN_STOPPED:  # the commands to take or not
                release()
        with ctx:
            command.invoke(ctx)
    except typer.Exit as exc:
        sys.exit(_flushed(exc.exit_code))
    except OutputError as exc:  # stdout full, closed or its reader gone (flowdsl.stdio): said once, here
        sys.exit(report(exc))
    except ClickException as exc:  # the command line itself is wrong: nothing has started
        rich_utils.rich_format_error(exc)
        said(argv, {"status": "error", "error": {"type": "UsageError", "message": exc.format_message()}})
        sys.exit(exc.exit_code)
    except typer.Abort:  # (end of input at a prompt)
        sys.stderr.write("Aborted!\n")
        sys.exit(1)
    except KeyboardInterrupt as exc:
        stopped(str(exc) or "interrupted", argv)
    except BrokenPipeError:  # the reader went away (``| head``) of a stdout flowdsl.stdio does not guard: quietly
        let_go()
        sys.exit(EXIT_BROKEN_PIPE)
    sys.exit(_flushed(0))


def _flushed(code: int) -> int:
    """``code``, once stdout is flushed; if that fails, the error said (``flowdsl.stdio.report``) and its code."""
    from flowdsl.stdio import OutputError, flush_stdout, report

    try:
        flush_stdout()
    except OutputError as exc:
        return report(exc)
    except OSError as exc:  # (a stdout flowdsl.stdio does not guard)
        return report(OutputError(exc.strerror or str(exc), broken_pipe=isinstance(exc, BrokenPipeError)))
    return code


if __name__ == "__main__":
    main()
