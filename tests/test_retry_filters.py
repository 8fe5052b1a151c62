"""FD313: a retry filter (``on``, ``not_on``) naming an error type that no exception class of the process is called,
nor any error type flowdsl records (docs/diagnostics.md, FD313) — checked once the worker modules are imported.
"""

from __future__ import annotations

import ast
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

import flowdsl.llm
from flowdsl.api import CompileResult, compile_spec
from flowdsl.checks_retry import FLOWDSL_ERROR_TYPES, exception_names, known_error_types
from flowdsl.cli import app
from flowdsl.diagnostics import CODES

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "flowdsl"


@pytest.fixture
def workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of a fresh worker module in tmp_path (a new name each test: its classes are its own), which defines
    ``GatewayTimeout`` and imports a helper module defining ``LedgerUnavailable``; an empty registry."""
    from flowdsl.workers import registry

    monkeypatch.setattr(registry, "_workers", {})
    monkeypatch.setattr(sys, "path", list(sys.path))
    tag = uuid.uuid4().hex[:8]
    name, helper = f"pay_workers_{tag}", f"pay_ledger_{tag}"
    for module in (name, helper):
        monkeypatch.delitem(sys.modules, module, raising=False)
    (tmp_path / f"{helper}.py").write_text("class LedgerUnavailable(ConnectionError):\n    pass\n", encoding="utf-8")
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""\
        import {helper}
        from flowdsl.workers import worker


        class PaymentError(Exception):
            pass


        class GatewayTimeout(PaymentError):
            pass


        @worker("charge")
        def charge(data, ctx):
            return {{}}


        @worker("refund")
        def refund(data, ctx):
            return None
        """), encoding="utf-8")
    return name


def compiled(tmp_path: Path, text: str, name: str = "spec.yaml", **kwargs: object) -> CompileResult:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    kwargs.setdefault("check_workers", True)
    kwargs.setdefault("search_path", str(tmp_path))
    return compile_spec(str(path), **kwargs)  # type: ignore[arg-type]


def fd313(result: CompileResult) -> list[tuple[int | None, int | None, str, str]]:
    """(line, column, path, name quoted first) of each FD313, the only diagnostics there are."""
    assert result.plan is not None, [d.format() for d in result.diagnostics]  # a warning: the plan is made
    assert {d.code for d in result.diagnostics} <= {"FD313"}, [d.format() for d in result.diagnostics]
    return [(d.line, d.column, d.path, d.message.split("'")[3]) for d in result.diagnostics]


# --- the rule ------------------------------------------------------------------------------------------------


def test_every_filter_of_a_spec_is_checked_at_the_name(tmp_path: Path, workers: str) -> None:
    result = compiled(tmp_path, f"""\
        flowdsl: 1
        name: t
        workers: [{workers}]
        defaults:
          retry: {{attempts: 3, not_on: [PaymentEror]}}
          compensate:
            retry: {{"on": [LedgerUnavailble]}}
        steps:
          - charge:
              retry: {{attempts: 5, "on": [ConnectionError, GatewayTimout]}}
              compensate:
                worker: refund
                retry: {{attempts: 2, not_on: [TimeoutEror]}}
        """)
    assert fd313(result) == [
        (5, 33, "/defaults/retry/not_on/0", "PaymentEror"),
        (7, 20, "/defaults/compensate/retry/on/0", "LedgerUnavailble"),
        (10, 52, "/steps/0/charge/retry/on/1", "GatewayTimout"),
        (13, 39, "/steps/0/charge/compensate/retry/not_on/0", "TimeoutEror"),
    ]
    hints = [d.message.split("(did you mean ")[1].split("?")[0] for d in result.diagnostics]
    assert hints == ["'PaymentError'", "'LedgerUnavailable'", "'GatewayTimeout'", "'TimeoutError'"]


def test_the_text_line(tmp_path: Path, workers: str) -> None:
    result = compiled(tmp_path, f"""\
        flowdsl: 1
        name: t
        workers: [{workers}]
        steps:
          - charge: {{retry: {{"on": [GatewayTimout]}}}}
        """, "orders.yaml", search_path=str(tmp_path))
    (d,) = result.diagnostics
    assert d.format().endswith(
        "orders.yaml:5:29: warning FD313: retry filter 'on' names 'GatewayTimout', the name of no exception class in "
        "the worker modules or what they import, nor of an error type flowdsl records (did you mean "
        "'GatewayTimeout'?): it never matches; a filter matches exception class names (type(exc).__name__ and its "
        "bases)")


def test_the_text_syntax_is_checked_at_the_name(tmp_path: Path, workers: str) -> None:
    result = compiled(tmp_path, f"""\
        flow t
        workers {workers}
        step charge retry {{attempts: 3, on: [GatewayTimeout, PaymentEror]}}
        """, "spec.flow")
    assert fd313(result) == [(3, 54, "/steps/0/charge/retry/on/1", "PaymentEror")]


def test_names_the_process_knows_are_not_reported(tmp_path: Path, workers: str) -> None:
    known = ["GatewayTimeout", "PaymentError",  # the worker module's classes
             "LedgerUnavailable",  # a module it imports
             "ConnectionError", "TimeoutError", "Exception", "KeyError", "SystemExit",  # Python's
             *sorted(FLOWDSL_ERROR_TYPES)]  # flowdsl's own
    result = compiled(tmp_path, f"""\
        flowdsl: 1
        name: t
        workers: [{workers}]
        steps:
          - charge: {{retry: {{"on": [{", ".join(known)}]}}}}
          - refund: {{retry: {{not_on: [{", ".join(known)}]}}}}
        """)
    assert fd313(result) == []


@pytest.mark.parametrize("name", ["BaseException", "object"])
def test_the_root_of_the_exception_classes_is_reported_it_is_never_matched(tmp_path: Path, workers: str,
                                                                           name: str) -> None:
    """An error lists its exception's class names up to, not including, BaseException: `on: [BaseException]`
    never retried anything (and `not_on` stopped nothing) — the class exists, so it was not reported."""
    from flowdsl.runtime.execute import error_types

    assert name not in error_types(SystemExit(1)) + error_types(KeyError("k"))  # (what the rule stands on)
    result = compiled(tmp_path, f"""\
        flowdsl: 1
        name: t
        workers: [{workers}]
        steps:
          - charge: {{retry: {{"on": [{name}]}}}}
          - refund: {{retry: {{not_on: [Exception, {name}]}}}}
        """)
    assert [(path, quoted) for _, _, path, quoted in fd313(result)] == [
        ("/steps/0/charge/retry/on/0", name), ("/steps/1/refund/retry/not_on/1", name)]
    assert "never matches" in result.diagnostics[0].message and "name 'Exception'" in result.diagnostics[0].message


def test_not_checked_without_the_worker_modules(tmp_path: Path, workers: str) -> None:
    text = f"""\
        flowdsl: 1
        name: t
        workers: [{workers}]
        steps:
          - charge: {{retry: {{"on": [GatewayTimout]}}}}
        """
    assert fd313(compiled(tmp_path, text)) != []
    assert compiled(tmp_path, text, check_workers=False).diagnostics == []  # compile_spec's default, --no-import
    path = tmp_path / "spec.yaml"
    result = CliRunner().invoke(app, ["validate", "--no-import", str(path)])
    assert result.exit_code == 0 and "FD313" not in result.output


def test_not_checked_when_a_module_cannot_be_imported_or_none_is_listed(tmp_path: Path, workers: str) -> None:
    result = compiled(tmp_path, f"""\
        flowdsl: 1
        name: t
        workers: [{workers}, no_such_module_{uuid.uuid4().hex[:6]}]
        steps:
          - charge: {{retry: {{"on": [GatewayTimout]}}}}
        """)
    assert [d.code for d in result.diagnostics] == ["FD205"]  # its classes are unknown: no guesses
    result = compiled(tmp_path, """\
        flowdsl: 1
        name: t
        steps:
          - charge: {retry: {"on": [GatewayTimout]}}
        """)
    assert result.diagnostics == []  # no module is listed: nothing was imported, nothing is known


def test_sub_flows_are_checked_once_every_module_is_imported(tmp_path: Path, workers: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # the root's filter names a class that only the sub-flow's worker module defines: known, as every module of
    # the spec and its sub-flows is imported first; the sub-flow's own misspelt filter is reported in its file
    wrap = f"wrap_workers_{uuid.uuid4().hex[:8]}"
    monkeypatch.delitem(sys.modules, wrap, raising=False)
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / f"{wrap}.py").write_text(textwrap.dedent("""\
        from flowdsl.workers import worker


        class RibbonJammed(Exception):
            pass


        @worker("wrap")
        def wrap(data, ctx):
            return {}
        """), encoding="utf-8")
    (tmp_path / "lib" / "gift.yaml").write_text(textwrap.dedent(f"""\
        flowdsl: 1
        name: gift
        workers: [{wrap}]
        steps:
          - wrap: {{retry: {{"on": [RibbonJamed]}}}}
        """), encoding="utf-8")
    result = compiled(tmp_path, f"""\
        flowdsl: 1
        name: t
        workers: [{workers}]
        steps:
          - charge: {{retry: {{"on": [RibbonJammed, GatewayTimeout]}}}}
          - flow: gift
            path: lib/gift.yaml
        """)
    assert [(Path(d.file or "").name, d.line, d.path) for d in result.diagnostics] == [
        ("gift.yaml", 5, "/steps/0/wrap/retry/on/0")]
    assert "(did you mean 'RibbonJammed'?)" in result.diagnostics[0].message


# --- what is known ------------------------------------------------------------------------------------------


def test_exception_names_are_every_subclass_in_the_process() -> None:
    class Outer(LookupError):
        pass

    class InnerOfOuter(Outer):
        pass

    names = exception_names()
    assert {"BaseException", "Exception", "LookupError", "Outer", "InnerOfOuter", "JSONDecodeError"} <= names
    assert known_error_types() == names | FLOWDSL_ERROR_TYPES


def _constants(trees: dict[Path, ast.Module]) -> dict[str, set[str]]:
    """Module-level ``NAME = "text"`` assignments of the package: name -> texts."""
    found: dict[str, set[str]] = {}
    for tree in trees.values():
        for node in tree.body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                    and isinstance(node.value.value, str):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        found.setdefault(target.id, set()).add(node.value.value)
    return found


def _texts(node: ast.expr, constants: dict[str, set[str]]) -> set[str]:
    """The error type texts an expression can give: a string, a module constant, the fallback of an ``or``;
    nothing for a name read at run time (``type(exc).__name__``: an exception class, known as such)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.Name):
        return constants.get(node.id, set())
    return {t for inner in ast.walk(node) if isinstance(inner, ast.BoolOp)
            for v in inner.values[1:] for t in _texts(v, constants)}


def recorded_error_types() -> set[str]:
    """Every error type flowdsl's own code writes into a failure: the kernel's ``error(TYPE, message)``, the
    runtimes' ``_failed(task_id, TYPE, message)``, a ``task_failed`` event's ``error`` written out, and an error
    dict assigned to ``error`` or ``err`` (the Redis runtime's schedule-to-start timeout; the kernel's reading of
    a failure reported without a type, ``Error``); plus the exception classes of ``flowdsl.llm`` an LLM step's
    attempt fails with."""
    trees = {p: ast.parse(p.read_text(encoding="utf-8")) for p in PACKAGE.rglob("*.py")}
    constants = _constants(trees)
    found: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                if node.func.id == "error" and node.args:
                    found |= _texts(node.args[0], constants)
                elif node.func.id == "_failed" and len(node.args) > 1:
                    found |= _texts(node.args[1], constants)
            elif isinstance(node, ast.Dict):
                keys = {k.value: v for k, v in zip(node.keys, node.values, strict=True)
                        if isinstance(k, ast.Constant)}
                event = keys.get("type")
                if isinstance(event, ast.Constant) and event.value == "task_failed" \
                        and isinstance(keys.get("error"), ast.Dict):
                    inner = keys["error"]
                    assert isinstance(inner, ast.Dict)
                    found |= {t for k, v in zip(inner.keys, inner.values, strict=True)
                              if isinstance(k, ast.Constant) and k.value == "type" for t in _texts(v, constants)}
            elif isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Dict) \
                    and any(isinstance(t, ast.Name) and t.id in ("error", "err")
                            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])):
                found |= {t for k, v in zip(node.value.keys, node.value.values, strict=True)
                          if isinstance(k, ast.Constant) and k.value == "type" for t in _texts(v, constants)}
    llm_classes = {name for name in flowdsl.llm.__all__ if isinstance(getattr(flowdsl.llm, name), type)
                   and issubclass(getattr(flowdsl.llm, name), BaseException)}
    return found | llm_classes


def test_flowdsl_s_own_error_types_are_what_its_code_records() -> None:
    recorded = recorded_error_types()
    assert {"StepTimeout", "WorkerNotFound", "ScheduleToStartTimeout", "Error", "LLMNotConfigured"} <= recorded
    assert recorded == FLOWDSL_ERROR_TYPES


def test_fd313_is_a_documented_warning() -> None:
    assert CODES["FD313"] == ("warning", "retry filter that names no exception class")
