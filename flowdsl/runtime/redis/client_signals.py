"""Signals sent to runs: checked, handed to the run's worker processes, and followed to what the run made of them.

Stage: runtime: redis. Imports redis, ``flowdsl.kernel`` (the end states), ``flowdsl.runtime.codec``,
``flowdsl.runtime.execute`` (JSON and text checks), ``flowdsl.runtime.local_waits`` (the check of a signal's key,
the one a local run makes), ``flowdsl.runtime.parking`` (how a signal is named), ``flowdsl.shown`` and this
package's ``client_listing``, ``client_follow``, ``connection``, ``keys``, ``store`` and ``wire``, and stdlib.
:class:`Signalling` is mixed into :class:`~flowdsl.runtime.redis.client.RedisClient` (whose attributes it uses);
``client`` re-exports its public names.

A signal travels as a cancel request does: the client checks the run and leaves a message on a stream of its own
(``{P}:signals``), which every worker process reads whether or not it has a free slot; the process that reads it
applies it through the kernel (the ``signal`` input event) in one transition, and only then acknowledges the
message — so a process that dies in between leaves it pending, and another takes it over after the lease. Each
signal has an id (made here, or the caller's own): the transition that applies it records the id in the run's hash
(``sig:<id>``, the journal entry it wrote) and refuses an id recorded already, so a signal is applied once however
often it is delivered — taken over after a crash, applied late by a paused process, or sent again under its id by a
caller that did not hear back (docs/runtime.md, "Signals: what a waiting run waits for"). An id is one signal's:
before sending, the client records in the run's hash what it is sent for (``sigd:<id>``: the digest of the name,
the payload and the key, atomically, once), and refuses to send another signal under that id
(:class:`SignalIdReused`).

A keyed wait (``key:``, one instance per item of a for_each) takes its signal with a key, which instance it is for:
the client requires one for such a wait's signal and refuses one for any other (the local runtime's
:func:`~flowdsl.runtime.local_waits.check_key`), the message carries it, and the outcome is the kernel's answer of
the same name and key.
"""

from __future__ import annotations

import asyncio
import hashlib
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
from flowdsl.runtime.parking import signal_named
from flowdsl.runtime.redis.client_follow import RunGone, read_journal, reconnect
from flowdsl.runtime.redis.client_listing import RunNotFound, _text
from flowdsl.runtime.redis.connection import TRANSIENT, Backoff, ServerFacts, server_unwell
from flowdsl.runtime.redis.keys import GROUP, SIGNAL_FIELD, SIGNAL_ID_FIELD, Keys, check_run_id
from flowdsl.runtime.redis.scripts import SIGNAL_ID, Script
from flowdsl.runtime.redis.store import TRANSITION_LIMIT, RunDamaged, Store, megabytes
from flowdsl.runtime.redis.wire import WireConnection, entry_fields
from flowdsl.runtime.signal_checks import check_key
from flowdsl.shown import visible

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["SIGNAL_LIMIT", "SignalIdReused", "SignalOutcome", "Signalling", "UnknownSignal", "signal_digest",
           "signals_of"]

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
#: once told why a signal is not applied yet, how often that is looked at again (and told again when it changed)
_HINT_EVERY_S = 5.0
#: the digest of a signal's name, payload and key (hex characters), which a run's ``sigd:<id>`` field starts with
_DIGEST_CHARS = 32
#: what separates a keyed signal's name from its key after the digest in a ``sigd:<id>`` field (a name never holds it)
_KEY_MARK = "\x00"

_SIGNAL_ID = Script("signal_id", SIGNAL_ID)
#: what a lost connection's notice adds while the outcome of a signal sent is waited for
_STILL_SENT = " (the signal is sent: it is applied all the same)"


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


class SignalIdReused(ValueError):
    """The signal id was used already, for another signal of the run (another name, another key, or other data)
    (:meth:`Signalling.signal`): nothing was sent. An id is one signal's: sent again under its id, a signal is the
    same one (answered with its outcome); a new signal needs a new id. ``first_key`` and ``key``: the keys of the
    first signal and of this one (None when unkeyed)."""

    def __init__(self, run_id: str, signal_id: str, first: str, name: str, first_key: str | None = None,
                 key: str | None = None):
        if (first, first_key) == (name, key):
            other = f"{signal_named(first, first_key)} with other data"
        elif first_key is None and key is None:
            other = f"signal '{visible(first)}', not '{visible(name)}'"
        elif first == name and key is not None:
            other = f"{signal_named(first, first_key)}, not key '{visible(key)}'"
        else:
            other = f"{signal_named(first, first_key)}, not {signal_named(name, key)}"
        super().__init__(f"signal id '{signal_id}' was already used for {other} (run '{run_id}'); a new signal "
                         "needs a new id: nothing was sent")
        self.run_id, self.signal_id, self.first, self.name = run_id, signal_id, first, name
        self.first_key, self.key = first_key, key


def signal_digest(name: str, payload: dict[str, Any] | None, key: str | None = None) -> str:
    """What a signal is, for its id (:class:`SignalIdReused`): the digest of its name, its payload (None is ``{}``,
    as the kernel takes it), keys sorted, and its key (an unkeyed signal's digest is that of its name and payload
    alone, as before keys)."""
    said: list[Any] = [name, payload or {}] if key is None else [name, payload or {}, key]
    return hashlib.sha256(dumps(said, sort_keys=True)).hexdigest()[:_DIGEST_CHARS]


@dataclass(frozen=True)
class SignalOutcome:
    """What became of a signal sent to a run (:meth:`RedisClient.signal`).

    ``outcome``: ``received`` (its wait waited and took it: the wait succeeded with the payload), ``buffered``
    (its wait has not started — for a keyed wait, no instance has started with its key —: kept in the run, taken
    when it starts), ``rejected`` (nothing could take it — ``reason``, the kernel's words: the run is over or being
    stopped, the wait received one already, was skipped, timed out…) or ``sent`` (handed to the workers, not waited
    for). ``wait``: the wait that took it (its instance key, ``parcels[1]/delivered``), or will (its plan key) —
    rejected, the wait of the run's flow that takes that signal (None only when its flow has none); ``at``: when the
    run applied it (ms, the Redis server's clock; None while not applied, or when the run had ended before it was
    sent: then nothing was sent, and ``reason`` says what the kernel would have said); ``id``: the signal's id
    (sending again under it is applied at most once); ``key``: the key it was sent with (None when unkeyed)."""

    run_id: str
    signal: str
    id: str
    outcome: str
    wait: str | None = None
    reason: str | None = None
    at: int | None = None
    key: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``flowdsl signal --format json`` object, without the run's ``status``."""
        return {"run_id": self.run_id, "signal": self.signal, "key": self.key, "id": self.id,
                "outcome": self.outcome, "wait": self.wait, "reason": self.reason, "at": self.at}


class Signalling:
    """Signals sent to runs (see the module doc); a mixin of ``RedisClient``."""

    # what the client provides
    keys: Keys
    redis: aioredis.Redis
    store: Store
    _url: str | None
    _readers: list[WireConnection]
    #: (run id, signal id) -> the signals stream entry this client sent it as (why it is not applied yet)
    _sent_entries: dict[tuple[str, str], str]
    server_facts: Callable[[], Coroutine[Any, Any, ServerFacts | None]]
    workers: Callable[..., Coroutine[Any, Any, list[dict[str, Any]]]]

    async def signal(self, run_id: str, name: str, payload: dict[str, Any] | None = None, *,
                     key: str | int | None = None, signal_id: str | None = None, wait: bool = True,
                     timeout_s: float | None = None, on_notice: NoticeHook | None = None,
                     hint_after_s: float = 3.0) -> SignalOutcome:
        """Send signal ``name`` with ``payload`` (a JSON object; None is ``{}``) to run ``run_id``, and (``wait``)
        follow the run until it has applied it: a :class:`SignalOutcome`.

        Checks first, sending nothing when one fails: the run exists (:class:`RunNotFound`), its flow has a wait
        that takes ``name`` (:class:`UnknownSignal`, a ``ValueError`` naming the signals it takes), ``key`` fits
        that wait (:func:`~flowdsl.runtime.local_waits.check_key`: a keyed wait's signal needs one — which of its
        instances it is for —, any other signal takes none, ``ValueError`` naming the wait; a key is a non-empty
        string of at most 200 characters, or an integer, taken as its decimal text; another type is a
        ``TypeError``), the payload is a JSON object of at most :data:`SIGNAL_LIMIT` bytes as JSON
        (``ValueError``). A run that has ended is sent nothing: the outcome is ``rejected``, with the reason the
        kernel gives. A run not started yet gets it once it has started; one whose wait has not started (a keyed
        wait: no instance of which has started with that key) keeps it (``buffered``).

        ``signal_id``: the signal's id (printable ASCII, no spaces, at most 200 characters; default: a new random
        one). A signal is applied at most once per id, however often it is sent: a caller that did not hear back
        (its connection lost, its process restarted) sends it again under the same id and gets the first one's
        outcome. An id is one signal's: another name, another key or other data under an id used already is
        refused (:class:`SignalIdReused`, a ``ValueError``), nothing sent.

        ``timeout_s`` bounds the wait for the outcome (``TimeoutError``; the signal stays sent); ``on_notice`` is
        told, after ``hint_after_s``, why it has not been applied yet (no worker process live, the run not started,
        the process that read it silent…), and again whenever that changes. Raises :class:`RunGone` when the run
        disappears meanwhile."""
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
        key = check_key(plan, name, key, takes)
        # what this id is used for, recorded once (before anything is sent under it) and compared
        this = (signal_digest(name, payload, key) + name + ("" if key is None else _KEY_MARK + key)).encode()
        recorded = await _SIGNAL_ID(self.store.batcher, [self.keys.run(run_id)], [SIGNAL_ID_FIELD + sid, this])
        if recorded is None:  # (expired since it was read)
            raise RunNotFound(run_id, self.keys.prefix, await self.server_facts())
        if recorded != this:
            first, _, first_key = recorded[_DIGEST_CHARS:].decode(errors="replace").partition(_KEY_MARK)
            raise SignalIdReused(run_id, sid, first, name, first_key or None, key)
        if applied is not None:  # sent before under this id, and applied: its outcome
            return await self._applied(run_id, sid, _text(applied), takes)
        said = _text(status) or "submitted"
        if said in END_STATES:  # (the kernel would say the same, in a transition of a run that is over)
            return SignalOutcome(run_id, name, sid, "rejected", takes[name],
                                 f"the run has ended ({said}): it waits for nothing more", key=key)
        message = {"type": "signal", "run_id": run_id, "name": name, "payload": payload, "id": sid,
                   "g": _text(born)}
        if key is not None:  # (an unkeyed signal's message is as before keys)
            message["key"] = key
        entry = await self.store.call("XADD", self.keys.signals, "*", "c", dumps(message))
        if len(self._sent_entries) >= 1000:  # (only for telling why a signal is not applied yet: a few kept)
            self._sent_entries.clear()
        self._sent_entries[(run_id, sid)] = _text(entry)
        if not wait:
            return SignalOutcome(run_id, name, sid, "sent", takes[name], key=key)
        since = _text(last[0][0]) if last else "0-0"
        return await self._outcome(run_id, sid, since, takes, timeout_s, on_notice, hint_after_s)

    async def signal_outcome(self, run_id: str, signal_id: str, *, timeout_s: float | None = None,
                             on_notice: NoticeHook | None = None, hint_after_s: float = 3.0) -> SignalOutcome:
        """Wait until run ``run_id`` has applied the signal sent under ``signal_id`` (by :meth:`signal` with
        ``wait=False``, whose outcome's ``id`` it is): its :class:`SignalOutcome` (at once when it was applied
        already). ``timeout_s``, ``on_notice`` and ``hint_after_s`` as for :meth:`signal`; an id never sent is
        waited for until ``timeout_s`` (``TimeoutError``). Raises :class:`RunNotFound`, :class:`RunGone`."""
        check_run_id(run_id)
        last, got = await asyncio.gather(  # (in this order: see signal())
            self.store.call("XREVRANGE", self.keys.journal(run_id), "+", "-", "COUNT", 1),
            self.store.call("HMGET", self.keys.run(run_id), "submitted", "pid", SIGNAL_FIELD + signal_id))
        submitted, pid, applied = got
        plan = await self.store.plan(run_id, pid.decode()) if submitted is not None and pid is not None else None
        if plan is None:
            raise RunNotFound(run_id, self.keys.prefix, await self.server_facts())
        if applied is not None:
            return await self._applied(run_id, signal_id, _text(applied), signals_of(plan))
        since = _text(last[0][0]) if last else "0-0"
        return await self._outcome(run_id, signal_id, since, signals_of(plan), timeout_s, on_notice, hint_after_s)

    async def _applied(self, run_id: str, sid: str, entry_id: str, takes: dict[str, str]) -> SignalOutcome:
        """The outcome of the signal ``sid`` that journal entry ``entry_id`` applied (the run's ``sig:<id>`` field
        names it; ``takes``: :func:`signals_of` the run's plan); raises :class:`RunDamaged` when that entry is not
        one that applied it."""
        for _, fields in await self.store.call("XRANGE", self.keys.journal(run_id), entry_id, entry_id):
            found = _outcome_of(run_id, sid, entry_fields(fields), takes)
            if found is not None:
                return found
        raise RunDamaged(run_id, self.keys.run(run_id), SIGNAL_FIELD + sid,
                         f"names the journal entry {entry_id!r}, which did not apply that signal (or is gone)")

    async def _outcome(self, run_id: str, sid: str, since: str, takes: dict[str, str], timeout_s: float | None,
                       on_notice: NoticeHook | None, hint_after_s: float) -> SignalOutcome:
        """Read the run's journal after ``since`` until the entry that applied signal ``sid``: its outcome. Told
        ``on_notice``, after ``hint_after_s``, why it is not applied yet, and again whenever that changes."""
        key, run_key, field = self.keys.journal(run_id), self.keys.run(run_id), SIGNAL_FIELD + sid
        needle = dumps(sid)[1:-1]  # (the id as the journal's JSON writes it: a cheap look before decoding)
        t0 = checked = time.monotonic()
        hinted: str | None = None  # the kind of reason said last
        hint_at = t0 + hint_after_s
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
                    reply: Any = await read_journal(self.redis, reader, key, since)
                    if not reply and (backoff.failures or time.monotonic() - checked > _CHECK_EVERY_S):
                        checked = time.monotonic()  # (back after an outage, or quiet: the run may be gone)
                        applied, exists = await asyncio.gather(self.store.call("HGET", run_key, field),
                                                               self.store.call("EXISTS", run_key))
                        if applied is not None:
                            return await self._applied(run_id, sid, _text(applied), takes)
                        if not exists:
                            raise RunGone(run_id, await self.server_facts())
                    backoff.reset()
                except TRANSIENT as exc:
                    await reconnect(backoff, exc, on_notice, _STILL_SENT)
                    continue
                except redis.ResponseError as exc:
                    if not server_unwell(exc):
                        raise
                    await reconnect(backoff, exc, on_notice, _STILL_SENT)
                    continue
                for _, entries in reply or ():
                    for entry_id, fields in entries:
                        since = _text(entry_id)
                        outcome = _outcome_of(run_id, sid, entry_fields(fields), takes, needle)
                        if outcome is not None:
                            return outcome
                if on_notice is not None and time.monotonic() > hint_at:
                    hint_at = time.monotonic() + _HINT_EVERY_S
                    why = await self._why_not_applied(run_id, sid)
                    if why is not None and why[0] != hinted:
                        hinted = why[0]
                        on_notice(why[1])
        finally:
            if reader is not None:
                self._readers.append(reader)

    async def _why_not_applied(self, run_id: str, sid: str) -> tuple[str, str] | None:
        """Why signal ``sid`` sent a while ago has not been applied yet, as far as Redis can tell: (the kind of
        reason, the text), or None when it has been applied meanwhile. Worker processes are live as ``flowdsl
        status`` and ``flowdsl workers`` say it (heard from within three leases); a process not heard from for
        longer than a lease (three heartbeats) is said to be silent, as it may have died."""
        records = await self.workers(every=True)
        live = [r for r in records if r.get("live")]
        if not live:
            listed = (f" ({len(records)} listed, not heard from for more than three leases: stopped without a word, "
                      "or cut off)") if records else ""
            return "none", (f"the signal waits in Redis: no worker process is live under this prefix{listed}; start "
                            "one with `flowdsl worker`: it is applied once one reads it")
        run_key = self.keys.run(run_id)
        if await self.store.call("HGET", run_key, "v") is None:
            return "unstarted", ("the run has not started yet: the signal is applied once a worker process has "
                                 "started it")
        secs, micros = await self.redis.time()
        now = int(secs) * 1000 + int(micros) // 1000

        def silent_ms(record: dict[str, Any]) -> int:
            return max(0, now - int(record.get("seen", 0)))

        entry = self._sent_entries.get((run_id, sid))
        if entry is not None:
            pending = await self.store.call("XPENDING", self.keys.signals, GROUP, entry, entry, 1)
            if pending:
                holder, idle = _pending(pending[0])
                record = next((r for r in live if r["name"] == holder), None)
                if record is None:
                    return "holder gone", (f"the worker process that read it ({holder}) is not live any more: "
                                           "another takes it over once its lease has passed, and applies it")
                if silent_ms(record) > int(record.get("lease_ms", 30000)):
                    return "holder silent", (
                        f"the worker process that read it ({holder}) has not been heard from for "
                        f"{silent_ms(record) / 1000:.0f} s (killed, paused, cut off?): once its lease has passed, "
                        "another takes the signal over and applies it")
                return "holder", (f"worker process {holder} read it {idle / 1000:.1f} s ago and has not applied it "
                                  "yet (a slow Redis, or an overloaded process: its log may say)")
            if not await self.store.call("XRANGE", self.keys.signals, entry, entry):
                if await self.store.call("HEXISTS", run_key, SIGNAL_FIELD + sid):
                    return None  # applied meanwhile: the journal says how
                return "gone", ("its message was taken off the signals stream without being applied: set aside as a "
                                "dead letter (`flowdsl dead-letters` lists it), or dropped (the worker processes' "
                                "log says why)")
        quiet = min(silent_ms(r) for r in live)
        if quiet > max(int(r.get("lease_ms", 30000)) for r in live):
            return "silent", (f"no worker process has been heard from for {quiet / 1000:.0f} s ({len(live)} listed "
                              "live until three leases have passed: they may have stopped, or be cut off); the "
                              "signal is applied once one reads it")
        count = f"{len(live)} worker process{'es' if len(live) > 1 else ''} live"
        if entry is None:
            return "live", (f"the signal has not been applied yet ({count}; `flowdsl dead-letters` lists the messages "
                             "set aside, the worker processes' log says what was dropped)")
        return "unread", (f"no worker process has read it yet ({count}): each reads signals whatever its load, "
                          "unless it holds as many signals for runs not started yet as it takes (its log says so)")


def _pending(item: Any) -> tuple[str, int]:
    """The consumer and the idle time (ms) of an entry of an ``XPENDING`` reply (extended form): a list as Redis
    sends it, or redis-py's dict."""
    if isinstance(item, dict):
        return _text(item.get("consumer")), int(item.get("time_since_delivered") or 0)
    return _text(item[1]), int(item[2])


def _outcome_of(run_id: str, sid: str, fields: dict[bytes, bytes], takes: dict[str, str],
                needle: bytes | None = None) -> SignalOutcome | None:
    """The outcome of signal ``sid`` when journal entry ``fields`` is the one that applied it, else None: the
    kernel's answer of the signal's name and key (``takes``: :func:`signals_of` the run's plan, for the wait a
    rejected signal was for; ``needle``: the id as JSON writes it in a string — ``"`` and backslash escaped —,
    looked for in the entry's input event before it is decoded)."""
    raw = fields.get(b"in")
    if not raw or (needle if needle is not None else dumps(sid)[1:-1]) not in raw:  # (most entries: not decoded)
        return None
    event = loads(raw)
    if not isinstance(event, dict) or event.get("type") != "signal" or event.get("id") != sid:
        return None
    name = str(event.get("name"))
    key = event.get("key") if isinstance(event.get("key"), str) else None
    at = event.get("at") if isinstance(event.get("at"), int) else None
    for said in loads(fields.get(b"ev") or b"[]"):
        if said.get("signal") != name or said.get("key") != key:
            continue
        if said["type"] == "signal_received":
            return SignalOutcome(run_id, name, sid, "received", said.get("step"), None, at, key)
        if said["type"] == "signal_buffered":
            return SignalOutcome(run_id, name, sid, "buffered", said.get("wait"), None, at, key)
        if said["type"] == "signal_rejected":
            return SignalOutcome(run_id, name, sid, "rejected", takes.get(name), str(said.get("reason") or ""), at,
                                 key)
    return SignalOutcome(run_id, name, sid, "rejected", takes.get(name), "the run applied it and said nothing of it",
                         at, key)

