"""Kernel properties over random plans: sequences, parallel groups and needs DAGs, with random step
failures, compensation failures and cancellation."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flowdsl.expr import builtin_functions
from flowdsl.kernel import END_STATES, prepare
from tests.kernel.plans import plan_of
from tests.kernel.sim import Sim, fail, ok

Tree = tuple[Any, ...]
builtin_functions()  # loads jsonata, which raises the recursion limit once: before hypothesis watches it

trees: st.SearchStrategy[Tree] = st.recursive(
    st.tuples(st.just("task"), st.booleans()),
    lambda inner: st.one_of(
        st.tuples(st.just("seq"), st.lists(inner, min_size=1, max_size=3)),
        st.tuples(st.just("par"), st.lists(inner, min_size=1, max_size=3)),
        st.tuples(st.just("dag"), st.lists(inner, min_size=2, max_size=4), st.randoms(use_true_random=False)),
    ),
    max_leaves=9,
)


def build(tree: Tree, names: itertools.count, tasks: dict[str, bool]) -> tuple[str, Any]:
    """(id, spec node) for a tree; ``tasks`` collects each step id and whether it can be undone."""
    kind = tree[0]
    name = f"n{next(names)}"
    if kind == "task":
        tasks[name] = tree[1]
        comp = {"worker": f"undo_{name}", "retry": {"attempts": 2, "initial": "1ms"}}
        return name, {name: {"compensate": comp}} if tree[1] else name
    children = [build(child, names, tasks) for child in tree[1]]
    if kind == "par":
        return name, {"parallel": name, "branches": [node for _, node in children]}
    nodes = []
    rank = list(range(len(children)))
    if kind == "dag":
        tree[2].shuffle(rank)  # a topological order that need not follow the written one
    for i, (child_id, node) in enumerate(children):
        if kind == "dag":
            needs = sorted(cid for j, (cid, _) in enumerate(children) if rank[j] < rank[i] and tree[2].random() < 0.5)
            node = _with_needs(child_id, node, needs)
        nodes.append(node)
    return name, {"sequence": name, "steps": nodes}


def expected_inputs(plan: dict[str, Any], results: dict[str, dict[str, Any]], steps: set[str]
                    ) -> dict[str, dict[str, Any]]:
    """The merge rule, computed the slow way: input plus the results of every step that must have
    finished before a step started, in plan order."""
    nodes = plan["nodes"]
    parent = {k: n["parent"] for k, n in nodes.items()}

    def steps_inside(key: str) -> list[str]:
        if nodes[key]["kind"] == "task":
            return [key]
        return [s for kid in nodes[key]["children"] for s in steps_inside(kid)]

    def before(key: str) -> set[str]:
        found: set[str] = set()
        for dep in nodes[key]["deps"]:
            found |= set(steps_inside(dep)) | before(dep)
        if parent[key] is not None:
            found |= before(parent[key])
        return found

    out = {}
    for key in steps:
        ctx: dict[str, Any] = {}
        for dep in sorted(before(key), key=lambda k: nodes[k]["order"]):
            ctx.update(results.get(dep, {}))
        out[key] = ctx
    return out


def _with_needs(child_id: str, node: Any, needs: list[str]) -> Any:
    if isinstance(node, str):
        return {child_id: {"needs": needs}}
    if "sequence" in node or "parallel" in node:
        return {**node, "needs": needs}
    return {child_id: {**node[child_id], "needs": needs}}


def draw_script(tasks: dict[str, bool], data: st.DataObject, result_of: Callable[[str, int], Any]
                ) -> dict[str, Any]:
    """A random outcome for every step (ok, flaky, failing) and its compensation (ok, flaky, broken)."""
    script: dict[str, Any] = {}
    for step in tasks:
        how, after, cancellable = data.draw(step_outcome, label=step)
        result = result_of(step, after)
        script[step] = {"ok": ok(result, after, cancellable),
                        "flaky": [fail("Flaky", after=after), ok(result, after, cancellable)],
                        "fail": fail("Broken", after=after, cancellable=cancellable)}[how]
        comp = data.draw(comp_outcome, label=f"{step}/compensate")
        script[step + "/compensate"] = {"ok": ok(after=3), "flaky": [fail("Busy", after=2), ok(after=3)],
                                        "broken": fail("Down", after=2)}[comp]
    return script


step_outcome = st.tuples(st.sampled_from(["ok", "ok", "ok", "flaky", "fail"]), st.integers(1, 40), st.booleans())
comp_outcome = st.sampled_from(["ok", "ok", "ok", "flaky", "broken"])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees, data=st.data())
def test_random_flows_end_right_and_undo_exactly_what_completed(tree: Tree, data: st.DataObject) -> None:
    tasks: dict[str, bool] = {}
    _, root = build(tree, itertools.count(), tasks)
    plan = plan_of([root])
    script = draw_script(tasks, data, lambda step, after: {step: after, "shared": step})
    cancel_at = data.draw(st.one_of(st.none(), st.integers(1000, 1100)), label="cancel_at")
    sim = Sim(plan, script, cancel_at=cancel_at).run()

    assert sim.status in END_STATES
    event(f"status: {sim.status}")
    if "full" in prepare(plan).derive.values():
        event("a context derived from its whole closure")
    nodes = sim.state["nodes"]
    completed = {s for s in tasks if s in nodes and nodes[s]["status"] == "succeeded"}
    compensable = {s for s in completed if tasks[s]}
    failed_steps = [s for s in tasks if s in nodes and nodes[s]["status"] == "failed"]
    cancelled = sim.state["abort"] == "cancelled"

    results = {s: nodes[s]["result"] for s in completed}
    expected = expected_inputs(plan, results, {d["step"] for d in sim.dispatches})
    for d in sim.dispatches:
        if d["kind"] == "task":
            assert d["input"] == expected[d["step"]], d["step"]
        else:
            assert d["input"] == {**expected[d["step"]], **results[d["step"]]}, d["step"]

    if not failed_steps and not cancelled:
        assert sim.status == "completed"
        assert completed == set(tasks)
        assert not sim.of("compensation_started")
        final: dict[str, Any] = {}
        for step in sorted(tasks, key=lambda k: plan["nodes"][k]["order"]):
            final.update(results[step])
        assert sim.state["context"] == final
        return

    started = set(sim.steps("compensation_started"))
    undone = sim.undone()
    assert started <= compensable
    assert len(undone) == len(set(undone)), "a step was undone twice"
    left = [s["step"] for s in (sim.state["intervention"] or {"steps": []})["steps"]]
    assert set(undone) | set(left) == compensable and not set(undone) & set(left)
    if left:
        assert sim.status == "needs_intervention"
        assert any(s["status"] == "failed" for s in sim.state["intervention"]["steps"])
    elif cancelled:
        assert sim.status == "cancelled"
    else:
        assert sim.status == ("compensated" if compensable else "failed")

    position = {id(e): i for i, e in enumerate(sim.events)}

    def first(type_: str, step: str) -> int | None:
        found = sim.of(type_, step=step)
        return position[id(found[0])] if found else None

    for a in compensable:
        for b in compensable - {a}:
            if first("step_succeeded", a) < first("step_started", b):  # a completed before b started
                comp_a = first("compensation_started", a)
                if comp_a is not None:
                    done_b = first("compensation_succeeded", b)
                    assert done_b is not None and done_b < comp_a, f"{a} undone before {b}"
    for d in sim.dispatches:
        if d["kind"] == "compensate":
            assert d["steps_in_flight"] == [], "compensating while steps still run"


def _passing_over(node: Any, passed: set[str]) -> Any:
    """The spec node with ``on_failure: continue`` on each of its steps in ``passed``."""
    if isinstance(node, str):
        return {node: {"on_failure": "continue"}} if node in passed else node
    for kw, key in (("sequence", "steps"), ("parallel", "branches")):
        if kw in node:
            return {**node, key: [_passing_over(child, passed) for child in node[key]]}
    (name, opts), = node.items()
    return {name: {**opts, "on_failure": "continue"}} if name in passed else node


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees, data=st.data())
def test_random_flows_pass_over_the_steps_that_may_fail_and_complete(tree: Tree, data: st.DataObject) -> None:
    """Kernel rules 8: steps with ``on_failure: continue`` fail (or not), every other step succeeds — the run
    completes, undoes nothing, and each step saw exactly the results of the steps before it that succeeded."""
    tasks: dict[str, bool] = {}
    _, root = build(tree, itertools.count(), tasks)
    passed = {step for step in tasks if data.draw(st.booleans(), label=f"{step} may fail")}
    plan = plan_of([_passing_over(root, passed)])
    script = draw_script(tasks, data, lambda step, after: {step: after, "shared": step})
    for step in set(tasks) - passed:
        script[step] = ok({step: 1, "shared": step}, 5)
    sim = Sim(plan, script).run()

    assert sim.status == "completed" and not sim.of("compensation_started")
    nodes = sim.state["nodes"]
    completed = {s for s in tasks if nodes[s]["status"] == "succeeded"}
    failed = {s for s in tasks if nodes[s]["status"] == "failed"}
    assert completed | failed == set(tasks) and failed <= passed
    assert all(nodes[s].get("continued") is True for s in failed)
    event(f"{len(failed)} of {len(tasks)} steps passed over")
    results = {s: nodes[s]["result"] for s in completed}
    expected = expected_inputs(plan, results, {d["step"] for d in sim.dispatches})
    for d in sim.dispatches:
        assert d["input"] == expected[d["step"]], d["step"]
    final: dict[str, Any] = {}
    for step in sorted(completed, key=lambda k: plan["nodes"][k]["order"]):
        final.update(results[step])
    assert sim.state["context"] == final


def _waiting(node: Any, waits: dict[str, dict[str, Any]]) -> Any:
    """The spec node with each step in ``waits`` turned into that wait node (its ``needs`` kept)."""
    if isinstance(node, str):
        return {"wait": node, **waits[node]} if node in waits else node
    for kw, key in (("sequence", "steps"), ("parallel", "branches")):
        if kw in node:
            return {**node, key: [_waiting(child, waits) for child in node[key]]}
    (name, opts), = node.items()
    if name not in waits:
        return node
    return {"wait": name, **waits[name], **({"needs": opts["needs"]} if "needs" in opts else {})}


wait_kind = st.sampled_from(["timer", "signal", "signal", "signal with timeout", "signal with timeout"])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees, data=st.data())
def test_random_flows_with_waits_take_each_signal_once_and_stop_waiting_when_they_end(tree: Tree,
                                                                                      data: st.DataObject) -> None:
    """Kernel rules 9: steps turned into waits (timers, signal waits with and without a deadline), signals sent at
    random times (some twice, some never, some unknown), random step failures and a cancel — every signal gets
    exactly one answer, a wait ends only by its signal, its timer, its deadline or the run's abort, and a run left
    running is one that waits for a signal nothing sent."""
    tasks: dict[str, bool] = {}
    _, root = build(tree, itertools.count(), tasks)
    waits: dict[str, dict[str, Any]] = {}
    signals: list[tuple[int, str, Any]] = []
    for step in tasks:
        if not data.draw(st.booleans(), label=f"{step} is a wait"):
            continue
        kind = data.draw(wait_kind, label=f"{step} wait")
        if kind == "timer":
            waits[step] = {"for": f"{data.draw(st.integers(1, 60))}ms"}
        else:
            deadline = {"timeout": f"{data.draw(st.integers(1, 60))}ms"} if "timeout" in kind else {}
            waits[step] = {"output": f"got_{step}", **deadline}
        if kind != "timer":
            for _ in range(data.draw(st.integers(0, 2), label=f"signals for {step}")):
                signals.append((data.draw(st.integers(1000, 1150)), step, {"n": len(signals)}))
    if data.draw(st.booleans(), label="an unknown signal"):
        signals.append((1050, "nobody_waits", {}))
    for step in waits:
        del tasks[step]
    plan = plan_of([_waiting(root, waits)])
    script = draw_script(tasks, data, lambda step, after: {step: after})
    cancel_at = data.draw(st.one_of(st.none(), st.integers(1000, 1200)), label="cancel_at")
    sim = Sim(plan, script, cancel_at=cancel_at, signals=signals).run()

    answers = (sim.of("signal_buffered") + sim.of("signal_rejected")
               + [e for e in sim.of("signal_received") if not e["buffered"]])
    assert len(answers) == len(signals), "a signal without exactly one answer"
    assert len(sim.of("signal_received")) == len({e["step"] for e in sim.of("signal_received")})
    nodes = sim.state["nodes"]
    for step, spec in waits.items():
        rec = nodes.get(step)
        if rec is None or rec["status"] in ("skipped", "pending"):
            continue
        if rec["status"] == "succeeded":
            if "for" in spec:
                assert rec["finished_at"] - rec["started_at"] == int(spec["for"][:-2])
            else:
                got = sim.of("signal_received", step=step)
                assert len(got) == 1 and got[0]["sent_at"] <= rec["finished_at"]
                assert sim.state["context"] is None or sim.state["context"][f"got_{step}"] == rec["result"]
        elif rec["status"] == "failed":
            assert rec["error"]["type"] == "WaitTimeout" and "timeout" in spec
            assert rec["finished_at"] - rec["started_at"] == int(spec["timeout"][:-2])
        elif rec["status"] == "running":
            assert sim.status == "running" and "for" not in spec and "timeout" not in spec
            assert not any(name == step for _, name, _ in signals), "a signal its wait never took"
    if sim.status == "running":
        event("left waiting for a signal")
        assert sim.state["waits"] and all(w["timer"] is None for w in sim.state["waits"].values())
        assert not sim.state["tasks"] and not sim.state["timers"] and cancel_at is None
        return
    assert sim.status in END_STATES
    event(f"status: {sim.status}")
    assert not sim.state.get("waits"), "a wait still waits after the run ended"
    assert not sim.state["timers"]
    undone = sim.undone()
    assert len(undone) == len(set(undone))
    completed = {s for s in tasks if s in nodes and nodes[s]["status"] == "succeeded" and tasks[s]}
    if sim.status in ("compensated", "cancelled"):
        assert set(undone) == completed
