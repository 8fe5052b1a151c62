"""Every example test starts and ends with fresh simulated services and no model configured."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from examples.bank_transfer import workers as bank
from examples.ecommerce_order import services as svc
from examples.order_management import workers as om


@pytest.fixture(autouse=True)
def clean_books(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("FLOWDSL_LM", raising=False)
    svc.STATE.reset()
    om.LEDGER.reset()
    bank.BOOKS.reset()
    yield
    svc.STATE.reset()
    om.LEDGER.reset()
    bank.BOOKS.reset()
