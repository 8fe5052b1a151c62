"""Workers for the invalid cases that are checked with their worker modules imported.

A case whose spec lists ``workers:`` is compiled with ``check_workers=True``
and this directory as the search path (see README.md).
"""

from flowdsl.workers import worker


@worker("reserve_seats")
def reserve_seats(data, ctx):
    return {"reservation_id": f"R-{ctx.idempotency_key}"}


@worker("release_seats")
def release_seats(data, ctx):
    return None


@worker("charge_ticket")
def charge_ticket(data, ctx):
    return {"charge_id": f"C-{ctx.idempotency_key}"}


@worker("refund_ticket")
def refund_ticket(data, ctx):
    return None


@worker("email_tickets")
def email_tickets(data, ctx):
    return None


class GatewayTimeout(Exception):
    """The payment gateway did not answer in time: worth retrying (FD313's case)."""


class CardDeclined(Exception):
    """The card was declined: never retried, as retrying would charge it again (FD313's case)."""
