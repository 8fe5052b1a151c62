"""Workers of the e-commerce order saga (``examples/ecommerce_order/flow.yaml``).

Example code: imports ``flowdsl.workers`` and this example's simulated
services, nothing else from flowdsl. Each worker receives the object its
step's ``with:`` mapping builds (see flow.yaml) and a ``StepContext``; every
call that changes a service passes ``ctx.idempotency_key``, so an attempt that
runs again (a retry, a redelivery after a crash) has no second effect.

Business failures the saga should act on are returned as data and turned into
step failures by ``fail_when`` (``inventory_status: insufficient``,
``payment_status: declined``); broken input raises :class:`ValidationError`;
gateway timeouts raise ``PaymentGatewayTimeout`` so the step's retry applies.
The exception class name is the error type flowdsl records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from examples.ecommerce_order.services import (
    InventoryError,
    PaymentGatewayError,
    PaymentGatewayTimeout,
    get_services,
)
from flowdsl.workers import StepContext, worker

__all__ = [
    "InventoryError",
    "PaymentGatewayError",
    "PaymentGatewayTimeout",
    "ValidationError",
    "WorkerInputError",
    "validation_problems",
]

REQUIRED_FIELDS = ("id", "customer_id", "items", "total_amount")
#: largest accepted difference between the declared total and the items' sum
TOTAL_TOLERANCE = 0.01


class ValidationError(Exception):
    """The order breaks a business rule; the message lists every problem found."""


class WorkerInputError(Exception):
    """A worker was given an input without the fields its step's ``with:`` should provide."""


def _require(data: Mapping[str, Any], *names: str) -> None:
    missing = [n for n in names if data.get(n) in (None, "")]
    if missing:
        raise WorkerInputError(f"missing input field(s): {', '.join(missing)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def validation_problems(order: Any) -> list[str]:
    """Every business rule ``order`` breaks, in a stable order (empty when valid)."""
    if not isinstance(order, Mapping):
        return ["the input has no 'order' object"]
    problems = [f"{name} is missing" for name in REQUIRED_FIELDS if order.get(name) in (None, "", [])]
    items = order.get("items")
    if items == []:
        problems.append("the order must contain at least one item")
    elif items is not None and not isinstance(items, list):
        problems.append("items must be a list")
    items_ok = isinstance(items, list) and bool(items)
    for i, item in enumerate(items if isinstance(items, list) else []):
        if not isinstance(item, Mapping):
            problems.append(f"item {i}: must be an object")
            items_ok = False
            continue
        if not item.get("product_id"):
            problems.append(f"item {i}: product_id is missing")
        qty, price = item.get("quantity"), item.get("price")
        if not (isinstance(qty, int) and not isinstance(qty, bool) and qty > 0):
            problems.append(f"item {i}: quantity must be a positive integer, got {qty!r}")
            items_ok = False
        if not (_is_number(price) and price > 0):
            problems.append(f"item {i}: price must be positive, got {price!r}")
            items_ok = False
    declared = order.get("total_amount")
    if declared is not None and not _is_number(declared):
        problems.append(f"total_amount must be a number, got {declared!r}")
    elif declared is not None and items_ok:
        calculated = sum(item["price"] * item["quantity"] for item in items)
        if abs(calculated - declared) > TOTAL_TOLERANCE:
            problems.append(f"total mismatch: the items add up to {calculated:.2f}, the order declares {declared:.2f}")
    payment = order.get("payment")
    card = payment.get("card_number") if isinstance(payment, Mapping) else None
    if not (isinstance(card, str) and card.isdigit() and 12 <= len(card) <= 19):
        problems.append("payment.card_number is required (12 to 19 digits)")
    return problems


@worker("validate_order")
async def validate_order(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Check the order's business rules; returns the figures later steps use."""
    order = data.get("order")
    problems = validation_problems(order)
    if problems or not isinstance(order, Mapping):
        order_id = order.get("id") if isinstance(order, Mapping) else None
        raise ValidationError(f"order {order_id or '?'} is invalid: " + "; ".join(problems))
    items = order["items"]
    lines = [f"{it['quantity']} x {it.get('name') or it['product_id']} @ {it['price']:.2f}" for it in items]
    ctx.logger.info("order %s valid: %d item(s)", order["id"], len(items))
    return {
        "status": "passed",
        "order_id": order["id"],
        "item_count": len(items),
        "unit_count": sum(it["quantity"] for it in items),
        "total_amount": round(sum(it["price"] * it["quantity"] for it in items), 2),
        "order_details": "\n".join(lines),
    }


@worker("check_inventory")
async def check_inventory(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Reserve every item, or nothing: ``inventory_status`` is ``reserved`` or ``insufficient``."""
    _require(data, "order_id", "items")
    answer = get_services().inventory.reserve(data["order_id"], data["items"], key=ctx.idempotency_key)
    if answer["status"] == "insufficient":
        ctx.logger.info("order %s: insufficient stock %s", data["order_id"], answer["shortages"])
        return {"inventory_status": "insufficient", "order_id": data["order_id"], "shortages": answer["shortages"]}
    return {
        "inventory_status": "reserved",
        "order_id": data["order_id"],
        "reservation_id": answer["reservation_id"],
        "reserved_items": answer["items"],
    }


@worker("release_inventory")
async def release_inventory(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Compensation of check_inventory: give the reservation's stock back (once)."""
    _require(data, "reservation_id")
    answer = get_services().inventory.release(data["reservation_id"], key=ctx.idempotency_key)
    ctx.logger.info("released reservation %s", answer["reservation_id"])
    return {
        "inventory_released": True,
        "reservation_id": answer["reservation_id"],
        "released_items": answer["items"],
        "already_released": answer["already_released"],
    }


@worker("process_payment")
async def process_payment(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Charge the card. A decline is data (``payment_status: declined``); a timeout raises and is retried."""
    _require(data, "order_id", "customer_id", "amount", "payment")
    payment = data["payment"] if isinstance(data["payment"], Mapping) else {}
    answer = get_services().gateway.charge(
        data["order_id"],
        data["customer_id"],
        float(data["amount"]),
        data.get("currency") or "USD",
        str(payment.get("card_number") or ""),
        key=ctx.idempotency_key,
        simulate=data.get("simulate") if isinstance(data.get("simulate"), Mapping) else None,
    )
    if answer["status"] == "declined":
        ctx.logger.info("order %s: card declined (%s)", data["order_id"], answer["decline_code"])
        return {
            "payment_status": "declined",
            "order_id": data["order_id"],
            "decline_code": answer["decline_code"],
            "amount_charged": 0.0,
        }
    return {
        "payment_status": "captured",
        "order_id": data["order_id"],
        "charge_id": answer["charge_id"],
        "amount_charged": answer["amount"],
        "currency": answer["currency"],
        "card_last4": answer["card_last4"],
    }


@worker("refund_payment")
async def refund_payment(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Compensation of process_payment: refund the charge in full (once)."""
    _require(data, "charge_id")
    answer = get_services().gateway.refund(data["charge_id"], key=ctx.idempotency_key)
    ctx.logger.info("refunded charge %s (%s)", answer["charge_id"], answer["refund_id"])
    return {
        "payment_refunded": True,
        "refund_id": answer["refund_id"],
        "charge_id": answer["charge_id"],
        "amount_refunded": answer["amount"],
    }


@worker("template_confirmation")
async def template_confirmation(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Fallback of generate_confirmation: the same three fields, from a fixed template."""
    name = data.get("customer_name") or "Valued Customer"
    total = data.get("total_amount")
    total_text = f"{float(total):.2f}" if _is_number(total) else "—"
    details = str(data.get("order_details") or "your items")
    return {
        "greeting": f"Hi {name}, thank you for your order!",
        "order_summary": f"You ordered:\n{details}\nTotal charged: {total_text}",
        "next_steps": "We are packing your order now. You will get a tracking number as soon as it ships, "
        "usually within one business day.",
    }


@worker("fulfill_order")
async def fulfill_order(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Ship the reserved items: commits the reservation and returns the tracking number."""
    _require(data, "order_id", "reservation_id")
    address = data.get("shipping_address") if isinstance(data.get("shipping_address"), Mapping) else None
    answer = get_services().inventory.ship(data["order_id"], data["reservation_id"], address,
                                           key=ctx.idempotency_key)
    return {
        "status": "label_created",
        "shipment_id": answer["shipment_id"],
        "tracking_number": answer["tracking_number"],
        "carrier": answer["carrier"],
        "estimated_delivery": "3-5 business days",
    }


@worker("notify_customer")
async def notify_customer(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Send the confirmation (by email, else to the account inbox), at most once per run."""
    _require(data, "order_id", "customer_id")
    email = data.get("email")
    channel, recipient = ("email", str(email)) if email else ("account_inbox", str(data["customer_id"]))
    parts = [data.get("greeting"), data.get("order_summary"), data.get("next_steps")]
    if data.get("tracking_number"):
        parts.append(f"Tracking number: {data['tracking_number']}")
    body = "\n\n".join(str(p) for p in parts if p)
    subject = f"Your order {data['order_id']} is confirmed"
    answer = get_services().outbox.send(data["order_id"], channel, recipient, subject, body,
                                        key=ctx.idempotency_key)
    return {"status": "sent", "notification_id": answer["notification_id"], "channel": channel,
            "recipient": recipient}
