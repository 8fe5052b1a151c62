"""The ``resume`` command: go on with a local run whose process stopped before its end, or that was parked, from its
record — one run by its id, or (``--due``) every parked run whose next timer is due, one after another.

Stage: CLI. Imports :mod:`flowdsl.cli_common`, :mod:`flowdsl.cli_run` (a local run driven and reported as ``flowdsl
run`` drives and reports one, the ``--signal`` options read) and the local runtime inside each command.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from flowdsl.cli_common import (
    EXIT_ABORTED,
    EXIT_DIAGNOSTICS,
    LATE_GRACE_RANGE,
    FormatOpt,
    OutputFormat,
    RunsDirOpt,
    _escape,
    _JsonChannel,
    _model,
    _seconds,
    _stderr,
    _threads_problem,
    app,
)
from flowdsl.cli_run import _channelled, _drive_local, _on_terminal, _signals, _Stopped, _Went
from flowdsl.render.command import parse_directory  # (typer + stdlib only)


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
    "resumed, one after another in this process, earliest due first; each goes on to its end or until it is parked "
    "again at its next wait (--due parks, --park or not: nothing could send a signal to a run going on in the batch, "
    "and the next --due takes up its timers). Parked runs not yet due, and those with no timer (only a signal goes "
    "on with them), are left alone; a run another `flowdsl resume` took meanwhile is skipped, and a record that holds "
    "another run than its name says (a copy) is not resumed. A cron job, `* * * * * cd /srv/app && flowdsl resume "
    "--due`, so makes a local run's timers durable without a daemon. --signal, --cancel and --force are for one "
    "run. With --format json, stdout carries one line per run taken up: its JSON "
    "object (docs/runtime.md).\n\n"
    "Exit codes:\n"
    "  0    completed\n"
    "  1    failed, compensated or cancelled (nothing in doubt); or the run cannot be resumed: it ended, still runs, "
    "was resolved or had not started, went on unrecorded, or its process may run (--force)\n"
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
        "after another, earliest due first, each until its end or until it is parked again")] = False,
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
    return _resume_due(channel, runs_dir, workers_dir, lm, late_grace)


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
                late_grace: float | None) -> int:
    """The body of ``flowdsl resume --due``: resume, one after another in this process, each parked run of the runs
    directory whose next timer is due (earliest due first, then by run id), each as ``flowdsl resume RUN_ID``
    would with ``--park`` (a run going on in the batch could be sent no signal: it is parked at its next wait, and a
    later ``--due`` takes up its timers); its exit code (the gravest of the runs', :data:`_GRAVITY`), or
    :class:`_Stopped` for a usage error or a runs directory that cannot be read."""
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
    skipped: list[str] = []  # (files that are no run record: said when something is due, or to a person)
    try:
        found = due_runs(directory, _now_ms(), on_skip=skipped.append)
    except OSError as exc:
        raise _Stopped(f"cannot read the directory of run records {directory}: {exc.strerror or exc}") from None
    tally = _DueTally(due=len(found.due), waiting=found.waiting)
    if found.due or not quiet:
        for text in skipped:
            errors.print(f"[yellow]warning[/]: {_escape(text)}; skipped", highlight=False, soft_wrap=True)
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
            if not _resume_due_run(channel, row.run_id, directory, workers_dir, lm, late_grace, tally):
                tally.left = len(found.due) - n - 1
                break
    except KeyboardInterrupt:  # (outside a run: the command stops; what it did is said first)
        with contextlib.suppress(KeyboardInterrupt):
            errors.print(_escape(tally.said(directory)), highlight=False, soft_wrap=True)
        raise
    errors.print(_escape(tally.said(directory)), highlight=False, soft_wrap=True)
    return tally.stopped if tally.stopped is not None else tally.code


def _resume_due_run(channel: _JsonChannel, run: str, directory: Path, workers_dir: Path | None, lm: str | None,
                    late_grace: float | None, tally: _DueTally) -> bool:
    """``resume --due``'s resumption of the due parked run ``run`` (its record in ``directory``), counted in
    ``tally``: whether the command goes on with the next one (not once a stop signal came: a run cancelled by it —
    only a stop signal cancels a run under --due —, one held after a run's end, or a run stopped at once)."""
    from flowdsl.runtime.due import earliest, timer_said
    from flowdsl.runtime.parking import at_text
    from flowdsl.runtime.report import PARKED_EXIT
    from flowdsl.shown import visible

    try:
        resumption = _prepared(directory / f"{run}.jsonl", force=False)
    except _Stopped as stop:
        if stop.error_type in _TAKEN:
            _due_skipped(run, stop.message, tally)
        else:
            _due_failed(channel, run, stop, tally)
        return True
    if resumption.run_id != run:  # (a copy of another run's record: both would go on, its steps run twice)
        _due_failed(channel, run, _Stopped(
            f"its record holds run {visible(resumption.run_id)}, not {visible(run)} (a copy of that run's record, or "
            "one renamed?): --due resumes a record only under its own run's name; resume it by its path if you "
            "mean to", error_type="NotItsRun"), tally)
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
            code = _go_on(channel, resumption, directory, workers_dir, lm, late_grace, [], True, False,
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
