"""Flow tests of keyed waits (docs/testing.md): signals sent with a ``key``, the FD701/FD702 checks of keys, a
wait's key expected, and ``--what-if`` over a flow with keyed waits.

The flow is ``tests/flowtests/flows/parcels.yaml`` (a for_each of parcels, each waiting for its ``delivered``
signal keyed by its tracking number, then an unkeyed wait); its cases are
``tests/flowtests/valid/parcels.test.yaml``, its invalid files ``tests/flowtests/invalid/FD70?_*key*`` (their
goldens are checked by tests/test_flowtests.py).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flowdsl.api import compile_spec
from flowdsl.runtime.simulate import Outcome, Script, Signal, simulate
from flowdsl.testing import compare, load_tests, what_if
from flowdsl.workers import WorkerRegistry

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "tests" / "flowtests"
PARCELS = CASES / "flows" / "parcels.yaml"
TESTS = CASES / "valid" / "parcels.test.yaml"
ORDER = {"order": {"parcels": [{"tracking": "1Z1"}, {"tracking": "1Z2"}, {"tracking": 42}]}}
SCRIPT = {"ship": [Outcome.ok(after_ms=60_000)], "confirm": [Outcome.ok()], "close": [Outcome.ok()]}
UNDO = {"ship": [Outcome.ok()]}
HOUR = 3_600_000


@pytest.fixture(autouse=True)
def _from_the_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("FLOWDSL_LM", raising=False)


def _cli(*args: str) -> tuple[int, str]:
    from flowdsl.cli import app

    result = CliRunner().invoke(app, ["test", *args])
    return result.exit_code, result.stdout


def _plan() -> dict[str, Any]:
    result = compile_spec(str(PARCELS), check_workers=False)
    assert result.plan is not None, [d.format() for d in result.diagnostics]
    return result.plan


def _file(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _said(sim: Any) -> list[tuple[Any, ...]]:
    """The signal answers of a simulated run: (type, instance, key, virtual ms, reason)."""
    start = sim.result.events[0]["at"]
    return [(e["type"], e.get("step"), e.get("key"), e["at"] - start, e.get("reason")) for e in sim.result.events
            if e["type"].startswith("signal_")]


# --- the committed cases ----------------------------------------------------------------------------------------


def test_every_case_of_the_keyed_flow_passes() -> None:
    code, out = _cli(str(TESTS.relative_to(ROOT)), "-f", "json")
    report = json.loads(out)
    failed = [(c["name"], c["mismatches"], c["error"]) for f in report["files"] for c in f["cases"]
              if c["outcome"] != "passed"]
    assert failed == [] and code == 0
    assert report["cases"] == report["passed"] == 5


# --- the simulator ----------------------------------------------------------------------------------------------


def test_each_parcel_takes_the_signal_of_its_key_whatever_the_order_they_come_in() -> None:
    sim = simulate(_plan(), ORDER, registry=WorkerRegistry(), script=Script(steps=SCRIPT, signals=[
        Signal("delivered", {"by": "carol"}, at_ms=HOUR, key=42), Signal("delivered", {"by": "bob"}, 2 * HOUR, "1Z2"),
        Signal("delivered", {"by": "ann"}, 3 * HOUR, "1Z1"), Signal("invoiced", at_ms=4 * HOUR)]))
    assert sim.result.status == "completed" and sim.elapsed_ms == 4 * HOUR
    assert _said(sim) == [("signal_received", "parcels[2]/delivered", "42", HOUR, None),
                          ("signal_received", "parcels[1]/delivered", "1Z2", 2 * HOUR, None),
                          ("signal_received", "parcels[0]/delivered", "1Z1", 3 * HOUR, None),
                          ("signal_received", "invoiced", None, 4 * HOUR, None)]
    assert [c.input for c in sim.calls if c.step.endswith("/confirm")] == [
        {"tracking": 42, "signed_by": "carol"}, {"tracking": "1Z2", "signed_by": "bob"},
        {"tracking": "1Z1", "signed_by": "ann"}]
    assert {k: r.get("key") for k, r in sim.result.steps.items() if k.endswith("/delivered")} == {
        "parcels[0]/delivered": "1Z1", "parcels[1]/delivered": "1Z2", "parcels[2]/delivered": "42"}


def test_a_keyed_signal_without_its_key_and_an_unkeyed_one_with_a_key_are_rejected() -> None:
    sim = simulate(_plan(), ORDER, registry=WorkerRegistry(), script=Script(steps=SCRIPT, undo=UNDO, signals=[
        Signal("delivered"), Signal("invoiced", key="INV-1"), Signal("delivered", key="9Z9")]))
    assert _said(sim) == [
        ("signal_rejected", None, None, 0, "wait 'delivered' tells its instances apart by key: signal 'delivered' "
                                           "needs a key"),
        ("signal_rejected", None, "INV-1", 0, "wait 'invoiced' takes signal 'invoiced' without a key"),
        ("signal_buffered", None, "9Z9", 0, None)]
    # (no instance took key 9Z9: it is kept, and every parcel's deadline passes)
    assert sim.result.status == "compensated" and sim.result.failed_step == "parcels[0]/delivered"


def test_signal_keys_made_in_python_are_checked() -> None:
    assert Signal("delivered", key=42).key == "42" and Signal("delivered", key="1Z1").key == "1Z1"
    assert Signal("delivered", key=7.0).key == "7"  # type: ignore[arg-type]  # (as a wait's key: 7.0 is 7)
    assert Signal("delivered").key is None
    for bad in ("", True, 1.5, ["1Z1"], "x" * 201):
        with pytest.raises(ValueError, match=r"its key (is a non-empty string|must be a non-empty string|must have at "
                                             r"most 200 characters)"):
            Signal("delivered", key=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keyed_at_start is a collection of signal names, not one string"):
        Script(keyed_at_start="delivered")


def test_keyed_waits_named_to_be_answered_as_they_start_get_their_signal_with_their_key_then() -> None:
    script = Script(steps=SCRIPT, signals=[Signal("delivered", {"by": "bob"}, 2 * HOUR, "1Z2"), Signal("invoiced")],
                    keyed_at_start={"delivered"})
    sim = simulate(_plan(), ORDER, registry=WorkerRegistry(), script=script)
    assert sim.result.status == "completed" and sim.elapsed_ms == 2 * HOUR
    # each wait started once the shipping took its minute: the two keys the script does not send came then, with
    # {}; the script's own signal of key 1Z2 was left to come at its time
    assert [s for s in _said(sim) if s[2] is not None] == [
        ("signal_received", "parcels[0]/delivered", "1Z1", 60_000, None),
        ("signal_received", "parcels[2]/delivered", "42", 60_000, None),
        ("signal_received", "parcels[1]/delivered", "1Z2", 2 * HOUR, None)]
    assert sim.result.context["parcels"] == [{"delivery": {}}, {"delivery": {"by": "bob"}}, {"delivery": {}}]
    # named nowhere, a keyed wait gets nothing: its deadline passes
    none = simulate(_plan(), ORDER, registry=WorkerRegistry(), script=Script(steps=SCRIPT, undo=UNDO,
                                                                       signals=[Signal("invoiced")]))
    assert none.result.status == "compensated" and (none.result.error or {}).get("type") == "WaitTimeout"
    assert none.elapsed_ms == 60_000 + 336 * HOUR


# --- test files: keys sent and expected --------------------------------------------------------------------------


def test_a_files_signals_carry_their_keys_an_integer_as_its_decimal_text() -> None:
    tests, diags = load_tests(TESTS)
    assert diags == [] and tests is not None
    assert [(s.name, s.key, s.at_ms, s.data) for s in tests.defaults.signals] == [
        ("delivered", "1Z2", 3 * HOUR, {"by": "bob"}), ("invoiced", None, 0, {})]
    first = tests.cases[0]
    assert [(s.name, s.key) for s in first.script.signals] == [("delivered", "42"), ("delivered", "1Z2"),
                                                              ("delivered", "1Z1"), ("invoiced", None)]


def test_fd701_for_a_key_no_wait_takes_and_a_key_missing() -> None:
    _, diags = load_tests(CASES / "invalid" / "FD701_signal_key.test.yaml")
    assert [(d.code, d.path, d.message) for d in diags] == [
        ("FD701", "/signals/0", "no wait of the flow takes signal 'delivered' without a key: wait 'delivered' tells "
                                "its instances apart by key ($parcel.tracking); give the signal its 'key'"),
        ("FD701", "/cases/sends a key where none is taken and none where one is needed/signals/0/signal",
         "no wait of the flow takes signal 'delivered' without a key: wait 'delivered' tells its instances apart "
         "by key ($parcel.tracking); give the signal its 'key'"),
        ("FD701", "/cases/sends a key where none is taken and none where one is needed/signals/1/key",
         "no wait of the flow takes signal 'invoiced' with a key: wait 'invoiced' takes it without one (only a "
         "wait with 'key:' tells its instances apart by key)")]


def test_fd702_for_a_key_expected_of_a_wait_keyed_by_nothing() -> None:
    _, diags = load_tests(CASES / "invalid" / "FD702_key_does_not_fit.test.yaml")
    assert [(d.code, d.message) for d in diags] == [
        ("FD702", "'invoiced' takes its signal without a key: only a wait with 'key:' has a key to expect"),
        ("FD702", "'ship' is a step: only a wait with 'key:' has a key to expect")]


@pytest.mark.parametrize("key", ['""', "true", "1.5", "[1Z1]", "{a: 1}"])
def test_a_key_is_a_non_empty_string_or_an_integer(tmp_path: Path, key: str) -> None:
    test = _file(tmp_path / "k.test.yaml", f"flowdsl_test: 1\nflow: {PARCELS}\ncases:\n  a:\n"
                 f"    signals: [{{signal: delivered, key: {key}}}]\n    expect: {{status: completed}}\n")
    _, diags = load_tests(test)
    assert [(d.code, d.path) for d in diags] == [("FD201", "/cases/a/signals/0/key")], [d.format() for d in diags]


def test_a_whole_number_written_as_a_float_is_its_key_and_a_key_too_long_to_send_is_fd702(tmp_path: Path) -> None:
    head = f"flowdsl_test: 1\nflow: {PARCELS}\ncases:\n  a:\n    signals: [{{signal: delivered, key: "
    cases, diags = load_tests(_file(tmp_path / "k.test.yaml", head + "42.0}]\n    expect: {status: completed}\n"))
    assert diags == [] and cases is not None and [s.key for s in cases.cases[0].script.signals] == ["42"]
    _, diags = load_tests(_file(tmp_path / "l.test.yaml", head + "x" * 201 + "}]\n    expect: {status: completed}\n"))
    assert [(d.code, d.path) for d in diags] == [("FD702", "/cases/a/signals/0/key")], [d.format() for d in diags]
    assert "must have at most 200 characters" in diags[0].message


def test_a_wait_expected_with_another_key_is_a_mismatch() -> None:
    sim = simulate(_plan(), ORDER, registry=WorkerRegistry(), script=Script(steps=SCRIPT, signals=[
        Signal("delivered", key=k) for k in ("1Z1", "1Z2", "42")] + [Signal("invoiced")]))
    expect = {"steps": {"parcels[2]/delivered": {"key": 42}, "parcels[0]/delivered": {"key": "1Z2"},
                        "parcels[1]/confirm": {"key": "1Z2"}}}
    assert [m.to_json() for m in compare(expect, sim)] == [
        {"field": "steps.parcels[0]/delivered.key", "expected": "1Z2", "got": "1Z1", "note": None},
        {"field": "steps.parcels[1]/confirm.key", "expected": "1Z2", "got": None, "note": None}]


def test_a_failing_case_says_the_expected_key(tmp_path: Path) -> None:
    test = _file(tmp_path / "k.test.yaml", f"flowdsl_test: 1\nflow: {PARCELS}\n"
                 "input: {order: {parcels: [{tracking: 1Z1}]}}\nsteps: {ship: ok, confirm: ok, close: ok}\n"
                 "cases:\n  a:\n    signals: [{signal: delivered, key: 1Z1}, invoiced]\n"
                 "    expect: {steps: {'parcels[0]/delivered': {key: 1Z9}}}\n")
    code, out = _cli(str(test))
    assert code == 1 and 'steps.parcels[0]/delivered.key: expected "1Z9", got "1Z1"' in out, out


# --- what if ----------------------------------------------------------------------------------------------------


def test_what_if_answers_each_keyed_wait_as_it_starts_but_the_one_made_to_time_out() -> None:
    code, out = _cli(str(TESTS.relative_to(ROOT)), "--what-if", "-f", "json")
    assert code == 0, out
    (entry,) = json.loads(out)["files"]
    rows = {s["said"]: (s["ran"], s["status"], s["failed_step"], s["compensated"], s["intervention"],
                        s["elapsed_ms"]) for s in entry["scenarios"]}
    assert rows == {
        # the file sends parcel 1Z2's delivery at 3h; the other two parcels' came as their waits started
        "nothing fails": (True, "completed", None, [], [], 3 * HOUR),
        "ship fails": (True, "failed", "ship", [], [], 0),
        # no parcel gets its delivery: the first wait's deadline fails the run
        "wait delivered times out": (True, "compensated", "parcels[0]/delivered", ["ship"], [], 60_000 + 336 * HOUR),
        "confirm fails": (True, "compensated", "parcels[0]/confirm", ["ship"], [], 60_000),
        "wait invoiced times out": (True, "compensated", "invoiced", ["ship"], [], 4 * HOUR),
        "close fails": (True, "compensated", "close", ["ship"], [], 3 * HOUR),
        # (an undo is retried 5 times by default: 100 + 200 + 400 + 800 ms)
        "wait delivered times out, and undoing ship fails":
            (True, "needs_intervention", "parcels[0]/delivered", [], ["ship"], 60_000 + 336 * HOUR + 1500),
    }


def test_what_if_sends_no_keyed_signal_without_its_key() -> None:
    tests, diags = load_tests(TESTS)
    assert tests is not None and not diags
    found = asyncio.run(what_if(tests))
    clean = found[0].simulation
    assert found[0].said == "nothing fails" and clean is not None
    assert _said(clean) == [("signal_buffered", None, None, 0, None),
                            ("signal_received", "parcels[0]/delivered", "1Z1", 60_000, None),
                            ("signal_received", "parcels[2]/delivered", "42", 60_000, None),
                            ("signal_received", "parcels[1]/delivered", "1Z2", 3 * HOUR, None),
                            ("signal_received", "invoiced", None, 3 * HOUR, None)]
    timed_out = next(w for w in found if w.said == "wait delivered times out").simulation
    assert timed_out is not None and not [s for s in _said(timed_out) if s[1] and s[1].endswith("/delivered")]
