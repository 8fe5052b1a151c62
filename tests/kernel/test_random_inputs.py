"""Kernel properties under arbitrary input orders: random plans whose steps and undos time out and retry, driven by
random answers, timer firings, a cancel, and *late* successes of any attempt dispatched before (steps', fallbacks'
and compensations', while the run goes and after its end) — the inputs the rules of versions 4, 5 and 7 act on.

After every decision: the state is plain JSON and deciding from a JSON copy of it gives the same decision; the saga's
``active`` counts the compensations running or waiting to retry; nothing is dispatched after the run's end; no step
is undone twice; a step listed with its undo failed has its undo not done, one listed as completed again after its
undo (version 7) has its undo begun. At the end: the run has ended, and replaying its inputs gives its state,
commands and events.
"""

from __future__ import annotations

import copy
import itertools
import json
import random
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flowdsl.kernel import END_STATES, apply, replay, start_event, start_run
from tests.kernel.plans import plan_of
from tests.kernel.test_properties import Tree, trees


def _node(tree: Tree, names: itertools.count[int], rng: random.Random) -> Any:
    if tree[0] == "task":
        name = f"s{next(names)}"
        options: dict[str, Any] = {"timeout": "1s"}
        if rng.random() < 0.5:
            options["retry"] = {"attempts": 2, "initial": "1ms"}
        if tree[1]:
            options["compensate"] = {"worker": f"undo_{name}", "timeout": "1s",
                                     "retry": {"attempts": 2, "initial": "1ms"}}
        if rng.random() < 0.25:  # fails on the result {"amount": "x"}: a success whose output map fails
            options["output"] = {f"o_{name}": "${ $number(amount) }"}
        return {name: options}
    kids = [_node(child, names, rng) for child in tree[1]]
    name = f"g{next(names)}"
    return {"parallel": name, "branches": kids} if tree[0] == "par" else {"sequence": name, "steps": kids}


def _check(state: dict[str, Any], commands: list[dict[str, Any]], ended_before: bool,
           undone: Counter[str]) -> None:
    assert json.loads(json.dumps(state)) == state
    if ended_before:
        assert not [c for c in commands if c["op"] == "dispatch"], "dispatched after the run ended"
    if state["status"] == "compensating":
        busy = [k for k, c in state["compensations"].items() if c["status"] in ("running", "retrying")]
        assert state["saga"]["active"] == len(busy) >= 0
    assert all(n == 1 for n in undone.values()), f"undone twice: {undone}"
    for item in (state["intervention"] or {}).get("steps") or ():
        if item["status"] == "failed":
            assert state["compensations"][item["step"]]["status"] != "done", f"{item['step']} undone yet listed"
        if item.get("after_undo"):  # (version 7) completed again after its undo had begun
            assert state["kernel"] >= 7 and state["compensations"][item["step"]]["attempt"] >= 1, item


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees, rng=st.randoms(use_true_random=False), kernel=st.sampled_from([3, 4, 5, 6, 7]))
def test_random_inputs_keep_the_saga_consistent_and_replay_exactly(tree: Tree, rng: random.Random,
                                                                   kernel: int) -> None:
    plan = plan_of([_node(tree, itertools.count(), rng)])
    inputs = [{**start_event("r1", {}, at=0, seed=7), "kernel": kernel}]
    d = start_run(plan, "r1", {}, at=0, seed=7, kernel=kernel)
    state, commands, events = d.state, list(d.commands), list(d.events)
    dispatched = [c["task_id"] for c in d.commands if c["op"] == "dispatch"]
    due = {c["timer_id"]: c["due_at"] for c in d.commands if c["op"] == "schedule_timer"}
    undone: Counter[str] = Counter()
    answered: set[str] = set()
    at = 0
    for _ in range(400):
        in_flight = sorted(state["tasks"])
        timers = sorted(state["timers"], key=lambda t: (due[t], t))
        if (state["status"] in END_STATES and rng.random() < 0.7) or not (in_flight or timers or dispatched):
            break
        at += rng.randint(1, 30)
        roll = rng.random()
        if in_flight and roll < 0.55:
            task_id = rng.choice(in_flight)
            how = rng.random()
            if how < 0.75:
                result = {"amount": "x"} if rng.random() < 0.2 else {}
                inp: dict[str, Any] = {"type": "task_succeeded", "task_id": task_id, "result": result}
            elif how < 0.92:
                inp = {"type": "task_failed", "task_id": task_id, "error": {"type": "Boom", "message": "no"}}
            else:
                inp = {"type": "task_cancelled", "task_id": task_id}
        elif timers and roll < 0.75:
            inp = {"type": "timer_fired", "timer_id": timers[0]}
            at = max(at, due[timers[0]])
        elif dispatched and roll < 0.97:  # a late (or duplicate) success of an attempt dispatched so far
            given_up = [t for t in dispatched if t not in state["tasks"]]
            silent = [t for t in given_up if t not in answered]  # given up on (timed out, …), never heard from
            pool = silent if silent and rng.random() < 0.7 else given_up or dispatched
            inp = {"type": "task_succeeded", "task_id": rng.choice(pool), "result": {}}
        else:
            inp = {"type": "cancel_requested", "reason": "random"}
        inp["at"] = at
        if "task_id" in inp:
            answered.add(inp["task_id"])
        ended_before = state["status"] in END_STATES
        copied = copy.deepcopy(state)
        d = apply(plan, state, inp)
        again = apply(plan, json.loads(json.dumps(copied)), copy.deepcopy(inp))
        assert (again.state, again.commands, again.events) == (d.state, d.commands, d.events)
        inputs.append(inp)
        state = d.state
        commands += d.commands
        events += d.events
        dispatched += [c["task_id"] for c in d.commands if c["op"] == "dispatch"]
        due.update((c["timer_id"], c["due_at"]) for c in d.commands if c["op"] == "schedule_timer")
        undone.update(e["step"] for e in d.events if e["type"] == "compensation_succeeded")
        _check(state, d.commands, ended_before, undone)
    if state["tasks"] or state["timers"]:
        return  # cut short by the bound on inputs: nothing to say about its end
    assert state["status"] in END_STATES
    assert replay(plan, inputs) == (state, commands, events)
    event(f"status: {state['status']}")
    for e in events:
        if e["type"] == "late_completion" and e.get("after_undo"):
            event("a step completed again after its undo had begun")
        elif e["type"] == "late_completion":
            event("a late success joined the saga" if e.get("by_hand") is False else "a late success left by hand")
        elif e["type"] == "compensation_succeeded" and e.get("after_failure"):
            event("an undo that had failed for good completed late")
        elif e["type"] == "compensation_succeeded" and not e["task_id"].endswith(f"#c{e['attempt']}"):
            event("a late undo attempt completed its compensation")
