"""Flow tests (docs/testing.md): the simulator, test files and their diagnostics, and ``flowdsl test``.

- ``tests/flowtests/valid/*.test.yaml``: every case passes; together they use every part of the format.
- ``tests/flowtests/invalid/FD###_<slug>.test.yaml``: gives exactly ``<same>.diagnostics.txt`` (the lines
  ``flowdsl test`` prints, paths from the repository's root), one of them of code FD###.
- ``examples/*/flow.test.yaml``: the canonical flows' tests pass.

``make goldens`` (``pytest --update-goldens``) rewrites the golden files.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flowdsl.api import compile_spec, compile_text
from flowdsl.diagnostics import CODES
from flowdsl.runtime.inputs import InputError
from flowdsl.runtime.simulate import Outcome, Script, SimulationError, error_types_of, simulate
from flowdsl.testing import Mismatch, compare, find_test_files, load_tests
from flowdsl.workers import WorkerRegistry

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "tests" / "flowtests"
SHOP = CASES / "flows" / "shop.yaml"
INVALID_CASES = sorted((CASES / "invalid").glob("FD*.test.yaml"))
TEST_FILE_CODES = sorted(code for code in CODES if code.startswith("FD7"))
ORDER = {"order": {"id": "o1", "lines": [{"sku": "a"}, {"sku": "b"}]}}


@pytest.fixture(autouse=True)
def _from_the_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Paths from the repository's root, and no model configured: unscripted LLM steps take their fallbacks."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("FLOWDSL_LM", raising=False)


def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(_app(), ["test", *args])
    return result.exit_code, result.stdout, result.stderr


def _app() -> Any:
    from flowdsl.cli import app

    return app


def _shop() -> dict[str, Any]:
    result = compile_spec(str(SHOP), check_workers=True)
    assert result.plan is not None, [d.format() for d in result.diagnostics]
    return result.plan


# --- the committed cases ----------------------------------------------------------------------------------------


def test_every_valid_case_passes() -> None:
    code, out, _ = _cli("tests/flowtests/valid", "-f", "json")
    report = json.loads(out)
    failed = [(c["name"], c["mismatches"], c["error"]) for f in report["files"] for c in f["cases"]
              if c["outcome"] != "passed"]
    assert failed == [] and code == 0
    assert report["status"] == "passed" and report["cases"] == report["passed"] >= 16


def test_the_examples_tests_pass() -> None:
    code, out, _ = _cli("examples")
    assert code == 0, out
    assert re.search(r"^\d+ cases: \d+ passed$", out, re.MULTILINE), out
    assert "examples/ecommerce_order/flow.test.yaml" in out and "examples/order_management/flow.test.yaml" in out


@pytest.mark.parametrize("case", INVALID_CASES, ids=[c.name for c in INVALID_CASES])
def test_invalid_case_diagnostics(case: Path, goldens: Any) -> None:
    tests, diags = load_tests(case.relative_to(ROOT))
    assert tests is None and diags
    code = case.name.split("_", 1)[0]
    assert code in {d.code for d in diags}, [d.format() for d in diags]
    goldens.check(case.with_name(case.name.removesuffix(".test.yaml") + ".diagnostics.txt"),
                  "".join(d.format() + "\n" for d in diags))


def test_every_test_file_code_has_a_case_and_a_documented_example() -> None:
    covered = {c.name.split("_", 1)[0] for c in INVALID_CASES}
    assert TEST_FILE_CODES == ["FD701", "FD702", "FD703"] and set(TEST_FILE_CODES) <= covered
    docs = (ROOT / "docs" / "diagnostics.md").read_text(encoding="utf-8")
    shown = re.findall(r"^(tests/flowtests/invalid/(FD7\d\d_[a-z0-9_]+)\.test\.yaml:\d+:\d+: .*)$", docs, re.MULTILINE)
    assert {name[:5] for _, name in shown} == set(TEST_FILE_CODES)
    for line, name in shown:
        golden = (CASES / "invalid" / f"{name}.diagnostics.txt").read_text(encoding="utf-8").splitlines()
        assert line in golden, f"docs/diagnostics.md shows a line {name} does not print:\n{line}"


# --- the simulator ----------------------------------------------------------------------------------------------


def test_a_simulation_is_deterministic_whatever_order_the_script_is_written_in() -> None:
    plan = _shop()
    script = {"charge": [Outcome.fail("GatewayTimeout"), Outcome.ok({"charge_id": "c"}, after_ms=300)],
              "note": [Outcome.ok({"note": "hi"}, after_ms=700)], "lines[1]/reserve": [Outcome.ok({}, after_ms=5)]}
    one = simulate(plan, ORDER, script=Script(steps=script), seed=None, run_id="r")
    two = simulate(plan, ORDER, script=Script(steps=dict(reversed(script.items()))), seed=None, run_id="r")
    assert json.dumps(one.result.events) == json.dumps(two.result.events)
    assert one.calls == two.calls and one.elapsed_ms == two.elapsed_ms
    # the first charge failed at 5 ms; its retry waits 1 s (constant); the answer takes 300 ms more
    assert one.elapsed_ms == 5 + 1000 + 300
    assert [(c.at_ms, c.step, c.attempt, c.outcome) for c in one.calls if c.step == "charge"] == \
        [(5, "charge", 1, "fail"), (1005, "charge", 2, "ok")]


def test_the_virtual_clock_starts_at_a_fixed_epoch_and_jumps_to_each_due_time() -> None:
    sim = simulate(_shop(), ORDER, script=Script(steps={"charge": [Outcome.hang()]}))
    started, *_, finished = sim.result.events
    assert started["at"] == 1_767_225_600_000 and finished["at"] == started["at"] + 5_000
    assert sim.result.status == "compensated" and sim.result.error is not None
    assert sim.result.error["type"] == "StepTimeout"


def test_an_attempt_that_hangs_with_no_timeout_leaves_the_run_waiting() -> None:
    sim = simulate(_shop(), ORDER, script=Script(steps={"check": [Outcome.hang()]}), run_id="w")
    assert sim.result.status == "running" and not sim.ended and sim.elapsed_ms is None
    assert sim.waiting == ["w/check#1"]
    mismatches = list(compare({"status": "completed", "elapsed": {"at_least": None, "at_most": 1000}}, sim))
    assert mismatches == [Mismatch("status", "completed", "running"),
                          Mismatch("elapsed", "at most 1s", None, "the run never ended")]


def test_a_late_success_that_ignores_the_cancel_is_a_late_completion_and_one_that_honours_it_is_not() -> None:
    plan = _shop()
    late = Outcome.ok({"charge_id": "late"}, after_ms=6_000, ignores_cancel=True)
    sim = simulate(plan, ORDER, script=Script(steps={"charge": [late]}))
    assert sim.result.status == "needs_intervention"
    assert [e["type"] for e in sim.result.events if e["type"] in ("result_rejected", "late_completion")] == \
        ["result_rejected", "late_completion"]
    polite = Outcome.ok({"charge_id": "late"}, after_ms=6_000)
    sim = simulate(plan, ORDER, script=Script(steps={"charge": [polite]}))
    assert sim.result.status == "compensated" and sim.elapsed_ms == 5_000
    # its answer to the cancel (task_cancelled) comes after the run gave the attempt up: rejected, and no more
    assert [(e["type"], e.get("result_type")) for e in sim.result.events if e["type"] in
            ("result_rejected", "late_completion")] == [("result_rejected", "task_cancelled")]


def test_a_cancel_at_a_virtual_time_cancels_the_run_then() -> None:
    sim = simulate(_shop(), ORDER, script=Script(steps={"note": [Outcome.ok({"note": "x"}, after_ms=9_000)]}),
                   cancel_at_ms=2_500, cancel_reason="changed my mind")
    assert sim.result.status == "cancelled" and sim.elapsed_ms == 2_500
    assert any(e["type"] == "step_cancelled" and e["step"] == "note" for e in sim.result.events)


def test_unscripted_attempts_call_the_real_workers_with_the_runs_keys() -> None:
    plan = _shop()
    from flowtest_shop_workers import CALLS  # (imported by compile_spec from the flow's directory)

    CALLS.clear()
    sim = simulate(plan, ORDER, run_id="keys", script=Script(undo={"reserve": [Outcome.ok()]},
                                                            steps={"ship": [Outcome.fail("CarrierDown")]}))
    assert sim.result.status == "compensated"
    assert CALLS == [("shop.check", "keys/check"), ("shop.reserve", "keys/lines[0]/reserve"),
                     ("shop.reserve", "keys/lines[1]/reserve"), ("shop.charge", "keys/charge"),
                     ("shop.plain_note", "keys/note"), ("shop.refund", "keys/charge/compensate")]
    assert [(c.kind, c.step, c.outcome) for c in sim.calls][-3:] == \
        [("compensate", "charge", "real"), ("compensate", "lines[1]/reserve", "ok"),
         ("compensate", "lines[0]/reserve", "ok")]


def test_a_worker_nobody_registered_may_be_scripted_but_not_left_to_run() -> None:
    plan = compile_text("flowdsl: 1\nname: tdd\nsteps:\n  - not_written_yet\n  - neither_this\n")
    registry = WorkerRegistry()
    scripted = Script(steps={"not_written_yet": [Outcome.ok({"x": 1})], "neither_this": [Outcome.ok()]})
    assert simulate(plan, {}, script=scripted, registry=registry).result.status == "completed"
    with pytest.raises(SimulationError, match=r"step 'neither_this' has no scripted outcome and its worker "
                       r"'neither_this' is not registered"):
        simulate(plan, {}, script=Script(steps={"not_written_yet": [Outcome.ok()]}), registry=registry)


def test_a_real_worker_slower_than_its_steps_timeout_counts_as_not_answering() -> None:
    import asyncio

    plan = compile_text("flowdsl: 1\nname: slow\nsteps:\n  - slow_call: {timeout: 50ms}\n")
    registry = WorkerRegistry()

    async def slow_call(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        await asyncio.sleep(30)
        return {}

    registry.register("slow_call", slow_call)
    sim = simulate(plan, {}, registry=registry)
    assert sim.result.status == "failed" and sim.elapsed_ms == 50
    assert sim.result.error is not None and sim.result.error["type"] == "StepTimeout"


def test_a_run_that_goes_on_past_the_event_bound_stops_with_an_error() -> None:
    with pytest.raises(SimulationError, match="still going after 3 simulated answers and timers"):
        simulate(_shop(), ORDER, max_events=3)


def test_an_input_the_flow_refuses_is_an_input_error() -> None:
    with pytest.raises(InputError, match="'lines' is a required property"):
        simulate(_shop(), {"order": {"id": "o1"}})


def test_a_scripted_failure_stands_for_its_parents_as_a_raised_exception_does() -> None:
    assert error_types_of("ConnectionRefusedError") == ["ConnectionRefusedError", "ConnectionError", "OSError",
                                                        "Exception"]
    assert error_types_of("GatewayTimeout") == ["GatewayTimeout", "Exception"]
    assert error_types_of("SocketReset", ["ConnectionError"]) == ["SocketReset", "ConnectionError", "Exception"]
    assert error_types_of("KeyboardInterrupt") == ["KeyboardInterrupt"]


# --- expectations -----------------------------------------------------------------------------------------------


def test_every_expectation_that_does_not_hold_is_said() -> None:
    sim = simulate(_shop(), ORDER, script=Script(steps={"ship": [Outcome.fail("CarrierDown")]}))
    expect = {"status": "completed", "error": None, "failed_step": "charge", "ran": ["check"],
              "compensated": [], "intervention": ["charge"],
              "steps": {"charge": {"status": "succeeded", "attempts": 2, "error": "X", "undone": False},
                        "ship": "succeeded"},
              "context": {"charge_id": "ch-o1", "checked": 1, "shipment": {"tracking": "T"}, "thanks": {"note": 1}},
              "elapsed": {"at_least": 1, "at_most": None}}
    found = list(compare(expect, sim))
    assert [m.note for m in found if m.note is not None] == ["no such key"]
    got = {m.field: (m.expected, m.got) for m in found}
    assert got == {
        "status": ("completed", "compensated"),
        "error": (None, "CarrierDown"),
        "failed_step": ("charge", "ship"),
        "ran": (["check"], ["check", "lines[0]/reserve", "lines[1]/reserve", "charge", "note", "ship"]),
        "compensated": ([], ["charge", "lines[1]/reserve", "lines[0]/reserve"]),
        "intervention": (["charge"], []),
        "steps.charge.attempts": (2, 1),
        "steps.charge.error": ("X", None),
        "steps.charge.undone": (False, True),
        "steps.ship.status": ("succeeded", "failed"),
        "context.checked": (1, True),  # true is not 1
        "context.shipment": ({"tracking": "T"}, None),
        "context.thanks.note": (1, "Thank you for order o1."),
        "elapsed": ("at least 1ms", "0ms"),
    }


def test_context_expectations_ignore_other_keys_but_not_list_items() -> None:
    sim = simulate(_shop(), ORDER)
    assert list(compare({"context": {"shipment": {"note": "Thank you for order o1."}, "charge_id": "ch-o1"}},
                        sim)) == []
    sim.result.context["amounts"] = [1, {"a": 1, "b": 2}]
    assert list(compare({"context": {"amounts": [1.0, {"a": 1}]}}, sim)) == []
    assert [m.field for m in compare({"context": {"amounts": [1]}}, sim)] == ["context.amounts"]


# --- the command ------------------------------------------------------------------------------------------------


FAILING = """\
flowdsl_test: 1
flow: {flow}
input: {{order: {{id: o1, lines: [{{sku: a}}]}}}}
cases:
  passes:
    expect: {{status: completed}}
  fails:
    steps: {{check: ok, ship: {{fail: CarrierDown}}}}
    expect: {{status: completed, compensated: []}}
  cannot run:
    steps: {{check: real}}
    expect: {{status: completed}}
"""


def _failing(tmp_path: Path, *, registered: bool = True) -> Path:
    flow = SHOP if registered else tmp_path / "unwritten.yaml"
    if not registered:
        flow.write_text("flowdsl: 1\nname: unwritten\nsteps:\n  - check\n  - ship\n", encoding="utf-8")
    path = tmp_path / "shop.test.yaml"
    path.write_text(FAILING.format(flow=flow), encoding="utf-8")
    return path


def test_a_failing_case_lists_its_mismatches_then_the_simulated_run(tmp_path: Path) -> None:
    code, out, _ = _cli(str(_failing(tmp_path)), "-k", "FAILS")
    assert code == 1
    assert "  FAILED  fails (line 7)\n" in out
    assert '          status: expected "completed", got "compensated"\n' in out
    assert '          compensated: expected [], got ["charge", "lines[0]/reserve"]\n' in out
    assert "✗ ship failed — CarrierDown: simulated CarrierDown" in out  # the timeline
    assert "passes" not in out and out.rstrip().endswith("1 case: 0 passed, 1 failed")


def test_a_case_that_cannot_run_is_an_error_of_that_case_alone(tmp_path: Path) -> None:
    code, out, _ = _cli(str(_failing(tmp_path, registered=False)), "-f", "json")
    report = json.loads(out)
    assert code == 1 and report["status"] == "failed"
    assert [(c["name"], c["outcome"]) for c in report["files"][0]["cases"]] == \
        [("passes", "error"), ("fails", "failed"), ("cannot run", "error")]
    assert "worker 'check' is not registered" in report["files"][0]["cases"][2]["error"]
    assert report["files"][0]["cases"][1]["run"]["status"] == "failed"
    assert report["files"][0]["cases"][1]["mismatches"] == [
        {"field": "status", "expected": "completed", "got": "failed", "note": None}]
    assert (report["cases"], report["passed"], report["failed"], report["error"]) == (3, 0, 1, 2)


def test_a_file_with_errors_is_not_run_but_the_others_are(tmp_path: Path) -> None:
    (tmp_path / "broken.test.yaml").write_text("flowdsl_test: 1\nflow: nowhere.yaml\ncases: {a: {expect: "
                                               "{status: completed}}}\n", encoding="utf-8")
    (tmp_path / "fine.test.yaml").write_text(f"flowdsl_test: 1\nflow: {SHOP}\ninput: {json.dumps(ORDER)}\n"
                                             "cases: {a: {expect: {status: completed}}}\n", encoding="utf-8")
    code, out, err = _cli(str(tmp_path), "-f", "json")
    report = json.loads(out)
    assert code == 2 and report["status"] == "error" and (report["cases"], report["passed"]) == (1, 1)
    assert [f["file"].rsplit("/", 1)[-1] for f in report["files"]] == ["broken.test.yaml", "fine.test.yaml"]
    assert {d["code"] for d in report["files"][0]["diagnostics"]} == {"FD101", "FD703"}
    assert "broken.test.yaml:2:7: error FD703" in err


def test_directories_are_searched_for_test_files_only(tmp_path: Path) -> None:
    for name in ("a.test.yaml", "sub/b.test.yml", "sub/flow.yaml", ".hidden/c.test.yaml", "venv/d.test.yaml",
                 "node_modules/e.test.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("", encoding="utf-8")
    (tmp_path / "venv" / "pyvenv.cfg").write_text("", encoding="utf-8")
    found = find_test_files([tmp_path, tmp_path / "a.test.yaml"])
    assert [Path(f).relative_to(tmp_path).as_posix() for f in found] == ["a.test.yaml", "sub/b.test.yml"]


def test_no_test_file_found_is_a_usage_error(tmp_path: Path) -> None:
    code, out, err = _cli(str(tmp_path))
    assert code == 2 and out == ""
    assert "no test files found in" in err and "*.test.yaml" in err


def test_a_real_attempt_made_its_effect_so_a_cancel_never_drops_its_answer() -> None:
    """A real call ran at its dispatch: when a sibling fails before its answer is due, the run waits for it and
    undoes it (a scripted ``ok`` with the same delay honours the cancel: it never completed)."""
    plan = _shop()
    note_fails = {"note": [Outcome.fail("RateLimited")], "charge": [Outcome.real(after_ms=400)]}
    sim = simulate(plan, ORDER, script=Script(steps=note_fails, fallback={"note": [Outcome.fail("NoTemplate")]}))
    assert sim.result.status == "compensated" and sim.elapsed_ms == 400
    assert sim.result.compensated == ["charge", "lines[1]/reserve", "lines[0]/reserve"]
    scripted = {**note_fails, "charge": [Outcome.ok({"charge_id": "c"}, after_ms=400)]}
    sim = simulate(plan, ORDER, script=Script(steps=scripted, fallback={"note": [Outcome.fail("NoTemplate")]}))
    assert sim.result.status == "compensated" and sim.elapsed_ms == 0
    assert sim.result.compensated == ["lines[1]/reserve", "lines[0]/reserve"]


# --- what if -----------------------------------------------------------------------------------------------------


def test_what_if_makes_each_step_then_each_fallback_and_undo_fail_for_good() -> None:
    code, out, _ = _cli("tests/flowtests/valid/shop.test.yaml", "--what-if", "-f", "json")
    assert code == 0
    (entry,) = json.loads(out)["files"]
    rows = {s["said"]: (s["status"], s["compensated"], s["intervention"], s["fallbacks"]) for s in entry["scenarios"]}
    reserves = ["lines[1]/reserve", "lines[0]/reserve"]
    assert rows == {
        "nothing fails": ("completed", [], [], ["note"]),
        "check fails": ("failed", [], [], []),
        "reserve fails": ("failed", [], [], []),
        "charge fails": ("compensated", reserves, [], []),
        # the note runs beside the charge: its fallback answers, and the run ends as if nothing failed
        "note fails": ("completed", [], [], ["note"]),
        "note and its fallback fail": ("compensated", ["charge", *reserves], [], ["note"]),
        "ship fails": ("compensated", ["charge", *reserves], [], ["note"]),
        "charge fails, and undoing reserve fails": ("needs_intervention", [], reserves, []),
        "note and its fallback fail, and undoing charge fails":
            ("needs_intervention", [], ["charge", *reserves], ["note"]),
    }
    assert [s["failing"] for s in entry["scenarios"]][-1] == [{"script": "steps", "step": "note"},
                                                            {"script": "fallback", "step": "note"},
                                                            {"script": "undo", "step": "charge"}]


def test_what_if_prints_a_table_and_refuses_a_case_filter() -> None:
    code, out, _ = _cli("examples/ecommerce_order", "--what-if")
    assert code == 0
    assert re.search(r"^process_payment fails +compensated +check_inventory +—", out, re.MULTILINE), out
    code, _, err = _cli("examples", "--what-if", "-k", "x")
    assert code == 2 and "--what-if runs no case" in err


def test_simulate_inside_an_event_loop_says_to_await_simulate_flow() -> None:
    import asyncio

    from flowdsl.runtime.simulate import simulate_flow

    plan = _shop()

    async def inside() -> str:
        with pytest.raises(RuntimeError, match=r"use `await flowdsl.simulate_flow"):
            simulate(plan, ORDER)
        return (await simulate_flow(plan, ORDER)).result.status

    assert asyncio.run(inside()) == "completed"


# --- what the review of the first version found ----------------------------------------------------------------


def _file(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_each_file_runs_its_own_flows_workers_even_when_their_modules_share_a_name(tmp_path: Path) -> None:
    """Two flows, each with a `workers.py` of its own registering `hello` (and one of another name): each file's
    cases call their own flow's workers, and the process's registry and modules are as they were afterwards."""
    from flowdsl.workers import registry

    for side in ("a", "b"):
        _file(tmp_path / side / "workers.py", "from flowdsl.workers import worker\n\n\n"
              f"@worker('hello')\ndef hello(data, ctx):\n    return {{'from': '{side}'}}\n\n\n"
              f"@worker('only_{side}')\ndef only(data, ctx):\n    return {{}}\n")
        _file(tmp_path / side / "flow.yaml", f"flowdsl: 1\nname: f{side}\nworkers: [workers]\n"
              f"steps:\n  - hello\n  - only_{side}\n")
        _file(tmp_path / side / "flow.test.yaml", "flowdsl_test: 1\nflow: flow.yaml\ncases:\n"
              f"  says {side}:\n    expect: {{status: completed, context: {{from: {side}}}}}\n")
    before, had = dict(registry._workers), sys.modules.get("workers")
    code, out, _ = _cli(str(tmp_path), "-f", "json")
    assert code == 0, out
    assert json.loads(out)["passed"] == 2
    assert registry._workers == before and sys.modules.get("workers") is had


def test_no_two_cases_share_a_run_id(tmp_path: Path) -> None:
    shop = f"flowdsl_test: 1\nflow: {SHOP}\ninput: {json.dumps(ORDER)}\ncases:\n"
    cases = "  declined card: {expect: {status: completed}}\n  declined-card: {expect: {status: completed}}\n" \
            f"  {'x' * 120}1: {{expect: {{status: completed}}}}\n  {'x' * 120}2: {{expect: {{status: completed}}}}\n"
    one, _ = load_tests(_file(tmp_path / "one.test.yaml", shop + cases))
    two, _ = load_tests(_file(tmp_path / "two.test.yaml", shop + cases))
    assert one is not None and two is not None
    ids = [c.run_id for c in [*one.cases, *two.cases]]
    assert len(set(ids)) == 8 and all(re.fullmatch(r"test-[A-Za-z0-9_.:-]{1,80}-[0-9a-f]{8}", i) for i in ids)
    assert ids[0].startswith("test-declined-card-")


def test_all_cases_run_on_one_event_loop(tmp_path: Path) -> None:
    """A real async worker that keeps loop-bound state (a queue and its consumer task) works in every case."""
    _file(tmp_path / "loop_workers.py", """\
import asyncio

from flowdsl.workers import worker

QUEUE = None


async def _consume(queue):
    while True:
        item, done = await queue.get()
        done.set_result({"item": item})


@worker("batched")
async def batched(data, ctx):
    global QUEUE
    if QUEUE is None:
        QUEUE = asyncio.Queue()
        asyncio.get_running_loop().create_task(_consume(QUEUE))
    done = asyncio.get_running_loop().create_future()
    await QUEUE.put((ctx.idempotency_key, done))
    return await done
""")
    _file(tmp_path / "loop.yaml", "flowdsl: 1\nname: loop\nworkers: [loop_workers]\nsteps:\n"
          "  - batched: {timeout: 2s}\n")
    test = _file(tmp_path / "loop.test.yaml", "flowdsl_test: 1\nflow: loop.yaml\ncases:\n"
                 "  first: {expect: {status: completed}}\n  second: {expect: {status: completed}}\n")
    code, out, _ = _cli(str(test))
    assert code == 0 and "2 cases: 2 passed" in out, out


def test_a_whole_number_seed_and_zero_durations_in_any_unit_are_read(tmp_path: Path) -> None:
    tests, diags = load_tests(_file(tmp_path / "z.test.yaml", f"""\
flowdsl_test: 1
flow: {SHOP}
input: {json.dumps(ORDER)}
cases:
  zeros:
    seed: 1.0
    cancel: 0m
    steps: {{charge: {{ok: {{charge_id: c}}, after: 0h0s}}}}
    expect: {{status: cancelled, elapsed: {{at_least: 0m, at_most: 0.0s}}}}
"""))
    assert diags == [] and tests is not None
    (case,) = tests.cases
    assert case.seed == 1 and type(case.seed) is int and case.cancel_at_ms == 0
    assert case.script.steps["charge"][0].after_ms == 0


def test_bounds_that_no_run_can_meet_are_refused(tmp_path: Path) -> None:
    _, diags = load_tests(_file(tmp_path / "b.test.yaml", f"flowdsl_test: 1\nflow: {SHOP}\ninput: "
                                f"{json.dumps(ORDER)}\ncases:\n  never: {{expect: {{elapsed: {{at_least: 2s, "
                                "at_most: 1s}}}\n"))
    assert [(d.code, d.message) for d in diags] == [
        ("FD201", "at_least (2s) is more than at_most (1s): no run can take that long")]


def test_a_run_stuck_compensating_is_expected_as_running(tmp_path: Path) -> None:
    test = _file(tmp_path / "s.test.yaml", f"flowdsl_test: 1\nflow: {SHOP}\ninput: {json.dumps(ORDER)}\ncases:\n"
                 "  an undo that never answers:\n    steps: {ship: {fail: CarrierDown}}\n"
                 "    undo: {charge: hang}\n    expect: {status: running}\n")
    code, out, _ = _cli(str(test))
    assert code == 0 and "passed  an undo that never answers (running)" in out, out


def test_a_cases_script_of_a_step_replaces_every_file_script_of_it(tmp_path: Path) -> None:
    test = _file(tmp_path / "p.test.yaml", f"flowdsl_test: 1\nflow: {SHOP}\ninput: {json.dumps(ORDER)}\n"
                 "steps:\n  'lines[0]/reserve': {fail: OutOfStock}\n  check: {fail: Never}\n"
                 "cases:\n  the case scripts every reserve ok:\n    steps: {reserve: ok, check: ok}\n"
                 "    expect: {status: completed}\n  the file's script stands:\n"
                 "    steps: {check: ok}\n    expect: {status: compensated, failed_step: 'lines[0]/reserve'}\n")
    code, out, _ = _cli(str(test))
    assert code == 0, out


def test_outcomes_made_in_python_are_checked() -> None:
    from datetime import datetime

    for bad, said in ((lambda: Outcome.ok(after_ms=-1), "after_ms is a whole number"),
                      (lambda: Outcome.ok(after_ms=1.5), "after_ms is a whole number"),  # type: ignore[arg-type]
                      (lambda: Outcome.ok({"t": datetime(2026, 1, 1)}), "result is not JSON"),
                      (lambda: Outcome.ok({"n": float("nan")}), "result is not JSON"),
                      (lambda: Outcome.ok([1, 2]), "result is a mapping"),  # type: ignore[arg-type]
                      (lambda: Outcome.fail("not a name"), "error type is an exception class name"),
                      (lambda: Outcome("maybe"), "ok, fail, hang or real")):  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=said):
            bad()
    with pytest.raises(ValueError, match="cancel_at_ms is a whole number"):
        simulate(_shop(), ORDER, cancel_at_ms=-1000)


def test_a_timer_armed_again_fires_at_its_new_time_only() -> None:
    from flowdsl.runtime.simulate import _Clock

    clock = _Clock(0)
    clock.arm("t", 10)
    clock.disarm("t")
    clock.arm("t", 20)
    clock.arm("u", 15)
    clock.disarm("u")
    fired = []
    while (event := clock.next()) is not None:
        fired.append((event["timer_id"], event["at"]))
    assert fired == [("t", 20)]


def test_test_files_are_told_apart_from_specs_in_what_they_are_told(tmp_path: Path) -> None:
    _, diags = load_tests(_file(tmp_path / "empty.test.yaml", "# nothing yet\n"))
    assert [d.message for d in diags] == [
        "the document is empty; expected a mapping with 'flowdsl_test', 'flow' and 'cases'"]
    _, diags = load_tests(SHOP)
    assert [(d.code, d.message) for d in diags] == [
        ("FD201", "this is a flow spec (it has 'flowdsl:'), not a test file: a test file has flowdsl_test, flow and "
                  "cases (docs/testing.md)")]


def test_a_sub_flows_step_is_named_by_its_plan_key(tmp_path: Path) -> None:
    _file(tmp_path / "gift.yaml", "flowdsl: 1\nname: gift\nsteps:\n  - wrap\n  - tag\n")
    _file(tmp_path / "main.yaml", "flowdsl: 1\nname: main\nsteps:\n  - flow: gift\n    path: gift.yaml\n")
    _, diags = load_tests(_file(tmp_path / "m.test.yaml", "flowdsl_test: 1\nflow: main.yaml\ncases:\n"
                                "  a: {steps: {tag: ok, gift/wrap: ok}, expect: {status: completed}}\n"))
    assert [d.message.split(";")[0] for d in diags] == [
        "no step 'tag' in the flow (a step of a sub-flow is named by its plan key: 'gift/tag')"]


def test_what_if_says_a_step_that_never_runs_and_needs_the_files_input(tmp_path: Path) -> None:
    _file(tmp_path / "w.yaml", "flowdsl: 1\nname: w\ninput: {type: object, required: [go]}\nsteps:\n  - first\n"
          "  - maybe: {when: '${ go }'}\n")
    test = _file(tmp_path / "w.test.yaml", "flowdsl_test: 1\nflow: w.yaml\ninput: {go: false}\n"
                 "steps: {first: ok, maybe: ok}\ncases: {a: {expect: {status: completed}}}\n")
    code, out, _ = _cli(str(test), "--what-if", "-f", "json")
    rows = {s["said"]: (s["ran"], s["status"]) for s in json.loads(out)["files"][0]["scenarios"]}
    assert code == 0 and rows == {"nothing fails": (True, "completed"), "first fails": (True, "failed"),
                                  "maybe fails": (False, "completed")}
    code, out, _ = _cli(str(test), "--what-if")
    assert re.search(r"^maybe fails +completed: it never runs in this run", out, re.MULTILINE), out
    test.write_text(test.read_text(encoding="utf-8").replace("input: {go: false}\n", "")
                    .replace("cases: {a: {", "cases: {a: {input: {go: true}, "), encoding="utf-8")
    code, out, err = _cli(str(test), "--what-if", "-f", "json")
    assert code == 2 and json.loads(out)["status"] == "error"
    assert "--what-if starts every run from the file's own input, which the flow refuses" in err


def test_json_is_one_object_whatever_stops_the_command(tmp_path: Path) -> None:
    for args in ([str(tmp_path)], ["examples", "--what-if", "-k", "x"], ["examples", "-k", "no case is named so"]):
        code, out, err = _cli(*args, "-f", "json")
        said = json.loads(out)
        assert code == 2 and said["status"] == "error" and said["error"]["message"] in err, (args, out, err)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_ctrl_c_stops_the_command_and_says_so(tmp_path: Path, fmt: str) -> None:
    """A real worker still running (a step with no timeout): Ctrl-C ends the command, exit 130, and with -f json
    stdout still carries its one JSON object."""
    import os
    import signal
    import subprocess

    from tests.spawned import StderrReader, wait_for_file

    mark = tmp_path / "called"
    _file(tmp_path / "slow_workers.py", "import pathlib, time\n\nfrom flowdsl.workers import worker\n\n\n"
          f"@worker('slow')\ndef slow(data, ctx):\n    pathlib.Path({str(mark)!r}).touch()\n    time.sleep(60)\n")
    _file(tmp_path / "slow.yaml", "flowdsl: 1\nname: slow\nworkers: [slow_workers]\nsteps:\n  - slow\n")
    test = _file(tmp_path / "slow.test.yaml", "flowdsl_test: 1\nflow: slow.yaml\ncases:\n"
                 "  waits: {expect: {status: completed}}\n")
    proc = subprocess.Popen([sys.executable, "-m", "flowdsl", "test", str(test), "-f", fmt], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader = StderrReader(proc)
    wait_for_file(mark, proc)
    os.kill(proc.pid, signal.SIGINT)
    out, err = reader.finish()
    assert proc.returncode == 130, (out, err)
    if fmt == "json":
        assert json.loads(out) == {"status": "error", "error": {"type": "KeyboardInterrupt",
                                                                "message": "interrupted"}}
    else:
        assert "interrupted" in err and "Traceback" not in err


def test_a_path_that_is_not_there_is_said_so(tmp_path: Path) -> None:
    code, out, err = _cli(str(tmp_path / "nodir"), "examples")
    assert code == 2 and out == "" and f"no such file or directory: {tmp_path / 'nodir'}" in err


def test_a_step_passed_over_that_completed_late_says_so_in_the_runs_json() -> None:
    plan = compile_text("flowdsl: 1\nname: late\nsteps:\n  - pay: {on_failure: continue, timeout: 1s, "
                        "compensate: refund}\n  - ship\n")
    late = Outcome.ok({"charge": "c1"}, after_ms=1500, ignores_cancel=True)
    sim = simulate(plan, {}, registry=WorkerRegistry(), script=Script(
        steps={"pay": [late], "ship": [Outcome.ok(after_ms=3000)]}))
    row = sim.result.to_json()["steps"]["pay"]
    assert sim.result.status == "completed" and row["status"] == "failed"
    assert row["continued"] is True and row["completed_late"] is True


def test_a_simulation_says_itself_in_one_short_line() -> None:
    """asyncio formats the result of a finished task (on every asyncio.run of Python 3.11): a simulation of a wide
    for_each printed whole, its calls' inputs with it, took a minute and gigabytes of memory."""
    plan = compile_text('flowdsl: 1\nname: wide\nsteps:\n  - for_each: lines\n    items: "${ lines }"\n'
                        "    steps: [charge]\n")
    sim = simulate(plan, {"lines": list(range(2000))}, script=Script(steps={"charge": [Outcome.ok({})]}))
    assert len(sim.calls) == 2000 and repr(sim) == "Simulation(status='completed', calls=2000, elapsed_ms=0)"


# --- waits and signals ------------------------------------------------------------------------------------------

WAITS = CASES / "flows" / "waits.yaml"
WAITS_SCRIPT = {"reserve": [Outcome.ok()], "charge": [Outcome.ok({"charge_id": "c1"})], "ship": [Outcome.ok()]}


def _waits() -> dict[str, Any]:
    result = compile_spec(str(WAITS), check_workers=False)
    assert result.plan is not None, [d.format() for d in result.diagnostics]
    return result.plan


def test_a_signal_reaches_its_wait_at_its_virtual_time_and_a_second_one_is_rejected() -> None:
    from flowdsl import Signal

    sim = simulate(_waits(), {}, registry=WorkerRegistry(), script=Script(steps=WAITS_SCRIPT, signals=[
        Signal("paid", {"ref": "P-1"}, at_ms=60_000), Signal("paid", {"ref": "P-2"}, at_ms=120_000),
        Signal("rated", at_ms=180_000), Signal("nobody_waits", at_ms=200_000)]))
    assert sim.result.status == "completed" and sim.result.context["payment"] == {"ref": "P-1"}
    start = sim.result.events[0]["at"]
    said = [(e["type"], e["signal"], e["at"] - start, e.get("step"), e.get("reason")) for e in sim.result.events
            if e["type"].startswith("signal_")]
    assert said == [
        ("signal_received", "paid", 60_000, "paid", None),
        ("signal_rejected", "paid", 120_000, None, "wait 'paid' has already received signal 'paid'"),
        ("signal_received", "rated", 180_000, "rating", None),
        ("signal_rejected", "nobody_waits", 200_000, None,
         "no wait of flow 'waits' takes signal 'nobody_waits' (its signals: 'paid', 'rated')"),
    ]
    # the timer wait took its 2 h on the virtual clock, after the rating
    assert sim.elapsed_ms == 180_000 + 7_200_000 and sim.waits == {}
    assert sim.calls[-1].step == "ship" and sim.calls[-1].at_ms == sim.elapsed_ms
    assert sim.calls[-1].input == {"ref": "P-1"}


def test_a_signal_sent_before_its_wait_starts_is_kept_until_it_does() -> None:
    from flowdsl import Signal

    script = Script(steps={**WAITS_SCRIPT, "charge": [Outcome.ok(after_ms=5_000)]},
                    signals=[Signal("paid", {"ref": "early"}), Signal("rated")])
    sim = simulate(_waits(), {}, registry=WorkerRegistry(), script=script)
    kinds = [(e["type"], e.get("buffered")) for e in sim.result.events if e["type"].startswith("signal_")]
    assert kinds == [("signal_buffered", None), ("signal_buffered", None), ("signal_received", True),
                     ("signal_received", True)]
    assert sim.result.status == "completed" and sim.elapsed_ms == 5_000 + 7_200_000


def test_a_run_whose_wait_gets_no_signal_and_has_no_timeout_waits_for_ever() -> None:
    plan = compile_text("flowdsl: 1\nname: forever\nsteps:\n  - wait: approval\n    signal: approved\n  - go\n")
    sim = simulate(plan, {}, registry=WorkerRegistry(), run_id="f")
    assert sim.result.status == "running" and not sim.ended and sim.elapsed_ms is None
    assert sim.waiting == [] and sim.waits == {"approval": "approved"}
    assert list(compare({"status": "running", "steps": {"approval": "running", "go": "pending"}}, sim)) == []


def test_a_wait_that_waits_is_expected_waiting_as_every_report_says_it_or_running() -> None:
    plan = compile_text("flowdsl: 1\nname: forever\nsteps:\n  - wait: approval\n    signal: approved\n  - go\n")
    sim = simulate(plan, {}, registry=WorkerRegistry(), run_id="f")
    assert sim.result.to_json()["steps"]["approval"]["status"] == "waiting"
    for said in ("waiting", "running", {"status": "waiting", "attempts": 0}):
        assert list(compare({"status": "running", "steps": {"approval": said}}, sim)) == [], said
    # a wait that waits is said "waiting" where it is not what the case expected
    assert [m.to_json() for m in compare({"steps": {"approval": "succeeded"}}, sim)] == [
        {"field": "steps.approval.status", "expected": "succeeded", "got": "waiting", "note": None}]
    # a step that is not a wait never waits
    hung = simulate(compile_text("flowdsl: 1\nname: hung\nsteps:\n  - go\n"), {}, registry=WorkerRegistry(),
                    script=Script(steps={"go": [Outcome.hang()]}))
    assert [m.to_json() for m in compare({"steps": {"go": "waiting"}}, hung)] == [
        {"field": "steps.go.status", "expected": "waiting", "got": "running", "note": None}]


def test_a_case_may_expect_a_wait_waiting(tmp_path: Path) -> None:
    test = _file(tmp_path / "a.test.yaml", f"flowdsl_test: 1\nflow: {CASES / 'flows' / 'approval.yaml'}\n"
                 "steps: {prepare: ok, go: ok}\ncases:\n"
                 "  forgotten:\n    expect: {status: running, steps: {approval: waiting, go: pending}}\n"
                 "  told:\n    signals: [approved]\n    expect: {steps: {approval: waiting}}\n")
    code, out, _ = _cli(str(test))
    assert code == 1 and "2 cases: 1 passed, 1 failed" in out, out
    assert 'steps.approval.status: expected "waiting", got "succeeded"' in out


def test_a_signal_due_after_the_run_has_ended_never_reaches_it() -> None:
    from flowdsl import Signal

    plan = compile_text("flowdsl: 1\nname: late\nsteps:\n  - a: {compensate: undo_a}\n  - wait: paid\n"
                        "    timeout: 3s\n  - b\n")
    script = Script(steps={"a": [Outcome.ok()], "b": [Outcome.ok()]}, undo={"a": [Outcome.ok()]},
                    signals=[Signal("paid", {}, at_ms=10**15), Signal("paid", {}, at_ms=5_000)])
    sim = simulate(plan, {}, registry=WorkerRegistry(), script=script)
    assert sim.result.status == "compensated" and sim.elapsed_ms == 3_000
    assert sim.result.events[-1]["type"] == "run_finished"
    assert not any(e["type"].startswith("signal_") for e in sim.result.events)
    # one due before the end is still answered (here rejected: its wait has timed out, the run is compensating)
    early = simulate(plan, {}, registry=WorkerRegistry(), script=Script(
        steps=script.steps, undo={"a": [Outcome.ok(after_ms=2_000)]}, signals=[Signal("paid", {}, at_ms=4_000)]))
    assert [e["type"] for e in early.result.events if e["type"].startswith("signal_")] == ["signal_rejected"]
    assert early.result.events[-1]["type"] == "run_finished"


def test_signals_made_in_python_are_checked() -> None:
    from datetime import datetime

    from flowdsl import Signal

    for bad, said in ((lambda: Signal(""), "a signal's name is a non-empty string"),
                      (lambda: Signal("paid", at_ms=-1), "at_ms is a whole number"),
                      (lambda: Signal("paid", [1]), "a signal's data is a mapping"),  # type: ignore[arg-type]
                      (lambda: Signal("paid", {"at": datetime(2026, 1, 1)}), "its data is not JSON")):
        with pytest.raises(ValueError, match=said):
            bad()
    assert Signal("paid").data == {} and Signal("paid", {"n": 1}, at_ms=5).data == {"n": 1}
    with pytest.raises(ValueError, match="a script's signals are Signal objects, not str"):
        Script(signals=["paid"])  # type: ignore[list-item]


def test_a_case_that_sends_signals_replaces_the_files_and_names_no_wait_of_another_flow(tmp_path: Path) -> None:
    tests, diags = load_tests(CASES / "valid" / "waits.test.yaml")
    assert diags == [] and tests is not None
    by_name = {c.name: c for c in tests.cases}
    assert [(s.name, s.data, s.at_ms) for s in tests.defaults.signals] == [("paid", {"ref": "P-0"}, 0),
                                                                           ("rated", {}, 0)]
    assert by_name["signals sent before their waits start are kept until they do"].script.signals == \
        tests.defaults.signals
    assert by_name["no payment within 30 minutes undoes the charge then the reservation"].script.signals == ()
    assert [(s.name, s.at_ms) for s in by_name["a second payment signal changes nothing"].script.signals] == [
        ("paid", 60_000), ("paid", 120_000), ("rated", 180_000)]
    _, diags = load_tests(_file(tmp_path / "s.test.yaml", f"flowdsl_test: 1\nflow: {SHOP}\ninput: {json.dumps(ORDER)}\n"
                                "cases:\n  a: {signals: [paid], expect: {status: completed}}\n"))
    assert [(d.code, d.message) for d in diags] == [
        ("FD701", "no wait of the flow takes signal 'paid': the flow waits for no signal")]


def test_a_failing_case_says_which_wait_still_waits_and_shows_the_signals_in_its_timeline(tmp_path: Path) -> None:
    test = _file(tmp_path / "a.test.yaml", f"flowdsl_test: 1\nflow: {CASES / 'flows' / 'approval.yaml'}\n"
                 "steps: {prepare: ok, go: {ok: {}, after: 5m}}\ncases:\n"
                 "  approved twice:\n    signals: [{signal: approved, at: 1m}, {signal: approved, at: 2m},\n"
                 "              {signal: approved, at: 1h}]\n"
                 "    expect: {status: compensated}\n"
                 "  forgotten:\n    expect: {status: completed}\n")
    code, out, _ = _cli(str(test))
    assert code == 1 and "2 cases: 0 passed, 2 failed" in out
    first, second = out.split("FAILED  forgotten")
    assert 'status: expected "compensated", got "completed"' in first
    # the timeline holds the signal taken, then the one refused
    timeline = first.split("the simulated run")[1]
    assert timeline.index("received") < timeline.index("rejected"), timeline
    # the one due after the run's end (at 6m) never reached it
    assert timeline.count("rejected") == 1 and "has ended" not in timeline, timeline
    assert "never ended" not in first
    assert 'status: expected "completed", got "running"' in second
    assert "the run never ended: wait approval waits for signal 'approved', which the case does not send" in second


def test_what_if_says_when_each_wait_with_a_timeout_gets_no_signal() -> None:
    code, out, _ = _cli("tests/flowtests/valid/waits.test.yaml", "--what-if", "-f", "json")
    assert code == 0, out
    (entry,) = json.loads(out)["files"]
    rows = {s["said"]: (s["ran"], s["status"], s["compensated"], s["intervention"], s["passed_over"],
                        s["elapsed_ms"]) for s in entry["scenarios"]}
    hours = 3_600_000
    assert rows == {
        "nothing fails": (True, "completed", [], [], [], 2 * hours),
        "reserve fails": (True, "failed", [], [], [], 0),
        "charge fails": (True, "compensated", ["reserve"], [], [], 0),
        "wait paid times out": (True, "compensated", ["charge", "reserve"], [], [], hours // 2),
        # without a timeout, or a timer, a wait never fails: no row for cooling_off
        "wait rating times out": (True, "completed", [], [], ["rating"], 3 * hours),
        "ship fails": (True, "compensated", ["charge", "reserve"], [], [], 2 * hours),
        # (an undo is retried 5 times by default: 100 + 200 + 400 + 800 ms)
        "charge fails, and undoing reserve fails": (True, "needs_intervention", [], ["reserve"], [], 1500),
        "wait paid times out, and undoing charge fails":
            (True, "needs_intervention", [], ["charge", "reserve"], [], hours // 2 + 1500),
    }
    failing = {s["said"]: s["failing"] for s in entry["scenarios"]}
    assert failing["wait paid times out, and undoing charge fails"] == [{"script": "wait", "step": "paid"},
                                                                       {"script": "undo", "step": "charge"}]


def test_what_if_sends_the_signals_the_file_does_not_at_the_start_with_no_data(tmp_path: Path) -> None:
    test = _file(tmp_path / "a.test.yaml", f"flowdsl_test: 1\nflow: {CASES / 'flows' / 'approval.yaml'}\n"
                 "steps: {prepare: ok, go: ok}\ncases: {a: {expect: {status: running}}}\n")
    code, out, _ = _cli(str(test), "--what-if", "-f", "json")
    assert code == 0, out
    rows = {s["said"]: (s["status"], s["elapsed_ms"]) for s in json.loads(out)["files"][0]["scenarios"]}
    # the approval never fails (no timeout): no row; its signal, {}, is sent at the start
    assert rows == {"nothing fails": ("completed", 0), "prepare fails": ("failed", 0), "go fails": ("failed", 0)}


def test_what_if_says_a_wait_the_run_skips_never_runs(tmp_path: Path) -> None:
    _file(tmp_path / "w.yaml", "flowdsl: 1\nname: w\nsteps:\n  - first\n  - wait: paid\n    timeout: 1m\n"
          "    when: '${ $input.pay }'\n")
    test = _file(tmp_path / "w.test.yaml", "flowdsl_test: 1\nflow: w.yaml\ninput: {pay: false}\nsteps: {first: ok}\n"
                 "cases: {a: {expect: {status: completed, steps: {paid: skipped}}}}\n")
    code, out, _ = _cli(str(test), "--what-if", "-f", "json")
    rows = {s["said"]: (s["ran"], s["status"]) for s in json.loads(out)["files"][0]["scenarios"]}
    assert code == 0 and rows == {"nothing fails": (True, "completed"), "first fails": (True, "failed"),
                                  "wait paid times out": (False, "completed")}
    code, out, _ = _cli(str(test), "--what-if")
    assert "what if a step fails for good or a wait times out" in out
    assert re.search(r"^wait paid times out +completed: it never runs in this run", out, re.MULTILINE), out


def test_a_script_of_a_wait_says_that_its_signal_is_sent_with_signals(tmp_path: Path) -> None:
    _, diags = load_tests(_file(tmp_path / "w.test.yaml", f"flowdsl_test: 1\nflow: {WAITS}\n"
                                "cases:\n  a: {steps: {paid: ok}, expect: {status: completed}}\n"))
    assert [(d.code, d.message) for d in diags] == [
        ("FD702", "'paid' is a wait, which makes no attempts: what it waits for is sent with the case's 'signals' "
                  "(a signal wait), or passes by itself (a timer)")]
