"""The CLI's validate, plan and convert commands: exit codes, compiler-style output, JSON, start-up imports.

Exit codes: 0 valid, 1 diagnostics found, 2 usage error or unreadable file.
Human output goes to stderr, machine output to stdout. Start-up *time* is
measured by benchmarks/bench_frontend.py; here only what start-up imports.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import flowdsl
from flowdsl.cli import app

ROOT = Path(__file__).resolve().parent.parent
FLOWDSL = str(Path(sys.executable).with_name("flowdsl"))
LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): (?P<sev>error|warning) (?P<code>FD\d{3}): "
                  r"(?P<msg>.+)$")

VALID = "flowdsl: 1\nname: orders\nsteps:\n  - validate_order\n  - charge:\n      compensate: refund\n"
INVALID = ("flowdsl: 1\nname: orders\nsteps:\n  - charge:\n      timeout: soon\n      when: \"${ $inptu.x }\"\n"
           "  - charge\n")
WARNING = "flowdsl: 1\nname: orders\nsteps:\n  - a\n  - b:\n      when: \"${ false }\"\n"


def run(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, text in (("valid.yaml", VALID), ("invalid.yaml", INVALID), ("warning.yaml", WARNING)):
        out[name] = tmp_path / name
        out[name].write_text(text, encoding="utf-8")
    return out


# --- validate -------------------------------------------------------------------------


def test_validate_a_valid_spec_is_exit_0(files: dict[str, Path]) -> None:
    result = run("validate", "--no-import", str(files["valid.yaml"]))
    assert result.exit_code == 0
    assert result.stdout == "" and "ok: 1 spec(s) valid" in result.stderr


def test_validate_prints_compiler_style_lines_and_exits_1(files: dict[str, Path]) -> None:
    result = run("validate", "--no-import", str(files["invalid.yaml"]))
    assert result.exit_code == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [(m["file"], int(m["line"]), int(m["col"]), m["code"]) for m in parsed if m] == [
        (str(files["invalid.yaml"]), 5, 16, "FD401"),
        (str(files["invalid.yaml"]), 6, 13, "FD502"),
        (str(files["invalid.yaml"]), 7, 5, "FD301"),
    ]
    assert "did you mean '$input'?" in lines[1]


def test_validate_json_is_a_list_with_the_documented_fields(files: dict[str, Path]) -> None:
    result = run("validate", "--no-import", "--format", "json", str(files["invalid.yaml"]))
    assert result.exit_code == 1
    found = json.loads(result.stdout)
    assert isinstance(found, list) and len(found) == 3
    for d in found:
        assert list(d) == ["code", "severity", "message", "file", "line", "column", "path"]
    assert found[0] == {"code": "FD401", "severity": "error", "message": found[0]["message"],
                        "file": str(files["invalid.yaml"]), "line": 5, "column": 16, "path": "/steps/0/charge/timeout"}
    assert result.stderr == ""


def test_validate_json_of_a_valid_spec_is_an_empty_list(files: dict[str, Path]) -> None:
    result = run("validate", "--no-import", "-f", "json", str(files["valid.yaml"]))
    assert result.exit_code == 0 and json.loads(result.stdout) == []


def test_warnings_alone_are_exit_0(files: dict[str, Path]) -> None:
    result = run("validate", "--no-import", str(files["warning.yaml"]))
    assert result.exit_code == 0
    (m,) = [LINE.match(line) for line in result.stderr.splitlines() if LINE.match(line)]
    assert m["sev"] == "warning" and m["code"] == "FD306"
    assert "1 warning(s)" in result.stderr


def test_validate_many_files_reports_them_all_sorted(files: dict[str, Path]) -> None:
    result = run("validate", "--no-import", "-f", "json", *(str(p) for p in files.values()))
    assert result.exit_code == 1
    found = [(Path(d["file"]).name, d["line"]) for d in json.loads(result.stdout)]
    assert found == [("invalid.yaml", 5), ("invalid.yaml", 6), ("invalid.yaml", 7), ("warning.yaml", 6)]


def test_markup_in_messages_is_printed_as_written(tmp_path: Path) -> None:
    path = tmp_path / "markup.yaml"
    path.write_text("flowdsl: 1\nname: m\nsteps: [a]\n'[bold red]x[/]': 1\n")
    result = run("validate", "--no-import", str(path))
    assert result.exit_code == 1 and "unknown field '[bold red]x[/]'" in result.stderr


def test_no_import_skips_the_worker_modules(tmp_path: Path) -> None:
    path = tmp_path / "workers.yaml"
    path.write_text("flowdsl: 1\nname: w\nworkers: [no_such_module_xyz]\nsteps: [a]\n")
    imported = run("validate", "-f", "json", str(path))
    assert imported.exit_code == 1 and {d["code"] for d in json.loads(imported.stdout)} == {"FD205"}
    assert run("validate", "--no-import", str(path)).exit_code == 0


def test_validate_imports_workers_of_the_example() -> None:
    result = run("validate", str(ROOT / "examples" / "ecommerce_order" / "flow.yaml"))
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("args", [
    [], ["validate"], ["validate", "--format", "xml", "x.yaml"], ["validate", "--bogus", "x.yaml"],
    ["nosuchcommand"], ["plan"], ["plan", "a.yaml", "b.yaml"], ["convert", "a.yaml"], ["convert", "a.yaml", "--to",
                                                                                       "json"],
])
def test_usage_errors_are_exit_2(args: list[str]) -> None:
    assert run(*args).exit_code == 2


@pytest.mark.parametrize("command", ["validate", "plan", "convert"])
def test_unreadable_and_unknown_files_are_exit_2(command: str, tmp_path: Path) -> None:
    txt = tmp_path / "spec.txt"
    txt.write_text(VALID)
    extra = ["--to", "flow"] if command == "convert" else []
    for path in (tmp_path / "missing.yaml", txt, tmp_path):
        result = run(command, str(path), *extra)
        assert result.exit_code == 2, (command, path, result.output)
        assert "FD101" in result.stderr


def test_exit_codes_and_streams_of_the_real_command(files: dict[str, Path], tmp_path: Path) -> None:
    ok = subprocess.run([FLOWDSL, "validate", "--no-import", str(files["valid.yaml"])], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout == ""
    bad = subprocess.run([FLOWDSL, "validate", "--no-import", str(files["invalid.yaml"])], capture_output=True,
                         text=True)
    assert bad.returncode == 1 and bad.stdout == ""
    assert all(LINE.match(line) for line in bad.stderr.splitlines())
    missing = subprocess.run([FLOWDSL, "validate", str(tmp_path / "nope.yaml")], capture_output=True, text=True)
    assert missing.returncode == 2
    usage = subprocess.run([FLOWDSL, "validate"], capture_output=True, text=True)
    assert usage.returncode == 2 and "Missing argument" in usage.stderr


def test_version_is_the_package_version() -> None:
    import tomllib

    import flowdsl

    declared = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["version"]
    assert flowdsl.__version__ == declared
    shown = subprocess.run([FLOWDSL, "--version"], capture_output=True, text=True)
    assert (shown.returncode, shown.stdout) == (0, f"flowdsl {declared}\n")


def test_python_dash_m_flowdsl_is_the_same_command(files: dict[str, Path]) -> None:
    bad = subprocess.run([sys.executable, "-m", "flowdsl", "validate", "--no-import", str(files["invalid.yaml"])],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and all(LINE.match(line) for line in bad.stderr.splitlines())
    usage = subprocess.run([sys.executable, "-m", "flowdsl", "validate"], capture_output=True, text=True)
    assert usage.returncode == 2 and "Missing argument" in usage.stderr


# --- plan ---------------------------------------------------------------------------------


def test_plan_prints_canonical_json(files: dict[str, Path]) -> None:
    result = run("plan", "--no-import", str(files["valid.yaml"]))
    assert result.exit_code == 0
    expected = flowdsl.plan_bytes(flowdsl.compile_spec(str(files["valid.yaml"])).plan).decode()
    assert result.stdout == expected


def test_plan_output_file_and_source_map(files: dict[str, Path], tmp_path: Path) -> None:
    out, smap = tmp_path / "plan.json", tmp_path / "map.json"
    result = run("plan", "--no-import", str(files["valid.yaml"]), "-o", str(out), "--source-map", str(smap))
    assert result.exit_code == 0 and result.stdout == ""
    data = out.read_bytes()
    plan = json.loads(data)
    assert data == flowdsl.plan_bytes(plan) and data.endswith(b"}\n")
    assert plan["root"] == ["validate_order", "charge"]
    positions = json.loads(smap.read_text())
    assert set(positions) == set(plan["nodes"])
    assert positions["charge"] == {"file": str(files["valid.yaml"]), "line": 5, "column": 5, "spec_path": "/steps/1"}


def test_plan_of_the_same_spec_in_two_files_is_byte_identical(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "sub" / "b.yml"
    b.parent.mkdir()
    a.write_text(VALID)
    b.write_text(VALID.replace("  - charge:\n      compensate: refund\n", "  - charge: {compensate: refund}\n"))
    run("plan", "--no-import", str(a), "-o", str(tmp_path / "a.json"))
    run("plan", "--no-import", str(b), "-o", str(tmp_path / "b.json"))
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_plan_of_an_invalid_spec_is_exit_1_and_writes_nothing(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    result = run("plan", "--no-import", str(files["invalid.yaml"]), "-o", str(out))
    assert result.exit_code == 1 and not out.exists() and result.stdout == ""
    assert all(LINE.match(line) for line in result.stderr.splitlines())
    as_json = run("plan", "--no-import", "--format", "json", str(files["invalid.yaml"]))
    assert as_json.exit_code == 1 and [d["code"] for d in json.loads(as_json.stdout)] == ["FD401", "FD502", "FD301"]


@pytest.mark.parametrize("option", ["-o", "--source-map"])
def test_an_output_that_cannot_be_written_is_exit_2(option: str, files: dict[str, Path], tmp_path: Path) -> None:
    for target in (tmp_path / "no" / "such" / "dir.json", tmp_path):
        result = run("plan", "--no-import", str(files["valid.yaml"]), option, str(target))
        assert result.exit_code == 2 and f"cannot write {target}" in result.stderr
        assert result.exception is None or isinstance(result.exception, SystemExit)
    result = run("convert", str(files["valid.yaml"]), "--to", "flow", "-o", str(tmp_path))
    assert result.exit_code == 2 and "cannot write" in result.stderr


def test_plan_checks_worker_names_unless_no_import(files: dict[str, Path]) -> None:
    result = run("plan", str(files["valid.yaml"]))
    assert result.exit_code == 1 and "FD204" in result.stderr
    assert run("plan", "--no-import", str(files["valid.yaml"])).exit_code == 0


def test_plan_with_warnings_prints_them_and_the_plan(files: dict[str, Path]) -> None:
    result = run("plan", "--no-import", str(files["warning.yaml"]))
    assert result.exit_code == 0 and json.loads(result.stdout)["root"] == ["a", "b"]
    assert "warning FD306" in result.stderr


# --- convert --------------------------------------------------------------------------------


def test_convert_yaml_to_flow_and_back_keeps_the_plan(files: dict[str, Path], tmp_path: Path) -> None:
    flow = tmp_path / "orders.flow"
    result = run("convert", str(files["valid.yaml"]), "--to", "flow", "-o", str(flow))
    assert result.exit_code == 0, result.output
    assert flow.read_text().startswith("flow orders")
    back = run("convert", str(flow), "--to", "yaml")
    assert back.exit_code == 0
    yml = tmp_path / "back.yaml"
    yml.write_text(back.stdout)
    plans = [flowdsl.plan_bytes(flowdsl.compile_spec(str(p)).plan) for p in (files["valid.yaml"], flow, yml)]
    assert plans[0] == plans[1] == plans[2]


def test_convert_keeps_a_sub_flow_node_s_timeout(tmp_path: Path) -> None:
    (tmp_path / "gift.yaml").write_text("flowdsl: 1\nname: gift\ntimeout: 1h\nsteps: [wrap]\n")
    spec = tmp_path / "main.yaml"
    spec.write_text(VALID + "  - flow: gift\n    path: gift.yaml\n    timeout: 90s\n")
    flow = tmp_path / "main.flow"
    result = run("convert", str(spec), "-o", str(flow))
    assert result.exit_code == 0, result.output
    assert flow.read_text().endswith("\nflow gift path gift.yaml timeout 90s\n")
    back = run("convert", str(flow), "--to", "yaml")
    assert back.exit_code == 0, back.output
    assert back.stdout.endswith("- flow: gift\n  path: gift.yaml\n  timeout: 90s\n")
    plans = [flowdsl.compile_spec(str(p), check_workers=False).plan for p in (spec, flow)]
    assert plans[0] is not None and plans[0]["nodes"]["gift"]["timeout_ms"] == 90_000
    assert flowdsl.plan_bytes(plans[0]) == flowdsl.plan_bytes(plans[1])


def test_convert_into_another_directory_rebases_sub_flow_paths(tmp_path: Path) -> None:
    """A sub-flow's path is relative to the spec's file: written elsewhere as it was, the output named no file
    (FD308) although convert said nothing."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "gift.yaml").write_text("flowdsl: 1\nname: gift\nsteps: [wrap]\n")
    spec = tmp_path / "main.yaml"
    spec.write_text(VALID + "  - flow: gift\n    path: lib/gift.yaml\n    with: {flow: x, path: lib/gift.yaml}\n"
                    "  - parallel: p\n    branches:\n      - flow: again\n        path: lib/gift.yaml\n")
    out = tmp_path / "out" / "deep" / "main.flow"
    out.parent.mkdir(parents=True)
    result = run("convert", str(spec), "-o", str(out))
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.count('path "../../lib/gift.yaml"') == 2
    assert "with {flow: x, path: lib/gift.yaml}" in text  # data passed to the sub-flow is not a path to rebase
    plans = [flowdsl.compile_spec(str(p), check_workers=False).plan for p in (spec, out)]
    assert plans[1] is not None and "gift/wrap" in plans[1]["nodes"] and "again/wrap" in plans[1]["nodes"]
    same = run("convert", str(spec), "-o", str(tmp_path / "main.flow"))  # beside it: written as it was
    assert same.exit_code == 0 and "path lib/gift.yaml" in (tmp_path / "main.flow").read_text()


def test_convert_to_stdout(files: dict[str, Path]) -> None:
    result = run("convert", str(files["valid.yaml"]), "--to", "flow")
    assert result.exit_code == 0 and "step charge" in result.stdout and "undo refund" in result.stdout


def test_convert_refuses_an_invalid_spec(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "x.flow"
    result = run("convert", str(files["invalid.yaml"]), "--to", "flow", "-o", str(out))
    assert result.exit_code == 1 and not out.exists()
    assert "FD401" in result.stderr and "FD301" in result.stderr


# --- start-up ---------------------------------------------------------------------------------

_PROBE = """
import json, sys
sys.argv = ["flowdsl", *json.loads(sys.argv[1])]
from flowdsl.cli import main
try:
    main()
except SystemExit:
    pass
heavy = ["networkx", "jsonschema", "jsonata", "lark", "dspy", "litellm", "redis", "graphviz", "yaml"]
sys.stderr.write("\\nMODULES " + json.dumps([m for m in heavy if m in sys.modules]) + "\\n")
"""


def imported_by(*args: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(list(args))], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    line = next(line for line in proc.stderr.splitlines() if line.startswith("MODULES "))
    return set(json.loads(line.removeprefix("MODULES ")))


def test_help_imports_no_heavy_module() -> None:
    assert imported_by("--help") == set()
    assert imported_by("validate", "--help") == set()


def test_validate_imports_only_what_a_yaml_spec_needs(files: dict[str, Path]) -> None:
    used = imported_by("validate", "--no-import", str(files["valid.yaml"]))
    assert not used & {"lark", "dspy", "litellm", "redis", "graphviz"}, used
    assert "yaml" in used  # the spec was read: the probe saw a real validation


# --- outputs never overwrite inputs, and a failing command writes nothing ------------------------------------


def test_convert_refuses_to_write_over_its_input(files: dict[str, Path]) -> None:
    source = files["valid.yaml"]
    before = source.read_bytes()
    for to in ("flow", "yaml"):
        result = run("convert", str(source), "--to", to, "-o", str(source))
        assert result.exit_code == 2 and source.read_bytes() == before, result.output
        assert f"-o {source}" in result.stderr and "refusing to write over it" in result.stderr
    alias = source.parent / "alias.yaml"
    alias.symlink_to(source)
    result = run("convert", str(source), "--to", "yaml", "-o", str(alias))
    assert result.exit_code == 2 and source.read_bytes() == before and "is the input file" in result.stderr


def test_convert_takes_the_syntax_from_the_output_suffix_and_refuses_a_contradiction(files: dict[str, Path],
                                                                                      tmp_path: Path) -> None:
    wrong = tmp_path / "x.flow"
    result = run("convert", str(files["valid.yaml"]), "--to", "yaml", "-o", str(wrong))
    assert result.exit_code == 2 and not wrong.exists()
    assert "names a flow file but --to is yaml" in result.stderr and ".yaml or .yml" in result.stderr
    result = run("convert", str(files["valid.yaml"]), "--to", "flow", "-o", str(tmp_path / "y.yml"))
    assert result.exit_code == 2 and "names a yaml file but --to is flow" in result.stderr
    inferred = run("convert", str(files["valid.yaml"]), "-o", str(wrong))
    assert inferred.exit_code == 0 and wrong.read_text().startswith("flow orders")
    back = run("convert", str(wrong), "-o", str(tmp_path / "back.yml"))
    assert back.exit_code == 0 and (tmp_path / "back.yml").read_text().startswith("flowdsl: 1")
    neither = run("convert", str(files["valid.yaml"]))
    assert neither.exit_code == 2 and "--to yaml or --to flow" in neither.stderr
    assert run("convert", str(files["valid.yaml"]), "-o", str(tmp_path / "out.txt")).exit_code == 2


def test_plan_refuses_to_write_over_a_worker_module_it_imported(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    module = tmp_path / "plan_wk_module.py"
    module.write_text("from flowdsl import worker\n\n@worker('a')\nasync def a(data, ctx):\n    return {}\n")
    spec = tmp_path / "flow.yaml"
    spec.write_text("flowdsl: 1\nname: t\nworkers: [plan_wk_module]\nsteps: [a]\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = module.read_bytes()
    result = run("plan", str(spec), "-o", str(module))
    assert result.exit_code == 2 and "refusing to write over it" in result.stderr, result.output
    assert "which the spec uses (a sub-flow or a worker module)" in " ".join(result.stderr.split())
    assert module.read_bytes() == before
    assert run("plan", str(spec), "-o", str(tmp_path / "plan.json")).exit_code == 0


def test_plan_and_diagram_refuse_to_write_over_the_spec(files: dict[str, Path], tmp_path: Path) -> None:
    source = files["valid.yaml"]
    before = source.read_bytes()
    for args in (["plan", "--no-import", str(source), "-o", str(source)],
                 ["plan", "--no-import", str(source), "--source-map", str(source)],
                 ["diagram", str(source), "-f", "ascii", "-o", str(source)]):  # (a .yaml suffix alone: no format)
        result = run(*args)
        assert result.exit_code == 2 and "refusing to write over it" in result.stderr, args
        assert source.read_bytes() == before
    same = run("plan", "--no-import", str(source), "-o", str(tmp_path / "p.json"), "--source-map",
               str(tmp_path / "p.json"))
    assert same.exit_code == 2 and "name the same file" in same.stderr and not (tmp_path / "p.json").exists()


def test_a_plan_output_that_fails_writes_nothing_at_all(files: dict[str, Path], tmp_path: Path) -> None:
    """The plan to stdout with a --source-map that cannot be written: nothing is printed; -o and a bad
    --source-map: the -o file is not written either (nor left half written)."""
    result = run("plan", "--no-import", str(files["valid.yaml"]), "--source-map", str(tmp_path))
    assert result.exit_code == 2 and result.stdout == ""
    assert f"cannot write {tmp_path}: it is a directory (--source-map takes a file name)" in result.stderr
    out = tmp_path / "plan.json"
    out.write_text("old")
    result = run("plan", "--no-import", str(files["valid.yaml"]), "-o", str(out), "--source-map",
                 str(tmp_path / "no" / "dir" / "map.json"))
    assert result.exit_code == 2 and out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["plan.json", *(p.name for p in files.values())])


def test_an_output_file_keeps_the_usual_mode(files: dict[str, Path], tmp_path: Path) -> None:
    import os

    out = tmp_path / "plan.json"
    assert run("plan", "--no-import", str(files["valid.yaml"]), "-o", str(out)).exit_code == 0
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask


# --- worker modules that fail at import --------------------------------------------------------------------


@pytest.mark.parametrize(("body", "reason"), [
    ("raise RuntimeError('boom at import')\n", "RuntimeError: boom at import"),
    ("import sys\nsys.exit(5)\n", "SystemExit: 5"),
    ("raise KeyboardInterrupt\n", "KeyboardInterrupt"),
    ("import no_such_dependency_xyz\n", "ModuleNotFoundError: No module named 'no_such_dependency_xyz'"),
])
def test_a_worker_module_failing_at_import_is_fd205_with_its_real_error(
        body: str, reason: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The module lies beside the spec and the command runs elsewhere: the error its import raised is reported,
    with where the module was found — even sys.exit() and KeyboardInterrupt — by validate (1) and run (2)."""
    name = f"importfail_{abs(hash(body)) % 10**8}"
    (tmp_path / "spec").mkdir()
    (tmp_path / "spec" / f"{name}.py").write_text(body)
    spec = tmp_path / "spec" / "flow.yaml"
    spec.write_text(f"flowdsl: 1\nname: t\nworkers: [{name}]\nsteps: [a]\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setattr(sys, "path", list(sys.path))
    expected = (f"error FD205: cannot import worker module '{name}': {reason} (in {tmp_path / 'spec' / name}.py; "
                "`flowdsl validate --no-import` checks the spec without importing)")
    checked = subprocess.run([FLOWDSL, "validate", str(spec)], capture_output=True, text=True)
    assert checked.returncode == 1 and expected in checked.stderr and "Traceback" not in checked.stderr
    ran = subprocess.run([FLOWDSL, "run", str(spec), "--no-record"], capture_output=True, text=True)
    assert ran.returncode == 2 and expected in ran.stderr and "Traceback" not in ran.stderr


def test_a_worker_module_found_nowhere_names_every_place_searched(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "spec").mkdir()
    spec = tmp_path / "spec" / "flow.yaml"
    spec.write_text("flowdsl: 1\nname: t\nworkers: [nowhere_module_xyz]\nsteps: [a]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    result = run("validate", "-f", "json", str(spec))
    (d,) = json.loads(result.stdout)
    assert result.exit_code == 1 and d["code"] == "FD205"
    assert d["message"] == (f"cannot import worker module 'nowhere_module_xyz': ModuleNotFoundError: No module "
                            f"named 'nowhere_module_xyz' (searched {tmp_path}, spec; `flowdsl validate "
                            "--no-import` checks the spec without importing)")
