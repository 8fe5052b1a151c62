"""The commands that look after finished runs: ``resolve`` (a run's work by hand is done; local records or Redis) and
``prune`` (remove old local run records).

Stage: CLI. Imports :mod:`flowdsl.cli_common`, and inside each command the runtime module it drives
(``flowdsl.runtime.resolve``, ``flowdsl.runtime.prune``; ``flowdsl.runtime.redis.commands`` for a Redis run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from flowdsl.cli_common import (
    Backend,
    FormatOpt,
    OutputFormat,
    PrefixOpt,
    RedisUrlOpt,
    RunsDirOpt,
    _fail,
    _reporting,
    _text,
    app,
)
from flowdsl.render.command import parse_directory  # (typer + stdlib only)

# (their help= texts: see the note above `run` in flowdsl/cli_run.py)


@app.command(help=(
    "Say that what a run left to do by hand is done, so that it is listed resolved.\n\n"
    "For a run that ended needs_intervention (or with a step in doubt), was stopped at once, or crashed (its process "
    "died): first finish its work by hand, from what `flowdsl show RUN_ID` lists (docs/runtime.md). A local run's "
    "record gets a `resolved` line, with the time, who and --note; `flowdsl runs` then lists it resolved, and "
    "`flowdsl prune` may remove it.\n\n"
    "Exit codes:\n"
    "  0    resolved\n"
    "  1    refused: nothing to resolve, resolved already, still running, parked (resume it, or resume --cancel it), "
    "or its process cannot be told (--force)\n"
    "  2    no such run, a record that cannot be read or written, or a bad option"))
def resolve(
    run_id: Annotated[str, typer.Argument(help="a run id, or the path of a local run record (.jsonl)",
                                          metavar="RUN_ID", show_default=False)],
    note: Annotated[str | None, typer.Option("--note", help="what was done, recorded with the resolution",
                                             metavar="TEXT", callback=_text)] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="(local) resolve a run whose record has no end although whether its process still runs "
        "cannot be told here (it ran on another host or in another container): once you know it is gone")] = False,
    backend: Annotated[Backend, typer.Option(
        "--backend", help="local: a run record of the local runtime; redis: a run in Redis")] = Backend.local,
    runs_dir: Annotated[Path | None, typer.Option(
        "--runs-dir", help="(local) where run records are \\[default: $FLOWDSL_RUNS_DIR or .flowdsl/runs]",
        metavar="DIR", parser=parse_directory)] = None,
    redis_url: RedisUrlOpt = None,
    prefix: PrefixOpt = None,
    fmt: FormatOpt = OutputFormat.text,
) -> None:
    as_json = fmt is OutputFormat.json

    def body(console: Any) -> int:
        if backend is Backend.redis:
            if runs_dir is not None or force:
                raise _fail("--runs-dir and --force are for local run records (--backend local)", console=console)
            from flowdsl.runtime.redis.commands import resolve_command

            code: int = resolve_command(run_id, url=redis_url, prefix=prefix, note=note, as_json=as_json,
                                        console=console)
            return code
        if redis_url is not None or prefix is not None:
            raise _fail("--redis-url and --prefix need --backend redis (a local run's record is in --runs-dir)",
                        console=console)
        from flowdsl.runtime.resolve import resolve_local_command

        return resolve_local_command(run_id, _directory(runs_dir, console), note=note, force=force, as_json=as_json,
                                     console=console)

    raise typer.Exit(_reporting(as_json, body))


@app.command(help=(
    "Remove old local run records, keeping every one of a run that may still go or that still needs a person.\n\n"
    "It removes the records of runs in the --status states (by default completed, failed, compensated, cancelled "
    "and resolved) last written more than --older-than ago. Whatever --status says, it keeps the record of a run "
    "whose process still runs (or cannot be told), of a parked run (`flowdsl resume` goes on with it), of a "
    "needs_intervention run or a run with a step in doubt not resolved, of a crashed or stopped run with something "
    "left to undo, and of a newer flowdsl; it says how many "
    "it kept, and why. Files that are not run records are never removed.\n\n"
    "Exit codes:\n"
    "  0    done (also when nothing was old enough)\n"
    "  1    a record could not be removed (named on stderr)\n"
    "  2    a bad option, or a directory of records that cannot be read"))
def prune(
    older_than: Annotated[str, typer.Option(
        "--older-than", help="remove records last written more than this long ago: 30d, 12h, 90m, 1d12h",
        metavar="DURATION", show_default=False)],
    status_filter: Annotated[list[str] | None, typer.Option(
        "--status", help="only runs in these states (repeatable, or comma-separated): completed, failed, "
        "compensated, cancelled, resolved, crashed, aborted, unrecorded \\[default: completed, failed, compensated, "
        "cancelled, resolved]", metavar="STATE", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say what would be removed, and remove nothing")] = False,
    runs_dir: RunsDirOpt = None,
    fmt: FormatOpt = OutputFormat.text,
) -> None:
    as_json = fmt is OutputFormat.json

    def body(console: Any) -> int:
        from flowdsl.runtime.prune import prune_command

        return prune_command(_directory(runs_dir, console), older_than=older_than, statuses=status_filter,
                             dry_run=dry_run, as_json=as_json, console=console)

    raise typer.Exit(_reporting(as_json, body))


def _directory(runs_dir: Path | None, console: Any) -> Path:
    """The directory of run records: ``--runs-dir``, else ``$FLOWDSL_RUNS_DIR``, else ``.flowdsl/runs``."""
    from flowdsl.runtime.record import runs_dir as records_dir

    try:
        return records_dir(str(runs_dir) if runs_dir is not None else None)
    except ValueError as exc:  # $FLOWDSL_RUNS_DIR set but empty
        raise _fail(str(exc), console=console) from None
