"""Listing runs and worker processes: one run's line, the recent runs, the live processes and what none serves.

Stage: runtime: redis. Imports redis (types only), ``flowdsl.runtime.listing`` (the runs listing's line),
``flowdsl.runtime.execute`` (a plan's worker references), ``flowdsl.runtime.codec`` and this package's
``connection``, ``keys``, ``run_waits`` (what a running run waits for: a field of its hash) and ``store``.
:class:`Listing` is mixed into :class:`~flowdsl.runtime.redis.client.RedisClient` (whose attributes it uses):
:meth:`Listing.info` (``flowdsl status``'s line of one run), :meth:`Listing.runs` (``flowdsl runs``),
:meth:`Listing.workers` (the liveness records, :func:`is_live`) and :meth:`Listing.unserved`.

The other modules of the client read this one: :class:`RunNotFound`, what every read of one run raises, and
:func:`_text` and :func:`_int`, how a field of a run's hash is read. ``client`` re-exports its public names.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flowdsl.runtime.codec import loads
from flowdsl.runtime.execute import worker_references
from flowdsl.runtime.listing import RunRow
from flowdsl.runtime.redis.connection import ServerFacts
from flowdsl.runtime.redis.keys import WAITS_FIELD, Keys, check_run_id
from flowdsl.runtime.redis.run_waits import RunWaits, read_waits
from flowdsl.runtime.redis.store import Store, score_pairs

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["RUN_STATES", "Listing", "RunInfo", "RunNotFound", "is_live"]

#: the states a run is listed in (``RunInfo.status``, :meth:`RedisClient.runs`' ``status``): before its start,
#: while it goes, and the end states — ``resolved`` being a run that ended ``needs_intervention`` and that a person
#: has resolved since (:meth:`RedisClient.resolve`); the same list as ``flowdsl runs --status``'s
RUN_STATES = ("submitted", "running", "aborting", "compensating", "completed", "failed", "compensated", "cancelled",
              "needs_intervention", "resolved")


class RunNotFound(LookupError):
    """No run with this id under this prefix (never submitted, or past its retention)."""

    def __init__(self, run_id: str, prefix: str, facts: ServerFacts | None = None):
        evicted = f", or evicted by the server ({facts.eviction()})" if facts is not None and facts.evicts else ""
        super().__init__(f"no run '{run_id}' in Redis under the prefix '{prefix}' (never submitted, "
                         f"or finished longer ago than its retention{evicted})")
        self.run_id = run_id


@dataclass(frozen=True)
class RunInfo(RunRow):
    """One line of ``flowdsl runs``: times are milliseconds since the epoch (None when not reached); the fields
    and the JSON object of a local run's line (:class:`~flowdsl.runtime.listing.RunRow`), and ``waits``: for a
    ``running`` run whose waits wait, what for (:class:`~flowdsl.runtime.redis.run_waits.RunWaits`, read from its
    hash with the rest of the line), else None."""

    waits: RunWaits | None = None

    def to_json(self) -> dict[str, Any]:
        """:meth:`RunRow.to_json`, and for a run that waits ``waits``: ``{signals, timers, due_at}``."""
        out = super().to_json()
        if self.waits is not None:
            out["waits"] = self.waits.to_json()
        return out


def is_live(record: dict[str, Any], now: int) -> bool:
    """Whether a worker process's liveness record (``{<prefix>}:workers``) was written recently: within three of
    its leases and 5 s, by the Redis server's clock ``now`` (ms) — a process that missed that many heartbeats is
    taken for gone (killed, paused, cut off)."""
    return now - int(record.get("seen", 0)) <= 3 * int(record.get("lease_ms", 30000)) + 5000


class Listing:
    """Runs and worker processes listed (see the module doc); a mixin of ``RedisClient``."""

    # what the client provides
    keys: Keys
    redis: aioredis.Redis
    store: Store
    server_facts: Callable[[], Coroutine[Any, Any, ServerFacts | None]]

    async def info(self, run_id: str) -> RunInfo:
        """Status and times of one run; raises :class:`RunNotFound`. A run that ended ``needs_intervention`` and
        was resolved since is ``resolved``."""
        check_run_id(run_id)
        got = await self.store.call("HMGET", self.keys.run(run_id), *_INFO_FIELDS)
        if got[0] is None and got[2] is None:
            raise RunNotFound(run_id, self.keys.prefix, await self.server_facts())
        return _info(run_id, got)

    async def runs(self, *, limit: int = 20, status: str | None = None, flow: str | None = None) -> list[RunInfo]:
        """Recent runs, newest first, optionally only those with ``status`` (one of :data:`RUN_STATES`, else
        ``ValueError``; ``needs_intervention``: those not resolved yet, ``resolved``: those resolved) or of
        ``flow``. What a running run waits for comes with its line (``RunInfo.waits``): no read more per run."""
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


def _int(raw: bytes | None) -> int | None:
    return int(raw) if raw else None


def _text(raw: bytes | str | None) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw or ""


#: the fields of a run's hash a listing line is made of (:func:`_info`)
_INFO_FIELDS = ("status", "flow", "submitted", "started", "finished", "resolved", WAITS_FIELD)


def _info(run_id: str, got: list[bytes | None]) -> RunInfo:
    status, flow = got[0], got[1]
    said = status.decode() if status else "submitted"
    if said == "needs_intervention" and len(got) > 5 and got[5] is not None:
        said = "resolved"
    waits = read_waits(got[6]) if said == "running" and len(got) > 6 else None
    return RunInfo(run_id, flow.decode() if flow else None, said, _int(got[2]), _int(got[3]), _int(got[4]), waits)
