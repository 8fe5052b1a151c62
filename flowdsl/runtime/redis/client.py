"""Submitting runs to the Redis runtime and watching them: submit, follow, status, list, cancel, resolve.

Stage: runtime: redis. Imports redis, ``flowdsl.kernel`` (end states),
``flowdsl.runtime.report`` (:class:`RunResult`, the object ``--format json``
prints), ``flowdsl.runtime.late`` (late answers, what is in doubt), ``flowdsl.runtime.execute`` (JSON
checks), ``flowdsl.runtime.record`` (default run ids), ``flowdsl.runtime.listing`` (the runs listing's line) and
this package. The client never advances a run: it records a submission or a cancel request and
leaves a message on the control (or cancels) stream, which a worker process carries out::

    async with RedisClient("redis://localhost:6379/0") as client:
        sub = await client.submit(plan, {"order": {...}}, run_id="order-1042")
        result = await client.follow(sub.run_id, on_event=print)   # a RunResult, as the local runtime's

Submitting is idempotent by run id: a second submission of a run id already
used starts nothing (``created`` is False); if that run had not been started
yet (the first submitter died between its writes), its start request is sent
again (``resent``) and it is listed again.
"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import math
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis

from flowdsl.kernel import check_seed
from flowdsl.runtime.codec import dumps, loads
from flowdsl.runtime.execute import json_problem, text_problem, worker_references
from flowdsl.runtime.inputs import InputError
from flowdsl.runtime.late import (
    attempt_label,
    in_doubt_items,
    in_doubt_notice,
    late_answer_effect,
    late_grace_seconds,
    may_answer_late,
    stopped_waiting,
)
from flowdsl.runtime.listing import RunRow
from flowdsl.runtime.plancheck import require_plan
from flowdsl.runtime.record import new_run_id
from flowdsl.runtime.redis.connection import (
    TRANSIENT,
    Backoff,
    ServerFacts,
    connect,
    resolve_prefix,
    resolve_url,
    server_facts,
    server_unwell,
)
from flowdsl.runtime.redis.keys import GROUP, Keys, check_run_id
from flowdsl.runtime.redis.scripts import CANCEL, SUBMIT, Batcher, Script
from flowdsl.runtime.redis.store import (
    TRANSITION_LIMIT,
    Store,
    decoded,
    megabytes,
    plan_id,
    retrieved,
    score_pairs,
)
from flowdsl.runtime.redis.wire import WireConnection, entry_fields, stream_entries
from flowdsl.runtime.redis.wire import supported as wire_supported
from flowdsl.runtime.report import RunResult

__all__ = ["INPUT_LIMIT", "NOTE_LIMIT", "RUN_STATES", "DeadLetter", "DeadLetterNotFound", "NothingToResolve",
           "RedisClient", "Resolution", "RunGone", "RunIdTaken", "RunInfo", "RunNotFound", "StartRequest", "Submission",
           "input_id", "is_live"]

#: the largest run input (as JSON) a submission takes: a run's first transition writes it three times (the
#: state's ``input`` and context, and the journaled start), and one transition at most ``TRANSITION_LIMIT``
INPUT_LIMIT = TRANSITION_LIMIT // 3 - 1024 * 1024

#: the states a run is listed in (``RunInfo.status``, :meth:`RedisClient.runs`' ``status``): before its start,
#: while it goes, and the end states — ``resolved`` being a run that ended ``needs_intervention`` and that a person
#: has resolved since (:meth:`RedisClient.resolve`); the same list as ``flowdsl runs --status``'s
RUN_STATES = ("submitted", "running", "aborting", "compensating", "completed", "failed", "compensated", "cancelled",
              "needs_intervention", "resolved")
#: the longest note a resolution takes (characters)
NOTE_LIMIT = 10_000

_SUBMIT = Script("submit", SUBMIT)
_CANCEL = Script("cancel", CANCEL)
EventHook = Callable[[dict[str, Any]], None]
#: a follower with no news for this long checks that the run still exists (it also does after an outage)
_EXISTS_EVERY_S = 10.0
NoticeHook = Callable[[str], None]


class RunIdTaken(ValueError):
    """The run id is taken by a submission of another plan or another input (the same plan and input would be
    the same submission: idempotent)."""

    def __init__(self, run_id: str, differs: str, flow: str):
        super().__init__(f"run id '{run_id}' is taken by an earlier submission with {differs} (flow "
                         f"'{flow or '?'}'): nothing was started; give another run id (resubmitting the same flow "
                         "with the same input and settings under one id follows the run that id names)")
        self.run_id = run_id


class RunGone(LookupError):
    """A run that existed while it was being followed no longer does (its keys were lost: a Redis restarted
    without persistence, a flushed database, an expiry)."""

    def __init__(self, run_id: str, facts: ServerFacts | None = None):
        causes = (f"{facts.loss_causes()}?" if facts is not None and facts.evicts else
                  "was Redis restarted without persistence, or its database flushed?")
        super().__init__(f"run '{run_id}' no longer exists in Redis ({causes})")
        self.run_id = run_id


class RunNotFound(LookupError):
    """No run with this id under this prefix (never submitted, or past its retention)."""

    def __init__(self, run_id: str, prefix: str, facts: ServerFacts | None = None):
        evicted = f", or evicted by the server ({facts.eviction()})" if facts is not None and facts.evicts else ""
        super().__init__(f"no run '{run_id}' in Redis under the prefix '{prefix}' (never submitted, "
                         f"or finished longer ago than its retention{evicted})")
        self.run_id = run_id


class DeadLetterNotFound(LookupError):
    """No dead letter with this id (never one, or already put back or deleted)."""

    def __init__(self, dead_id: str, prefix: str):
        super().__init__(f"no dead letter '{dead_id}' under the prefix '{prefix}' (already put back or deleted? "
                         "`flowdsl dead-letters` lists them)")
        self.dead_id = dead_id


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


_STREAM_ID_RE = re.compile(r"[0-9]{1,20}-[0-9]{1,20}\Z")


@dataclass(frozen=True)
class DeadLetter:
    """A stream entry set aside because it could not be handled (``flowdsl dead-letters``).

    ``fields`` are the entry's own, byte for byte; ``at`` is when it was set aside (ms since the epoch)."""

    id: str
    stream: str
    entry_id: str
    reason: str
    consumer: str
    deliveries: int
    failures: int
    fields: dict[str, bytes]
    at: int

    @property
    def message(self) -> dict[str, Any] | None:
        """The entry's request or dispatch command (its ``c`` or ``m`` field), when that is a JSON object."""
        raw = self.fields.get("m", self.fields.get("c"))
        try:
            value = loads(raw) if raw is not None else None
        except (ValueError, RecursionError):  # (not JSON, or nested too deep to read: it is a dead letter)
            return None
        return value if isinstance(value, dict) else None

    def to_json(self) -> dict[str, Any]:
        """The ``flowdsl dead-letters --format json`` object: ``id``, ``at``, ``stream``, ``entry_id``, the
        ``run_id`` and ``task_id`` its message names (or None), ``reason``, ``consumer``, ``deliveries``,
        ``failures`` and ``fields`` (as text, undecodable bytes backslash-escaped)."""
        message = self.message or {}
        return {"id": self.id, "at": self.at, "stream": self.stream, "entry_id": self.entry_id,
                "run_id": message.get("run_id"), "task_id": message.get("task_id"), "reason": self.reason,
                "consumer": self.consumer, "deliveries": self.deliveries, "failures": self.failures,
                "fields": {name: value.decode(errors="backslashreplace") for name, value in self.fields.items()}}


def _dead_letter(entry_id: bytes | str, raw: Any) -> DeadLetter:
    fields = entry_fields(raw)
    meta = {k.decode(errors="backslashreplace"): v for k, v in fields.items() if not k.startswith(b"f:")}
    dead_id = _text(entry_id)

    def number(name: str) -> int:
        try:
            return int(meta.get(name) or 0)
        except ValueError:
            return 0

    return DeadLetter(dead_id, _text(meta.get("stream")), _text(meta.get("id")),
                      meta.get("reason", b"").decode(errors="replace"), _text(meta.get("consumer")),
                      number("deliveries"), number("failures"),
                      {k[2:].decode(errors="backslashreplace"): v for k, v in fields.items() if k.startswith(b"f:")},
                      int(dead_id.partition("-")[0]))


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


@dataclass(frozen=True)
class RunInfo(RunRow):
    """One line of ``flowdsl runs``: times are milliseconds since the epoch (None when not reached); the fields
    and the JSON object of a local run's line (:class:`~flowdsl.runtime.listing.RunRow`)."""


@dataclass
class Journal:
    """A run's journal read so far: kernel events, input events and runtime notes, in order."""

    events: list[dict[str, Any]] = field(default_factory=list)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)
    #: the resolutions a person made of the run (``resolved`` entries), oldest first
    resolutions: list[dict[str, Any]] = field(default_factory=list)
    #: input and kernel events in journal order (each entry's input, then the events it caused)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    last_id: str = "0-0"
    finished: bool = False
    run_id: str = ""  # whose journal, and its key: what a damaged entry's error names
    key: str = ""

    def add(self, entry_id: bytes | str, fields: dict[bytes, bytes], hook: EventHook | None = None) -> None:
        """Take one journal entry; raises :class:`~flowdsl.runtime.redis.store.RunDamaged` for one that is not
        what flowdsl writes."""
        self.last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        if b"note" in fields:
            self.notes.append(self._decoded(fields[b"note"], "note", dict))
            return
        if b"resolved" in fields:
            self.resolutions.append(self._decoded(fields[b"resolved"], "resolved", dict))
            return
        if fields.get(b"in"):
            self.inputs.append(self._decoded(fields[b"in"], "in", dict))
            self.timeline.append(self.inputs[-1])
        for event in self._decoded(fields.get(b"ev") or b"[]", "ev", list):
            self.events.append(event)
            self.timeline.append(event)
            if event["type"] == "run_finished":
                self.finished = True
            if hook is not None:
                try:
                    hook(event)
                except Exception:  # a broken observer must not break following
                    hook = None

    def _decoded(self, raw: bytes, name: str, kind: type) -> Any:
        return decoded(self.run_id, self.key, name, raw, kind, self.last_id)

    def llm_calls(self) -> dict[str, list[dict[str, Any]]]:
        scheduled = {e["task_id"]: e for e in self.events if e["type"] in ("step_scheduled", "compensation_started")}
        calls: dict[str, list[dict[str, Any]]] = {}
        for event in self.inputs:
            sched = scheduled.get(event.get("task_id"))
            if "llm" in event and sched is not None:
                call = {"task_id": event["task_id"], "attempt": sched["attempt"], "outcome": event["type"]}
                calls.setdefault(sched["step"], []).append({**call, **event["llm"]})
        return calls


def is_live(record: dict[str, Any], now: int) -> bool:
    """Whether a worker process's liveness record (``{<prefix>}:workers``) was written recently: within three of
    its leases and 5 s, by the Redis server's clock ``now`` (ms) — a process that missed that many heartbeats is
    taken for gone (killed, paused, cut off)."""
    return now - int(record.get("seen", 0)) <= 3 * int(record.get("lease_ms", 30000)) + 5000


class RedisClient:
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

    # --- reading --------------------------------------------------------------------------

    async def info(self, run_id: str) -> RunInfo:
        """Status and times of one run; raises :class:`RunNotFound`. A run that ended ``needs_intervention`` and
        was resolved since is ``resolved``."""
        check_run_id(run_id)
        got = await self.store.call("HMGET", self.keys.run(run_id), *_INFO_FIELDS)
        if got[0] is None and got[2] is None:
            raise RunNotFound(run_id, self.keys.prefix, await self.server_facts())
        return _info(run_id, got)

    async def result(self, run_id: str) -> tuple[RunResult | None, Journal]:
        """The run's result as it stands (None while it has not started) and its journal."""
        check_run_id(run_id)
        await self.info(run_id)
        journal = Journal(run_id=run_id, key=self.keys.journal(run_id))
        for entry_id, fields in await self.store.call("XRANGE", self.keys.journal(run_id), "-", "+"):
            journal.add(entry_id, entry_fields(fields))
        return await self._result(run_id, journal), journal

    async def plan_of(self, run_id: str) -> dict[str, Any]:
        """The plan a run was submitted with; raises :class:`RunNotFound`."""
        check_run_id(run_id)
        pid = await self.store.call("HGET", self.keys.run(run_id), "pid")
        plan = await self.store.plan(run_id, pid.decode()) if pid is not None else None
        if plan is None:
            raise RunNotFound(run_id, self.keys.prefix, await self.server_facts())
        return plan

    async def follow(self, run_id: str, *, on_event: EventHook | None = None, on_notice: NoticeHook | None = None,
                     timeout_s: float | None = None, hint_after_s: float = 3.0,
                     journal: Journal | None = None, late_grace: float | None = None) -> RunResult:
        """Wait for the run's end, calling ``on_event`` with every kernel event as it is journaled.

        Survives lost connections (retries with backoff), a Redis already unreachable when it is called too
        (``on_notice`` is told; ``timeout_s`` bounds the wait, else it waits for Redis to come back). ``on_notice``
        gets a sentence when the run has not started after ``hint_after_s`` (no worker
        running?). ``journal`` (empty): filled with the run's journal as read, for
        what the result does not carry (rejected late results). Raises
        :class:`RunNotFound`, :class:`RunGone` when the run disappears while
        followed (checked after a lost connection, and every 10 s without
        news), or ``TimeoutError`` after ``timeout_s``.

        When the run has ended while a worker still holds an attempt it gave up on (it timed out: a sync
        worker's thread, an async worker ignoring its cancel) of a step whose success would be a late
        completion, or of an undo that failed for good, following goes on until that attempt answers — a
        success turns the run ``needs_intervention``, or undoes the step — at most ``late_grace`` seconds
        (default ``$FLOWDSL_LATE_GRACE``, else 30; 0 does not wait), as the local runtime holds a run's end; what
        has not answered then is in ``RunResult.in_doubt``. ``on_notice`` is told of the wait. A Redis still
        loading its data after a restart is waited for.
        """
        check_run_id(run_id)
        grace = late_grace_seconds(late_grace)
        t0 = time.monotonic()
        backoff = Backoff()
        while True:
            try:
                await self.info(run_id)
                break
            except TRANSIENT as exc:  # Redis unreachable already, or loading its data: wait for it (as for a
                if timeout_s is not None and time.monotonic() - t0 > timeout_s:  # connection lost later)
                    raise TimeoutError(f"run {run_id} did not finish within {timeout_s:g} s: Redis could not be "
                                       f"reached ({exc})") from exc
                if isinstance(exc, redis.BusyLoadingError):  # a restarted Redis reading its data back
                    if backoff.failures == 0 and on_notice is not None:
                        on_notice("Redis is loading its data (it was restarted); waiting for it")
                    await backoff.wait()
                else:
                    await _reconnect(backoff, exc, on_notice)
        journal = journal if journal is not None else Journal()
        journal.run_id, journal.key = run_id, self.keys.journal(run_id)
        reader = (self._readers.pop() if self._readers else WireConnection(self._url, client_name="flowdsl-follow")) \
            if self._url else None
        try:
            await self._follow(run_id, journal, reader, on_event, on_notice, timeout_s, hint_after_s, since=t0)
            result = await self._result(run_id, journal)
            if result is None:
                raise RunGone(run_id)
            return await self._past_the_end(run_id, journal, reader, on_event, on_notice, hint_after_s, grace, result)
        finally:
            if reader is not None:
                self._readers.append(reader)

    async def _past_the_end(self, run_id: str, journal: Journal, reader: WireConnection | None,
                            on_event: EventHook | None, on_notice: NoticeHook | None, hint_after_s: float,
                            grace: float, result: RunResult) -> RunResult:
        """After the run's end: follow on while a worker still runs an attempt the run gave up on that could
        still complete late (:meth:`follow`), at most ``grace`` seconds after a quiet settle; the result as it
        stands then, with what is still running then in ``in_doubt``. Survives lost connections."""
        said = False
        ended = time.monotonic()
        until = ended + max(grace, _CANCEL_SETTLE_S)
        backoff = Backoff()
        while True:
            try:
                held = await self._given_up(run_id, journal)
                if held is None or time.monotonic() >= until:
                    # read what the last transitions wrote: an answer may have come between two of these reads
                    await self._catch_up(run_id, journal, on_event)
                    result = await self._result(run_id, journal) or result
                backoff.reset()
            except TRANSIENT as exc:
                await _reconnect(backoff, exc, on_notice)
                continue
            if held is None:
                return result
            attempts = held[2]
            if time.monotonic() >= until:
                reason = "late_grace is 0" if grace <= 0 else f"after {grace:g} s, the late_grace"
                result.in_doubt = in_doubt_items(result.plan, result.state, attempts, stopped_waiting(reason),
                                                 journal.events)
                if on_notice is not None and result.in_doubt:
                    on_notice(in_doubt_notice(reason, result.in_doubt))
                return result
            if not said and on_notice is not None and time.monotonic() - ended >= _CANCEL_SETTLE_S:
                said = True
                names = ", ".join(f"{a['step']} ({attempt_label(a)})" for a in attempts)
                on_notice(f"the run ended {result.status}; waiting up to {grace:g} s for {len(attempts)} "
                          f"attempt(s) it gave up on that a worker still runs: {names} — "
                          f"{late_answer_effect(attempts)}")
            journal.finished = False  # read on (the run has ended: no time limit but the grace's)
            await self._follow(run_id, journal, reader, on_event, on_notice, None, hint_after_s, once=True)
            journal.finished = True

    async def _catch_up(self, run_id: str, journal: Journal, on_event: EventHook | None) -> None:
        """Add to ``journal`` the entries written after the last one it holds."""
        for entry_id, fields in await self.store.call("XRANGE", self.keys.journal(run_id), f"({journal.last_id}",
                                                      "+"):
            journal.add(entry_id, entry_fields(fields), on_event)

    async def _given_up(self, run_id: str, journal: Journal
                        ) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]] | None:
        """The ended run's plan, state and the attempts it gave up on that a worker still holds (a lease ``r:`` or
        ``xr:`` marked given up, ``g:<task id>``) whose success would still count (:func:`may_answer_late`: a step's
        a late completion, an undo's that failed for good its step undone); None when there are none."""
        leases = await self.store.call("HGETALL", self.keys.tasks(run_id))
        if not leases:
            return None
        record = await self.store.load(run_id)
        if record is None:
            return None
        plan, state = record.plan, record.state
        scheduled = {e["task_id"]: e for e in journal.events if e["type"] in ("step_scheduled", "compensation_started")}
        fields = {_text(k): _text(v) for k, v in zip(leases[::2], leases[1::2], strict=True)}
        attempts = []
        for task_id, lease in fields.items():
            event = scheduled.get(task_id)
            if event is None or "g:" + task_id not in fields or not lease.startswith(("r:", "xr:")):
                continue
            attempt = {"task_id": task_id, "step": event["step"], "attempt": event["attempt"]}
            if may_answer_late(plan, state, attempt):
                attempts.append(attempt)
        return (plan, state, attempts) if attempts else None

    async def _follow(self, run_id: str, journal: Journal, reader: WireConnection | None,
                      on_event: EventHook | None, on_notice: NoticeHook | None, timeout_s: float | None,
                      hint_after_s: float, once: bool = False, since: float | None = None) -> None:
        """Read the journal on until the run's end is read; ``once``: one read (blocking at most 0.5 s) at most.
        ``timeout_s`` counts from ``since`` (a ``time.monotonic()``; default: now)."""
        key = self.keys.journal(run_id)
        t0 = checked = time.monotonic()
        if since is not None:
            t0 = since
        hinted = False
        backoff = Backoff()
        while not journal.finished:
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"run {run_id} did not finish within {timeout_s:g} s")
            reply: Any  # [(stream, [(entry id, fields)])] or None
            try:
                if reader is None:
                    reply = await self.redis.xread({key: journal.last_id}, count=1000, block=500)
                else:
                    reply = stream_entries(await reader.blocking(
                        ("XREAD", "COUNT", 1000, "BLOCK", 500, "STREAMS", key, journal.last_id), 500))
                if backoff.failures or time.monotonic() - checked > _EXISTS_EVERY_S:
                    # back after an outage, or quiet for a while: a Redis that lost its data (restarted without
                    # persistence, flushed) has no such run any more, and its journal would stay silent forever
                    checked = time.monotonic()
                    if not reply and not await self.store.call("EXISTS", self.keys.run(run_id)):
                        raise RunGone(run_id, await self.server_facts())
                backoff.reset()
            except TRANSIENT as exc:
                await _reconnect(backoff, exc, on_notice)
                continue
            except redis.ResponseError as exc:
                if not server_unwell(exc):  # (a failover: the server became a replica, UNBLOCKED; out of memory)
                    raise
                await _reconnect(backoff, exc, on_notice)
                continue
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    journal.add(entry_id, fields, on_event)
            if once:
                return
            if not journal.inputs and not hinted and time.monotonic() - t0 > hint_after_s:
                hinted = True
                if on_notice is not None:
                    live = await self.workers()
                    on_notice("the run has not started yet: " + (
                        "no worker process is connected to this Redis under this prefix; start one with "
                        "`flowdsl worker`" if not live else f"{len(live)} worker process(es) are busy or not serving "
                        "this run's steps"))

    async def runs(self, *, limit: int = 20, status: str | None = None, flow: str | None = None) -> list[RunInfo]:
        """Recent runs, newest first, optionally only those with ``status`` (one of :data:`RUN_STATES`, else
        ``ValueError``; ``needs_intervention``: those not resolved yet, ``resolved``: those resolved) or of
        ``flow``."""
        if status is not None and status not in RUN_STATES:
            raise ValueError(f"status {status!r} is not a run state: use one of {', '.join(RUN_STATES)}")
        found: list[RunInfo] = []
        start = 0
        page = max(50, limit * 2)
        while len(found) < limit:
            pairs = score_pairs(await self.store.call("ZREVRANGE", self.keys.runs, start, start + page - 1,
                                                      "WITHSCORES"))
            if not pairs:
                break
            start += page
            rows = await asyncio.gather(*(self.store.call("HMGET", self.keys.run(r.decode()), *_INFO_FIELDS)
                                          for r, _ in pairs))
            gone = []
            for pair, got in zip(pairs, rows, strict=True):
                if got[0] is None and got[2] is None:
                    gone.append(pair)  # expired: drop it from the index
                    continue
                item = _info(pair[0].decode(), got)
                if (status is None or item.status == status) and (flow is None or item.flow == flow):
                    found.append(item)
            start -= await self.store.unlist(gone)
        return found[:limit]

    async def workers(self, *, max_age_ms: int | None = None, every: bool = False) -> list[dict[str, Any]]:
        """Worker processes seen recently (:func:`is_live`, or within ``max_age_ms``): their liveness records,
        each with its ``name``; ``every``: all the records, each with ``live`` (whether it is live) too."""
        raw = await self.store.call("HGETALL", self.keys.workers)
        items = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
        secs, micros = await self.redis.time()
        now = secs * 1000 + micros // 1000
        live = []
        for name, value in items:
            record = loads(value)
            seen = now - int(record.get("seen", 0)) <= max_age_ms if max_age_ms else is_live(record, now)
            if every:
                live.append({"name": name.decode(), **record, "live": seen})
            elif seen:
                live.append({"name": name.decode(), **record})
        return live

    async def unserved(self, plan: dict[str, Any]) -> list[str]:
        """What the plan needs that no live worker process serves now: one phrase per worker (step,
        fallback or compensation) no live process has registered, and per LLM step when none serves LLM steps."""
        live = await self.workers()
        served = {name for record in live for name in record.get("workers") or ()}
        missing = [f"the {role} worker '{name}' of step '{key}'" for key, role, name in worker_references(plan)
                   if name not in served]
        if not any(record.get("llm") for record in live):
            missing += [f"LLM step '{key}'" for key, node in plan["nodes"].items() if node["kind"] == "llm"]
        return missing

    # --- dead letters -----------------------------------------------------------------------

    async def dead_letters(self, *, limit: int | None = 100, older_than_s: float | None = None) -> list[DeadLetter]:
        """The entries set aside because they could not be handled, oldest first (at most ``limit``; None: all);
        ``older_than_s``: only those set aside longer ago than that many seconds (by the Redis server's clock)."""
        found: list[DeadLetter] = []
        start, end = "-", await self._dead_end(older_than_s)
        while limit is None or len(found) < limit:
            page = 1000 if limit is None else min(1000, limit - len(found))
            reply = await self.store.call("XRANGE", self.keys.dead, start, end, "COUNT", page)
            found += [_dead_letter(entry_id, raw) for entry_id, raw in reply or ()]
            if not reply or len(reply) < page:
                break
            start = "(" + _text(reply[-1][0])
        return found

    async def _dead_end(self, older_than_s: float | None, pinned: bool = False) -> str:
        """The end of a range of dead letters (XRANGE): ``+``; or, ``older_than_s`` given, just before the first
        id of that many seconds ago (by the Redis server's clock); ``pinned``: no later than the newest dead letter
        now (``-`` when there is none), so that a walk leaves those set aside while it goes."""
        if older_than_s is not None:
            if not (isinstance(older_than_s, int | float) and math.isfinite(older_than_s) and older_than_s >= 0):
                raise ValueError(f"older_than_s must be a finite number of seconds, 0 or more, not {older_than_s!r}")
            secs, micros = await self.redis.time()
            return f"({max(0, secs * 1000 + micros // 1000 - int(older_than_s * 1000))}-0"
        if not pinned:
            return "+"
        newest = await self.store.call("XREVRANGE", self.keys.dead, "+", "-", "COUNT", 1)
        return _text(newest[0][0]) if newest else "-"

    async def delete_all_dead_letters(self, *, older_than_s: float | None = None, page: int = 1000
                                      ) -> tuple[list[str], list[str]]:
        """Delete every dead letter there is now (``flowdsl dead-letters --delete-all``), or those set aside longer
        ago than ``older_than_s`` seconds; a dead letter set aside meanwhile is left. Reads and deletes ``page``
        at a time (so that a million dead letters, each holding its message, are never held at once); returns the
        ids deleted and those that were gone when their turn came (put back or deleted by someone else
        meanwhile)."""
        end = await self._dead_end(older_than_s, pinned=True)
        deleted: list[str] = []
        skipped: list[str] = []
        start = "-"
        while end != "-":
            reply = await self.store.call("XRANGE", self.keys.dead, start, end, "COUNT", page)
            ids = [_text(entry_id) for entry_id, _ in reply or ()]
            if not ids:
                break
            done = set(await self.delete_dead_letters(ids))
            deleted += [d for d in ids if d in done]
            skipped += [d for d in ids if d not in done]
            if len(ids) < page:
                break
            start = "(" + ids[-1]
        return deleted, skipped

    async def dead_letters_of(self, run_id: str) -> list[DeadLetter]:
        """The dead letters whose message names run ``run_id`` — of this run: a task message of an earlier run of
        the same id (expired since) carries another generation and is left out — oldest first, all of them."""
        born = await self.store.call("HGET", self.keys.run(run_id), "born")
        return [letter for letter in await self.dead_letters(limit=None)
                if (letter.message or {}).get("run_id") == run_id and letter.fields.get("g", born) == born]

    async def dead_letter(self, dead_id: str) -> DeadLetter:
        """One dead letter; raises :class:`DeadLetterNotFound` (``ValueError`` for an id that cannot be one)."""
        if not _STREAM_ID_RE.match(dead_id):
            raise ValueError(f"'{dead_id}' is not a dead letter id: they look like 1733260800000-0")
        reply = await self.store.call("XRANGE", self.keys.dead, dead_id, dead_id)
        if not reply:
            raise DeadLetterNotFound(dead_id, self.keys.prefix)
        return _dead_letter(*reply[0])

    async def requeue_dead_letter(self, dead_id: str) -> str:
        """Put a dead letter back on the stream it came from (once what made it fail is fixed); returns the new
        entry's id. The entry takes over what the original held: whoever handles it first queues again the
        tasks held under the original, as after a crash, and handles it as new."""
        letter = await self.dead_letter(dead_id)  # (an entry that had a ``t`` keeps it: REQUEUE copies it as it is)
        code, new_id = await self.store.requeue(dead_id, letter.stream, Keys.trigger(letter.stream, letter.entry_id))
        if code == 0:
            raise DeadLetterNotFound(dead_id, self.keys.prefix)  # put back or deleted meanwhile
        if code != 1 or new_id is None:
            raise ValueError(f"dead letter '{dead_id}' changed while it was being put back; try again")
        return new_id

    async def delete_dead_letter(self, dead_id: str) -> None:
        """Delete a dead letter for good; raises :class:`DeadLetterNotFound` when there is none."""
        await self.dead_letter(dead_id)  # (checks the id)
        if not await self.store.call("XDEL", self.keys.dead, dead_id):
            raise DeadLetterNotFound(dead_id, self.keys.prefix)

    async def delete_dead_letters(self, dead_ids: list[str]) -> list[str]:
        """Delete dead letters for good, many at once (``flowdsl dead-letters --delete-all``): the ids of those
        deleted, in order — an id that names none (put back or deleted meanwhile, or never one) is left out.
        ``ValueError`` for an id that cannot be a dead letter's, before anything is deleted."""
        for dead_id in dead_ids:
            if not _STREAM_ID_RE.match(dead_id):
                raise ValueError(f"'{dead_id}' is not a dead letter id: they look like 1733260800000-0")
        deleted: list[str] = []
        for i in range(0, len(dead_ids), 1000):  # one XDEL each (each says whether it deleted), pipelined
            batch = dead_ids[i:i + 1000]
            done = await asyncio.gather(*(self.store.call("XDEL", self.keys.dead, d) for d in batch))
            deleted += [d for d, n in zip(batch, done, strict=True) if n]
        return deleted

    async def _result(self, run_id: str, journal: Journal) -> RunResult | None:
        record = await self.store.load(run_id)
        if record is None:
            return None
        plan, state = record.plan, record.state
        wall = None
        if state.get("finished_at") is not None:
            wall = float(state["finished_at"] - state["started_at"])
        return RunResult.from_state(plan, state, journal.events, wall_ms=wall, llm_calls=journal.llm_calls())


async def _reconnect(backoff: Backoff, exc: Exception, on_notice: NoticeHook | None) -> None:
    """Following lost its connection, or Redis refuses to answer for now (a failover under way, out of memory):
    say so the first time in a row, then wait the backoff's next delay."""
    if backoff.failures == 0 and on_notice is not None:
        if isinstance(exc, redis.ResponseError):
            on_notice(f"Redis refuses for now ({exc}); the run goes on in the worker processes; reading it again "
                      "with backoff")
        else:
            on_notice(f"lost the connection to Redis ({exc}); reconnecting")
    await backoff.wait()


#: seconds following a run past its end keeps quiet about an attempt it gave up on: one whose worker answers its
#: cancel (an async worker that does not ignore it) lets go of its lease within a round trip or two
_CANCEL_SETTLE_S = 0.5


def input_id(run_input: dict[str, Any]) -> str:
    """A digest of a run input (SHA-256 of its JSON with sorted keys): tells one submission from another."""
    return hashlib.sha256(dumps(run_input, sort_keys=True)).hexdigest()[:32]


def _int(raw: bytes | None) -> int | None:
    return int(raw) if raw else None


def _text(raw: bytes | str | None) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw or ""


#: the fields of a run's hash a listing line is made of (:func:`_info`)
_INFO_FIELDS = ("status", "flow", "submitted", "started", "finished", "resolved")


def _info(run_id: str, got: list[bytes | None]) -> RunInfo:
    status, flow = got[0], got[1]
    said = status.decode() if status else "submitted"
    if said == "needs_intervention" and len(got) > 5 and got[5] is not None:
        said = "resolved"
    return RunInfo(run_id, flow.decode() if flow else None, said, _int(got[2]), _int(got[3]), _int(got[4]))


def _who() -> str:
    """Who this process runs as: ``user@host`` (what a resolution records when it is not told)."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError, ImportError):  # (no login name in the environment, no password entry)
        user = "?"
    return f"{user}@{socket.gethostname()}"
