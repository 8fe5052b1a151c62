"""Submitting runs to the Redis runtime and watching them: submit, follow, status, list, cancel, signal, resolve.

Stage: runtime: redis. Imports redis, ``flowdsl.kernel`` (the seed check), ``flowdsl.runtime.execute`` (JSON
checks), ``flowdsl.runtime.inputs``, ``flowdsl.runtime.plancheck`` (the plan's shape), ``flowdsl.runtime.record``
(default run ids) and this package: the modules the client is made of (below), ``connection``, ``keys``,
``scripts``, ``store`` and ``wire``. The client never advances a run: it records a submission or a cancel request, or
sends a signal, and leaves a message on the control (or cancels, or signals) stream, which a worker process carries
out::

    async with RedisClient("redis://localhost:6379/0") as client:
        sub = await client.submit(plan, {"order": {...}}, run_id="order-1042")
        result = await client.follow(sub.run_id, on_event=print)   # a RunResult, as the local runtime's
        said = await client.signal("order-1042", "payment_confirmed", {"amount": 42})   # a SignalOutcome

Submitting is idempotent by run id: a second submission of a run id already
used starts nothing (``created`` is False); if that run had not been started
yet (the first submitter died between its writes), its start request is sent
again (``resent``) and it is listed again.

:class:`RedisClient` is put together here from mixins, one module each; a mixin imports no other (each declares what
it uses of the others; :mod:`.client_listing` also holds :class:`RunNotFound` and the field readers they share).
This module holds the client itself — its connections and its submissions — and re-exports the public names of the
others:

- **listing** (:mod:`.client_listing`) — one run's line, the recent runs, the live worker processes and what none
  of them serves; :class:`RunNotFound`;
- **following** (:mod:`.client_follow`) — one run's result, plan and journal, followed live to its end;
- **operator actions** (:mod:`.client_operator`) — cancel, a start request sent again or looked for, a resolution;
- **signals** (:mod:`.client_signals`) — a signal sent to a run, and what the run made of it;
- **dead letters** (:mod:`.client_dead_letters`) — listed, put back, deleted.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from flowdsl.kernel import check_seed
from flowdsl.runtime.codec import dumps, loads
from flowdsl.runtime.execute import json_problem
from flowdsl.runtime.inputs import InputError
from flowdsl.runtime.plancheck import require_plan
from flowdsl.runtime.record import new_run_id
from flowdsl.runtime.redis.client_dead_letters import DeadLetter, DeadLetterNotFound, DeadLetters
from flowdsl.runtime.redis.client_follow import Following, RunGone
from flowdsl.runtime.redis.client_follow import Journal as Journal
from flowdsl.runtime.redis.client_listing import RUN_STATES, Listing, RunInfo, RunNotFound, _text, is_live
from flowdsl.runtime.redis.client_operator import NOTE_LIMIT, NothingToResolve, Operating, Resolution, StartRequest
from flowdsl.runtime.redis.client_signals import (
    SIGNAL_LIMIT,
    SignalIdReused,
    Signalling,
    SignalOutcome,
    UnknownSignal,
    signals_of,
)
from flowdsl.runtime.redis.connection import (
    TRANSIENT,
    ServerFacts,
    connect,
    resolve_prefix,
    resolve_url,
    server_facts,
)
from flowdsl.runtime.redis.keys import Keys, check_run_id
from flowdsl.runtime.redis.run_waits import RunWaits
from flowdsl.runtime.redis.scripts import SUBMIT, Batcher, Script
from flowdsl.runtime.redis.store import TRANSITION_LIMIT, Store, megabytes, plan_id, retrieved
from flowdsl.runtime.redis.wire import WireConnection
from flowdsl.runtime.redis.wire import supported as wire_supported

__all__ = ["INPUT_LIMIT", "NOTE_LIMIT", "RUN_STATES", "SIGNAL_LIMIT", "DeadLetter", "DeadLetterNotFound",
           "NothingToResolve", "RedisClient", "Resolution", "RunGone", "RunIdTaken", "RunInfo", "RunNotFound",
           "RunWaits", "SignalIdReused", "SignalOutcome", "StartRequest", "Submission", "UnknownSignal", "input_id",
           "is_live", "signals_of"]

#: the largest run input (as JSON) a submission takes: a run's first transition writes it three times (the
#: state's ``input`` and context, and the journaled start), and one transition at most ``TRANSITION_LIMIT``
INPUT_LIMIT = TRANSITION_LIMIT // 3 - 1024 * 1024

_SUBMIT = Script("submit", SUBMIT)


class RunIdTaken(ValueError):
    """The run id is taken by a submission of another plan or another input (the same plan and input would be
    the same submission: idempotent)."""

    def __init__(self, run_id: str, differs: str, flow: str):
        super().__init__(f"run id '{run_id}' is taken by an earlier submission with {differs} (flow "
                         f"'{flow or '?'}'): nothing was started; give another run id (resubmitting the same flow "
                         "with the same input and settings under one id follows the run that id names)")
        self.run_id = run_id


@dataclass(frozen=True)
class Submission:
    """What :meth:`RedisClient.submit` did: ``run_id`` (given or made); ``created``: a new run was recorded (False:
    the run id was taken by the same submission — same plan, input and settings —, so nothing new started);
    ``resent``: taken, but not started yet, so its start request was sent again (its first submitter may have
    died before sending it)."""

    run_id: str
    created: bool  # False: the run id was taken (nothing new started)
    resent: bool = False  # taken, but not started yet: its start request was sent again (its first submitter
    # may have died before sending it)


class RedisClient(Listing, Following, Operating, Signalling, DeadLetters):
    """Submit runs to, and read runs from, one deployment (a Redis URL and a key prefix)."""

    def __init__(self, url: str | None = None, *, prefix: str | None = None, client: aioredis.Redis | None = None):
        self.keys = Keys(resolve_prefix(prefix))
        self.redis = client or connect(url, client_name="flowdsl-client")
        self._own = client is None
        # lean connections when the URL allows (see .wire): one for every command, idle ones for follow's XREAD
        self._url = resolve_url(url) if self._own and wire_supported(resolve_url(url)) else None
        # (a reply deadline, as redis-py's socket_timeout: a connection whose path died silently is not waited on)
        self.wire = WireConnection(self._url, client_name="flowdsl-client", reply_timeout=15.0) if self._url else None
        self._readers: list[WireConnection] = []
        self._sent_entries: dict[tuple[str, str], str] = {}
        self.store = Store(self.redis, self.keys, batcher=Batcher(self.redis, wire=self.wire))
        #: id(plan) -> (plan, its JSON, its content id): a service submits runs of a few plans, many times each
        self._plans: dict[int, tuple[dict[str, Any], bytes, str]] = {}

    async def __aenter__(self) -> RedisClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections this client opened (a redis-py client handed in as ``client=`` is left open)."""
        if self._own:
            await self.redis.aclose()
        for wire in [self.wire, *self._readers]:
            if wire is not None:
                await wire.aclose()
        self._readers.clear()

    async def server_facts(self) -> ServerFacts | None:
        """The server's settings the runtime's guarantees rest on (eviction, persistence; see
        :class:`~flowdsl.runtime.redis.connection.ServerFacts`), or None when the server will not say (``INFO``
        refused) or cannot be reached now."""
        try:
            return await server_facts(self.redis)
        except TRANSIENT:
            return None

    async def server_warnings(self) -> list[str]:
        """What a submitter should be told of the server: that it evicts keys when full (runs may vanish)."""
        facts = await self.server_facts()
        return [facts.warnings()[0]] if facts is not None and facts.evicts else []

    # --- submitting ---------------------------------------------------------------------

    async def submit(self, plan: dict[str, Any], run_input: dict[str, Any], *, run_id: str | None = None,
                     seed: int | None = None, retention_s: float | None = None,
                     schedule_timeout_s: float | None = None) -> Submission:
        """Record a run and ask a worker to start it. Idempotent by ``run_id`` (see the module doc).

        ``retention_s``: how long the finished run is kept (default: the
        worker's ``--retention``); ``schedule_timeout_s``: how long a dispatched
        attempt may wait for a worker before it fails with
        ``ScheduleToStartTimeout`` (default: the worker's ``--schedule-timeout``,
        else no limit). Raises ``ValueError`` for a bad run id or an input
        larger than :data:`INPUT_LIMIT` as JSON, ``InputError`` (a ``ValueError``)
        for an input that is not a JSON object,
        ``TypeError`` for a plan that is not a dict and ``PlanError`` (a
        ``ValueError``) for one not shaped like an execution plan, naming the
        field. A plan is read as unchanging once compiled: its encoding is kept
        by the plan object's identity (as the kernel keeps its indexes), so
        change a plan by compiling a new one.
        """
        require_plan(plan)  # (unchecked, a path was an AttributeError, a hand-edited plan a dead letter)
        problem = json_problem(run_input) if isinstance(run_input, dict) else "it is not an object"
        if problem is not None:
            raise InputError(f"the run input is not a JSON object: {problem}")
        if run_id is None:
            run_id = new_run_id(plan)  # as the local runtime names runs
        check_run_id(run_id)
        check_seed(seed)
        for name, value, least in (("retention_s", retention_s, 1.0), ("schedule_timeout_s", schedule_timeout_s,
                                                                         0.001)):
            if value is not None and not (isinstance(value, int | float) and math.isfinite(value)
                                          and least <= value <= 3650 * 86400):
                raise ValueError(f"{name} must be a finite number of seconds from {least:g} to 315360000 "
                                 f"(10 years), not {value!r}")
        raw_plan, pid = self._encoded(plan)
        raw_input = dumps(run_input)
        if len(raw_input) > INPUT_LIMIT:  # its run's first transition writes it three times (state, context, start)
            raise ValueError(f"the run input is {megabytes(len(raw_input))} as JSON: a run on Redis takes at most "
                             f"{megabytes(INPUT_LIMIT)} of input (its first transition writes it three times, and "
                             f"one transition at most {megabytes(TRANSITION_LIMIT)}); keep large data out of runs "
                             "(store it elsewhere and pass its key)")
        iid = input_id(run_input)
        args = [raw_plan, pid, raw_input, str((plan.get("flow") or {}).get("name") or ""),
                "" if seed is None else seed, "" if retention_s is None else int(retention_s * 1000),
                "" if schedule_timeout_s is None else int(schedule_timeout_s * 1000), iid]
        # listed before it is written (one pipeline: no round trip more), by this machine's clock for now: a
        # submitter that dies before its last write leaves a run that `runs` shows (an entry whose run was never
        # written is tidied away like an expired run's). Half a millisecond off the whole milliseconds the server's
        # clock gives below: a tidy that read this entry before the run existed (UNLIST removes an entry only while
        # its score is the one read) never removes the final one, even when the two clocks agree to the ms
        listed = self.store.call("ZADD", self.keys.runs, "NX", int(time.time() * 1000) - 0.5, run_id)
        listed.add_done_callback(retrieved)  # (its error, if any, is the submission's too)
        reply = await _SUBMIT(self.store.batcher, [self.keys.run(run_id)], args)
        created = int(reply[0]) == 1
        if not created:
            await self._same_submission(run_id, pid, iid, [str(a) for a in args[4:7]], reply)
        submitted = reply[1] if created else reply[8] if len(reply) > 8 else b""
        # listed by the server's clock (and again by a second submission: its first may have died before it);
        # a run id used again after its run expired is listed by its new submission time
        writes = [self.store.call("ZADD", self.keys.runs, int(submitted), run_id)] if submitted else []
        started = not created and reply[1]
        if not started:  # new, or never started: (re)send the start request
            writes.append(self.store.send_start(run_id))
        await asyncio.gather(*writes)  # one pipeline
        return Submission(run_id, created, resent=not created and not started)

    async def _same_submission(self, run_id: str, pid: str, iid: str, settings: list[str], reply: list[Any]
                               ) -> None:
        """Raise :class:`RunIdTaken` unless the submission under ``run_id`` has this plan, input and settings
        (``settings``: seed, retention ms, schedule-to-start ms, as SUBMIT's arguments; '' for unset: then
        whatever the run has — a worker's default, say — is taken)."""
        theirs_pid, theirs_iid, flow = (_text(x) for x in reply[2:5])
        if not theirs_iid:  # submitted by a version that kept no input id: compare the input itself
            raw = await self.store.call("HGET", self.keys.run(run_id), "input")
            theirs_iid = input_id(loads(raw)) if raw else ""
        checks = [("another plan", theirs_pid == pid), ("another input", theirs_iid == iid)]
        if len(reply) > 5:  # (a version that did not return the settings: they are not compared)
            checks += [(f"another {name}", _text(theirs) == mine) for name, theirs, mine in
                       zip(("seed", "retention", "schedule-to-start timeout"), reply[5:8], settings, strict=True)
                       if mine]
        differs = [what for what, same in checks if not same]
        if differs:
            raise RunIdTaken(run_id, " and ".join(differs), flow)

    def _encoded(self, plan: dict[str, Any]) -> tuple[bytes, str]:
        hit = self._plans.get(id(plan))
        if hit is not None and hit[0] is plan:
            return hit[1], hit[2]
        raw, pid = dumps(plan), plan_id(plan)
        if len(self._plans) >= 64:
            self._plans.pop(next(iter(self._plans)))
        self._plans[id(plan)] = (plan, raw, pid)
        return raw, pid


def input_id(run_input: dict[str, Any]) -> str:
    """A digest of a run input (SHA-256 of its JSON with sorted keys): tells one submission from another."""
    return hashlib.sha256(dumps(run_input, sort_keys=True)).hexdigest()[:32]
