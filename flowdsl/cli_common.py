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

from flowdsl.render.command import parse_directory  # (typer + stdlib only)

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
#: the local run record a command reads (``show``, ``resume``)
RecordArg = Annotated[str, typer.Argument(help="a run id, or the path of a run record (.jsonl)", metavar="RUN_ID",
                                          show_default=False)]
#: where a command finds the local run records (``show``, ``resume``, ``prune``)
RunsDirOpt = Annotated[Path | None, typer.Option(
    "--runs-dir", help="where run records are \\[default: $FLOWDSL_RUNS_DIR or .flowdsl/runs]", metavar="DIR",
    parser=parse_directory)]

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


def _threads_problem() -> str | None:
    """What is wrong with ``$FLOWDSL_THREADS`` (the size of the sync workers' thread pool), or None: the commands that
    call workers (``run``, ``resume``, ``worker``) refuse a bad one before anything runs, where a library user's
    process logs it when its first sync worker starts (``flowdsl.runtime.execute.thread_limit``)."""
    from flowdsl.runtime.execute import thread_limit

    try:
        thread_limit()
    except ValueError as exc:
        return str(exc)
    return None


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


def _stop_as_ctrl_c(signum: int, frame: Any) -> None:
    """The handler :func:`_stopping_as_ctrl_c` gives SIGTERM and SIGHUP: a KeyboardInterrupt saying which."""
    from flowdsl.runtime.signals import signal_said
    from flowdsl.workers import signalled

    raise signalled(KeyboardInterrupt(signal_said(signum)))


@contextlib.contextmanager
def _stopping_as_ctrl_c() -> Iterator[None]:
    """SIGTERM and SIGHUP stop ``flowdsl run`` as Ctrl-C does where the run does not take them itself (while the
    spec compiles and the worker modules import, before the run starts; a Redis run's follower takes them itself
    too): they raise KeyboardInterrupt — until a local run has ended (:class:`_HeldAfterEnd`). In the main thread
    only; a signal that is ignored or handled already is left alone."""
    import signal
    import threading

    from flowdsl.runtime.signals import TERM_SIGNALS

    saved: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in TERM_SIGNALS:
            if signal.getsignal(signum) is signal.SIG_DFL:
                saved[signum] = signal.signal(signum, _stop_as_ctrl_c)
    try:
        yield
    finally:
        for signum, handler in saved.items():
            # in the flowdsl process itself the command has said all it will (its summary, its JSON) and the
            # process only exits now: a late stop signal must not turn its exit code into the signal's
            signal.signal(signum, signal.SIG_IGN if _WHOLE_PROCESS else handler)



class _HeldAfterEnd:
    """While ``flowdsl run`` (or ``resume``) drives a local run and reports it: once the run has ended, a stop
    signal must not throw its result away.

    The run takes Ctrl-C, SIGTERM and SIGHUP itself while it goes (:mod:`flowdsl.runtime.signals`) and gives them
    back as it returns; what is given back is this handler. Before the run has ended (``ended()`` false: it has
    not started yet) a signal does what it did before — a KeyboardInterrupt, exit 130, nothing ran. After, the run
    has a result, and the loop's teardown and the output are still to come: a signal is held (:attr:`held`) and
    said (:meth:`say`), the result is written whole and the exit code is the run's. Only a second Ctrl-C or
    SIGTERM since the run's end (a SIGHUP never counts, as during the run) cuts the output short, while it is
    written (:meth:`writing`) — a summary or JSON object that cannot be written (a terminal or pipe nobody reads)
    must not hold the process for ever. On the way out, in the ``flowdsl`` process the signals are left ignored
    (the command only exits now); elsewhere the handlers found are put back."""

    def __init__(self, ended: Callable[[], bool]):
        self._ended = ended
        self._previous: dict[int, Any] = {}
        #: the stop signals taken since the run ended, in order
        self.held: list[int] = []
        self._said = 0  # how many of them were said
        self._writing = False
        self._answered = 0  # the signals held when the output was last cut short for them
        self._cutters: set[int] = set()  # (the indexes in held of those that cut it short: said otherwise)
        self._raised = False  # a signal before the end was raised: the command is stopping already

    def __enter__(self) -> _HeldAfterEnd:
        import signal
        import threading

        from flowdsl.runtime.signals import TERM_SIGNALS

        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in (signal.SIGINT, *TERM_SIGNALS):
            current = signal.getsignal(signum)
            # only what this command set (or Python's own Ctrl-C): one ignored, or an embedding program's, stays
            if current is _stop_as_ctrl_c or (signum == signal.SIGINT and current is signal.default_int_handler):
                self._previous[signum] = current
                signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_IGN if _WHOLE_PROCESS else previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if not self._ended():
            if self._raised:  # (the command is stopping for the first one: a second changes nothing)
                return
            self._raised = True
            self._previous[signum](signum, frame)  # raises KeyboardInterrupt: the run has not started
            return
        self.held.append(signum)
        if self._writing and self.cut():
            self._interrupt()

    def cut(self) -> bool:
        """Whether a second Ctrl-C or SIGTERM came since the run's end: its output is to be cut short."""
        import signal

        return sum(1 for signum in self.held if signum != getattr(signal, "SIGHUP", None)) >= 2

    def _interrupt(self) -> None:
        from flowdsl.runtime.signals import signal_said
        from flowdsl.workers import signalled

        self._answered = len(self.held)
        self._cutters.add(len(self.held) - 1)
        raise signalled(KeyboardInterrupt(signal_said(self.held[-1])))

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """While the run's result is written: a second Ctrl-C or SIGTERM since its end raises KeyboardInterrupt
        here — at once when it came before, and for each one after (a note saying the output was cut short is
        cut short by the next)."""
        self._writing = True
        try:
            if self.cut() and len(self.held) > self._answered:
                self._interrupt()
            yield
        finally:
            self._writing = False

    def say(self, how: str) -> None:
        """Say each signal held and not said yet: ``terminated: the run has already ended completed`` (``how``:
        ``ended completed``), as the run says one that lands as it ends (not one that cut the output short: the
        command says that)."""
        import signal

        from flowdsl.runtime.signals import SIGNAL_WORDS

        for index, signum in enumerate(self.held[self._said:], self._said):
            if index in self._cutters:
                continue
            verb = SIGNAL_WORDS.get(signal.Signals(signum).name, ("stopped", ""))[0]
            _stderr().print(f"{verb}: the run has already {how}", markup=False, highlight=False, soft_wrap=True)
        self._said = len(self.held)


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

    def abandon(self) -> None:
        """The object is not to be written after all (a second stop signal cut it short): what is still buffered
        for stdout is dropped, never waited for — the descriptor it would go to is pointed at /dev/null."""
        fd = self._saved_fd
        if fd is None and self._out is not None:
            try:
                fd = int(self._out.stream.fileno())
            except (AttributeError, OSError, ValueError):
                fd = None
        if fd is None:
            return
        try:
            null = os.open(os.devnull, os.O_WRONLY)
        except OSError:
            return
        with contextlib.suppress(OSError):
            os.dup2(null, fd)
        os.close(null)

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
