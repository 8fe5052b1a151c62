"""What every ``flowdsl`` command shares: the typer app, the option types and their checks, the consoles and
the exit codes, stop signals taken as Ctrl-C, and the channel that keeps stdout to one JSON object under
``--format json``. (Its ``_names`` are shared by the ``flowdsl.cli*`` modules alone.)

Stage: CLI. Imports typer and the stdlib when loaded, and the stages it drives only inside the functions that
drive them (``flowdsl --help`` loads no compiler and no runtime).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="flowdsl",
    help="flowdsl: declarative workflows with automatic saga compensation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_OK, EXIT_DIAGNOSTICS, EXIT_USAGE = 0, 1, 2


def _print_version(value: bool) -> None:
    if value:
        from flowdsl import __version__

        typer.echo(f"flowdsl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="print the version and exit")] = False) -> None:
    """flowdsl: declarative workflows with automatic saga compensation."""


class OutputFormat(StrEnum):
    text = "text"
    json = "json"


class SyntaxName(StrEnum):
    yaml = "yaml"
    flow = "flow"


class Backend(StrEnum):
    local = "local"
    redis = "redis"


RedisUrlOpt = Annotated[str | None, typer.Option(
    "--redis-url", help="redis://, rediss:// (TLS) or unix:// URL, with user:password if needed "
    "\\[default: $FLOWDSL_REDIS_URL or redis://localhost:6379/0]", metavar="URL")]
PrefixOpt = Annotated[str | None, typer.Option(
    "--prefix", help="key prefix of the deployment \\[default: $FLOWDSL_REDIS_PREFIX or flowdsl]")]
FormatOpt = Annotated[OutputFormat, typer.Option("--format", "-f", help="text for people, json for programs")]

#: the ranges of the duration options (seconds): a value outside, or not a finite number, is a usage error
DAY = 24 * 3600.0
RETENTION_RANGE = (1.0, 3650 * DAY, "10 years")  # a finished run is kept at least a second
SCHEDULE_TIMEOUT_RANGE = (0.001, 365 * DAY, "365 days")
LEASE_RANGE = (0.1, DAY, "1 day")
GRACE_RANGE = (0.0, DAY, "1 day")
LATE_GRACE_RANGE = (0.0, 365 * DAY, "365 days")


def _seconds(low: float, high: float, span: str) -> Any:
    """A typer callback refusing a duration that is not a finite number of seconds in [low, high]: nan, inf,
    zero or negative where that means nothing (exit 2, naming the option, as click does for every bad value)."""
    import math

    def check(value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            # (12 digits: 31536001 must not read as 3.1536e+07, which is the bound itself)
            raise typer.BadParameter(f"{value:.12g} is not a number of seconds from {low:g} to {high:.0f} ({span})")
        return value

    return check


def _text(value: str | None) -> str | None:
    """A typer callback refusing text that cannot be stored or sent as UTF-8 (an argument whose bytes were not
    UTF-8: exit 2, naming the option and the byte)."""
    if value is not None:
        from flowdsl.runtime.execute import text_problem

        problem = text_problem(value)
        if problem is not None:
            raise typer.BadParameter(f"the text {problem}")
    return value


def _model(value: str | None) -> str | None:
    """A typer callback refusing a blank ``--lm`` (exit 2), as a blank ``lm:`` in a spec is FD201: it is most
    likely an empty shell variable (``--lm "$MODEL"``), and would otherwise mean no model at all."""
    if value is not None and not value.strip():
        raise typer.BadParameter(f"the model string {json.dumps(value)} is blank; give 'provider/model', e.g. "
                                 "openai/gpt-4o-mini (or leave --lm out)")
    return value


NoImportOpt = Annotated[bool, typer.Option("--no-import", help=(
    "do not import the worker modules the spec names, nor check its worker names (FD204, FD205); importing runs "
    "the modules' code: use this for a spec you do not trust"))]


def _stderr() -> Any:
    from flowdsl.stdio import console

    return console(stderr=True)


def _print_diagnostics(diags: list[Any], fmt: OutputFormat) -> None:
    if fmt is OutputFormat.json:
        from flowdsl.diagnostics import to_json_text
        from flowdsl.stdio import write_json

        write_json(to_json_text(diags) + "\n")
        return
    console = _stderr()
    for d in diags:
        style = "red" if d.severity == "error" else "yellow"
        console.print(f"[bold]{_escape(d.location())}[/]: [{style}]{d.severity} {d.code}[/]: {_escape(d.message)}",
                      markup=True)


def _escape(text: str) -> str:
    """``text`` for rich markup, with the bytes of a path that are not UTF-8 shown as ``\\xNN`` and each of its
    lines inert (:func:`flowdsl.shown.visible`: a message may quote a worker's or a file's text; its own line
    breaks stay)."""
    from rich.markup import escape

    from flowdsl.diagnostics import shown
    from flowdsl.shown import visible

    escaped: str = escape("\n".join(visible(line) for line in shown(text).split("\n")))
    return escaped


def _exit_for(diags: list[Any]) -> int:
    from flowdsl.diagnostics import has_errors

    if any(d.code in ("FD101",) for d in diags):
        return EXIT_USAGE
    return EXIT_DIAGNOSTICS if has_errors(diags) else EXIT_OK


def _user_code() -> contextlib.AbstractContextManager[Any]:
    """While user code runs (worker modules imported, workers called), what it prints goes to stderr: stdout
    carries this command's own output alone (the object of ``--format json``, a plan, a converted spec)."""
    return contextlib.redirect_stdout(sys.stderr)


def _compile(file: Path, no_import: bool) -> Any:
    from flowdsl.api import compile_spec

    with _user_code():
        return compile_spec(str(file), check_workers=not no_import)




EXIT_ABORTED = 130  # a run stopped at once by a second Ctrl-C or SIGTERM (a SIGHUP only cancels)


def _fail(message: str, code: int = EXIT_USAGE, console: Any = None) -> typer.Exit:
    from flowdsl.runtime.summary import error_console

    (error_console(console) if console is not None else _stderr()).print(f"[red]error[/]: {_escape(message)}")
    return typer.Exit(code)


def _reporting(as_json: bool, body: Callable[[Any], int]) -> int:
    """Run a reporting command's ``body(console)``; its exit code.

    In text, the command's output goes to stdout and its errors and notes to stderr. With ``--format json``,
    stdout carries exactly one JSON object, as for ``run``: when the command fails
    without having written one, ``{"status": "error", "error": {"type", "message"}}`` says why (the lines
    it printed on stderr)."""
    from flowdsl import stdio

    if not as_json:  # the text goes to stdout (`flowdsl runs | grep failed`), errors to stderr
        return body(stdio.console())
    console = stdio.console(stderr=True, record=True)
    with _JsonChannel(True) as channel:
        try:
            code = body(console)
        except typer.Exit as exc:
            code = exc.exit_code
        if code != 0 and not channel.written:
            said = [line.removeprefix("error: ") for line in console.export_text().splitlines()
                    if line.startswith("error: ")]
            channel.emit({"status": "error", "error": {"type": "UsageError" if code == EXIT_USAGE else "Error",
                                                       "message": "; ".join(said) or f"exit code {code}"}})
    return code


#: whether the CLI runs as the ``flowdsl`` process (:func:`main`), not inside another program (tests, embedding)
_WHOLE_PROCESS = False


@contextlib.contextmanager
def _stopping_as_ctrl_c() -> Iterator[None]:
    """SIGTERM and SIGHUP stop ``flowdsl run`` as Ctrl-C does where the run does not take them itself (while the
    spec compiles and the worker modules import, while the summary prints; a Redis run's follower takes them
    itself too): they raise KeyboardInterrupt. In the main thread only; a signal that is ignored or handled
    already is left alone."""
    import signal
    import threading

    from flowdsl.runtime.signals import TERM_SIGNALS, signal_said
    from flowdsl.workers import signalled

    def stop(signum: int, frame: Any) -> None:
        raise signalled(KeyboardInterrupt(signal_said(signum)))

    saved: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in TERM_SIGNALS:
            if signal.getsignal(signum) is signal.SIG_DFL:
                saved[signum] = signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in saved.items():
            # in the flowdsl process itself the command has said all it will (its summary, its JSON) and the
            # process only exits now: a late stop signal must not turn its exit code into the signal's
            signal.signal(signum, signal.SIG_IGN if _WHOLE_PROCESS else handler)



class _Tracked:
    """A text stream that remembers whether anything was written to it."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.written = False

    def write(self, text: str) -> int:
        if text:
            self.written = True
        return int(self.stream.write(text) or 0)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class _JsonChannel:
    """``run --format json``: stdout carries exactly one JSON object.

    While inside, file descriptor 1 is pointed at stderr (``os.dup2``), so what user code writes to it by any
    means — ``print``, ``os.write(1, ...)``, a C library, a child process — lands on stderr; ``sys.stdout`` is
    a stream on the saved, original stdout, so the command's own JSON (:meth:`emit`, or the Redis follower's)
    goes there. Everything is restored on the way out, however the block ends. When ``sys.stdout`` is not
    file descriptor 1 (tests, an embedding program), only ``sys.stdout`` is tracked.
    """

    def __init__(self, active: bool):
        self.active = active
        self._saved_fd: int | None = None
        self._saved_stdout: Any = None
        self._out: _Tracked | None = None

    @property
    def written(self) -> bool:
        return self._out is not None and self._out.written

    def __enter__(self) -> _JsonChannel:
        if not self.active:
            return self
        from flowdsl import stdio

        stdio.check_open()  # a stdout closed at start: said before anything is done whose report would be lost
        self._saved_stdout = sys.stdout
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        try:
            fd = sys.stdout.fileno()
        except (AttributeError, OSError, ValueError):
            fd = None
        stream: Any = sys.stdout
        if fd == 1:
            try:
                saved = os.dup(1)
            except OSError:
                saved = None
            if saved is not None:
                try:
                    os.dup2(2, 1)
                except OSError:
                    os.close(saved)
                else:
                    self._saved_fd = saved
                    encoding = getattr(self._saved_stdout, "encoding", None) or "utf-8"
                    stream = stdio.like_stdout(self._saved_stdout, open(  # closed on exit
                        saved, "w", encoding=encoding, closefd=False))
        self._out = _Tracked(stream)
        sys.stdout = self._out
        return self

    def emit(self, value: dict[str, Any]) -> None:
        """Write the one JSON object (a newline after it)."""
        target = self._out if self._out is not None else sys.stdout
        from flowdsl.runtime.codec import json_line
        from flowdsl.stdio import write_json

        write_json(json_line(value), target)

    def __exit__(self, *exc: object) -> None:
        if not self.active:
            return
        from flowdsl.stdio import OutputError

        failure: OutputError | None = None
        if self._out is not None:
            try:  # the object was flushed as it was written; an error now is one all the same, never lost
                self._out.flush()
            except OutputError as error:
                failure = error
            except (OSError, ValueError) as error:
                failure = OutputError(getattr(error, "strerror", None) or str(error),
                                      broken_pipe=isinstance(error, BrokenPipeError))
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        sys.stdout = self._saved_stdout
        if self._saved_fd is not None:
            if self._out is not None:
                with contextlib.suppress(Exception):
                    self._out.stream.close()
            os.dup2(self._saved_fd, 1)
            os.close(self._saved_fd)
            self._saved_fd = None
        if failure is not None and exc[0] is None:
            raise failure
