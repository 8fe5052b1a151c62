"""Run states: derived from a run's events, aggregated over for_each iterations, drawn in every form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowdsl.render import RunStates, render
from flowdsl.render.runstate import derive_states, node_of, read_events, record_plan
from flowdsl.runtime.record import RecordError
from tests.render.cases import CONFORMANCE, EXAMPLES, compile_plan, simulate

ECOMMERCE = EXAMPLES / "ecommerce_order" / "flow.yaml"
VALID_ORDER = {"order": {"id": "o-1", "customer_id": "c-1", "items": [{"product_id": "p", "quantity": 1,
                                                                     "price": 5.0}], "total_amount": 5.0}}


def ev(type_: str, step: str | None = None, **extra: object) -> dict[str, object]:
    return {"type": type_, "step": step, "run_id": "r-1", "at": 0, **extra}


def test_node_of_maps_instances_to_plan_keys() -> None:
    keys = {"charge_lines", "charge_line", "wrap", "wrap/each", "wrap/item_step"}
    assert node_of("charge_lines[2]/charge_line", keys) == "charge_line"
    assert node_of("charge_lines[2]", keys) == "charge_lines"
    assert node_of("wrap/each[0]/wrap/item_step", keys) == "wrap/item_step"
    assert node_of("outer[1]/inner[3]/charge_line", keys) == "charge_line"
    assert node_of("nowhere", keys) is None


def test_compensated_run_on_the_ecommerce_saga() -> None:
    plan = compile_plan(ECOMMERCE)
    state, events = simulate(plan, fail={"process_payment"}, run_input=VALID_ORDER)
    assert state["status"] == "compensated"
    states = derive_states(plan, events)
    assert states.run_id == "r-test" and states.status == "compensated"
    assert states.steps["validate_order"] == "succeeded"
    assert states.steps["check_inventory"] == "compensated"
    assert states.steps["process_payment"] == "failed"
    assert states.steps["generate_confirmation"] == "pending"
    assert states.undos == {"check_inventory": "compensated"}


def test_for_each_iterations_aggregate_onto_their_node() -> None:
    plan = compile_plan(CONFORMANCE / "for_each.yaml")
    run_input = {"order": {"lines": [{"sku": "a", "price": 1, "quantity": 1}] * 3, "watchers": []}}
    state, events = simulate(plan, run_input=run_input)
    assert state["status"] == "completed"
    states = derive_states(plan, events)
    assert states.steps["charge_line"] == "succeeded" and states.iterations["charge_line"] == 3
    assert states.steps["notify_every_watcher_of_the_order"] == "succeeded"  # an empty loop succeeds at once
    assert states.steps["notify_watcher"] == "pending"  # ... and its body never ran
    worse = [*events, ev("step_failed", "charge_each_line[1]/charge_line", node="charge_line")]
    assert derive_states(plan, worse).steps["charge_line"] == "failed"


def test_switch_cases_not_taken_are_skipped() -> None:
    plan = compile_plan(CONFORMANCE / "switch.yaml")
    state, events = simulate(plan, run_input={"order": {"shipping": "express", "priority": 7, "gift": True}})
    assert state["status"] == "completed"
    states = derive_states(plan, events)
    assert states.steps["book_courier"] == states.steps["ship_express"] == "succeeded"
    assert states.steps["ship_standard"] == states.steps["ship_standard_default"] == "skipped"
    assert states.steps["page_on_call"] == "skipped" and states.steps["add_gift_note"] == "succeeded"


def test_states_of_an_unfinished_run_and_of_a_cancelled_one() -> None:
    plan = compile_plan(ECOMMERCE)
    events = [ev("run_started"), ev("step_succeeded", "validate_order"), ev("step_started", "check_inventory"),
              ev("step_retrying", "check_inventory"), ev("compensation_started", "process_payment")]
    states = derive_states(plan, events)
    assert states.status == "running"
    assert states.steps["check_inventory"] == "running" and states.undos["process_payment"] == "running"
    finished = [*events, ev("step_cancelled", "check_inventory"), ev("compensation_failed", "process_payment"),
                ev("run_finished", status="needs_intervention")]
    states = derive_states(plan, finished)
    assert states.steps["check_inventory"] == "cancelled"
    assert states.undos["process_payment"] == "failed" and states.caption() == "run r-1: needs_intervention"


def test_events_without_node_or_for_unknown_steps_are_tolerated() -> None:
    plan = compile_plan(ECOMMERCE)
    events = [{"type": "step_succeeded", "step": "validate_order"}, {"type": "task_succeeded", "task_id": "x"},
              {"type": "step_failed", "step": "no_such_step"}, {"type": "mystery", "step": "validate_order"}]
    assert derive_states(plan, events).steps["validate_order"] == "succeeded"


def test_plain_mapping_is_accepted_and_checked() -> None:
    plan = compile_plan(ECOMMERCE)
    out = render(plan, "mermaid", run_states={"validate_order": "failed"})
    assert isinstance(out, str) and _classes(out)["s_validate__order"] == "st_failed"
    with pytest.raises(ValueError, match="unknown run state"):
        render(plan, "mermaid", run_states={"validate_order": "exploded"})


def test_every_form_shows_the_states() -> None:
    plan = compile_plan(ECOMMERCE)
    _, events = simulate(plan, fail={"process_payment"}, run_input=VALID_ORDER)
    states = derive_states(plan, events)
    mermaid = render(plan, "mermaid", run_states=states)
    assert isinstance(mermaid, str)
    classes = _classes(mermaid)
    assert classes["s_process__payment"] == "st_failed"
    assert classes["s_check__inventory"] == classes["u_check__inventory"] == "st_compensated"
    assert classes["s_validate__order"] == "st_succeeded" and classes["l_generate__confirmation"] == "st_pending"
    assert classes["u_process__payment"] == "undo"  # never started: drawn as a plain undo box
    assert 'run_legend["<b>run r-test: compensated</b>"]' in mermaid
    dot = render(plan, "dot", run_states=states)
    assert isinstance(dot, str)
    assert '"step:process_payment" [' in dot and 'fillcolor="#fee2e2"' in _line_of(dot, '"step:process_payment" [')
    assert 'fillcolor="#ede9fe"' in _line_of(dot, '"step:check_inventory" [')
    text = render(plan, "ascii", run_states=states)
    assert "✗ process_payment" in text and "↺ check_inventory" in text and "· fulfill_order" in text
    assert "run r-test: compensated\n" in text
    plain = render(plan, "ascii", run_states=states, ascii_only=True)
    assert "[FAILED] process_payment" in plain and "[undone] check_inventory" in plain


def _classes(mermaid: str) -> dict[str, str]:
    """Mermaid node id -> the class a ``class a,b name`` statement gives it."""
    out: dict[str, str] = {}
    for line in mermaid.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "class":
            out.update(dict.fromkeys(parts[1].split(","), parts[2]))
    return out


def _line_of(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.strip().startswith(start))


def test_read_events_skips_the_header_and_reports_bad_lines(tmp_path: Path) -> None:
    plan = compile_plan(ECOMMERCE)
    record = tmp_path / "r-1.jsonl"
    lines = [{"type": "record", "plan": plan, "input": {}}, ev("run_started"), ev("step_succeeded", "validate_order")]
    record.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    assert [e["type"] for e in read_events(record)] == ["run_started", "step_succeeded"]
    assert record_plan(record) == plan
    record.write_text(json.dumps(ev("run_started")) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(RecordError, match=r"r-1.jsonl:2: not a JSON line"):
        read_events(record)
    assert record_plan(record) is None
    with pytest.raises(RecordError, match="no run record"):
        read_events(tmp_path / "missing.jsonl")


def test_runstates_caption() -> None:
    assert RunStates(steps={}).caption() == "run"
    assert RunStates(steps={}, run_id="r-9", status="completed").caption() == "run r-9: completed"


def test_a_step_the_run_went_on_without_is_drawn_passed_over() -> None:
    """``on_failure: continue``: the email that failed after the order shipped is not drawn as a failure of the
    run — a state of its own, in every form and in the legend."""
    plan = compile_plan(ECOMMERCE)
    state, events = simulate(plan, fail={"notify_customer"}, run_input=VALID_ORDER)
    assert state["status"] == "completed"
    states = derive_states(plan, events)
    assert states.steps["notify_customer"] == "passed_over" and states.steps["fulfill_order"] == "succeeded"
    ascii_art = str(render(plan, "ascii", run_states=states))
    assert "↷ notify_customer" in ascii_art and "↷ passed over" in ascii_art
    assert "[passed over] notify_customer" in str(render(plan, "ascii", run_states=states, ascii_only=True))
    mermaid = str(render(plan, "mermaid", run_states=states))
    assert 'legend_passed_over["passed over"]' in mermaid and "st_passed_over" in mermaid
    assert '"#fefce8"' in str(render(plan, "dot", run_states=states))
