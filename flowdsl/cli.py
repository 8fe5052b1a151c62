"""The ``flowdsl`` command: a thin layer over the public API.

Stage: CLI. Imports the API facade and, lazily inside each command, the stage
it drives. Exit codes: 0 ok; 1 diagnostics found or run not completed; 2 usage
error, unreadable file or rejected spec for a command that needs a valid one;
3 stdout could not be written; 141 stdout's reader went away (``flowdsl.stdio``).
Human output goes to stderr (rich), machine output to stdout.
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

from flowdsl.launch import let_go, program_name, release, said, stopped
from flowdsl.render.command import parse_directory  # (typer + stdlib only, as diagram below)

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


NoImportOpt = Annotated[bool, typer.Option("--no-import", help="check worker names without importing modules")]


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
    """``text`` for rich markup, and with the bytes of a path that are not UTF-8 shown as ``\\xNN``."""
    from rich.markup import escape

    from flowdsl.diagnostics import shown

    escaped: str = escape(shown(text))
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


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet): compare where they would be
        return os.path.realpath(a) == os.path.realpath(b)


def write_outputs(outputs: list[tuple[str, Path, bytes]], inputs: list[Path]) -> None:
    """Write output files all or nothing: a usage error (exit 2) — before any is written — when one would
    overwrite an input file, two name the same file, or one cannot be written (its directory is missing, it
    is a directory, a socket or a block device, permissions). ``outputs``: (option, path, bytes); ``inputs``: the
    spec, then the files it uses.

    A regular file (or a new one) is first written to a temporary file beside it, then all are renamed into place
    (through a symlink, to the file it points to), so that a failing command leaves every target as it was. A
    target that is not a regular file is written in place, never renamed over: a character device (``/dev/null``,
    a terminal) or a FIFO is opened for writing (a FIFO waits for its reader, as a shell's ``>`` does), and one of
    this process's own descriptors (``/dev/stdout``, ``/dev/fd/N``, a ``>(…)`` of the shell) is written to as it
    stands — a pipe, a terminal or the file it was opened on, at its offset. Those are written after every
    temporary file, before the renames.
    """
    import stat
    import tempfile

    ways: list[tuple[str, Any]] = []  # per output: ("rename", its real path) | ("open", path) | ("fd", number)
    for i, (option, path, _) in enumerate(outputs):
        for n, source in enumerate(inputs):
            if _same_file(path, source):
                what = f"the input file {source}" if n == 0 else \
                    f"{source}, which the spec uses (a sub-flow or a worker module)"
                raise _fail(f"{option} {path}: that is {what}; refusing to write over it (choose another output "
                            "file)")
        for other, earlier, _ in outputs[:i]:
            if _same_file(path, earlier):
                raise _fail(f"{option} {path} and {other} {earlier} name the same file; give each its own")
        if path.is_dir():
            raise _fail(f"cannot write {path}: it is a directory ({option} takes a file name)")
        descriptor = _own_descriptor(path)
        try:
            mode = os.stat(path).st_mode if descriptor is None else 0
        except OSError:  # none there yet (or none reachable: said when it is written)
            mode = stat.S_IFREG
        if descriptor is not None:
            ways.append(("fd", descriptor))
        elif stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
            ways.append(("open", path))
        elif stat.S_ISSOCK(mode):
            raise _fail(f"cannot write {path}: it is a socket, not a file ({option} takes a file name)")
        elif stat.S_ISBLK(mode):
            raise _fail(f"cannot write {path}: it is a block device (a disk or a partition); flowdsl writes no output "
                        f"over one ({option} takes a file name: write a file, and copy it there if that is meant)")
        else:
            ways.append(("rename", os.path.realpath(path)))
    staged: list[tuple[Path, str, str]] = []
    try:
        for (_, path, data), (way, where) in zip(outputs, ways, strict=True):
            if way != "rename":
                continue
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(where)}.", dir=os.path.dirname(where))
            except OSError as exc:
                raise _fail(f"cannot write {path}: {exc.strerror or exc}") from None
            staged.append((path, tmp, where))
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.chmod(tmp, _new_file_mode(where))
            except OSError as exc:  # (a full disk: the error names no file, the temporary one at most)
                raise _fail(f"cannot write {path}: {exc.strerror or exc}") from None
        for (_, path, data), (way, where) in zip(outputs, ways, strict=True):
            if way != "rename":
                _write_in_place(path, data, where if way == "fd" else None)
        for path, tmp, where in staged:
            try:
                os.replace(tmp, where)
            except OSError as exc:
                raise _fail(f"cannot write {path}: {exc.strerror or exc}") from None
        staged.clear()
    finally:
        for _, tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _own_descriptor(path: Path) -> int | None:
    """The number of this process's file descriptor that ``path`` names — ``/dev/stdout``, ``/dev/fd/N``,
    ``/proc/self/fd/N``, through any symbolic links — or None. (Resolved as a path, such a name is the file or pipe
    behind the descriptor, which must be written through it, never renamed over.)"""
    own = f"/proc/{os.getpid()}/fd"
    here = os.path.abspath(path)
    for _ in range(40):  # (as the kernel follows links: at most 40)
        parent, name = os.path.split(here)
        if name.isdigit():
            with contextlib.suppress(OSError):
                if os.path.realpath(parent) == own:
                    return int(name)
        try:
            link = os.readlink(here)
        except OSError:  # not a link (or nothing there)
            return None
        here = os.path.normpath(os.path.join(parent, link))
    return None


def _write_in_place(path: Path, data: bytes, descriptor: int | None) -> None:
    """Write ``data`` into ``path``, a character device or a FIFO (opened for writing, never created or renamed
    over), or through ``descriptor``, one of this process's own, as it stands (left open)."""
    import stat

    try:
        if descriptor is None:
            fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)  # (a FIFO: waits for a reader)
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):  # replaced by a file since it was looked at
                    raise _fail(f"cannot write {path}: it became a regular file while flowdsl wrote its outputs; "
                                "run the command again")
                _write_all(fd, data)
            finally:
                os.close(fd)
        else:
            if descriptor == 1 and sys.stdout is not None:  # (None: started with stdout closed)
                with contextlib.suppress(OSError, ValueError):
                    sys.stdout.flush()
            _write_all(descriptor, data)
    except OSError as exc:
        raise _fail(f"cannot write {path}: {exc.strerror or exc}") from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _new_file_mode(target: str) -> int:
    """The mode a file written to ``target`` gets: the existing file's, else 0o666 less the umask."""
    try:
        return os.stat(target).st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="spec files (.yaml, .yml, .flow)", show_default=False)],
    fmt: FormatOpt = OutputFormat.text,
    no_import: NoImportOpt = False,
) -> None:
    """Check spec files and print every diagnostic, like a compiler."""
    all_diags: list[Any] = []
    for file in files:
        all_diags.extend(_compile(file, no_import).diagnostics)
    from flowdsl.diagnostics import sort_diagnostics

    all_diags = sort_diagnostics(all_diags)
    _print_diagnostics(all_diags, fmt)
    code = _exit_for(all_diags)
    if fmt is OutputFormat.text and code == EXIT_OK:
        _stderr().print(f"[green]ok[/]: {len(files)} spec(s) valid" + (
            f", {len(all_diags)} warning(s)" if all_diags else ""))
    raise typer.Exit(code)


@app.command()
def plan(
    file: Annotated[Path, typer.Argument(help="spec file", show_default=False)],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="write the plan here")] = None,
    source_map: Annotated[Path | None, typer.Option("--source-map", help="write node positions here")] = None,
    fmt: FormatOpt = OutputFormat.text,
    no_import: NoImportOpt = False,
) -> None:
    """Compile a spec and print its execution plan (canonical JSON)."""
    from flowdsl.api import plan_bytes

    result = _compile(file, no_import)
    if result.plan is None:
        _print_diagnostics(result.diagnostics, fmt)
        raise typer.Exit(_exit_for(result.diagnostics))
    if result.diagnostics:
        _print_diagnostics(result.diagnostics, OutputFormat.text)
    data = plan_bytes(result.plan)
    files = [("-o", output, data)] if output is not None else []
    if source_map is not None:
        files.append(("--source-map", source_map,
                      (json.dumps(result.source_map, indent=2, sort_keys=True) + "\n").encode("utf-8")))
    inputs = [file, *_spec_files(result), *([] if no_import else _module_files(result.plan))]
    write_outputs(files, inputs)  # all checked and written before anything is printed
    if output is None:
        from flowdsl.stdio import write_json

        write_json(data.decode("utf-8"))


def _module_files(plan: dict[str, Any]) -> list[Path]:
    """The files of the worker modules the spec names that were imported to check it (an input too: `plan -o
    wk.py` wrote the plan over the module it had just imported)."""
    found = (getattr(sys.modules.get(name), "__file__", None) for name in plan["flow"].get("workers") or ())
    return [Path(f) for f in found if isinstance(f, str)]


def _spec_files(result: Any) -> list[Path]:
    """The files a compiled spec was read from (its sub-flows too), per its source map."""
    return sorted({Path(entry["file"]) for entry in result.source_map.values() if entry.get("file")})


SYNTAX_SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".flow": "flow"}


@app.command()
def convert(
    file: Annotated[Path, typer.Argument(help="spec file", show_default=False)],
    to: Annotated[SyntaxName | None, typer.Option(
        "--to", help="the syntax to write \\[default: from -o's suffix: .yaml/.yml or .flow]", show_default=False)]
    = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="write here instead of stdout")] = None,
    fmt: FormatOpt = OutputFormat.text,
) -> None:
    """Turn a spec from YAML into the text syntax or back. The spec is checked first. Comments and layout are
    not kept (the data is); with -o in another directory, sub-flow paths are rewritten to stay right."""
    if output is not None and _same_file(output, file):
        raise _fail(f"-o {output}: that is the input file {file}; refusing to write over it "
                    "(choose another output file)")
    implied = SYNTAX_SUFFIXES.get(output.suffix.lower()) if output is not None else None
    if to is None and implied is None:
        raise _fail("say which syntax to write: --to yaml or --to flow (or -o FILE ending in .yaml, .yml or .flow)")
    if to is not None and implied is not None and implied != to.value:
        fitting = " or ".join(k for k, v in SYNTAX_SUFFIXES.items() if v == to.value)
        raise _fail(f"-o {output} names a {implied} file but --to is {to.value}: write {to.value} to a file "
                    f"ending in {fitting} (or leave out --to: the suffix of -o chooses the syntax)")
    syntax = to.value if to is not None else str(implied)
    from flowdsl.api import compile_loaded, load
    from flowdsl.convert import convert_text, rebase_subflow_paths

    with _user_code():
        doc = load(str(file))
        result = compile_loaded(doc, str(file))
    if result.plan is None:
        _print_diagnostics(result.diagnostics, fmt)
        raise typer.Exit(_exit_for(result.diagnostics) or EXIT_DIAGNOSTICS)
    data = doc.data if output is None else rebase_subflow_paths(doc.data, str(file.parent), str(output.parent))
    text = convert_text(data, syntax)
    if output is not None:
        write_outputs([("-o", output, text.encode("utf-8"))], [file, *_spec_files(result)])
    else:
        sys.stdout.write(text)


EXIT_ABORTED = 130  # a run stopped at once by a second Ctrl-C or SIGTERM (a SIGHUP only cancels)


def _fail(message: str, code: int = EXIT_USAGE, console: Any = None) -> typer.Exit:
    from flowdsl.runtime.report import error_console

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


# A command whose help has more than one paragraph gives it as help=, each paragraph of prose on one line of the
# string and a list one item a line: typer's rich help keeps the line breaks of the text after the first paragraph,
# so a docstring's would break its sentences at every terminal width. (A list needs prose before it: the text after
# the first paragraph is dedented as a whole, and a list at its start would lose its indent.) tests/test_cli_help.py
# checks both.
@app.command(help=(
    "Run a flow and report how it ended: in this process (local) or on Redis worker processes (redis).\n\n"
    "A first Ctrl-C or SIGTERM cancels the run and undoes what completed (exit 1); a second one stops it at once. "
    "With --backend redis, Ctrl-C, SIGTERM or SIGHUP stop following instead: the run goes on. With --format json, "
    "stdout carries exactly one JSON object whatever happens (see docs/runtime.md).\n\n"
    "Exit codes:\n"
    "  0    completed\n"
    "  1    failed, compensated or cancelled (nothing in doubt)\n"
    "  2    spec, input or usage error\n"
    "  3    the result could not be written to stdout (full, closed): stderr names the run\n"
    "  4    needs intervention (a compensation failed for good, a step completed late, or a step's outcome is in "
    "doubt)\n"
    "  130  stopped at once by a second Ctrl-C or SIGTERM; with --backend redis, stopped following (the run goes "
    "on)\n"
    "  141  stdout's reader went away (| head)"))
def run(
    file: Annotated[Path, typer.Argument(help="spec file", show_default=False)],
    input_file: Annotated[str | None, typer.Option(
        "--input", "-i", help="run input: a JSON file, or - for stdin", metavar="FILE")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="override one input value: key=value (dotted keys; the value is JSON, else a string); "
        "repeatable", metavar="KEY=VALUE")] = None,
    fmt: FormatOpt = OutputFormat.text,
    run_id: Annotated[str | None, typer.Option("--run-id", help="the run's id \\[default: generated]")] = None,
    runs_dir: Annotated[Path | None, typer.Option(
        "--runs-dir", help="where run records go \\[default: $FLOWDSL_RUNS_DIR or .flowdsl/runs]", metavar="DIR",
        parser=parse_directory)] = None,
    no_record: Annotated[bool, typer.Option("--no-record", help="do not write a run record")] = False,
    lm: Annotated[str | None, typer.Option(
        "--lm", help="language model for LLM steps that name none, e.g. openai/gpt-4o-mini",
        callback=_model)] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="seed of the retry jitter")] = None,
    late_grace: Annotated[float | None, typer.Option(
        "--late-grace", help="after the run's end, seconds to wait for a worker still running a step with a "
        "compensation that timed out (a sync worker's thread, an async worker ignoring its cancel; on Redis, "
        "following waits): a success then is a late completion (exit 4); likewise for an undo that failed for good "
        "at its timeout: its success undoes the step after all; 0 to 365 days; what has not answered by then is in "
        "doubt (exit 4) \\[default: $FLOWDSL_LATE_GRACE or 30]", metavar="SECONDS",
        callback=_seconds(*LATE_GRACE_RANGE))] = None,
    backend: Annotated[Backend, typer.Option(
        "--backend", help="local: in this process; redis: durable, on `flowdsl worker` processes")] = Backend.local,
    redis_url: RedisUrlOpt = None,
    prefix: PrefixOpt = None,
    detach: Annotated[bool, typer.Option("--detach", help="(redis) print the run id and return at once")] = False,
    schedule_timeout: Annotated[float | None, typer.Option(
        "--schedule-timeout", help="(redis) seconds an attempt may wait for a worker before it fails with "
        "ScheduleToStartTimeout, 0.001 to 1 year \\[default: the workers' setting]", metavar="SECONDS",
        callback=_seconds(*SCHEDULE_TIMEOUT_RANGE))] = None,
    retention: Annotated[float | None, typer.Option(
        "--retention", help="(redis) seconds the finished run is kept, 1 to 10 years \\[default: the workers' "
        "setting]", metavar="SECONDS", callback=_seconds(*RETENTION_RANGE))] = None,
) -> None:
    as_json = fmt is OutputFormat.json
    with _JsonChannel(as_json) as channel:
        try:
            with _stopping_as_ctrl_c():
                code = _run(channel, file, input_file, overrides or [], run_id, runs_dir, no_record, lm, seed,
                            backend, redis_url, prefix, detach, schedule_timeout, retention, late_grace)
        except _Stopped as stop:
            if stop.message:
                _stderr().print(f"[red]{stop.label}[/]: {_escape(stop.message)}")
            if as_json and not channel.written:
                channel.emit(stop.payload())
            code = stop.code
        except KeyboardInterrupt as exc:  # a Ctrl-C outside the run (while compiling, importing): stop, as documented
            message = str(exc) or "interrupted"  # typer exits 130 without a word: say it here
            _stderr().print(f"[red]{_escape(message)}[/]")
            if as_json and not channel.written:
                channel.emit({"status": "error", "error": {"type": "KeyboardInterrupt", "message": message}})
            code = EXIT_ABORTED
    raise typer.Exit(code)


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



@contextlib.contextmanager
def _said_once() -> Iterator[None]:
    """While a local run goes: the runtime's warnings that its progress (``on_notice``) says too are not said
    again on stderr by the logging module (a record that cannot be written was said twice in a row)."""
    import logging

    from flowdsl.runtime.local import NOTICED

    def fresh(record: logging.LogRecord) -> bool:
        return not getattr(record, NOTICED, False)

    logger = logging.getLogger("flowdsl.local")
    logger.addFilter(fresh)
    try:
        yield
    finally:
        logger.removeFilter(fresh)


def _on_terminal(stream: Any) -> bool:
    """Whether ``stream`` (stdin) is a terminal; False when it is closed or missing."""
    try:
        return bool(stream is not None and stream.isatty())
    except (OSError, ValueError):
        return False


class _Stopped(Exception):
    """``flowdsl run`` ends without a run result: a rejected spec, a usage or input error, an aborted run."""

    def __init__(self, message: str, code: int = EXIT_USAGE, *, status: str = "error", error_type: str = "UsageError",
                 diagnostics: list[Any] | None = None, label: str = "error", extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.error_type = error_type
        self.diagnostics = diagnostics
        self.label = label
        self.extra = extra or {}

    def payload(self) -> dict[str, Any]:
        """The ``--format json`` object: ``status``, ``error`` {type, message} and, for a rejected spec,
        ``diagnostics`` (as ``validate --format json`` lists them)."""
        out: dict[str, Any] = {"status": self.status, **self.extra,
                               "error": {"type": self.error_type, "message": self.message}}
        if self.diagnostics is not None:
            from flowdsl.diagnostics import to_json_text

            out["diagnostics"] = json.loads(to_json_text(self.diagnostics))
        return out


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


def _run(channel: _JsonChannel, file: Path, input_file: str | None, overrides: list[str], run_id: str | None,
         runs_dir: Path | None, no_record: bool, lm: str | None, seed: int | None, backend: Backend,
         redis_url: str | None, prefix: str | None, detach: bool, schedule_timeout: float | None,
         retention: float | None, late_grace: float | None) -> int:
    """The body of ``flowdsl run``: its exit code, or :class:`_Stopped`."""
    from flowdsl.runtime.inputs import InputError, check_input, read_input
    from flowdsl.runtime.record import check_run_id

    as_json = channel.active
    remote = backend is Backend.redis
    if not remote and (detach or redis_url is not None or prefix is not None or schedule_timeout is not None
                       or retention is not None):
        raise _Stopped("--detach, --redis-url, --prefix, --schedule-timeout and --retention need --backend redis")
    if no_record and runs_dir is not None:
        raise _Stopped(f"--no-record and --runs-dir {runs_dir} contradict each other: --no-record writes no record, "
                       "--runs-dir says where to write it; give one of them")
    if run_id is not None:
        try:
            check_run_id(run_id)
        except ValueError as exc:
            raise _Stopped(f"--run-id: {exc}") from None
    result = _compile(file, no_import=remote)  # with redis, the worker processes import the workers
    if result.plan is None:
        _print_diagnostics(result.diagnostics, OutputFormat.text)
        errors = sum(1 for d in result.diagnostics if d.severity == "error")
        raise _Stopped(f"{file}: the spec was rejected ({errors} error(s)); nothing ran", status="rejected",
                       error_type="SpecRejected", diagnostics=result.diagnostics, label="rejected")
    if result.diagnostics:
        _print_diagnostics(result.diagnostics, OutputFormat.text)
    if input_file == "-" and _on_terminal(sys.stdin):  # else it would wait there without a word
        _stderr().print("reading the run input from stdin; end it with Ctrl-D", markup=False)
    try:
        data = read_input(input_file, overrides)
        check_input(result.plan, data)
    except InputError as exc:
        raise _Stopped(str(exc), error_type="InputInvalid") from None
    if remote:
        from flowdsl.runtime.redis.commands import run_command

        if lm or runs_dir or no_record:
            _stderr().print("[yellow]note[/]: --lm, --runs-dir and --no-record apply to the local backend (give --lm "
                            "to `flowdsl worker`, or set FLOWDSL_LM in its environment; Redis keeps the run's "
                            "journal)")
        said: list[tuple[str, str]] = []
        submitted: list[str] = []
        from flowdsl.stdio import OutputError

        try:
            code = run_command(result.plan, data, url=redis_url, prefix=prefix, run_id=run_id, seed=seed,
                               detach=detach, as_json=as_json, schedule_timeout_s=schedule_timeout,
                               retention_s=retention, console=_stderr(), on_error=lambda kind, text: said.append(
                                   (kind, text)), submitted=submitted, late_grace=late_grace)
        except OutputError as exc:  # the run is in Redis: its id must not be lost with the output
            if submitted:
                exc.context.append(f"the run {submitted[-1]} was submitted: `flowdsl status {submitted[-1]}` "
                                   "shows it")
            raise
        if as_json and not channel.written:  # said on stderr already; the one object says it too
            kind = said[-1][0] if said else "RedisError" if code == EXIT_USAGE else "Interrupted"
            payload: dict[str, Any] = {"status": "error", "error": {
                "type": kind, "message": "; ".join(text for _, text in said) or f"exit code {code}"}}
            if submitted or run_id is not None:
                payload["run_id"] = submitted[-1] if submitted else run_id
            channel.emit(payload)
        return code

    from flowdsl.runtime.local import LocalRun, RunAborted, WorkersMissing
    from flowdsl.runtime.record import RecordError, RecordWriteError
    from flowdsl.runtime.report import LiveView, print_summary
    from flowdsl.workers import WorkerImportError

    view = LiveView(result.plan, mode="off" if as_json else "auto", console=_stderr())
    try:
        with _user_code():
            local = LocalRun(result.plan, data, run_id=run_id, lm=lm, record=not no_record, runs_dir=runs_dir,
                             on_event=view.on_event, on_notice=view.notice, seed=seed, handle_sigint=True,
                             handle_sigterm=True, late_grace=late_grace)
    except WorkersMissing as exc:
        raise _Stopped(str(exc), error_type="WorkersMissing") from None
    except WorkerImportError as exc:
        raise _Stopped(str(exc), error_type="WorkerImportError") from None
    except FileExistsError as exc:
        raise _Stopped(str(exc), error_type="RunExists", extra={"run_id": run_id}) from None
    except RecordError as exc:  # the runs directory cannot take records: nothing ran
        raise _Stopped(str(exc), error_type="RecordUnwritable") from None
    except ValueError as exc:
        raise _Stopped(str(exc)) from None
    from flowdsl.runtime.local import run_on_new_loop

    try:
        with view, _user_code(), _said_once():
            outcome = run_on_new_loop(local.run())
    except RunAborted as exc:
        extra: dict[str, Any] = {"run_id": exc.run_id, "record": str(exc.record) if exc.record else None}
        if exc.result is not None:  # what was undone, and what is left to undo by hand
            extra.update(compensated=exc.result.compensated, intervention=exc.result.intervention,
                         in_doubt=exc.result.in_doubt)
            if not as_json:
                print_summary(exc.result, _stderr())
        raise _Stopped(str(exc), EXIT_ABORTED, status="aborted", error_type="RunAborted", extra=extra) from None
    except FileExistsError as exc:  # another run took the run id between the check and the start: nothing ran
        raise _Stopped(str(exc), error_type="RunExists", extra={"run_id": local.run_id}) from None
    except RecordWriteError as exc:  # the record could not be created or begun: nothing ran
        raise _Stopped(str(exc), error_type="RecordUnwritable", extra={"run_id": local.run_id}) from None
    except (OSError, RuntimeError) as exc:
        raise _Stopped(f"the run stopped: {exc}", EXIT_DIAGNOSTICS, error_type="RuntimeError") from None
    if as_json:
        from flowdsl.stdio import OutputError

        try:
            channel.emit(outcome.to_json())
        except OutputError as exc:  # the run ran: say which, and where its record is
            exc.context.append(f"the run {outcome.run_id} ended {outcome.status}" + (
                f"; its record: {outcome.record_path}" if outcome.record_path else " (not recorded)"))
            raise
    else:
        print_summary(outcome, _stderr())
    return outcome.exit_code


@app.command()
def show(
    run_id: Annotated[str, typer.Argument(help="a run id, or the path of a run record (.jsonl)",
                                          metavar="RUN_ID", show_default=False)],
    runs_dir: Annotated[Path | None, typer.Option(
        "--runs-dir", help="where run records are \\[default: $FLOWDSL_RUNS_DIR or .flowdsl/runs]", metavar="DIR",
        parser=parse_directory)] = None,
    fmt: FormatOpt = OutputFormat.text,
) -> None:
    """Print a recorded run's timeline and summary (--format json: the same object as `run --format json`)."""
    raise typer.Exit(_reporting(fmt is OutputFormat.json, lambda console: _show(run_id, runs_dir, fmt, console)))


def _show(run_id: str, runs_dir: Path | None, fmt: OutputFormat, console: Any) -> int:
    """The body of ``flowdsl show``: 0, or a usage error (:func:`_fail`)."""
    from flowdsl.runtime.record import RecordError, find_record, read_record
    from flowdsl.runtime.report import print_timeline, record_end_note, result_from_record

    try:
        path = find_record(run_id, runs_dir)
    except RecordError as exc:
        raise _fail(str(exc), console=console) from None
    try:
        header, lines = read_record(path)  # a RecordError names the file, the line and what is malformed
    except RecordError as exc:
        raise _fail(str(exc), console=console) from None
    try:
        outcome = result_from_record(header, lines, path)
    except RecordError as exc:  # a line the replay does not explain: it names the file and the line
        raise _fail(str(exc), console=console) from None
    except ValueError as exc:  # a header without a plan, a malformed start, events that do not replay
        raise _fail(f"cannot show the run record {path}: {exc}", console=console) from None
    except Exception as exc:  # a foreign record the checks let through: say so, never a traceback
        raise _fail(f"cannot show the run record {path}: {type(exc).__name__}: {exc}", console=console) from None
    if fmt is OutputFormat.json:
        from flowdsl.runtime.codec import json_line
        from flowdsl.stdio import write_json

        write_json(json_line(outcome.to_json()))
    else:
        print_timeline(outcome, lines, console)
    if lines.cut_short:
        console.print("[yellow]note[/]: the record's last line is incomplete (its process stopped while writing "
                        "it); the run is shown as it stood at the line before")
    early = record_end_note(outcome, lines)
    if early is not None and fmt is OutputFormat.json:  # (in text, the timeline says it)
        console.print(f"[yellow]note[/]: {_escape(early)}")
    return 0


# --- the Redis runtime: worker processes and remote runs ------------------------------------------------


@app.command(help=(
    "Serve workers from Redis: run their steps and advance runs, on any number of machines.\n\n"
    "SIGTERM (or Ctrl-C) stops gracefully: in-flight steps finish or are handed back; a second signal stops at "
    "once.\n\n"
    "Exit codes:\n"
    "  0    stopped\n"
    "  1    it stopped by itself because one of its loops failed (logged)\n"
    "  2    a bad URL or module, or Redis refuses the worker (credentials, database, not Redis)"))
def worker(
    modules: Annotated[list[str] | None, typer.Option(
        "-w", "--workers", help="a module whose @worker functions to serve (repeatable)", metavar="MODULE")] = None,
    redis_url: RedisUrlOpt = None,
    prefix: PrefixOpt = None,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1, max=10000,
                                             help="steps run at once")] = 32,
    burst: Annotated[bool, typer.Option("--burst", help="drain the queues, then exit")] = False,
    lease: Annotated[float, typer.Option(
        "--lease", help="seconds without a heartbeat after which a step is reclaimed by another "
        "process, 0.1 to 1 day", metavar="SECONDS", callback=_seconds(*LEASE_RANGE))] = 30.0,
    schedule_timeout: Annotated[float | None, typer.Option(
        "--schedule-timeout", help="default for runs that set none: seconds an attempt may wait for a worker "
        "before it fails with ScheduleToStartTimeout, 0.001 to 1 year \\[default: no limit]", metavar="SECONDS",
        callback=_seconds(*SCHEDULE_TIMEOUT_RANGE))] = None,
    retention: Annotated[float, typer.Option(
        "--retention", help="default for runs that set none: seconds a finished run is kept, 1 to 10 years",
        metavar="SECONDS", callback=_seconds(*RETENTION_RANGE))] = 7 * 24 * 3600.0,
    grace: Annotated[float, typer.Option(
        "--grace", help="on SIGTERM: seconds in-flight steps may take before they are handed back, 0 to 1 day",
        metavar="SECONDS", callback=_seconds(*GRACE_RANGE))] = 10.0,
    lm: Annotated[str | None, typer.Option("--lm", help="language model for LLM steps that name none",
                                           callback=_model)] = None,
    no_llm: Annotated[bool, typer.Option("--no-llm", help="do not run LLM steps in this process")] = False,
    max_failures: Annotated[int, typer.Option(
        "--max-failures", min=1, max=1000, help="set a message aside as a dead letter once handling it has failed "
        "unexpectedly this many times (`flowdsl dead-letters`)", metavar="N")] = 3,
    snapshot_kb: Annotated[int, typer.Option(
        "--snapshot-kb", min=0, help="write a run's whole state once per this many KiB of it (0: at its start and "
        "end only); the steps between are replayed from the run's journal when it is loaded", metavar="KIB")] = 16,
    rules: Annotated[int | None, typer.Option(
        "--rules", help="start runs under this kernel rules version, while processes that know only it still "
        "serve (a rolling upgrade: docs/runtime.md) \\[default: the newest this flowdsl knows]",
        metavar="N")] = None,
    cache_runs: Annotated[int, typer.Option(
        "--cache-runs", min=0, max=1_000_000, help="keep in memory the states of this many runs the process "
        "advanced last (0: none); a run not kept is read back from Redis at its next event", metavar="N")] = 4096,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    from flowdsl.runtime.redis.commands import worker_command
    from flowdsl.runtime.redis.worker import WorkerOptions

    try:
        options = WorkerOptions(concurrency=concurrency, burst=burst, lease_s=lease,
                                schedule_timeout_s=schedule_timeout, retention_s=retention, grace_s=grace, lm=lm,
                                llm=not no_llm, snapshot_bytes=snapshot_kb * 1024, max_failures=max_failures,
                                rules=rules, cache_runs=cache_runs)
    except ValueError as exc:  # (the rules version: its range is the kernel's, not imported here)
        raise typer.BadParameter(str(exc), param_hint="'--rules'") from None
    raise typer.Exit(worker_command(url=redis_url, prefix=prefix, modules=list(modules or ()), options=options,
                                    console=_stderr(), verbose=verbose))


@app.command(help=(
    "Show a Redis run: its timeline and summary (--format json: the `run --format json` object).\n\n"
    "With --follow, it shows the run live until it ends, and exits as `flowdsl run` does.\n\n"
    "Exit codes:\n"
    "  0    the run exists, whatever its state (with --follow: it completed)\n"
    "  1    with --follow: it failed, or was compensated or cancelled\n"
    "  2    there is no such run, or Redis cannot be reached\n"
    "  4    with --follow: it ended needs_intervention\n"
    "  130  with --follow: Ctrl-C, SIGTERM or SIGHUP stopped following (the run goes on)"))
def status(
    run_id: Annotated[str, typer.Argument(help="the run's id", metavar="RUN_ID", show_default=False)],
    redis_url: RedisUrlOpt = None,
    prefix: PrefixOpt = None,
    fmt: FormatOpt = OutputFormat.text,
    follow: Annotated[bool, typer.Option("--follow", help="show the run live until it ends, as `run` does, "
                                         "and exit as `run` does")] = False,
) -> None:
    as_json = fmt is OutputFormat.json
    if not follow:
        from flowdsl.runtime.redis.commands import status_command

        raise typer.Exit(_reporting(as_json, lambda console: status_command(
            run_id, url=redis_url, prefix=prefix, as_json=as_json, console=console)))
    raise typer.Exit(_following("status", run_id, as_json, lambda commands, console, ended: commands.status_command(
        run_id, url=redis_url, prefix=prefix, as_json=as_json, console=console, follow=True, ended=ended)))


@app.command(help=(
    "List recent runs with their states, newest first: in Redis, or (--backend local) the local run records.\n\n"
    "A run record that cannot be read is skipped with a warning.\n\n"
    "Exit codes:\n"
    "  0    listed (also when there are none)\n"
    "  2    a bad option, an unreadable directory of records, or Redis unreachable or refusing"))
def runs(
    redis_url: RedisUrlOpt = None,
    prefix: PrefixOpt = None,
    status_filter: Annotated[str | None, typer.Option(
        "--status", help="only runs in this state, any case (submitted, running, completed, compensated, "
        "needs_intervention, ...; local records also aborted, not_started, unrecorded)")] = None,
    flow: Annotated[str | None, typer.Option("--flow", help="only runs of this flow", callback=_text)] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=10000, help="at most this many")] = 20,
    fmt: FormatOpt = OutputFormat.text,
    backend: Annotated[Backend, typer.Option(
        "--backend", help="redis: runs in Redis; local: the run records of the local runtime (`flowdsl run`'s "
        "default)")] = Backend.redis,
    runs_dir: Annotated[Path | None, typer.Option(
        "--runs-dir", help="(local) where run records are \\[default: $FLOWDSL_RUNS_DIR or .flowdsl/runs]",
        metavar="DIR", parser=parse_directory)] = None,
) -> None:
    as_json = fmt is OutputFormat.json

    def body(console: Any) -> int:
        if backend is Backend.local:
            return _local_runs(runs_dir, redis_url, prefix, limit, status_filter, flow, as_json, console)
        if runs_dir is not None:
            raise _fail(f"--runs-dir {runs_dir} is where the local runtime's records are: add --backend local to "
                        "list them (the default backend of `runs` is redis)", console=console)
        from flowdsl.runtime.redis.commands import runs_command

        return runs_command(url=redis_url, prefix=prefix, limit=limit, status=status_filter, flow=flow,
                            as_json=as_json, console=console)

    raise typer.Exit(_reporting(as_json, body))


def _local_runs(runs_dir: Path | None, redis_url: str | None, prefix: str | None, limit: int, status: str | None,
                flow: str | None, as_json: bool, console: Any) -> int:
    """The body of ``flowdsl runs --backend local``: its exit code."""
    from flowdsl.runtime.listing import local_runs_command
    from flowdsl.runtime.record import runs_dir as records_dir

    if redis_url is not None or prefix is not None:
        raise _fail("--redis-url and --prefix need --backend redis (the local runtime's runs are records: "
                    "--runs-dir says where)", console=console)
    try:
        directory = records_dir(str(runs_dir) if runs_dir is not None else None)
    except ValueError as exc:  # $FLOWDSL_RUNS_DIR set but empty
        raise _fail(str(exc), console=console) from None
    return local_runs_command(directory, limit=limit, status=status, flow=flow, as_json=as_json, console=console)


@app.command(help=(
    "Cancel a Redis run: in-flight steps are stopped and completed steps compensated.\n\n"
    "With --wait, it waits until the run has ended; Ctrl-C, SIGTERM or SIGHUP then stop the waiting, not the run.\n\n"
    "Exit codes:\n"
    "  0    the cancel was requested\n"
    "  1    the run was already over\n"
    "  2    there is no such run\n"
    "  4    with --wait: the run ended needs_intervention (something is left to undo by hand)\n"
    "  130  with --wait: the waiting was stopped (the run goes on)"))
def cancel(
    run_id: Annotated[str, typer.Argument(help="the run's id", metavar="RUN_ID", show_default=False)],
    redis_url: RedisUrlOpt = None,
    prefix: PrefixOpt = None,
    reason: Annotated[str, typer.Option("--reason", help="recorded with the cancellation",
                                        callback=_text)] = "cancel requested",
    wait: Annotated[bool, typer.Option("--wait", help="wait until the run has ended")] = False,
    fmt: FormatOpt = OutputFormat.text,
) -> None:
    as_json = fmt is OutputFormat.json
    if not wait:
        from flowdsl.runtime.redis.commands import cancel_command

        raise typer.Exit(_reporting(as_json, lambda console: cancel_command(
            run_id, url=redis_url, prefix=prefix, reason=reason, wait=False, as_json=as_json, console=console)))
    raise typer.Exit(_following("cancel", run_id, as_json, lambda commands, console, ended: commands.cancel_command(
        run_id, url=redis_url, prefix=prefix, reason=reason, wait=True, as_json=as_json, console=console,
        ended=ended)))


def _following(command: str, run_id: str, as_json: bool, body: Callable[[Any, Any, list[int]], int]) -> int:
    """Run ``status --follow`` or ``cancel --wait`` (``body(commands module, console, ended)``) so that a stop signal
    ends it as it ends ``run --backend redis``, whenever it comes: held while the command loads (a
    KeyboardInterrupt raised in the middle of an import would leave it half done), then raising KeyboardInterrupt
    where the command does not take it itself. ``ended`` holds the exit code once the command has said how it
    ended; a signal after that changes nothing."""
    import signal
    import threading

    stops = {signal.SIGINT, *(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))}
    held = signal.pthread_sigmask(signal.SIG_BLOCK, stops) if hasattr(signal, "pthread_sigmask") and \
        threading.current_thread() is threading.main_thread() else None
    ended: list[int] = []
    try:
        with _stopping_as_ctrl_c():
            from flowdsl.runtime.redis import commands  # (a stop meanwhile, unheld: cli.main says it)

            try:
                if held is not None:  # (a signal that came meanwhile is taken here)
                    signal.pthread_sigmask(signal.SIG_SETMASK, held)
                    held = None
                return _reporting(as_json, lambda console: body(commands, console, ended))
            except KeyboardInterrupt:
                if not ended:  # (before the command took it)
                    _reporting(as_json, lambda console: commands.stopped_following(
                        command, run_id, as_json=as_json, console=console, ended=ended))
                return ended[-1]
    finally:
        if held is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


@app.command(name="dead-letters", help=(
    "List the messages worker processes set aside because they could not be handled, or put them back.\n\n"
    "A message is set aside when it cannot be read (damaged, or not flowdsl's) or when handling it failed "
    "unexpectedly --max-failures times (`flowdsl worker`); its run waits meanwhile. Once the cause is fixed, "
    "--retry puts it back: it is handled as after a crash.\n\n"
    "Exit codes:\n"
    "  0    done\n"
    "  2    an id names no dead letter"))
def dead_letters(
    redis_url: RedisUrlOpt = None,
    prefix: PrefixOpt = None,
    retry: Annotated[list[str] | None, typer.Option(
        "--retry", help="put this dead letter back on its stream (repeatable)", metavar="ID")] = None,
    retry_all: Annotated[bool, typer.Option("--retry-all", help="put every dead letter back (however many)")] = False,
    delete: Annotated[list[str] | None, typer.Option(
        "--delete", help="delete this dead letter for good (repeatable)", metavar="ID")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=100000,
                                       help="list at most this many, oldest first")] = 100,
    fmt: FormatOpt = OutputFormat.text,
) -> None:
    from flowdsl.runtime.redis.commands import dead_letters_command

    as_json = fmt is OutputFormat.json
    raise typer.Exit(_reporting(as_json, lambda console: dead_letters_command(
        url=redis_url, prefix=prefix, retry=list(retry or ()), retry_all=retry_all, delete=list(delete or ()),
        limit=limit, as_json=as_json, console=console)))


from flowdsl.render.command import diagram as _diagram  # noqa: E402  (typer + stdlib only)

app.command(name="diagram")(_diagram)


#: the reporting commands that do not take SIGTERM and SIGHUP themselves (``run`` does, and ``status --follow``,
#: ``cancel --wait`` take them from here): they keep raising KeyboardInterrupt, so that such a command, stopped,
#: still says so — and gives its one JSON object — instead of dying without a word
_SAID_WHEN_STOPPED = frozenset({"show", "status", "runs", "cancel", "dead-letters"})


def main() -> None:
    """Console entry point (``flowdsl.launch.main`` loads it).

    Runs the command as typer would, but says what typer leaves unsaid: a stop signal while the command is
    built, or a Ctrl-C the command does not handle itself (typer exits 130 without a word; here
    ``interrupted``, exit 130, and the one JSON object under ``--format json``), and a command line that is
    wrong (the usage error, and also that JSON object, as every other failure of a reporting command gives)."""
    global _WHOLE_PROCESS
    _WHOLE_PROCESS = True
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
