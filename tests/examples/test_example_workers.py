"""The canonical examples: their specs, worker bodies, simulated services and inputs.

Workers are called directly with a ``StepContext``; whole runs of the
scenarios through the real runtime are in test_scenarios.py.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from examples.ecommerce_order import services as svc
from examples.ecommerce_order import workers as ew
from examples.order_management import workers as om
from flowdsl.expr import compile_expression, single_expression
from flowdsl.workers import StepContext, import_worker_modules, registry

ROOT = Path(__file__).resolve().parents[2]
ECOM = ROOT / "examples" / "ecommerce_order"
ORDERS = ROOT / "examples" / "order_management"
FLOWS = {"ecommerce_order": ECOM / "flow.yaml", "order_management": ORDERS / "flow.yaml"}
SCHEMA = json.loads((ROOT / "specs" / "flowdsl.schema.json").read_text())


def spec(name: str) -> dict[str, Any]:
    return yaml.safe_load(FLOWS[name].read_text())


def order_input(name: str) -> dict[str, Any]:
    return json.loads((ECOM / "inputs" / f"{name}.json").read_text())


def ctx(step: str, key: str | None = None, *, attempt: int = 1, compensating: bool = False) -> StepContext:
    return StepContext("r-test", step, attempt, key or f"r-test/{step}", compensating)


def call(fn: Callable[..., Any], data: dict[str, Any], context: StepContext) -> Any:
    return asyncio.run(fn(copy.deepcopy(data), context))


def reserve(order: dict[str, Any], key: str = "r-test/check_inventory") -> dict[str, Any]:
    return call(ew.check_inventory, {"order_id": order["id"], "items": order["items"]}, ctx("check_inventory", key))


def pay(order: dict[str, Any], key: str = "r-test/process_payment", **extra: Any) -> dict[str, Any]:
    data = {"order_id": order["id"], "customer_id": order["customer_id"], "amount": order["total_amount"],
            "payment": order["payment"], "simulate": order.get("simulate"), **extra}
    return call(ew.process_payment, data, ctx("process_payment", key))


# --- the specs ------------------------------------------------------------------


def _nodes(nodes: list[Any]):
    for node in nodes:
        if isinstance(node, str):
            yield node, {}
            continue
        group = next((k for k in ("parallel", "sequence") if k in node), None)
        if group:
            yield from _nodes(node.get("branches") or node.get("steps"))
        else:
            ((name, opts),) = node.items()
            yield name, opts or {}


def _expressions(value: Any):
    if isinstance(value, str) and "${" in value:
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _expressions(v)
    elif isinstance(value, list):
        for v in value:
            yield from _expressions(v)


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_flow_is_valid_against_the_language_schema(name):
    Draft202012Validator.check_schema(SCHEMA)
    errors = sorted(Draft202012Validator(SCHEMA).iter_errors(spec(name)), key=lambda e: list(e.path))
    assert [f"{list(e.path)}: {e.message}" for e in errors] == []


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_flow_names_registered_workers_unique_ids_and_parseable_expressions(name):
    doc = spec(name)
    import_worker_modules(doc["workers"])
    ids, workers = [], set()
    for step, opts in _nodes(doc["steps"]):
        ids.append(step.split(".")[-1])
        if "llm" not in opts:
            workers.add(opts.get("worker", step))
        comp = opts.get("compensate")
        workers |= {comp if isinstance(comp, str) else comp["worker"]} if comp else set()
        workers |= {opts["fallback"]} if "fallback" in opts else set()
    assert len(ids) == len(set(ids))
    assert sorted(w for w in workers if w not in registry) == []
    for text in _expressions(doc["steps"]):
        source = single_expression(text)
        assert source is not None, text
        assert compile_expression(source).analyse().variables <= {"input", "steps", "run", "context"}, text


def test_every_input_satisfies_its_flow_input_schema():
    for flow, folder in (("ecommerce_order", ECOM), ("order_management", ORDERS)):
        validator = Draft202012Validator(spec(flow)["input"])
        files = sorted((folder / "inputs").glob("*.json"))
        assert files
        for path in files:
            assert [e.message for e in validator.iter_errors(json.loads(path.read_text()))] == [], path.name
    names = {p.stem for p in (ECOM / "inputs").glob("*.json")}
    assert names >= {"success", "invalid_order", "out_of_stock", "payment_declined", "gateway_timeout"}


# --- validate_order ---------------------------------------------------------------


def test_validate_order_accepts_a_good_order_and_sums_it():
    result = call(ew.validate_order, order_input("success"), ctx("validate_order"))
    assert result["status"] == "passed"
    assert (result["item_count"], result["unit_count"], result["total_amount"]) == (2, 3, 1099.97)
    assert result["order_details"] == "1 x Laptop Pro 15 @ 999.99\n2 x USB-C hub @ 49.99"


def _breaks(mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    data = order_input("success")
    mutate(data["order"])
    return data


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda o: o.pop("customer_id"), "customer_id is missing"),
        (lambda o: o.update(id=""), "id is missing"),
        (lambda o: o.update(items=[], total_amount=0), "at least one item"),
        (lambda o: o["items"][0].update(quantity=0), "item 0: quantity must be a positive integer"),
        (lambda o: o["items"][1].update(quantity=-2), "item 1: quantity must be a positive integer"),
        (lambda o: o["items"][0].update(quantity=1.5), "item 0: quantity must be a positive integer"),
        (lambda o: o["items"][0].update(price=0), "item 0: price must be positive"),
        (lambda o: o["items"][1].pop("product_id"), "item 1: product_id is missing"),
        (lambda o: o.update(total_amount=1099.99), "total mismatch"),
        (lambda o: o.update(payment={"method": "card"}), "payment.card_number is required"),
    ],
)
def test_validate_order_rejects_each_broken_rule(mutate, message):
    with pytest.raises(ew.ValidationError, match=message):
        call(ew.validate_order, _breaks(mutate), ctx("validate_order"))


def test_validate_order_tolerates_a_cent_and_lists_every_problem():
    ok = _breaks(lambda o: o.update(total_amount=1099.975))
    assert call(ew.validate_order, ok, ctx("validate_order"))["total_amount"] == 1099.97
    with pytest.raises(ew.ValidationError) as err:
        call(ew.validate_order, order_input("invalid_order"), ctx("validate_order"))
    assert type(err.value).__name__ == "ValidationError"
    assert "customer_id is missing" in str(err.value) and "at least one item" in str(err.value)
    assert svc.STATE.effects == []


# --- inventory --------------------------------------------------------------------


def test_check_inventory_reserves_everything_once_per_key():
    order = order_input("success")["order"]
    first = reserve(order)
    assert first["inventory_status"] == "reserved" and first["reservation_id"].startswith("RES-")
    assert reserve(order) == first  # the same key: no second effect, the first answer
    inv = svc.STATE.inventory
    assert (inv.available("LAPTOP-PRO-15"), inv.available("USB-C-HUB")) == (9_999, 9_998)
    assert len(svc.STATE.effects_of("reserve")) == 1 and svc.STATE.calls["inventory.reserve"] == 2
    assert reserve(order, key="r-other/check_inventory")["reservation_id"] != first["reservation_id"]
    assert inv.available("LAPTOP-PRO-15") == 9_998


def test_check_inventory_short_stock_reserves_nothing():
    order = order_input("out_of_stock")["order"]
    result = reserve(order)
    assert result["inventory_status"] == "insufficient"
    assert result["shortages"] == [{"product_id": "VINTAGE-CAMERA", "requested": 5, "available": 2}]
    assert svc.STATE.inventory.reservations == {} and svc.STATE.effects == []
    assert svc.STATE.inventory.available("LAPTOP-PRO-15") == 10_000
    unknown = dict(order, items=[{"product_id": "NOPE", "quantity": 1, "price": 1.0}])
    assert reserve(unknown, key="k2")["shortages"] == [{"product_id": "NOPE", "requested": 1, "available": 0}]


def test_release_inventory_gives_stock_back_exactly_once():
    order = order_input("success")["order"]
    rid = reserve(order)["reservation_id"]
    comp = ctx("check_inventory", "r-test/check_inventory/compensate", compensating=True)
    first = call(ew.release_inventory, {"order_id": order["id"], "reservation_id": rid}, comp)
    assert first["inventory_released"] and not first["already_released"]
    assert call(ew.release_inventory, {"reservation_id": rid}, comp) == first
    again = call(ew.release_inventory, {"reservation_id": rid}, ctx("x", "another-key"))
    assert again["already_released"]
    assert svc.STATE.inventory.available("USB-C-HUB") == 10_000
    assert len(svc.STATE.effects_of("release")) == 1 and svc.STATE.leaked_reservations() == []
    with pytest.raises(ew.WorkerInputError):
        call(ew.release_inventory, {}, comp)


def test_reusing_a_key_for_another_request_is_refused():
    order = order_input("success")["order"]
    reserve(order)
    with pytest.raises(svc.IdempotencyConflict):
        reserve(dict(order, items=order["items"][:1]))


# --- payment ----------------------------------------------------------------------


def test_process_payment_charges_once_per_key():
    order = order_input("success")["order"]
    first = pay(order)
    assert first["payment_status"] == "captured" and first["amount_charged"] == 1099.97
    assert pay(order) == first
    assert len(svc.STATE.effects_of("charge")) == 1 and len(svc.STATE.gateway.charges) == 1


def test_declined_card_is_data_and_takes_no_money():
    order = order_input("payment_declined")["order"]
    result = pay(order)
    assert result == {"payment_status": "declined", "order_id": "ORD-1003", "decline_code": "card_declined",
                      "amount_charged": 0.0}
    assert svc.STATE.effects_of("charge") == [] and svc.STATE.orphan_charges() == []
    funds = dict(order, payment={"method": "card", "card_number": "4000000000009995"})
    assert pay(funds, key="k2")["decline_code"] == "insufficient_funds"


@pytest.mark.parametrize("after_charge", [False, True])
def test_gateway_times_out_n_times_then_answers_with_one_charge(after_charge):
    simulate = {"gateway_timeouts": 2, "timeout_after_charge": after_charge}
    order = dict(order_input("success")["order"], simulate=simulate)
    for _ in range(2):
        with pytest.raises(svc.PaymentGatewayTimeout):
            pay(order)
    assert len(svc.STATE.orphan_charges()) == (1 if after_charge else 0)
    result = pay(order)
    assert result["payment_status"] == "captured"
    assert len(svc.STATE.effects_of("charge")) == 1 and svc.STATE.calls["gateway.charge"] == 3
    assert type(svc.PaymentGatewayTimeout("x")).__name__ == "PaymentGatewayTimeout"
    with pytest.raises(svc.PaymentGatewayTimeout):  # the faults are counted per key: a new run sees them again
        pay(order, key="r-2/process_payment")


def test_refund_payment_refunds_once():
    order = order_input("success")["order"]
    charge_id = pay(order)["charge_id"]
    comp = ctx("process_payment", "r-test/process_payment/compensate", compensating=True)
    first = call(ew.refund_payment, {"order_id": order["id"], "charge_id": charge_id}, comp)
    assert first["payment_refunded"] and first["amount_refunded"] == 1099.97
    assert call(ew.refund_payment, {"charge_id": charge_id}, comp) == first
    assert call(ew.refund_payment, {"charge_id": charge_id}, ctx("x", "other"))["refund_id"] == first["refund_id"]
    assert len(svc.STATE.effects_of("refund")) == 1 and svc.STATE.orphan_charges() == []
    declined_id = svc.derive_id("CH", "k-declined")
    pay(order_input("payment_declined")["order"], key="k-declined")
    with pytest.raises(svc.PaymentGatewayError, match="nothing to refund"):
        call(ew.refund_payment, {"charge_id": declined_id}, ctx("x", "k3"))


# --- confirmation, fulfilment, notification ---------------------------------------


def test_template_confirmation_writes_the_llm_fields():
    data = {"customer_name": "Ada", "order_details": "1 x Mug @ 9.50", "total_amount": 9.5}
    result = call(ew.template_confirmation, data, ctx("generate_confirmation"))
    assert set(result) == {"greeting", "order_summary", "next_steps"}
    assert all(isinstance(v, str) and v for v in result.values())
    assert "Ada" in result["greeting"] and "9.50" in result["order_summary"]
    assert "Valued Customer" in call(ew.template_confirmation, {}, ctx("generate_confirmation"))["greeting"]


def test_fulfill_order_ships_once_with_a_deterministic_tracking_number():
    order = order_input("success")["order"]
    rid = reserve(order)["reservation_id"]
    data = {"order_id": order["id"], "reservation_id": rid, "shipping_address": order["shipping_address"]}
    first = call(ew.fulfill_order, data, ctx("fulfill_order"))
    assert first["tracking_number"].startswith("1Z") and len(first["tracking_number"]) == 18
    assert call(ew.fulfill_order, data, ctx("fulfill_order")) == first
    assert svc.STATE.inventory.reservations[rid].status == "committed"
    assert len(svc.STATE.effects_of("ship")) == 1 and svc.STATE.invariant_violations() == []
    with pytest.raises(svc.InventoryError, match="cannot be released"):
        call(ew.release_inventory, {"reservation_id": rid}, ctx("x", "k-late"))
    svc.STATE.reset()
    rid2 = reserve(order)["reservation_id"]
    assert rid2 == rid and call(ew.fulfill_order, data, ctx("fulfill_order")) == first


def test_notify_customer_sends_once_and_falls_back_to_the_inbox():
    data = {"order_id": "ORD-1", "customer_id": "C-1", "email": "a@example.com", "greeting": "Hi",
            "tracking_number": "1Z0"}
    first = call(ew.notify_customer, data, ctx("notify_customer"))
    assert (first["channel"], first["recipient"]) == ("email", "a@example.com")
    assert call(ew.notify_customer, data, ctx("notify_customer")) == first
    assert len(svc.STATE.outbox.sent) == 1
    assert "Tracking number: 1Z0" in next(iter(svc.STATE.outbox.sent.values())).body
    inbox = call(ew.notify_customer, dict(data, email=None), ctx("notify_customer", "k2"))
    assert (inbox["channel"], inbox["recipient"]) == ("account_inbox", "C-1")


def test_invariant_helpers_report_held_stock_and_unrefunded_charges():
    order = order_input("success")["order"]
    rid, charge_id = reserve(order)["reservation_id"], pay(order)["charge_id"]
    assert [r["id"] for r in svc.STATE.leaked_reservations()] == [rid]
    assert [c["id"] for c in svc.STATE.orphan_charges()] == [charge_id]
    assert len(svc.STATE.invariant_violations()) == 2
    call(ew.release_inventory, {"reservation_id": rid}, ctx("x", "k-rel"))
    call(ew.refund_payment, {"charge_id": charge_id}, ctx("x", "k-ref"))
    assert svc.STATE.invariant_violations() == []
    assert json.loads(json.dumps(svc.STATE.snapshot()))["refunds"][0]["charge_id"] == charge_id


# --- order management -------------------------------------------------------------------


def _units(node: Any) -> tuple[int, int]:
    """(critical path, sum) of a node in steps, one unit each."""
    if isinstance(node, list):
        parts = [_units(n) for n in node]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)
    if isinstance(node, dict) and "parallel" in node:
        parts = [_units(b) for b in node["branches"]]
        return max(p[0] for p in parts), sum(p[1] for p in parts)
    if isinstance(node, dict) and "sequence" in node:
        return _units(node["steps"])
    return 1, 1


def test_order_management_shape_critical_path_6_of_11():
    doc = spec("order_management")
    assert _units(doc["steps"]) == (6, 11)
    ids = [name.split(".")[-1] for name, _ in _nodes(doc["steps"])]
    assert ids == ["validate_items", "validate_payment", "calculate_shipping", "reserve_items", "pick_items",
                   "pack_items", "ship_items", "update_customer", "charge", "confirm", "verify"]


def test_order_management_durations_and_faults():
    data = {"order": {"order_number": "O-1", "items": [{"product_id": "p", "quantity": 3, "unit_price": 2.0}]},
            "durations": {"default": 0.0, "pick_items": 0.05}}
    start = time.perf_counter()
    assert call(om.pick_items, data, ctx("pick_items")) == {"picked_units": 3}
    assert time.perf_counter() - start >= 0.05
    with pytest.raises(om.SimulatedFailure, match="ship_items"):
        call(om.ship_items, dict(data, fail_at=["ship_items"]), ctx("ship_items"))
    with pytest.raises(om.CheckoutError, match="not accepted"):
        call(om.validate_payment, {**data, "order": {**data["order"], "payment_method": "cash"}}, ctx("v"))
    with pytest.raises(om.CheckoutError, match=r"durations\.confirm"):
        call(om.confirm, {**data, "durations": {"confirm": "slow"}}, ctx("confirm"))


def test_order_management_ledger_is_idempotent_and_compensations_undo():
    data = json.loads((ORDERS / "inputs" / "carrier_failure.json").read_text())
    data["durations"] = {"default": 0.0}
    rid = call(om.reserve_items, data, ctx("reserve_items"))["reservation_id"]
    assert call(om.reserve_items, data, ctx("reserve_items"))["reservation_id"] == rid
    cid = call(om.charge, {**data, "shipping_cost": 5.99}, ctx("charge"))["charge_id"]
    assert len(om.LEDGER.dangling()) == 2
    with pytest.raises(om.SimulatedFailure):
        call(om.ship_items, {**data, "reservation_id": rid}, ctx("ship_items"))
    comp = ctx("x", compensating=True)
    assert call(om.refund_charge, {"charge_id": cid}, comp)["charge_refunded"]
    assert call(om.release_items, {"reservation_id": rid}, comp)["items_released"]
    assert not call(om.release_items, {"reservation_id": rid}, comp)["items_released"]
    assert om.LEDGER.dangling() == []
    assert om.LEDGER.log == [("reserve", rid), ("charge", cid), ("refund", cid), ("release", rid)]
