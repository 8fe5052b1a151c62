"""The language conformance cases: specs/conformance/ (layout and conventions in its README.md).

- ``valid/<name>.yaml``: compiles with no diagnostic to exactly ``valid/<name>.plan.json``; so does its
  ``<name>.flow`` twin, byte for byte; so does the spec with its mappings reordered, and compiled twice.
- ``invalid/FD###_<slug>.yaml|.flow``: gives exactly ``<same>.diagnostics.json``, all of code FD###.
- ``examples/*/flow.yaml``: the canonical flows, with golden plans ``flow.plan.json`` beside them.

``make goldens`` (``pytest --update-goldens``) rewrites the golden files from the current compiler.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from flowdsl.api import compile_spec, load, plan_bytes
from flowdsl.diagnostics import CODES, Diagnostic
from flowdsl.source import MAX_BYTES

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE = ROOT / "specs" / "conformance"
VALID = CONFORMANCE / "valid"
INVALID = CONFORMANCE / "invalid"
DOCS = ROOT / "docs" / "diagnostics.md"

VALID_CASES = sorted(VALID.glob("*.yaml"))
TWINS = sorted(VALID.glob("*.flow"))
EXAMPLES = sorted(ROOT.glob("examples/*/flow.yaml"))
INVALID_CASES = sorted(p for p in INVALID.glob("FD*") if p.suffix in (".yaml", ".flow"))
#: codes checked by tests that build their input at test time instead of by a committed case
GENERATED_CODES = {"FD101", "FD102"}
#: codes of flow test files, not specs: their cases are in tests/flowtests/invalid (tests/test_flowtests.py)
TEST_FILE_CODES = {"FD701", "FD702", "FD703"}
#: the module the invalid cases that list ``workers:`` import (from INVALID)
WORKER_FIXTURE = "workers_fixture"


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def _plan(path: Path) -> bytes:
    result = compile_spec(str(path), check_workers=False)
    assert result.diagnostics == [], "\n".join(d.format() for d in result.diagnostics)
    assert result.plan is not None
    return plan_bytes(result.plan)


# --- valid cases and the canonical examples ---------------------------------------------------


def test_there_are_cases() -> None:
    assert len(VALID_CASES) >= 15 and \
        len(INVALID_CASES) >= len(CODES) - len(GENERATED_CODES) - len(TEST_FILE_CODES)
    assert {p.parent.name for p in EXAMPLES} >= {"ecommerce_order", "order_management"}


@pytest.mark.parametrize("case", VALID_CASES, ids=_ids(VALID_CASES))
def test_valid_case_plan(case: Path, goldens: Any) -> None:
    goldens.check(case.with_suffix(".plan.json"), _plan(case))


@pytest.mark.parametrize("flow", EXAMPLES, ids=_ids(EXAMPLES))
def test_example_plan(flow: Path, goldens: Any) -> None:
    goldens.check(flow.with_name("flow.plan.json"), _plan(flow))


@pytest.mark.parametrize("case", VALID_CASES + EXAMPLES, ids=_ids(VALID_CASES + EXAMPLES))
def test_compiling_twice_gives_identical_bytes(case: Path) -> None:
    assert _plan(case) == _plan(case)


def test_plans_do_not_depend_on_hash_seed_or_working_directory(tmp_path: Path) -> None:
    """Another process, another PYTHONHASHSEED (set iteration order), another cwd: the same bytes."""
    cases = VALID_CASES + EXAMPLES
    script = (
        "import hashlib, sys\n"
        "from flowdsl.api import compile_spec, plan_bytes\n"
        "for path in sys.argv[1:]:\n"
        "    print(hashlib.sha256(plan_bytes(compile_spec(path).plan)).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script, *map(str, cases)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    import hashlib

    assert out == [hashlib.sha256(_plan(c)).hexdigest() for c in cases]


def _keeps_order(path: tuple[Any, ...]) -> bool:
    """Mappings whose order means something: the typed fields of an LLM signature (prompt order)."""
    return len(path) >= 3 and path[-3:-1] == ("llm", "signature") and path[-1] in ("inputs", "outputs")


def reorder(value: Any, rng: random.Random | None, path: tuple[Any, ...] = ()) -> Any:
    """``value`` with every mapping's keys reversed (``rng`` None) or shuffled, recursively."""
    if isinstance(value, dict):
        keys = list(value)
        if not _keeps_order(path):
            if rng is None:
                keys.reverse()
            else:
                rng.shuffle(keys)
        return {k: reorder(value[k], rng, (*path, k)) for k in keys}
    if isinstance(value, list):
        return [reorder(v, rng, (*path, i)) for i, v in enumerate(value)]
    return value


def _write_reordered(src: Path, dst: Path, rng: random.Random | None) -> None:
    data = load(str(src)).data
    assert data is not None
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(yaml.safe_dump(reorder(data, rng), sort_keys=False, allow_unicode=True, width=1000),
                   encoding="utf-8")


@pytest.mark.parametrize("how", ["reversed", "shuffled"])
@pytest.mark.parametrize("case", VALID_CASES + EXAMPLES, ids=_ids(VALID_CASES + EXAMPLES))
def test_reordered_mappings_give_identical_bytes(case: Path, how: str, tmp_path: Path) -> None:
    rng = random.Random(case.name) if how == "shuffled" else None
    target = tmp_path / case.name
    _write_reordered(case, target, rng)
    for included in sorted((case.parent / "lib").glob("*.yaml")) if case.parent == VALID else []:
        _write_reordered(included, tmp_path / "lib" / included.name, rng)
    reordered, original = load(str(target)).data, load(str(case)).data
    assert reordered == original and json.dumps(reordered) != json.dumps(original)  # same data, other key order
    assert _plan(target) == _plan(case)


def test_reorder_changes_every_mapping_it_may() -> None:
    data = {"a": 1, "b": {"c": [{"d": 1, "e": 2}]},
            "llm": {"signature": {"inputs": {"x": "str", "y": "int"}, "outputs": {"z": "str"}}}}
    out = reorder(data, None)
    assert list(out) == ["llm", "b", "a"]
    assert list(out["b"]["c"][0]) == ["e", "d"]
    assert list(out["llm"]["signature"]) == ["outputs", "inputs"]
    assert list(out["llm"]["signature"]["inputs"]) == ["x", "y"]
    assert out == data


# --- the .flow twins ---------------------------------------------------------------------------


@pytest.mark.parametrize("twin", TWINS, ids=_ids(TWINS))
def test_flow_twin_compiles_to_the_same_bytes(twin: Path) -> None:
    yaml_case = twin.with_suffix(".yaml")
    assert yaml_case.exists(), f"{twin.name} has no YAML case beside it"
    assert _plan(twin) == _plan(yaml_case)


def test_every_valid_case_has_a_flow_twin() -> None:
    assert [p.stem for p in TWINS] == [p.stem for p in VALID_CASES]


@pytest.mark.parametrize("flow", EXAMPLES, ids=_ids(EXAMPLES))
def test_example_flow_twin_compiles_to_the_same_bytes(flow: Path) -> None:
    assert _plan(flow.with_suffix(".flow")) == _plan(flow)


# --- invalid cases -----------------------------------------------------------------------------


def case_code(case: Path) -> str:
    match = re.match(r"(FD\d{3})_[a-z0-9_]+$", case.stem)
    assert match, f"{case.name}: invalid case names are FD###_<slug>.yaml or .flow"
    return match.group(1)


def uses_workers(case: Path) -> bool:
    """The convention: a case whose spec lists ``workers:`` is checked with its modules imported."""
    doc = load(str(case))
    return isinstance(doc.data, dict) and bool(doc.data.get("workers"))


def diagnostics_json(diags: list[Diagnostic], base: Path) -> str:
    rows = [{"code": d.code, "severity": d.severity,
             "file": os.path.relpath(os.path.abspath(d.file), base) if d.file else None,
             "line": d.line, "column": d.column, "path": d.path, "message": d.message} for d in diags]
    return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"


@pytest.fixture
def fresh_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty worker registry and a clean import of the fixture module, so suggestions are stable."""
    from flowdsl.workers import registry

    monkeypatch.setattr(registry, "_workers", {})
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, WORKER_FIXTURE, raising=False)
    monkeypatch.chdir(ROOT)


def compile_case(case: Path) -> list[Diagnostic]:
    if uses_workers(case):
        search = str(INVALID.relative_to(ROOT))
        return compile_spec(str(case.relative_to(ROOT)), check_workers=True, search_path=search).diagnostics
    return compile_spec(str(case), check_workers=False).diagnostics


@pytest.mark.parametrize("case", INVALID_CASES, ids=_ids(INVALID_CASES))
def test_invalid_case_diagnostics(case: Path, goldens: Any, fresh_workers: None) -> None:
    diags = compile_case(case)
    assert diags, f"{case.name} gives no diagnostic"
    assert {d.code for d in diags} == {case_code(case)}
    for d in diags:
        assert d.line is not None and d.column is not None, d.format()
        assert CODES[d.code][0] == d.severity
    goldens.check(case.with_suffix(".diagnostics.json"), diagnostics_json(diags, case.parent))


def test_every_diagnostic_golden_has_its_case() -> None:
    stems = {p.with_suffix("").name for p in INVALID_CASES}
    orphans = [p.name for p in INVALID.glob("*.diagnostics.json") if p.name.removesuffix(".diagnostics.json")
               not in stems]
    assert orphans == []


def test_missing_file_is_fd101(tmp_path: Path) -> None:
    (diag,) = compile_spec(str(tmp_path / "orders.yaml")).diagnostics
    assert (diag.code, diag.line, diag.severity) == ("FD101", None, "error")
    assert diag.message == "cannot read file: No such file or directory"
    (diag,) = compile_spec(str(tmp_path / "orders.json")).diagnostics
    assert diag.code == "FD101" and "expected a .yaml, .yml or .flow file" in diag.message


def test_file_too_large_is_fd102(tmp_path: Path) -> None:
    big = tmp_path / "huge.yaml"
    big.write_text("flowdsl: 1\nname: huge\nsteps: [a]\n# " + "x" * MAX_BYTES + "\n", encoding="utf-8")
    (diag,) = compile_spec(str(big)).diagnostics
    assert diag.code == "FD102" and f"the limit is {MAX_BYTES} bytes" in diag.message
    assert diag.file == str(big)


def test_every_code_has_a_case() -> None:
    covered = {case_code(c) for c in INVALID_CASES}
    assert sorted(set(CODES) - covered - GENERATED_CODES - TEST_FILE_CODES) == []
    assert covered <= set(CODES)


# --- docs/diagnostics.md -----------------------------------------------------------------------


def test_every_code_is_documented_with_its_title_and_severity() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for code, (severity, title) in CODES.items():
        match = re.search(rf"^## {code} — (.+)$\n+\*\*(error|warning)\*\*", text, re.MULTILINE)
        assert match, f"docs/diagnostics.md has no section '## {code} — {title}' starting with its severity"
        assert (match.group(1), match.group(2)) == (title, severity)


def test_printed_lines_in_the_docs_are_what_the_cases_print(fresh_workers: None) -> None:
    """Every ``FD###_<slug>.yaml:L:C: ...`` line in docs/diagnostics.md is printed by that case."""
    text = DOCS.read_text(encoding="utf-8")
    lines = re.findall(r"^((FD\d{3}_[a-z0-9_]+\.(?:yaml|flow)):\d+:\d+: .*)$", text, re.MULTILINE)
    assert len({name for _, name in lines}) >= len(CODES) - len(GENERATED_CODES) - len(TEST_FILE_CODES)
    for line, name in lines:
        diags = compile_case(INVALID / name)
        printed = [d.format().replace(d.file or "", name, 1) for d in diags if d.file and d.file.endswith(name)]
        assert line in printed, f"docs/diagnostics.md shows a line {name} does not print:\n{line}\nvs\n" + \
            "\n".join(printed)


def test_exit_codes_are_the_documented_ones(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flowdsl.cli import app

    def run(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, list(args))
        return result.exit_code, result.stdout

    assert run("validate", "--no-import", str(VALID / "sequence.yaml"))[0] == 0
    assert run("validate", "--no-import", str(INVALID / "FD306_unreachable_step.yaml"))[0] == 0  # a warning
    code, out = run("validate", "--no-import", "--format", "json", str(INVALID / "FD402_retry_policy.yaml"))
    assert code == 1
    assert [(d["code"], d["line"], d["column"]) for d in json.loads(out)] == [("FD402", 9, 18), ("FD402", 12, 17)]
    assert set(json.loads(out)[0]) == {"code", "message", "file", "line", "column", "path", "severity"}
    assert run("validate", "--no-import", str(tmp_path / "missing.yaml"))[0] == 2
    assert run("validate", "--no-such-option", str(VALID / "sequence.yaml"))[0] == 2
    assert run("plan", "--no-import", str(INVALID / "FD304_needs_cycle.yaml"))[0] == 1
