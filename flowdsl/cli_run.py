"""The commands on runs of either backend: ``run`` (in this process — and, with ``--park``, let go once it only
waits —, or submitted to Redis and followed) and ``show`` (a local run's record); and how a local run is driven and
reported, which ``resume`` (:mod:`flowdsl.cli_resume`) shares.

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
