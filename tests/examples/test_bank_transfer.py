"""The bank-transfer example, for real: the local runtime waits for the bank's webhook (a signal sent from another
task as the wait starts, as an application's webhook handler would), and the books end right — nothing held or
left open by a run that ended, whatever its end (examples/bank_transfer/README.md)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from examples.bank_transfer.workers import BOOKS
from flowdsl import compile_spec
from flowdsl.runtime.local import LocalRun

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "bank_transfer"
PAID = {"amount": 3205.5, "reference": "ACME-1042/INV-00001"}
DELIVERED = {"delivered_at": "2026-12-07T10:00:00Z"}


def _run(tmp_path: Path, webhooks: dict[str, dict[str, Any]], *, early: dict[str, Any] | None = None) -> Any:
    plan = compile_spec(str(EXAMPLE / "flow.yaml"), check_workers=True).plan
    run_input = json.loads((EXAMPLE / "inputs" / "order.json").read_text())
    outcomes: list[Any] = []

    async def main() -> Any:
        loop = asyncio.get_running_loop()

        def on_event(event: dict[str, Any]) -> None:
            if event["type"] == "step_started" and event.get("signal") in webhooks:
                name = event["signal"]
                loop.call_later(0.02, lambda: outcomes.append(run.signal(name, webhooks[name])))

        run = LocalRun(plan, run_input, on_event=on_event, runs_dir=tmp_path, signals=early)
        result = await run.run()
        return result, [(await o).outcome for o in outcomes]

    return asyncio.run(main())


def test_paid_and_delivered_the_order_ships_and_nothing_is_left_open(tmp_path: Path) -> None:
    result, outcomes = _run(tmp_path, {"payment_received": PAID, "delivered": DELIVERED})
    assert result.status == "completed" and outcomes == ["received", "received"]
    assert result.context["payment"] == PAID and result.context["review_requested"] is True
    assert result.steps["payment_received"]["kind"] == "wait"
    assert BOOKS.open_reservations() == [] and BOOKS.open_invoices() == [] and BOOKS.kept_transfers() == []
    assert [i["status"] for i in BOOKS.invoices.values()] == ["paid"] and len(BOOKS.shipments) == 1


def test_a_short_payment_voids_the_invoice_and_releases_the_stock(tmp_path: Path) -> None:
    result, _ = _run(tmp_path, {"payment_received": {**PAID, "amount": 100}})
    assert result.status == "compensated" and result.compensated == ["book_transfer", "issue_invoice", "reserve_stock"]
    assert BOOKS.open_reservations() == [] and BOOKS.open_invoices() == [] and not BOOKS.shipments
    assert BOOKS.kept_transfers() == [] and [t["refunded"] for t in BOOKS.transfers.values()] == [True]
    assert [i["status"] for i in BOOKS.invoices.values()] == ["void"]


def test_a_payment_known_before_the_run_starts_is_kept_for_its_wait(tmp_path: Path) -> None:
    result, outcomes = _run(tmp_path, {"delivered": DELIVERED}, early={"payment_received": PAID})
    assert result.status == "completed" and outcomes == ["received"]
    kept = [e for e in result.events if e["type"] == "signal_received" and e["signal"] == "payment_received"]
    assert len(kept) == 1 and kept[0]["buffered"] is True
    assert BOOKS.open_reservations() == [] and BOOKS.open_invoices() == []
