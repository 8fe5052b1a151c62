"""Workers of tests/flowtests/flows/shop.yaml: each answers from its input alone, and notes its call in CALLS."""

from __future__ import annotations

from typing import Any

from flowdsl.workers import StepContext, worker

#: (worker name, idempotency key) of every call, in order (tests read and clear it)
CALLS: list[tuple[str, str]] = []


def _called(name: str, ctx: StepContext) -> None:
    CALLS.append((name, ctx.idempotency_key))


@worker("shop.check")
def check(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _called("shop.check", ctx)
    if not data["lines"]:
        raise ValueError("an order has lines")
    return {"checked": True}


@worker("shop.reserve")
async def reserve(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _called("shop.reserve", ctx)
    return {"sku": data["sku"], "reserved": True}


@worker("shop.release")
async def release(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _called("shop.release", ctx)
    return {}


@worker("shop.charge")
async def charge(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _called("shop.charge", ctx)
    return {"charge_id": f"ch-{data['id']}"}


@worker("shop.refund")
async def refund(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _called("shop.refund", ctx)
    return {}


@worker("shop.plain_note")
async def plain_note(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _called("shop.plain_note", ctx)
    return {"note": f"Thank you for order {data['id']}."}


@worker("shop.ship")
async def ship(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _called("shop.ship", ctx)
    return {"tracking": f"T-{data['id']}", "note": data["note"]}
