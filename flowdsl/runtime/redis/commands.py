"""The CLI's Redis commands: ``run --backend redis``, ``worker``, ``status``, ``runs``, ``cancel``,
``dead-letters``, ``resolve --backend redis`` (``signal``: :mod:`.commands_signal`).

Stage: CLI support for runtime: redis. Imports this package,
``flowdsl.runtime.report``, ``flowdsl.runtime.summary`` and ``flowdsl.runtime.timeline`` (the printers),
``flowdsl.runtime.listing`` (the runs table) and ``flowdsl.workers``; rich only through the
printers and the console the CLI hands in. ``flowdsl.cli``
imports this module inside its command functions only, so ``flowdsl --help``
stays light. Every function returns the exit code; no traceback reaches the
user (a Redis that cannot be reached, a bad URL or an unknown run is one line
on stderr, exit 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import redis

from flowdsl.kernel import NewerVersion
from flowdsl.runtime.codec import json_line
from flowdsl.runtime.redis.client import (
    RUN_STATES,
    DeadLetter,
    DeadLetterNotFound,
    Journal,
    NothingToResolve,
    RedisClient,
    RunGone,
    RunIdTaken,
    RunInfo,
    RunNotFound,
    RunWaits,
    StartRequest,
)
from flowdsl.runtime.redis.connection import (
    TRANSIENT,
    RedisConfigError,
    describe_url,
    refusal,
    resolve_url,
    unreachable_reason,
)
from flowdsl.runtime.redis.serving import WorkerOptions, serving_gc
from flowdsl.runtime.redis.store import RunDamaged
from flowdsl.runtime.redis.upkeep import RESEND_AFTER_LEASES
from flowdsl.runtime.redis.waiting import in_flight, say_in_flight, say_waiting, span, waits
from flowdsl.runtime.redis.worker import RedisWorker
from flowdsl.runtime.report import EXIT_CODES
from flowdsl.runtime.signals import TERM_SIGNALS, give_back_signal, signal_said, take_signal
from flowdsl.runtime.summary import error_console, print_summary
from flowdsl.runtime.timeline import LiveView, print_timeline
from flowdsl.stdio import write_json

__all__ = ["EXIT_USAGE", "cancel_command", "dead_letters_command", "resolve_command", "run_command", "run_events",
           "runs_command", "status_command", "stopped_following", "worker_command"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
_DEAD_LETTER_FAILURES: tuple[type[Exception], ...] = (DeadLetterNotFound, ValueError, redis.RedisError,
                                                         *TRANSIENT)
#: what ``flowdsl runs --status`` takes: before the start, while going, and the end states


class _Failure(Exception):
    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def _say(console: Any, text: str, style: str = "red", label: str = "error") -> None:
    from rich.markup import escape

    error_console(console).print(f"[{style}]{label}[/]: {escape(text)}")


ErrorHook = Callable[[str, str], None]


def _guarded(console: Any, url: str | None, body: Callable[[], Coroutine[Any, Any, int]],
             on_error: ErrorHook | None = None, ended: list[int] | None = None) -> int:
    """Run ``body`` on a new event loop; turn configuration and connection errors into one line and exit 2.
    ``on_error`` is also handed each such line with its error type (``run --format json`` puts them in its one
    JSON object). While the loop runs, SIGTERM and SIGHUP cancel ``body``, as ``asyncio.run`` takes Ctrl-C
    (:func:`_stopped_by_termination`; ``ended``: see there), never raising inside whatever code they land in: the
    stop comes out as ``KeyboardInterrupt`` (with what the signal did), as Ctrl-C does — a command that follows a
    run says it itself (:func:`_following`), the others as ``flowdsl.cli`` says it."""

    async def stoppable() -> int:
        stops: list[int] = []
        with _stopped_by_termination(ended, stops):
            try:
                return await body()
            except asyncio.CancelledError:
                if ended:  # the result is out: the cancel came as the client closed
                    return ended[-1]
                if stops:
                    raise KeyboardInterrupt(signal_said(stops[0])) from None
                raise

    def say(text: str, kind: str = "RedisError") -> None:
        _say(console, text)
        if on_error is not None:
            on_error(kind, text)

    try:
        resolved = resolve_url(url)
    except RedisConfigError as exc:
        say(str(exc))
        return EXIT_USAGE
    try:
        return asyncio.run(stoppable())
    except _Failure as exc:
        say(str(exc))
        return exc.code
    except RunIdTaken as exc:
        say(str(exc), "RunExists")
        return EXIT_USAGE
    except RunDamaged as exc:
        say(str(exc), "RunDamaged")
        return EXIT_USAGE
    except RedisConfigError as exc:
        say(str(exc))
        return EXIT_USAGE
    except (RunNotFound, RunGone, DeadLetterNotFound, ValueError) as exc:
        say(str(exc))
        return EXIT_USAGE
    except redis.AuthenticationError as exc:
        say(f"Redis at {describe_url(resolved)} refused the credentials of the URL: {exc}")
        return EXIT_USAGE
    except TRANSIENT as exc:
        say(f"cannot reach Redis at {describe_url(resolved)}: {unreachable_reason(resolved, exc)}")
        return EXIT_USAGE
    except redis.RedisError as exc:  # Redis answered, and said no (or was not Redis): a configuration error
        say(refusal(resolved, exc))
        return EXIT_USAGE


def _json_out(value: Any) -> None:
    write_json(json_line(value))  # (flushed: an error writing stdout is a flowdsl.stdio.OutputError, not Redis's)


# --- flowdsl run --backend redis ----------------------------------------------------------


def run_command(plan: dict[str, Any], data: dict[str, Any], *, url: str | None, prefix: str | None,
                run_id: str | None, seed: int | None, detach: bool, as_json: bool,
                schedule_timeout_s: float | None, retention_s: float | None, console: Any,
                on_error: ErrorHook | None = None, submitted: list[str] | None = None,
                late_grace: float | None = None) -> int:
    """Submit a run; unless ``detach``, follow it live and print the same summary / JSON as the local runtime
    (``late_grace``: :meth:`RedisClient.follow`'s).
    ``on_error`` is handed the error type and the line said on stderr when the command fails (exit 2) or stops
    following (130); ``submitted`` gets the run id once the run is submitted."""
    given: list[str] = submitted if submitted is not None else []
    ended: list[int] = []

    async def body() -> int:
        async with RedisClient(url, prefix=prefix) as client:
            for warning in await client.server_warnings():  # (a server that evicts keys: runs may vanish)
                _say(console, warning, "yellow", "warning")
            missing = await client.unserved(plan)
            # said once the submission went through: a Redis refusing writes (out of memory) refuses the heartbeats
            # of live workers too, whose records then look stale — the refusal is the news, not "no worker"
            unserved = await _unserved_warning(client, plan, missing, schedule_timeout_s) if missing else None
            sub = await client.submit(plan, data, run_id=run_id, seed=seed, retention_s=retention_s,
                                      schedule_timeout_s=schedule_timeout_s)
            if unserved is not None:
                _say(console, unserved, "yellow", "warning")
            given.append(sub.run_id)
            if not sub.created:
                _say(console, f"run '{sub.run_id}' was already submitted: "
                     + ("it had not started: its start request was sent again" if sub.resent else
                        "nothing new started") + ("" if detach else "; following it"), "yellow", "note")
            if detach:
                ended.append(0)
                if as_json:
                    _json_out({"run_id": sub.run_id, "created": sub.created})
                else:
                    sys.stdout.write(sub.run_id + "\n")
                    sys.stdout.flush()
                    console.print(f"[dim]{'submitted; ' if sub.created else ''}follow it with "
                                  f"`flowdsl status {sub.run_id} --follow`[/]")
                return 0
            return await _follow(client, plan, sub.run_id, as_json, console, ended, late_grace=late_grace)

    def stopped() -> None:
        _interrupted(console, given[-1] if given else run_id)
        if on_error is not None:
            on_error("Interrupted", _STOPPED_FOLLOWING)

    return _following(console, url, body, ended, stopped, on_error)


#: at most this many of the workers no live process serves are named one by one in ``run``'s warning
_UNSERVED_SHOWN = 4


async def _unserved_warning(client: RedisClient, plan: dict[str, Any], missing: list[str],
                            schedule_timeout_s: float | None) -> str:
    """``run``'s warning that a submitted run will wait (or fail, with a schedule-to-start deadline): one sentence
    when no worker process is connected at all, else the first few workers nobody serves and how many more."""
    modules = " ".join(f"-w {module}" for module in plan.get("flow", {}).get("workers") or ()) or "-w MODULE"
    if not await client.workers():
        then = f"fail after {schedule_timeout_s:g} s (--schedule-timeout)" if schedule_timeout_s else \
            "wait until one is"
        return (f"no worker process is connected (prefix '{client.keys.prefix}'): the run's steps {then}; start "
                f"one with `flowdsl worker {modules}`")
    then = f"fails after {schedule_timeout_s:g} s (--schedule-timeout)" if schedule_timeout_s else \
        f"waits until one does (start `flowdsl worker {modules}`, or set --schedule-timeout)"
    shown = missing[:_UNSERVED_SHOWN]
    if len(missing) > len(shown):
        shown.append(f"{len(missing) - len(shown)} more")
    return f"no live worker process serves {'; '.join(shown)}: the step {then}"


#: what following a run says when a stop signal ended it (``run --backend redis``, ``status --follow``)
_STOPPED_FOLLOWING = "stopped following; the run itself goes on, in Redis"


async def _follow(client: RedisClient, plan: dict[str, Any], run_id: str, as_json: bool, console: Any,
                  ended: list[int], notes: bool = False, late_grace: float | None = None,
                  over: list[str] | None = None) -> int:
    """Follow a run live to its end (what happened so far first), then print its summary or JSON; its exit code,
    also appended to ``ended`` as the summary or JSON is printed (see :func:`_following`, which runs it).
    ``notes``: the JSON also lists the late results rejected (``rejected_late_results``), the run's dead
    letters (``dead_letters``), its resolution (``resolved``) and the attempts in flight (``in_flight``, none), as
    ``status`` does. ``over`` gets the run's end
    state once following has it."""
    view = LiveView(plan, mode="off" if as_json else "auto", console=console)
    journal = Journal()
    with view:
        result = await client.follow(run_id, on_event=view.on_event, on_notice=view.notice, journal=journal,
                                     late_grace=late_grace)
    if over is not None:
        over.append(result.status)
    out = result.to_json() if as_json else None
    if out is not None and notes:
        out["rejected_late_results"] = journal.notes
        out["dead_letters"] = await _dead_letters_of(client, run_id)
        out["resolved"] = _resolution((await client.info(run_id)).status, journal) if journal.resolutions else None
        out["in_flight"] = out["waiting"] = []  # (as `status` has it: the run has ended)
    ended.append(result.exit_code)  # (before printing: a signal now changes nothing, even mid-output)
    if out is not None:
        _json_out(out)
    else:
        print_summary(result, console)
    return result.exit_code


def _following(console: Any, url: str | None, body: Callable[[], Coroutine[Any, Any, int]], ended: list[int],
               stopped: Callable[[], None], on_error: ErrorHook | None = None) -> int:
    """Run the body of a command that follows a run (``run --backend redis``, ``status --follow``,
    ``cancel --wait``) as :func:`_guarded` does, with the stop signals taken as Ctrl-C.

    ``body`` appends its exit code to ``ended`` when it has its result and prints it. Until then, a Ctrl-C,
    SIGTERM or SIGHUP at any moment stops the command: the loop's task is cancelled (SIGTERM, SIGHUP:
    :func:`_stopped_by_termination`; Ctrl-C: ``asyncio.run``'s own handler), or a ``KeyboardInterrupt`` is raised
    outside the loop (``flowdsl.cli`` makes SIGTERM and SIGHUP raise it there), and ``stopped()`` says so (the
    hint; the JSON object), exit 130, which is appended to ``ended`` before. Once ``ended`` holds a code, a stop
    signal changes nothing: that code is the exit code (``flowdsl.cli`` returns it too, when the signal
    lands after this returned)."""
    try:
        code = _guarded(console, url, body, on_error, ended)
    except KeyboardInterrupt:  # (Ctrl-C, or SIGTERM or SIGHUP, in the loop or outside it)
        code = EXIT_INTERRUPTED
    if ended:
        return ended[-1]
    if code == EXIT_INTERRUPTED:
        ended.append(code)
        stopped()
    return code


def stopped_following(command: str, run_id: str, *, as_json: bool, console: Any, ended: list[int]) -> int:
    """Say that a following command (``status`` with ``--follow``, ``cancel`` with ``--wait``, ``signal`` unless
    ``--no-wait``) was stopped by a signal before it reached its body (while ``flowdsl.cli`` loaded this module): as
    it says it once running; exit 130 (appended to ``ended``)."""
    ended.append(EXIT_INTERRUPTED)
    if command == "signal":
        from flowdsl.runtime.redis.commands_signal import signal_stopped

        signal_stopped(console, run_id, as_json, None)
    elif command == "cancel":
        _cancel_stopped(console, run_id, as_json, None)
    else:
        _status_stopped(console, run_id, as_json, None)
    return EXIT_INTERRUPTED


def _stopped_json(run_id: str, message: str) -> None:
    """The one JSON object of a following command that a stop signal ended, as ``run --backend redis`` gives
    it (docs/runtime.md)."""
    _json_out({"status": "error", "run_id": run_id, "error": {"type": "Interrupted", "message": message}})


def _status_stopped(console: Any, run_id: str, as_json: bool, over: str | None) -> None:
    """``status --follow`` stopped by a signal; ``over``: the run's end state when following had seen it end (the
    signal came as the rest of its result was read)."""
    if over is None:
        _interrupted(console, run_id)
        said = _STOPPED_FOLLOWING
    else:
        said = f"stopped before the result was printed; the run has ended {over}"
        _say(console, f"{said} (`flowdsl status {run_id}` shows it)", "yellow", "interrupted")
    if as_json:
        _stopped_json(run_id, said)


def _cancel_stopped(console: Any, run_id: str, as_json: bool, outcome: str | None) -> None:
    """``cancel --wait`` stopped by a signal; ``outcome``: Redis's answer to the cancel request, None before it
    came (the request may have been made, or not)."""
    if outcome == "requested":
        said = "stopped waiting; the cancel was requested and the run goes on to its end in the worker processes"
        hint = f"`flowdsl status {run_id} --follow` to see it end"
    elif outcome is not None:  # (the run was over: nothing was requested)
        said = "stopped; the run is already over: nothing to cancel"
        hint = f"`flowdsl status {run_id}` shows it"
    else:
        said = "stopped before Redis confirmed the cancel request: the run may not have been asked to cancel"
        hint = f"`flowdsl status {run_id}` says whether it was; `flowdsl cancel {run_id} --wait` asks again"
    _say(console, f"{said} ({hint})", "yellow", "interrupted")
    if as_json:
        _stopped_json(run_id, said)


@contextlib.contextmanager
def _stopped_by_termination(ended: list[int] | None, stops: list[int]) -> Iterator[None]:
    """SIGTERM and SIGHUP stop the command as Ctrl-C does under ``asyncio.run``: they cancel the current task
    (appending the signal to ``stops``), instead of killing the process mid-output or raising inside whatever
    code they land in. Once ``ended`` holds an exit code (the command has its result), they change nothing. In
    the main thread only; an ignored signal is left ignored; the handlers found are put back after
    (:mod:`flowdsl.runtime.signals`)."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()

    def stop(signum: int) -> None:
        if task is not None and not ended:
            stops.append(signum)
            task.cancel()

    taken: list[int] = []
    if threading.current_thread() is threading.main_thread() and task is not None:
        taken = [signum for signum in TERM_SIGNALS if take_signal(loop, signum, stop)]
    try:
        yield
    finally:
        for signum in reversed(taken):
            give_back_signal(loop, signum, stop)


def _interrupted(console: Any, run_id: str | None) -> None:
    """Say that following ``run_id`` stopped (a stop signal), and how to follow it again or cancel it."""
    rid = run_id or "RUN_ID"  # (a Ctrl-C before the run was submitted: no id to name)
    _say(console, f"{_STOPPED_FOLLOWING} (`flowdsl status {rid} --follow`, `flowdsl cancel {rid}`)", "yellow",
         "interrupted")


# --- flowdsl diagram --run RUN_ID --redis-url URL -----------------------------------------------


def run_events(run_id: str, *, url: str | None, prefix: str | None, console: Any) -> list[dict[str, Any]] | None:
    """A Redis run's kernel events as journaled so far (for drawing its states), or None after saying why."""
    events: list[dict[str, Any]] = []

    async def body() -> int:
        async with RedisClient(url, prefix=prefix) as client:
            _, journal = await client.result(run_id)
            events.extend(journal.events)
        return 0

    return events if _guarded(console, url, body) == 0 else None


# --- flowdsl worker --------------------------------------------------------------------------


def worker_command(*, url: str | None, prefix: str | None, modules: list[str], options: WorkerOptions,
                   console: Any, verbose: bool = False, log_format: str = "text",
                   metrics: tuple[str, int] | None = None) -> int:
    """Serve the registered workers (and advance runs) until SIGTERM, or until drained with ``burst``.

    ``log_format`` ``json``: the process's log, and the lines it prints for people, as JSON lines on stderr
    (:mod:`flowdsl.runtime.logformat`). ``metrics``: (host, port) to serve Prometheus metrics at
    (:mod:`flowdsl.runtime.redis.metrics`)."""
    import os

    from flowdsl.runtime.logformat import LogConsole, configure
    from flowdsl.runtime.redis.connection import resolve_prefix
    from flowdsl.stdio import not_output
    from flowdsl.workers import WorkerImportError, import_worker_modules
    from flowdsl.workers import registry as default_registry

    not_output()  # (a worker's own output is its log, on stderr: stdout is the steps' to print to, or not)
    level = logging.DEBUG if verbose else logging.INFO
    if log_format == "json":  # (from the first line on: an error importing the modules is a JSON line too)
        configure("json", level)
        console = LogConsole(logging.getLogger("flowdsl.worker"))
    before = default_registry.names()
    try:
        import_worker_modules(modules, os.getcwd())
    except WorkerImportError as exc:
        _say(console, str(exc))
        return EXIT_USAGE
    # after the imports: text mode keeps the handlers a worker module set up; JSON mode replaces them (again: a
    # module may have added one, or called basicConfig(force=True), while it was imported)
    configure(log_format, level)
    if not default_registry.names() and not options.llm:
        _say(console, "no worker is registered (give modules with -w) and --no-llm is set: nothing to serve")
        return EXIT_USAGE
    idle = [m for m in modules if not any(w.module == m or w.module.startswith(m + ".") for w in map(
        default_registry.get, default_registry.names()) if w is not None)]
    if modules and idle and default_registry.names() == before:  # (none new: a module may register another's)
        _say(console, f"the module(s) {', '.join(idle)} registered no worker (no @worker function): this "
             "process runs no step of theirs; it starts runs, fires timers" + (" and runs LLM steps" if options.llm
                                                                                else ""), "yellow", "warning")

    async def body() -> int:
        worker = RedisWorker(url, prefix=resolve_prefix(prefix), options=options)
        console.print(f"[bold]flowdsl worker[/] {worker.name}: {len(default_registry.names())} worker(s) "
                      f"from {', '.join(modules) or 'no module'}; Redis {describe_url(resolve_url(url))}, "
                      f"prefix {worker.keys.prefix!r}" + (" (burst)" if options.burst else ""))
        server = None
        if metrics is not None:
            from flowdsl.runtime.redis.metrics import serve_metrics

            host, port = metrics
            try:
                server = serve_metrics(worker, port, host)
            except OSError as exc:
                raise _Failure(f"cannot serve metrics at {host or '*'}:{port} (--metrics-host, --metrics-port): "
                               f"{exc.strerror or exc}", EXIT_USAGE) from None
            console.print(f"[dim]metrics at {server.url}[/]")
        try:
            stats = await worker.serve()
        finally:
            if server is not None:
                await asyncio.to_thread(server.close)  # (it waits for the server's thread: not on the loop)
                await server.metrics.aclose()
        console.print(f"[dim]worker {stats.name} stopped: {stats.tasks} step(s) run, {stats.runs_started} run(s) "
                      f"started, {stats.timers} timer(s) fired, {stats.reclaimed} reclaimed, "
                      f"{stats.handed_back} handed back, {stats.rejected} late result(s) rejected"
                      + (f", {stats.expired} attempt(s) not started: timed out before pickup" if stats.expired
                         else "")
                      + (f", {stats.dead_letters} message(s) set aside as dead letters" if stats.dead_letters else "")
                      + (f", {stats.starts_resent} start request(s) sent again" if stats.starts_resent else "")
                      + "[/]")
        if stats.failure is not None:  # it stopped by itself: a supervisor should see a failure and restart it
            _say(console, f"worker {stats.name} stopped because {stats.failure}")
            return 1
        return 0

    with serving_gc():
        return _guarded(console, url, body)


# --- flowdsl status / runs / cancel -------------------------------------------------------------


def status_command(run_id: str, *, url: str | None, prefix: str | None, as_json: bool, console: Any,
                   follow: bool = False, ended: list[int] | None = None) -> int:
    """Print a run's timeline and summary (JSON: the ``run --format json`` object). Exit 0 when found.

    ``follow``: show the run live until it ends, as ``run`` does, and exit as ``run`` does (by its end state);
    a stop signal before the result is printed ends it as it ends ``run`` (:func:`_following`: exit 130, the
    hint, the JSON object). ``ended`` gets the exit code once the result (or that it stopped) is printed.
    """
    if follow:
        done: list[int] = ended if ended is not None else []
        over: list[str] = []

        async def following() -> int:
            async with RedisClient(url, prefix=prefix) as client:
                try:
                    return await _damage_named(client, run_id, _follow(
                        client, await _damage_named(client, run_id, client.plan_of(run_id)), run_id, as_json, console,
                        done, notes=True, over=over))
                except RunDamaged as exc:
                    return _damaged(console, run_id, exc, await _dead_letters_of(client, run_id), as_json)

        return _following(console, url, following, done,
                          lambda: _status_stopped(console, run_id, as_json, over[-1] if over else None))

    async def body() -> int:
        async with RedisClient(url, prefix=prefix) as client:
            info = await client.info(run_id)
            letters = await client.dead_letters_of(run_id)  # (they need no state: said for a damaged run too)
            dead = [letter.id for letter in letters]
            try:
                result, journal = await _damage_named(client, run_id, client.result(run_id))
            except RunDamaged as exc:
                return _damaged(console, run_id, exc, dead, as_json)
            start = await client.start_request(run_id) if result is None else None
            live = await client.workers() if start is not None and start.state in ("queued", "unknown") else None
            going = result is not None and result.status not in EXIT_CODES
            attempts = await in_flight(client, run_id, journal) if going else []
            waiting_now = waits(result.plan, result.state, await _server_now(client)) \
                if result is not None and going and result.state.get("waits") else []
            if any(w.due_in_ms is not None and w.due_in_ms <= 0 for w in waiting_now):  # (overdue: is any process
                live = await client.workers()  # live to fire it?)
            modules = list((await client.plan_of(run_id)).get("flow", {}).get("workers") or ()) \
                if any(not a.served_by and a.process is None for a in attempts) else []
        them = "it" if len(dead) == 1 else "them"
        waiting = f"`flowdsl dead-letters` shows {them} and puts {them} back"
        signals = [letter.id for letter in letters if letter.stream == client.keys.signals]
        others = [dead_id for dead_id in dead if dead_id not in signals]
        if result is None:
            if as_json:
                _json_out({"run_id": run_id, "status": info.status, "submitted_at": info.submitted_at,
                           "dead_letters": dead, "start_request": start.to_json() if start is not None else None})
            elif dead:
                console.print(f"run {run_id}: {info.status} — its start request is a dead letter ({', '.join(dead)}): "
                              f"{waiting}")
            else:
                _say_not_started(console, run_id, info.status, start, live)
            return 0
        resolved = _resolution(info.status, journal)
        if as_json:
            out = result.to_json()
            out["rejected_late_results"] = journal.notes
            out["dead_letters"] = dead
            out["resolved"] = resolved
            out["in_flight"] = [a.to_json() for a in attempts]
            out["waiting"] = [w.to_json() for w in waiting_now]
            _json_out(out)
            return 0
        print_timeline(result, _timeline(journal), console, live=result.status not in EXIT_CODES)
        _say_resolution(console, run_id, result.status, resolved)
        for note in journal.notes:
            _say(console, f"late {note.get('result_type')} for {note.get('task_id')} from {note.get('worker')} "
                 "rejected: its lease had expired and another worker held the task", "dim", "note")
        if others:
            them = "it" if len(others) == 1 else "them"
            _say(console, f"{len(others)} message(s) of this run could not be handled and were set aside as dead "
                 f"letters ({', '.join(others)}); the run waits for {them}: `flowdsl dead-letters` shows {them} and "
                 f"puts {them} back", "yellow", "note")
        if signals:
            them = "it" if len(signals) == 1 else "them"
            _say(console, f"{len(signals)} signal message(s) sent to this run could not be handled and were set aside "
                 f"as dead letters ({', '.join(signals)}): the run did not get {them} and does not wait for {them} "
                 f"(`flowdsl dead-letters` shows {them}, and puts {them} back once fixed)",
                 "yellow", "note")
        if result.status not in EXIT_CODES:
            say_in_flight(console, attempts, modules)
            say_waiting(console, run_id, waiting_now, None if live is None else len(live))
            console.print(f"[cyan]still {result.status}[/] (`flowdsl status {run_id} --follow` to see it to its end)")
        return 0

    return _guarded(console, url, body)


async def _server_now(client: RedisClient) -> int:
    """The Redis server's clock (ms): the clock of a run's times."""
    secs, micros = await client.redis.time()
    return int(secs) * 1000 + int(micros) // 1000


def _say_not_started(console: Any, run_id: str, status: str, start: StartRequest | None,
                     live: list[dict[str, Any]] | None) -> None:
    """``status`` of a run not started: where its start request is, and what that means (docs/runtime.md, "A
    submission never started")."""
    from rich.markup import escape

    age = f"submitted {_ago(start.age_ms)} ago" if start is not None else "submitted"
    if start is None or start.state == "started":  # (started since it was read: `status` again shows it)
        said = "waiting for a worker process to start it"
    elif start.state == "missing":
        said = (f"{age}, and no start request for it is waiting (none in the control stream, none set aside): "
                + ("its submitter may still be sending it" if start.age_ms < 10_000 else
                   "its submitter stopped between recording the run and sending its start request (killed, out of "
                   "memory, its connection cut), or Redis lost the request")
                + f". Worker processes send it again once the run is {RESEND_AFTER_LEASES} leases old (`flowdsl "
                  "worker --lease`, 30 s by default: 5 min), within a minute; it then starts — or ends cancelled, if "
                  "a cancel was requested. `flowdsl cancel` of it sends it at once; from Python, "
                  "`RedisClient.resend_start` (nothing else is needed: the run's plan and input are in Redis)")
    elif start.state == "pending" and start.deliveries > 1:
        said = (f"{age}; its start request was read {start.deliveries} times by worker processes that left it "
                f"unhandled (last by {start.consumer}): a run of a newer flowdsl waits for an upgraded worker, "
                "and the workers' log says why")
    elif start.state == "pending":
        said = f"{age}; a worker process ({start.consumer}) is starting it"
    else:  # queued, or unknown (a backlog too long to read through)
        said = f"{age} — waiting for a worker process to start it" + (
            " (its start request is queued)" if start.state == "queued" else
            " (the control stream is a backlog of start requests)")
        if not live:
            said += ("; no worker process is connected to this Redis under this prefix: start one with "
                     "`flowdsl worker`")
    console.print(f"run {escape(run_id)}: {escape(status)} — {escape(said)}", highlight=False, crop=False,
                  soft_wrap=True)


def _ago(ms: int) -> str:
    return span(ms, tenths=False)


def _resolution(listed: str, journal: Journal) -> dict[str, Any] | None:
    """The run's resolution as ``status --format json`` gives it (``at``, ``by``, ``note``, ``status``): its last
    ``resolved`` journal entry, unless the run needs a person again since (a late completion ended it
    ``needs_intervention`` after it was resolved: ``listed`` says so), else None."""
    if not journal.resolutions or listed == "needs_intervention":
        return None
    last = journal.resolutions[-1]
    return {"at": last.get("at"), "by": last.get("by"), "note": last.get("note") or None,
            "status": last.get("status")}


def _say_resolution(console: Any, run_id: str, status: str, resolved: dict[str, Any] | None) -> None:
    """After a run's timeline: who resolved it, when and why; or, for one that needs a person, how to say it is
    done."""
    from rich.markup import escape

    from flowdsl.shown import visible

    if resolved is not None:
        at = resolved.get("at")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at / 1000)) if isinstance(at, int) else "?"
        note = resolved.get("note")
        console.print(f"[green]resolved[/] {when} by {escape(visible(resolved.get('by') or '?'))}"
                      + (f": {escape(visible(note))}" if note else ""), highlight=False, crop=False, soft_wrap=True)
    elif status == "needs_intervention":
        console.print(f"[dim]kept in Redis until resolved: once it is finished by hand, `flowdsl resolve "
                      f"{escape(run_id)} --backend redis --note TEXT` says so (its retention applies from then on)[/]",
                      highlight=False, crop=False, soft_wrap=True)


_T = TypeVar("_T")


async def _damage_named(client: RedisClient, run_id: str, reading: Awaitable[_T]) -> _T:
    """``await reading`` (a read of the run); when it fails to decode what the run has stored, the
    :class:`RunDamaged` naming the key and field (found by :meth:`Store.damage` when the read did not say)."""
    try:
        return await reading
    except RunDamaged:
        raise
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, NewerVersion):
            raise
        damage = await client.store.damage(run_id)
        if damage is None:
            raise
        raise damage from None


def _damaged(console: Any, run_id: str, exc: RunDamaged, dead: list[str], as_json: bool) -> int:
    """Say that the run cannot be read (its stored data is damaged), and name its dead letters: exit 2."""
    if as_json:
        _json_out({"status": "error", "run_id": run_id, "error": {"type": "RunDamaged", "message": str(exc)},
                   "dead_letters": dead})
    _say(console, str(exc))
    if dead:
        them = "it" if len(dead) == 1 else "them"
        _say(console, f"{len(dead)} message(s) of this run were set aside as dead letters ({', '.join(dead)}): once "
             f"the run's data is repaired, `flowdsl dead-letters --retry ID` puts {them} back", "yellow", "note")
    return EXIT_USAGE


async def _dead_letters_of(client: RedisClient, run_id: str) -> list[str]:
    """The ids of the run's dead letters."""
    return [letter.id for letter in await client.dead_letters_of(run_id)]


def _timeline(journal: Any) -> list[dict[str, Any]]:
    """Input and emitted events in journal order (what ``print_timeline`` reads): each journal entry's input,
    then the events it caused. (Not by their times: an input's ``at`` is when it was written, which can be
    before the events of an entry journalled ahead of it, e.g. a cancel requested before the run started.)"""
    return list(journal.timeline)


def _local_runs_dir() -> str:
    from flowdsl.runtime.record import runs_dir

    try:
        return str(runs_dir())
    except ValueError:  # $FLOWDSL_RUNS_DIR set but empty
        return ".flowdsl/runs"


def runs_command(*, url: str | None, prefix: str | None, limit: int, status: str | None, flow: str | None,
                 as_json: bool, console: Any) -> int:
    """List recent runs with their states, newest first. ``status``: a run state (any case), else exit 2."""
    if status is not None:
        wanted = status.strip().lower()
        if wanted not in RUN_STATES:
            _say(console, f"--status {status!r} is not a run state: use one of {', '.join(RUN_STATES)}")
            return EXIT_USAGE
        status = wanted

    async def body() -> int:
        async with RedisClient(url, prefix=prefix) as client:
            items = await client.runs(limit=limit, status=status, flow=flow)
            where = f"{describe_url(resolve_url(url))} under the prefix '{client.keys.prefix}'"
        if as_json:
            _json_out([i.to_json() for i in items])
            return 0
        _print_runs(items, console, where, status=status, flow=flow)
        return 0

    unreachable: list[str] = []
    code = _guarded(console, url, body, on_error=lambda kind, text: unreachable.append(text)
                    if text.startswith("cannot reach Redis") else None)
    if unreachable and url is None and "FLOWDSL_REDIS_URL" not in os.environ:
        # the built-in default server, which may never have been set up: the user may run flows locally
        _say(console, "runs of the local runtime (the default of `flowdsl run`) are listed by "
             "`flowdsl runs --backend local`", "yellow", "note")
    return code


def _print_runs(items: list[RunInfo], console: Any, where: str = "", *, status: str | None = None,
                flow: str | None = None) -> None:
    """The runs table (``flowdsl.runtime.listing.print_runs``), a running run that waits with what it waits for
    in its status: ``running (paid, timer; due 12-05 18:30:00)``."""
    from dataclasses import replace

    from rich.markup import escape

    from flowdsl.runtime.listing import print_runs

    if not items:  # (a user of the local runtime asks here too: its runs are records, listed by --backend local)
        which = " and ".join(f"{name} {value!r}" for name, value in (("status", status), ("flow", flow)) if value)
        which = escape(f" with {which}" if which else "")
        console.print(f"no runs{which} in Redis at {escape(where)} (runs of the local runtime are records in "
                      f"{escape(_local_runs_dir())}: `flowdsl runs --backend local`)" if where else "no runs")
        return
    print_runs([replace(i, status=f"{i.status} ({_waits_cell(i.waits)})") if i.waits is not None else i
                for i in items], console)


def _waits_cell(waits: RunWaits) -> str:
    """What a run waits for, in its listing line: each signal by its name, ``timer`` for its timer waits (once),
    then when the first of their timers is due (local time, as ``submitted``): ``paid, timer; due 12-05
    18:30:00`` — as a parked local run's line says it."""
    names = [*waits.signals, *(["timer"] if waits.timers else [])]
    due = waits.due_at
    when = f"due {time.strftime('%m-%d %H:%M:%S', time.localtime(due / 1000))}" if due is not None else ""
    return "; ".join(part for part in (", ".join(names), when) if part)


def cancel_command(run_id: str, *, url: str | None, prefix: str | None, reason: str, wait: bool, as_json: bool,
                   console: Any, ended: list[int] | None = None) -> int:
    """Ask for a run's cancellation (its completed steps are compensated). Exit 0 requested, 1 already over; with
    ``wait``, 4 when the run ended needs_intervention or with a step in doubt (something to undo by hand).

    With ``wait`` it follows the run as ``status --follow`` does: a stop signal before the result is printed ends
    it as it ends ``run`` (:func:`_following`: exit 130, the hint, the JSON object; the run goes on). ``ended``
    gets the exit code once the result (or that it stopped) is printed."""
    done: list[int] = ended if ended is not None else []
    answered: list[str] = []  # Redis's answer to the request, once it came

    async def body() -> int:
        left_by_hand = False
        async with RedisClient(url, prefix=prefix) as client:
            outcome = await client.cancel(run_id, reason)
            answered.append(outcome)
            status = (await client.info(run_id)).status
            resent = False
            if outcome == "requested" and status == "submitted" and \
                    (await client.start_request(run_id)).state == "missing":
                # its submitter never sent the start request (docs/runtime.md, "A submission never started"):
                # sent now, so that the cancel is applied (a second request, if one was sent meanwhile, is harmless)
                resent = await client.resend_start(run_id)
            if outcome == "requested" and status == "submitted" and not as_json:
                console.print(f"[dim]run {run_id} has not started: the worker process that starts it ends it "
                              "cancelled at once, without running a step"
                              + (" (its start request, which its submitter never sent, was sent now)" if resent
                                 else "") + "[/]")
            if outcome == "requested" and wait:
                result = await client.follow(run_id, on_notice=lambda text: _say(console, text, "yellow", "note"))
                status = result.status
                left_by_hand = result.exit_code == EXIT_CODES["needs_intervention"]
            code = 1 if outcome == "finished" else EXIT_CODES["needs_intervention"] if left_by_hand else 0
            done.append(code)  # (printed before the client closes, with nothing awaited in between: see _following)
            if as_json:
                _json_out({"run_id": run_id, "cancel": outcome, "status": status})
            elif outcome == "finished":
                _say(console, f"run {run_id} is already over ({status}): nothing to cancel", "yellow", "note")
            else:
                console.print(f"cancel of run {run_id} requested" + (f"; it ended {status}" if wait else ""))
            return code

    if not wait:
        return _guarded(console, url, body)
    return _following(console, url, body, done,
                      lambda: _cancel_stopped(console, run_id, as_json, answered[-1] if answered else None))


def resolve_command(run_id: str, *, url: str | None, prefix: str | None, note: str | None, as_json: bool,
                    console: Any) -> int:
    """Record that a person has finished a run that needed one — it ended ``needs_intervention``, or ended while a
    worker still held an attempt it gave up on (in doubt) — with ``note`` (:meth:`RedisClient.resolve`): its
    retention applies from now on, and ``runs`` lists it ``resolved``. Exit 0 resolved; 1 the run needs no
    resolving (it did not end so, or was resolved already: said on stderr); 2 no such run, a note that is not
    text, or Redis cannot be reached or refuses. JSON: ``{"run_id", "status", "resolved": {"at", "by", "note",
    "status"}}``; when there was nothing to resolve, ``resolved`` is null and ``reason`` says why."""

    async def body() -> int:
        async with RedisClient(url, prefix=prefix) as client:
            try:
                done = await client.resolve(run_id, note)
            except NothingToResolve as exc:
                status = "resolved" if exc.resolved_at is not None and exc.status == "needs_intervention" \
                    else exc.status
                if as_json:
                    _json_out({"run_id": run_id, "status": status, "resolved": None, "reason": str(exc)})
                _say(console, str(exc), "yellow", "note")
                return 1
        status = "resolved" if done.status == "needs_intervention" else done.status
        if as_json:
            _json_out({"run_id": run_id, "status": status, "resolved": done.to_json()})
        else:
            console.print(f"run {run_id} resolved (it had ended {done.status}): its retention applies from now on",
                          highlight=False)
        return 0

    return _guarded(console, url, body)


def dead_letters_command(*, url: str | None, prefix: str | None, retry: list[str], retry_all: bool,
                         delete: list[str], limit: int, as_json: bool, console: Any, delete_all: bool = False,
                         older_than_s: float | None = None, dry_run: bool = False) -> int:
    """List the dead letters (oldest first), or put some back on their streams, or delete some. Exit 0; 2 when
    an id names no dead letter (those before it are done), for options that do not go together, or when Redis
    cannot be reached.

    ``delete_all``/``retry_all``: every dead letter (whatever ``limit`` says), or with ``older_than_s`` those set
    aside longer ago than that (which alone filters the listing); ``dry_run``: say what they would do, do
    nothing."""
    said = _dead_letter_usage(retry, retry_all, delete, delete_all, older_than_s, dry_run)
    if said is not None:
        _say(console, said)
        return EXIT_USAGE
    older = "" if older_than_s is None else f" set aside more than {_ago(int(older_than_s * 1000))} ago"

    async def body() -> int:
        async with RedisClient(url, prefix=prefix) as client:
            if not (retry or retry_all or delete or delete_all):
                letters = await client.dead_letters(limit=limit, older_than_s=older_than_s)
                if as_json:
                    _json_out([letter.to_json() for letter in letters])
                else:
                    _print_dead_letters(letters, console, older)
                return 0
            picked = await client.dead_letters(limit=None, older_than_s=older_than_s) \
                if retry_all or (delete_all and dry_run) else []
            if dry_run:
                key = "would_delete" if delete_all else "would_requeue"
                if as_json:
                    _json_out({"dry_run": True, key: [letter.to_json() for letter in picked]})
                else:
                    _print_dead_letters(picked, console, older)
                    if picked:
                        console.print(f"{len(picked)} dead letter(s){older} would be "
                                      f"{'deleted' if delete_all else 'put back'}; nothing was done (--dry-run)")
                return 0
            if delete_all:  # (page by page: the dead letters are never all held at once)
                deleted, gone = await client.delete_all_dead_letters(older_than_s=older_than_s)
                if as_json:
                    _json_out({"deleted": [{"id": dead_id} for dead_id in deleted], "skipped": gone})
                elif not deleted and not gone:
                    console.print(f"no dead letters{older}")
                else:
                    console.print(f"{len(deleted)} dead letter(s){older} deleted"
                                  + (f"; {len(gone)} were gone already (put back or deleted meanwhile)" if gone
                                     else ""))
                return 0
            ids = [letter.id for letter in picked] if retry_all else list(dict.fromkeys(retry or delete))
            done: list[dict[str, str]] = []
            failure: Exception | None = None
            for dead_id in ids:
                try:
                    if delete:
                        await client.delete_dead_letter(dead_id)
                        done.append({"id": dead_id})
                        if not as_json:
                            console.print(f"dead letter {dead_id} deleted")
                    else:
                        new_id = await client.requeue_dead_letter(dead_id)
                        done.append({"id": dead_id, "entry_id": new_id})
                        if not as_json:
                            console.print(f"dead letter {dead_id} put back (entry {new_id})")
                except _DEAD_LETTER_FAILURES as exc:
                    failure = exc  # the ids before it are done; the ones after it are left alone
                    break
            said = None if failure is None else str(failure) if isinstance(failure, LookupError | ValueError) \
                else f"{_describe_redis_error(failure)} (dead letters done before it: {len(done)})"
            if as_json:
                out: dict[str, Any] = {"deleted" if delete else "requeued": done}
                if said is not None:
                    out["status"] = "error"
                    out["error"] = {"type": "UsageError" if isinstance(failure, LookupError | ValueError)
                                    else "RedisError", "message": said}
                _json_out(out)
            if said is not None:
                _say(console, said)
                return EXIT_USAGE
            if retry_all and not ids and not as_json:
                console.print(f"no dead letters{older}")
            return 0

    return _guarded(console, url, body)


def _dead_letter_usage(retry: list[str], retry_all: bool, delete: list[str], delete_all: bool,
                       older_than_s: float | None, dry_run: bool) -> str | None:
    """Why these ``dead-letters`` options do not go together, or None: nothing given is ever ignored."""
    if (retry or retry_all) and (delete or delete_all):
        return "--retry/--retry-all and --delete/--delete-all do not go together: put back or delete, not both"
    if retry and retry_all:
        return "--retry ID and --retry-all do not go together: name dead letters, or put back all of them"
    if delete and delete_all:
        return "--delete ID and --delete-all do not go together: name dead letters, or delete all of them"
    if older_than_s is not None and (retry or delete):
        return ("--older-than picks dead letters by age: it goes with --delete-all, --retry-all or a listing, not "
                "with dead letters named by id")
    if dry_run and not (retry_all or delete_all):
        return ("--dry-run shows what --delete-all or --retry-all would do: give one of them (--delete ID and "
                "--retry ID name what they do already; a listing does nothing)")
    return None


def _describe_redis_error(exc: BaseException) -> str:
    kind = "cannot reach Redis" if isinstance(exc, TRANSIENT) else "Redis refused"
    return f"{kind}: {exc}"


def _print_dead_letters(letters: list[DeadLetter], console: Any, older: str = "") -> None:
    from rich.markup import escape

    if not letters:
        console.print(f"no dead letters{older}")
        return
    for letter in letters:
        message = letter.message or {}
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(letter.at / 1000))
        what = ", ".join(f"{name} {message[key]}" for name, key in (("run", "run_id"), ("task", "task_id"))
                         if isinstance(message.get(key), str)) or "no run"
        console.print(f"[bold]{escape(letter.id)}[/]  {when}  {escape(letter.stream)} entry {escape(letter.entry_id)}"
                      f" ({escape(what)}); failed {letter.failures}×, delivered {letter.deliveries}×",
                      highlight=False, crop=False, soft_wrap=True)
        console.print(f"    {escape(letter.reason)}", highlight=False, crop=False, soft_wrap=True)
