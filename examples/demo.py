"""`make demo`: check, plan, draw and run the two examples (``python -m examples.demo``).

For each example it validates the spec (importing its workers), prints the
plan's shape (steps, stages, critical path) and its ASCII diagram, then runs:
the e-commerce saga's success and payment-declined scenarios, and the order
pipeline, each followed by its run summary. Runs are recorded under
``.flowdsl/runs`` as ``flowdsl run`` would; ``flowdsl show RUN_ID`` replays one.
Everything runs offline (no language model: the confirmation step uses its
template fallback unless ``FLOWDSL_LM`` names a model).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.rule import Rule

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = {
    "ecommerce_order": ["success", "payment_declined"],
    "order_management": ["order"],
}


def compile_example(console: Console, name: str) -> dict[str, Any] | None:
    from flowdsl import compile_spec

    path = ROOT / "examples" / name / "flow.yaml"
    result = compile_spec(str(path), check_workers=True)
    for d in result.diagnostics:
        console.print(f"{escape(d.location())}: {d.severity} {d.code}: {escape(d.message)}")
    if result.plan is None:
        console.print(f"[red]{name}: the spec has errors[/]")
        return None
    plan = result.plan
    steps = [k for k, n in plan["nodes"].items() if n["kind"] in ("task", "llm")]
    compensable = [k for k in steps if plan["nodes"][k].get("compensate")]
    console.print(f"[bold]{name}[/] ({path.relative_to(ROOT)}): valid — {len(steps)} steps "
                  f"({len(compensable)} with a compensation), {len(plan['stages'])} stages")
    for i, stage in enumerate(plan["stages"], 1):
        console.print(f"  stage {i}: {', '.join(stage)}")
    console.print(f"  critical path ({len(plan['critical_path'])} steps): {' → '.join(plan['critical_path'])}")
    try:
        from flowdsl.render import render
    except ImportError:
        return plan
    try:
        drawing = render(plan, "ascii")
    except Exception as exc:  # a diagram is a nicety here: say why there is none and go on
        console.print(f"[dim](no diagram: {escape(str(exc))})[/]")
    else:
        console.print()
        console.print(escape(str(drawing)), highlight=False)
    return plan


def run_scenario(console: Console, name: str, plan: dict[str, Any], scenario: str) -> str:
    from flowdsl.runtime.local import run_flow
    from flowdsl.runtime.summary import print_summary

    run_input = json.loads((ROOT / "examples" / name / "inputs" / f"{scenario}.json").read_text())
    console.print(Rule(f"{name}: {scenario}.json", style="dim"))
    result = asyncio.run(run_flow(plan, run_input))
    print_summary(result, console)
    return result.status


def main() -> int:
    console = Console(highlight=False, soft_wrap=True)
    started = time.perf_counter()
    plans: dict[str, dict[str, Any]] = {}
    for name in EXAMPLES:
        console.print(Rule(name))
        plan = compile_example(console, name)
        if plan is None:
            return 1
        plans[name] = plan
        console.print()
    outcomes = []
    for name, scenarios in EXAMPLES.items():
        for scenario in scenarios:
            outcomes.append((name, scenario, run_scenario(console, name, plans[name], scenario)))
            console.print()
    console.print(Rule("done"))
    for name, scenario, status in outcomes:
        console.print(f"  {name} / {scenario}: {status}")
    console.print(f"[dim]{time.perf_counter() - started:.1f} s · replay a run with: flowdsl show RUN_ID · test the "
                  "flows' failures on a simulated clock: flowdsl test examples (and --what-if)[/]")
    expected = {"success": "completed", "payment_declined": "compensated", "order": "completed"}
    return 0 if all(status == expected[s] for _, s, status in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
