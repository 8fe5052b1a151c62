"""Workers of the bank-transfer order (``examples/bank_transfer/flow.yaml``).

Example code: imports ``flowdsl.workers`` only. The warehouse and the invoicing
system are simulated in-process (:data:`BOOKS`), each call keyed by
``ctx.idempotency_key`` so that a repeated attempt has no second effect. The
payment itself is not a worker: it is the signal ``payment_received`` that the
bank's webhook sends to the run (``flowdsl signal`` on Redis, ``LocalRun.signal``
in-process), with ``{amount, reference}``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from flowdsl.workers import StepContext, worker

#: unit prices of what the warehouse sells
PRICES = {"PALLET-RACK": 420.0, "FORKLIFT-BATTERY": 1850.0, "SAFETY-NET": 95.5}


class OrderError(Exception):
    """The order cannot be reserved or invoiced as given (an unknown product, a bad quantity)."""


@dataclass
class Books:
    """The simulated warehouse and invoicing system: what is reserved, invoiced, shipped, by key."""

    reservations: dict[str, dict[str, Any]] = field(default_factory=dict)
    invoices: dict[str, dict[str, Any]] = field(default_factory=dict)
    transfers: dict[str, dict[str, Any]] = field(default_factory=dict)
    shipments: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        """Forget everything (tests start and end with empty books)."""
        with self.lock:
            self.reservations.clear()
            self.invoices.clear()
            self.transfers.clear()
            self.shipments.clear()

    def set_invoice(self, invoice_id: str, status: str) -> None:
        """Mark invoice ``invoice_id`` ``paid`` or ``void`` (again: no second effect)."""
        with self.lock:
            for invoice in self.invoices.values():
                if invoice["invoice_id"] == invoice_id:
                    invoice["status"] = status

    def open_reservations(self) -> list[str]:
        """Reservations neither released nor shipped: stock a finished run must not leave held."""
        shipped = {s["reservation_id"] for s in self.shipments.values()}
        return sorted(k for k, r in self.reservations.items() if not r["released"] and k not in shipped)

    def open_invoices(self) -> list[str]:
        """Invoices neither paid nor voided."""
        return sorted(k for k, i in self.invoices.items() if i["status"] == "open")

    def kept_transfers(self) -> list[str]:
        """Money booked and neither refunded nor matched by a shipment: a customer's money an undone order kept."""
        shipped = bool(self.shipments)
        return sorted(k for k, t in self.transfers.items() if not t["refunded"] and not shipped)


BOOKS = Books()


@worker("reserve_stock")
def reserve_stock(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Hold the order's items; the total they cost."""
    items = data.get("items") or []
    for item in items:
        if item.get("product_id") not in PRICES:
            raise OrderError(f"unknown product {item.get('product_id')!r}; known: {', '.join(sorted(PRICES))}")
        if not isinstance(item.get("quantity"), int) or item["quantity"] < 1:
            raise OrderError(f"quantity of {item['product_id']} must be a positive integer")
    total = round(sum(PRICES[i["product_id"]] * i["quantity"] for i in items), 2)
    with BOOKS.lock:
        held = BOOKS.reservations.setdefault(ctx.idempotency_key, {"items": items, "total": total, "released": False})
    return {"reservation_id": ctx.idempotency_key, "total": held["total"]}


@worker("release_stock")
def release_stock(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Compensation of reserve_stock: give the items back (once)."""
    with BOOKS.lock:
        BOOKS.reservations[data["reservation_id"]]["released"] = True
    return {"released": data["reservation_id"]}


@worker("issue_invoice")
def issue_invoice(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """An invoice for the reserved total, with the reference the customer's transfer must quote."""
    with BOOKS.lock:
        invoice = BOOKS.invoices.setdefault(ctx.idempotency_key, {
            "invoice_id": f"INV-{len(BOOKS.invoices) + 1:05d}", "order_id": data["order_id"],
            "amount": data["amount"], "status": "open"})
    return {"invoice_id": invoice["invoice_id"], "amount": invoice["amount"],
            "reference": f"{data['order_id']}/{invoice['invoice_id']}"}


@worker("void_invoice")
def void_invoice(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Compensation of issue_invoice: the invoice is void, the customer owes nothing (once)."""
    BOOKS.set_invoice(data["invoice_id"], "void")
    return {"voided": data["invoice_id"]}


@worker("book_transfer")
def book_transfer(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Book the transfer the bank reported against the invoice: the money is the company's until refunded."""
    with BOOKS.lock:
        transfer = BOOKS.transfers.setdefault(ctx.idempotency_key, {
            "transfer_id": f"TR-{len(BOOKS.transfers) + 1:05d}", "invoice_id": data["invoice_id"],
            "amount": float(data["received"] or 0), "reference": data.get("reference"), "refunded": False})
    return {"transfer_id": transfer["transfer_id"], "received": transfer["amount"]}


@worker("refund_transfer")
def refund_transfer(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Compensation of book_transfer: send the money back to the customer (once)."""
    with BOOKS.lock:
        for transfer in BOOKS.transfers.values():
            if transfer["transfer_id"] == data["transfer_id"]:
                transfer["refunded"] = True
    return {"refunded": data["transfer_id"]}


@worker("check_amount")
def check_amount(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """The transfer against the invoice: ``paid``, or ``short`` (the flow's ``fail_when`` undoes the order)."""
    short = round(float(data["expected"]) - float(data["received"]), 2)
    if short > 0:
        return {"payment_status": "short", "missing": short}
    BOOKS.set_invoice(data["invoice_id"], "paid")
    return {"payment_status": "paid", "missing": 0}


@worker("ship_order")
def ship_order(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Ship the reserved items; the tracking number."""
    with BOOKS.lock:
        shipment = BOOKS.shipments.setdefault(ctx.idempotency_key, {
            "reservation_id": data["reservation_id"], "tracking": f"TRK{len(BOOKS.shipments) + 1:06d}"})
    return {"tracking_number": shipment["tracking"]}


@worker("ask_for_review")
def ask_for_review(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Ask the customer how the delivery went, when the carrier said it was delivered."""
    delivered = data.get("delivered_at")
    return {"review_requested": bool(delivered)}
