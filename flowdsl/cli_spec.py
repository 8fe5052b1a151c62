"""The commands on specs: ``validate``, ``plan`` and ``convert``.

Stage: CLI. Imports :mod:`flowdsl.cli_common`, :mod:`flowdsl.cli_files`, and the API facade inside each command.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from flowdsl.cli_common import (
    EXIT_DIAGNOSTICS,
    EXIT_OK,
    FormatOpt,
    NoImportOpt,
    OutputFormat,
    SyntaxName,
    _compile,
    _exit_for,
    _fail,
    _JsonChannel,
    _print_diagnostics,
    _stderr,
    _user_code,
    app,
)
from flowdsl.cli_files import _same_file, write_outputs


@app.command(help=(
    "Check spec files and print every diagnostic, like a compiler.\n\n"
    "Imports, and so runs, the worker modules the specs name (to check their workers), unless --no-import."))
def validate(
    files: Annotated[list[Path], typer.Argument(help="spec files (.yaml, .yml, .flow)", show_default=False)],
    fmt: FormatOpt = OutputFormat.text,
    no_import: NoImportOpt = False,
) -> None:
    all_diags: list[Any] = []
    for file in files:
        all_diags.extend(_compiled(file, no_import).diagnostics)
    from flowdsl.diagnostics import sort_diagnostics

    all_diags = sort_diagnostics(all_diags)
    _print_diagnostics(all_diags, fmt)
    code = _exit_for(all_diags)
    if fmt is OutputFormat.text and code == EXIT_OK:
        _stderr().print(f"[green]ok[/]: {len(files)} spec(s) valid" + (
            f", {len(all_diags)} warning(s)" if all_diags else ""))
    raise typer.Exit(code)


@app.command(help=(
    "Compile a spec and print its execution plan (canonical JSON).\n\n"
    "Imports, and so runs, the worker modules the spec names (to check its workers), unless --no-import."))
def plan(
    file: Annotated[Path, typer.Argument(help="spec file", show_default=False)],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="write the plan here")] = None,
    source_map: Annotated[Path | None, typer.Option("--source-map", help="write node positions here")] = None,
    fmt: FormatOpt = OutputFormat.text,
    no_import: NoImportOpt = False,
) -> None:
    from flowdsl.api import plan_bytes

    result = _compiled(file, no_import)
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


def _compiled(file: Path, no_import: bool) -> Any:
    """:func:`_compile`, with file descriptor 1 pointed at stderr while the worker modules are imported: what they
    write to it by any means (``os.write(1, …)``, a C library, a child process) stays out of this command's output
    (a plan, a JSON list), which goes to stdout afterwards (``-o /dev/stdout`` too)."""
    with _JsonChannel(True):
        return _compile(file, no_import)


def _module_files(plan: dict[str, Any]) -> list[Path]:
    """The files of the worker modules the spec names that were imported to check it (an input too: `plan -o
    wk.py` wrote the plan over the module it had just imported)."""
    found = (getattr(sys.modules.get(name), "__file__", None) for name in plan["flow"].get("workers") or ())
    return [Path(f) for f in found if isinstance(f, str)]


def _spec_files(result: Any) -> list[Path]:
    """The files a compiled spec was read from (its sub-flows too), per its source map."""
    return sorted({Path(entry["file"]) for entry in result.source_map.values() if entry.get("file")})


SYNTAX_SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".flow": "flow"}


@app.command(help=(
    "Turn a spec from YAML into the text syntax or back.\n\n"
    "The spec is checked first. Comments and layout are not kept (the data is); with -o in another directory, "
    "sub-flow paths are rewritten to stay right."))
def convert(
    file: Annotated[Path, typer.Argument(help="spec file", show_default=False)],
    to: Annotated[SyntaxName | None, typer.Option(
        "--to", help="the syntax to write \\[default: from -o's suffix: .yaml/.yml or .flow]", show_default=False)]
    = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="write here instead of stdout")] = None,
    fmt: FormatOpt = OutputFormat.text,
) -> None:
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
    if result.diagnostics:  # warnings of the spec as written (a conversion may write them away: FD312's labels
        _print_diagnostics(result.diagnostics, OutputFormat.text)  # come out quoted): on stderr, whatever --format
    data = doc.data if output is None else rebase_subflow_paths(doc.data, str(file.parent), str(output.parent))
    text = convert_text(data, syntax)
    if output is not None:
        write_outputs([("-o", output, text.encode("utf-8"))], [file, *_spec_files(result)])
    else:
        sys.stdout.write(text)
