"""Hostile input: every malformed or malicious spec gets a diagnostic, never a crash.

Covers YAML tags that would run code, alias bombs, nesting deep enough to crash
libyaml's composer, oversized and non-UTF-8 files, control characters, empty
and multi-document files, duplicate keys, unreadable paths, and the ``.flow``
front end. The deep-nesting cases also run in a child process, so that a
segfault fails a test instead of killing pytest; the in-process run of a case
only happens when its child process survived.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flowdsl.api import compile_spec, compile_text, load, load_text
from flowdsl.cli import app
from flowdsl.diagnostics import CODES, Diagnostic, SpecError
from flowdsl.source import MAX_BYTES, MAX_DEPTH, MAX_NODES

ROOT = Path(__file__).resolve().parent.parent
HEAD = "flowdsl: 1\nname: hostile\n"
VALID = HEAD + "steps: [a, b]\n"


def diagnostics_of(text: str, filename: str = "spec.yaml") -> list[Diagnostic]:
    """Every diagnostic the front end, checks and compiler give for ``text`` (none: it compiled)."""
    try:
        compile_text(text, filename=filename)
    except SpecError as exc:
        assert exc.diagnostics, "SpecError without diagnostics"
        return exc.diagnostics
    return []


def well_formed(diags: list[Diagnostic]) -> None:
    for d in diags:
        assert d.code in CODES and CODES[d.code][0] == d.severity, d
        assert d.message and d.message == d.message.strip(), d
        assert d.line is None or d.line >= 1, d
        assert d.column is None or d.column >= 1, d


def codes(text: str, filename: str = "spec.yaml") -> set[str]:
    diags = diagnostics_of(text, filename)
    well_formed(diags)
    return {d.code for d in diags}


def only(text: str, code: str, filename: str = "spec.yaml") -> Diagnostic:
    diags = diagnostics_of(text, filename)
    well_formed(diags)
    assert [d.code for d in diags] == [code], [d.format() for d in diags]
    return diags[0]


def test_the_baseline_spec_is_valid() -> None:
    assert diagnostics_of(VALID) == []


# --- tags -----------------------------------------------------------------------


@pytest.mark.parametrize("node", [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/new:os.system ['touch {marker}']",
    "!!python/object:os.system {{}}",
    "!!python/name:os.system",
    "!!python/module:os",
    "!!python/tuple [a, b]",
    "!!python/str a",
    "!<tag:yaml.org,2002:python/object/apply:os.system> ['touch {marker}']",
    "!!binary aGVsbG8=",
    "!!set {{a: null}}",
    "!!omap [a: 1]",
    "!!pairs [a: 1]",
    "!custom a",
])
def test_tags_that_are_not_plain_data_are_fd105_and_never_run(node: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = HEAD + "steps:\n  - " + node.format(marker=marker) + "\n"
    d = only(text, "FD105")
    assert (d.line, d.column) == (4, 5)
    assert "is not allowed" in d.message and "!" in d.message
    assert not marker.exists()


def test_tag_directive_cannot_smuggle_python_tags(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = f"%TAG !p! tag:yaml.org,2002:python/\n---\n{HEAD}steps:\n  - !p!object/apply:os.system ['touch {marker}']\n"
    d = only(text, "FD105")
    assert "python/object/apply:os.system" in d.message
    assert not marker.exists()


@pytest.mark.parametrize("key", ["!!python/str name", "!!binary bmFtZQ==", "!foo name"])
def test_tags_on_keys_are_fd105(key: str) -> None:
    assert only(HEAD + "steps: [a]\n" + key + ": x\n", "FD105").line == 4


def test_core_tags_are_plain_data() -> None:
    assert diagnostics_of(HEAD + "description: !!str 123\nsteps: [!!str a]\ntimeout: !!int 5\n") == []


@pytest.mark.parametrize(("node", "said"), [("!!str [1]", "'!!str' cannot tag a list"),
                                            ("!!int {a: 1}", "'!!int' cannot tag a mapping"),
                                            ("!!seq {a: 1}", "'!!seq' cannot tag a mapping")])
def test_a_core_tag_on_the_wrong_kind_of_node_says_so(node: str, said: str) -> None:
    """`!!str [1]` said "the YAML tag '!!str' is not allowed", a tag the docs list as allowed."""
    d = only(HEAD + "steps:\n  - a: {with: {v: " + node + "}}\n", "FD105")
    assert said in d.message and "not allowed" not in d.message


def test_the_non_specific_tag_makes_a_string() -> None:
    """YAML: a scalar tagged `!` is a string, not resolved (`! 5` was the integer 5)."""
    from flowdsl.source import load_yaml

    doc = load_yaml(HEAD + "steps:\n  - a: {with: {v: ! 5, w: ! true, x: 5}}\n", "t.yaml")
    assert doc.diagnostics == [] and doc.data["steps"][0]["a"]["with"] == {"v": "5", "w": "true", "x": 5}


def test_a_line_separator_breaking_a_plain_value_is_named_in_the_error() -> None:
    """PyYAML reads U+2028 as a line break: the error spoke of a missing ':' on a line that has none."""
    d = only(HEAD + "description: x\u2028y\nsteps: [a]\n", "FD103")
    assert "line 3 holds U+2028, which the YAML reader takes for a line break: write that value in quotes" in d.message
    assert diagnostics_of(HEAD + 'description: "x\u2028y"\nsteps: [a]\n') == []


def test_merge_keys_are_fd105() -> None:
    text = HEAD + "x: &x {timeout: 5s}\nsteps: [a]\ndefaults:\n  <<: *x\n"
    assert {d.code for d in diagnostics_of(text)} == {"FD105"}


# --- aliases ----------------------------------------------------------------------


def _laughs(levels: int, width: int, mapping: bool = False) -> str:
    lines = ["l0: &l0 lol"]
    for i in range(1, levels + 1):
        if mapping:
            lines.append(f"l{i}: &l{i} {{" + ", ".join(f"k{j}: *l{i - 1}" for j in range(width)) + "}")
        else:
            lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("mapping", [False, True], ids=["lists", "mappings"])
def test_billion_laughs_is_fd106_fast_and_small(mapping: bool) -> None:
    text = HEAD + "steps: [a]\n" + _laughs(levels=9, width=10, mapping=mapping)  # 10**9 nodes once expanded
    tracemalloc.start()
    started = time.perf_counter()
    try:
        doc = load_text(text)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [d.code for d in doc.diagnostics] == ["FD106"] and doc.data is None
    assert str(MAX_NODES) in doc.diagnostics[0].message
    assert doc.diagnostics[0].line is not None  # at the alias that crossed the budget
    assert peak < 20 * 1024 * 1024, f"loading an alias bomb used {peak / 1e6:.0f} MB"
    assert elapsed < 5, f"loading an alias bomb took {elapsed:.1f} s"


def test_the_whole_pipeline_stops_the_bomb_too() -> None:
    started = time.perf_counter()
    assert codes(HEAD + "steps:\n  - a:\n      with: {payload: *l9}\n" + _laughs(9, 10)) == {"FD103"}
    assert codes(_laughs(9, 10) + HEAD + "steps:\n  - a:\n      with: {payload: *l9}\n") == {"FD106"}
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("text", ["&a [*a]\n", "&a {x: *a}\n", "&a {x: [1, {y: *a}]}\n"])
def test_an_alias_inside_its_own_anchor_is_fd106(text: str) -> None:
    assert only(text, "FD106").line == 1


def test_undefined_alias_is_fd103() -> None:
    assert only(HEAD + "steps: [*nothing]\n", "FD103").line == 3


def test_an_alias_used_as_a_key_must_be_a_string() -> None:
    assert codes(HEAD + "steps: [a]\nlist: &l [1]\n? *l\n: x\n") == {"FD201"}
    # an alias of a string is a fine key: here it is 'timeout', and only the unknown 'k' is wrong
    assert "unknown field 'k'" in only(HEAD + "steps: [a]\nk: &k timeout\n*k : 5s\n", "FD202").message


@pytest.mark.parametrize(("anchored", "code", "where"), [
    ("x: &a !!python/name:os.system x", "FD105", (3, 4)),
    ('x: &a "bell\\a"', "FD110", (3, 4)),
    ("x: &a !!int ten", "FD201", (3, 4)),
    ("x:\n  ? &a !!python/name:os.system x\n  : 1", "FD105", (4, 5)),  # an anchored key
    ('x:\n  ? &a "bell\\a"\n  : 1', "FD110", (4, 5)),
])
def test_an_alias_of_a_refused_value_reports_the_value_not_an_undefined_alias(anchored: str, code: str,
                                                                             where: tuple[int, int]) -> None:
    """The anchor of a value refused while reading still exists: its aliases are refused with it, silently."""
    for alias_at in ("with: {y: *a}", "with: {*a : 1}", "description: *a"):
        d = only(HEAD + f"{anchored}\nsteps:\n  - a:\n      {alias_at}\n", code)
        assert (d.line, d.column) == where, d.format()


def test_an_alias_of_a_raw_control_character_is_no_undefined_alias() -> None:
    d = only(HEAD + "x: &a bell\x07\nsteps:\n  - a: {with: {y: *a}}\n", "FD110")
    assert (d.line, d.column) == (3, 11)  # the character itself, found before the parser runs


def test_an_anchor_written_again_is_the_new_value() -> None:
    """An anchor of a number that is not finite, written again on a good value: aliases after it are fine."""
    from flowdsl.api import load_text

    doc = load_text(HEAD + "timeout: &a .nan\ndefaults: {retry: &a 3}\nsteps:\n  - a: {retry: *a}\n", "t.yaml")
    assert [(d.code, d.line) for d in doc.diagnostics] == [("FD201", 3)]
    assert doc.data is not None and "timeout" not in doc.data and doc.data["steps"] == [{"a": {"retry": 3}}]


def test_what_was_found_before_reading_stops_is_still_reported() -> None:
    text = HEAD + 'description: "bell\\a"\nsteps: [*nothing]\n'
    assert [(d.code, d.line) for d in diagnostics_of(text)] == [("FD110", 3), ("FD103", 4)]


def test_moderate_aliases_are_fine() -> None:
    text = HEAD + ("defaults:\n  retry: &r {attempts: 3, initial: 100ms}\n"
                   "steps:\n  - a: {retry: *r}\n  - b: {retry: *r, with: &w {x: 1}}\n  - c: {with: *w}\n")
    plan = compile_text(text)
    assert plan["nodes"]["a"]["retry"]["attempts"] == plan["nodes"]["b"]["retry"]["attempts"] == 3
    assert plan["nodes"]["c"]["with"] == {"x": 1}


# --- aliases of long strings: the text budget --------------------------------------------------------------

#: a string of a million characters: four aliases of it, with it, are just over ``MAX_TEXT`` (4,194,304)
MEGA = "x" * 1_000_000


def _megabomb(copies: int) -> str:
    """The docs' example of FD106 for text (docs/diagnostics.md): ``text`` and ``copies`` aliases of it."""
    return (HEAD.replace("hostile", "big") + "steps:\n  - a:\n      with:\n"
            f'        text: &t "{MEGA}"\n        copies: [{", ".join(["*t"] * copies)}]\n')


def test_aliases_of_a_long_string_past_the_text_budget_are_fd106_at_the_alias() -> None:
    """A few aliases of a long string are few nodes but much text: refused at the alias that passes the budget of
    characters, before anything is built (a 1 MB spec with three levels of ten aliases was a 1.1 GB plan)."""
    started = time.perf_counter()
    d = only(_megabomb(4), "FD106", "big.yaml")
    assert d.format() == ("big.yaml:7:30: error FD106: the document expands to more than 4194304 characters of text "
                          "(keys and values) once its aliases are expanded")  # as docs/diagnostics.md shows it
    assert time.perf_counter() - started < 5
    assert compile_text(_megabomb(3))["nodes"]["a"]["with"]["copies"] == [MEGA] * 3  # within the budget


@pytest.mark.parametrize("anchored", [
    "x: &t {MEGA}\n",  # a plain scalar
    "x: &t [{MEGA}]\n",  # a list holding it: the list's text is its items'
    "x: &t {{? {MEGA} : 1}}\n",  # a mapping: the text of its keys counts too
    "x: &t\n  y: &u {MEGA}\nz: *u\n",  # an alias inside, counted before
    "x:\n  ? &t {MEGA}\n  : 1\n",  # an anchored key
])
def test_the_text_budget_counts_what_every_alias_repeats(anchored: str) -> None:
    text = HEAD + "steps: [a]\n" + anchored.format(MEGA=MEGA) + "copies: [*t, *t, *t, *t]\n"
    doc = load_text(text)
    assert [d.code for d in doc.diagnostics] == ["FD106"] and doc.data is None
    assert "characters of text" in doc.diagnostics[0].message


def test_an_alias_bomb_of_long_strings_is_fd106_fast_and_small() -> None:
    """Three levels of ten aliases of a 100 KB string: 100 GB once expanded, stopped after a few MB of work."""
    lines = [f"l0: &l0 {'x' * 100_000}"] + [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in (1, 2, 3)]
    tracemalloc.start()
    started = time.perf_counter()
    try:
        doc = load_text(HEAD + "steps: [a]\n" + "\n".join(lines) + "\n")
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(d.code, d.line) for d in doc.diagnostics] == [("FD106", 6)]  # l2: past 4 MB of text
    assert peak < 20 * 1024 * 1024 and elapsed < 5, (peak, elapsed)


# --- deep nesting -------------------------------------------------------------------

N = 50_000

DEEP: dict[str, str] = {
    "flow_lists": HEAD + "steps: [a]\nx: " + "[" * N + "]" * N + "\n",
    "flow_mappings": HEAD + "steps: [a]\nx: " + "{a: " * N + "1" + "}" * N + "\n",
    "flow_unclosed": HEAD + "steps: [a]\nx: " + "[" * N + "\n",
    "block_dashes": HEAD + "steps: [a]\nx:\n" + "- " * N + "a\n",
    "block_question_marks": HEAD + "steps: [a]\n" + "? " * N + "a\n",
    "block_indentation": "".join(" " * i + f"k{i}:\n" for i in range(2_500)),
    # brackets hidden from a naive scanner: quotes that are not quotes, multi-line strings with ']'
    "apostrophe_in_key": "a'b: " + "[" * N + "]" * N + "\n",
    "multiline_string_closers": '[ "\n]\n", ' * N + "x" + "]" * N + "\n",
    "comment_like": "x: " + "[#" * N + "\n",
    "steps_in_steps": HEAD + "steps:\n" + "".join(
        " " * (2 * i) + f"- sequence: s{i}\n" + " " * (2 * i) + "  steps:\n" for i in range(600))
    + " " * 1200 + "- a\n",
}
DEEP_FLOW: dict[str, str] = {
    "json_value": "flow deep\nstep a with " + "[" * N + "]" * N + "\n",
    "json_object": "flow deep\nstep a with " + '{"k": ' * N + "1" + "}" * N + "\n",
    "blocks": "flow deep\n" + "".join(f"sequence s{i} {{\n" for i in range(N)) + "step a\n" + "}\n" * N,
    "parallel_blocks": "flow deep\n" + "".join(f"parallel p{i} {{\n" for i in range(99)) + "step a\n" + "}\n" * 99,
}
#: the child runs the front end only (where a C parser could crash); the full pipeline runs in-process and in the CLI
_CHILD = """
import json, sys
from flowdsl.api import load
print(json.dumps({path: sorted({d.code for d in load(path).diagnostics}) for path in sys.argv[1:]}))
"""


@pytest.fixture(scope="module")
def deep_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("deep")
    files = {}
    for name, text in DEEP.items():
        files[name] = base / f"{name}.yaml"
        files[name].write_text(text, encoding="utf-8")
    for name, text in DEEP_FLOW.items():
        files["flow_" + name] = base / f"{name}.flow"
        files["flow_" + name].write_text(text, encoding="utf-8")
    return files


@pytest.fixture(scope="module")
def in_child(deep_files: dict[str, Path]) -> dict[str, tuple[int, list[str] | None]]:
    """Each deep file loaded in a fresh child process: (exit status, diagnostic codes)."""
    children = {name: subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, cwd=ROOT)
                for name, path in deep_files.items()}
    results: dict[str, tuple[int, list[str] | None]] = {}
    for name, proc in children.items():
        out, _ = proc.communicate(timeout=120)
        found = json.loads(out)[str(deep_files[name])] if proc.returncode == 0 else None
        results[name] = (proc.returncode, found)
    return results


def _expected_deep(name: str) -> set[str]:
    if name == "flow_unclosed":
        return {"FD107", "FD103"}  # either bound may be met first; never a crash
    if name == "comment_like":
        return {"FD107", "FD103"}
    if name == "block_question_marks":
        return {"FD107", "FD201"}  # the complex keys read before the bound are FD201 each: still reported
    return {"FD107"}


@pytest.mark.parametrize("name", [*DEEP, *("flow_" + n for n in DEEP_FLOW)])
def test_deep_nesting_in_a_child_process(name: str, in_child: dict[str, tuple[int, list[str] | None]]) -> None:
    status, found = in_child[name]
    assert status == 0, f"compiling {name} killed the process (status {status}: a crash, not a diagnostic)"
    assert found is not None and set(found) <= _expected_deep(name), found
    assert found


@pytest.mark.parametrize("name", list(DEEP))
def test_deep_nesting_in_process(name: str, in_child: dict[str, tuple[int, list[str] | None]]) -> None:
    if in_child[name][0] != 0:
        pytest.fail(f"not run in-process: {name} crashed its child process")
    diags = diagnostics_of(DEEP[name])
    well_formed(diags)
    assert diags and {d.code for d in diags} <= _expected_deep(name)
    deep = [d for d in diags if d.code == "FD107"]
    if deep:
        assert deep[0].line is not None and f"more than {MAX_DEPTH} levels" in deep[0].message


@pytest.mark.parametrize("name", list(DEEP_FLOW))
def test_deep_nesting_in_the_text_syntax_in_process(name: str,
                                                   in_child: dict[str, tuple[int, list[str] | None]]) -> None:
    if in_child["flow_" + name][0] != 0:
        pytest.fail(f"not run in-process: {name} crashed its child process")
    diags = diagnostics_of(DEEP_FLOW[name], "deep.flow")
    well_formed(diags)
    # both syntaxes bound the nesting of the data they build: 99 nested parallel blocks are ~200 levels
    assert [d.code for d in diags] == ["FD107"]


def test_the_cli_reports_deep_files_and_survives(deep_files: dict[str, Path]) -> None:
    paths = [str(p) for p in deep_files.values()]
    flowdsl = str(Path(sys.executable).with_name("flowdsl"))
    proc = subprocess.run([flowdsl, "validate", "--no-import", "--format", "json", *paths],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr[-2000:]
    reported = {d["file"] for d in json.loads(proc.stdout)}
    assert reported == set(paths)


def test_nesting_at_the_limit_is_accepted() -> None:
    # the document mapping, 'input', then nested 'properties'/'x' pairs up to exactly MAX_DEPTH levels
    levels = (MAX_DEPTH - 2) // 2
    schema = "{type: object}"
    for _ in range(levels):
        schema = "{properties: {x: " + schema + "}}"
    assert diagnostics_of(HEAD + "steps: [a]\ninput: " + schema + "\n") == []
    assert only(HEAD + "steps: [a]\ninput: {properties: " + schema + "}\n", "FD107").line == 4


# --- size ----------------------------------------------------------------------------


def test_a_file_over_the_size_limit_is_fd102(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text(VALID + "# " + "x" * MAX_BYTES + "\n", encoding="utf-8")
    doc = load(str(big))
    assert [d.code for d in doc.diagnostics] == ["FD102"] and doc.data is None
    assert str(MAX_BYTES) in doc.diagnostics[0].message


def test_a_file_at_the_size_limit_is_read(tmp_path: Path) -> None:
    at_limit = tmp_path / "at_limit.yaml"
    padding = MAX_BYTES - len(VALID) - 3
    at_limit.write_text(VALID + "# " + "x" * padding + "\n", encoding="utf-8")
    assert at_limit.stat().st_size == MAX_BYTES
    assert compile_spec(str(at_limit)).ok


@pytest.mark.parametrize("filename", ["spec.yaml", "spec.flow"])
def test_text_over_the_size_limit_is_fd102(filename: str) -> None:
    assert only("#" * (MAX_BYTES + 1), "FD102", filename).message.endswith(f"the limit is {MAX_BYTES} bytes")
    # counted in UTF-8 bytes, not characters
    assert only("# " + "é" * (MAX_BYTES // 2), "FD102", filename)


# --- encodings and characters ------------------------------------------------------------


@pytest.mark.parametrize(("raw", "where"), [
    (b"flowdsl: 1\nname: caf\xe9\nsteps: [a]\n", (2, 10)),  # Latin-1
    (b"\xff\xfef\x00l\x00o\x00w\x00", (1, 1)),  # UTF-16 with its BOM
    (b"flowdsl: 1\nname: a\nsteps: [a]\n\x80", (4, 1)),
    (b"flowdsl: 1\nname: a\xed\xa0\x80\nsteps: [a]\n", (2, 8)),  # an encoded surrogate
    (b"flowdsl: 1\rname: caf\xe9\rsteps: [a]\r", (2, 10)),  # CR-only line endings
    (b"flowdsl: 1\r\nname: \xc3\xa9t\xe9\r\nsteps: [a]\r\n", (2, 9)),  # columns count characters, not bytes
])
def test_non_utf8_files_are_fd110(raw: bytes, where: tuple[int, int], tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(raw)
    (d,) = load(str(path)).diagnostics
    assert d.code == "FD110" and (d.line, d.column) == where and "UTF-8" in d.message
    (d,) = load_text(raw, "spec.yaml").diagnostics  # bytes given to the API: the same position
    assert d.code == "FD110" and (d.line, d.column) == where


def test_non_utf8_flow_file_is_fd110(tmp_path: Path) -> None:
    path = tmp_path / "spec.flow"
    path.write_bytes(b"flow a\nstep caf\xe9\n")
    assert [d.code for d in compile_spec(str(path)).diagnostics] == ["FD110"]
    from flowdsl.textsyntax import parse_flow

    (d,) = parse_flow(b"flow a\rstep caf\xe9\r", "spec.flow").diagnostics
    assert (d.code, d.line, d.column) == ("FD110", 2, 9)


@pytest.mark.parametrize(("text", "where"), [
    (HEAD.replace("hostile", "hos\x00tile") + "steps: [a]\n", (2, 10)),
    (HEAD + "steps: [a]\ndescription: bell\x07\n", (4, 18)),
    (HEAD + "steps: [a\x1b]\n", (3, 10)),
    (HEAD + "steps: [a]\ndescription: \x7f\n", (4, 14)),
    (HEAD + "steps: [a]\ndescription: next\x85line\n", (4, 18)),
    (HEAD + "steps: [a]\x00\n", (3, 11)),
])
def test_raw_control_characters_are_fd110_where_they_are(text: str, where: tuple[int, int]) -> None:
    d = only(text, "FD110")
    assert (d.line, d.column) == where and "U+" in d.message


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("separator", ["", "\u2028", "\u2029", "\u2028\u2029"], ids=["none", "ls", "ps", "both"])
def test_positions_are_lines_and_columns_as_an_editor_shows_them(newline: str, separator: str) -> None:
    """Lines end at LF, CR LF or CR only, in both syntaxes: U+2028/U+2029 inside a string (line breaks to
    libyaml) and CR-only line endings move no later position, whoever finds the error."""
    yaml_lines = ["flowdsl: 1", "name: p", f'description: "a{separator}b"', "steps:", "  - a:", "      timeout: 0s",
                  "  - b: {with: {x: {x: 1}, y: 2}}", '  - c: {description: "bell\x07"}']
    flow_lines = ["flow p", f'description "a{separator}b"', "step a timeout 0s", 'step c description "bell\x07"']
    for lines, name, expected in (
        (yaml_lines[:7], "spec.yaml", ("FD401", 6, 16)),
        (yaml_lines, "spec.yaml", ("FD110", 8, 27)),  # found in the raw text, before the parser runs
        (flow_lines[:3], "spec.flow", ("FD401", 3, 16)),
        (flow_lines, "spec.flow", ("FD110", 4, 25)),
        ([*yaml_lines[:6], "  - b: [c", "  - d"], "spec.yaml", ("FD103", 9, 1)),  # the parser's, at the end
        ([*yaml_lines[:6], "\t- b"], "spec.yaml", ("FD103", 7, 1)),
        ([*yaml_lines[:6], "x: &a !!python/name:os.system x", "y: *a"], "spec.yaml", ("FD105", 7, 4)),
    ):
        d = only(newline.join(lines) + newline, expected[0], name)
        assert (d.code, d.line, d.column) == expected, (d.format(), lines)
        assert "started on line" not in d.message or "started on line 7" in d.message
    from flowdsl.api import load_text

    doc = load_text(newline.join(yaml_lines[:7]) + newline, "spec.yaml")
    assert doc.positions.find("/steps/1/b/with/y") == (7, 30)
    assert doc.positions.find("/steps/1/b/with/y", key=True) == (7, 27)


def test_a_byte_order_mark_is_no_column() -> None:
    d = only("\ufeffflowdsl: 1\nname: p\ndescription: \"a\u2028b\"\nsteps:\n  - a: {timeout: 0s}\n", "FD401")
    assert (d.line, d.column) == (5, 18)
    d = only("\ufeffflowdsl: 1\nname: p\nsteps: [a]\ntimeout: 0s\n", "FD401")
    assert (d.line, d.column) == (4, 10)


@pytest.mark.parametrize("text", [
    HEAD + 'steps: [a]\ndescription: "bell\\a"\n',
    HEAD + 'steps: [a]\ndescription: "nul\\0"\n',
    HEAD + 'steps: [a]\ndescription: "esc\\e"\n',
    HEAD + 'steps: ["a\\x01"]\n',
    HEAD + 'steps:\n  - a:\n      with: {"k\\nk": 1}\n',
    HEAD + 'steps:\n  - "a\\tb": {worker: w}\n',
    'flowdsl: 1\nname: "a\\x07b"\nsteps: [a]\n',
])
def test_escaped_control_characters_in_keys_and_values_are_fd110_or_fd302(text: str) -> None:
    found = codes(text)
    assert found and found <= {"FD110", "FD302"}, found


def test_newlines_and_tabs_in_text_values_are_fine() -> None:
    text = HEAD + 'description: "two\\nlines\\tand a tab"\nsteps:\n  - a:\n      description: |\n        more\n'
    assert diagnostics_of(text) == []


@pytest.mark.parametrize("text", [
    'flowdsl: 1\nname: "ab\\n"\nsteps: [a]\n',
    HEAD + 'steps: ["ab\\n"]\n',
    HEAD + 'steps:\n  - a: {compensate: "undo\\n"}\n',
])
def test_an_id_ending_in_a_newline_is_rejected(text: str) -> None:
    found = codes(text)
    assert found and found <= {"FD110", "FD302", "FD303"}, found


def test_unicode_ids_are_fd302_but_unicode_text_is_fine() -> None:
    assert only('flowdsl: 1\nname: café\nsteps: [a]\n', "FD302").line == 2
    assert diagnostics_of(HEAD + "description: Grüße, 注文 😀\nsteps: [a]\n") == []


def test_surrogates_in_text_are_a_diagnostic() -> None:
    assert codes(HEAD + "steps: [a]\ndescription: \ud800\n") <= {"FD103", "FD110"}
    assert codes("flow a\nstep \ud800\n", "spec.flow") <= {"FD108", "FD110"}


@pytest.mark.parametrize(("text", "filename", "where", "in_key"), [
    ('flow s\nstep a with {x: "\\ud800"}\n', "spec.flow", (2, 17), False),
    ('flow s\nstep a with {x: "ok \\udfff"}\n', "spec.flow", (2, 17), False),
    ('flow s\nstep a retry {"\\ud83d": 1}\n', "spec.flow", (2, 15), True),
    ('flow s\ndescription "\\ude00\\ud83d"\nstep a\n', "spec.flow", (2, 13), False),
    ('flow s\nswitch w on "${ x }" {\n  case "\\ud800" { a }\n}\n', "spec.flow", (3, 8), True),
    (HEAD + 'steps:\n  - a:\n      with: {x: "\\ud800"}\n', "spec.yaml", (5, 17), False),
    (HEAD + 'steps:\n  - a:\n      with: {"\\uDBFF": 1}\n', "spec.yaml", (5, 14), False),  # (libyaml: in a spec)
])
def test_an_escaped_lone_surrogate_is_fd110_in_both_syntaxes(text: str, filename: str, where: tuple[int, int],
                                                              in_key: bool) -> None:
    """Half of a UTF-16 pair is no character: no UTF-8 file can hold it, and it would break every later stage
    (the schema check, plan_bytes, convert); refused like a control character, where it is written."""
    d = only(text, "FD110", filename)
    assert (d.line, d.column) == where and "lone surrogate U+D" in d.message
    assert ("in a key" in d.message) == in_key
    from flowdsl.api import load_text

    assert load_text(text, filename).data is None


def test_an_escaped_surrogate_pair_is_its_character() -> None:
    plan = compile_text('flow s\nstep a with {x: "\\ud83d\\ude00"}\n', filename="spec.flow")
    assert plan["nodes"]["a"]["with"] == {"x": "\U0001F600"}
    plan = compile_text(HEAD + 'steps:\n  - a: {with: {x: "\\U0001F600"}}\n')
    assert plan["nodes"]["a"]["with"] == {"x": "\U0001F600"}
    d = only(HEAD + 'steps:\n  - a: {with: {x: "\\U00110000"}}\n', "FD110")
    assert "beyond U+10FFFF" in d.message


# --- what messages quote: one line, whatever the spec holds -------------------------------------------------

#: a value that would print a forged diagnostic line after the real one, were it quoted as it is
FORGED = "w\nx.yaml:1:1: warning FD000: ok"


@pytest.mark.parametrize("text", [
    HEAD + f"steps:\n  - a:\n      worker: {json.dumps(FORGED)}\n",  # the audit's: FD302 on a value
    HEAD + f"steps:\n  - a:\n      output: {json.dumps(FORGED)}\n",
    HEAD + f"steps:\n  - a:\n      needs: [{json.dumps(FORGED)}]\n",
    HEAD + f"steps:\n  - a:\n      retry: {{attempts: 2, on: [{json.dumps(FORGED)}]}}\n",
    HEAD + f"steps:\n  - a:\n      when: {json.dumps(FORGED)}\n",  # FD501: not an expression
    HEAD + f"steps:\n  - a:\n      fail_when: {json.dumps('${ (' + FORGED + ' }')}\n",  # FD501: syntax
    HEAD + f"steps:\n  - parallel: {json.dumps(FORGED)}\n    branches: [a]\n",
    HEAD.replace("hostile", json.dumps(FORGED)) + "steps: [a]\n",
    HEAD + f"steps:\n  - a:\n      timeout: {json.dumps(FORGED)}\n",
    HEAD + f"steps:\n  - a:\n      retry: {{attempts: 2, backoff: {json.dumps(FORGED)}}}\n",
    'flow hostile\nstep a worker "w\\nx.yaml:1:1: warning FD000: ok"\n',
])
def test_a_value_quoted_in_a_message_cannot_break_it_over_lines(text: str) -> None:
    """A newline (or a CR, an ESC, a bidirectional control) in a spec's value is written as an escape in every
    message that quotes it: a diagnostic is one line, and no value can print one that looks like another."""
    filename = "spec.flow" if text.startswith("flow ") else "spec.yaml"
    diags = diagnostics_of(text, filename)
    assert diags, "no diagnostic"
    for d in diags:
        assert "\n" not in d.message and "\r" not in d.message and "\n" not in d.format(), d.format()
    assert any("\\nx.yaml:1:1" in d.message for d in diags), [d.format() for d in diags]


def test_the_cli_prints_one_line_per_diagnostic_with_the_value_escaped(tmp_path: Path) -> None:
    path = tmp_path / "nl3.yaml"
    path.write_text(HEAD + f"steps:\n  - a:\n      worker: {json.dumps(FORGED)}\n", encoding="utf-8")
    result = _validate(str(path), "--no-import")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "invalid worker name 'w\\nx.yaml:1:1: warning FD000: ok'" in lines[0], lines


@pytest.mark.parametrize(("value", "shown"), [
    ("plain", "'plain'"),
    ("a\tb\rc\nd", "'a\\tb\\rc\\nd'"),
    ("esc\x1b[31m csi\x9b bell\x07 del\x7f", "'esc\\u001b[31m csi\\u009b bell\\u0007 del\\u007f'"),
    ("ls\u2028ps\u2029", "'ls\\u2028ps\\u2029'"),
    ("rlo\u202e lri\u2066 pdi\u2069 rlm\u200f alm\u061c", "'rlo\\u202e lri\\u2066 pdi\\u2069 rlm\\u200f alm\\u061c'"),
    ("é 注文 😀 back\\slash", "'é 注文 😀 back\\slash'"),  # other characters are left as they are
    ("x" * 71, "'" + "x" * 67 + "...'"),
    (5, "'5'"),
])
def test_quote_escapes_what_a_message_must_not_hold_and_bounds_the_length(value: object, shown: str) -> None:
    from flowdsl.diagnostics import quote
    from flowdsl.shown import visible

    assert quote(value) == shown
    assert quote("x" * 10_000_000).endswith("...'") and len(quote("x" * 10_000_000)) == 72
    assert visible("a\nb") == "a\\nb" and visible("ok") == "ok"


def test_every_message_and_location_is_one_line_even_from_elsewhere() -> None:
    """A message made anywhere (``make``) and a file name with a newline are escaped too: the text line, the JSON
    message and SpecError's message are one line."""
    from flowdsl.diagnostics import make

    d = make("FD308", "cannot load 'a\nb.yaml'", "/steps/0", file="evil\n.yaml", line=1, column=1)
    assert d.message == "cannot load 'a\\nb.yaml'"
    assert d.format() == "evil\\n.yaml:1:1: error FD308: cannot load 'a\\nb.yaml'"
    assert str(SpecError([d])) == d.format()


def test_long_values_are_cut_in_messages() -> None:
    long = "a-" * 100_000
    for d in diagnostics_of(HEAD.replace("hostile", long) + f"steps:\n  - a:\n      worker: {long}\n"):
        assert len(d.message) < 400, d.message[:200]
    d = only(HEAD + f"steps:\n  - a:\n      when: \"{long}\"\n", "FD501")
    assert len(d.message) < 400


# --- bidirectional control characters (Trojan Source) -------------------------------------------------------

#: the audit's condition: the note string holds an override and isolates, so it displays otherwise than it reads
TROJAN = "steps:\n  - a:\n      when: \"${ amount < 100 or note = '\u202e\u2066 true or \u2069\u2066' }\"\n"


@pytest.mark.parametrize("char", [chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))])
def test_every_bidirectional_control_is_fd111_where_it_is(char: str) -> None:
    d = only(HEAD + f"steps:\n  - a:\n      when: \"${{ note = 'x{char}' }}\"\n", "FD111")
    assert (d.line, d.column) == (5, 26) and f"U+{ord(char):04X}" in d.message
    assert char not in d.message and char not in d.format()


@pytest.mark.parametrize(("text", "filename", "where"), [
    (HEAD + TROJAN, "spec.yaml", [(5, 41)]),  # the first on its line
    ("flow hostile\nstep a when \"${ amount < 100 or note = '\u202e\u2066 x \u2069' }\"\n", "spec.flow", [(2, 41)]),
    (HEAD + "description: \"שלום \u2067עולם\u2069\"\nsteps: [a]\n", "spec.yaml", [(3, 20)]),  # prose too
    (HEAD + "steps: [a]  # \u202e comment\n", "spec.yaml", [(3, 15)]),  # a comment too
    ("flow hostile\n# \u202e comment\nstep a\n", "spec.flow", [(2, 3)]),
    (HEAD + "steps:\n  - a:\n      with: {\"k\u202e\": 1}\n", "spec.yaml", [(5, 16)]),  # a key
    ("flow hostile\nstep a \u202e\n", "spec.flow", [(2, 8)]),  # outside a string: FD111, not FD108 too
    (HEAD + "\u202ea: 1\nb: \u2066\nsteps: [a]\n", "spec.yaml", [(3, 1), (4, 4)]),  # one per line, reading on
])
def test_raw_bidirectional_controls_are_fd111_on_every_line(text: str, filename: str,
                                                             where: list[tuple[int, int]]) -> None:
    diags = diagnostics_of(text, filename)
    well_formed(diags)
    assert [(d.code, d.line, d.column) for d in diags] == [("FD111", *w) for w in where], [d.format() for d in diags]
    assert load_text(text, filename).data is None  # reported, never compiled


def test_reading_goes_on_after_a_bidirectional_control() -> None:
    text = HEAD + "a: \u202e\nsteps: [*nothing]\n"
    assert [(d.code, d.line) for d in diagnostics_of(text)] == [("FD111", 3), ("FD103", 4)]
    from flowdsl.source import MAX_BIDI_LINES

    many = HEAD + "steps: [a]\n" + "".join(f"k{i}: \u202e\u202e\n" for i in range(1000))
    assert [d.code for d in diagnostics_of(many)] == ["FD111"] * MAX_BIDI_LINES


@pytest.mark.parametrize(("text", "filename", "where"), [
    (HEAD + TROJAN.replace("\u202e", "\\u202e").replace("\u2066", "\\u2066").replace("\u2069", "\\u2069"),
     "spec.yaml", (5, 13)),  # the YAML escapes: the same characters once read
    ("flow hostile\nstep a with {x: \"\\u2066\"}\n", "spec.flow", (2, 17)),
    ("flow hostile\nstep a with {\"\\u202d\": 1}\n", "spec.flow", (2, 14)),
    (HEAD + "steps:\n  - a:\n      with: {\"k\\u2069\": 1}\n", "spec.yaml", (5, 14)),
    (HEAD + "x: &a \"\\u202e\"\nsteps:\n  - a: {with: {y: *a}}\n", "spec.yaml", (3, 4)),  # once, with its alias
])
def test_escaped_bidirectional_controls_are_fd111_at_the_string(text: str, filename: str,
                                                                where: tuple[int, int]) -> None:
    d = only(text, "FD111", filename)
    assert (d.line, d.column) == where and "even as an escape" in d.message, d.format()


@pytest.mark.parametrize(("text", "filename", "where"), [
    (HEAD + "steps:\n  - a:\n      with: {\"total\u200f\": 1}\n", "spec.yaml", (5, 14)),  # a key
    (HEAD + "steps:\n  - a:\n      with: {\"total\\u061c\": 1}\n", "spec.yaml", (5, 14)),
    ("flow hostile\nstep a with {\"total\u200e\": 1}\n", "spec.flow", (2, 14)),
    (HEAD + "steps:\n  - a:\n      when: \"${ note = '\u200f' }\"\n", "spec.yaml", (5, 13)),  # an expression
    (HEAD + "steps:\n  - a:\n      with: {x: \"שלום ${ name\u200f }\"}\n", "spec.yaml", (5, 17)),
    ("flow hostile\nstep a when \"${ x = '\u200e' }\"\n", "spec.flow", (2, 13)),
])
def test_bidirectional_marks_are_fd111_in_keys_and_expressions(text: str, filename: str,
                                                               where: tuple[int, int]) -> None:
    d = only(text, "FD111", filename)
    assert (d.line, d.column) == where and "bidirectional mark U+" in d.message, d.format()


def test_bidirectional_marks_are_fine_in_text() -> None:
    """Prose in right-to-left languages uses the marks: descriptions, instructions, text values, and the text of a
    template around its ${ }."""
    text = (HEAD + "description: \"הזמנה 42\u200f!\"\nsteps:\n  - a:\n      description: \"طلب\u061c 5\"\n"
            "      with: {note: \"שלום\u200e\", msg: \"הזמנה ${ order.id } נשלחה\u200f\"}\n")
    plan = compile_text(text)
    assert plan["nodes"]["a"]["with"]["note"] == "שלום\u200e"


# --- document shape ------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "   \n", "# just a comment\n", "---\n", "---\n...\n", "~\n", "null\n"])
def test_empty_documents_are_fd109(text: str) -> None:
    d = only(text, "FD109")
    assert d.line == 1


@pytest.mark.parametrize(("text", "kind"), [
    ("- a\n- b\n", "list"), ("just text\n", "string"), ("42\n", "number"), ("true\n", "boolean"),
    ("[flowdsl, name, steps]\n", "list"),
])
def test_a_document_that_is_not_a_mapping_is_fd109(text: str, kind: str) -> None:
    assert f"is a {kind}" in only(text, "FD109").message


def test_multiple_documents_are_fd103_at_the_second() -> None:
    d = only(VALID + "---\n" + VALID, "FD103")
    assert d.line == 4 and "single YAML document" in d.message
    assert only("---\n" + VALID + "---\n", "FD103").line == 5


def test_duplicate_keys_are_fd104_at_the_second() -> None:
    d = only(HEAD + "name: again\nsteps: [a]\n", "FD104")
    assert (d.line, d.column) == (3, 1) and "first written on line 2" in d.message
    d = only(HEAD + "steps:\n  - a:\n      timeout: 5s\n      timeout: 6s\n", "FD104")
    assert (d.line, d.column, d.path) == (6, 7, "/steps/0/a/timeout")


def test_every_duplicate_and_tag_is_reported() -> None:
    text = HEAD + "name: x\nsteps: [a]\nsteps: [b]\ndescription: !!binary eA==\n"
    assert [d.code for d in diagnostics_of(text)] == ["FD104", "FD104", "FD105"]


def test_keys_that_are_not_strings() -> None:
    assert only(HEAD + "steps: [a]\n? [a, b]\n: x\n", "FD201").line == 4
    assert only(HEAD + "steps: [a]\n? {a: b}\n: x\n", "FD201").line == 4
    assert "unknown field '1'" in only(HEAD + "steps: [a]\n1: x\n", "FD202").message
    # after a bad key and its value, the mapping goes on being read as written
    text = HEAD + "? [a]\n: {x: [1]}\nname: again\n!!binary eA==: [y]\nsteps: [a]\nsteps: [b]\n"
    assert [(d.code, d.line) for d in diagnostics_of(text)] == [("FD201", 3), ("FD104", 5), ("FD105", 6),
                                                                ("FD104", 8)]


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "9" * 5000, "-" + "9" * 5000])
def test_numbers_that_are_not_json_are_fd201(value: str) -> None:
    d = only(HEAD + "steps: [a]\ntimeout: " + value + "\n", "FD201")
    assert (d.line, d.column) == (4, 10)


@pytest.mark.parametrize("flow", [False, True], ids=["yaml", "flow"])
@pytest.mark.parametrize(("radix", "digit"), [("0x", "f"), ("0o", "7")])
def test_hex_and_octal_integers_are_counted_in_decimal_digits(flow: bool, radix: str, digit: str) -> None:
    """Fewer than 4,000 characters, more than 4,000 decimal digits (Python converts at most 4,300): FD201,
    wherever the number is, instead of a ValueError in the schema check, the plan or convert."""
    many = radix + digit * (3400 if radix == "0x" else 4500)
    assert len(many) < 4600
    for option in ("with {x: %s}", "timeout %s", "retry {attempts: %s}"):
        text = ("flow h\nstep a " + option % many + "\n") if flow else \
            (HEAD + "steps:\n  - a: {" + option.replace(" ", ": ", 1) % many + "}\n")
        d = only(text, "FD201", "spec.flow" if flow else "spec.yaml")
        assert "more than 4000 digits once written in decimal" in d.message
    fits = radix + digit * (3300 if radix == "0x" else 4400)  # about 3,970 decimal digits
    text = f"flow h\nstep a with {{x: {fits}}}\n" if flow else HEAD + f"steps:\n  - a: {{with: {{x: {fits}}}}}\n"
    from flowdsl.api import load_text, plan_bytes
    from flowdsl.convert import convert_text

    plan = compile_text(text, filename="spec.flow" if flow else "spec.yaml")
    assert plan["nodes"]["a"]["with"]["x"] == int(fits[2:], 16 if radix == "0x" else 8)
    assert plan_bytes(plan)
    data = load_text(text, "spec.flow" if flow else "spec.yaml").data
    assert convert_text(data, "yaml") and convert_text(data, "flow")


@pytest.mark.parametrize(("option", "code", "message"), [
    ("timeout: 1e306", "FD401", "'1e306' is longer than the maximum of 30 days"),  # as written
    ("timeout: 1.7e308", "FD401", "is longer than the maximum of 30 days"),
    ("timeout: " + "9" * 401, "FD401", "'9999999999999999999999999999999999999...' is longer than the maximum"),
    ("timeout: -" + "9" * 401, "FD401", "a duration must be positive"),
    ('timeout: "' + "9" * 400 + 's"', "FD401", "is longer than the maximum of 30 days"),
    ('timeout: "' + "9" * 400 + 'h1s"', "FD401", "is longer than the maximum of 30 days"),
    ("retry: {initial: 1e306}", "FD401", "is longer than the maximum of 30 days"),
    ("compensate: {worker: u, timeout: 1e306}", "FD401", "is longer than the maximum of 30 days"),
    ("retry: {attempts: 2, multiplier: 1" + "0" * 400 + "}", "FD201",
     "the multiplier 1000000000000000000000000000000000000... is beyond the largest number, about 1.8e308"),
])
def test_huge_but_finite_numbers_are_diagnostics(option: str, code: str, message: str) -> None:
    """A number a double cannot hold once multiplied (seconds to ms) or converted: a diagnostic, never an
    OverflowError; in the text syntax too."""
    d = only(HEAD + "steps:\n  - a: {" + option + "}\n", code)
    assert message in d.message and d.line == 4
    key, _, value = option.partition(": ")
    d = only(f"flow h\nstep a {key} {value}\n", code, "spec.flow")
    assert message in d.message and d.line == 2


@pytest.mark.parametrize("text", [
    HEAD + "steps:\n  - a: {retry: 2.0}\n",
    HEAD + "steps:\n  - a: {retry: {attempts: 3.0, multiplier: 2}}\n",
    HEAD + "defaults:\n  retry: 2.0\n  compensate: {retry: 4e0}\nsteps: [a]\n",
    HEAD + "steps:\n  - a: {compensate: {worker: u, retry: 3.0}}\n",
    HEAD + "steps:\n  - for_each: l\n    items: \"${ x }\"\n    concurrency: 2.0\n    steps: [a]\n",
    "flowdsl: 1.0\nname: t\nsteps: [a]\n",
    "flow t\nflowdsl 1.0\nstep a retry 2.0\n",
    "flow t\ndefaults retry 1e1\nstep a undo {worker: u, retry: {attempts: 2.0}}\n",
])
def test_whole_numbers_written_with_a_fraction_are_integers(text: str) -> None:
    """The schema reads 2.0 as an integer; so does the model: the plan holds ints, and nothing crashes."""
    plan = compile_text(text, filename="spec.flow" if text.startswith("flow ") else "spec.yaml")
    for node in plan["nodes"].values():
        for policy in (node.get("retry"), (node.get("compensate") or {}).get("retry")):
            if policy is not None:
                assert type(policy["attempts"]) is int and type(policy["multiplier"]) is float
        if node["kind"] == "for_each":
            assert node["concurrency"] == 2 and type(node["concurrency"]) is int


@pytest.mark.parametrize("text", [
    HEAD + "steps:\n  - a: {retry: 2.5}\n",
    HEAD + "steps:\n  - a: {retry: {attempts: 1.5}}\n",
    HEAD + "steps:\n  - for_each: l\n    items: \"${ x }\"\n    concurrency: 0.5\n    steps: [a]\n",
])
def test_numbers_with_a_fraction_where_an_integer_is_expected_are_fd201(text: str) -> None:
    diags = diagnostics_of(text)
    assert {d.code for d in diags} == {"FD201"} and all(d.message.endswith("5") for d in diags), diags


def test_yaml_syntax_errors_are_fd103_with_a_position() -> None:
    d = only(HEAD + "steps: [a, b\n", "FD103")
    assert d.line is not None and d.column is not None
    assert only(HEAD + "steps:\n\t- a\n", "FD103").line == 4


# --- the run input's schema ---------------------------------------------------------------------------


@pytest.mark.parametrize(("schema", "shown"), [
    ({"$ref": "#/nowhere"}, "'/nowhere'"),
    ({"properties": {"a": {"$ref": "other.json"}}}, "'other.json'"),
    ({"$ref": "https://example.com/order.json"}, "'https://example.com/order.json'"),
])
def test_a_plan_whose_input_schema_refers_nowhere_is_an_input_error_not_a_traceback(
        schema: dict[str, Any], shown: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan from elsewhere (FD206 stops such a spec) still gets a message; and nothing is fetched."""
    import urllib.request

    from flowdsl.runtime.inputs import InputError, check_input

    def no_fetching(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the input schema's reference was fetched")

    monkeypatch.setattr(urllib.request, "urlopen", no_fetching)
    with pytest.raises(InputError) as info:
        check_input({"flow": {"input_schema": schema}}, {"a": 1})
    assert str(info.value).startswith("the spec's input schema cannot be used to check the run input: a reference "
                                      f"to {shown} in it cannot be resolved")
    check_input({"flow": {"input_schema": {"$defs": {"n": {"type": "integer"}}, "properties": {
        "a": {"$ref": "#/$defs/n"}}}}}, {"a": 1})


def test_running_a_spec_whose_input_schema_refers_nowhere_is_refused_before_anything_runs(tmp_path: Path) -> None:
    path = tmp_path / "badref.yaml"
    path.write_text(HEAD + 'input: {$ref: "#/nowhere"}\nsteps: [a]\n', encoding="utf-8")
    result = CliRunner().invoke(app, ["run", str(path), "--no-record"])
    assert "FD206" in result.stderr and "Traceback" not in result.output
    assert result.exit_code == 2 and (result.exception is None or isinstance(result.exception, SystemExit))


# --- unreadable paths and the CLI's exit codes --------------------------------------------------


def _validate(*args: str) -> Any:
    return CliRunner().invoke(app, ["validate", "--no-import", *args])


def test_missing_file_is_fd101_and_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    assert [d.code for d in load(str(missing)).diagnostics] == ["FD101"]
    result = _validate(str(missing))
    assert result.exit_code == 2 and "FD101" in result.stderr


def test_a_directory_is_exit_2(tmp_path: Path) -> None:
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    assert _validate(str(folder)).exit_code == 2
    assert _validate(str(tmp_path)).exit_code == 2


def test_a_dangling_symlink_and_a_file_as_a_folder_are_exit_2(tmp_path: Path) -> None:
    link = tmp_path / "link.yaml"
    link.symlink_to(tmp_path / "nowhere.yaml")
    assert _validate(str(link)).exit_code == 2
    (tmp_path / "file").write_text("x")
    assert _validate(str(tmp_path / "file" / "spec.yaml")).exit_code == 2


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_a_file_without_read_permission_is_exit_2(tmp_path: Path) -> None:
    locked = tmp_path / "locked.yaml"
    locked.write_text(VALID)
    locked.chmod(0)
    try:
        assert _validate(str(locked)).exit_code == 2
    finally:
        locked.chmod(0o644)


@pytest.mark.parametrize("name", ["spec.txt", "spec.json", "spec", "spec.yaml.bak"])
def test_unknown_file_types_are_exit_2(name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_text(VALID)
    (d,) = load(str(path)).diagnostics
    assert d.code == "FD101" and "unknown file type" in d.message
    result = _validate(str(path))
    assert result.exit_code == 2 and "FD101" in result.stderr


def test_an_unreadable_file_among_good_ones_is_still_exit_2(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(VALID)
    assert _validate(str(good)).exit_code == 0
    assert _validate(str(good), str(tmp_path / "missing.yaml")).exit_code == 2


@pytest.mark.parametrize("content", [b"", b"\x00\x01\x02", b"- a\n", b"\xff\xfe\xfd", VALID.encode() * 2])
def test_hostile_files_through_the_cli_are_exit_1(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(content)
    result = _validate(str(path))
    assert result.exit_code == 1, result.output
    assert f"{path}:" in result.stderr and " error FD" in result.stderr


# --- the text syntax ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "", "\n", "flow", "flow a", "flow a\n", "flow a\nstep", "step a\n", "}\n", "{\n", "flow a\nparallel p {\n",
    "flow a\nstep b with {\n", "flow a\nstep b with [1, 2\n", 'flow a\nstep b when "${\n', "flow a\nstep b retry -1\n",
    "flow a\nstep b timeout\n", "flow a\nflow a\n", "flow a\nstep b\n\x00", "flow a\nstep b undo undo undo\n",
    "flow a\nsequence s { step b }\n}\n", "flow a\nswitch w on \"${ x }\" { case {\n", "flow a\nstep b.c.d.\n",
    "\ufeffflow a\nstep b\n", "flow a\r\nstep b\r\n", "flow a\nstep b with {\"k\": 1, \"k\": 2}\n",
    "flow 1a\nstep b\n", "flow a\nstep b with 1e999\n", "flow a\nstep b with " + "9" * 5000 + "\n",
])
def test_text_syntax_garbage_gets_diagnostics(text: str) -> None:
    diags = diagnostics_of(text, "spec.flow")
    well_formed(diags)
    if diags:
        assert all(d.file == "spec.flow" for d in diags)


def test_text_syntax_random_bytes_get_diagnostics(tmp_path: Path) -> None:
    import random

    rng = random.Random(1234)
    path = tmp_path / "noise.flow"
    for _ in range(30):
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))))
        result = compile_spec(str(path))
        well_formed(result.diagnostics)
        assert result.diagnostics and result.plan is None


@pytest.mark.parametrize("kind", ["directory", "device"])
def test_a_path_that_is_no_file_says_what_it_is_whatever_its_name(kind: str, tmp_path: Path) -> None:
    path = str(tmp_path / "specs") if kind == "directory" else os.devnull
    if kind == "directory":
        os.mkdir(path)
    (d,) = load(path).diagnostics
    assert d.code == "FD101" and d.message.startswith("cannot read file: not a regular file (a ")
    assert ("directory" if kind == "directory" else "character device") in d.message
