"""Dead letters: the stream entries set aside because they could not be handled, listed, put back or deleted.

Stage: runtime: redis. Imports ``flowdsl.runtime.codec`` and this package's ``client_listing``, ``keys``, ``store``
and ``wire``, and stdlib. :class:`DeadLetters` is mixed into :class:`~flowdsl.runtime.redis.client.RedisClient`
(whose attributes it uses): ``flowdsl dead-letters`` lists the :class:`DeadLetter` entries, puts one back on the
stream it came from (:meth:`DeadLetters.requeue_dead_letter`) or deletes them, one, many or all at once.
``client`` re-exports its public names.
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flowdsl.runtime.codec import loads
from flowdsl.runtime.redis.client_listing import _text
from flowdsl.runtime.redis.keys import Keys
from flowdsl.runtime.redis.store import Store
from flowdsl.runtime.redis.wire import entry_fields

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["DeadLetter", "DeadLetterNotFound", "DeadLetters"]


class DeadLetterNotFound(LookupError):
    """No dead letter with this id (never one, or already put back or deleted)."""

    def __init__(self, dead_id: str, prefix: str):
        super().__init__(f"no dead letter '{dead_id}' under the prefix '{prefix}' (already put back or deleted? "
                         "`flowdsl dead-letters` lists them)")
        self.dead_id = dead_id


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


class DeadLetters:
    """Dead letters listed, put back and deleted (see the module doc); a mixin of ``RedisClient``."""

    # what the client provides
    keys: Keys
    redis: aioredis.Redis
    store: Store

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
