"""The ``flowdsl`` command: a thin layer over the public API.

Stage: CLI. Imports the API facade and, lazily inside each command, the stage
it drives. Exit codes: 0 ok; 1 diagnostics found or run not completed; 2 usage
error, unreadable file or rejected spec for a command that needs a valid one.
Human output goes to stderr (rich), machine output to stdout.
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="flowdsl",
    help="flowdsl: declarative workflows with automatic saga compensation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_OK, EXIT_DIAGNOSTICS, EXIT_USAGE = 0, 1, 2


class OutputFormat(StrEnum):
    text = "text"
    json = "json"


class SyntaxName(StrEnum):
    yaml = "yaml"
    flow = "flow"


FormatOpt = Annotated[OutputFormat, typer.Option("--format", "-f", help="text for people, json for programs")]
NoImportOpt = Annotated[bool, typer.Option("--no-import", help="check worker names without importing modules")]


def _stderr() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _print_diagnostics(diags: list[Any], fmt: OutputFormat) -> None:
    if fmt is OutputFormat.json:
        from flowdsl.diagnostics import to_json_text

        print(to_json_text(diags))
        return
    console = _stderr()
    for d in diags:
        style = "red" if d.severity == "error" else "yellow"
        console.print(f"[bold]{d.location()}[/]: [{style}]{d.severity} {d.code}[/]: {d.message}", markup=True)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _exit_for(diags: list[Any]) -> int:
    from flowdsl.diagnostics import has_errors

    if any(d.code in ("FD101",) for d in diags):
        return EXIT_USAGE
    return EXIT_DIAGNOSTICS if has_errors(diags) else EXIT_OK


def _compile(file: Path, no_import: bool) -> Any:
    from flowdsl.api import compile_spec

    return compile_spec(str(file), check_workers=not no_import)


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
    if output is not None:
        output.write_bytes(data)
    else:
        sys.stdout.write(data.decode("utf-8"))
    if source_map is not None:
        source_map.write_text(json.dumps(result.source_map, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@app.command()
def convert(
    file: Annotated[Path, typer.Argument(help="spec file", show_default=False)],
    to: Annotated[SyntaxName, typer.Option("--to", help="the syntax to write")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="write here instead of stdout")] = None,
    fmt: FormatOpt = OutputFormat.text,
) -> None:
    """Turn a spec from YAML into the text syntax or back. The spec is checked first."""
    from flowdsl.api import compile_spec, load
    from flowdsl.convert import convert_text

    result = compile_spec(str(file), check_workers=False)
    if result.plan is None:
        _print_diagnostics(result.diagnostics, fmt)
        raise typer.Exit(_exit_for(result.diagnostics) or EXIT_DIAGNOSTICS)
    text = convert_text(load(str(file)).data, to.value)
    if output is not None:
        output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
