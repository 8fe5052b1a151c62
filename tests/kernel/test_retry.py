"""Kernel: retries (backoff, cap, jitter, error filters), attempt timeouts, fail_when, LLM fallback."""

from __future__ import annotations

import pytest

from flowdsl.kernel import retry_delay
from tests.kernel.plans import plan_of
from tests.kernel.sim import Sim, fail, hang, ok


def retrying(policy: dict, **step: object) -> dict:
    return plan_of([{"s": {"retry": policy, **step}}, "after"])


def test_a_failed_attempt_is_retried_with_the_same_idempotency_key():
    plan = retrying({"attempts": 3, "initial": "100ms", "backoff": "constant"})
    sim = Sim(plan, {"s": [fail("Flaky"), fail("Flaky"), ok({"done": 1})]}).run()
    assert sim.status == "completed"
    tries = [d for d in sim.dispatches if d["step"] == "s"]
    assert [d["attempt"] for d in tries] == [1, 2, 3]
    assert [d["task_id"] for d in tries] == ["r1/s#1", "r1/s#2", "r1/s#3"]
    assert {d["idempotency_key"] for d in tries} == {"r1/s"}
    assert [d["at"] for d in tries] == [1000, 1110, 1220]
    assert [(e["attempt"], e["next_attempt"], e["delay_ms"], e["error"]["type"]) for e in sim.of("step_retrying")] \
        == [(1, 2, 100, "Flaky"), (2, 3, 100, "Flaky")]
    assert [c["timer_id"] for c in sim.commands if c["op"] == "schedule_timer"] == ["r1/s#2@retry", "r1/s#3@retry"]
    assert sim.state["nodes"]["s"]["attempts"] == 3


@pytest.mark.parametrize(("backoff", "delays"), [
    ("constant", [100, 100, 100, 100]),
    ("linear", [100, 200, 300, 300]),
    ("exponential", [100, 200, 300, 300]),
])
def test_backoff_delays_are_capped_at_max(backoff, delays):
    multiplier = {"multiplier": 2} if backoff == "exponential" else {}
    plan = retrying({"attempts": 5, "backoff": backoff, "initial": "100ms", "max": "300ms", **multiplier})
    sim = Sim(plan, {"s": fail("Flaky")}).run()
    assert sim.status == "failed"
    assert [e["delay_ms"] for e in sim.of("step_retrying")] == delays
    assert len(sim.dispatched()) == 5


def test_exponential_growth_uses_the_multiplier():
    policy = {"attempts": 5, "backoff": "exponential", "initial_ms": 50, "max_ms": 10_000, "multiplier": 3.0,
              "jitter": "none"}
    assert [retry_delay(policy, n, 0, "s") for n in (1, 2, 3, 4)] == [50, 150, 450, 1350]
    assert retry_delay({**policy, "max_ms": None}, 500, 0, "s") == 2**31 - 1


def test_jitter_is_deterministic_per_seed_and_within_bounds():
    full = {"attempts": 9, "backoff": "constant", "initial_ms": 1000, "max_ms": 1000, "jitter": "full"}
    equal = {**full, "jitter": "equal"}
    draws = [retry_delay(full, n, seed, f"k{n}") for seed in range(20) for n in range(1, 5)]
    assert all(0 <= d <= 1000 for d in draws) and len(set(draws)) > 40
    assert all(500 <= retry_delay(equal, n, seed, "k") <= 1000 for seed in range(50) for n in range(1, 5))
    assert retry_delay(full, 2, 7, "a/b") == retry_delay(full, 2, 7, "a/b")

    plan = retrying({"attempts": 4, "backoff": "exponential", "initial": "1s", "max": "10s", "jitter": "full"})
    runs = [Sim(plan, {"s": fail("Flaky")}, seed=seed).run() for seed in (1, 1, 2)]
    delays = [[e["delay_ms"] for e in r.of("step_retrying")] for r in runs]
    assert delays[0] == delays[1]
    assert delays[0] != delays[2]
    assert all(0 <= d <= cap for d, cap in zip(delays[0], (1000, 2000, 4000), strict=True))


def test_the_default_seed_comes_from_the_run_id():
    plan = retrying({"attempts": 3, "initial": "1s", "jitter": "full"})
    from flowdsl.kernel import start_run

    a = start_run(plan, "run-a", {}, at=0).state["seed"]
    assert a == start_run(plan, "run-a", {}, at=5).state["seed"]
    assert a != start_run(plan, "run-b", {}, at=0).state["seed"]


def test_on_limits_retries_to_the_listed_error_types():
    plan = retrying({"attempts": 3, "initial": "10ms", "on": ["GatewayTimeout"]})
    assert Sim(plan, {"s": [fail("GatewayTimeout"), ok()]}).run().status == "completed"
    sim = Sim(plan, {"s": [fail("CardDeclined"), ok()]}).run()
    assert sim.status == "failed"
    assert sim.dispatched() == ["s"]


def test_not_on_is_never_retried():
    plan = retrying({"attempts": 3, "initial": "10ms", "not_on": ["CardDeclined"]})
    assert Sim(plan, {"s": [fail("Other"), ok()]}).run().status == "completed"
    sim = Sim(plan, {"s": [fail("CardDeclined"), ok()]}).run()
    assert sim.status == "failed"
    assert sim.of("step_retrying") == []


def test_a_timed_out_attempt_is_cancelled_and_retried_and_its_late_result_rejected():
    plan = retrying({"attempts": 2, "initial": "10ms"}, timeout="50ms")
    sim = Sim(plan, {"s": [ok({"late": True}, after=200, cancellable=False), ok({"fresh": True})]}).run()
    assert sim.status == "completed"
    timed_out = sim.of("step_timed_out")
    assert [(e["step"], e["attempt"], e["task_id"], e["error"]["type"]) for e in timed_out] == [
        ("s", 1, "r1/s#1", "StepTimeout")]
    assert {"op": "cancel_task", "run_id": "r1", "task_id": "r1/s#1", "step": "s"} in sim.commands
    assert [d["at"] for d in sim.dispatches if d["step"] == "s"] == [1000, 1060]
    rejected = sim.of("result_rejected")
    assert [(e["task_id"], e["result_type"]) for e in rejected] == [("r1/s#1", "task_succeeded")]
    assert sim.state["context"] == {"fresh": True}
    assert next(c for c in sim.commands if c["op"] == "dispatch")["timeout_ms"] == 50


def test_an_attempt_timeout_timer_is_cancelled_when_the_attempt_ends():
    plan = retrying({"attempts": 1}, timeout="50ms")
    sim = Sim(plan).run()
    assert {"op": "cancel_timer", "run_id": "r1", "timer_id": "r1/s#1@timeout"} in sim.commands
    assert sim.of("step_timed_out") == []


def test_timeouts_use_up_attempts_like_any_failure():
    plan = retrying({"attempts": 2, "initial": "10ms"}, timeout="50ms")
    sim = Sim(plan, {"s": hang()}).run()
    assert sim.status == "failed"
    assert sim.state["error"]["type"] == "StepTimeout"
    assert len(sim.of("step_timed_out")) == 2


def test_fail_when_failures_are_retried_by_the_policy():
    plan = retrying({"attempts": 3, "initial": "10ms"}, fail_when="${ status = 'pending' }")
    sim = Sim(plan, {"s": [ok({"status": "pending"}), ok({"status": "pending"}), ok({"status": "ok"})]}).run()
    assert sim.status == "completed"
    assert [e["error"]["type"] for e in sim.of("step_retrying")] == ["FailWhen", "FailWhen"]
    assert sim.state["context"] == {"status": "ok"}
    sim = Sim(plan, {"s": ok({"status": "pending"})}).run()
    assert sim.status == "failed" and sim.state["error"]["type"] == "FailWhen"


def test_a_result_that_is_not_an_object_is_an_invalid_output():
    sim = Sim(retrying({"attempts": 2, "initial": "10ms"}), {"s": [ok([1, 2]), ok(None)]}).run()
    assert sim.status == "completed"
    assert sim.of("step_retrying")[0]["error"]["type"] == "OutputInvalid"


LLM = {"gen": {"llm": {"signature": "name -> greeting", "instructions": "Greet."},
               "retry": {"attempts": 3, "initial": "10ms"}}}


def llm_plan(fallback: str | None = "template_greeting") -> dict:
    step = {"gen": {**LLM["gen"], **({"fallback": fallback} if fallback else {})}}
    return plan_of([step, "after"])


def test_llm_steps_are_dispatched_with_their_llm_block():
    sim = Sim(llm_plan(), {"gen": ok({"greeting": "hi"})}, input={"name": "Ann"}).run()
    cmd = next(d for d in sim.dispatches if d["step"] == "gen")
    assert cmd["kind"] == "llm" and cmd["worker"] is None
    assert cmd["llm"]["signature"]["inputs"][0]["name"] == "name"
    assert cmd["input"] == {"name": "Ann"}
    assert sim.state["context"]["greeting"] == "hi"


def test_an_llm_step_without_a_model_goes_straight_to_its_fallback():
    sim = Sim(llm_plan(), {"gen": fail("LLMNotConfigured", "no LM"), "gen/fallback": ok({"greeting": "Hello"})},
              input={"name": "Ann"}).run()
    assert sim.status == "completed"
    assert [(d["kind"], d["worker"], d["task_id"], d["attempt"]) for d in sim.dispatches if d["step"] == "gen"] == [
        ("llm", None, "r1/gen#1", 1), ("fallback", "template_greeting", "r1/gen#f1", 1)]
    started = sim.of("fallback_started")
    assert len(started) == 1 and started[0]["worker"] == "template_greeting"
    assert started[0]["error"]["type"] == "LLMNotConfigured"
    assert "fallback worker 'template_greeting'" in started[0]["reason"]
    assert sim.state["context"]["greeting"] == "Hello"
    fallback = next(d for d in sim.dispatches if d["kind"] == "fallback")
    assert fallback["input"] == {"name": "Ann"} and fallback["idempotency_key"] == "r1/gen"


def test_an_llm_step_that_fails_for_good_runs_its_fallback():
    sim = Sim(llm_plan(), {"gen": fail("OutputInvalid"), "gen/fallback": [fail("Flaky"), ok({"greeting": "x"})]}).run()
    assert sim.status == "completed"
    assert [d["kind"] for d in sim.dispatches if d["step"] == "gen"] == ["llm", "llm", "llm", "fallback", "fallback"]
    assert sim.of("step_retrying")[-1]["task_id"] == "r1/gen#f1"


def test_an_llm_step_without_fallback_fails_the_run():
    sim = Sim(llm_plan(None), {"gen": fail("LLMNotConfigured")}).run()
    assert sim.status == "failed"
    assert len(sim.dispatched("llm")) == 1
    assert sim.of("fallback_started") == []


def test_an_llm_steps_input_invalid_is_not_retried_nor_its_fallbacks():
    """The same context gives the same verdict on the step's input fields: retrying cannot help."""
    sim = Sim(llm_plan(), {"gen": fail("InputInvalid"), "gen/fallback": fail("InputInvalid")}).run()
    assert sim.status == "failed"
    assert [d["kind"] for d in sim.dispatches if d["step"] == "gen"] == ["llm", "fallback"]
    assert sim.of("step_retrying") == []
    without = Sim(llm_plan(None), {"gen": fail("InputInvalid")}).run()
    assert without.status == "failed" and len(without.dispatched("llm")) == 1


def test_a_workers_own_input_invalid_is_retried_as_any_error():
    sim = Sim(plan_of([{"s": {"retry": {"attempts": 2, "initial": "1ms"}}}]),
              {"s": [fail("InputInvalid"), ok({"x": 1})]}).run()
    assert sim.status == "completed" and len(sim.of("step_retrying")) == 1


def test_a_run_started_under_kernel_version_2_still_retries_an_llm_input_invalid():
    """Its record replays to the decisions it shows: the rule holds from version 3 on."""
    from flowdsl.kernel import apply, replay, start_run

    plan = llm_plan(None)
    d = start_run(plan, "r1", {}, at=0, kernel=2)
    failed = {"type": "task_failed", "task_id": "r1/gen#1", "at": 1, "error": {"type": "InputInvalid"}}
    d = apply(plan, d.state, failed)
    assert [e["type"] for e in d.events] == ["step_retrying"]
    start = {"type": "start", "run_id": "r1", "input": {}, "at": 0, "seed": None, "kernel": 2}
    state, _, events = replay(plan, [start, failed])
    assert state["kernel"] == 2 and events[-1]["type"] == "step_retrying"


# --- filters match an exception's base classes too (error.types) -------------------------------------------

REFUSED = {"type": "ConnectionRefusedError", "message": "refused",
           "types": ["ConnectionRefusedError", "ConnectionError", "OSError", "Exception"]}


def _first_failure(policy: dict, error: dict, *, compensation: bool = False) -> list[str]:
    """The event types the kernel emits when the first attempt (of the step, or of its compensation) fails."""
    from flowdsl.kernel import apply, start_run

    if compensation:
        plan = plan_of([{"s": {"compensate": {"worker": "undo", "retry": policy}}}, "t"])
        d = start_run(plan, "r1", {}, at=0)
        d = apply(plan, d.state, {"type": "task_succeeded", "task_id": "r1/s#1", "at": 1, "result": {}})
        d = apply(plan, d.state, {"type": "task_failed", "task_id": "r1/t#1", "at": 2, "error": {"type": "Fatal"}})
        (cmd,) = [c for c in d.commands if c["op"] == "dispatch"]
        d = apply(plan, d.state, {"type": "task_failed", "task_id": cmd["task_id"], "at": 3, "error": error})
        return [e["type"] for e in d.events if e["type"].startswith("compensation_")]
    plan = retrying(policy)
    d = start_run(plan, "r1", {}, at=0)
    d = apply(plan, d.state, {"type": "task_failed", "task_id": "r1/s#1", "at": 1, "error": error})
    return [e["type"] for e in d.events if e["type"] in ("step_retrying", "step_failed")]


@pytest.mark.parametrize("compensation", [False, True])
def test_a_filter_matches_the_class_it_names_or_any_subclass(compensation):
    retried = ["compensation_retrying"] if compensation else ["step_retrying"]
    spent = ["compensation_failed"] if compensation else ["step_failed"]
    policy = {"attempts": 3, "initial": "10ms"}
    assert _first_failure({**policy, "on": ["ConnectionError"]}, REFUSED, compensation=compensation) == retried
    assert _first_failure({**policy, "on": ["ConnectionRefusedError"]}, REFUSED, compensation=compensation) == retried
    assert _first_failure({**policy, "on": ["TimeoutError"]}, REFUSED, compensation=compensation) == spent
    assert _first_failure({**policy, "not_on": ["OSError"]}, REFUSED, compensation=compensation) == spent
    assert _first_failure({**policy, "not_on": ["ValueError"]}, REFUSED, compensation=compensation) == retried


def test_an_error_without_types_is_known_by_its_type_alone_and_replays_as_before():
    """Records written before ``types`` existed: ConnectionRefusedError is not a ConnectionError to the kernel."""
    policy = {"attempts": 3, "initial": "10ms", "on": ["ConnectionError"]}
    bare = {"type": "ConnectionRefusedError", "message": "refused"}
    assert _first_failure(policy, bare) == ["step_failed"]
    assert _first_failure(policy, {**bare, "types": "ConnectionError"}) == ["step_failed"]  # malformed: ignored
    assert _first_failure(policy, {"type": "ConnectionError", "message": "down"}) == ["step_retrying"]


def test_the_error_keeps_its_types_in_the_state_and_events():
    from flowdsl.kernel import apply, start_run

    plan = retrying({"attempts": 1})
    d = start_run(plan, "r1", {}, at=0)
    d = apply(plan, d.state, {"type": "task_failed", "task_id": "r1/s#1", "at": 1, "error": REFUSED})
    (failed,) = [e for e in d.events if e["type"] == "step_failed"]
    assert failed["error"] == REFUSED == d.state["error"]
