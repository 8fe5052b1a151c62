"""The ``flowdsl diagram`` command: compile a spec and draw its plan, optionally with a run's states.

Stage: CLI. Imports typer and stdlib at module level (the CLI starts fast);
the compiler, the renderers and rich are imported inside the command.
Registered in :mod:`flowdsl.cli`. Exit codes: 0 drawn; 1 the spec has errors;
2 usage error (bad option combination, an option the format does not take, an -o
suffix that contradicts --format, missing run, unreadable record, events that are
not a run of the spec's flow, Graphviz missing).
"""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from flowdsl.render import FENCES

EXIT_OK, EXIT_DIAGNOSTICS, EXIT_USAGE = 0, 1, 2


def parse_directory(value: str) -> Path:
    """A typer parser of a directory option: an empty value is refused (exit 2) rather than read as ``.``."""
    if value == "":
        raise typer.BadParameter("an empty directory name; give a directory (. for the current one)")
    return Path(value)


class DiagramFormat(StrEnum):
    mermaid = "mermaid"
    ascii = "ascii"
    dot = "dot"
    svg = "svg"
    png = "png"


#: the format an output file's name implies when --format is not given
SUFFIX_FORMATS = {".mmd": "mermaid", ".mermaid": "mermaid", ".md": "mermaid", ".txt": "ascii",
                  ".dot": "dot", ".gv": "dot", ".svg": "svg", ".png": "png"}


def _console() -> Any:
    from flowdsl.stdio import console

    return console(stderr=True)


def _fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    from rich.markup import escape

    from flowdsl.diagnostics import shown
    from flowdsl.shown import visible

    _console().print(f"[red]error[/]: {escape(visible(shown(message)))}")
    return typer.Exit(code)


def _pick_format(fmt: DiagramFormat | None, output: Path | None) -> str:
    """The format to draw: ``--format``, else the one -o's suffix names, else ascii. A suffix that
    names another format than ``--format`` is refused (``.md`` takes any text format, fenced)."""
    implied = SUFFIX_FORMATS.get(output.suffix.lower()) if output is not None else None
    if fmt is None:
        if output is not None and output.suffix and implied is None:  # `-o x.jpg` was written ASCII, silently
            known = ", ".join(f"{suffix} ({name})" for suffix, name in SUFFIX_FORMATS.items())
            raise _fail(f"-o {output}: flowdsl draws no {output.suffix} files; name the file {known}, or give "
                        "--format")
        return implied or "ascii"
    if output is not None and implied is not None and implied != fmt.value \
            and not (output.suffix.lower() == ".md" and fmt.value in FENCES):
        fitting = " or ".join(s for s, f in SUFFIX_FORMATS.items() if f == fmt.value and s != ".md")
        raise _fail(f"-o {output} names a {implied} file but --format is {fmt.value}: write {fmt.value} to a "
                    f"file ending in {fitting} (or leave out --format: the suffix of -o chooses the format)")
    return fmt.value


def _run_events(run: str | None, events: Path | None, runs_dir: Path | None) -> tuple[Path | None, str | None]:
    """The record file to read (or None) and its run id as given."""
    if run is not None and events is not None:
        raise _fail("--run and --events both name a run; give one of them")
    if events is not None:
        return events, None
    if run is None:
        return None, None
    from flowdsl.runtime.record import RecordError, find_record

    try:
        return find_record(run, runs_dir), run
    except RecordError as exc:
        said = str(exc)
        if os.environ.get("FLOWDSL_REDIS_URL"):  # set, and yet --run read a local record: the user meant Redis?
            said += ("; a run of the Redis runtime is read with --redis-url URL ($FLOWDSL_REDIS_URL does not "
                     "send --run to Redis)")
        raise _fail(said) from None


def diagram(
    file: Annotated[Path, typer.Argument(help="spec file (.yaml, .yml, .flow)", show_default=False)],
    fmt: Annotated[DiagramFormat | None, typer.Option(
        "--format", "-f", help="mermaid, ascii, dot, svg or png [default: from -o's suffix, else ascii]",
        show_default=False)] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="write the diagram here")] = None,
    markdown: Annotated[bool, typer.Option(
        "--markdown", help="wrap a text diagram in a fenced Markdown block (```mermaid for Mermaid)")] = False,
    ascii_only: Annotated[bool, typer.Option(
        "--ascii-only", help="ASCII form: 7-bit characters only, no Unicode box drawing")] = False,
    run: Annotated[str | None, typer.Option(
        "--run", help="colour each step by its state in this recorded run", metavar="RUN_ID")] = None,
    events: Annotated[Path | None, typer.Option(
        "--events", help="colour each step by its state in this event log (JSON lines)",
        metavar="FILE.jsonl")] = None,
    runs_dir: Annotated[Path | None, typer.Option(
        "--runs-dir", help="where --run looks for records [default: $FLOWDSL_RUNS_DIR or .flowdsl/runs]",
        show_default=False, parser=parse_directory)] = None,
    width: Annotated[int | None, typer.Option(
        "--width", help="ASCII form: the width to fit, in columns (at least 40) [default: 80]", min=40,
        show_default=False)] = None,
    redis_url: Annotated[str | None, typer.Option(
        "--redis-url", help="read the --run from this Redis deployment's journal instead of a local record",
        metavar="URL")] = None,
    prefix: Annotated[str | None, typer.Option(
        "--prefix", help="with --redis-url: the deployment's key prefix [default: $FLOWDSL_REDIS_PREFIX or flowdsl]",
        show_default=False)] = None,
) -> None:
    """Draw a spec's execution plan as Mermaid, ASCII art, DOT, SVG or PNG, optionally with a run's states."""
    kind = _pick_format(fmt, output)
    if output is not None and output.suffix.lower() == ".md" and kind in FENCES:
        markdown = True  # a Markdown file gets a fenced block GitHub renders
    if ascii_only and kind != "ascii":
        raise _fail("--ascii-only applies to the ascii format")
    if width is not None and kind != "ascii":
        raise _fail(f"--width applies to the ascii format; {kind} is laid out by "
                    + ("Mermaid" if kind == "mermaid" else "Graphviz"))
    if markdown and kind not in FENCES:
        raise _fail(f"--markdown wraps text diagrams; {kind} is an image")
    if kind == "png" and output is None and sys.stdout.isatty():
        raise _fail("png is binary: write it to a file with -o FILE.png")
    if run is not None and events is not None:
        raise _fail("--run and --events both name a run; give one of them")
    if redis_url is not None and run is None:
        raise _fail("--redis-url reads a run: give its id with --run")
    if prefix is not None and redis_url is None:
        raise _fail("--prefix is the key prefix of a Redis deployment: it goes with --redis-url URL and --run")
    if runs_dir is not None and (run is None or redis_url is not None):
        raise _fail("--runs-dir is where --run looks for a local record: give --run (and no --redis-url)")
    record, run_id = _run_events(run, events, runs_dir) if redis_url is None else (None, run)

    from flowdsl.api import compile_spec
    from flowdsl.cli_common import OutputFormat, _exit_for, _print_diagnostics

    result = compile_spec(str(file), check_workers=False)
    if result.plan is None:
        _print_diagnostics(result.diagnostics, OutputFormat.text)
        raise typer.Exit(_exit_for(result.diagnostics) or EXIT_DIAGNOSTICS)
    if result.diagnostics:
        _print_diagnostics(result.diagnostics, OutputFormat.text)
    plan = result.plan

    from flowdsl.render import RenderError, render
    from flowdsl.render.runstate import check_run_of, derive_states, read_events, record_plan
    from flowdsl.runtime.record import RecordError

    states = None
    if redis_url is not None and run_id is not None:
        from flowdsl.runtime.redis.commands import run_events

        journaled = run_events(run_id, url=redis_url, prefix=prefix, console=_console())
        if journaled is None:
            raise typer.Exit(2)
        try:
            check_run_of(plan, journaled, source=f"run {run_id}")
        except RenderError as exc:
            raise _fail(str(exc)) from None
        states = derive_states(plan, journaled)
    if record is not None:
        source = f"run {run_id} ({record})" if run_id else str(record)
        try:
            log = read_events(record)
            recorded = record_plan(record)
            flow = recorded.get("flow") if recorded is not None else None
            recorded_flow = str(flow["name"]) if isinstance(flow, dict) and flow.get("name") else None
            check_run_of(plan, log, source=source, recorded_flow=recorded_flow)
        except (RecordError, RenderError) as exc:
            raise _fail(str(exc)) from None
        if recorded is not None and recorded != plan:
            _console().print(f"[yellow]warning[/]: the spec has changed since run "
                             f"{run_id or record.stem} was recorded; drawing the current plan")
        states = derive_states(plan, log)
        if states.run_id is None:  # the events name no run: the legend names where they came from
            states = type(states)(states.steps, states.undos, run_id or record.name, states.status,
                                  states.iterations)
    try:
        drawn = render(plan, kind, run_states=states, ascii_only=ascii_only, markdown=markdown, width=width)
    except RenderError as exc:
        raise _fail(str(exc)) from None
    data = drawn.encode("utf-8") if isinstance(drawn, str) else drawn
    if output is not None:
        from flowdsl.cli_files import write_outputs  # refuses to write over the spec or the run's record

        write_outputs([("-o", output, data)], [file, *(Path(e["file"]) for e in result.source_map.values()
                                                       if e.get("file")), *([record] if record else [])])
        from rich.markup import escape

        from flowdsl.diagnostics import shown
        from flowdsl.shown import visible

        _console().print(f"[green]wrote[/] {escape(visible(shown(output)))} ({kind})")
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
