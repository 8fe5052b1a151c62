"""Kernel: the contract with runtimes — fencing of stale results, keys, the event schema, replay,
the summary, JSON state, input validation and per-event cost."""

from __future__ import annotations

import copy
import json
import pickle

import pytest

from flowdsl.kernel import STATE_VERSION, NewerVersion, apply, replay, start_event, start_run, summary
from tests.kernel.plans import plan_of
from tests.kernel.sim import Sim, fail, hang, ok

BASE_FIELDS = {"type", "at", "seq", "run_id", "step", "node", "kind", "attempt", "task_id", "error"}

BUSY = [
    {"reserve": {"compensate": "release", "retry": {"attempts": 3, "initial": "50ms", "jitter": "full"}}},
    {"parallel": "p", "branches": [
        {"for_each": "lines", "items": "${ lines }", "concurrency": 2, "steps": [
            {"charge": {"compensate": {"worker": "refund", "retry": {"attempts": 3, "initial": "20ms",
                                                                     "jitter": "equal"}},
                        "timeout": "40ms", "retry": {"attempts": 2, "initial": "5ms"}}}]},
        {"greet": {"llm": {"signature": "name -> greeting"}, "fallback": "template"}},
    ]},
    {"ship": {"when": "${ $count(lines) > 0 }"}},
]


def busy_script(ship_fails: bool) -> dict:
    """When ship fails, lines[1]/charge's attempt 1 (timed out, not cancellable) succeeds after the step's retry
    succeeded and its refund began: under kernel rules 7 the charge completed again after its undo, and the run ends
    needs_intervention (docs/kernel.md, "Late completions")."""
    return {
        "reserve": [fail("Busy"), ok({"reservation": "R1"})],
        "lines[1]/charge": [ok(after=90, cancellable=False), ok({"charged": 2})],
        "charge/compensate": [fail("Down"), ok()],
        "greet": fail("LLMNotConfigured"),
        "greet/fallback": ok({"greeting": "hi"}),
        "ship": fail("NoCarrier") if ship_fails else ok({"tracking": "T"}),
    }


def test_a_result_for_a_stale_attempt_is_rejected_and_changes_nothing_else():
    plan = plan_of([{"s": {"retry": {"attempts": 2, "initial": "10ms"}}}, "t"])
    d = start_run(plan, "r1", {}, at=0)
    d = apply(plan, d.state, {"type": "task_failed", "task_id": "r1/s#1", "at": 5, "error": {"type": "X"}})
    before = json.loads(json.dumps(d.state))
    late = apply(plan, d.state, {"type": "task_succeeded", "task_id": "r1/s#1", "at": 6, "result": {"a": 1}})
    assert late.commands == []
    assert [(e["type"], e["task_id"], e["reason"]) for e in late.events] == [
        ("result_rejected", "r1/s#1", "stale or unknown task")]
    after = json.loads(json.dumps(late.state))
    assert after.pop("seq") == before.pop("seq") + 1
    assert after == before


def test_results_after_the_end_and_for_unknown_tasks_are_rejected():
    sim = Sim(plan_of(["a"])).run()
    d = apply(sim.plan, sim.state, {"type": "task_succeeded", "task_id": "r1/a#1", "at": 9000, "result": {}})
    assert [(e["type"], e["reason"]) for e in d.events] == [("result_rejected", "run finished")]
    assert d.commands == [] and d.state["status"] == "completed"
    d = apply(sim.plan, sim.state, {"type": "task_failed", "task_id": "nope", "at": 9001, "error": None})
    assert d.events[0]["type"] == "result_rejected"
    d = apply(sim.plan, sim.state, {"type": "timer_fired", "timer_id": "whatever", "at": 9002})
    assert d.events == [] and d.commands == []


def test_a_duplicate_result_is_rejected():
    plan = plan_of(["a", "b"])
    d = start_run(plan, "r1", {}, at=0)
    d = apply(plan, d.state, {"type": "task_succeeded", "task_id": "r1/a#1", "at": 1, "result": {}})
    again = apply(plan, d.state, {"type": "task_succeeded", "task_id": "r1/a#1", "at": 2, "result": {}})
    assert [e["type"] for e in again.events] == ["result_rejected"]
    assert again.commands == []


def test_idempotency_keys_and_task_ids():
    sim = Sim(plan_of(BUSY), busy_script(True), input={"lines": [1, 2, 3], "name": "Ann"}).run()
    by_task = {d["task_id"]: d for d in sim.dispatches}
    assert len(by_task) == len(sim.dispatches)
    assert by_task["r1/reserve#2"]["idempotency_key"] == "r1/reserve"
    assert by_task["r1/lines[1]/charge#2"]["idempotency_key"] == "r1/lines[1]/charge"
    assert by_task["r1/lines[1]/charge#c1"]["idempotency_key"] == "r1/lines[1]/charge/compensate"
    assert by_task["r1/greet#f1"]["kind"] == "fallback"
    for d in sim.dispatches:
        assert d["task_id"].startswith(d["idempotency_key"].removesuffix("/compensate") + "#")


def test_every_event_has_the_flat_schema_with_the_callers_time():
    sim = Sim(plan_of(BUSY), busy_script(True), input={"lines": [1, 2], "name": "Ann"}, report_started=True).run()
    assert sim.status == "needs_intervention"  # (busy_script: a charge completed again after its refund began)
    assert [e["seq"] for e in sim.events] == list(range(len(sim.events)))
    times = {i["at"] for i in sim.inputs}
    for event in sim.events:
        assert set(event) >= BASE_FIELDS, event
        assert event["at"] in times and event["run_id"] == "r1"
        assert event["error"] is None or set(event["error"]) == {"type", "message"}
    kinds = {e["type"] for e in sim.events}
    assert {"run_started", "run_finished", "step_started", "step_scheduled", "step_succeeded", "step_failed",
            "step_retrying", "step_timed_out", "fallback_started", "compensation_started",
            "compensation_succeeded", "compensation_retrying", "attempt_started", "result_rejected",
            "late_completion"} <= kinds


@pytest.mark.parametrize("ship_fails", [False, True])
def test_replaying_the_input_events_reproduces_every_decision(ship_fails):
    sim = Sim(plan_of(BUSY), busy_script(ship_fails), input={"lines": [1, 2, 3], "name": "Ann"},
              report_started=True).run()
    assert sim.status == ("needs_intervention" if ship_fails else "completed")  # (see busy_script)
    recorded = [json.loads(json.dumps(e)) for e in sim.inputs]
    state, commands, events = replay(plan_of(BUSY), recorded)
    assert commands == sim.commands
    assert events == sim.events
    assert json.dumps(state, sort_keys=True) == json.dumps(sim.state, sort_keys=True)


def test_a_state_reloaded_from_json_before_every_event_gives_the_same_decisions():
    kwargs = {"input": {"lines": [1, 2, 3], "name": "Ann"}}
    warm = Sim(plan_of(BUSY), busy_script(True), **kwargs).run()
    cold = Sim(plan_of(BUSY), busy_script(True), reload_state=True, **kwargs).run()
    assert cold.commands == warm.commands and cold.events == warm.events
    assert json.loads(json.dumps(cold.state)) == json.loads(json.dumps(warm.state))


def test_replay_needs_the_start_event():
    with pytest.raises(ValueError, match="start"):
        replay(plan_of(["a"]), [{"type": "task_succeeded", "task_id": "x", "at": 1}])


def test_bad_input_events_are_refused():
    plan = plan_of(["a"])
    d = start_run(plan, "r1", {}, at=0)
    with pytest.raises(ValueError, match="unknown input event"):
        apply(plan, d.state, {"type": "bogus", "at": 1})
    with pytest.raises(ValueError, match="'at'"):
        apply(plan, d.state, {"type": "cancel_requested"})
    with pytest.raises(ValueError, match="task_id"):
        apply(plan, d.state, {"type": "task_succeeded", "at": 1})
    with pytest.raises(ValueError, match="'at'"):
        start_run(plan, "r2", {}, at="2026-01-01T00:00:00Z")  # type: ignore[arg-type]


def test_a_state_or_start_of_newer_rules_is_refused_and_changes_nothing() -> None:
    """A newer flowdsl's run (a rolling upgrade): applying older rules to it would make decisions it was not
    started under; the refusal is a ValueError of its own, so that a runtime can leave the run to a newer
    process instead of dropping the event as malformed."""
    plan = plan_of(["a", "b"])
    newer = STATE_VERSION + 1
    with pytest.raises(NewerVersion, match=f"rules version {newer}, newer than this flowdsl knows"):
        start_run(plan, "r1", {}, at=0, kernel=newer)
    start = {**start_event("r1", {}, at=0), "kernel": newer}
    with pytest.raises(NewerVersion):
        replay(plan, [start])
    d = start_run(plan, "r1", {}, at=0)
    d.state["kernel"] = newer
    before = copy.deepcopy(d.state)
    with pytest.raises(NewerVersion, match="run 'r1' follows kernel rules version"):
        apply(plan, d.state, {"type": "task_succeeded", "task_id": "r1/a#1", "at": 1, "result": {}})
    assert d.state == before
    assert issubclass(NewerVersion, ValueError)
    with pytest.raises(ValueError, match="unknown kernel version 0") as older:
        start_run(plan, "r2", {}, at=0, kernel=0)
    assert not isinstance(older.value, NewerVersion)


@pytest.mark.parametrize("at", [float("nan"), float("inf"), float("-inf"), 1001.5])
def test_a_time_that_is_not_whole_milliseconds_is_refused_and_changes_nothing(at: float) -> None:
    """NaN and the infinities would make the state and the events something JSON cannot hold."""
    plan = plan_of(["a"])
    with pytest.raises(ValueError, match="whole milliseconds"):
        start_run(plan, "r1", {}, at=at)
    d = start_run(plan, "r1", {}, at=0)
    before = copy.deepcopy(d.state)
    with pytest.raises(ValueError, match="whole milliseconds"):
        apply(plan, d.state, {"type": "task_succeeded", "task_id": "r1/a#1", "at": at, "result": {}})
    assert d.state == before
    assert apply(plan, d.state, {"type": "task_succeeded", "task_id": "r1/a#1", "at": 1000.0,
                                 "result": {}}).state["status"] == "completed"  # a whole float is fine


def _answer(plan: dict, state: dict, event: dict) -> list[dict]:
    return apply(plan, state, {"at": 1, **event}).events


def test_meta_of_an_answer_goes_into_the_events_about_that_attempt_only():
    plan = plan_of([{"a": {"retry": {"attempts": 2, "initial": "10ms"}, "compensate": "undo"}},
                    {"g": {"llm": {"signature": "x -> y"}, "fallback": "fb", "retry": 2}}, "b"])
    state = start_run(plan, "r1", {"x": 1}, at=0).state
    m = {n: {"n": n} for n in range(8)}
    retrying = _answer(plan, state, {"type": "task_failed", "task_id": "r1/a#1", "error": {"type": "E"}, "meta": m[0]})
    assert [(e["type"], e.get("meta")) for e in retrying] == [("step_retrying", m[0])]
    apply(plan, state, {"type": "timer_fired", "timer_id": "r1/a#2@retry", "at": 20})
    done = _answer(plan, state, {"type": "task_succeeded", "task_id": "r1/a#2", "result": {}, "meta": m[1]})
    assert [(e["type"], e.get("meta")) for e in done] == [("step_succeeded", m[1]), ("step_started", None),
                                                          ("step_scheduled", None)]
    late = _answer(plan, state, {"type": "task_succeeded", "task_id": "r1/a#1", "result": {}, "meta": m[2]})
    assert [(e["type"], e.get("meta")) for e in late] == [("result_rejected", m[2])]
    invalid = {"type": "task_failed", "task_id": "r1/g#1", "error": {"type": "OutputInvalid"}}
    assert [e["type"] for e in _answer(plan, state, {**invalid, "meta": m[3]})] == ["step_retrying"]
    apply(plan, state, {"type": "timer_fired", "timer_id": next(iter(state["timers"])), "at": 30})
    fallback = _answer(plan, state, {**invalid, "task_id": "r1/g#2", "meta": m[4]})
    assert [(e["type"], e.get("meta")) for e in fallback] == [("fallback_started", m[4]), ("step_scheduled", None)]
    assert fallback[0]["reason"] == "the LLM call failed for good (OutputInvalid) — using the fallback worker 'fb'"
    apply(plan, state, {"type": "task_succeeded", "task_id": "r1/g#f1", "at": 40, "result": {"y": 2}})
    failed = _answer(plan, state, {"type": "task_failed", "task_id": "r1/b#1", "error": {"type": "E"}, "meta": m[5]})
    assert [(e["type"], e["task_id"], e.get("meta")) for e in failed][:2] == [
        ("step_failed", "r1/b#1", m[5]), ("compensation_started", "r1/a#c1", None)]
    undone = _answer(plan, state, {"type": "task_succeeded", "task_id": "r1/a#c1", "result": {}, "meta": m[6]})
    assert [(e["type"], e.get("meta")) for e in undone] == [("compensation_succeeded", m[6]), ("run_finished", None)]
    assert "meta" not in json.dumps(state)  # meta lives in the events, never in the run state


def test_replay_reproduces_the_meta_of_the_recorded_answers():
    plan = plan_of([{"g": {"llm": {"signature": "x -> y"}, "fallback": "fb"}}])
    d = start_run(plan, "r1", {"x": 1}, at=0)
    meta = {"llm": {"prompt": [{"role": "user", "content": "x"}], "raw": "", "model": None}}
    inputs = [{"type": "start", "run_id": "r1", "input": {"x": 1}, "at": 0, "seed": d.state["seed"]},
              {"type": "task_failed", "task_id": "r1/g#1", "at": 1, "meta": meta,
               "error": {"type": "LLMNotConfigured", "message": "no model"}},
              {"type": "task_succeeded", "task_id": "r1/g#f1", "at": 2, "result": {"y": 1}, "meta": {"by": "fb"}}]
    emitted = d.events + apply(plan, d.state, inputs[1]).events + apply(plan, d.state, inputs[2]).events
    _, _, events = replay(plan, json.loads(json.dumps(inputs)))
    assert events == emitted
    (started,) = [e for e in events if e["type"] == "fallback_started"]
    assert started["meta"] == meta and started["reason"] == "no LM configured — using the fallback worker 'fb'"
    assert [e["meta"] for e in events if e["type"] == "step_succeeded"] == [{"by": "fb"}]


def test_meta_must_be_an_object_and_a_bad_one_changes_nothing():
    plan = plan_of(["a"])
    d = start_run(plan, "r1", {}, at=0)
    before = json.loads(json.dumps(d.state))
    with pytest.raises(ValueError, match="'meta' must be an object"):
        apply(plan, d.state, {"type": "task_succeeded", "task_id": "r1/a#1", "at": 1, "result": {}, "meta": [1]})
    assert json.loads(json.dumps(d.state)) == before
    started = apply(plan, d.state, {"type": "task_started", "task_id": "r1/a#1", "at": 1, "meta": {"ignored": 1}})
    assert "meta" not in started.events[0]


def test_the_run_state_copies_and_pickles_as_plain_data():
    sim = Sim(plan_of(BUSY), busy_script(True), input={"lines": [1], "name": "A"}).run()
    assert copy.deepcopy(sim.state) == sim.state
    assert pickle.loads(pickle.dumps(sim.state)) == sim.state
    assert json.loads(json.dumps(sim.state)) == sim.state


def test_summary_reports_every_instance_in_plan_order():
    plan = plan_of(BUSY)
    sim = Sim(plan, busy_script(True), input={"lines": [1, 2], "name": "Ann"}).run()
    s = summary(plan, sim.state)
    assert s["status"] == "needs_intervention" and s["failed_step"] == "ship"  # (see busy_script)
    assert [(i["step"], i.get("after_undo")) for i in s["intervention"]["steps"]] == [("lines[1]/charge", True)]
    assert list(s["steps"]) == ["reserve", "p", "lines", "lines[0]/charge", "lines[1]/charge", "greet", "ship"]
    assert s["steps"]["reserve"]["attempts"] == 2 and s["steps"]["reserve"]["status"] == "succeeded"
    assert s["steps"]["reserve"]["compensation"] == {"status": "done", "attempts": 1, "error": None}
    assert s["steps"]["ship"]["error"] == {"type": "NoCarrier", "message": "boom"}
    assert s["steps"]["greet"]["attempts"] == 2
    assert s["compensated"] == sim.undone()
    assert s["context"]["reservation"] == "R1"
    pending = summary(plan, start_run(plan, "r2", {"lines": [1], "name": "A"}, at=0).state)
    assert pending["steps"]["ship"]["status"] == "pending" and "charge" not in pending["steps"]
    json.dumps(s)


def test_attempt_started_is_reported_for_the_current_attempt_only():
    sim = Sim(plan_of(["a"]), report_started=True).run()
    assert [(e["step"], e["task_id"]) for e in sim.of("attempt_started")] == [("a", "r1/a#1")]


def test_a_runtime_cancelled_attempt_counts_as_a_failure():
    plan = plan_of([{"a": {"retry": {"attempts": 2, "initial": "1ms"}}}])
    d = start_run(plan, "r1", {}, at=0)
    d = apply(plan, d.state, {"type": "task_cancelled", "task_id": "r1/a#1", "at": 1})
    assert d.events[0]["type"] == "step_retrying" and d.events[0]["error"]["type"] == "TaskCancelled"


def test_a_hanging_task_during_cancellation_is_bounded_by_its_attempt_timeout():
    plan = plan_of([{"parallel": "p", "branches": [{"slow": {"timeout": "1s", "compensate": "undo"}}, "bad"]}])
    sim = Sim(plan, {"slow": hang(cancellable=False), "bad": fail(after=5)}).run()
    assert sim.status == "failed"
    assert sim.state["finished_at"] == 2000
    cancelled = sim.of("step_cancelled")[0]
    assert cancelled["step"] == "slow" and cancelled["error"]["type"] == "StepTimeout"


def _drive(plan: dict, failing: str | None) -> dict:
    """Answer every dispatch at once (``failing`` fails for good); the final state."""
    d = start_run(plan, "r", {"x": 1}, at=0)
    todo = [c for c in d.commands if c["op"] == "dispatch"]
    n = 0
    while todo:
        c = todo.pop(0)
        n += 1
        if c["node"] == failing and c["kind"] != "compensate":
            event = {"type": "task_failed", "task_id": c["task_id"], "at": n, "error": {"type": "E"}}
        else:
            event = {"type": "task_succeeded", "task_id": c["task_id"], "at": n, "result": {c["node"]: n}}
        d = apply(plan, d.state, event)
        todo += [c for c in d.commands if c["op"] == "dispatch"]
    return d.state


@pytest.mark.parametrize("shape", ["sequence", "parallel"])
def test_a_thousand_steps_complete_and_a_late_failure_undoes_all_of_them(shape):
    # what each event costs is measured by benchmarks/bench_local.py, not asserted here
    steps = [{f"s{i}": {"compensate": "undo"}} for i in range(1000)]
    plan = plan_of([*steps, "last"]) if shape == "sequence" else plan_of(
        [{"parallel": "p", "branches": steps}, "last"])
    assert _drive(plan, None)["status"] == "completed"
    undone = _drive(plan, "last")
    assert undone["status"] == "compensated"
    assert sorted(undone["compensated"]) == sorted(f"s{i}" for i in range(1000))
    if shape == "sequence":
        assert undone["compensated"] == [f"s{i}" for i in reversed(range(1000))]
