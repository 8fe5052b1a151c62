"""Workers of the order-management pipeline (``examples/order_management/flow.yaml``).

Example code: imports ``flowdsl.workers`` only. The operations have dotted
names (``orders.checkout.validate_items``); a step written as that name gets
the last segment as its id. Each one sleeps (``asyncio.sleep``) for the
duration the run input gives it — ``durations: {"default": 0.1,
"pick_items": 0.2}``, in seconds, keyed by step id, default 0.1 — then
returns a small result whose keys no other step writes.

Faults: a step whose id is listed in the input's ``fail_at`` raises
:class:`SimulatedFailure` after its sleep, so the saga's parallel compensation
can be watched: ``reserve_items`` is undone by ``release_items`` and
``charge`` by ``refund_charge``, both recorded in :data:`LEDGER`.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import threading
from collections.abc import Mapping
from typing import Any

from flowdsl.workers import StepContext, worker

DEFAULT_DURATION = 0.1  # seconds, when the input's durations say nothing
PAYMENT_METHODS = frozenset({"credit_card", "debit_card", "paypal"})


class CheckoutError(Exception):
    """The order cannot be checked out (no items, bad quantity, unknown payment method)."""


class SimulatedFailure(Exception):
    """Raised by a step listed in the input's ``fail_at``."""


def _short_id(prefix: str, key: str) -> str:
    return f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:10].upper()}"


class Ledger:
    """Reservations and charges made by this example, idempotent by key; ``log`` lists the effects in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.reservations: dict[str, str] = {}  # id -> held | shipped | released
            self.charges: dict[str, str] = {}  # id -> captured | verified | refunded
            self.log: list[tuple[str, str]] = []

    def _set(self, table: dict[str, str], obj_id: str, op: str, status: str, only_from: set[str] | None) -> bool:
        with self._lock:
            current = table.get(obj_id)
            if (only_from is None and current is not None) or (only_from is not None and current not in only_from):
                return False
            table[obj_id] = status
            self.log.append((op, obj_id))
            return True

    def reserve(self, key: str) -> str:
        rid = _short_id("RES", key)
        self._set(self.reservations, rid, "reserve", "held", None)
        return rid

    def ship(self, rid: str) -> bool:
        return self._set(self.reservations, rid, "ship", "shipped", {"held"})

    def release(self, rid: str) -> bool:
        return self._set(self.reservations, rid, "release", "released", {"held"})

    def charge(self, key: str) -> str:
        cid = _short_id("CH", key)
        self._set(self.charges, cid, "charge", "captured", None)
        return cid

    def verify(self, cid: str) -> bool:
        return self._set(self.charges, cid, "verify", "verified", {"captured"})

    def refund(self, cid: str) -> bool:
        return self._set(self.charges, cid, "refund", "refunded", {"captured", "verified"})

    def dangling(self) -> list[str]:
        """Reservations still held and charges neither verified nor refunded (check once runs are over)."""
        return [f"reservation {r} held" for r, s in self.reservations.items() if s == "held"] + [
            f"charge {c} captured" for c, s in self.charges.items() if s == "captured"
        ]


#: the ledger every worker of this example writes to
LEDGER = Ledger()


async def _operate(data: Mapping[str, Any], step: str) -> None:
    """Sleep for the step's duration, then fail if the input asks this step to."""
    durations = data.get("durations") if isinstance(data.get("durations"), Mapping) else {}
    seconds = durations.get(step, durations.get("default", DEFAULT_DURATION))
    if not (isinstance(seconds, int | float) and not isinstance(seconds, bool) and math.isfinite(seconds)):
        raise CheckoutError(f"durations.{step} must be a number of seconds, got {seconds!r}")
    await asyncio.sleep(max(0.0, float(seconds)))
    if step in (data.get("fail_at") or []):
        raise SimulatedFailure(f"{step} failed (listed in fail_at)")


def _order(data: Mapping[str, Any]) -> Mapping[str, Any]:
    order = data.get("order")
    if not isinstance(order, Mapping) or not order.get("order_number"):
        raise CheckoutError("the input needs an 'order' object with an order_number")
    return order


def _units(order: Mapping[str, Any]) -> int:
    return sum(int(item.get("quantity", 0)) for item in order.get("items") or [])


# --- checkout: three independent checks ------------------------------------


@worker("orders.checkout.validate_items")
async def validate_items(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Every line has a product, a positive quantity and a non-negative price."""
    await _operate(data, "validate_items")
    items = _order(data).get("items") or []
    if not items:
        raise CheckoutError("the order has no items")
    for i, item in enumerate(items):
        if not item.get("product_id") or int(item.get("quantity", 0)) <= 0 or float(item.get("unit_price", -1)) < 0:
            raise CheckoutError(f"item {i} needs a product_id, a positive quantity and a unit_price")
    subtotal = round(sum(it["quantity"] * it["unit_price"] for it in items), 2)
    return {"items_valid": True, "item_count": len(items), "subtotal": subtotal}


@worker("orders.checkout.validate_payment")
async def validate_payment(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """The payment method is one the shop accepts."""
    await _operate(data, "validate_payment")
    method = _order(data).get("payment_method")
    if method not in PAYMENT_METHODS:
        raise CheckoutError(f"payment method {method!r} is not accepted (one of {sorted(PAYMENT_METHODS)})")
    return {"payment_valid": True, "payment_method": method}


@worker("orders.checkout.calculate_shipping")
async def calculate_shipping(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """A flat fee plus one per unit; the zone is the zip code's first digit."""
    await _operate(data, "calculate_shipping")
    order = _order(data)
    zip_code = str((order.get("shipping_address") or {}).get("zip_code") or "0")
    return {"shipping_cost": round(4.99 + 1.0 * _units(order), 2), "shipping_zone": f"zone-{zip_code[0]}"}


# --- fulfilment: five steps in sequence -------------------------------------


@worker("orders.fulfillment.reserve_items")
async def reserve_items(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    await _operate(data, "reserve_items")
    return {"reservation_id": LEDGER.reserve(ctx.idempotency_key)}


@worker("orders.fulfillment.release_items")
async def release_items(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Compensation of reserve_items."""
    rid = str(data.get("reservation_id") or "")
    if not rid:
        raise CheckoutError("release_items needs the reservation_id reserve_items returned")
    return {"items_released": LEDGER.release(rid), "released_reservation_id": rid}


@worker("orders.fulfillment.pick_items")
async def pick_items(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    await _operate(data, "pick_items")
    return {"picked_units": _units(_order(data))}


@worker("orders.fulfillment.pack_items")
async def pack_items(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    await _operate(data, "pack_items")
    return {"package_id": _short_id("PKG", ctx.idempotency_key),
            "package_weight_kg": round(0.5 * _units(_order(data)), 2)}


@worker("orders.fulfillment.ship_items")
async def ship_items(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    await _operate(data, "ship_items")
    LEDGER.ship(str(data.get("reservation_id") or ""))
    digest = hashlib.sha256(ctx.idempotency_key.encode()).hexdigest().upper()
    return {"tracking_number": f"1Z{digest[:16]}", "carrier": "UPS"}


@worker("orders.tracking.update_customer")
async def update_customer(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    await _operate(data, "update_customer")
    order = _order(data)
    return {"customer_notified": True, "notified": order.get("customer_email") or order.get("customer_id")}


# --- payments: three steps in sequence, beside fulfilment -------------------


@worker("payments.processing.charge")
async def charge(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Charge the order total plus the shipping cost calculate_shipping found."""
    await _operate(data, "charge")
    amount = round(float(_order(data).get("total") or 0) + float(data.get("shipping_cost") or 0), 2)
    return {"charge_id": LEDGER.charge(ctx.idempotency_key), "charged_amount": amount}


@worker("payments.processing.refund_charge")
async def refund_charge(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Compensation of charge."""
    cid = str(data.get("charge_id") or "")
    if not cid:
        raise CheckoutError("refund_charge needs the charge_id charge returned")
    return {"charge_refunded": LEDGER.refund(cid), "refunded_charge_id": cid}


@worker("payments.processing.confirm")
async def confirm(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    await _operate(data, "confirm")
    return {"charge_confirmed": True}


@worker("payments.reconciliation.verify")
async def verify(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    await _operate(data, "verify")
    LEDGER.verify(str(data.get("charge_id") or ""))
    return {"reconciled": True, "ledger_entry": _short_id("LE", ctx.idempotency_key)}
