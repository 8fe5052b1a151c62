"""Signals sent to runs: checked, handed to the run's worker processes, and followed to what the run made of them.

Stage: runtime: redis. Imports redis, ``flowdsl.kernel`` (the end states), ``flowdsl.runtime.codec``,
``flowdsl.runtime.execute`` (JSON and text checks) and this package's ``client_listing``, ``client_follow``,
``connection``, ``keys``, ``store`` and ``wire``, and stdlib. :class:`Signalling` is mixed into
:class:`~flowdsl.runtime.redis.client.RedisClient` (whose attributes it uses); ``client`` re-exports its public
names.

A signal travels as a cancel request does: the client checks the run and leaves a message on a stream of its own
(``{P}:signals``), which every worker process reads whether or not it has a free slot; the process that reads it
applies it through the kernel (the ``signal`` input event) in one transition, and only then acknowledges the
message — so a process that dies in between leaves it pending, and another takes it over after the lease. Each
signal has an id (made here, or the caller's own): the transition that applies it records the id in the run's hash
(``sig:<id>``, the journal entry it wrote) and refuses an id recorded already, so a signal is applied once however
often it is delivered — taken over after a crash, applied late by a paused process, or sent again under its id by a
caller that did not hear back (docs/runtime.md, "Signals: what a waiting run waits for").
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from flowdsl.kernel import END_STATES
from flowdsl.runtime.codec import dumps, loads
from flowdsl.runtime.execute import json_problem, text_problem
from flowdsl.runtime.redis.client_follow import RunGone
from flowdsl.runtime.redis.client_listing import RunNotFound, _text
from flowdsl.runtime.redis.connection import TRANSIENT, Backoff, ServerFacts, server_unwell
from flowdsl.runtime.redis.keys import SIGNAL_FIELD, Keys, check_run_id
from flowdsl.runtime.redis.store import TRANSITION_LIMIT, RunDamaged, Store, megabytes
from flowdsl.runtime.redis.wire import WireConnection, entry_fields, stream_entries

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["SIGNAL_LIMIT", "SignalOutcome", "Signalling", "UnknownSignal", "signals_of"]

#: the largest signal payload (as JSON) :meth:`Signalling.signal` sends: it is written in the message, the journal
#: entry that applies it and the run's state (the wait's result, and the context), as a run's input is
SIGNAL_LIMIT = TRANSITION_LIMIT // 3 - 1024 * 1024
#: what a signal id may be: printable ASCII without spaces (a webhook's delivery id, a UUID), 1 to 200 characters
_ID_RE = re.compile(r"[!-~]{1,200}\Z")
#: what the outcome of a signal is: ``received`` (its wait took it), ``buffered`` (kept until its wait starts),
#: ``rejected`` (nothing could take it: ``reason`` says why) or ``sent`` (not waited for)
OUTCOMES = ("received", "buffered", "rejected", "sent")
NoticeHook = Callable[[str], None]
#: a signal not applied after this long is looked for in the run's hash (and the run checked to exist) each time
_CHECK_EVERY_S = 2.0


def signals_of(plan: dict[str, Any]) -> dict[str, str]:
    """The signals a plan's runs take: signal name -> the key of the wait node that takes it (a plan has at most
    one wait per signal name)."""
    return {node["signal"]: key for key, node in plan.get("nodes", {}).items()
            if node.get("kind") == "wait" and isinstance(node.get("signal"), str)}


class UnknownSignal(ValueError):
    """The run's flow has no wait that takes this signal (:meth:`Signalling.signal`): nothing was sent."""

    def __init__(self, run_id: str, name: str, flow: str, takes: list[str]):
        said = (f"its waits take {', '.join(repr(s) for s in takes)}" if takes else
                "its flow waits for no signal (no `- wait:` step without `for:`)")
        super().__init__(f"run '{run_id}' (flow '{flow or '?'}') takes no signal {name!r}: {said}; nothing was sent")
        self.run_id, self.name, self.takes = run_id, name, takes


@dataclass(frozen=True)
class SignalOutcome:
    """What became of a signal sent to a run (:meth:`RedisClient.signal`).

    ``outcome``: ``received`` (its wait waited and took it: the wait succeeded with the payload), ``buffered``
    (its wait has not started: kept in the run, taken when it starts), ``rejected`` (nothing could take it —
    ``reason``, the kernel's words: the run is over or being stopped, the wait received one already, was skipped,
    timed out…) or ``sent`` (handed to the workers, not waited for). ``wait``: the wait that took it, or will;
    ``at``: when the run applied it (ms, the Redis server's clock; None while not applied, or when the run had ended
    before it was sent: then nothing was sent, and ``reason`` says what the kernel would have said); ``id``: the
    signal's id (sending again under it is applied at most once)."""

    run_id: str
    signal: str
    id: str
    outcome: str
    wait: str | None = None
    reason: str | None = None
    at: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``flowdsl signal --format json`` object, without the run's ``status``."""
        return {"run_id": self.run_id, "signal": self.signal, "id": self.id, "outcome": self.outcome,
                "wait": self.wait, "reason": self.reason, "at": self.at}


class Signalling:
    """Signals sent to runs (see the module doc); a mixin of ``RedisClient``."""

    # what the client provides
    keys: Keys
    redis: aioredis.Redis
    store: Store
    _url: str | None
    _readers: list[WireConnection]
    server_facts: Callable[[], Coroutine[Any, Any, ServerFacts | None]]
    workers: Callable[..., Coroutine[Any, Any, list[dict[str, Any]]]]

    async def signal(self, run_id: str, name: str, payload: dict[str, Any] | None = None, *,
                     signal_id: str | None = None, wait: bool = True, timeout_s: float | None = None,
                     on_notice: NoticeHook | None = None, hint_after_s: float = 3.0) -> SignalOutcome:
        """Send signal ``name`` with ``payload`` (a JSON object; None is ``{}``) to run ``run_id``, and (``wait``)
        follow the run until it has applied it: a :class:`SignalOutcome`.

        Checks first, sending nothing when one fails: the run exists (:class:`RunNotFound`), its flow has a wait
        that takes ``name`` (:class:`UnknownSignal`, a ``ValueError`` naming the signals it takes), the payload
        is a JSON object of at most :data:`SIGNAL_LIMIT` bytes as JSON (``ValueError``). A run that has ended is
        sent nothing: the outcome is ``rejected``, with the reason the kernel gives. A run not started yet gets it
        once it has started; one whose wait has not started keeps it (``buffered``).

        ``signal_id``: the signal's id (printable ASCII, no spaces, at most 200 characters; default: a new random
        one). A signal is applied at most once per id, however often it is sent: a caller that did not hear back
        (its connection lost, its process restarted) sends it again under the same id and gets the first one's
        outcome. ``timeout_s`` bounds the wait for the outcome (``TimeoutError``; the signal stays sent);
        ``on_notice`` is told, after ``hint_after_s``, why it has not been applied yet (no worker process
        connected, the run not started). Raises :class:`RunGone` when the run disappears meanwhile."""
        check_run_id(run_id)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a signal's name is a non-empty string, not {name!r}")
        problem = text_problem(name)
        if problem is not None:
            raise ValueError(f"the signal's name {problem}")
        if payload is not None:
            problem = json_problem(payload) if isinstance(payload, dict) else \
                f"it is {type(payload).__name__}, not an object"
            if problem is not None:
                raise ValueError(f"the signal's payload is not a JSON object: {problem}")
        raw_payload = dumps(payload)
        if len(raw_payload) > SIGNAL_LIMIT:
            raise ValueError(f"the signal's payload is {megabytes(len(raw_payload))} as JSON: a signal takes at most "
                             f"{megabytes(SIGNAL_LIMIT)} (keep large data out of runs: store it elsewhere and send "
                             "its key)")
        sid = signal_id if signal_id is not None else secrets.token_hex(10)
        if not (isinstance(sid, str) and _ID_RE.match(sid)):
            raise ValueError(f"a signal id is 1 to 200 printable ASCII characters without spaces, not {sid!r}")
        journal, field = self.keys.journal(run_id), SIGNAL_FIELD + sid
        # the journal's end read before the run (one pipeline, in this order): an application of this id between
        # the two reads is in the hash; one after them, in the journal after this end
        last, got = await asyncio.gather(
            self.store.call("XREVRANGE", journal, "+", "-", "COUNT", 1),
            self.store.call("HMGET", self.keys.run(run_id), "submitted", "status", "born", "pid", "flow", field))
        submitted, status, born, pid, flow, applied = got
        plan = await self.store.plan(run_id, pid.decode()) if submitted is not None and pid is not None else None
        if plan is None:
            raise RunNotFound(run_id, self.keys.prefix, await self.server_facts())
        takes = signals_of(plan)
        if name not in takes:
            raise UnknownSignal(run_id, name, _text(flow), sorted(takes))
        if applied is not None:  # sent before under this id, and applied: its outcome
            return await self._applied(run_id, sid, _text(applied))
        said = _text(status) or "submitted"
        if said in END_STATES:  # (the kernel would say the same, in a transition of a run that is over)
            return SignalOutcome(run_id, name, sid, "rejected", takes[name],
                                 f"the run has ended ({said}): it waits for nothing more")
        message = {"type": "signal", "run_id": run_id, "name": name, "payload": payload, "id": sid,
                   "g": _text(born)}
        await self.store.call("XADD", self.keys.signals, "*", "c", dumps(message))
        if not wait:
            return SignalOutcome(run_id, name, sid, "sent", takes[name])
        since = _text(last[0][0]) if last else "0-0"
        return await self._outcome(run_id, sid, since, timeout_s, on_notice, hint_after_s)

    async def signal_outcome(self, run_id: str, signal_id: str, *, timeout_s: float | None = None,
                             on_notice: NoticeHook | None = None, hint_after_s: float = 3.0) -> SignalOutcome:
        """Wait until run ``run_id`` has applied the signal sent under ``signal_id`` (by :meth:`signal` with
        ``wait=False``, whose outcome's ``id`` it is): its :class:`SignalOutcome` (at once when it was applied
        already). ``timeout_s``, ``on_notice`` and ``hint_after_s`` as for :meth:`signal`; an id never sent is
        waited for until ``timeout_s`` (``TimeoutError``). Raises :class:`RunNotFound`, :class:`RunGone`."""
        check_run_id(run_id)
        last, applied, exists = await asyncio.gather(  # (in this order: see signal())
            self.store.call("XREVRANGE", self.keys.journal(run_id), "+", "-", "COUNT", 1),
            self.store.call("HGET", self.keys.run(run_id), SIGNAL_FIELD + signal_id),
            self.store.call("EXISTS", self.keys.run(run_id)))
        if not exists:
            raise RunNotFound(run_id, self.keys.prefix, await self.server_facts())
        if applied is not None:
            return await self._applied(run_id, signal_id, _text(applied))
        since = _text(last[0][0]) if last else "0-0"
        return await self._outcome(run_id, signal_id, since, timeout_s, on_notice, hint_after_s)

    async def _applied(self, run_id: str, sid: str, entry_id: str) -> SignalOutcome:
        """The outcome of the signal ``sid`` that journal entry ``entry_id`` applied (the run's ``sig:<id>`` field
        names it); raises :class:`RunDamaged` when that entry is not one that applied it."""
        for _, fields in await self.store.call("XRANGE", self.keys.journal(run_id), entry_id, entry_id):
            found = _outcome_of(run_id, sid, entry_fields(fields))
            if found is not None:
                return found
        raise RunDamaged(run_id, self.keys.run(run_id), SIGNAL_FIELD + sid,
                         f"names the journal entry {entry_id!r}, which did not apply that signal (or is gone)")

    async def _outcome(self, run_id: str, sid: str, since: str, timeout_s: float | None,
                       on_notice: NoticeHook | None, hint_after_s: float) -> SignalOutcome:
        """Read the run's journal after ``since`` until the entry that applied signal ``sid``: its outcome."""
        key, run_key, field = self.keys.journal(run_id), self.keys.run(run_id), SIGNAL_FIELD + sid
        t0 = checked = time.monotonic()
        hinted = False
        backoff = Backoff()
        reader = (self._readers.pop() if self._readers else WireConnection(self._url, client_name="flowdsl-follow")) \
            if self._url else None
        try:
            while True:
                if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                    raise TimeoutError(f"signal {sid} was not applied to run {run_id} within "
                                       f"{timeout_s:g} s; it stays sent, and is applied once a worker process "
                                       "reads it")
                try:
                    if reader is None:
                        reply: Any = await self.redis.xread({key: since}, count=1000, block=500)
                    else:
                        reply = stream_entries(await reader.blocking(
                            ("XREAD", "COUNT", 1000, "BLOCK", 500, "STREAMS", key, since), 500))
                    if not reply and (backoff.failures or time.monotonic() - checked > _CHECK_EVERY_S):
                        checked = time.monotonic()  # (back after an outage, or quiet: the run may be gone)
                        applied, exists = await asyncio.gather(self.store.call("HGET", run_key, field),
                                                               self.store.call("EXISTS", run_key))
                        if applied is not None:
                            return await self._applied(run_id, sid, _text(applied))
                        if not exists:
                            raise RunGone(run_id, await self.server_facts())
                    backoff.reset()
                except TRANSIENT as exc:
                    await _reconnect(backoff, exc, on_notice)
                    continue
                except redis.ResponseError as exc:
                    if not server_unwell(exc):
                        raise
                    await _reconnect(backoff, exc, on_notice)
                    continue
                for _, entries in reply or ():
                    for entry_id, fields in entries:
                        since = _text(entry_id)
                        outcome = _outcome_of(run_id, sid, entry_fields(fields))
                        if outcome is not None:
                            return outcome
                if not hinted and on_notice is not None and time.monotonic() - t0 > hint_after_s:
                    hinted = True
                    on_notice(await self._why_not_applied(run_id))
        finally:
            if reader is not None:
                self._readers.append(reader)

    async def _why_not_applied(self, run_id: str) -> str:
        """Why a signal sent a while ago has not been applied yet, as far as Redis can tell."""
        if not await self.workers():
            return ("the signal waits in Redis: no worker process is connected under this prefix (start one with "
                    "`flowdsl worker`); it is applied once one reads it")
        if await self.store.call("HGET", self.keys.run(run_id), "v") is None:
            return "the run has not started yet: the signal is applied once a worker process has started it"
        return ("the signal has not been applied yet (the worker processes are busy, or could not handle it: "
                "`flowdsl dead-letters` lists the messages set aside)")


def _outcome_of(run_id: str, sid: str, fields: dict[bytes, bytes]) -> SignalOutcome | None:
    """The outcome of signal ``sid`` when journal entry ``fields`` is the one that applied it, else None."""
    raw = fields.get(b"in")
    if not raw or sid.encode() not in raw:  # (most entries: not decoded)
        return None
    event = loads(raw)
    if not isinstance(event, dict) or event.get("type") != "signal" or event.get("id") != sid:
        return None
    name = str(event.get("name"))
    at = event.get("at") if isinstance(event.get("at"), int) else None
    for said in loads(fields.get(b"ev") or b"[]"):
        if said.get("signal") != name:
            continue
        if said["type"] == "signal_received":
            return SignalOutcome(run_id, name, sid, "received", said.get("step"), None, at)
        if said["type"] == "signal_buffered":
            return SignalOutcome(run_id, name, sid, "buffered", said.get("wait"), None, at)
        if said["type"] == "signal_rejected":
            return SignalOutcome(run_id, name, sid, "rejected", None, str(said.get("reason") or ""), at)
    return SignalOutcome(run_id, name, sid, "rejected", None, "the run applied it and said nothing of it", at)


async def _reconnect(backoff: Backoff, exc: Exception, on_notice: NoticeHook | None) -> None:
    """Following lost its connection, or Redis refuses for now: said the first time in a row, then the backoff."""
    if backoff.failures == 0 and on_notice is not None:
        on_notice(f"lost the connection to Redis ({exc}); reconnecting (the signal is sent: it is applied all the "
                  "same)")
    await backoff.wait()
