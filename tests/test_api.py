"""The public Python API: load, validate, compile — one function per stage, mirroring the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import flowdsl
import flowdsl.api
import flowdsl.runtime.local
from flowdsl.api import CompileResult
from flowdsl.diagnostics import Diagnostic, SpecError
from flowdsl.runtime.plancheck import PLAN_VERSION

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "ecommerce_order" / "flow.yaml"

SPEC = """\
flowdsl: 1
name: orders
steps:
  - validate_order
  - charge:
      worker: payments.charge
      compensate: payments.refund
      retry: {attempts: 3, initial: 100ms, max: 1s}
  - parallel: fulfil
    branches:
      - ship
      - notify:
          when: "${ order.notify }"
"""
BAD = """\
flowdsl: 1
name: orders
steps:
  - charge:
      timeout: soon
      compensate: refund
  - charge
"""


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "orders.yaml"
    path.write_text(SPEC, encoding="utf-8")
    return path


@pytest.fixture
def bad_file(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD, encoding="utf-8")
    return path


def test_the_package_exports_one_function_per_stage() -> None:
    for name in ("load", "load_text", "validate", "compile_spec", "compile_text", "plan_bytes", "CompileResult",
                 "Diagnostic", "SpecError", "worker"):
        assert name in flowdsl.__all__ and callable(getattr(flowdsl, name)), name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = flowdsl.nothing  # type: ignore[attr-defined]


def test_importing_flowdsl_is_light() -> None:
    code = ("import sys, flowdsl; heavy = ['yaml', 'jsonschema', 'networkx', 'jsonata', 'lark', 'typer', 'rich', "
            "'dspy', 'redis']; print([m for m in heavy if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert json.loads(out.replace("'", '"')) == []


def test_load_gives_data_positions_and_no_diagnostics(spec_file: Path) -> None:
    doc = flowdsl.load(str(spec_file))
    assert doc.diagnostics == []
    assert doc.data["steps"][1]["charge"]["worker"] == "payments.charge"
    assert doc.positions.find("/steps/1/charge/retry/initial") == (8, 37)
    assert doc.positions.find("/steps/1/charge/retry/initial", key=True) == (8, 28)
    assert doc.positions.find("/steps/1/charge/retry", key=True) == (8, 7)
    assert doc.positions.find("/steps/2/branches/1/notify/when/deeper/than/the/data") == (13, 17)


def test_load_text_and_load_agree(spec_file: Path) -> None:
    assert flowdsl.load_text(SPEC, str(spec_file)).data == flowdsl.load(str(spec_file)).data


def test_load_reports_instead_of_raising(tmp_path: Path) -> None:
    doc = flowdsl.load(str(tmp_path / "missing.yaml"))
    assert doc.data is None and [d.code for d in doc.diagnostics] == ["FD101"]
    assert [d.code for d in flowdsl.load_text("a: [").diagnostics] == ["FD103"]


def test_compile_spec_gives_a_plan_and_a_source_map(spec_file: Path) -> None:
    result = flowdsl.compile_spec(str(spec_file))
    assert isinstance(result, CompileResult) and result.ok and result.diagnostics == []
    plan = result.plan
    assert plan["plan_version"] == 1 and plan["root"] == ["validate_order", "charge", "fulfil"]
    assert plan["nodes"]["charge"]["compensate"]["worker"] == "payments.refund"
    assert plan["nodes"]["ship"]["parent"] == "fulfil"
    assert set(result.source_map) == set(plan["nodes"])
    assert result.source_map["charge"] == {"file": str(spec_file), "line": 5, "column": 5, "spec_path": "/steps/1"}
    assert result.source_map["notify"]["line"] == 12


def test_compile_spec_with_errors_has_no_plan_and_every_diagnostic(bad_file: Path) -> None:
    result = flowdsl.compile_spec(str(bad_file))
    assert not result.ok and result.plan is None
    assert [(d.code, d.line) for d in result.diagnostics] == [("FD401", 5), ("FD301", 7)]
    assert all(d.file == str(bad_file) for d in result.diagnostics)


def test_validate_checks_worker_names_unless_told_not_to(spec_file: Path) -> None:
    found = flowdsl.validate(str(spec_file))
    assert {d.code for d in found} == {"FD204"}
    assert found == sorted(found, key=Diagnostic.sort_key)
    assert flowdsl.validate(str(spec_file), check_workers=False) == []


def test_validate_imports_the_workers_of_a_real_example() -> None:
    assert flowdsl.validate(str(EXAMPLE), search_path=str(ROOT)) == []


def test_compile_text_raises_spec_error_with_every_diagnostic() -> None:
    with pytest.raises(SpecError) as caught:
        flowdsl.compile_text(BAD, filename="bad.yaml")
    err = caught.value
    assert [d.code for d in err.diagnostics] == ["FD401", "FD301"]
    assert str(err) == err.diagnostics[0].format() + " (and 1 more error: see .diagnostics)"
    assert str(err).startswith("bad.yaml:5:16: error FD401: ")
    assert isinstance(err, Exception)


def test_spec_error_sorts_and_deduplicates() -> None:
    a = Diagnostic("FD301", "second", file="f.yaml", line=9, column=1)
    b = Diagnostic("FD401", "first", file="f.yaml", line=2, column=3)
    err = SpecError([a, b, a])
    assert err.diagnostics == [b, a]
    assert str(err) == "f.yaml:2:3: error FD401: first (and 1 more error: see .diagnostics)"
    assert str(SpecError([b])) == "f.yaml:2:3: error FD401: first"
    c = Diagnostic("FD402", "third", file="f.yaml", line=12, column=1)
    assert str(SpecError([a, b, c])).endswith(": first (and 2 more errors: see .diagnostics)")
    assert str(SpecError([])) == "invalid spec"


def test_plan_bytes_is_canonical_and_deterministic(spec_file: Path) -> None:
    plan = flowdsl.compile_text(SPEC)
    data = flowdsl.plan_bytes(plan)
    assert data == (json.dumps(plan, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()
    assert flowdsl.plan_bytes(flowdsl.compile_text(SPEC)) == data
    assert flowdsl.plan_bytes(flowdsl.compile_spec(str(spec_file)).plan) == data  # no file names in the plan
    reordered = SPEC.replace("retry: {attempts: 3, initial: 100ms, max: 1s}", "retry: {max: 1s, initial: 100ms, "
                             "attempts: 3}").replace("      worker: payments.charge\n      compensate: payments.refund",
                                                     "      compensate: payments.refund\n      worker: payments.charge")
    assert reordered != SPEC and flowdsl.plan_bytes(flowdsl.compile_text(reordered)) == data


def test_the_text_syntax_compiles_to_the_same_plan() -> None:
    from flowdsl.convert import convert_text

    flow_text = convert_text(flowdsl.load_text(SPEC).data, "flow")
    assert flowdsl.plan_bytes(flowdsl.compile_text(flow_text, filename="orders.flow")) == flowdsl.plan_bytes(
        flowdsl.compile_text(SPEC))


def test_sub_flows_are_loaded_relative_to_the_spec(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "wrap.yaml").write_text("flowdsl: 1\nname: wrap\nsteps: [pick, wrap_items]\n")
    main = tmp_path / "main.yaml"
    main.write_text("flowdsl: 1\nname: main\nsteps:\n  - start\n  - flow: gift\n    path: lib/wrap.yaml\n")
    result = flowdsl.compile_spec(str(main))
    assert result.ok, [d.format() for d in result.diagnostics]
    assert result.plan["nodes"]["gift"]["children"] == ["gift/pick", "gift/wrap_items"]
    assert result.source_map["gift/pick"]["file"] == str(tmp_path / "lib" / "wrap.yaml")


def test_diagnostics_format_like_a_compiler_and_serialise_in_order() -> None:
    d = Diagnostic("FD204", "compensation 'x' is not a known worker", file="o.yaml", line=14, column=7,
                   path="/steps/1/a/compensate")
    assert d.format() == "o.yaml:14:7: error FD204: compensation 'x' is not a known worker"
    assert list(d.to_json()) == ["code", "severity", "message", "file", "line", "column", "path"]
    assert Diagnostic("FD201", "m", path="/steps").format() == "<spec>: error FD201: m (at /steps)"


def test_the_api_and_the_cli_report_the_same_diagnostics(bad_file: Path) -> None:
    from typer.testing import CliRunner

    from flowdsl.cli import app

    result = CliRunner().invoke(app, ["validate", "--no-import", "--format", "json", str(bad_file)])
    assert json.loads(result.stdout) == [d.to_json() for d in flowdsl.validate(str(bad_file), check_workers=False)]


def test_diagnostics_in_a_sub_flow_name_it_as_the_user_would(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "main.yaml").write_text("flowdsl: 1\nname: main\nsteps:\n  - flow: sub\n    path: lib/sub.yaml\n")
    (tmp_path / "lib" / "sub.yaml").write_text("flowdsl: 1\nname: sub\nsteps:\n  - a: {timeout: 5x}\n")
    monkeypatch.chdir(tmp_path)
    (diag,) = flowdsl.validate("main.yaml", check_workers=False)
    assert (diag.code, diag.file, diag.line) == ("FD401", os.path.join("lib", "sub.yaml"), 4)


# --- ordinary arguments of every kind the API documents; clear errors for the others ------------------------


def test_paths_may_be_path_objects(spec_file: Path, tmp_path: Path) -> None:
    """Every documented path parameter takes an os.PathLike as well as a str, with the same result."""
    by_str = flowdsl.compile_spec(str(spec_file))
    by_path = flowdsl.compile_spec(spec_file)
    assert by_path.plan == by_str.plan and by_path.source_map == by_str.source_map
    assert flowdsl.validate(spec_file, check_workers=False) == []
    assert flowdsl.load(spec_file).data == flowdsl.load(str(spec_file)).data
    assert flowdsl.compile_spec(spec_file, check_workers=True, search_path=tmp_path).plan is None  # FD204s
    text = flowdsl.load_text(SPEC, filename=Path("orders.yaml"))
    assert text.data == flowdsl.load(spec_file).data
    assert flowdsl.compile_text(SPEC, filename=Path("x.yaml")) == by_str.plan


def test_spec_text_may_be_utf8_bytes() -> None:
    assert flowdsl.compile_text(SPEC.encode("utf-8")) == flowdsl.compile_text(SPEC)
    assert flowdsl.load_text(bytearray(SPEC.encode())).data == flowdsl.load_text(SPEC).data
    with pytest.raises(SpecError) as caught:
        flowdsl.compile_text(b"flowdsl: 1\nname: \xff\nsteps: [a]\n")
    (d,) = caught.value.diagnostics
    assert (d.code, d.line, d.column) == ("FD110", 2, 7) and "not valid UTF-8 (byte 0xff)" in d.message


@pytest.mark.parametrize(("call", "message"), [
    (lambda: flowdsl.compile_spec(42), "path must be a str or an os.PathLike (e.g. pathlib.Path), got int"),
    (lambda: flowdsl.validate(None), "path must be a str or an os.PathLike (e.g. pathlib.Path), got NoneType"),
    (lambda: flowdsl.load(["a.yaml"]), "path must be a str or an os.PathLike"),
    (lambda: flowdsl.compile_text(None), "text must be a str or UTF-8 bytes, got NoneType"),
    (lambda: flowdsl.load_text(SPEC, filename=3), "filename must be a str or an os.PathLike"),
    (lambda: flowdsl.compile_spec("x.yaml", search_path=1), "search_path must be a str, an os.PathLike"),
    (lambda: flowdsl.plan_bytes("plan"), "plan must be an execution plan (a dict"),
    (lambda: flowdsl.api.compile_loaded("text", "x.yaml"), "doc must be the LoadedDoc of flowdsl.load()"),
    (lambda: flowdsl.run([], {}), "plan must be an execution plan: a dict, the 'plan' of flowdsl.compile_spec()"),
    (lambda: flowdsl.run(None, {}), "got None — compile_spec() gives no plan when the spec has errors: its "
                                    ".diagnostics say which"),
    (lambda: flowdsl.run(flowdsl.compile_text(SPEC), None), "run_input must be a dict (a JSON object); got NoneType"),
    (lambda: flowdsl.worker(5), "worker name must be a non-empty str"),
])
def test_arguments_of_the_wrong_type_are_a_type_error_naming_the_parameter(call: Any, message: str) -> None:
    with pytest.raises(TypeError) as caught:
        call()
    assert message in str(caught.value)


_PLAN = "flowdsl: 1\nname: f\nsteps:\n  - a: {worker: w}\n  - b: {worker: w, when: '${ x }'}\n"


def _broken(change: Any) -> dict[str, Any]:
    plan = flowdsl.compile_text(_PLAN)
    change(plan)
    return plan


@pytest.mark.parametrize(("plan", "message"), [
    ({"x": 1}, f"it has no 'plan_version' (a compiled plan has plan_version 1 to {PLAN_VERSION})"),
    ({"plan_version": PLAN_VERSION + 1}, f"'plan_version' must be 1 to {PLAN_VERSION}, found {PLAN_VERSION + 1}"),
    ({"plan_version": 1, "flow": {"name": "x"}, "root": ["ok"], "nodes": {"ok": 1}},
     "'nodes/ok': 1 is not of type 'object'"),
    (_broken(lambda p: p["nodes"].update(ok=1)), "'nodes/ok': 1 is not of type 'object'"),
    (_broken(lambda p: p.update(root=["gone"])), "'root' names 'gone', which is not a key of 'nodes'"),
    (_broken(lambda p: p["nodes"]["a"].pop("worker")), "'nodes/a': 'worker' is a required property"),
    (_broken(lambda p: p["nodes"]["a"].update(extra=1)),
     "'nodes/a': Unevaluated properties are not allowed ('extra' was unexpected)"),
    (_broken(lambda p: p["nodes"]["a"]["retry"].update(attempts=0)),
     "'nodes/a/retry/attempts': 0 is less than the minimum of 1"),
    (_broken(lambda p: p["nodes"]["b"].update(when="x000000000000")),
     "'nodes/b/when' names the expression 'x000000000000', which is not in 'expressions'"),
    (_broken(lambda p: p["nodes"]["b"].update(deps=["zz"])),
     "'nodes/b/deps' names 'zz', which is not a key of 'nodes'"),
])
def test_run_refuses_a_value_that_is_not_a_plan_saying_which_field(plan: dict[str, Any], message: str) -> None:
    from flowdsl.runtime.plancheck import PlanError

    with pytest.raises(PlanError) as caught:
        flowdsl.run(plan, {}, record=False)
    assert str(caught.value) == f"the plan is not a flowdsl execution plan: {message}"
    assert isinstance(caught.value, ValueError)


def test_a_bare_worker_decorator_registers_the_function_under_its_name() -> None:
    from flowdsl.workers import WorkerRegistry

    reg = WorkerRegistry()

    @flowdsl.worker(registry_=reg)
    def plain(data: Any, ctx: Any) -> None:
        return None

    assert flowdsl.worker(plain) is plain and "plain" in flowdsl.registry
    flowdsl.registry.unregister("plain")
    assert reg.names() == {"plain"}


def test_an_unknown_worker_is_named_once_in_workers_missing() -> None:
    plan = flowdsl.compile_text("flowdsl: 1\nname: t\nsteps:\n  - okk: {compensate: undo_it}\n")
    with pytest.raises(flowdsl.runtime.local.WorkersMissing) as caught:
        flowdsl.run(plan, {}, record=False)
    message = str(caught.value)
    assert message.startswith("the run cannot start: step 'okk' names the worker 'okk', which is not registered; "
                              "compensation 'undo_it' of step 'okk' is not a registered worker")
    assert "step 'okk' of step" not in message


# --- exports and typing ------------------------------------------------------------------------------------


def _type_checking_imports() -> dict[str, str]:
    """Name -> module of the imports under ``if TYPE_CHECKING:`` in flowdsl/__init__.py."""
    import ast

    tree = ast.parse((ROOT / "flowdsl" / "__init__.py").read_text(encoding="utf-8"))
    (block,) = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    found = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names:
            assert alias.asname == alias.name, f"{alias.name}: re-export it as itself ('import X as X')"
            found[alias.name] = node.module
    return found


def test_every_export_is_listed_typed_and_importable() -> None:
    """The lazy ``__getattr__``, the ``TYPE_CHECKING`` imports type checkers read, ``__all__`` and ``dir()`` agree;
    the exceptions the docs say callers see are among them."""
    import importlib

    exports = flowdsl._EXPORTS  # type: ignore[attr-defined]
    assert _type_checking_imports() == exports
    assert sorted(flowdsl.__all__) == sorted(exports) and len(set(flowdsl.__all__)) == len(flowdsl.__all__)
    assert set(flowdsl.__all__) <= set(dir(flowdsl))
    for name, module in exports.items():
        assert getattr(flowdsl, name) is getattr(importlib.import_module(module), name), name
    for name in ("SpecError", "PlanError", "WorkersMissing", "WorkerImportError", "RecordError", "RunAborted"):
        assert issubclass(getattr(flowdsl, name), Exception), name
    assert (ROOT / "flowdsl" / "py.typed").is_file()


_TYPED_USER = '''\
from __future__ import annotations

from typing import Any

import flowdsl
from flowdsl import RunResult, StepContext, worker


@worker("typed.reserve")
async def reserve(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    ctx.logger.info("reserving %s", ctx.attempt)
    return {"reservation": ctx.idempotency_key}


@flowdsl.worker
def release(data: dict[str, Any], ctx: StepContext) -> None:
    return None


@worker()
def audit(data: dict[str, Any], ctx: StepContext) -> dict[str, int]:
    return {"attempt": ctx.attempt}


def main() -> str:
    plan = flowdsl.compile_text("flowdsl: 1\\nname: typed\\nsteps: [typed.reserve]\\n")
    result: RunResult = flowdsl.run(plan, {}, record=False, seed=1, spec_path="flow.yaml", handle_sigint=False)
    for diagnostic in flowdsl.validate("flow.yaml"):
        print(diagnostic.code, diagnostic.line)
    compiled = flowdsl.compile_spec("flow.yaml")
    if compiled.plan is not None:
        print(len(flowdsl.plan_bytes(compiled.plan)))
    try:
        flowdsl.LocalRun(plan, {}, record=False)
    except (flowdsl.SpecError, flowdsl.PlanError, flowdsl.WorkersMissing, flowdsl.WorkerImportError,
            flowdsl.RecordError, flowdsl.RunAborted) as exc:
        print(exc)
    reveal_type(reserve)
    reveal_type(release)
    reveal_type(audit)
    reveal_type(flowdsl.run)
    return result.status


async def amain() -> str:
    result = await flowdsl.run_flow({}, {}, run_id="r", on_event=print)
    return result.status + result.run_id


flowdsl.run(123, {})  # WRONG-PLAN
flowdsl.run({}, {}, recrod=False)  # WRONG-OPTION
'''


def test_mypy_strict_sees_the_types_of_the_api(tmp_path: Path) -> None:
    """A typed program using the API passes ``mypy --strict`` (flowdsl is typed: no import-untyped, no untyped
    decorator, no Any for its names), keeps its workers' signatures, and a wrong call is reported."""
    import re

    pytest.importorskip("mypy")
    program = tmp_path / "user_program.py"
    program.write_text(_TYPED_USER, encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--show-error-codes",
                           "--no-color-output", "--cache-dir", str(tmp_path / "cache"), program.name],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    said = re.findall(r"^user_program\.py:(\d+): (error|note): (.*)$", proc.stdout, re.MULTILINE)
    assert said, proc.stdout + proc.stderr
    lines = _TYPED_USER.splitlines()
    errors = [(lines[int(n) - 1].rsplit("# ", 1)[-1], text) for n, kind, text in said if kind == "error"]
    assert [marker for marker, _ in errors] == ["WRONG-PLAN", "WRONG-OPTION"], proc.stdout
    assert 'Argument 1 to "run" has incompatible type "int"' in errors[0][1] and "[arg-type]" in errors[0][1]
    assert 'Unexpected keyword argument "recrod" for "run"' in errors[1][1]
    revealed = [text.removeprefix("Revealed type is ").replace("builtins.", "")  # (older mypy names builtins)
                for _, _, text in said if text.startswith("Revealed type")]
    assert len(revealed) == 4, proc.stdout
    reserve, release, audit, run = revealed
    assert reserve == ('"def (data: dict[str, Any], ctx: flowdsl.workers.StepContext) -> '
                       'typing.Coroutine[Any, Any, dict[str, Any]]"')
    assert release == '"def (data: dict[str, Any], ctx: flowdsl.workers.StepContext)"'
    assert audit == '"def (data: dict[str, Any], ctx: flowdsl.workers.StepContext) -> dict[str, int]"'
    assert "record: bool =" in run and "spec_path: str | os.PathLike[str] | None =" in run
    assert run.endswith('-> flowdsl.runtime.report.RunResult"')


# --- workers: names, duplicates ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["has space", "x/y", "a..b", ".a", "a.", "ü", "1st", "a-b", "a" * 65, ""])
def test_a_worker_name_follows_the_rule_of_the_spec_language(name: str) -> None:
    import re

    from flowdsl.workers import WorkerRegistry

    pattern = json.loads((ROOT / "specs" / "flowdsl.schema.json").read_text())["$defs"]["worker"]["pattern"]
    assert not re.search(pattern, name)  # the schema refuses it too
    reg = WorkerRegistry()
    with pytest.raises((ValueError, TypeError), match="worker name"):
        flowdsl.worker(name, registry_=reg)(lambda data, ctx: None)
    with pytest.raises(ValueError, match="worker names are ids joined by dots"):
        reg.register(name, lambda data, ctx: None)
    assert reg.names() == set()
    for good in ("a", "_x", "payments.refund", "a" * 64, "A.b_2.c"):
        assert re.search(pattern, good)
        reg.register(good, lambda data, ctx: None)


def test_a_name_is_taken_once_by_one_callable() -> None:
    """A different callable under a taken name is refused, however alike its module and qualified name look."""
    import functools

    from flowdsl.workers import WorkerRegistry

    def f1(data: Any, ctx: Any) -> Any:
        return {"who": 1}

    def f2(data: Any, ctx: Any) -> Any:
        return {"who": 2}

    def f3(tag: int, data: Any, ctx: Any) -> Any:
        return {"who": tag}

    def make(tag: str) -> Any:
        async def handler(data: Any, ctx: Any) -> Any:
            return {"who": tag}
        return handler

    class Service:
        def handle(self, data: Any, ctx: Any) -> Any:
            return {}

    one, other = Service(), Service()
    pairs = [(lambda d, c: 1, lambda d, c: 2), (functools.partial(f1), functools.partial(f2)),
             (functools.partial(f3, 1), functools.partial(f3, 2)), (make("a"), make("b")),
             (one.handle, other.handle), (f1, f2)]
    for first, second in pairs:
        reg = WorkerRegistry()
        reg.register("w", first)
        with pytest.raises(ValueError, match="worker 'w' is already registered") as caught:
            reg.register("w", second)
        assert "cannot take the name too" in str(caught.value)
        found = reg.get("w")
        assert found is not None and found.fn is first
    reg = WorkerRegistry()
    for same in (f1, f1, one.handle, one.handle):  # the same function or bound method again: no conflict
        reg.register(same.__name__, same)
    reg.register("p", functools.partial(f3, 1))
    reg.register("p", functools.partial(f3, 1))


def test_the_same_definitions_run_again_replace_the_old_ones() -> None:
    """A module imported again (reload, tests) or a notebook cell run again: new objects, same definitions."""
    import types

    from flowdsl.workers import WorkerRegistry

    source = ("from flowdsl.workers import worker\n"
              "@worker('m.top', registry_=REG)\ndef top(data, ctx):\n    return {}\n"
              "def make(tag):\n    @worker('m.' + tag, registry_=REG)\n    def inner(data, ctx):\n        return {}\n"
              "    return inner\n"
              "make('a')\n"
              "REG.register('m.lam', lambda data, ctx: {})\n")
    reg = WorkerRegistry()
    for _ in range(2):  # a reload: the module's code runs again in a new namespace
        module = types.ModuleType("reloaded_workers")
        module.REG = reg  # type: ignore[attr-defined]
        exec(compile(source, "reloaded_workers.py", "exec"), module.__dict__)
    assert reg.names() == {"m.top", "m.a", "m.lam"}
    assert reg.get("m.top").fn is module.top  # type: ignore[union-attr]
    exec(compile("@worker('m.top', registry_=REG)\ndef top(data, ctx):\n    return 1\n", "cell", "exec"),
         module.__dict__)  # a cell run again redefines a top-level function: it replaces the old one
    with pytest.raises(ValueError, match="already registered"):  # one namespace, two closures of one factory
        exec("make('a')", module.__dict__)


@pytest.mark.parametrize("make", [
    lambda: __import__("functools").partial(lambda d, c, x: None, x=1),
    lambda: (lambda d, c: None),
    lambda: type("Callable", (), {"__call__": lambda self, d, c: None})(),
])
def test_a_worker_without_a_usable_name_needs_its_name_given(make: Any) -> None:
    from flowdsl.workers import WorkerRegistry

    reg = WorkerRegistry()
    fn = make()
    with pytest.raises(TypeError, match=r"@worker\(\) cannot name this worker: .*; give its name: "
                                        r"@worker\('payments.charge'\)"):
        flowdsl.worker(registry_=reg)(fn)
    assert flowdsl.worker("named", registry_=reg)(fn) is fn and reg.names() == {"named"}


# --- run(): worker modules beside the spec -------------------------------------------------------------------


def test_run_finds_worker_modules_beside_the_spec_given_as_spec_path(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """As `flowdsl run` does: the current directory, then the spec's (a plan does not know its file)."""
    specs = tmp_path / "proj" / "specs"
    specs.mkdir(parents=True)
    module = "spec_relative_workers_7f3a"
    (specs / f"{module}.py").write_text("from flowdsl import worker\n\n@worker('spec_rel_7f3a')\n"
                                        "def step(data, ctx):\n    return {'ran': True}\n", encoding="utf-8")
    spec = specs / "flow.yaml"
    spec.write_text(f"flowdsl: 1\nname: rel\nworkers: [{module}]\nsteps: [spec_rel_7f3a]\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        plan = flowdsl.compile_spec("proj/specs/flow.yaml").plan
        assert plan is not None
        with pytest.raises(flowdsl.WorkerImportError, match="give spec_path="):
            flowdsl.run(plan, {}, record=False)
        result = flowdsl.run(plan, {}, record=False, spec_path=Path("proj/specs/flow.yaml"))
        assert (result.status, result.context) == ("completed", {"ran": True})
        with pytest.raises(TypeError, match="spec_path must be"):
            flowdsl.run(plan, {}, record=False, spec_path=42)  # type: ignore[arg-type]
    finally:
        sys.modules.pop(module, None)
        flowdsl.registry.unregister("spec_rel_7f3a")


def test_compile_text_of_the_text_syntax_without_a_flow_filename_says_so() -> None:
    """Read as YAML, it gave only a YAML error naming spec.yaml."""
    text = "# an order\nflow orders\nstep validate timeout 5s\nstep charge undo refund\n"
    with pytest.raises(flowdsl.SpecError) as caught:
        flowdsl.compile_text(text)
    assert "this looks like the text syntax: pass filename='NAME.flow'" in str(caught.value)
    assert flowdsl.compile_text(text, filename="orders.flow")["flow"]["name"] == "orders"
    with pytest.raises(flowdsl.SpecError) as caught:  # a YAML mistake gets no such hint
        flowdsl.compile_text("flowdsl: 1\nname: t\nsteps: [a\n")
    assert "text syntax" not in str(caught.value)


# --- embedding: the input check, registries (audit F5, F6) --------------------------------------------------------

_TYPED_INPUT = """\
flowdsl: 1
name: typed_input
input:
  type: object
  required: [amount]
  properties:
    amount: {type: number}
    note: {type: string}
steps: [ti_step]
"""


def test_check_input_lists_every_violation_before_anything_starts(tmp_path: Path) -> None:
    """``flowdsl.check_input`` is the CLI's input check, for a web app to answer 400 with: every violation, in
    path order; an input that is no JSON object is an InputError too; nothing is started or recorded."""
    plan = flowdsl.compile_text(_TYPED_INPUT)
    with pytest.raises(flowdsl.InputError) as caught:
        flowdsl.check_input(plan, {"note": 3})
    said = str(caught.value)
    assert said.splitlines()[1:] == ["  at (top): 'amount' is a required property",
                                     "  at /note: 3 is not of type 'string'"], said
    with pytest.raises(flowdsl.InputError) as caught:
        flowdsl.check_input(plan, {"amount": "x", "note": 3})
    assert [line.split(":")[0].strip() for line in str(caught.value).splitlines()[1:]] == ["at /amount", "at /note"]
    for bad, why in (([], "must be a JSON object"), ({"amount": float("nan")}, "is not a JSON object")):
        with pytest.raises(flowdsl.InputError, match=why):
            flowdsl.check_input(plan, bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="plan must be an execution plan"):
        flowdsl.check_input(None, {})  # type: ignore[arg-type]
    assert flowdsl.check_input(plan, {"amount": 1.5, "note": "ok"}) is None
    assert issubclass(flowdsl.InputError, Exception) and "check_input" in flowdsl.__all__
    assert not list(tmp_path.iterdir())


def test_workers_missing_from_a_registry_passed_say_where_they_are(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    """With ``registry=`` and the default ``import_workers=True``, the spec's modules register in the process-wide
    registry: WorkersMissing says that, not to register them with @flowdsl.worker (they are)."""
    from flowdsl.workers import WorkerRegistry

    module = "reg_elsewhere_9c1d"
    (tmp_path / f"{module}.py").write_text("from flowdsl import worker\n\n@worker('elsewhere_9c1d')\n"
                                           "def step(data, ctx):\n    return {}\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    plan = flowdsl.compile_text(f"flowdsl: 1\nname: rel\nworkers: [{module}]\nsteps: [elsewhere_9c1d, nowhere_9c1d]\n")
    try:
        with pytest.raises(flowdsl.WorkersMissing) as caught:
            flowdsl.run(plan, {}, record=False, registry=WorkerRegistry())
        said = str(caught.value)
        assert "'elsewhere_9c1d' is registered in the process-wide registry" in said, said
        assert "not in the registry passed as registry=" in said
        assert caught.value.elsewhere == ["elsewhere_9c1d"]
        # a worker registered nowhere still gets the usual hint
        assert "register workers with @flowdsl.worker in a module" in said
        with pytest.raises(flowdsl.WorkersMissing) as caught:  # the default registry: the usual hint alone
            flowdsl.run(plan, {}, record=False)
        assert "process-wide" not in str(caught.value) and caught.value.elsewhere == []
    finally:
        sys.modules.pop(module, None)
        flowdsl.registry.unregister("elsewhere_9c1d")


def test_two_flows_with_the_same_worker_names_run_in_one_process_with_their_own_registries() -> None:
    """What docs/runtime.md ("From Python") shows: a registry per flow, registry= and import_workers=False."""
    import asyncio

    from flowdsl.workers import WorkerRegistry

    team_a, team_b = WorkerRegistry(), WorkerRegistry()
    flowdsl.worker("shared_do", registry_=team_a)(lambda data, ctx: {"team": "a"})

    @flowdsl.worker("shared_do", registry_=team_b)
    async def do_b(data: Any, ctx: Any) -> dict[str, str]:
        return {"team": "b"}

    plan_a = flowdsl.compile_text("flowdsl: 1\nname: fa\nworkers: [team_a_nowhere]\nsteps: [shared_do]\n")
    plan_b = flowdsl.compile_text("flowdsl: 1\nname: fb\nworkers: [team_b_nowhere]\nsteps: [shared_do]\n")

    async def main() -> tuple[Any, Any]:
        return await asyncio.gather(
            flowdsl.run_flow(plan_a, {}, registry=team_a, import_workers=False, record=False),
            flowdsl.run_flow(plan_b, {}, registry=team_b, import_workers=False, record=False))

    a, b = asyncio.run(main())
    assert (a.context, b.context) == ({"team": "a"}, {"team": "b"})
    assert "shared_do" not in flowdsl.registry


def test_every_public_name_and_its_public_methods_have_docstrings() -> None:
    """Every name of ``flowdsl.__all__`` and ``flowdsl.runtime.redis.__all__`` says what it is, and so does each
    public method and property a class of them defines (a dataclass needs its own docstring, not the signature
    dataclasses writes in its place). An audit found a dozen without."""
    import importlib
    import inspect

    missing = []
    for module_name in ("flowdsl", "flowdsl.runtime.redis"):
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj):
                if not obj.__doc__ or obj.__doc__.startswith(obj.__name__ + "("):
                    missing.append(f"{module_name}.{name}")
                # the class and the flowdsl classes it is built from (a mixin's methods are the class's too)
                own = [c for c in obj.__mro__ if c.__module__.startswith("flowdsl")]
                for attr, value in {a: v for c in reversed(own) for a, v in vars(c).items()}.items():
                    fn = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                    if not attr.startswith("_") and callable(fn) and not (fn.__doc__ or "").strip():
                        missing.append(f"{module_name}.{name}.{attr}")
            elif callable(obj) and not (obj.__doc__ or "").strip():
                missing.append(f"{module_name}.{name}")
    assert not missing, missing
