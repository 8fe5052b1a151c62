"""Simulated services for the e-commerce saga: inventory, payment gateway, outbox.

Example code, not part of flowdsl: it stands in for the remote systems the
workers of ``flow.yaml`` would call, in-process and with state, so the saga's
guarantees can be observed (stock levels, reservations, charges, refunds,
shipments, notifications).

Every mutating call takes an idempotency key (a worker passes
``ctx.idempotency_key``). A repeated call with the same key has no second
effect and returns the first call's result; the same key with a different
request raises :class:`IdempotencyConflict`, as real payment gateways do.
Ids are derived from the key, so results are deterministic.

Scriptable faults, driven by the order (see the example's README):

- ``order.simulate.gateway_timeouts: N`` — the gateway raises
  :class:`PaymentGatewayTimeout` on the first N charge calls made with a key,
  then answers. With ``order.simulate.timeout_after_charge: true`` the charge
  is recorded before the timeout (the answer was lost), so the retry must get
  the same charge back rather than charge twice.
- card number ``4000000000000002`` is declined (``card_declined``),
  ``4000000000009995`` too (``insufficient_funds``).
- stock is finite: ``VINTAGE-CAMERA`` has 2 units, unknown products none.

Tests reset and inspect the state through :data:`STATE` (or
:func:`get_services`); :meth:`Services.leaked_reservations` and
:meth:`Services.orphan_charges` check the saga's invariants once runs are over.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

#: units on hand when the services start or are reset
INITIAL_STOCK: dict[str, int] = {
    "LAPTOP-PRO-15": 10_000,
    "USB-C-HUB": 10_000,
    "WIRELESS-MOUSE": 10_000,
    "MECH-KEYBOARD": 10_000,
    "COFFEE-MUG": 10_000,
    "VINTAGE-CAMERA": 2,
}

#: test card numbers the gateway declines, with the decline code it gives
DECLINED_CARDS: dict[str, str] = {
    "4000000000000002": "card_declined",
    "4000000000009995": "insufficient_funds",
}


class ServiceError(Exception):
    """Base of the simulated services' errors."""


class InventoryError(ServiceError):
    """The inventory service refused a request (unknown or already settled reservation)."""


class PaymentGatewayError(ServiceError):
    """The gateway refused a request (bad amount or card, nothing to refund)."""


class PaymentGatewayTimeout(ServiceError):
    """The gateway did not answer in time; retrying with the same key is safe."""


class IdempotencyConflict(ServiceError):
    """An idempotency key was reused for a different request."""


def derive_id(prefix: str, key: str) -> str:
    """A stable id for the object created under ``key``: ``PREFIX-`` + 12 hex digits."""
    return f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:12].upper()}"


class _Journal:
    """The ordered log of effects every service appends to, and the idempotency memo."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.effects: list[dict[str, Any]] = []
        self.calls: Counter[str] = Counter()  # "service.op" -> calls made, repeats included
        self._memo: dict[tuple[str, str], tuple[str, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # the lock guards this process only; a saved state (a test sharing the books between
        # worker processes) is restored with a fresh one
        return {k: v for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.RLock()

    def record(self, service: str, op: str, obj_id: str, order_id: str, **extra: Any) -> None:
        self.effects.append(
            {"seq": len(self.effects) + 1, "service": service, "op": op, "id": obj_id, "order_id": order_id, **extra}
        )

    def count(self, name: str) -> None:
        with self.lock:
            self.calls[name] += 1

    def once(self, op: str, key: str, request: Mapping[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run ``fn`` the first time ``(op, key)`` is seen; afterwards return its result."""
        if not key:
            raise IdempotencyConflict(f"{op}: an idempotency key is required")
        fingerprint = json.dumps(request, sort_keys=True, default=str)
        with self.lock:
            hit = self._memo.get((op, key))
            if hit is not None:
                if hit[0] != fingerprint:
                    raise IdempotencyConflict(f"{op}: key {key!r} was first used for a different request")
                return copy.deepcopy(hit[1])
            result = fn()
            self._memo[(op, key)] = (fingerprint, copy.deepcopy(result))
            return copy.deepcopy(result)


# --- inventory ---------------------------------------------------------------


@dataclass
class Reservation:
    id: str
    order_id: str
    items: dict[str, int]  # product id -> units
    status: str = "held"  # held | released | committed


@dataclass
class Shipment:
    id: str
    order_id: str
    reservation_id: str
    tracking_number: str
    carrier: str
    address: dict[str, Any] = field(default_factory=dict)


class InventoryService:
    """Stock per product, reservations that hold it, shipments that consume it."""

    def __init__(self, journal: _Journal, stock: Mapping[str, int]):
        self._journal = journal
        self.stock: dict[str, int] = dict(stock)  # units available (not held)
        self.reservations: dict[str, Reservation] = {}
        self.shipments: dict[str, Shipment] = {}

    def available(self, product_id: str) -> int:
        return self.stock.get(product_id, 0)

    def reserve(self, order_id: str, items: Iterable[Mapping[str, Any]], *, key: str) -> dict[str, Any]:
        """Hold every item, or nothing: ``status`` is ``reserved`` or ``insufficient``."""
        wanted: dict[str, int] = {}
        for item in items:
            wanted[str(item["product_id"])] = wanted.get(str(item["product_id"]), 0) + int(item["quantity"])
        self._journal.count("inventory.reserve")

        def run() -> dict[str, Any]:
            shortages = [
                {"product_id": pid, "requested": qty, "available": self.available(pid)}
                for pid, qty in sorted(wanted.items())
                if self.available(pid) < qty
            ]
            if shortages:
                return {"status": "insufficient", "order_id": order_id, "shortages": shortages}
            res = Reservation(derive_id("RES", key), order_id, dict(sorted(wanted.items())))
            for pid, qty in res.items.items():
                self.stock[pid] -= qty
            self.reservations[res.id] = res
            self._journal.record("inventory", "reserve", res.id, order_id, items=dict(res.items))
            return {"status": "reserved", "order_id": order_id, "reservation_id": res.id, "items": _lines(res)}

        return self._journal.once("reserve", key, {"order_id": order_id, "items": wanted}, run)

    def release(self, reservation_id: str, *, key: str) -> dict[str, Any]:
        """Give a held reservation's stock back. Releasing it again changes nothing."""
        self._journal.count("inventory.release")

        def run() -> dict[str, Any]:
            res = self._reservation(reservation_id)
            if res.status == "committed":
                raise InventoryError(f"reservation {reservation_id} has shipped; it cannot be released")
            already = res.status == "released"
            if not already:
                for pid, qty in res.items.items():
                    self.stock[pid] = self.stock.get(pid, 0) + qty
                res.status = "released"
                self._journal.record("inventory", "release", res.id, res.order_id, items=dict(res.items))
            return {"status": "released", "reservation_id": res.id, "items": _lines(res), "already_released": already}

        return self._journal.once("release", key, {"reservation_id": reservation_id}, run)

    def ship(
        self, order_id: str, reservation_id: str, address: Mapping[str, Any] | None, *, key: str
    ) -> dict[str, Any]:
        """Commit a held reservation (its stock leaves the warehouse) and create the shipment."""
        self._journal.count("inventory.ship")

        def run() -> dict[str, Any]:
            res = self._reservation(reservation_id)
            if res.order_id != order_id:
                raise InventoryError(f"reservation {reservation_id} belongs to order {res.order_id}, not {order_id}")
            existing = next((s for s in self.shipments.values() if s.reservation_id == res.id), None)
            if existing is not None:
                return _shipment_view(existing)
            if res.status != "held":
                raise InventoryError(f"reservation {reservation_id} is {res.status}; nothing to ship")
            digest = hashlib.sha256(key.encode()).hexdigest().upper()
            shipment = Shipment(derive_id("SHP", key), order_id, res.id, f"1Z{digest[:16]}", "UPS", dict(address or {}))
            res.status = "committed"
            self.shipments[shipment.id] = shipment
            self._journal.record("inventory", "ship", shipment.id, order_id, reservation_id=res.id)
            return _shipment_view(shipment)

        request = {"order_id": order_id, "reservation_id": reservation_id, "address": dict(address or {})}
        return self._journal.once("ship", key, request, run)

    def restock(self, product_id: str, units: int) -> None:
        """Set the available units of a product (test setup; not keyed)."""
        with self._journal.lock:
            self.stock[product_id] = units

    def _reservation(self, reservation_id: str) -> Reservation:
        res = self.reservations.get(reservation_id)
        if res is None:
            raise InventoryError(f"unknown reservation {reservation_id!r}")
        return res


def _lines(res: Reservation) -> list[dict[str, Any]]:
    return [{"product_id": pid, "quantity": qty} for pid, qty in res.items.items()]


def _shipment_view(s: Shipment) -> dict[str, Any]:
    return {"shipment_id": s.id, "order_id": s.order_id, "reservation_id": s.reservation_id,
            "tracking_number": s.tracking_number, "carrier": s.carrier}


# --- payment gateway ---------------------------------------------------------


@dataclass
class Charge:
    id: str
    order_id: str
    customer_id: str
    amount: float
    currency: str
    card_last4: str
    status: str  # captured | declined | refunded
    decline_code: str | None = None


@dataclass
class Refund:
    id: str
    charge_id: str
    order_id: str
    amount: float


class PaymentGateway:
    """Charges and refunds, with scripted timeouts and declining test cards."""

    def __init__(self, journal: _Journal):
        self._journal = journal
        self.charges: dict[str, Charge] = {}
        self.refunds: dict[str, Refund] = {}
        self._timeouts_served: Counter[str] = Counter()  # per idempotency key

    def charge(
        self,
        order_id: str,
        customer_id: str,
        amount: float,
        currency: str,
        card_number: str,
        *,
        key: str,
        simulate: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Charge a card: ``status`` is ``captured`` or ``declined`` (a decline is an answer, not an error)."""
        faults = simulate or {}
        timeouts = int(faults.get("gateway_timeouts") or 0)
        request = {"order_id": order_id, "customer_id": customer_id, "amount": round(float(amount), 2),
                   "currency": currency, "card_number": card_number}
        with self._journal.lock:
            self._journal.count("gateway.charge")
            served = self._timeouts_served[key]
            if served < timeouts:
                self._timeouts_served[key] = served + 1
                if faults.get("timeout_after_charge"):
                    self._journal.once("charge", key, request, lambda: self._capture(key, request))
                raise PaymentGatewayTimeout(
                    f"payment gateway did not answer (simulated timeout {served + 1} of {timeouts})"
                )
            return self._journal.once("charge", key, request, lambda: self._capture(key, request))

    def _capture(self, key: str, req: dict[str, Any]) -> dict[str, Any]:
        card = str(req["card_number"])
        if not card.isdigit() or not 12 <= len(card) <= 19:
            raise PaymentGatewayError("card number must be 12 to 19 digits")
        if req["amount"] <= 0:
            raise PaymentGatewayError(f"amount must be positive, got {req['amount']}")
        decline = DECLINED_CARDS.get(card)
        charge = Charge(derive_id("CH", key), req["order_id"], req["customer_id"], req["amount"], req["currency"],
                        card[-4:], "declined" if decline else "captured", decline)
        self.charges[charge.id] = charge
        if not decline:
            self._journal.record("gateway", "charge", charge.id, charge.order_id, amount=charge.amount)
        return _charge_view(charge)

    def refund(self, charge_id: str, *, key: str) -> dict[str, Any]:
        """Refund a captured charge in full. Refunding it again changes nothing."""
        self._journal.count("gateway.refund")

        def run() -> dict[str, Any]:
            charge = self.charges.get(charge_id)
            if charge is None:
                raise PaymentGatewayError(f"unknown charge {charge_id!r}")
            if charge.status == "declined":
                raise PaymentGatewayError(f"charge {charge_id} was declined; there is nothing to refund")
            existing = next((r for r in self.refunds.values() if r.charge_id == charge_id), None)
            if existing is None:
                existing = Refund(derive_id("RF", key), charge.id, charge.order_id, charge.amount)
                self.refunds[existing.id] = existing
                charge.status = "refunded"
                self._journal.record("gateway", "refund", existing.id, charge.order_id, charge_id=charge.id,
                                     amount=charge.amount)
            return {"status": "refunded", "refund_id": existing.id, "charge_id": charge.id,
                    "order_id": charge.order_id, "amount": existing.amount, "currency": charge.currency}

        return self._journal.once("refund", key, {"charge_id": charge_id}, run)


def _charge_view(c: Charge) -> dict[str, Any]:
    view = {"status": c.status, "charge_id": c.id, "order_id": c.order_id, "amount": c.amount,
            "currency": c.currency, "card_last4": c.card_last4}
    if c.decline_code:
        view["decline_code"] = c.decline_code
    return view


# --- outbox ------------------------------------------------------------------


@dataclass
class Notification:
    id: str
    order_id: str
    channel: str
    recipient: str
    subject: str
    body: str


class Outbox:
    """Messages sent to customers; each key sends at most one."""

    def __init__(self, journal: _Journal):
        self._journal = journal
        self.sent: dict[str, Notification] = {}

    def send(self, order_id: str, channel: str, recipient: str, subject: str, body: str, *, key: str) -> dict[str, Any]:
        self._journal.count("outbox.send")

        def run() -> dict[str, Any]:
            note = Notification(derive_id("MSG", key), order_id, channel, recipient, subject, body)
            self.sent[note.id] = note
            self._journal.record("outbox", "send", note.id, order_id, channel=channel)
            return {"status": "sent", "notification_id": note.id, "channel": channel, "recipient": recipient,
                    "subject": subject}

        request = {"order_id": order_id, "channel": channel, "recipient": recipient, "subject": subject, "body": body}
        return self._journal.once("send", key, request, run)


# --- the process-wide state --------------------------------------------------


class Services:
    """The three simulated services sharing one journal; :data:`STATE` is the process's instance."""

    inventory: InventoryService
    gateway: PaymentGateway
    outbox: Outbox

    def __init__(self, stock: Mapping[str, int] | None = None):
        self.reset(stock)

    def reset(self, stock: Mapping[str, int] | None = None) -> Services:
        """Forget everything: fresh stock (``INITIAL_STOCK`` unless given), no reservations, charges or messages."""
        self._journal = _Journal()
        self.inventory = InventoryService(self._journal, INITIAL_STOCK if stock is None else stock)
        self.gateway = PaymentGateway(self._journal)
        self.outbox = Outbox(self._journal)
        return self

    @property
    def effects(self) -> list[dict[str, Any]]:
        """Every effect so far, in order: ``{"seq", "service", "op", "id", "order_id", ...}``."""
        return copy.deepcopy(self._journal.effects)

    @property
    def calls(self) -> Counter[str]:
        """Calls made per ``service.op`` (``inventory.reserve``, ``gateway.charge``...), repeats included."""
        return Counter(self._journal.calls)

    def effects_of(self, op: str, order_id: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.effects if e["op"] == op and (order_id is None or e["order_id"] == order_id)]

    def fulfilled_orders(self) -> set[str]:
        """Orders that completed: a shipment exists for them."""
        return {s.order_id for s in self.inventory.shipments.values()}

    def leaked_reservations(self) -> list[dict[str, Any]]:
        """Reservations still held for orders that did not complete (call when runs are over)."""
        done = self.fulfilled_orders()
        held = (r for r in self.inventory.reservations.values() if r.status == "held")
        return [asdict(r) for r in held if r.order_id not in done]

    def orphan_charges(self) -> list[dict[str, Any]]:
        """Captured, unrefunded charges of orders that did not complete (call when runs are over)."""
        done = self.fulfilled_orders()
        return [asdict(c) for c in self.gateway.charges.values() if c.status == "captured" and c.order_id not in done]

    def invariant_violations(self) -> list[str]:
        """Both invariants as readable lines; empty when the books are clean."""
        lines = [f"reservation {r['id']} of order {r['order_id']} is still held" for r in self.leaked_reservations()]
        lines += [f"charge {c['id']} of order {c['order_id']} ({c['amount']} {c['currency']}) was never refunded"
                  for c in self.orphan_charges()]
        return lines

    def snapshot(self) -> dict[str, Any]:
        """A JSON view of the whole state, for debugging and golden files."""
        return {
            "stock": dict(sorted(self.inventory.stock.items())),
            "reservations": [asdict(r) for r in self.inventory.reservations.values()],
            "shipments": [asdict(s) for s in self.inventory.shipments.values()],
            "charges": [asdict(c) for c in self.gateway.charges.values()],
            "refunds": [asdict(r) for r in self.gateway.refunds.values()],
            "notifications": [asdict(n) for n in self.outbox.sent.values()],
            "effects": self.effects,
        }


#: the services every worker of this example talks to
STATE = Services()


def get_services() -> Services:
    """The process-wide :class:`Services` (the same object as :data:`STATE`)."""
    return STATE
