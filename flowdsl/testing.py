"""Flow tests: YAML files of cases that run a flow on a simulated clock and say how each run must end.

Stage: tooling over the API facade (``flowdsl.api``: the flow is compiled as ``flowdsl plan`` compiles it),
``flowdsl.schema`` (the test file's shape), ``flowdsl.model`` (durations) and the simulated runtime
(``flowdsl.runtime.simulate``) and ``.testing_compare`` (a run against ``expect:``); only the CLI (``flowdsl
test``) and applications import it. docs/testing.md is the reference of the file format.

:func:`load_tests` reads and checks a test file — its shape against ``specs/flowdsl-test.schema.json``, then
what only the flow can say: every step a case names exists and can be scripted so, each input is one the flow
accepts — and returns :class:`FlowTests` or diagnostics located in the file (``file:line:col``), as ``flowdsl
validate`` gives for a spec. :func:`run_case` simulates one case and compares the run with its ``expect``. What a
file sends to the flow's waits (``signals:``) is read by ``.testing_signals``; :func:`what_if` (``flowdsl test
--what-if``) lives in ``.testing_what_if``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flowdsl.diagnostics import Diagnostic, Positions, did_you_mean, has_errors, join, make, quote, sort_diagnostics
from flowdsl.durations import duration_text
from flowdsl.runtime.simulate import Outcome, Script, Signal, Simulation, SimulationError
from flowdsl.testing_compare import Mismatch, compare
from flowdsl.testing_signals import read_signal, wait_key
from flowdsl.testing_what_if import INJECTED, WhatIf, what_if

__all__ = ["INJECTED", "CaseResult", "FlowCase", "FlowTests", "Mismatch", "WhatIf", "WorkerScope", "compare",
           "find_test_files", "load_tests", "run_case", "what_if"]

#: how test files are named: ``flowdsl test DIR`` runs every one below DIR
TEST_SUFFIXES = (".test.yaml", ".test.yml")
#: directories ``flowdsl test DIR`` does not look into
_SKIPPED_DIRS = frozenset({"node_modules", "__pycache__", "site-packages"})
_SCRIPT_TABLES = ("steps", "undo", "fallback")
_RUN_ID_CHARS = re.compile(r"[^A-Za-z0-9_.:-]+")
#: a zero duration in any unit (``0``, ``0s``, ``0m0s``): where a duration may be zero (``after``, ``elapsed``)
_ZERO = re.compile(r"(?:0+(?:\.0*)?(?:h|ms|m|s)?)+\Z")
#: an instance key's iteration: a for_each's plan key and an index written as a run writes it (``lines[0]/``)
_ITERATION = re.compile(r"\[(0|[1-9][0-9]*)\]/")


@dataclass(frozen=True)
class FlowCase:
    """One case of a test file, ready to simulate: ``expect`` holds its expectations as written, with durations
    in milliseconds (``elapsed``: ``{"at_least", "at_most"}``, either None)."""

    name: str
    line: int | None
    input: dict[str, Any]
    script: Script
    expect: dict[str, Any]
    run_id: str
    seed: int = 0
    cancel_at_ms: int | None = None
    cancel_reason: str = "cancelled by the test"


@dataclass(frozen=True)
class FlowTests:
    """A checked test file: the compiled flow it tests and its cases, in the order written."""

    file: str
    flow_file: str
    plan: dict[str, Any]
    cases: list[FlowCase]
    #: the file's own ``input`` (``{}`` when it gives none) and scripts (its signals too), which every case starts
    #: from
    input: dict[str, Any] = field(default_factory=dict)
    defaults: Script = field(default_factory=Script)


@dataclass
class CaseResult:
    """How one case went: ``passed``, ``failed`` (``mismatches`` say how) or ``error`` (``error`` says why: the
    simulation could not be carried out as scripted); ``simulation`` is the run, when there was one."""

    case: FlowCase
    outcome: Literal["passed", "failed", "error"]
    mismatches: list[Mismatch] = field(default_factory=list)
    simulation: Simulation | None = None
    error: str | None = None

    @property
    def passed(self) -> bool:
        """Whether the case passed."""
        return self.outcome == "passed"

    def to_json(self) -> dict[str, Any]:
        """The case in ``flowdsl test -f json`` (docs/testing.md)."""
        sim = self.simulation
        return {"name": self.case.name, "line": self.case.line, "outcome": self.outcome,
                "mismatches": [m.to_json() for m in self.mismatches], "error": self.error,
                "status": sim.result.status if sim is not None else None,
                "elapsed_ms": sim.elapsed_ms if sim is not None else None,
                "run": sim.result.to_json() if sim is not None and not self.passed else None}


# --- finding and loading ---------------------------------------------------------------------------------------

def find_test_files(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The test files ``paths`` name: a file as it is, a directory as every ``*.test.yaml``/``*.test.yml`` below
    it (hidden directories, virtual environments and ``node_modules`` left out), sorted; each once."""
    found: list[str] = []
    for raw in paths:
        path = os.fspath(raw)
        if not os.path.isdir(path):
            found.append(path)
            continue
        below: list[str] = []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIPPED_DIRS
                             and not os.path.exists(os.path.join(root, d, "pyvenv.cfg")))
            below.extend(os.path.normpath(os.path.join(root, f)) for f in files if f.endswith(TEST_SUFFIXES))
        found.extend(sorted(below))
    unique: dict[str, str] = {}
    for file in found:
        unique.setdefault(os.path.realpath(file), file)
    return list(unique.values())


class WorkerScope:
    """The workers of one test file's flow, apart from every other file's (``flowdsl test`` of several files).

    Inside it the process-wide worker registry is empty, and :func:`load_tests` imports the flow's worker modules
    afresh into it, setting aside a module of the same name another file's flow imported (two flows each with a
    ``workers.py`` of their own); on the way out, the registry and those modules are put back as they were.
    """

    def __init__(self) -> None:
        self._registry: dict[str, Any] | None = None
        self._modules: dict[str, types.ModuleType | None] = {}

    def __enter__(self) -> WorkerScope:
        from flowdsl.workers import registry

        self._registry, registry._workers = registry._workers, {}
        return self

    def take(self, modules: Sequence[str]) -> None:
        """Set ``modules`` aside, so that importing them runs them again, here."""
        for name in modules:
            if name not in self._modules:
                self._modules[name] = sys.modules.pop(name, None)

    def __exit__(self, *exc: object) -> None:
        from flowdsl.workers import registry

        assert self._registry is not None
        registry._workers = self._registry
        for name, module in self._modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def load_tests(path: str | os.PathLike[str], *,
               scope: WorkerScope | None = None) -> tuple[FlowTests | None, list[Diagnostic]]:
    """Read and check the test file at ``path``: the :class:`FlowTests` (None when it has errors) and every
    diagnostic found — of the test file, and of the flow it names when that does not compile. The flow's worker
    modules are imported (into ``scope``, when given: see :class:`WorkerScope`)."""
    from flowdsl.api import load
    from flowdsl.schema import TEST_SCHEMA, check_schema

    file = os.fspath(path)
    doc = load(file)
    if doc.data is None:
        return None, [_as_test_file(d) for d in doc.diagnostics]
    if "flowdsl" in doc.data and "flowdsl_test" not in doc.data:
        return None, [doc.positions.locate(make("FD201", "this is a flow spec (it has 'flowdsl:'), not a test file: a "
                                                "test file has flowdsl_test, flow and cases (docs/testing.md)"))]
    diags = [_located(doc.positions, _as_test_file(d))
             for d in [*doc.diagnostics, *check_schema(doc.data, schema=TEST_SCHEMA)]]
    if has_errors(diags):
        return None, sort_diagnostics(diags)
    tests, found = _Checker(file, doc.data, doc.positions, scope).check()
    return tests, sort_diagnostics([*diags, *found])


#: what the front end says of a spec, and what it means in a test file
_SPEC_WORDS = (("expected a mapping with 'flowdsl', 'name' and 'steps'", "expected a mapping with 'flowdsl_test', "
                "'flow' and 'cases'"), ("; use 'defaults:'", "; give scripts every case starts from at the top level "
                                        "instead ('steps:', 'undo:', 'fallback:')"), ("in a spec", "in a test file"))


def _as_test_file(diag: Diagnostic) -> Diagnostic:
    """``diag`` of the front end, worded for a test file where its message speaks of a spec."""
    message = diag.message
    for spec, test in _SPEC_WORDS:
        message = message.replace(spec, test)
    return diag if message == diag.message else dataclasses.replace(diag, message=message)


def _located(positions: Positions, diag: Diagnostic) -> Diagnostic:
    return positions.locate(diag, key=diag.code in ("FD202", "FD104"))


class _Checker:
    """What a test file says that only its flow can check, and the cases built from it."""

    def __init__(self, file: str, data: dict[str, Any], positions: Positions, scope: WorkerScope | None):
        self.file, self.data, self.positions, self.scope = file, data, positions, scope
        self.base = Path(file).parent
        self.diags: list[Diagnostic] = []
        self.plan: dict[str, Any] = {}

    def error(self, code: str, message: str, path: str, *, key: bool = False) -> None:
        self.diags.append(self.positions.locate(make(code, message, path), key=key))

    def check(self) -> tuple[FlowTests | None, list[Diagnostic]]:
        from flowdsl.api import compile_spec

        flow_file = os.path.normpath(self.base / self.data["flow"])
        compiled = compile_spec(flow_file, check_workers=False)
        flow_diags = list(compiled.diagnostics)
        if compiled.plan is not None and not has_errors(flow_diags):
            if self.scope is not None:
                self.scope.take(compiled.plan["flow"]["workers"])
            # a worker nobody registered yet is fine while every attempt of it is scripted (run_case says so if not)
            flow_diags = [d for d in compile_spec(flow_file, check_workers=True).diagnostics if d.code != "FD204"]
        if compiled.plan is None or has_errors(flow_diags):
            self.error("FD703", f"the flow under test, {quote(self.data['flow'])}, has errors (listed under its own "
                       "file)", "/flow")
            return None, [*flow_diags, *self.diags]
        self.plan = compiled.plan
        default_input = self.input(self.data.get("input"), "/input") if "input" in self.data else {}
        defaults = {t: self.scripts(self.data.get(t) or {}, t, join("", t)) for t in _SCRIPT_TABLES}
        signals = self.signals(self.data.get("signals") or [], "/signals")
        cases = [self.case(name, spec, default_input, defaults, signals) for name, spec in self.data["cases"].items()]
        if has_errors(self.diags):
            return None, [*flow_diags, *self.diags]
        return FlowTests(self.file, flow_file, self.plan, cases, default_input or {},
                         Script(**defaults, signals=signals)), [*flow_diags, *self.diags]

    # -- a case

    def case(self, name: str, spec: dict[str, Any], default_input: dict[str, Any] | None,
             defaults: dict[str, dict[str, list[Outcome]]], file_signals: list[Signal]) -> FlowCase:
        path = join("/cases", name)
        run_input = self.input(spec["input"], join(path, "input")) if "input" in spec else default_input
        tables = {t: _merged(defaults[t], self.scripts(spec.get(t) or {}, t, join(path, t))) for t in _SCRIPT_TABLES}
        # (a case's signals replace the file's: `signals: []` sends none)
        signals = self.signals(spec["signals"], join(path, "signals")) if "signals" in spec else file_signals
        cancel_at, reason = None, "cancelled by the test"
        if "cancel" in spec:
            raw = spec["cancel"]
            at = raw["at"] if isinstance(raw, dict) else raw
            cancel_at = self.duration(at, join(path, "cancel", "at") if isinstance(raw, dict) else join(path, "cancel"),
                                      zero=True)
            if isinstance(raw, dict) and "reason" in raw:
                reason = raw["reason"]
        line = self.positions.find(path, key=True)[0]
        return FlowCase(name=name, line=line, input=run_input or {}, script=Script(**tables, signals=signals),
                        expect=self.expect(spec["expect"], join(path, "expect")), run_id=_run_id(self.file, name),
                        seed=int(spec.get("seed", 0)), cancel_at_ms=cancel_at, cancel_reason=reason)

    def input(self, value: Any, path: str) -> dict[str, Any] | None:
        from flowdsl.runtime.inputs import InputError, check_input, read_input

        try:
            data = read_input(str(self.base / value)) if isinstance(value, str) else value
            check_input(self.plan, data)
        except InputError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            said = f"{lines[0]} {'; '.join(lines[1:])}" if len(lines) > 1 and lines[0].endswith(":") \
                else "; ".join(lines)
            self.error("FD703", f"this input cannot start the flow: {said}", path)
            return None
        return data

    def duration(self, value: Any, path: str, *, zero: bool = False) -> int | None:
        from flowdsl.model import parse_duration

        if zero and (value == 0 or (isinstance(value, str) and _ZERO.match(value))):
            return 0
        try:
            return parse_duration(value, self.positions.written.get(path))
        except ValueError as exc:
            self.error("FD401", str(exc), path)
            return None

    # -- scripts

    def signals(self, written: list[Any], path: str) -> list[Signal]:
        def duration(value: Any, where: str) -> int | None:
            return self.duration(value, where, zero=True)

        read = (read_signal(item, join(path, i), self.plan, self.error, duration) for i, item in enumerate(written))
        return [s for s in read if s is not None]

    def scripts(self, table: dict[str, Any], kind: str, path: str) -> dict[str, list[Outcome]]:
        out: dict[str, list[Outcome]] = {}
        for key, written in table.items():
            where = join(path, key)
            node = self.step(key, where, attempts=True, instance=False)
            if node is None:
                continue
            if kind == "undo" and not node.get("compensate"):
                self.error("FD702", f"step {quote(key)} has no compensation: there is no undo to script", where,
                           key=True)
                continue
            if kind == "fallback" and not node.get("fallback"):
                self.error("FD702", f"step {quote(key)} has no fallback worker: there is no fallback to script",
                           where, key=True)
                continue
            items = written if isinstance(written, list) else [written]
            outcomes = [self.outcome(item, node, kind, join(where, i) if isinstance(written, list) else where)
                        for i, item in enumerate(items)]
            out[key] = [o for o in outcomes if o is not None]
        return out

    def outcome(self, item: Any, node: dict[str, Any], kind: str, path: str) -> Outcome | None:
        if isinstance(item, str):
            item = {item: None if item == "ok" else True}
        ways = [w for w in ("ok", "fail", "hang", "real") if w in item]
        if len(ways) != 1:
            said = "none" if not ways else " and ".join(ways)
            self.error("FD201", f"an outcome says one of ok, fail, hang or real; this one says {said}", path)
            return None
        way = ways[0]
        allowed = {way, "after", "ignores_cancel", *(("message", "is") if way == "fail" else ())} - \
            ({"after", "ignores_cancel"} if way == "hang" else {"ignores_cancel"} if way == "real" else set())
        extra = [k for k in item if k not in allowed]
        if extra:
            why = {"hang": ": a hanging attempt never answers",
                   "real": ": a real attempt's answer always comes (the call made its effect)"}.get(way, "")
            self.error("FD202", f"{quote(extra[0])} does not go with {way}{why if extra[0] != 'message' else ''}",
                       join(path, extra[0]), key=True)
            return None
        after = self.duration(item["after"], join(path, "after"), zero=True) if "after" in item else 0
        if after is None:
            return None
        if way == "hang":
            return Outcome.hang()
        late = bool(item.get("ignores_cancel", False))
        if way == "real":
            return Outcome.real(after_ms=after)
        if way == "fail":
            return Outcome.fail(item["fail"], item.get("message", ""), is_a=item.get("is", ()), after_ms=after,
                                ignores_cancel=late)
        result = item["ok"] or {}
        outputs = _signature_outputs(node) if kind in ("steps", "fallback") else []
        missing = [o for o in outputs if o not in result]
        if missing:
            self.error("FD702", f"the result lacks {', '.join(map(quote, missing))}: LLM step {quote(node['key'])} "
                       f"answers the outputs of its signature ({', '.join(outputs)})", join(path, "ok"))
            return None
        return Outcome.ok(result, after_ms=after, ignores_cancel=late)

    # -- steps named

    def step(self, key: str, path: str, *, attempts: bool = False, at_key: bool = True,
             instance: bool = True) -> dict[str, Any] | None:
        """The plan node ``key`` names (a plan key, or an instance key: ``lines[2]/charge``), or None after an
        error; ``attempts``: it must be a step with attempts (a task or LLM step); ``instance``: a node inside a
        for_each must be named with its iteration (what a run did is said of instances)."""
        nodes = self.plan["nodes"]
        plan_key = key.rsplit("]/", 1)[-1]
        node = nodes.get(plan_key)
        if node is None:
            steps = [k for k, n in nodes.items() if n["kind"] in ("task", "llm")] if attempts else list(nodes)
            within = [k for k in steps if k.endswith("/" + plan_key)]  # a sub-flow's step, named by its id alone
            hint = f" (a step of a sub-flow is named by its plan key: {', '.join(map(quote, within))})" if within \
                else did_you_mean(plan_key, steps)
            self.error("FD701", f"no step {quote(key)} in the flow{hint}; its steps: {_listed(steps)}", path,
                       key=at_key)
            return None
        loops = _loops_of(nodes, plan_key)
        if key == plan_key and instance and loops:
            example = "".join(f"{loop}[0]/" for loop in loops) + plan_key
            self.error("FD701", f"step {quote(key)} runs once per item of for_each {quote(loops[-1])}: name one run "
                       f"of it, as {quote(example)}", path, key=at_key)
            return None
        if key != plan_key:
            written = _instance_written(key, loops, plan_key)
            if written is not None:
                example = "".join(f"{loop}[0]/" for loop in loops) + plan_key
                self.error("FD701", f"{quote(key)} names no run of step {quote(plan_key)}: {written}"
                           + (f"; name one as {quote(example)}" if loops else ""), path, key=at_key)
                return None
        if attempts and node["kind"] == "wait":
            self.error("FD702", f"{quote(key)} is a wait, which makes no attempts: what it waits for is sent with the "
                       "case's 'signals' (a signal wait), or passes by itself (a timer)", path, key=at_key)
            return None
        if attempts and node["kind"] not in ("task", "llm"):
            self.error("FD702", f"{quote(key)} is a {node['kind']} node, not a step with attempts: script the task "
                       "or LLM steps inside it", path, key=at_key)
            return None
        return node  # type: ignore[no-any-return]

    def expect(self, spec: dict[str, Any], path: str) -> dict[str, Any]:
        out = dict(spec)
        for name in ("ran", "compensated", "intervention", "passed_over"):
            for i, key in enumerate(spec.get(name) or ()):
                node = self.step(key, join(path, name, i), at_key=False)
                if node is None:
                    continue
                if name == "ran" and node["kind"] not in ("task", "llm"):
                    self.error("FD702", f"{quote(key)} is a {node['kind']} node, not a step with attempts: 'ran' lists "
                               "the steps whose attempts ran" + (f" (expect a wait under 'steps:', as {key}: "
                                                                 "succeeded)" if node["kind"] == "wait" else ""),
                               join(path, name, i))
                elif name in ("compensated", "intervention") and not node.get("compensate"):
                    self.error("FD702", f"step {quote(key)} has no compensation: it is never undone",
                               join(path, name, i))
                elif name == "passed_over" and node.get("on_failure") != "continue":
                    self.error("FD702", f"step {quote(key)} has no 'on_failure: continue': its failure fails the "
                               "run, which never goes on without it", join(path, name, i))
        for key, want in (spec.get("steps") or {}).items():
            node = self.step(key, join(path, "steps", key))
            if node is not None and isinstance(want, dict) and want.get("undone") and not node.get("compensate"):
                self.error("FD702", f"step {quote(key)} has no compensation: it is never undone",
                           join(path, "steps", key, "undone"))
            if node is not None and isinstance(want, dict) and "key" in want and wait_key(node) is None:
                what = "takes its signal without a key" if node["kind"] == "wait" else \
                    f"is a {node['kind']} node" if node["kind"] not in ("task", "llm") else "is a step"
                self.error("FD702", f"{quote(key)} {what}: only a wait with 'key:' has a key to expect",
                           join(path, "steps", key, "key"))
        if spec.get("failed_step") is not None:
            self.step(spec["failed_step"], join(path, "failed_step"), at_key=False)
        if "elapsed" in spec:
            raw = spec["elapsed"]
            if isinstance(raw, dict):
                out["elapsed"] = {b: self.duration(raw[b], join(path, "elapsed", b), zero=True) if b in raw else None
                                  for b in ("at_least", "at_most")}
                low, high = out["elapsed"]["at_least"], out["elapsed"]["at_most"]
                if low is not None and high is not None and low > high:
                    self.error("FD201", f"at_least ({duration_text(low)}) is more than at_most "
                               f"({duration_text(high)}): no run can take that long", join(path, "elapsed"))
            else:
                exact = self.duration(raw, join(path, "elapsed"), zero=True)
                out["elapsed"] = {"at_least": exact, "at_most": exact}
        return out


def _loops_of(nodes: Mapping[str, Any], key: str) -> list[str]:
    """The for_each nodes ``key`` is within, outermost first."""
    loops: list[str] = []
    scope = nodes[key].get("scope")
    while scope is not None:
        if nodes[scope]["kind"] == "for_each":
            loops.insert(0, str(scope))
        scope = nodes[scope].get("scope")
    return loops


def _instance_written(key: str, loops: Sequence[str], plan_key: str) -> str | None:
    """What is wrong with ``key`` as an instance key of ``plan_key`` inside ``loops`` (docs/kernel.md, "Keys": each
    for_each around it, outermost first, with an index as a run writes it, then the plan key), or None."""
    if not loops:
        return "it runs once, in no for_each: name it by its id alone"
    rest = key
    for loop in loops:
        if not rest.startswith(loop + "["):
            return f"it runs within for_each {', then '.join(map(quote, loops))}, each named with the index of a run"
        found = _ITERATION.match(rest, len(loop))
        if found is None:
            return f"the index after {quote(loop)} is not one a run writes (0, 1, 2, …)"
        rest = rest[found.end():]
    return None if rest == plan_key else f"it runs within for_each {', then '.join(map(quote, loops))}, each named " \
        "with the index of a run"


def _listed(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "") if names else "(none)"


def _signature_outputs(node: Mapping[str, Any]) -> list[str]:
    block = node.get("llm") or {}
    return [o["name"] for o in (block.get("signature") or {}).get("outputs") or ()]


def _run_id(file: str, name: str) -> str:
    """A run id for a case: its name made of the characters run ids allow, and a digest of the file and the name,
    so that no two cases share one (nor their steps' idempotency keys), even when their names read the same."""
    slug = _RUN_ID_CHARS.sub("-", name).strip("-.")[:80]
    digest = hashlib.sha256(f"{os.path.realpath(file)}\0{name}".encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"test-{slug or 'case'}-{digest}"


def _merged(file_level: dict[str, list[Outcome]], case: dict[str, list[Outcome]]) -> dict[str, list[Outcome]]:
    """A case's scripts over the file's: a step the case scripts (by id or by instance) keeps none of the file's
    scripts of it."""
    mine = {key.rsplit("]/", 1)[-1] for key in case}
    return {**{k: v for k, v in file_level.items() if k.rsplit("]/", 1)[-1] not in mine}, **case}


# --- running and comparing -------------------------------------------------------------------------------------

async def run_case(tests: FlowTests, case: FlowCase, *, lm: object | str | None = None,
                   lms: Mapping[str, object] | None = None) -> CaseResult:
    """Simulate ``case`` of ``tests`` and compare the run with what it expects."""
    from flowdsl.runtime.simulate import simulate_flow

    try:
        sim = await simulate_flow(tests.plan, case.input, script=case.script, run_id=case.run_id, seed=case.seed,
                                  cancel_at_ms=case.cancel_at_ms, cancel_reason=case.cancel_reason, lm=lm, lms=lms)
    except SimulationError as exc:
        return CaseResult(case, "error", error=str(exc))
    except Exception as exc:  # flowdsl's own failure, said as this case's: the other cases still run
        return CaseResult(case, "error", error=f"the simulation failed: {type(exc).__name__}: {exc}")
    mismatches = list(compare(case.expect, sim))
    return CaseResult(case, "failed" if mismatches else "passed", mismatches, sim)
