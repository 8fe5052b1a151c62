"""What the modules of the Advancer share: its outcomes, limits and chain offers, and the per-run lock.

Stage: runtime: redis. Imports ``flowdsl.kernel`` (the decision type) and stdlib. :mod:`.advance` puts the
:class:`~flowdsl.runtime.redis.advance.Advancer` together from :mod:`.advance_start`, :mod:`.advance_commit` and
:mod:`.advance_end`; they all read this module, which imports none of them (``advance`` re-exports its public
names, where they are documented):

- :class:`Outcome` (what became of an input event), :class:`Contended` (a run every other process wrote first);
- the limits: :data:`SCHEDULE_TO_START_TIMEOUT`, :data:`SNAPSHOT_BYTES`, :data:`SNAPSHOT_LIMIT`,
  :data:`CHAIN_REPLAY`, :data:`GROUP_COMMIT`;
- :class:`Chain` (an offer to run the next task here) and :func:`nonces` (the tokens of leases and transitions);
- the per-run lock (:class:`_RunLock`), which exists only while held.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from flowdsl.kernel import Decision

__all__ = ["CHAIN_REPLAY", "GROUP_COMMIT", "SCHEDULE_TO_START_TIMEOUT", "SNAPSHOT_BYTES", "SNAPSHOT_LIMIT", "Chain",
           "Contended", "Outcome", "nonces"]


class Contended(RuntimeError):
    """A run's event could not be applied: other processes wrote the run every time first (a storm of version
    conflicts). Nobody's fault, least of all the message's: its trigger stays pending for its next holder."""


#: the error type of an attempt no worker picked up before the run's schedule-to-start deadline
SCHEDULE_TO_START_TIMEOUT = "ScheduleToStartTimeout"
#: a state is written whole every transition while under this size, every ⌈size / this⌉ transitions above it
SNAPSHOT_BYTES = 16 * 1024
#: a state larger than this is not written whole after a run's first transition (one Redis value holds at most
#: 512 MB, one command 1 GB): loading the run replays its journal from the last snapshot instead
SNAPSHOT_LIMIT = 256 * 1024 * 1024
#: a chain (the run's one task in flight runs in the process that dispatched it) writes the state whole
#: at most once per this many transitions: the process has it cached, and a taker replays at most these
CHAIN_REPLAY = 16
#: at most this many input events queued for one run are written by one transition (a group commit)
GROUP_COMMIT = 64
#: version conflicts in a row after which an event is left to its trigger's next holder (after the lease);
#: between conflicts the process backs off (0-50 ms, jittered) so that one process hammering a run with its
#: cached state cannot starve another one's result
_MAX_CONFLICTS = 1000


class Outcome:
    """What happened to an input event: applied, rejected by a guard, or not applicable."""

    APPLIED = "applied"  # written (the kernel may still have rejected a stale result: result_rejected)
    REJECTED = "rejected"  # a guard failed (a lost lease, a task picked up meanwhile)
    SKIPPED = "skipped"  # nothing to do (a timer no longer armed, a run already started)
    MISSING = "missing"  # no such run (never started, or expired)
    INVALID = "invalid"  # the kernel refused the event (ValueError); logged


def nonces(random_bytes: int) -> Iterator[str]:
    """Strings unique to this process (a random prefix, drawn once) and to each draw (a counter after it)."""
    prefix = secrets.token_hex(random_bytes)
    return (f"{prefix}.{n:x}" for n in itertools.count())


class Chain:
    """An offer to run, in the calling process, the next task a transition dispatches (self-dispatch).

    The transition that dispatches a task ``serves(command)`` accepts takes the task's lease at once under
    ``token`` (``<trigger>|<consumer>|<nonce>``: the stream entry that triggered it stays pending, so the
    task is found again if the process dies) and keeps its message in the run's outbox instead of queueing
    it; ``command`` is then a fresh copy of that dispatch command, and the trigger is not acknowledged.
    """

    __slots__ = ("command", "serves", "token")

    def __init__(self, token: str, serves: Callable[[dict[str, Any]], bool]):
        self.token = token
        self.serves = serves
        self.command: dict[str, Any] | None = None


#: an input event applied: (event, the kernel's decision, guard, reporter, chain offer)
_Applied = tuple[dict[str, Any], Decision, "tuple[str, str, str] | None", str, "Chain | None"]


#: the waiters for a run's lock, in order — or :data:`_NO_WAITERS`
_Waiters = deque[asyncio.Future[None]] | tuple[()]
#: a run's lock held with nobody waiting (the usual case): no queue is made until someone waits
_NO_WAITERS: tuple[()] = ()


class _RunLock:
    """A per-run lock that exists only while held: uncontended (the usual case) it costs a dict entry and no
    future; waiters queue in FIFO order and are handed the lock directly."""

    __slots__ = ("run_id", "table")

    def __init__(self, table: dict[str, _Waiters], run_id: str):
        self.table = table
        self.run_id = run_id

    async def __aenter__(self) -> None:
        waiters = self.table.get(self.run_id)
        if waiters is None:
            self.table[self.run_id] = _NO_WAITERS
            return
        if not isinstance(waiters, deque):  # (held, and the first to wait: the queue is made now)
            waiters = self.table[self.run_id] = deque()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed the lock as we were cancelled: pass it on
            elif waiter in waiters:  # (a release may have dropped it already)
                waiters.remove(waiter)
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        _release(self.table, self.run_id)


def _release(table: dict[str, _Waiters], run_id: str) -> None:
    """Release a run's lock: to its first waiter still waiting, else the lock goes (see :class:`_RunLock`)."""
    waiters = table[run_id]
    if isinstance(waiters, deque):
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the lock passes to it
                return
    del table[run_id]
