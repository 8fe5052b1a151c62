"""The commands on runs of either backend: ``run`` (in this process — and, with ``--park``, let go once it only
waits —, or submitted to Redis and followed), ``show`` (a local run's record) and ``resume`` (a local run whose
process stopped before its end, or that was parked, from its record).

Stage: CLI. Imports :mod:`flowdsl.cli_common`, and the runtime it drives inside each command.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from flowdsl.cli_common import (
    EXIT_ABORTED,
    EXIT_DIAGNOSTICS,
    EXIT_USAGE,
    LATE_GRACE_RANGE,
    RETENTION_RANGE,
    SCHEDULE_TIMEOUT_RANGE,
    Backend,
    FormatOpt,
    OutputFormat,
    PrefixOpt,
    RecordArg,
    RedisUrlOpt,
    RunsDirOpt,
    _compile,
    _escape,
    _fail,
    _HeldAfterEnd,
    _JsonChannel,
    _model,
    _print_diagnostics,
    _reporting,
    _seconds,
    _stderr,
    _stopping_as_ctrl_c,
    _threads_problem,
    _user_code,
    app,
)
from flowdsl.render.command import parse_directory  # (typer + stdlib only)


# A command whose help has more than one paragraph gives it as help=, each paragraph of prose on one line of the
# string and a list one item a line: typer's rich help keeps the line breaks of the text after the first paragraph,
# so a docstring's would break its sentences at every terminal width. (A list needs prose before it: the text after
# the first paragraph is dedented as a whole, and a list at its start would lose its indent.) tests/test_cli_help.py
# checks both.
@app.command(help=(
    "Run a flow and report how it ended: in this process (local) or on Redis worker processes (redis).\n\n"
    "A first Ctrl-C or SIGTERM cancels the run and undoes what completed (exit 1); a second one stops it at once. "
    "With --backend redis, Ctrl-C, SIGTERM or SIGHUP stop following instead: the run goes on. With --park, a local "
    "run that has nothing left but waiting (for a signal or a timer) is parked: its record says so, this process "
    "exits 5, and `flowdsl resume` goes on with the run later. With --format json, stdout carries exactly one JSON "
    "object whatever happens (see docs/runtime.md).\n\n"
    "Exit codes:\n"
    "  0    completed\n"
    "  1    failed, compensated or cancelled (nothing in doubt)\n"
    "  2    spec, input or usage error\n"
    "  3    the result could not be written to stdout (full, closed, cut short by a second stop signal): stderr "
    "names the run\n"
    "  4    needs intervention (a compensation failed for good, a step completed late, or a step's outcome is in "
    "doubt)\n"
    "  5    parked (--park): not over; `flowdsl resume` goes on with it\n"
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
    signals: Annotated[list[str] | None, typer.Option(
        "--signal", help="(local) send the signal NAME to the run as it starts, with a payload: a JSON object, "
        "inline, from a file (NAME=@FILE) or stdin (NAME=@-); kept until the wait taking it starts; a keyed wait's "
        "signal is NAME:KEY (the key ends at the first =); repeatable", metavar="NAME[:KEY][=JSON]")] = None,
    park: Annotated[bool, typer.Option(
        "--park", help="(local) once the run has nothing left but waiting for a signal or a timer, park it: its "
        "record says what it waits for, the command exits 5, and `flowdsl resume RUN_ID` goes on with it (with "
        "--signal NAME=JSON to send one)")] = False,
) -> None:
    raise typer.Exit(_channelled(fmt is OutputFormat.json, lambda channel: _run(
        channel, file, input_file, overrides or [], run_id, runs_dir, no_record, lm, seed, backend, redis_url, prefix,
        detach, schedule_timeout, retention, late_grace, signals or [], park)))


def _channelled(as_json: bool, body: Callable[[_JsonChannel], int]) -> int:
    """``body(channel)``'s exit code (``run``, ``resume``), its JSON object, if any, written once (``resume --due``
    writes one a run: JSON Lines): a stop it raised (:class:`_Stopped`) said on stderr and, as JSON, its payload
    when nothing was written; a Ctrl-C outside the run itself (while compiling, importing) said too, exit 130, as
    documented."""
    with _JsonChannel(as_json) as channel:
        try:
            with _stopping_as_ctrl_c():
                return body(channel)
        except _Stopped as stop:
            if stop.message:
                _stderr().print(f"[red]{stop.label}[/]: {_escape(stop.message)}")
            if as_json and not channel.written:
                channel.emit(stop.payload())
            return stop.code
        except KeyboardInterrupt as exc:
            message = str(exc) or "interrupted"  # typer exits 130 without a word: say it here
            _stderr().print(f"[red]{_escape(message)}[/]")
            if as_json and not channel.written:
                channel.emit({"status": "error", "error": {"type": "KeyboardInterrupt", "message": message}})
            return EXIT_ABORTED



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


@contextlib.contextmanager
def _handlers_kept() -> Iterator[None]:
    """While ``resume --due`` drives one of its runs: the stop signals' handlers are put back as they were before it.
    Once a run has been reported, :class:`_HeldAfterEnd` leaves them ignored in the ``flowdsl`` process (the command
    only exits then): the next run would take no Ctrl-C, SIGTERM or SIGHUP (a run leaves a signal ignored as it is)."""
    import signal
    import threading

    from flowdsl.runtime.signals import TERM_SIGNALS

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, *TERM_SIGNALS)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            if handler is not None:  # (None: not set from Python, so it cannot be put back from here)
                signal.signal(signum, handler)


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


def _run(channel: _JsonChannel, file: Path, input_file: str | None, overrides: list[str], run_id: str | None,
         runs_dir: Path | None, no_record: bool, lm: str | None, seed: int | None, backend: Backend,
         redis_url: str | None, prefix: str | None, detach: bool, schedule_timeout: float | None,
         retention: float | None, late_grace: float | None, signal_args: list[str], park: bool) -> int:
    """The body of ``flowdsl run``: its exit code, or :class:`_Stopped`."""
    from flowdsl.runtime.inputs import InputError, check_input, read_input
    from flowdsl.runtime.record import check_run_id

    as_json = channel.active
    remote = backend is Backend.redis
    if not remote and (detach or redis_url is not None or prefix is not None or schedule_timeout is not None
                       or retention is not None):
        raise _Stopped("--detach, --redis-url, --prefix, --schedule-timeout and --retention need --backend redis")
    if remote and signal_args:
        raise _Stopped("--signal is for --backend local: send a signal to a Redis run once it is submitted, with "
                       "`flowdsl signal RUN_ID NAME --data JSON`")
    if remote and park:
        raise _Stopped("--park is for the local runtime: a Redis run's waits outlast every process already "
                       "(--detach: print the run id and exit)")
    if not remote and (threads := _threads_problem()) is not None:
        raise _Stopped(threads)
    if no_record and runs_dir is not None:
        raise _Stopped(f"--no-record and --runs-dir {runs_dir} contradict each other: --no-record writes no record, "
                       "--runs-dir says where to write it; give one of them")
    if no_record and park:
        raise _Stopped("--park and --no-record contradict each other: a parked run goes on from its record (`flowdsl "
                       "resume`), which --no-record does not write; give one of them")
    if run_id is not None:
        try:
            check_run_id(run_id)
        except ValueError as exc:
            raise _Stopped(f"--run-id: {exc}") from None
    if signal_args:  # stdin is read once: refused before either reads it
        from flowdsl.cli_signals import check_stdin

        try:
            check_stdin(signal_args, input_from_stdin=input_file == "-")
        except InputError as exc:
            raise _Stopped(str(exc)) from None
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
    signals = _signals(result.plan, signal_args, input_from_stdin=input_file == "-", park=park) if not remote else []
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

    from flowdsl.runtime.local import LocalRun

    return _drive_local(channel, result.plan, lambda view: LocalRun(
        result.plan, data, run_id=run_id, lm=lm, record=not no_record, runs_dir=runs_dir, on_event=view.on_event,
        on_notice=view.notice, seed=seed, handle_sigint=True, handle_sigterm=True, late_grace=late_grace,
        spec_path=file, signals=signals, park=park), run_id)


def _signals(plan: dict[str, Any], given: list[str], state: dict[str, Any] | None = None, *,
             input_from_stdin: bool = False, park: bool = False,
             cancel: bool = False) -> list[tuple[str, dict[str, Any] | None, str | None]]:
    """The ``--signal`` options, read and checked against the plan's waits (:class:`_Stopped` when one is wrong;
    ``input_from_stdin``: ``--input -`` reads stdin, which a ``NAME=@-`` may then not), and a note on stderr for each
    signal wait they leave without its signal (``state``: a resumed run's; ``park``: the run is parked when it only
    waits; none with ``cancel``: the run's waits end as it goes on)."""
    from flowdsl.cli_signals import read_signals, stdin_signals, unsent_notes
    from flowdsl.runtime.inputs import InputError
    from flowdsl.shown import visible

    try:
        reading = stdin_signals(given)
        if len(reading) == 1 and not input_from_stdin and _on_terminal(sys.stdin):  # (else it waits without a word)
            _stderr().print(f"reading the payload of --signal {visible(reading[0])} from stdin; end it with Ctrl-D",
                            markup=False)
        signals = read_signals(given, plan, input_from_stdin=input_from_stdin)
    except InputError as exc:
        raise _Stopped(str(exc)) from None
    import signal

    ctrl_c = signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # (inherited ignored: it stays so, LocalRun)
    for note in () if cancel else unsent_notes(plan, [name for name, *_ in signals], state, ctrl_c=ctrl_c, park=park):
        _stderr().print(f"[yellow]note[/]: {_escape(note)}", highlight=False, soft_wrap=True)
    return signals


@dataclass
class _Went:
    """How a run :func:`_drive_local` drove went, for ``resume --due``: its result, and the stop signals taken
    after its end (held while it was reported)."""

    outcome: Any = None
    signals: list[int] = field(default_factory=list)


def _drive_local(channel: _JsonChannel, plan: dict[str, Any], make: Callable[[Any], Any], run_id: str | None,
                 before: Iterable[dict[str, Any]] = (), went: _Went | None = None) -> int:
    """Run a local run to its end with the live view on stderr, and report it (``--format json``: one object on
    stdout): its exit code, or :class:`_Stopped`. ``make(view)`` builds the :class:`LocalRun` (what it raises is
    said as a usage error: nothing ran); ``before``: the events the run emitted already (a resumed run's), shown
    first; ``went``: told how the run went."""
    from flowdsl.runtime.local import WorkersMissing
    from flowdsl.runtime.record import RecordError
    from flowdsl.runtime.timeline import LiveView
    from flowdsl.workers import WorkerImportError

    as_json = channel.active
    view = LiveView(plan, mode="off" if as_json else "auto", console=_stderr())
    try:
        with _user_code():
            local = make(view)
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
    for event in before:
        view.on_event(event)
    # once the run has ended, a stop signal is held until its result is written (_HeldAfterEnd): before, one landing
    # as the loop closed raised a KeyboardInterrupt that threw a completed run's result away (exit 130)
    with _HeldAfterEnd(lambda: bool(local.ended)) as held:
        try:
            return _report_local(channel, local, view, held, went)
        finally:
            if went is not None:
                went.signals = list(held.held)


def _report_local(channel: _JsonChannel, local: Any, view: Any, held: _HeldAfterEnd, went: _Went | None) -> int:
    """The rest of :func:`_drive_local`: the run, then its summary or JSON object; its exit code."""
    from flowdsl.runtime.local import RunAborted, run_on_new_loop
    from flowdsl.runtime.record import RecordError, RecordWriteError
    from flowdsl.runtime.resume import NotResumable
    from flowdsl.runtime.summary import print_summary
    from flowdsl.stdio import OutputError

    as_json = channel.active
    try:
        with view, _user_code(), _said_once():
            outcome = run_on_new_loop(local.run())
    except RunAborted as exc:
        extra: dict[str, Any] = {"run_id": exc.run_id, "record": str(exc.record) if exc.record else None}
        held.say("stopped")
        if exc.result is not None:  # what was undone, and what is left to undo by hand
            extra.update(compensated=exc.result.compensated, intervention=exc.result.intervention,
                         in_doubt=exc.result.in_doubt)
            if not as_json:
                with contextlib.suppress(KeyboardInterrupt), held.writing():  # (cut short: it exits 130 all the same)
                    print_summary(exc.result, _stderr())
        raise _Stopped(str(exc), EXIT_ABORTED, status="aborted", error_type="RunAborted", extra=extra) from None
    except NotResumable as exc:  # (a resumed run's record taken meanwhile by another resume)
        raise _Stopped(str(exc), EXIT_DIAGNOSTICS, status="refused", error_type=exc.kind,
                       extra={"run_id": local.run_id, "run_status": exc.status}, label="refused") from None
    except FileExistsError as exc:  # another run took the run id between the check and the start: nothing ran
        raise _Stopped(str(exc), error_type="RunExists", extra={"run_id": local.run_id}) from None
    except (RecordWriteError, RecordError) as exc:  # the record could not be created or begun: nothing ran
        raise _Stopped(str(exc), error_type="RecordUnwritable", extra={"run_id": local.run_id}) from None
    except (OSError, RuntimeError) as exc:
        raise _Stopped(f"the run stopped: {exc}", EXIT_DIAGNOSTICS, error_type="RuntimeError") from None
    if went is not None:
        went.outcome = outcome
    parked = outcome.parked is not None  # (not over: its process let it go, and `flowdsl resume` goes on with it)
    how = "been parked" if parked else f"ended {outcome.status}"
    ran = f"the run {outcome.run_id} {'was parked' if parked else how}" + (
        f"; its record: {outcome.record_path}" if outcome.record_path else " (not recorded)")
    held.say(how)  # a signal since the run's end changes nothing: said, and the result written whole
    try:
        with held.writing():
            if as_json:
                try:
                    channel.emit(outcome.to_json())
                except OutputError as exc:  # the run ran: say which, and where its record is
                    exc.context.append(ran)
                    raise
            else:
                print_summary(outcome, _stderr())
    except KeyboardInterrupt as exc:  # a second Ctrl-C or SIGTERM since the run's end: the output is cut short
        with contextlib.suppress(KeyboardInterrupt), held.writing():
            held.say(how)
        if as_json:  # as a stdout that cannot be written: exit 3, and stderr says how the run ended
            channel.abandon()
            lost = OutputError(f"{exc}: a second stop signal after the run's end cut it short")
            lost.context.append(ran)
            raise lost from None
        # in text, the summary was for people: the exit code stays the run's, as when stderr cannot be written
        with contextlib.suppress(KeyboardInterrupt), held.writing():
            _stderr().print(f"{_escape(str(exc))}: the summary was cut short; {_escape(ran)}", highlight=False,
                            soft_wrap=True)
    held.say(how)
    return int(outcome.exit_code)


@app.command()
def show(
    run_id: RecordArg,
    runs_dir: RunsDirOpt = None,
    fmt: FormatOpt = OutputFormat.text,
) -> None:
    """Print a recorded run's timeline and summary (--format json: the same object as `run --format json`)."""
    raise typer.Exit(_reporting(fmt is OutputFormat.json, lambda console: _show(run_id, runs_dir, fmt, console)))


def _show(run_id: str, runs_dir: Path | None, fmt: OutputFormat, console: Any) -> int:
    """The body of ``flowdsl show``: 0, or a usage error (:func:`_fail`)."""
    from flowdsl.runtime.rebuild import result_from_record
    from flowdsl.runtime.record import RecordError, find_record, read_record
    from flowdsl.runtime.timeline import print_timeline, record_end_note

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
    from flowdsl.runtime.resolve import resolution_json, resolution_text
    from flowdsl.runtime.stopped import settle
    from flowdsl.shown import visible

    standing = settle(header, lines, outcome)  # a run whose process is gone: crashed, with what is left to undo
    resolution = lines.resolutions[-1] if lines.resolutions else None
    if fmt is OutputFormat.json:
        from flowdsl.runtime.codec import json_line
        from flowdsl.stdio import write_json

        write_json(json_line({**outcome.to_json(), "resolved": resolution_json(resolution)}))
    else:
        print_timeline(outcome, lines, console, standing=standing)
        if resolution is not None:
            console.print(resolution_text(resolution), highlight=False, soft_wrap=True)
        elif not standing.live and (outcome.status == "needs_intervention" or outcome.in_doubt
                                    or (outcome.intervention or {}).get("steps")):
            from flowdsl.runtime.summary import show_command

            resolve = show_command(path).replace("flowdsl show", "flowdsl resolve", 1)
            if standing.crashed or standing.stopped == "aborted":
                resume = show_command(path).replace("flowdsl show", "flowdsl resume", 1)
                from flowdsl.runtime.parking import signal_option

                waiting = sorted((str(w["signal"]), w.get("key") or "") for w in
                                 (outcome.state.get("waits") or {}).values() if w.get("signal") is not None)
                option = signal_option(waiting[0][0], waiting[0][1] or None) if waiting else None
                send = f" — with `{_escape(option)}` to send the signal it waits for" if option else ""
                console.print(f"[dim]`{_escape(resume)}` goes on with the run from where it stopped (the attempts "
                              f"it had in flight run again, with their idempotency keys){send}; or[/]",
                              highlight=False, soft_wrap=True)
            console.print(f"[dim]once it is finished by hand, `{_escape(resolve)} --note TEXT` says so (`flowdsl "
                          "runs` then lists it resolved)[/]", highlight=False, soft_wrap=True)
    if standing.process is not None and not standing.crashed and not standing.closed:
        from flowdsl.shown import visible  # (it quotes the record's host name: on one line, inert)

        console.print(f"[yellow]note[/]: {_escape(visible(standing.process.said))}")
    if lines.cut_short:
        console.print("[yellow]note[/]: the record's last line is incomplete (its process stopped while writing "
                        "it); the run is shown as it stood at the line before")
    early = record_end_note(outcome, lines, standing)
    if early is not None and fmt is OutputFormat.json:  # (in text, the timeline says it)
        from flowdsl.shown import visible

        console.print(f"[yellow]note[/]: {_escape(visible(early))}")
    return 0


@app.command(help=(
    "Go on with a local run whose process stopped before its end, or that was parked, from its record, to its end.\n\n"
    "A run whose process crashed (kill -9, out of memory, a reboot), stopped it at once (a second Ctrl-C) or parked "
    "it (`flowdsl run --park`: it only waited) goes on in this process. The run's state is replayed from its "
    "record. The attempts it had in flight run again, as the same attempt with the same idempotency key (what they "
    "did before is not known: a worker keyed on it does its effect once); its timers are armed again; then the run "
    "goes on as `flowdsl run` would have gone on, and is reported the same way. --signal sends signals to its waits "
    "as it goes on; --cancel cancels it instead, undoing what completed; --park parks it again once it has nothing "
    "left but waiting. A run that ended, still runs, or was resolved by hand is refused. The worker modules are "
    "imported from the current directory, then from the directory of the spec the run was started from (or "
    "--workers-dir).\n\n"
    "With --due instead of RUN_ID, every parked run in the runs directory whose next timer is due — a timer wait's "
    "end, a signal wait's deadline (the run then fails with WaitTimeout), a retry's backoff, the run's timeout — is "
    "resumed, one after another in this process, earliest due first; each goes on to its end or, with --park, until "
    "it is parked again at its next wait. Parked runs not yet due, and those with no timer (only a signal goes on "
    "with them), are left alone; a run another `flowdsl resume` took meanwhile is skipped. A cron job, `* * * * * cd "
    "/srv/app && flowdsl resume --due --park`, so makes a local run's timers durable without a daemon. --signal, "
    "--cancel and --force are for one run. With --format json, stdout carries one line per run taken up: its JSON "
    "object (docs/runtime.md).\n\n"
    "Exit codes:\n"
    "  0    completed\n"
    "  1    failed, compensated or cancelled (nothing in doubt); or the run cannot be resumed: it ended, still runs, "
    "was resolved, or its process cannot be told to be gone (--force)\n"
    "  2    no such record, or one that cannot be read, replayed or written; a usage error\n"
    "  3    the result could not be written to stdout (full, closed, cut short by a second stop signal): stderr "
    "names the run\n"
    "  4    needs intervention (a compensation failed for good, a step completed late, or a step's outcome is in "
    "doubt)\n"
    "  5    parked again (--park): not over; `flowdsl resume` goes on with it\n"
    "  130  stopped at once by a second Ctrl-C or SIGTERM (it can be resumed again)\n"
    "  141  stdout's reader went away (| head)\n\n"
    "With --due the exit code is the gravest of the runs resumed: 4 when one needs intervention or left a step in "
    "doubt; else 1 when one failed, was compensated or cancelled, or could not be resumed (its record cannot be read "
    "or replayed, it is refused, a worker module cannot be imported: said on stderr, and the others go on); else 0 "
    "— every due run completed or was parked again, or none was due. 2 is a usage error or a runs directory that "
    "cannot be read; a run skipped as another `flowdsl resume` took it counts for nothing; 3, 130 and 141 are as "
    "above."))
def resume(
    run_id: Annotated[str | None, typer.Argument(
        help="a run id, or the path of a run record (.jsonl); not with --due", metavar="RUN_ID",
        show_default=False)] = None,
    runs_dir: RunsDirOpt = None,
    workers_dir: Annotated[Path | None, typer.Option(
        "--workers-dir", help="a directory to import the flow's worker modules from, after the current one "
        "\\[default: the directory of the spec the run was started from, as its record names it]", metavar="DIR",
        parser=parse_directory)] = None,
    lm: Annotated[str | None, typer.Option(
        "--lm", help="language model for LLM steps that name none, e.g. openai/gpt-4o-mini", callback=_model)] = None,
    late_grace: Annotated[float | None, typer.Option(
        "--late-grace", help="after the run's end, seconds to wait for a worker still running a step with a "
        "compensation that timed out, as for `flowdsl run` \\[default: $FLOWDSL_LATE_GRACE or 30]", metavar="SECONDS",
        callback=_seconds(*LATE_GRACE_RANGE))] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="resume a run whose process cannot be told to be gone from here (another host): only once "
        "you know it is")] = False,
    fmt: FormatOpt = OutputFormat.text,
    signals: Annotated[list[str] | None, typer.Option(
        "--signal", help="send the signal NAME to the run as it is resumed, with a payload: a JSON object, inline, "
        "from a file (NAME=@FILE) or stdin (NAME=@-); taken at once by its wait if it waits, else kept until it "
        "starts (a deadline that passed while the run stood fires first); a keyed wait's signal is NAME:KEY (the "
        "key ends at the first =); repeatable", metavar="NAME[:KEY][=JSON]")] = None,
    park: Annotated[bool, typer.Option(
        "--park", help="once the run has nothing left but waiting for a signal or a timer, park it again (exit 5), "
        "as `flowdsl run --park` does")] = False,
    cancel: Annotated[bool, typer.Option(
        "--cancel", help="cancel the run as it is resumed (after the timers that fell due while it stood, and the "
        "--signals): its waits end, and what completed is undone")] = False,
    due: Annotated[bool, typer.Option(
        "--due", help="instead of RUN_ID: resume every parked run in the runs directory whose next timer is due, one "
        "after another, earliest due first (with --park, each until it is parked again)")] = False,
) -> None:
    raise typer.Exit(_channelled(fmt is OutputFormat.json, lambda channel: _resume_command(
        channel, run_id, due, runs_dir, workers_dir, lm, late_grace, force, signals or [], park, cancel)))


def _resume_command(channel: _JsonChannel, run: str | None, due: bool, runs_dir: Path | None,
                    workers_dir: Path | None, lm: str | None, late_grace: float | None, force: bool,
                    signal_args: list[str], park: bool, cancel: bool) -> int:
    """The body of ``flowdsl resume``: one run (``RUN_ID``) or those due (``--due``); its exit code, or
    :class:`_Stopped`."""
    if due and run is not None:
        raise _Stopped("RUN_ID and --due exclude each other: give a RUN_ID to resume that run, or --due to resume "
                       "every parked run whose next timer is due")
    if not due:
        if run is None:
            raise _Stopped("missing RUN_ID: give the run to resume (its id, or the path of its record), or --due to "
                           "resume every parked run whose next timer is due")
        return _resume(channel, run, runs_dir, workers_dir, lm, late_grace, force, signal_args, park, cancel)
    for given, option, what in ((signal_args, "--signal", "--signal NAME=JSON` sends a signal to that run"),
                                (cancel, "--cancel", "--cancel` cancels that run"),
                                (force, "--force", "--force` resumes a run whose process cannot be told to be gone "
                                 "(a parked run needs none: its process let it go)")):
        if given:
            raise _Stopped(f"{option} is for one run, not with --due: `flowdsl resume RUN_ID {what}")
    return _resume_due(channel, runs_dir, workers_dir, lm, late_grace, park)


def _resume(channel: _JsonChannel, run: str, runs_dir: Path | None, workers_dir: Path | None, lm: str | None,
            late_grace: float | None, force: bool, signal_args: list[str], park: bool = False,
            cancel: bool = False) -> int:
    """The body of ``flowdsl resume RUN_ID``: its exit code, or :class:`_Stopped`."""
    from flowdsl.runtime.record import RecordError, find_record

    threads = _threads_problem()
    if threads is not None:
        raise _Stopped(threads)
    try:
        path = find_record(run, runs_dir)
    except RecordError as exc:
        raise _Stopped(str(exc), error_type="RecordError") from None
    resumption = _prepared(path, force)
    return _go_on(channel, resumption, runs_dir, workers_dir, lm, late_grace, signal_args, park, cancel)


def _prepared(path: Path, force: bool) -> Any:
    """The run of the record ``path`` read back to be resumed (``.resume.prepare_resumption``); a refusal as
    :class:`_Stopped`: exit 1 for a run that cannot be resumed, 2 for a record that cannot be read or replayed."""
    from flowdsl.runtime.record import NewerRecord, RecordError
    from flowdsl.runtime.resume import NotResumable, prepare_resumption

    try:
        return prepare_resumption(path, force=force)
    except NotResumable as exc:
        raise _Stopped(str(exc), EXIT_DIAGNOSTICS, status="refused", error_type=exc.kind,
                       extra={"run_id": path.name.removesuffix(".jsonl"), "run_status": exc.status},
                       label="refused") from None
    except RecordError as exc:
        raise _Stopped(str(exc), error_type="NewerRecord" if isinstance(exc, NewerRecord) else "RecordError") \
            from None
    except ValueError as exc:  # events that do not replay (as `show` says it)
        raise _Stopped(f"cannot resume the run record {path}: {exc}", error_type="RecordError") from None


def _go_on(channel: _JsonChannel, resumption: Any, runs_dir: Path | None, workers_dir: Path | None,
           lm: str | None, late_grace: float | None, signal_args: list[str], park: bool, cancel: bool, *,
           why: str | None = None, went: _Went | None = None) -> int:
    """Go on with the run read back (``resumption``) to its end, or until it is parked again, reported as ``flowdsl
    run`` reports a run: its exit code, or :class:`_Stopped`. ``why``: a clause saying why it is resumed (``--due``);
    ``went``: told how the run went."""
    from flowdsl.runtime.local import LocalRun
    from flowdsl.runtime.resume import CANCELLED_AS_RESUMED

    signals = _signals(resumption.plan, signal_args, resumption.state, park=park, cancel=cancel)
    if not channel.active:
        from flowdsl.shown import visible

        again = ", ".join(f"{c['step']} (attempt {c['attempt']})" for c in resumption.dispatches)
        _stderr().print(f"resuming run {_escape(visible(resumption.run_id))} ({resumption.was}, "
                        f"{resumption.state['status']})" + (f", {_escape(why)}" if why else "")
                        + (f"; run again: {_escape(visible(again))}" if again else "")
                        + ("; cancelling it" if cancel else ""), highlight=False, soft_wrap=True)
    # the worker modules: from the current directory, then the directory of the spec the record names, or the one
    # given (LocalRun searches the directory a spec file is in)
    spec_path = str(workers_dir / "spec") if workers_dir is not None else resumption.spec

    def make(view: Any) -> Any:
        local = LocalRun(resumption.plan, resumption.run_input, run_id=resumption.run_id,
                         lm=lm if lm is not None else resumption.lm, runs_dir=runs_dir, on_event=view.on_event,
                         on_notice=view.notice, handle_sigint=True, handle_sigterm=True, late_grace=late_grace,
                         spec_path=spec_path, resumption=resumption, signals=signals, park=park)
        if cancel:  # (applied as the run goes on: after the timers that fell due and the signals, as resume_flow's)
            local.cancel(CANCELLED_AS_RESUMED)
        return local

    return _drive_local(channel, resumption.plan, make, resumption.run_id, resumption.events, went)


#: the refusals that say another ``flowdsl resume`` took a run since ``resume --due`` found it due (its record
#: changed, its process runs it, or it ran to its end): the run is skipped
_TAKEN = ("Changed", "StillRunning", "Ended")
#: the exit codes of the runs ``resume --due`` resumed, least grave first (a run parked again counts as 0)
_GRAVITY = (0, 1, 4)


@dataclass
class _DueTally:
    """What ``resume --due`` did: how many runs were ``due`` and how many others are parked (``waiting``); how each
    run resumed went (``ended``: its end state, or ``parked again``, and how many), how many were ``skipped``
    (another resume took them) or ``failed`` to resume, how many were ``left`` as a stop signal ended the command;
    the exit code so far (``code``) and ``stopped``, 130 once a run was stopped at once."""

    due: int
    waiting: int
    ended: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    failed: int = 0
    left: int = 0
    code: int = 0
    stopped: int | None = None

    def count(self, code: int) -> None:
        """Take a run's exit code into the command's: the gravest so far (:data:`_GRAVITY`)."""
        if _GRAVITY.index(code) > _GRAVITY.index(self.code):
            self.code = code

    def said(self, directory: Path) -> str:
        """The line that ends ``resume --due``: how many runs were due, how each went, how many were skipped."""
        resumed = sum(self.ended.values())
        how = f": {', '.join(f'{n} {state}' for state, n in self.ended.items())}" if self.ended else ""
        parts = [f"{self.due} due", f"{resumed} resumed{how}"]
        if self.skipped:
            parts.append(f"{self.skipped} skipped (taken meanwhile by another `flowdsl resume`)")
        if self.failed:
            parts.append(f"{self.failed} could not be resumed")
        if self.left:
            parts.append(f"{self.left} left parked (a stop signal ended the command: the next `flowdsl resume --due` "
                         "takes them)")
        if self.waiting:
            parts.append(f"{self.waiting} other parked run(s) not due")
        return f"parked runs in {directory}: " + "; ".join(parts)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _resume_due(channel: _JsonChannel, runs_dir: Path | None, workers_dir: Path | None, lm: str | None,
                late_grace: float | None, park: bool) -> int:
    """The body of ``flowdsl resume --due``: resume, one after another in this process, each parked run of the runs
    directory whose next timer is due (earliest due first, then by run id), each as ``flowdsl resume RUN_ID``
    would; its exit code (the gravest of the runs', :data:`_GRAVITY`), or :class:`_Stopped` for a usage error or a
    runs directory that cannot be read."""
    import os

    from flowdsl.runtime.due import due_runs
    from flowdsl.runtime.record import runs_dir as records_dir

    threads = _threads_problem()
    if threads is not None:
        raise _Stopped(threads)
    try:
        directory = records_dir(str(runs_dir) if runs_dir is not None else None)
    except ValueError as exc:  # $FLOWDSL_RUNS_DIR set but empty
        raise _Stopped(str(exc)) from None
    errors = _stderr()
    # a cron job that finds nothing due writes nothing (cron mails what a job writes); a person is told
    quiet = not _on_terminal(sys.stderr)
    if not os.path.lexists(directory):
        if not quiet:
            errors.print(f"no parked run is due: {_escape(str(directory))} does not exist (see --runs-dir, "
                         "$FLOWDSL_RUNS_DIR)", highlight=False, soft_wrap=True)
        return 0
    if not os.path.isdir(directory):
        from flowdsl.runtime.record import broken_link

        what = broken_link(directory) if os.path.islink(directory) and not os.path.exists(directory) else \
            "it is not a directory"
        raise _Stopped(f"{directory}: {what}; --runs-dir (or $FLOWDSL_RUNS_DIR) names the directory of run records")
    try:
        found = due_runs(directory, _now_ms(), on_skip=lambda text: errors.print(
            f"[yellow]warning[/]: {_escape(text)}; skipped", highlight=False, soft_wrap=True))
    except OSError as exc:
        raise _Stopped(f"cannot read the directory of run records {directory}: {exc.strerror or exc}") from None
    tally = _DueTally(due=len(found.due), waiting=found.waiting)
    if not found.due:
        if not quiet:
            errors.print(f"no parked run is due in {_escape(str(directory))}"
                         + (f" ({found.waiting} parked: not due yet, or waiting for a signal only)"
                            if found.waiting else ""), highlight=False, soft_wrap=True)
        return 0
    try:
        for n, row in enumerate(found.due):
            if n and not channel.active:
                errors.print()  # (a blank line between the runs' reports)
            if not _resume_due_run(channel, row.run_id, directory, workers_dir, lm, late_grace, park, tally):
                tally.left = len(found.due) - n - 1
                break
    except KeyboardInterrupt:  # (outside a run: the command stops; what it did is said first)
        with contextlib.suppress(KeyboardInterrupt):
            errors.print(_escape(tally.said(directory)), highlight=False, soft_wrap=True)
        raise
    errors.print(_escape(tally.said(directory)), highlight=False, soft_wrap=True)
    return tally.stopped if tally.stopped is not None else tally.code


def _resume_due_run(channel: _JsonChannel, run: str, directory: Path, workers_dir: Path | None, lm: str | None,
                    late_grace: float | None, park: bool, tally: _DueTally) -> bool:
    """``resume --due``'s resumption of the due parked run ``run`` (its record in ``directory``), counted in
    ``tally``: whether the command goes on with the next one (not once a stop signal came: a run cancelled by it —
    only a stop signal cancels a run under --due —, one held after a run's end, or a run stopped at once)."""
    from flowdsl.runtime.due import earliest, timer_said
    from flowdsl.runtime.parking import at_text
    from flowdsl.runtime.report import PARKED_EXIT

    try:
        resumption = _prepared(directory / f"{run}.jsonl", force=False)
    except _Stopped as stop:
        if stop.error_type in _TAKEN:
            _due_skipped(run, stop.message, tally)
        else:
            _due_failed(channel, run, stop, tally)
        return True
    timer = earliest(resumption.timers)
    if resumption.was != "parked" or timer is None or int(timer["due_at"]) > _now_ms():
        if resumption.was != "parked":
            stands = f"{resumption.was}, no longer parked"
        elif timer is None:
            stands = "parked again, with no timer"
        else:
            stands = f"parked again, its next timer due at {at_text(int(timer['due_at']))}"
        _due_skipped(run, f"since it was found due, it went on and is {stands}; nothing was resumed", tally)
        return True
    went = _Went()
    try:
        with _handlers_kept():
            code = _go_on(channel, resumption, directory, workers_dir, lm, late_grace, [], park, False,
                          why=f"due since {at_text(int(timer['due_at']))}: {timer_said(timer)}", went=went)
    except _Stopped as stop:
        if stop.error_type in _TAKEN:  # (another resume took the record between its reading and Resumption.begin)
            _due_skipped(run, stop.message, tally)
            return True
        if stop.code == EXIT_ABORTED:  # a second Ctrl-C or SIGTERM stopped the run at once: so the command
            _due_said(channel, run, stop)
            tally.ended["stopped at once"] = tally.ended.get("stopped at once", 0) + 1
            tally.stopped = EXIT_ABORTED
            return False
        _due_failed(channel, run, stop, tally)
        return True
    outcome = went.outcome
    parked = outcome.parked is not None
    state = "parked again" if parked else str(outcome.status) + (
        " (in doubt)" if code == 4 and outcome.status != "needs_intervention" else "")
    tally.ended[state] = tally.ended.get(state, 0) + 1
    tally.count(0 if code == PARKED_EXIT else code)
    if went.signals or outcome.status == "cancelled":
        _stderr().print(f"[yellow]note[/]: a stop signal came while run {_escape(run)} went on: no further "
                        "due run is resumed", highlight=False, soft_wrap=True)
        return False
    return True


def _due_skipped(run: str, why: str, tally: _DueTally) -> None:
    """A due run another ``flowdsl resume`` took meanwhile: said, and counted for nothing but as skipped."""
    tally.skipped += 1
    _stderr().print(f"[yellow]skipped[/]: run {_escape(run)}, taken meanwhile by another `flowdsl resume`: "
                    f"{_escape(why)}", highlight=False, soft_wrap=True)


def _due_said(channel: _JsonChannel, run: str, stop: _Stopped) -> None:
    """Say why a due run could not be resumed, or stopped, as ``flowdsl resume RUN_ID`` says it (naming the run
    when the message does not), and with ``--format json`` write its object, with its ``run_id``."""
    named = "" if f"run {run}" in stop.message or f"{run}.jsonl" in stop.message else f"run {run}: "
    _stderr().print(f"[red]{stop.label}[/]: {_escape(named + stop.message)}", highlight=False, soft_wrap=True)
    if channel.active:
        channel.emit({"run_id": run, **stop.payload()})


def _due_failed(channel: _JsonChannel, run: str, stop: _Stopped, tally: _DueTally) -> None:
    """A due run that could not be resumed: said (:func:`_due_said`), and counted as exit 1."""
    _due_said(channel, run, stop)
    tally.failed += 1
    tally.count(EXIT_DIAGNOSTICS)
