"""`make demo`: check, plan, draw and run the two examples (``python -m examples.demo``).

For each example it validates the spec (importing its workers), prints the
plan's shape (steps, stages, critical path) and its ASCII diagram, then runs:
the e-commerce saga's success and payment-declined scenarios, the order
pipeline, and the bank-transfer order, whose run waits for the bank's webhook
(a signal this demo sends once the run waits for it) — each followed by its
run summary. Runs are recorded under
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
    "bank_transfer": ["order"],
}
#: the signals a scenario's run waits for, sent as its waits start (the webhooks of the bank and the carrier)
WEBHOOKS: dict[str, dict[str, dict[str, Any]]] = {
    "bank_transfer": {"payment_received": {"amount": 3205.5, "reference": "ACME-1042/INV-00001"},
                      "delivered": {"delivered_at": "2026-12-07T10:00:00Z"}},
}
#: how long after a wait starts its webhook comes (seconds): long enough to see the run wait
WEBHOOK_DELAY = 0.3


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
    waits = [k for k, n in plan["nodes"].items() if n["kind"] == "wait"]
    console.print(f"[bold]{name}[/] ({path.relative_to(ROOT)}): valid — {len(steps)} steps "
                  f"({len(compensable)} with a compensation){f', {len(waits)} waits' if waits else ''}, "
                  f"{len(plan['stages'])} stages")
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
    if name in WEBHOOKS:
        result = asyncio.run(_run_with_webhooks(console, plan, run_input, WEBHOOKS[name]))
    else:
        result = asyncio.run(run_flow(plan, run_input))
    print_summary(result, console)
    return result.status


async def _run_with_webhooks(console: Console, plan: dict[str, Any], run_input: dict[str, Any],
                             hooks: dict[str, dict[str, Any]]) -> Any:
    """Run the flow in this process and play the webhooks: each wait's signal is sent WEBHOOK_DELAY seconds after
    the wait starts, as a payment provider or a carrier would call an endpoint that hands it to the run."""
    from flowdsl.runtime.local import LocalRun

    loop = asyncio.get_running_loop()
    sent: list[Any] = []

    def send(signal: str) -> None:
        outcome = run.signal(signal, hooks[signal])
        sent.append(outcome)
        console.print(f"  [dim]webhook → signal '{signal}'[/]")

    def on_event(event: dict[str, Any]) -> None:
        if event["type"] == "step_started" and event["kind"] == "wait" and event.get("signal") in hooks:
            loop.call_later(WEBHOOK_DELAY, send, event["signal"])

    run = LocalRun(plan, run_input, on_event=on_event)
    result = await run.run()
    for outcome in sent:
        await outcome
    return result


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
