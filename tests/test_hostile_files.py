"""Hostile spec files: sub-flow bombs, paths that are not regular files, versions YAML reads as numbers,
errors that hid others, and empty ``.flow`` files. Each gets a diagnostic, quickly, never a hang.

A test that would hang without its fix is guarded so that it fails instead: a FIFO is opened for writing
(and closed) by a watchdog thread after a few seconds, which hands a blocked reader an empty file; reading a
sub-flow file too often raises.
"""

from __future__ import annotations

import errno
import os
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import flowdsl.api
import flowdsl.compiler_checks
import flowdsl.source
from flowdsl.api import compile_spec, compile_text, load
from flowdsl.cli import app
from flowdsl.diagnostics import Diagnostic, SpecError
from flowdsl.source import MAX_NODES, MAX_TEXT

HEAD = "flowdsl: 1\nname: hostile\n"


def diagnostics_of(text: str, filename: str = "spec.yaml") -> list[Diagnostic]:
    try:
        compile_text(text, filename=filename)
    except SpecError as exc:
        return exc.diagnostics
    return []


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# --- sub-flow bombs ------------------------------------------------------------------------------------------


def bomb(directory: Path, levels: int) -> Path:
    """``f0.yaml`` … ``f{levels}.yaml``: each file uses the next one twice, the last has one step, so that
    ``f0.yaml`` expands to about 3 × 2**levels nodes."""
    for i in range(levels):
        write(directory / f"f{i}.yaml", f"""\
            flowdsl: 1
            name: f{i}
            steps:
              - flow: left
                path: f{i + 1}.yaml
              - flow: right
                path: f{i + 1}.yaml
            """)
    write(directory / f"f{levels}.yaml", f"flowdsl: 1\nname: f{levels}\nsteps: [work]\n")
    return directory / "f0.yaml"


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often each file is read; reading one more than 3 times fails the test at once (instead of the
    compilation going on for minutes)."""
    count: dict[str, int] = {}
    real = flowdsl.source.read_source

    def counted(path: str) -> Any:
        key = os.path.realpath(path)
        count[key] = count.get(key, 0) + 1
        assert count[key] <= 3, f"{path} read {count[key]} times"
        return real(path)

    monkeypatch.setattr(flowdsl.source, "read_source", counted)
    return count


def test_a_sub_flow_bomb_is_refused_quickly_at_the_use_that_passes_the_budget(
        tmp_path: Path, reads: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flowdsl.api, "MAX_PLAN_TEXT", 10**12)  # (the budget of nodes alone; of text: below)
    root = bomb(tmp_path, 18)  # 2**18 uses of f18.yaml: over 500,000 nodes once expanded
    started = time.perf_counter()
    result = compile_spec(root, check_workers=False)
    elapsed = time.perf_counter() - started
    assert elapsed < 5, f"took {elapsed:.1f}s"
    assert result.plan is None
    (d,) = [d for d in result.diagnostics if d.code == "FD106"]
    assert d.message == (f"the flow expands to more than {MAX_NODES} nodes once its sub-flows are expanded (each "
                         "use of a sub-flow adds all of its nodes): f0.yaml → f1.yaml")
    assert (Path(d.file or "").name, d.line, d.column, d.path) == ("f0.yaml", 7, 11, "/steps/1/path")
    assert set(reads.values()) == {1}, "each file is read once"


def test_a_sub_flow_bomb_of_long_text_is_refused_at_the_use_that_passes_the_text_budget(tmp_path: Path) -> None:
    """Few nodes, much text: the last file's 700 KB description used 2**3 times is 5.6 MB of plan, over the 4 MiB
    a spec may hold (eighteen levels would have been a terabyte, well within the budget of nodes)."""
    root = bomb(tmp_path, 3)
    write(tmp_path / "f3.yaml", f"flowdsl: 1\nname: f3\ndescription: {'x' * 700_000}\nsteps: [work]\n")
    result = compile_spec(root, check_workers=False)
    assert result.plan is None
    (d,) = [d for d in result.diagnostics if d.code == "FD106"]
    assert d.message == (f"the flow expands to more than {MAX_TEXT} characters of text (keys and values) once its "
                         "sub-flows are expanded (each use of a sub-flow adds all of its text): f0.yaml → f1.yaml")
    bomb(tmp_path / "half", 2)  # 4 uses of the 700 KB: 2.8 MB, allowed
    write(tmp_path / "half" / "f2.yaml", f"flowdsl: 1\nname: f2\ndescription: {'x' * 700_000}\nsteps: [work]\n")
    half = compile_spec(tmp_path / "half" / "f0.yaml", check_workers=False)
    assert half.ok, half.diagnostics
    eighteen = compile_spec(bomb(tmp_path / "eighteen", 18), check_workers=False)  # as docs/diagnostics.md says
    (d,) = [d for d in eighteen.diagnostics if d.code == "FD106"]
    assert (Path(d.file or "").name, d.line, d.column) == ("f2.yaml", 7, 11)
    assert d.message.endswith("all of its text): f0.yaml → f1.yaml → f2.yaml → f3.yaml")


def test_the_budget_counts_every_use_of_a_sub_flow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flowdsl.api, "MAX_PLAN_NODES", 1000)
    fine = compile_spec(bomb(tmp_path / "fine", 7), check_workers=False)  # 3 × 2**7 - 2 = 382 nodes
    assert fine.ok and len(fine.plan["nodes"]) == 382  # type: ignore[index]
    result = compile_spec(bomb(tmp_path / "big", 9), check_workers=False)  # 1534 nodes
    assert [(d.code, Path(d.file or "").name, d.line) for d in result.diagnostics] == [("FD106", "f0.yaml", 7)]
    assert result.diagnostics[0].message.endswith(": f0.yaml → f1.yaml")


def test_the_chain_leads_to_the_file_where_the_budget_runs_out(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flowdsl.api, "MAX_PLAN_NODES", 1000)
    bomb(tmp_path / "lib", 9)
    root = write(tmp_path / "root.yaml", HEAD + "steps:\n  - before\n  - flow: big\n    path: lib/f0.yaml\n")
    (d,) = compile_spec(root, check_workers=False).diagnostics
    assert d.code == "FD106" and d.message.endswith(": root.yaml → f0.yaml → f1.yaml")
    assert (Path(d.file or "").name, d.line) == ("f0.yaml", 7)


def test_a_sub_flow_used_many_times_is_read_and_reported_once(tmp_path: Path, reads: dict[str, int]) -> None:
    write(tmp_path / "lib" / "wrap.yaml", "flowdsl: 1\nname: wrap\nsteps:\n  - wrap:\n      timeout: soon\n")
    write(tmp_path / "lib" / "gone.yaml", "flowdsl: 1\nsteps: [a]\n")  # no name: cannot be loaded
    root = write(tmp_path / "root.yaml", HEAD + textwrap.dedent("""\
        steps:
          - flow: one
            path: lib/wrap.yaml
          - flow: two
            path: lib/../lib/wrap.yaml
          - flow: three
            path: lib/gone.yaml
          - flow: four
            path: lib/gone.yaml
        """))
    diags = compile_spec(root, check_workers=False).diagnostics
    found = sorted((Path(d.file or "").name, d.code, d.line) for d in diags)
    assert found == [("gone.yaml", "FD201", 1), ("root.yaml", "FD308", 9), ("root.yaml", "FD308", 11),
                     ("wrap.yaml", "FD401", 5)]
    assert all(n == 1 for n in reads.values()) and len(reads) == 3


# --- paths that are not regular files ------------------------------------------------------------------------


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    """A FIFO named ``pipe.yaml``. Should anything wait on it for a reader's open, a watchdog hands it an empty
    file after 5 s (opening the FIFO for writing and closing it), so that the test fails instead of hanging."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs FIFOs")
    path = tmp_path / "pipe.yaml"
    os.mkfifo(path)
    done = threading.Event()

    def watchdog() -> None:
        if done.wait(5):
            return
        while not done.is_set():
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as exc:  # ENXIO: nobody is reading (yet)
                assert exc.errno == errno.ENXIO
            done.wait(0.05)

    thread = threading.Thread(target=watchdog, daemon=True)
    thread.start()
    yield path
    done.set()
    thread.join()


NOT_REGULAR = "cannot read file: not a regular file (a FIFO)"


def test_a_fifo_is_fd101_and_never_opened_for_reading(fifo: Path) -> None:
    (d,) = load(fifo).diagnostics
    assert (d.code, d.message, d.line) == ("FD101", NOT_REGULAR, None)
    (d,) = compile_spec(fifo).diagnostics
    assert (d.code, d.message) == ("FD101", NOT_REGULAR)


@pytest.mark.parametrize("command", [
    ["validate"], ["validate", "--no-import"], ["plan"], ["convert", "--to", "flow"], ["diagram"],
])
def test_every_command_refuses_a_fifo_as_a_usage_error(fifo: Path, command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, str(fifo)])
    assert result.exit_code == 2, result.output
    assert f"{fifo}: error FD101: {NOT_REGULAR}" in result.stderr


def test_a_fifo_as_a_sub_flow_is_fd308_at_the_use(fifo: Path) -> None:
    root = write(fifo.parent / "root.yaml", HEAD + "steps:\n  - flow: piped\n    path: pipe.yaml\n")
    (d,) = compile_spec(root).diagnostics
    assert (d.code, Path(d.file or "").name, d.line, d.column) == ("FD308", "root.yaml", 5, 11)
    assert d.message == f"sub-flow 'pipe.yaml' cannot be loaded: {NOT_REGULAR}"


@pytest.mark.parametrize(("target", "kind"), [("/dev/null", "a character device"),
                                              ("/dev/zero", "a character device"),
                                              ("/dev/stdin", None)])
def test_a_link_to_a_device_is_not_read(tmp_path: Path, target: str, kind: str | None) -> None:
    if not os.path.exists(target):
        pytest.skip(f"no {target}")
    link = tmp_path / "device.yaml"
    link.symlink_to(target)
    (d,) = load(link).diagnostics
    assert d.code == "FD101" and d.message.startswith("cannot read file: not a regular file (")
    if kind is not None:
        assert d.message == f"cannot read file: not a regular file ({kind})"


def test_a_directory_is_not_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "dir.yaml").mkdir()
    (d,) = load(tmp_path / "dir.yaml").diagnostics
    assert (d.code, d.message) == ("FD101", "cannot read file: not a regular file (a directory)")


# --- versions that YAML reads as numbers ---------------------------------------------------------------------


@pytest.mark.parametrize(("written", "number"), [("1.10", "1.1"), ("1e3", "1000.0"), ("0x10", "16"),
                                                  ("2.0", "2.0"), ("+2", "2")])
def test_a_version_read_as_a_number_is_refused_with_the_quoted_form(written: str, number: str) -> None:
    diags = diagnostics_of(HEAD + f"version: {written}\nsteps:\n  - a:\n      timeout: soon\n")
    assert [(d.code, d.line, d.column, d.path) for d in diags] == [
        ("FD201", 3, 10, "/version"), ("FD401", 6, 16, "/steps/0/a/timeout")]  # and the rest is still checked
    assert diags[0].message == (f'the version {written} is read as the number {number}; write it as a string: '
                                f'version: "{written}" (a version may be a number only when it is a whole number '
                                'written in digits, like 2)')


def test_a_version_in_the_text_syntax_gets_the_text_syntax_hint() -> None:
    (d,) = diagnostics_of("flow hostile\nversion 1.10\nstep a\n", "spec.flow")
    assert (d.code, d.line, d.column) == ("FD201", 2, 9)
    assert 'write it as a string: version "1.10"' in d.message


@pytest.mark.parametrize(("text", "filename", "version"), [
    (HEAD + 'version: "1.10"\nsteps: [a]\n', "spec.yaml", "1.10"),
    (HEAD + "version: 2\nsteps: [a]\n", "spec.yaml", "2"),
    (HEAD + "version: 2024.05.01\nsteps: [a]\n", "spec.yaml", "2024.05.01"),  # not a number: a string
    ('flow hostile\nversion "1.10"\nstep a\n', "spec.flow", "1.10"),
    ("flow hostile\nversion 2\nstep a\n", "spec.flow", "2"),
])
def test_a_version_string_or_whole_number_is_kept(text: str, filename: str, version: str) -> None:
    assert compile_text(text, filename=filename)["flow"]["version"] == version


# --- one error no longer hides the others --------------------------------------------------------------------


def codes_at(steps: str) -> list[tuple[str, int | None]]:
    """Each diagnostic's code and line for a spec of ``HEAD`` and then ``steps`` (indented as in the test)."""
    return [(d.code, d.line) for d in diagnostics_of(HEAD + textwrap.dedent(steps))]


def test_an_unknown_need_does_not_hide_the_other_graph_checks() -> None:
    assert codes_at("""\
        steps:
          - a
          - b:
              needs: [aa]
              with: {x: "${ $steps.a.v }"}
          - parallel: both
            branches:
              - c: {output: r}
              - d: {output: r}
          - e:
              with: {y: "${ $steps.nope }"}
          - f:
              when: "${ false }"
        """) == [("FD303", 6), ("FD307", 11), ("FD303", 13), ("FD306", 15)]
    # b reads a, which it may come after once 'aa' is corrected: no FD504 about that


def test_what_a_damaged_need_cannot_change_is_still_reported() -> None:
    assert codes_at("""\
        steps:
          - b:
              needs: [missing]
              with: {x: "${ $steps.later.v }"}
          - later
        """) == [("FD303", 5), ("FD504", 6)]  # 'later' comes after b whatever b needs


def test_a_need_outside_the_list_does_not_hide_the_other_checks() -> None:
    assert codes_at("""\
        steps:
          - a
          - sequence: s
            steps:
              - b:
                  needs: [a]
                  with: {x: "${ $steps.nope }"}
        """) == [("FD305", 8), ("FD303", 9)]


def test_a_cycle_does_not_hide_the_other_checks() -> None:
    assert codes_at("""\
        steps:
          - g:
              needs: [h]
          - h:
              needs: [g]
              with: {x: "${ $steps.nope }"}
          - parallel: both
            branches:
              - c: {output: r}
              - d: {output: r}
        """) == [("FD304", 5), ("FD303", 8), ("FD307", 12)]


def test_many_unknown_needs_are_checked_in_bounded_time() -> None:
    # past the damaged needs tracked one by one, whatever follows any of them is left unjudged as a whole
    many = flowdsl.compiler_checks._DAMAGE_BITS + 50
    groups = "".join(f"  - sequence: g{i}\n    steps:\n      - s{i}:\n          needs: [nope]\n"
                     f"          output: r{i}\n" for i in range(many))
    first = "  - parallel: first\n    branches:\n      - c: {output: r}\n      - d: {output: r}\n"
    text = HEAD + "steps:\n" + first + groups
    started = time.perf_counter()
    diags = diagnostics_of(text)
    assert time.perf_counter() - started < 10
    assert sorted({d.code for d in diags}) == ["FD303", "FD307"]
    assert len(diags) == many + 1 and [d.line for d in diags if d.code == "FD307"] == [7]


def test_a_duplicate_id_does_not_hide_unknown_names() -> None:
    assert codes_at("""\
        steps:
          - a
          - a
          - b:
              needs: [zz]
              with: {y: "${ $steps.nope }"}
        """) == [("FD301", 5), ("FD303", 7), ("FD303", 8)]


# --- empty .flow files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "  # indented comment\n\n# another"])
def test_an_empty_flow_file_is_fd109_as_an_empty_yaml_file_is(text: str) -> None:
    (flow,) = diagnostics_of(text, "spec.flow")
    (yaml,) = diagnostics_of(text.replace("  #", "#"), "spec.yaml")
    assert (flow.code, flow.line, flow.column, flow.message) == (yaml.code, yaml.line, yaml.column, yaml.message)
    assert flow.code == "FD109" and flow.message.startswith("the document is empty")


def test_an_empty_flow_file_on_the_command_line(tmp_path: Path) -> None:
    spec = write(tmp_path / "empty.flow", "# nothing yet\n")
    result = CliRunner().invoke(app, ["validate", "--no-import", str(spec)])
    assert result.exit_code == 1
    assert f"{spec}:1:1: error FD109: the document is empty" in result.stderr


# --- worker modules beside a spec: importing runs them --------------------------------------------------------


def test_validate_runs_a_module_beside_the_spec_unless_no_import_and_the_docs_say_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``workers:`` names modules, found next to the spec too: ``validate`` (and ``plan``) import — so run — them;
    ``--no-import`` runs nothing. docs/diagnostics.md says it plainly, for whoever checks a spec they did not write."""
    import sys

    module = f"beside_{os.getpid()}_{time.monotonic_ns()}"
    marker = tmp_path / "ran"
    write(tmp_path / "spec" / f"{module}.py", f"open({str(marker)!r}, 'a').write('ran\\n')\n")
    spec = write(tmp_path / "spec" / "flow.yaml", f"flowdsl: 1\nname: beside\nworkers: [{module}]\nsteps: [a]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    runner = CliRunner()
    try:
        for command in ("validate", "plan"):
            runner.invoke(app, [command, "--no-import", str(spec)])
        assert not marker.exists()
        runner.invoke(app, ["validate", str(spec)])
        assert marker.read_text() == "ran\n"
    finally:
        sys.modules.pop(module, None)
    docs = (Path(__file__).resolve().parent.parent / "docs" / "diagnostics.md").read_text(encoding="utf-8")
    section = docs.split("### Checking workers, or not", 1)[1].split("\n## ", 1)[0]
    assert "**Importing a module runs its code**" in section and "Use `--no-import` for a spec you do not" in section
