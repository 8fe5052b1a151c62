"""The ``test`` command: run flow test files (docs/testing.md) and say which cases pass.

Stage: CLI. Imports :mod:`flowdsl.cli_common`, and inside the command :mod:`flowdsl.testing` (which imports the
API facade and the simulated runtime) and the run report's timeline.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flowdsl.cli_common import (
    EXIT_DIAGNOSTICS,
    EXIT_OK,
    EXIT_USAGE,
    FormatOpt,
    OutputFormat,
    _escape,
    _fail,
    _JsonChannel,
    _model,
    _print_diagnostics,
    _reporting,
    _user_code,
    app,
)

if TYPE_CHECKING:
    from flowdsl.testing import CaseResult, FlowTests, WorkerScope


@app.command(name="test", help=(
    "Run flow test files: cases that run a flow on a simulated clock, with scripted attempts, and check how it "
    "ends.\n\n"
    "Every attempt a case scripts succeeds, fails or never answers as it says (ok, fail, hang); the others call "
    "their real workers; the signals a case sends reach the flow's waits at their times. Retries, timeouts and "
    "timer waits take no real time (docs/testing.md).\n\n"
    "PATHS are test files, or directories searched for *.test.yaml files (default: the current directory). "
    "Imports, and so runs, the worker modules the flows name.\n\n"
    "Exit codes:\n"
    "  0    every case passed (--what-if: every file was explored)\n"
    "  1    a case failed, or could not run\n"
    "  2    a test file or the flow it tests has errors, no test file (or no case -k names) was found, or a usage "
    "error\n"
    "  130  stopped by Ctrl-C or SIGTERM"))
def test(
    paths: Annotated[list[Path] | None, typer.Argument(
        help="test files or directories \\[default: .]", show_default=False)] = None,
    case: Annotated[str | None, typer.Option(
        "-k", "--case", help="run only the cases whose name holds TEXT (any case)", metavar="TEXT")] = None,
    lm: Annotated[str | None, typer.Option(
        "--lm", help="language model for the LLM steps a case leaves unscripted and whose own llm block names none "
        "\\[default: the flow's defaults.llm.lm, else $FLOWDSL_LM; with none, such a step fails as not configured "
        "and its fallback runs]", callback=_model)] = None,
    what_if: Annotated[bool, typer.Option(
        "--what-if", help="run no case: for each file's flow, say how it ends when each step fails for good (then "
        "its fallback, then the undos it needs) and when each wait with a timeout gets no signal, from the file's "
        "input, scripts and signals")] = False,
    fmt: FormatOpt = OutputFormat.text,
) -> None:
    as_json = fmt is OutputFormat.json

    def body(console: Any) -> int:
        from flowdsl.testing import find_test_files

        if what_if and case is not None:
            raise _fail("--what-if runs no case: leave out -k", console=console)
        given = paths or [Path(".")]
        missing = [str(p) for p in given if not p.exists()]
        if missing:
            raise _fail(f"no such file or directory: {', '.join(missing)}", console=console)
        files = find_test_files(given)
        if not files:
            raise _fail(f"no test files found in {', '.join(str(p) for p in given)} (test files are named "
                        "*.test.yaml or *.test.yml)", console=console)
        run = _what_if_files(files, lm, as_json, console) if what_if else _run_files(files, case, lm, as_json, console)
        return asyncio.run(run)

    # (text too: what worker code writes to file descriptor 1 lands on stderr, not amid the report)
    with _JsonChannel(not as_json):
        code = _reporting(as_json, body)
    raise typer.Exit(code)


async def _each_file(files: list[str], as_json: bool, console: Any,
                     then: Callable[[FlowTests, dict[str, Any]], Awaitable[None]]) -> tuple[list[dict[str, Any]], bool]:
    """Load each file in a :class:`~flowdsl.testing.WorkerScope` of its own and, when it has no errors, ``then``
    run what it holds; the JSON entry of every file, and whether one had errors."""
    from flowdsl.testing import WorkerScope, load_tests

    report: list[dict[str, Any]] = []
    broken = False
    for file in files:
        scope: WorkerScope
        with WorkerScope() as scope:
            with _user_code():
                tests, diags = load_tests(file, scope=scope)
            if diags:
                _print_diagnostics(diags, OutputFormat.text)
            entry: dict[str, Any] = {"file": file, "flow": tests.flow_file if tests else None,
                                     "diagnostics": [d.to_json() for d in diags]}
            report.append(entry)
            if tests is None:
                broken = True
                if not as_json:
                    console.print(f"[bold]{_escape(file)}[/]: [red]not run[/] (the errors above)")
                continue
            await then(tests, entry)
    return report, broken


async def _run_files(files: list[str], only: str | None, lm: str | None, as_json: bool, console: Any) -> int:
    from flowdsl.testing import run_case

    counts = {"passed": 0, "failed": 0, "error": 0}

    async def cases_of(tests: FlowTests, entry: dict[str, Any]) -> None:
        chosen = [c for c in tests.cases if only is None or only.casefold() in c.name.casefold()]
        entry["cases"] = []
        if not as_json and chosen:
            console.print(f"[bold]{_escape(tests.file)}[/] [dim](flow {_escape(tests.flow_file)}, "
                          f"{len(chosen)} case{'s' if len(chosen) != 1 else ''})[/]")
        for flow_case in chosen:
            with _user_code():
                result = await run_case(tests, flow_case, lm=lm)
            counts[result.outcome] += 1
            entry["cases"].append(result.to_json())
            if not as_json:
                _say_case(console, result)

    report, broken = await _each_file(files, as_json, console, cases_of)
    total = sum(counts.values())
    if only is not None and not total and not broken:
        raise _fail(f"no case name holds {only!r} (-k) in {len(files)} test file{'s' if len(files) != 1 else ''}",
                    console=console)
    status = "error" if broken else "failed" if counts["failed"] or counts["error"] else "passed"
    if as_json:
        from flowdsl.stdio import write_json

        write_json(json.dumps({"status": status, "cases": total, **counts, "files": report}, ensure_ascii=False)
                   + "\n")
    else:
        said = f"{total} case{'s' if total != 1 else ''}: {counts['passed']} passed"
        said += f", {counts['failed']} failed" if counts["failed"] else ""
        said += f", {counts['error']} could not run" if counts["error"] else ""
        style = "green" if status == "passed" else "red"
        console.print(f"[{style}]{said}[/]" + (" — and test files with errors (above)" if broken else ""))
    return EXIT_USAGE if broken else EXIT_OK if status == "passed" else EXIT_DIAGNOSTICS


async def _what_if_files(files: list[str], lm: str | None, as_json: bool, console: Any) -> int:
    from flowdsl.runtime.inputs import InputError
    from flowdsl.testing import what_if

    refused = False

    async def explore(tests: FlowTests, entry: dict[str, Any]) -> None:
        nonlocal refused
        try:
            with _user_code():
                scenarios = await what_if(tests, lm=lm)
        except InputError as exc:
            refused = True
            entry["error"] = (f"--what-if starts every run from the file's own input, which the flow refuses: {exc} "
                              "(give the file an input: that every case starts from)")
            console.print(f"[bold]{_escape(tests.file)}[/]: [red]error[/]: {_escape(entry['error'])}")
            return
        entry["scenarios"] = [s.to_json() for s in scenarios]
        if not as_json:
            _say_what_if(console, tests.file, tests.flow_file, entry["scenarios"])

    report, broken = await _each_file(files, as_json, console, explore)
    if as_json:
        from flowdsl.stdio import write_json

        write_json(json.dumps({"status": "error" if broken or refused else "ok", "files": report},
                              ensure_ascii=False) + "\n")
    return EXIT_USAGE if broken or refused else EXIT_OK


def _say_what_if(console: Any, file: str, flow: str, scenarios: list[dict[str, Any]]) -> None:
    from rich.table import Table

    waits = " or a wait times out" if any(f["script"] == "wait" for s in scenarios for f in s["failing"]) else ""
    table = Table(title=f"{file} (flow {flow}): what if a step fails for good{waits}", title_justify="left",
                  show_edge=False, pad_edge=False, box=None, title_style="bold")
    for column in ("if", "the run ends", "undone, in order", "left to a person"):
        table.add_column(column, overflow="fold")
    for s in scenarios:
        if s["error"] is not None:
            table.add_row(_escape(s["said"]), "[red]could not run[/]", _escape(s["error"]), "")
            continue
        if not s["ran"]:
            table.add_row(_escape(s["said"]), f"[dim]{_escape(s['status'])}: it never runs in this run[/]", "", "")
            continue
        notes = [*(f"fallback of {k}" for k in s["fallbacks"]), *(f"{k} passed over" for k in s["passed_over"])]
        ends = s["status"] + (f" ({', '.join(notes)})" if notes else "")
        table.add_row(_escape(s["said"]), _escape(ends), _escape(", ".join(s["compensated"]) or "—"),
                      _escape(", ".join(s["intervention"]) or "—"))
    console.print(table)


def _say_case(console: Any, result: CaseResult) -> None:
    from flowdsl.durations import duration_text
    from flowdsl.runtime.timeline import print_timeline

    name = _escape(result.case.name)
    where = f" [dim](line {result.case.line})[/]" if result.case.line else ""
    sim = result.simulation
    if result.outcome == "passed":
        assert sim is not None
        took = f", {duration_text(sim.elapsed_ms)} simulated" if sim.elapsed_ms is not None else ""
        status = sim.result.status if sim.ended else "running"
        console.print(f"  [green]passed[/]  {name} [dim]({_escape(status)}{took})[/]")
        return
    if result.outcome == "error":
        console.print(f"  [red]ERROR[/]   {name}{where}: {_escape(result.error or '')}")
        return
    console.print(f"  [red]FAILED[/]  {name}{where}")
    for m in result.mismatches:
        got = f"nothing ({m.note})" if m.note is not None else json.dumps(m.got, ensure_ascii=False)
        console.print(f"          {_escape(m.field)}: expected {_escape(json.dumps(m.expected, ensure_ascii=False))}, "
                      f"got {_escape(got)}")
    assert sim is not None
    if sim.waiting:
        console.print(f"          [yellow]the run never ended: it waits for {_escape(', '.join(sim.waiting))} "
                      "(an attempt that hangs with no timeout?)[/]")
    for key, signal in sim.waits.items():
        console.print(f"          [yellow]the run never ended: wait {_escape(key)} waits for signal "
                      f"{_escape(repr(signal))}, which the case does not send (a wait with no timeout waits as long "
                      "as it takes)[/]")
    console.print("          [dim]the simulated run (times on its virtual clock):[/]")
    print_timeline(sim.result, sim.result.events, console)
