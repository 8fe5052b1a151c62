"""An operator's actions on runs: cancel one, send its start request again, say where it stands, resolve it.

Stage: runtime: redis. Imports redis, ``flowdsl.runtime.execute`` (text checks), ``flowdsl.runtime.codec`` and
this package's ``client_listing``, ``connection``, ``keys``, ``scripts`` and ``store``, and stdlib.
:class:`Operating` is mixed into :class:`~flowdsl.runtime.redis.client.RedisClient` (whose attributes it uses):
:meth:`Operating.cancel` records a cancel request (``flowdsl cancel``), :meth:`Operating.resend_start` and
:meth:`Operating.start_request` look after a run that has not started (:class:`StartRequest`), and
:meth:`Operating.resolve` records a person's :class:`Resolution` of a run that needed one (``flowdsl resolve``).
``client`` re-exports its public names.
"""

from __future__ import annotations

import asyncio
import getpass
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from flowdsl.runtime.codec import dumps
from flowdsl.runtime.execute import text_problem
from flowdsl.runtime.redis.client_listing import RunNotFound, _int, _text
from flowdsl.runtime.redis.connection import ServerFacts
from flowdsl.runtime.redis.keys import GROUP, Keys, check_run_id
from flowdsl.runtime.redis.scripts import CANCEL, Script
from flowdsl.runtime.redis.store import Store

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["NOTE_LIMIT", "NothingToResolve", "Operating", "Resolution", "StartRequest"]

#: the longest note a resolution takes (characters)
NOTE_LIMIT = 10_000

_CANCEL = Script("cancel", CANCEL)


class NothingToResolve(ValueError):
    """The run needs no resolving (:meth:`RedisClient.resolve`): it did not end ``needs_intervention`` (nor with an
    attempt it gave up on still held: in doubt), or it was resolved already (``resolved_at``, ms)."""

    def __init__(self, run_id: str, status: str, resolved_at: int | None = None):
        if resolved_at is not None:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(resolved_at / 1000))
            said = f"run '{run_id}' was resolved already, at {when} (`flowdsl status {run_id}` shows by whom)"
        elif status in ("submitted", "running", "aborting", "compensating"):
            said = f"run '{run_id}' is {status}: it has not ended, so there is nothing to resolve yet"
        else:
            said = (f"run '{run_id}' ended {status}: nothing is left to a person (only a run that ended "
                    "needs_intervention, or with an attempt in doubt, is resolved)")
        super().__init__(said)
        self.run_id, self.status, self.resolved_at = run_id, status, resolved_at


@dataclass(frozen=True)
class Resolution:
    """A person's resolution of a run that needed one (:meth:`RedisClient.resolve`): when (``at``, ms, the Redis
    server's clock), by whom, their note (None: none), and the state the run had ended in."""

    run_id: str
    at: int
    by: str
    note: str | None
    status: str

    def to_json(self) -> dict[str, Any]:
        """The ``resolved`` object of ``flowdsl resolve`` and ``flowdsl status`` (``--format json``)."""
        return {"at": self.at, "by": self.by, "note": self.note, "status": self.status}


@dataclass(frozen=True)
class StartRequest:
    """Where a run that has not started stands with its start request (:meth:`RedisClient.start_request`).

    ``state``: ``started`` (the run has started: nothing to look for), ``queued`` (a request is in the control
    stream, not yet read by a worker process), ``pending`` (read by a worker process, ``deliveries`` times, not
    yet acknowledged: being handled, or left there by every process that read it — a newer flowdsl's run),
    ``dead_letter`` (set aside: ``entry_id`` is the dead letter's id), ``missing`` (none anywhere: its
    submitter stopped before sending it, or Redis lost it) or ``unknown`` (the control stream is a backlog of
    more than :data:`~flowdsl.runtime.redis.store.START_SCAN_LIMIT` entries, not read through).
    ``age_ms``: how long ago the run was submitted (the server's clock)."""

    state: str
    age_ms: int
    entry_id: str | None = None
    deliveries: int = 0
    consumer: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``start_request`` object of ``flowdsl status --format json`` for a run not started."""
        return {"state": self.state, "age_ms": self.age_ms, "entry_id": self.entry_id,
                "deliveries": self.deliveries, "consumer": self.consumer}


class Operating:
    """Cancel, start requests and resolutions (see the module doc); a mixin of ``RedisClient``."""

    # what the client provides
    keys: Keys
    redis: aioredis.Redis
    store: Store
    server_facts: Callable[[], Coroutine[Any, Any, ServerFacts | None]]

    async def cancel(self, run_id: str, reason: str = "cancel requested") -> str:
        """Ask for a run to be cancelled: ``requested``, ``finished`` (already over) or raises RunNotFound.

        A run not started yet keeps the request in its own hash (the ``CANCEL`` script decides atomically):
        the start applies it, so the run ends ``cancelled`` without running a step. A started run gets the
        request on the cancels stream, which workers read whether or not they have a free slot. Either way each
        request is applied, and journaled, once. A ``reason`` that is not a string, or cannot be written as UTF-8,
        raises ``ValueError`` before anything is sent."""
        check_run_id(run_id)
        problem = text_problem(reason) if isinstance(reason, str) else f"is a {type(reason).__name__}, not a string"
        if problem is not None:
            raise ValueError(f"the cancel reason {problem}")
        reply = await _CANCEL(self.store.batcher, [self.keys.run(run_id)], [reason])
        code = int(reply[0])
        if code == 0:
            raise RunNotFound(run_id, self.keys.prefix, await self.server_facts())
        if code == 1:
            return "finished"
        if code == 3:
            await self.store.call("XADD", self.keys.cancels, "*", "c",
                                  dumps({"type": "cancel", "run_id": run_id, "reason": reason,
                                         "g": _text(reply[1]) if len(reply) > 1 else ""}))
        return "requested"

    async def resend_start(self, run_id: str) -> bool:
        """Send the start request of a submitted run again — one whose submitter stopped between recording it and
        sending its start request (:meth:`start_request` says ``missing``); it needs nothing but the run id (the
        run's hash holds its plan and input). True when sent; False when the run has started (nothing sent).
        Raises :class:`RunNotFound`.

        Always safe: a start request for a run already started, or started meanwhile by another request (this
        one, the submitter's own, a worker's upkeep sending it again), is acknowledged and does nothing; two for
        a run not started yet start it once (the start transition creates the run's version atomically). The
        worker processes send it again by themselves for a run submitted more than 10 leases ago whose start
        request is nowhere (docs/runtime.md, "A submission never started")."""
        check_run_id(run_id)
        submitted, version = await self.store.call("HMGET", self.keys.run(run_id), "submitted", "v")
        if submitted is None:
            raise RunNotFound(run_id, self.keys.prefix, await self.server_facts())
        if version is not None:
            return False
        # listed too (by the server's clock, as a submission is): a submitter that stopped may not have listed it
        await asyncio.gather(self.store.send_start(run_id),
                             self.store.call("ZADD", self.keys.runs, int(submitted), run_id))
        return True

    async def start_request(self, run_id: str) -> StartRequest:
        """Where the run's start request stands (see :class:`StartRequest`): for saying why a run has not
        started. Reads the control stream whole (and the dead letters) when the run has not started — at most
        :data:`~flowdsl.runtime.redis.store.START_SCAN_LIMIT` entries of each. Raises :class:`RunNotFound`."""
        check_run_id(run_id)
        (submitted, version), (secs, micros) = await asyncio.gather(
            self.store.call("HMGET", self.keys.run(run_id), "submitted", "v"), self.redis.time())
        if submitted is None:
            raise RunNotFound(run_id, self.keys.prefix, await self.server_facts())
        age = max(0, secs * 1000 + micros // 1000 - int(submitted))
        if version is not None:
            return StartRequest("started", age)
        queued = await self.store.start_requests()
        if queued is None:
            return StartRequest("unknown", age)
        entry_id = queued.get(run_id)
        if entry_id is None:
            dead = await self.store.start_requests(dead=True)
            if dead is not None and run_id in dead:
                return StartRequest("dead_letter", age, dead[run_id])
            return StartRequest("missing" if dead is not None else "unknown", age)
        try:
            pending = await self.redis.xpending_range(self.keys.control, GROUP, min=entry_id, max=entry_id, count=1)
        except redis.ResponseError:  # (no consumer group yet: no worker process ever ran)
            pending = []
        if not pending:
            return StartRequest("queued", age, entry_id)
        consumer = pending[0].get("consumer")
        return StartRequest("pending", age, entry_id, int(pending[0].get("times_delivered") or 0),
                            consumer.decode(errors="replace") if isinstance(consumer, bytes) else consumer)

    async def resolve(self, run_id: str, note: str | None = None, *, by: str | None = None) -> Resolution:
        """Record that a person has finished a run that needed one — it ended ``needs_intervention`` (its steps
        left to undo were undone by hand, docs/runtime.md "Finishing a run by hand"), or ended while a worker
        still held an attempt it gave up on (in doubt) — and apply its retention from now on: until then such a
        run's keys have no expiry. Journals a ``resolved`` entry (time, ``by``, ``note``) and sets the run's
        ``resolved`` field: ``flowdsl runs`` lists it as ``resolved`` (no longer under ``needs_intervention``),
        ``flowdsl status`` says who resolved it, when and why.

        ``by``: who resolved it (default: this process's user and host, ``user@host``). Raises
        :class:`RunNotFound`, :class:`NothingToResolve` (a ``ValueError``: the run has not ended so, or was
        resolved already), or ``ValueError`` for a note that is not text (at most :data:`NOTE_LIMIT` characters,
        writable as UTF-8)."""
        check_run_id(run_id)
        for name, value in (("note", note), ("by", by)):
            if value is None:
                continue
            problem = text_problem(value) if isinstance(value, str) else \
                f"is a {type(value).__name__}, not a string"
            if problem is None and len(value) > NOTE_LIMIT:
                problem = f"is {len(value):,} characters long, more than {NOTE_LIMIT:,}"
            if problem is not None:
                raise ValueError(f"the resolution's {name} {problem}")
        who = by if by is not None else _who()
        reply = await self.store.resolve(run_id, who, note or "")
        code = int(reply[0])
        if code == 0:
            raise RunNotFound(run_id, self.keys.prefix, await self.server_facts())
        if code == 1:
            raise NothingToResolve(run_id, _text(reply[1]))
        if code == 2:
            raise NothingToResolve(run_id, _text(reply[1]), _int(reply[2]) or 0)
        return Resolution(run_id, int(reply[1]), who, note or None, _text(reply[3]))


def _who() -> str:
    """Who this process runs as: ``user@host`` (what a resolution records when it is not told)."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError, ImportError):  # (no login name in the environment, no password entry)
        user = "?"
    return f"{user}@{socket.gethostname()}"
