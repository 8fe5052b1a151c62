"""The commands of the Redis runtime: ``worker``, ``status``, ``runs`` (also of local records), ``workers``,
``cancel``, ``signal`` and ``dead-letters``.

Stage: CLI. Imports :mod:`flowdsl.cli_common`, and ``flowdsl.runtime.redis.commands`` inside each command
(``flowdsl.runtime.redis.listing_workers`` for ``workers``; redis-py is loaded only by a command that talks to
Redis).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from flowdsl.cli_common import (
    GRACE_RANGE,
    LEASE_RANGE,
    RETENTION_RANGE,
    SCHEDULE_TIMEOUT_RANGE,
    Backend,
    FormatOpt,
    OutputFormat,
    PrefixOpt,
    RedisUrlOpt,
    _fail,
    _model,
    _reporting,
    _seconds,
    _stderr,
    _stopping_as_ctrl_c,
    _text,
    _threads_problem,
    app,
)
from flowdsl.render.command import parse_directory  # (typer + stdlib only)

# (their help= texts: see the note above `run` in flowdsl/cli_run.py)

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
    log_format: Annotated[OutputFormat, typer.Option(
        "--log-format", help="the log on stderr as text lines, or as JSON lines (one object per record, with its "
        "run_id and other facts as keys)")] = OutputFormat.text,
    metrics_port: Annotated[int | None, typer.Option(
        "--metrics-port", min=0, max=65535, help="serve Prometheus metrics at http://HOST:PORT/metrics (0: a free "
        "port, said at the start) \\[default: none served]", metavar="PORT")] = None,
    metrics_host: Annotated[str, typer.Option(
        "--metrics-host", help="the address the metrics are served on (with --metrics-port)",
        metavar="HOST")] = "0.0.0.0",
) -> None:
    from flowdsl.runtime.redis.commands import worker_command
    from flowdsl.runtime.redis.serving import WorkerOptions

    threads = _threads_problem()
    if threads is not None:
        raise _fail(threads)
    if metrics_port is None and metrics_host != "0.0.0.0":
        raise typer.BadParameter("--metrics-host is the address of the metrics --metrics-port serves: give "
                                 "--metrics-port too", param_hint="'--metrics-host'")
    try:
        options = WorkerOptions(concurrency=concurrency, burst=burst, lease_s=lease,
                                schedule_timeout_s=schedule_timeout, retention_s=retention, grace_s=grace, lm=lm,
                                llm=not no_llm, snapshot_bytes=snapshot_kb * 1024, max_failures=max_failures,
                                rules=rules, cache_runs=cache_runs)
    except ValueError as exc:  # (the rules version: its range is the kernel's, not imported here)
        raise typer.BadParameter(str(exc), param_hint="'--rules'") from None
    raise typer.Exit(worker_command(url=redis_url, prefix=prefix, modules=list(modules or ()), options=options,
                                    console=_stderr(), verbose=verbose, log_format=log_format.value,
                                    metrics=None if metrics_port is None else (metrics_host, metrics_port)))


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
    "A run record that cannot be read is skipped with a warning. A running Redis run whose waits wait says in its "
    "status what for (its signals by name, timer) and when the first of their timers is due; with --format json, "
    "in its object's waits.\n\n"
    "Exit codes:\n"
    "  0    listed (also when there are none)\n"
    "  2    a bad option, an unreadable directory of records, or Redis unreachable or refusing"))
def runs(
    redis_url: RedisUrlOpt = None,
    prefix: PrefixOpt = None,
    status_filter: Annotated[str | None, typer.Option(
        "--status", help="only runs in this state, any case (submitted, running, completed, compensated, "
        "needs_intervention — those not resolved yet —, resolved, ...; local records also aborted, parked, "
        "crashed, not_started, unrecorded, newer)")] = None,
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
    "List the worker processes serving a prefix on Redis, what each serves and when it was last seen, and the "
    "task queues.\n\n"
    "Each task queue is shown with its depth (entries in it) and its pending entries (delivered, not acknowledged). "
    "A process is live while its heartbeat is recent (three leases); one that stopped gracefully is not listed, one "
    "that died is listed NOT LIVE until the others forget it (ten leases). Queues that no live process serves are "
    "flagged.\n\n"
    "Exit codes:\n"
    "  0    listed (also when no process is live)\n"
    "  2    a bad option, or Redis unreachable or refusing"))
def workers(
    redis_url: RedisUrlOpt = None,
    prefix: PrefixOpt = None,
    fmt: FormatOpt = OutputFormat.text,
) -> None:
    from flowdsl.runtime.redis.listing_workers import workers_command

    as_json = fmt is OutputFormat.json
    raise typer.Exit(_reporting(as_json, lambda console: workers_command(
        url=redis_url, prefix=prefix, as_json=as_json, console=console)))


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


@app.command(name="signal", help=(
    "Send a signal to a Redis run: the wait of its flow that takes it goes on, with the data as its result.\n\n"
    "The signal is checked first (the run exists, a wait of its flow takes NAME, --key is given when that wait is "
    "keyed and only then, the data is a JSON object), then handed to the worker processes, which apply it once "
    "even if one dies meanwhile. It then waits (up to "
    "--timeout) until the run has applied it and says what became of it: received by its wait, kept until its wait "
    "starts, or rejected, with the run's reason. Ctrl-C, SIGTERM or SIGHUP stop the waiting, not the signal; "
    "--no-wait returns once it is sent. Sent again under the same --id (with the same data), a signal is applied at "
    "most once; another signal under an id used already is refused.\n\n"
    "A keyed wait (its `key:`, one instance per item of a for_each) takes its signal with --key, the key of the "
    "instance it is for (a parcel's tracking number, say): sent before that instance has started, the run keeps it "
    "until it starts.\n\n"
    "Exit codes:\n"
    "  0    its wait received it, or keeps it until it starts (with --no-wait: it was sent)\n"
    "  1    the run rejected it (the reason is said): the run is over, or its wait received one already, timed "
    "out or was skipped, or (a keyed wait) a signal for that key is kept already\n"
    "  2    no such run, no wait of its flow takes NAME, --key missing (a keyed wait) or not taken, the data is "
    "not a JSON object, the --id was used for another signal, or Redis cannot be reached\n"
    "  5    not applied within --timeout: it was sent, and is applied once a worker process takes it\n"
    "  130  the waiting was stopped (the signal, once sent, is applied all the same)"))
def signal_(
    run_id: Annotated[str, typer.Argument(help="the run's id", metavar="RUN_ID", show_default=False)],
    name: Annotated[str, typer.Argument(help="the signal's name: a wait's `signal` (by default the wait's id)",
                                        metavar="NAME", show_default=False, callback=_text)],
    redis_url: RedisUrlOpt = None,
    prefix: PrefixOpt = None,
    key: Annotated[str | None, typer.Option(
        "--key", help="the key of the keyed wait's instance the signal is for (the value its `key:` took): needed "
        "for a keyed wait's signal, refused for any other; at most 200 characters", metavar="KEY",
        callback=_text)] = None,
    data: Annotated[str | None, typer.Option(
        "--data", help="the signal's data, a JSON object: the wait's result \\[default: {}]", metavar="JSON",
        callback=_text)] = None,
    data_file: Annotated[str | None, typer.Option(
        "--data-file", help="the signal's data from a JSON file (- for stdin)", metavar="FILE")] = None,
    signal_id: Annotated[str | None, typer.Option(
        "--id", help="the signal's id: sent again under the same id (with the same data), it is applied at most once "
        "(a webhook's delivery id, say); an id is one signal's \\[default: a new one]", metavar="ID",
        callback=_text)] = None,
    no_wait: Annotated[bool, typer.Option(
        "--no-wait", help="return once the signal is sent, without waiting for the run to apply it")] = False,
    timeout: Annotated[float | None, typer.Option(
        "--timeout", help="seconds to wait for the run to apply the signal, 0.1 to 365 days; past them it exits 5 "
        "(the signal stays sent) \\[default: 60]", metavar="SECONDS",
        callback=_seconds(0.1, 365 * 86400.0, "365 days"))] = None,
    fmt: FormatOpt = OutputFormat.text,
) -> None:
    as_json = fmt is OutputFormat.json

    def body(commands: Any, console: Any, ended: list[int]) -> int:
        if no_wait and timeout is not None:
            raise _fail("--timeout and --no-wait do not go together: --no-wait waits for nothing", console=console)
        try:
            payload = commands.read_signal_data(data, data_file)
        except ValueError as exc:
            raise _fail(str(exc), console=console) from None
        return int(commands.signal_command(run_id, name, url=redis_url, prefix=prefix, data=payload,
                                           signal_id=signal_id, wait=not no_wait, as_json=as_json, console=console,
                                           ended=ended, timeout_s=commands.DEFAULT_TIMEOUT_S if timeout is None
                                           else timeout, key=key))

    if no_wait:
        from flowdsl.runtime.redis import commands_signal

        raise typer.Exit(_reporting(as_json, lambda console: body(commands_signal, console, [])))
    raise typer.Exit(_following("signal", run_id, as_json, body))


def _following(command: str, run_id: str, as_json: bool, body: Callable[[Any, Any, list[int]], int]) -> int:
    """Run ``status --follow``, ``cancel --wait`` or ``signal`` (``body(commands module, console, ended)``: for
    ``signal`` the module is ``commands_signal``) so that a stop signal
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
            from flowdsl.runtime.redis import (
                commands,  # (a stop meanwhile, unheld: cli.main says it)
                commands_signal,
            )

            module: Any = commands_signal if command == "signal" else commands
            try:
                if held is not None:  # (a signal that came meanwhile is taken here)
                    signal.pthread_sigmask(signal.SIG_SETMASK, held)
                    held = None
                return _reporting(as_json, lambda console: body(module, console, ended))
            except KeyboardInterrupt:
                if not ended:  # (before the command took it)
                    _reporting(as_json, lambda console: commands.stopped_following(
                        command, run_id, as_json=as_json, console=console, ended=ended))
                return ended[-1]
    finally:
        if held is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _age(value: str) -> float:
    """``--older-than``: seconds, from an age written as ``flowdsl prune --older-than`` takes it (``7d``, ``12h``,
    ``1h30m``, ``90s``: :func:`flowdsl.runtime.prune.parse_age`)."""
    from flowdsl.runtime.prune import parse_age

    try:
        return parse_age(value) / 1000
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command(name="dead-letters", help=(
    "List the messages worker processes set aside because they could not be handled, or put them back, or delete "
    "them.\n\n"
    "A message is set aside when it cannot be read (damaged, or not flowdsl's) or when handling it failed "
    "unexpectedly --max-failures times (`flowdsl worker`); its run waits meanwhile. Once the cause is fixed, "
    "--retry puts it back: it is handled as after a crash. Dead letters are never deleted by themselves: "
    "--delete-all (with --older-than: those older) deletes them; --dry-run shows what it would do.\n\n"
    "Exit codes:\n"
    "  0    done\n"
    "  2    an id names no dead letter, or options that do not go together"))
def dead_letters(
    redis_url: RedisUrlOpt = None,
    prefix: PrefixOpt = None,
    retry: Annotated[list[str] | None, typer.Option(
        "--retry", help="put this dead letter back on its stream (repeatable)", metavar="ID")] = None,
    retry_all: Annotated[bool, typer.Option("--retry-all", help="put every dead letter back (however many)")] = False,
    delete: Annotated[list[str] | None, typer.Option(
        "--delete", help="delete this dead letter for good (repeatable)", metavar="ID")] = None,
    delete_all: Annotated[bool, typer.Option(
        "--delete-all", help="delete every dead letter for good (however many; with --older-than, those older)")
    ] = False,
    older_than: Annotated[float | None, typer.Option(
        "--older-than", help="only dead letters set aside longer ago than this: 7d, 12h, 90m, 1d12h … (with "
        "--delete-all, --retry-all, or a listing)", metavar="DURATION", parser=_age)] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="with --delete-all or --retry-all: list the dead letters it would touch, do nothing")
    ] = False,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=100000,
                                       help="list at most this many, oldest first")] = 100,
    fmt: FormatOpt = OutputFormat.text,
) -> None:
    from flowdsl.runtime.redis.commands import dead_letters_command

    as_json = fmt is OutputFormat.json
    raise typer.Exit(_reporting(as_json, lambda console: dead_letters_command(
        url=redis_url, prefix=prefix, retry=list(retry or ()), retry_all=retry_all, delete=list(delete or ()),
        limit=limit, as_json=as_json, console=console, delete_all=delete_all, older_than_s=older_than,
        dry_run=dry_run)))
