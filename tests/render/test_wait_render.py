"""Wait nodes (plan_version 3; keyed waits, plan_version 4) in every diagram form, and in a run's states.

The plans are written out by hand (:mod:`tests.render.wait_plans`). Their drawings are goldens under
``tests/render/goldens/``; after an intended change regenerate them, with every other golden, by
``make goldens`` (``pytest --update-goldens``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from flowdsl.render import RenderError, render
from flowdsl.render.runstate import check_run_of, derive_states
from flowdsl.render.view import Glyphs, PlanView
from tests.goldens import Goldens
from tests.render.wait_plans import ev, keyed_plan, keyed_run, task, wait, wait_plan, waiting_run
from tests.render.weird import weird_plan

GOLDENS = Path(__file__).with_name("goldens")
#: golden file name -> (format, options); ``run`` draws :func:`waiting_run`'s states
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "wait.mmd": ("mermaid", {}),
    "wait.ascii.txt": ("ascii", {}),
    "wait.ascii-only.txt": ("ascii", {"ascii_only": True}),
    "wait.dot": ("dot", {}),
    "wait.run.mmd": ("mermaid", {"run": True}),
    "wait.run.ascii.txt": ("ascii", {"run": True}),
    "wait.run.ascii-only.txt": ("ascii", {"run": True, "ascii_only": True}),
    "wait.run.dot": ("dot", {"run": True}),
    "keyed.mmd": ("mermaid", {}),
    "keyed.ascii.txt": ("ascii", {}),
    "keyed.ascii-only.txt": ("ascii", {"ascii_only": True}),
    "keyed.dot": ("dot", {}),
    "keyed.run.ascii.txt": ("ascii", {"run": True}),
}
#: the plan of each golden's name, and the run drawn over it: ``keyed.*`` draw :func:`keyed_plan` (:func:`keyed_run`)
PLANS = {"wait": (wait_plan, waiting_run), "keyed": (keyed_plan, keyed_run)}


def _draw(plan: dict[str, Any], fmt: str, **options: Any) -> str:
    out = render(plan, fmt, **options)
    assert isinstance(out, str)
    return out


def _line(text: str, start: str) -> str:
    return next(line.strip() for line in text.splitlines() if line.strip().startswith(start))


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str, goldens: Goldens) -> None:
    fmt, options = CASES[name]
    make_plan, make_run = PLANS[name.split(".", 1)[0]]
    plan = make_plan()
    options = dict(options)
    if options.pop("run", False):
        options["run_states"] = derive_states(plan, make_run())
    goldens.check(GOLDENS / name, _draw(plan, fmt, **options))


def test_the_text_of_a_wait_names_its_signal_deadline_and_failure_rule() -> None:
    view = PlanView(wait_plan())
    uni, plain = Glyphs.pick(False), Glyphs.pick(True)
    signal = view.step_text("payment_confirmed", uni)
    assert (signal.title, signal.lines, signal.policy) == (
        "⚐ payment_confirmed", ("wait for signal 'payment_confirmed'", "The payment provider's webhook"), "up to 30m")
    approval = view.step_text("approval", uni)
    assert approval.lines[0] == "wait for signal 'manager_approved'"
    assert approval.policy == "up to 1h · on failure: continue"
    assert view.step_text("approval", plain).policy == "up to 1h, on failure: continue"
    timer = view.step_text("cooling_off", plain)
    assert (timer.title, timer.lines[0], timer.policy) == ("[wait] cooling_off", "wait 2h", None)
    assert view.step_text("settle", uni, needs=True).lines == ("wait 15m",)


def test_a_signal_wait_without_a_deadline_says_none() -> None:
    plan = wait_plan()
    plan["nodes"]["payment_confirmed"]["timeout_ms"] = None
    text = PlanView(plan).step_text("payment_confirmed", Glyphs.pick(False))
    assert text.policy is None and text.lines[0] == "wait for signal 'payment_confirmed'"


def test_every_form_draws_a_wait_apart_from_a_step() -> None:
    plan = wait_plan()
    mermaid = _draw(plan, "mermaid")
    assert _line(mermaid, "w_payment__confirmed").startswith('w_payment__confirmed>"<b>⚐ payment_confirmed</b>')
    assert "<i>up to 1h · on failure: continue</i>" in _line(mermaid, "w_approval")
    assert _line(mermaid, "class w_") == "class w_payment__confirmed,w_approval,w_cooling__off,w_settle wait"
    assert "worker" not in mermaid and "↻" not in mermaid and "◷" not in mermaid
    dot = _draw(plan, "dot")
    assert _line(dot, '"wait:cooling_off"').startswith('"wait:cooling_off" [shape=box, style="filled,diagonals"')
    assert _line(dot, '"step:ship_order"').startswith('"step:ship_order" [shape=box, style="rounded,filled"')
    art = _draw(plan, "ascii")
    assert "│ ⚐ payment_confirmed" in art and "│ wait 2h" in art and "│ up to 30m" in art
    assert "◷" not in art  # the key explains no per-attempt timeout: a wait's deadline is written out
    plain = _draw(plan, "ascii", ascii_only=True)
    assert plain.isascii() and "| [wait] cooling_off" in plain and "| up to 1h, on failure: continue" in plain


def test_waits_take_no_part_in_compensation() -> None:
    """A wait changes nothing: no undo box, and the rollback goes from the step after it to the step before."""
    view = PlanView(wait_plan())
    assert view.compensated_steps() == ["process_payment", "ship_order"]
    assert view.rollback_edges() == [("ship_order", "process_payment")]
    assert "u_payment" not in _draw(wait_plan(), "mermaid")


@pytest.mark.parametrize("width", [40, 50, 60, 80, 120])
def test_waits_fit_the_width(width: int) -> None:
    for make_plan, make_run in PLANS.values():
        for ascii_only in (False, True):
            for states in (None, derive_states(make_plan(), make_run())):
                art = _draw(make_plan(), "ascii", width=width, ascii_only=ascii_only, run_states=states)
                assert max(len(line) for line in art.splitlines()) <= width, (width, ascii_only)


def test_a_wait_in_a_needs_list_says_what_it_needs() -> None:
    nodes = [task("charge", 0, 0), wait("confirmed", 1, 1, signal="paid", deps=["charge"]),
             task("reserve", 2, 1, deps=["charge"]), task("ship", 3, 2, deps=["confirmed", "reserve"])]
    plan = {**wait_plan(), "root": [n["key"] for n in nodes], "nodes": {n["key"]: n for n in nodes}}
    art = _draw(plan, "ascii")
    box = [line for line in art.splitlines() if "⚐ confirmed" in line or "wait for signal 'paid'" in line]
    assert len(box) == 2
    assert art.count("needs: charge") == 2 and "needs: confirmed, reserve" in art
    assert '"wait:confirmed" -> "step:ship";' in _draw(plan, "dot")


def test_plan_versions_3_and_4_are_drawn_and_a_later_one_refused() -> None:
    assert _draw(wait_plan(), "mermaid") and _draw(keyed_plan(), "mermaid")
    with pytest.raises(RenderError, match="unsupported plan_version 5; this renderer draws versions 1 to 4"):
        render({**keyed_plan(), "plan_version": 5}, "ascii")


def test_a_keyed_wait_says_by_key_and_its_key() -> None:
    view = PlanView(keyed_plan())
    delivered = view.step_text("delivered", Glyphs.pick(False))
    assert (delivered.title, delivered.lines, delivered.policy) == (
        "⚐ delivered (by key)", ("wait for signal 'delivered'", "key: $parcel.tracking",
                                 "The carrier's delivery callback"), "up to 336h")
    paid = view.step_text("paid", Glyphs.pick(True))
    assert (paid.title, paid.lines, paid.policy) == ("[wait] paid (by key)", ("wait for signal 'paid'",
                                                                               "key: order.reference"), None)
    assert '<b>⚐ delivered (by key)</b><br/>wait for signal \'delivered\'<br/>key: $parcel.tracking' in \
        _line(_draw(keyed_plan(), "mermaid"), "w_delivered")
    assert "label=<<B>⚐ paid (by key)</B><BR/>wait for signal &#x27;paid&#x27;<BR/>key: order.reference>" in \
        _draw(keyed_plan(), "dot")
    plain = _draw(keyed_plan(), "ascii", ascii_only=True)
    assert plain.isascii() and "| [wait] delivered (by key)" in plain and "| key: $parcel.tracking" in plain
    # a wait keyed by nothing is drawn as before
    assert "by key" not in _draw(wait_plan(), "ascii") and "key:" not in _draw(wait_plan(), "mermaid")


def test_a_keyed_wait_whose_instances_wait_is_waiting() -> None:
    plan = keyed_plan()
    events = keyed_run()
    check_run_of(plan, events, source="r-wait")
    states = derive_states(plan, events)
    assert states.steps["delivered"] == "waiting" and states.steps["parcels"] == "running"
    assert states.steps["confirm"] == "succeeded" and states.steps["paid"] == "pending"
    assert "‖ ⚐ delivered (by key) ×2" in _draw(plan, "ascii", run_states=states)


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_graphviz_lays_out_waits() -> None:
    plan = wait_plan()
    svg = _draw(plan, "svg", run_states=derive_states(plan, waiting_run()))
    assert "wait for signal &#39;payment_confirmed&#39;" in svg or "wait for signal 'payment_confirmed'" in svg


# --- run states ----------------------------------------------------------------------------------


def test_a_wait_that_has_started_is_waiting() -> None:
    plan = wait_plan()
    events = waiting_run()
    check_run_of(plan, events, source="r-wait")
    states = derive_states(plan, events)
    assert states.status == "running"
    assert states.steps["process_payment"] == states.steps["payment_confirmed"] == "succeeded"
    assert states.steps["approval"] == "passed_over"  # its WaitTimeout, with on_failure: continue
    assert states.steps["cooling_off"] == "waiting"
    assert states.steps["checks"] == "running"  # a group holding a waiting node runs
    assert states.steps["ship_order"] == states.steps["settle"] == "pending"


def test_signal_events_change_no_state() -> None:
    plan = wait_plan()
    base = [ev("run_started"), ev("step_started", "process_payment")]
    noise = [{"type": "signal", "name": "manager_approved", "payload": None, "at": 0},
             ev("signal_buffered", None, signal="manager_approved", wait="approval"),
             ev("signal_rejected", None, signal="nobody", reason="no wait of flow wait_for_it takes signal 'nobody'")]
    assert derive_states(plan, [*base, *noise]).steps == derive_states(plan, base).steps


def test_an_ended_run_leaves_no_wait_waiting() -> None:
    """Cancelled while it waited (its step_cancelled), or left running by a run that ended: cancelled."""
    plan = wait_plan()
    started = [ev("run_started"), ev("step_succeeded", "process_payment"),
               ev("step_started", "payment_confirmed", signal="payment_confirmed", wait_ms=1_800_000)]
    assert derive_states(plan, started).steps["payment_confirmed"] == "waiting"
    cancelled = [*started, ev("step_cancelled", "payment_confirmed"),
                 ev("compensation_started", "process_payment"), ev("compensation_succeeded", "process_payment"),
                 ev("run_finished", status="cancelled")]
    states = derive_states(plan, cancelled)
    assert states.steps["payment_confirmed"] == "cancelled" and states.steps["process_payment"] == "compensated"
    ended = derive_states(plan, [*started, ev("run_finished", status="failed")])
    assert ended.steps["payment_confirmed"] == "cancelled"


def test_a_wait_that_timed_out_failed_and_a_skipped_one() -> None:
    plan = wait_plan()
    events = [ev("run_started"), ev("step_succeeded", "process_payment"),
              ev("step_started", "payment_confirmed", signal="payment_confirmed", wait_ms=1_800_000),
              ev("step_failed", "payment_confirmed",
                 error={"type": "WaitTimeout", "message": "no signal 'payment_confirmed' came within 30m"}),
              ev("step_skipped", "approval")]
    states = derive_states(plan, events)
    assert states.steps["payment_confirmed"] == "failed" and states.steps["approval"] == "skipped"
    art = _draw(plan, "ascii", run_states=states)
    assert "✗ ⚐ payment_confirmed" in art and "⊘ ⚐ approval" in art


def test_iterations_of_a_timer_wait_aggregate_onto_it() -> None:
    plan = wait_plan()
    events = [ev("step_started", "notify_watchers[0]/settle", node="settle"),
              ev("step_succeeded", "notify_watchers[0]/settle", node="settle"),
              ev("step_started", "notify_watchers[1]/settle", node="settle")]
    states = derive_states(plan, events)
    assert states.steps["settle"] == "waiting" and states.iterations["settle"] == 2
    assert "‖ ⚐ settle ×2" in _draw(plan, "ascii", run_states=states)
    failed = derive_states(plan, [*events, ev("step_failed", "notify_watchers[2]/settle", node="settle")])
    assert failed.steps["settle"] == "failed"


def test_waiting_is_drawn_apart_from_running_in_every_form() -> None:
    plan = wait_plan()
    states = {"process_payment": "running", "cooling_off": "running", "payment_confirmed": "waiting"}
    mermaid = _draw(plan, "mermaid", run_states=states)  # a plain mapping: a wait given as running waits
    assert _line(mermaid, "class w_payment__confirmed,w_cooling__off") == \
        "class w_payment__confirmed,w_cooling__off,legend_waiting st_waiting"
    assert _line(mermaid, "class s_process__payment") == "class s_process__payment,legend_running st_running"
    assert "classDef st_waiting fill:#ccfbf1" in mermaid and 'legend_waiting["waiting"]' in mermaid
    dot = _draw(plan, "dot", run_states=states)
    assert 'fillcolor="#ccfbf1", color="#0f766e"' in _line(dot, '"wait:cooling_off"')
    assert 'fillcolor="#dbeafe"' in _line(dot, '"step:process_payment"') and '"legend:waiting"' in dot
    art = _draw(plan, "ascii", run_states=states)
    assert "‖ ⚐ cooling_off" in art and "▶ process_payment" in art and "‖ waiting" in art
    plain = _draw(plan, "ascii", run_states=states, ascii_only=True)
    assert "[waiting] [wait] cooling_off" in plain and "[running] process_payment" in plain


def test_legends_show_waiting_only_where_something_can_wait() -> None:
    """A plan without waits keeps its legend as it was; one given a waiting node shows the state."""
    plan = weird_plan()
    for states in ({"end": "running"}, {"end": "waiting"}):
        shown = "waiting" in states.values()
        assert ('legend_waiting["waiting"]' in _draw(plan, "mermaid", run_states=states)) is shown
        assert ('"legend:waiting"' in _draw(plan, "dot", run_states=states)) is shown
        assert ("‖ waiting" in _draw(plan, "ascii", run_states=states)) is shown
    assert 'legend_waiting["waiting"]' in _draw(wait_plan(), "mermaid", run_states={})


# --- a compiled flow run by the kernel -----------------------------------------------------------

WAITING_FLOW = """
flowdsl: 1
name: waits_run
steps:
  - charge: {compensate: refund}
  - wait: paid
    timeout: 30m
  - parallel: before_shipping
    branches:
      - wait: cooling_off
        for: 2h
      - wait: approval
        signal: approved
        timeout: 1h
        on_failure: continue
  - ship
"""


def _run(plan: dict[str, Any], hold: set[str], *, first: tuple[dict[str, Any], ...] = (),
         then: tuple[dict[str, Any], ...] = ()) -> tuple[str, list[dict[str, Any]]]:
    """Drive ``plan`` through the kernel: the input events ``first`` (signals, a cancel), then every task
    succeeds and every timer fires but those of the wait nodes in ``hold``; once nothing more happens, the
    events ``then``, and the same again. The run's status and events."""
    from flowdsl.kernel import apply, start_run

    decision = start_run(plan, "r-e2e", {}, at=0)
    state, events, queue = decision.state, list(decision.events), list(decision.commands)
    inputs, later = list(first), list(then)
    while inputs or queue or later:
        if not inputs and not queue:
            inputs, later = later, []
        if inputs:
            event = inputs.pop(0)
        else:
            cmd = queue.pop(0)
            if cmd["op"] == "dispatch":
                event = {"type": "task_succeeded", "task_id": cmd["task_id"], "at": 1, "result": {}}
            elif cmd["op"] == "schedule_timer" and cmd.get("step") not in hold:
                event = {"type": "timer_fired", "timer_id": cmd["timer_id"], "at": 1}
            else:
                continue
        decision = apply(plan, state, event)
        state = decision.state
        events.extend(decision.events)
        queue.extend(decision.commands)
    return state["status"], events


def test_a_compiled_flow_run_by_the_kernel_is_drawn_waiting() -> None:
    """Its signal sent before its wait started (kept, then taken), the approval's deadline passed (passed over),
    the cooling-off timer not yet due: the run waits."""
    import flowdsl

    plan = flowdsl.compile_text(WAITING_FLOW)
    assert plan["plan_version"] == 3
    status, events = _run(plan, {"cooling_off"}, first=({"type": "signal", "name": "paid", "payload": None, "at": 0},))
    assert status == "running"
    states = derive_states(plan, events)
    assert states.steps == {"charge": "succeeded", "paid": "succeeded", "before_shipping": "running",
                            "cooling_off": "waiting", "approval": "passed_over", "ship": "pending"}
    art = _draw(plan, "ascii", run_states=states)
    assert "‖ ⚐ cooling_off" in art and "↷ ⚐ approval" in art and "✓ ⚐ paid" in art
    assert _line(_draw(plan, "mermaid", run_states=states), "class w_cooling__off") == \
        "class w_cooling__off,legend_waiting st_waiting"


def test_a_compiled_flow_cancelled_while_it_waits() -> None:
    import flowdsl

    plan = flowdsl.compile_text(WAITING_FLOW)
    status, events = _run(plan, {"paid"}, then=({"type": "cancel_requested", "at": 2},))
    assert status == "cancelled"
    states = derive_states(plan, events)
    assert states.steps["paid"] == "cancelled" and states.steps["charge"] == "compensated"
    assert states.undos == {"charge": "compensated"} and states.steps["cooling_off"] == "pending"
