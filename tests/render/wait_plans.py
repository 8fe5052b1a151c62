"""Hand-written plans with ``wait`` nodes (plan_version 3, docs/plan.md; 4 with keyed waits), and the events of
runs of them, for the renderer tests: written out rather than compiled, so that they draw whatever state the
compiler is in. Each node has the fields the compiler writes for its kind."""

from __future__ import annotations

from typing import Any

from flowdsl.render.view import WAIT_KEY

#: the plan's expressions (only their sources are drawn)
_EXPRESSIONS = {"x0c0ffee00001": {"source": "order.watchers", "vars": ["order"], "steps": []},
                "x0c0ffee00002": {"source": "order.express != true", "vars": ["order"], "steps": []}}


def _common(key: str, kind: str, order: int, *, parent: str | None = None, deps: list[str] | None = None,
            scope: str | None = None, description: str | None = None, when: str | None = None) -> dict[str, Any]:
    return {"key": key, "id": key.rsplit("/", 1)[-1], "kind": kind, "parent": parent, "deps": deps or [],
            "order": order, "scope": scope, "when": when, "description": description,
            "spec_path": f"/steps/{order}"}


def task(key: str, order: int, stage: int, *, compensate: str | None = None, **common: Any) -> dict[str, Any]:
    """A task step as the compiler writes it (default retry, no timeout)."""
    retry = {"attempts": 1, "backoff": "exponential", "initial_ms": 1000, "max_ms": 30000, "multiplier": 2.0,
             "jitter": "none", "on": None, "not_on": []}
    undo = {"worker": compensate, "with": None, "retry": retry, "timeout_ms": None} if compensate else None
    return {**_common(key, "task", order, **common), "worker": key.rsplit("/", 1)[-1], "with": None,
            "output": {"mode": "merge"}, "writes": None, "fail_when": None, "retry": retry, "timeout_ms": None,
            "compensate": undo, "stage": stage}


def wait(key: str, order: int, stage: int, *, signal: str | None = None, delay_ms: int | None = None,
         timeout_ms: int | None = None, output: dict[str, Any] | None = None, on_failure: str | None = None,
         key_expr: str | None = None, **common: Any) -> dict[str, Any]:
    """A wait node: for ``signal`` (with a ``timeout_ms`` deadline or none; keyed by the expression id
    ``key_expr``), or a timer of ``delay_ms``."""
    output = output or {"mode": "merge"}
    writes = [] if signal is None else ([output["name"]] if output["mode"] == "name" else None)
    node = {**_common(key, "wait", order, **common), "signal": signal, "delay_ms": delay_ms,
            "timeout_ms": timeout_ms, "output": output, "writes": writes, "stage": stage}
    if on_failure is not None:
        node["on_failure"] = on_failure
    if key_expr is not None:
        node[WAIT_KEY] = key_expr
    return node


def wait_plan() -> dict[str, Any]:
    """A payment flow that waits: for the provider's webhook (30m deadline), then, side by side, for a
    manager's approval (1h, passed over when it does not come) and a 2h cooling-off timer; then ships
    (compensated, as the payment is) and, for each watcher, lets 15m pass before notifying them."""
    nodes = [
        task("process_payment", 0, 0, compensate="refund_payment"),
        wait("payment_confirmed", 1, 1, signal="payment_confirmed", timeout_ms=30 * 60_000,
             output={"mode": "name", "name": "confirmation"}, deps=["process_payment"],
             description="The payment provider's webhook"),
        {**_common("checks", "parallel", 2, deps=["payment_confirmed"]), "children": ["approval", "cooling_off"]},
        wait("approval", 3, 2, signal="manager_approved", timeout_ms=3_600_000, on_failure="continue",
             parent="checks", when="x0c0ffee00002"),
        wait("cooling_off", 4, 2, delay_ms=2 * 3_600_000, parent="checks",
             description="Cooling-off period before shipping"),
        task("ship_order", 5, 3, compensate="cancel_shipment", deps=["checks"]),
        {**_common("notify_watchers", "for_each", 6, deps=["ship_order"]), "children": ["settle", "notify"],
         "items": "x0c0ffee00001", "as": "watcher", "concurrency": 2,
         "output": {"mode": "name", "name": "notify_watchers"}},
        wait("settle", 7, 4, delay_ms=15 * 60_000, parent="notify_watchers", scope="notify_watchers"),
        task("notify", 8, 5, parent="notify_watchers", scope="notify_watchers", deps=["settle"]),
    ]
    edges = [[":start", "process_payment"], ["approval", "checks:end"], ["checks:end", "ship_order"],
             ["checks:start", "approval"], ["checks:start", "cooling_off"], ["cooling_off", "checks:end"],
             ["notify", "notify_watchers:end"], ["notify_watchers:end", ":end"],
             ["notify_watchers:start", "settle"], ["payment_confirmed", "checks:start"],
             ["process_payment", "payment_confirmed"], ["settle", "notify"],
             ["ship_order", "notify_watchers:start"]]
    return {"plan_version": 3,
            "flow": {"name": "wait_for_it", "version": "1.0", "workers": [], "input_schema": None,
                     "timeout_ms": None, "description": "Charge, wait for the payment to be confirmed and "
                                                        "approved, let a cooling-off period pass, ship."},
            "root": ["process_payment", "payment_confirmed", "checks", "ship_order", "notify_watchers"],
            "nodes": {n["key"]: n for n in nodes}, "expressions": _EXPRESSIONS, "edges": edges,
            "stages": [["process_payment"], ["payment_confirmed"], ["approval", "cooling_off"], ["ship_order"],
                       ["settle"], ["notify"]],
            "critical_path": ["process_payment", "payment_confirmed", "approval", "ship_order", "settle", "notify"]}


def keyed_plan() -> dict[str, Any]:
    """An order shipped in parcels (undone by recalling them) that waits, for each parcel, for the carrier's
    delivery callback keyed by its tracking number (14 days at most), then confirms it; then for the payment
    keyed by the order's reference (outside any for_each, no deadline), and closes the order."""
    day = 86_400_000
    nodes = [
        task("ship_parcels", 0, 0, compensate="recall_parcels"),
        {**_common("parcels", "for_each", 1, deps=["ship_parcels"]), "children": ["delivered", "confirm"],
         "items": "x0c0ffee00011", "as": "parcel", "concurrency": None,
         "output": {"mode": "name", "name": "deliveries"}},
        wait("delivered", 2, 1, signal="delivered", timeout_ms=14 * day, key_expr="x0c0ffee00012",
             output={"mode": "name", "name": "delivery"}, parent="parcels", scope="parcels",
             description="The carrier's delivery callback"),
        task("confirm", 3, 2, parent="parcels", scope="parcels", deps=["delivered"]),
        wait("paid", 4, 3, signal="paid", key_expr="x0c0ffee00013", deps=["parcels"]),
        task("close_order", 5, 4, deps=["paid"]),
    ]
    edges = [[":start", "ship_parcels"], ["close_order", ":end"], ["confirm", "parcels:end"],
             ["delivered", "confirm"], ["paid", "close_order"], ["parcels:end", "paid"],
             ["parcels:start", "delivered"], ["ship_parcels", "parcels:start"]]
    expressions = {"x0c0ffee00011": {"source": "order.parcels", "vars": ["order"], "steps": []},
                   "x0c0ffee00012": {"source": "$parcel.tracking", "vars": [], "steps": []},
                   "x0c0ffee00013": {"source": "order.reference", "vars": ["order"], "steps": []}}
    return {"plan_version": 4,
            "flow": {"name": "parcels", "version": "1.0", "workers": [], "input_schema": None, "timeout_ms": None,
                     "description": "Ship an order's parcels, wait for each one's delivery, then for the payment."},
            "root": ["ship_parcels", "parcels", "paid", "close_order"],
            "nodes": {n["key"]: n for n in nodes}, "expressions": expressions, "edges": edges,
            "stages": [["ship_parcels"], ["delivered"], ["confirm"], ["paid"], ["close_order"]],
            "critical_path": ["ship_parcels", "delivered", "confirm", "paid", "close_order"]}


def keyed_run() -> list[dict[str, Any]]:
    """A run of :func:`keyed_plan` still going: shipped; parcel 0's delivery came and was confirmed, parcel 1 still
    waits for its key's."""
    return [
        ev("run_started", flow="parcels"),
        ev("step_started", "ship_parcels"), ev("step_succeeded", "ship_parcels"),
        ev("step_started", "parcels", items=2),
        ev("step_started", "parcels[0]/delivered", node="delivered", signal="delivered", wait_ms=14 * 86_400_000,
           key="1Z1"),
        ev("step_started", "parcels[1]/delivered", node="delivered", signal="delivered", wait_ms=14 * 86_400_000,
           key="1Z2"),
        {"type": "signal", "name": "delivered", "key": "1Z1", "payload": {"at": "door"}, "at": 5},
        ev("signal_received", "parcels[0]/delivered", node="delivered", signal="delivered", buffered=False, key="1Z1"),
        ev("step_succeeded", "parcels[0]/delivered", node="delivered"),
        ev("step_started", "parcels[0]/confirm", node="confirm"),
        ev("step_succeeded", "parcels[0]/confirm", node="confirm"),
    ]


def ev(type_: str, step: str | None = None, **extra: Any) -> dict[str, Any]:
    """One event as the kernel emits it (``node`` = ``step`` outside a loop)."""
    out: dict[str, Any] = {"type": type_, "run_id": "r-wait", "at": 0, **extra}
    if step is not None:
        out.update(step=step, node=extra.get("node", step))
    return out


def waiting_run() -> list[dict[str, Any]]:
    """A run of :func:`wait_plan` still going: paid, confirmed by its signal, the approval timed out and
    passed over (``on_failure: continue``), the cooling-off timer still running."""
    return [
        ev("run_started", flow="wait_for_it"),
        ev("step_started", "process_payment"), ev("step_succeeded", "process_payment"),
        ev("step_started", "payment_confirmed", signal="payment_confirmed", wait_ms=1_800_000),
        {"type": "signal", "name": "payment_confirmed", "payload": {"ref": "p-1"}, "at": 5},
        ev("signal_received", "payment_confirmed", signal="payment_confirmed", buffered=False),
        ev("step_succeeded", "payment_confirmed"),
        ev("step_started", "approval", signal="manager_approved", wait_ms=3_600_000),
        ev("step_started", "cooling_off", signal=None, wait_ms=7_200_000),
        ev("step_failed", "approval", continued=True,
           error={"type": "WaitTimeout", "message": "no signal 'manager_approved' came within 1h"}),
    ]
