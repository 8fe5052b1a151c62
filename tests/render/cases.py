"""Shared cases for the renderer tests: the specs to draw, where their goldens live, a nasty spec,
and a small driver that runs a plan through the kernel to record a run's events."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flowdsl.render import EXTENSIONS

ROOT = Path(__file__).resolve().parents[2]
CONFORMANCE = ROOT / "specs" / "conformance" / "valid"
EXAMPLES = ROOT / "examples"
#: the text formats that have goldens, and their file suffixes
TEXT_FORMATS = {fmt: EXTENSIONS[fmt] for fmt in ("mermaid", "ascii", "dot")}


def conformance_specs() -> list[Path]:
    """Every valid conformance spec (sub-flow files under lib/ are not cases on their own)."""
    return sorted(CONFORMANCE.glob("*.yaml"))


def example_specs() -> list[Path]:
    return sorted(EXAMPLES.glob("*/flow.yaml"))


def golden_path(spec: Path, fmt: str) -> Path:
    """``specs/conformance/valid/<name>.mmd`` beside a case; ``examples/<name>/diagrams/flow.mmd`` for examples."""
    suffix = TEXT_FORMATS[fmt]
    if spec.parent.parent == EXAMPLES:
        return spec.parent / "diagrams" / (spec.stem + suffix)
    return spec.with_name(spec.stem + suffix)


def compile_plan(spec: Path) -> dict[str, Any]:
    from flowdsl.api import compile_spec

    result = compile_spec(str(spec), check_workers=False)
    assert result.plan is not None, [d.message for d in result.diagnostics]
    return result.plan


#: a spec whose ids, labels and expressions hold every character that could break a diagram
NASTY = r'''
flowdsl: 1
name: nasty_flow
description: "Quotes \" ' `ticks` <script>alert(1)</script> & | [x] {y} (z) #35; %% -->; end\nsecond line"
steps:
  - end:
      worker: "end"
      description: "subgraph end --> x[\"y\"] ;; click x call alert() \\ back\\slash"
      compensate: undo_end
  - o_step:
      worker: x.o
      needs: [end]
      when: "${ a = \"]\" and b != '|' and c > 1 and d < 2 and $contains(e, '#quot;') }"
      fail_when: "${ status = 'bad\" -->' }"
      retry: {attempts: 3, "on": [Timeout, "Weird"]}
      timeout: 1500ms
  - switch: pick
    "on": "${ kind & '|' & \"\\\"\" }"
    cases:
      "a\"b": [case_a]
      "<b>|x|</b>": [case_b]
      "ünïcødé 🚀 中文": [case_c]
      "end": [case_d]
  - parallel: lanes
    description: "lanes: `a` | <b>"
    branches:
      - sequence: left
        steps: [l1: {compensate: "undo.l1"}, l2]
      - think:
          llm:
            signature: "q -> a"
            instructions: "Say \"hi\" <b>"
          fallback: canned
  - for_each: loop
    items: "${ items[price > 0 and name != \"x\"] }"
    as: it
    concurrency: 2
    steps: [per_item]
'''


def simulate(plan: dict[str, Any], fail: set[str] | frozenset[str] = frozenset(), run_input: Any = None,
             run_id: str = "r-test") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Drive a plan through the kernel: every task succeeds with ``{}`` except those whose node key
    is in ``fail`` (compensations always succeed); retry timers fire at once. Returns the final
    state and every event the kernel emitted, as a runtime would record them."""
    from flowdsl.kernel import END_STATES, apply, start_run

    decision = start_run(plan, run_id, run_input or {}, at=0)
    state, events, queue, now = decision.state, list(decision.events), list(decision.commands), 0
    while queue and state["status"] not in END_STATES:
        cmd = queue.pop(0)
        now += 1
        if cmd["op"] == "dispatch":
            if cmd["kind"] != "compensate" and cmd["node"] in fail:
                event = {"type": "task_failed", "task_id": cmd["task_id"], "at": now,
                         "error": {"type": "Boom", "message": "simulated"}}
            else:
                event = {"type": "task_succeeded", "task_id": cmd["task_id"], "at": now, "result": {}}
        elif cmd["op"] == "schedule_timer" and cmd["purpose"] == "retry":
            event = {"type": "timer_fired", "timer_id": cmd["timer_id"], "at": now}
        else:
            continue
        decision = apply(plan, state, event)
        state = decision.state
        events.extend(decision.events)
        queue.extend(decision.commands)
    return state, events
