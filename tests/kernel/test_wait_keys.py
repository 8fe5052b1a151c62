"""Kernel rules 10: keyed waits — a signal wait in a for_each body takes one signal per iteration, told apart by a
key its expression gives as it starts (docs/kernel.md, "Waits": keys).

The plans are the compiler's: a for_each over ``parcels``, each waiting for signal ``delivered`` keyed by the
parcel's tracking number (``key: "${ $parcel.t }"``), then ``done``.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flowdsl.kernel import (
    END_STATES,
    KEY_RULES,
    STATE_VERSION,
    WAIT_KEY_INVALID,
    WAIT_KEY_TAKEN,
    apply,
    prepare,
    replay,
    rules_for,
    start_run,
    summary,
)
from flowdsl.kernel_wait import KEPT_MAX, KEY_LIMIT, key_text
from tests.kernel.plans import plan_of
from tests.kernel.sim import Sim, fail, ok


def parcels(timeout: str | None = None, extra: list[Any] | None = None, key: str = "${ $parcel.t }") -> dict[str, Any]:
    """The plan: for_each parcel of ``parcels``, ``ship`` (undone by ``unship``) then the wait for ``delivered``
    keyed by ``key``, storing the signal's payload as ``delivery``; then ``done``."""
    wait: dict[str, Any] = {"wait": "delivered", "key": key, "output": "delivery"}
    if timeout is not None:
        wait["timeout"] = timeout
    return plan_of([{"for_each": "each", "items": "${ parcels }", "as": "parcel",
                     "steps": [{"ship": {"compensate": "unship"}}, wait]}, *(extra or []), "done"])


THREE = {"parcels": [{"t": "A"}, {"t": "B"}, {"t": "C"}]}


def test_each_instance_takes_the_signal_of_its_key_in_any_order() -> None:
    plan = parcels()
    assert plan["plan_version"] == 4 and prepare(plan).keyed == frozenset({"delivered"})
    sim = Sim(plan, input=THREE, signals=[(5000, "delivered", {"by": "c"}, "C"), (6000, "delivered", {"by": "a"}, "A"),
                                         (7000, "delivered", {"by": "b"}, "B")]).run()
    assert sim.status == "completed"
    started = sim.of("step_started", step="each[1]/delivered")[0]
    assert (started["signal"], started["key"]) == ("delivered", "B")
    got = [(e["step"], e["key"], e["at"], e["buffered"]) for e in sim.of("signal_received")]
    assert got == [("each[2]/delivered", "C", 5000, False), ("each[0]/delivered", "A", 6000, False),
                   ("each[1]/delivered", "B", 7000, False)]
    assert [d["at"] for d in sim.dispatches if d["step"] == "done"] == [7000]
    assert sim.state["keys"] == {"delivered": {"A": "each[0]/delivered", "B": "each[1]/delivered",
                                               "C": "each[2]/delivered"}}
    assert not sim.state["waits"]
    row = summary(plan, sim.state)["steps"]["each[2]/delivered"]
    assert (row["status"], row["signal"], row["key"]) == ("succeeded", "delivered", "C")


def test_a_keyed_signal_before_its_instance_starts_is_kept_for_it() -> None:
    sim = Sim(parcels(), {"ship": ok(after=1000)}, input={"parcels": [{"t": "A"}]},
              signals=[(1100, "delivered", {"by": "early"}, "A"), (1200, "delivered", {"by": "again"}, "A")]).run()
    assert sim.status == "completed"
    kept = sim.of("signal_buffered")
    assert [(e["signal"], e["key"], e["wait"], e["at"]) for e in kept] == [("delivered", "A", "delivered", 1100)]
    rejected = sim.of("signal_rejected")
    assert [(e["key"], e["reason"]) for e in rejected] == [
        ("A", "signal 'delivered' key 'A' was already received: it is kept until the wait with that key starts")]
    got = sim.of("signal_received")[0]
    assert (got["step"], got["buffered"], got["sent_at"], got["key"]) == ("each[0]/delivered", True, 1100, "A")
    assert sim.state["kept"] == {"delivered": {}}


def test_signals_that_name_no_key_or_the_wrong_kind_are_rejected_with_the_reason() -> None:
    plan = parcels(extra=[{"wait": "paid"}])
    sim = Sim(plan, input={"parcels": [{"t": "A"}]},
              signals=[(2010, "delivered", {}), (2020, "paid", {}, "X"), (2030, "delivered", {}, "A"),
                       (2040, "paid", {}), (2050, "delivered", {}, "A")]).run()
    assert sim.status == "completed"
    reasons = [(e["signal"], e.get("key"), e["reason"]) for e in sim.of("signal_rejected")]
    assert reasons == [
        ("delivered", None, "wait 'delivered' tells its instances apart by key: signal 'delivered' needs a key"),
        ("paid", "X", "wait 'paid' takes signal 'paid' without a key"),
        ("delivered", "A", "wait 'each[0]/delivered' has already received signal 'delivered'")]
    unkeyed = sim.of("signal_received", step="paid")[0]
    assert "key" not in unkeyed  # (an unkeyed signal's events are as under rules 9)


def test_two_items_with_one_key_fail_the_second_wait_and_the_run_compensates() -> None:
    sim = Sim(parcels(), input={"parcels": [{"t": "A"}, {"t": "A"}]}, signals=[(5000, "delivered", {}, "A")]).run()
    assert sim.status == "compensated" and sim.state["failed_step"] == "each[1]/delivered"
    assert sim.state["error"] == {"type": WAIT_KEY_TAKEN,
                                  "message": "key 'A' of signal 'delivered' is taken by wait 'each[0]/delivered'"}
    assert sorted(sim.undone()) == ["each[0]/ship", "each[1]/ship"]
    cancelled = sim.of("step_cancelled", step="each[0]/delivered")[0]
    assert cancelled["reason"] == "the run was aborted while the wait waited for signal 'delivered' key 'A'"


@pytest.mark.parametrize(("value", "said"), [
    (None, "null"), (True, "a boolean true"), (1.5, "a number 1.5"), ("", "an empty string"),
    ([1], "an array [1]"), ({"a": 1}, 'an object {"a": 1}')])
def test_a_key_that_is_no_key_fails_its_wait_with_wait_key_invalid(value: Any, said: str) -> None:
    sim = Sim(parcels(key="${ $parcel.k }"), input={"parcels": [{"k": value}]}).run()
    assert sim.status == "compensated"
    assert sim.state["error"] == {"type": WAIT_KEY_INVALID, "message": "the key of wait 'each[0]/delivered' must be "
                                  f"a non-empty string or a whole number; its expression gave {said}"}
    started = sim.of("step_started", step="each[0]/delivered")[0]
    assert "key" not in started


def test_a_key_longer_than_a_signal_can_name_fails_its_wait() -> None:
    """No signal could be sent with it (a sender refuses keys over KEY_LIMIT characters): the wait fails at once
    instead of waiting for ever."""
    sim = Sim(parcels(), input={"parcels": [{"t": "x" * (KEY_LIMIT + 1)}]}).run()
    assert sim.status == "compensated" and sim.state["error"]["type"] == WAIT_KEY_INVALID
    assert f"must have at most {KEY_LIMIT} characters" in sim.state["error"]["message"]
    assert key_text("x" * KEY_LIMIT) == "x" * KEY_LIMIT
    with pytest.raises(ValueError, match=f"'key' must be a non-empty string of at most {KEY_LIMIT} characters"):
        apply(parcels(), start_run(parcels(), "r1", THREE, at=1).state,
              {"type": "signal", "name": "delivered", "key": "x" * (KEY_LIMIT + 1), "at": 2})


def test_an_integer_key_is_its_decimal_text() -> None:
    assert key_text(42) == "42" and key_text("42") == "42" and key_text(42.0) == "42" and key_text(1e20) == str(10**20)
    sim = Sim(parcels(), input={"parcels": [{"t": 7}]}, signals=[(10, "delivered", {}, "7")]).run()
    assert sim.status == "completed" and sim.of("signal_received")[0]["key"] == "7"


def test_a_key_expression_that_fails_fails_its_wait_with_expression_error() -> None:
    sim = Sim(parcels(key="${ $number($parcel.t) }"), input={"parcels": [{"t": "x"}]}).run()
    assert sim.status == "compensated" and sim.state["error"]["type"] == "ExpressionError"
    assert "key" in sim.state["error"]["message"]


def test_a_keyed_wait_times_out_alone_naming_its_key() -> None:
    sim = Sim(parcels(timeout="30s"), input=THREE,
              signals=[(1010, "delivered", {}, "A"), (1020, "delivered", {}, "C")]).run()
    assert sim.status == "compensated" and sim.state["failed_step"] == "each[1]/delivered"
    assert sim.state["error"]["message"] == "no signal 'delivered' key 'B' came within 30000 ms"


def test_kept_signals_are_bounded_per_name() -> None:
    plan = parcels()
    d = start_run(plan, "r1", {"parcels": []}, at=1)
    state = d.state
    state["status"] = "running"  # (an empty for_each ends the run at once: keep it going to send it signals)
    state["kept"] = {"delivered": {str(i): {"payload": {}, "at": 1} for i in range(KEPT_MAX)}}
    d = apply(plan, state, {"type": "signal", "name": "delivered", "key": "more", "payload": {}, "at": 2})
    assert [e["reason"] for e in d.events] == [
        f"too many signals 'delivered' are kept for keys no wait has taken yet ({KEPT_MAX})"]


def test_rules_10_and_the_plan_version() -> None:
    plan = parcels()
    assert KEY_RULES == 10 and STATE_VERSION >= 10
    assert rules_for(plan, 8) == 10 and rules_for(plan_of([{"wait": "paid"}]), 8) == 9
    with pytest.raises(ValueError, match="wait 'delivered' is keyed, which kernel rules 10 brought"):
        start_run(plan, "r1", THREE, at=1, kernel=9)


def test_malformed_keys_and_plans_are_refused() -> None:
    plan = parcels()
    d = start_run(plan, "r1", THREE, at=1)
    before = json.dumps(d.state)
    for bad in ("", 3, ["A"]):
        with pytest.raises(ValueError, match="'key' must be a non-empty string"):
            apply(plan, d.state, {"type": "signal", "name": "delivered", "key": bad, "at": 2})
        assert json.dumps(d.state) == before
    unkeyed = copy.deepcopy(plan)
    unkeyed["nodes"]["delivered"]["signal_key"] = None
    with pytest.raises(ValueError, match="inside for_each 'each' with no 'signal_key'"):
        prepare(unkeyed)
    timer = copy.deepcopy(plan_of([{"wait": "cool", "for": "1s"}]))
    timer["nodes"]["cool"]["signal_key"] = next(iter(plan["expressions"]))
    with pytest.raises(ValueError, match="'cool' is a timer wait with a 'signal_key'"):
        prepare(timer)


def test_a_keyed_run_replays_to_the_same_decisions() -> None:
    plan = parcels(timeout="1m")
    sim = Sim(plan, {"ship": ok(after=500)}, input=THREE,
              signals=[(100, "delivered", {"n": 1}, "B"), (900, "delivered", {"n": 2}, "A"),
                       (950, "delivered", {}, "Z"), (1000, "delivered", {"n": 3}, "C")]).run()
    assert sim.status == "completed"
    state, _, events = replay(plan, sim.inputs)
    assert state == sim.state and events == sim.events


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_keyed_runs_answer_each_signal_once_and_give_each_instance_its_own_key(data: st.DataObject) -> None:
    """Random items (keys drawn from a few, so some repeat; some not keys at all), a random deadline and
    concurrency, ship steps that fail at random, keyed signals at random times (some twice, some for keys no item
    has, some without a key) and a cancel: every signal gets exactly one answer; an instance takes only a signal of
    its own key, at most one; no two instances hold one key; a duplicate key fails its wait with WaitKeyTaken; the
    run never ends with a wait waiting; and the record replays to the same decisions."""
    keys = st.one_of(st.sampled_from(["A", "B", "C", "D"]), st.integers(1, 3), st.none())
    items = data.draw(st.lists(keys, max_size=5), label="item keys")
    timeout = data.draw(st.sampled_from([None, "50ms", "200ms"]), label="timeout")
    concurrency = data.draw(st.sampled_from([None, 1, 2]), label="concurrency")
    loop: dict[str, Any] = {"for_each": "each", "items": "${ parcels }", "as": "parcel",
                            "steps": [{"ship": {"compensate": "unship"}},
                                      {"wait": "delivered", "key": "${ $parcel.t }", "output": "delivery",
                                       **({"timeout": timeout} if timeout else {})}]}
    if concurrency is not None:
        loop["concurrency"] = concurrency
    plan = plan_of([loop, "done"])
    failing = data.draw(st.booleans(), label="a ship fails")
    script = {"ship": fail("Boom") if failing else ok(after=data.draw(st.integers(0, 40)))}
    signals: list[tuple[Any, ...]] = []
    for n in range(data.draw(st.integers(0, 8), label="signals")):
        key = data.draw(st.one_of(st.sampled_from(["A", "B", "C", "D", "1", "2", "Z"]), st.none()))
        at = data.draw(st.integers(1000, 1300))
        signals.append((at, "delivered", {"n": n}, key) if key is not None else (at, "delivered", {"n": n}))
    cancel_at = data.draw(st.one_of(st.none(), st.integers(1000, 1300)), label="cancel_at")
    sim = Sim(plan, script, input={"parcels": [{"t": k} for k in items]}, signals=signals,
              cancel_at=cancel_at).run()

    answers = (sim.of("signal_buffered") + sim.of("signal_rejected")
               + [e for e in sim.of("signal_received") if not e["buffered"]])
    assert len(answers) == len(signals), "a signal without exactly one answer"
    received = sim.of("signal_received")
    assert len(received) == len({e["step"] for e in received}), "an instance took two signals"
    held: dict[str, str] = {}
    for ikey, rec in sim.state["nodes"].items():
        if rec["node"] != "delivered" or "key" not in rec:
            continue
        got = [e for e in received if e["step"] == ikey]
        assert all(e["key"] == rec["key"] for e in got), "an instance took another key's signal"
        if (rec.get("error") or {}).get("type") == WAIT_KEY_TAKEN:
            assert rec["key"] in held
        else:
            assert rec["key"] not in held, "two instances hold one key"
            held[rec["key"]] = ikey
    assert sim.state.get("keys", {}).get("delivered", {}) == held
    if sim.status == "running":
        event("left waiting")
        assert timeout is None and sim.state["waits"] and cancel_at is None
    else:
        event(f"status: {sim.status}")
        assert sim.status in END_STATES and not sim.state.get("waits") and not sim.state["timers"]
    state, _, events = replay(plan, sim.inputs)
    assert state == sim.state and events == sim.events
