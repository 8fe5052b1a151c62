"""The worker process's late results: a success the lease guard rejected, reported again once its task has ended.

Stage: runtime: redis. Imports this package's ``advance``, ``connection`` and ``serving``, and stdlib.
:class:`LateResults` is mixed into :class:`~flowdsl.runtime.redis.worker.RedisWorker` (whose attributes it uses).

A paused process may complete an attempt after another process took its task over (docs/runtime.md, "A lease is
not a fence"): the guard rejects its result. A success is kept, since its effect may have to be undone, and
reported again once per lease (:meth:`LateResults._late_result`, one task each, in ``_late``) until the guard lets
it through and the kernel sees it, the run is gone, or ``late_leases`` leases have passed; stopping, the process
tries each once more (``_late_wake``), then gives up. :meth:`LateResults._late_done` says why one failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flowdsl.runtime.redis.advance import Outcome
from flowdsl.runtime.redis.connection import TRANSIENT
from flowdsl.runtime.redis.serving import for_now

if TYPE_CHECKING:
    from flowdsl.runtime.redis.advance import Advancer
    from flowdsl.runtime.redis.keys import Keys
    from flowdsl.runtime.redis.serving import WorkerOptions, WorkerStats
    from flowdsl.runtime.redis.store import Store

__all__ = ["LateResults"]

log = logging.getLogger("flowdsl.redis")


class LateResults:
    """Rejected successes reported again (see the module doc); a mixin of ``RedisWorker``."""

    # what the worker provides
    name: str
    keys: Keys
    options: WorkerOptions
    stats: WorkerStats
    store: Store
    advancer: Advancer
    lease_ms: int
    _late: set[asyncio.Task[None]]
    _late_wake: asyncio.Event | None
    _config_error: Callable[[BaseException, str], bool]

    def _late_done(self, task: asyncio.Task[None]) -> None:
        self._late.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            assert exc is not None
            if not self._config_error(exc, "while reporting a late result again"):
                log.error("worker %s: reporting a late result again failed: %s: %s", self.name, type(exc).__name__,
                          exc)

    async def _late_result(self, run_id: str, event: dict[str, Any], token: str, generation: str) -> None:
        """Report again a success the lease guard rejected because another process held its task (its lease
        had expired; docs/runtime.md, "A lease is not a fence"): once per lease, for at most ``late_leases``
        leases, until the guard lets it through — the task has ended (its entry in the tasks hash is gone), and
        the kernel sees a result for a task not in flight: a duplicate of a success is rejected, a success of a
        step recorded cancelled or failed is a late completion. It stops when the run is gone (expired, or
        another run of the same id: its ``born`` differs). Stopping, the process tries once more, then gives
        up. No reporter: a rejection journals no second ``lease_lost`` note (the first one did). The guard
        is the task id's (``…#<attempt>``): never applied to another attempt of the step."""
        assert self._late_wake is not None
        task_id = event["task_id"]
        ours = (f"r:{token}".encode(), f"xr:{token}".encode())
        if not generation:  # (a chain begun by a start request holds none) the run's, read now: it exists now
            with contextlib.suppress(*TRANSIENT):
                generation = ((await self.store.call("HGET", self.keys.run(run_id), "born")) or b"").decode()
            if not generation:
                return
        for _ in range(max(1, self.options.late_leases)):
            final = self._late_wake.is_set()
            if not final:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.lease_ms / 1000):
                        await self._late_wake.wait()
                final = self._late_wake.is_set()
            try:
                (version, born), lease = await asyncio.gather(
                    self.store.call("HMGET", self.keys.run(run_id), "v", "born"),
                    self.store.call("HGET", self.keys.tasks(run_id), task_id))
                if version is None or born is None or born.decode() != generation:
                    return  # the run is gone (expired; or another run of the same id has started since)
                if lease is not None and lease not in ours and not lease.startswith(b"xr:"):
                    outcome = Outcome.REJECTED  # held by another, not being cancelled: the script would refuse it
                else:
                    outcome = await self.advancer.apply_event(run_id, event, guard=(task_id, "lease", token))
            except Exception as exc:
                if not for_now(exc):
                    raise
                outcome = Outcome.REJECTED  # tried again next lease
            if outcome == Outcome.APPLIED:
                self.stats.late += 1
                log.warning("worker %s: the late result of %s was reported again, its task having ended",
                            self.name, task_id)
            if outcome != Outcome.REJECTED or final:
                return
        log.warning("worker %s: gave up reporting the late result of %s again: another process held its task "
                    "for %d leases", self.name, task_id, self.options.late_leases)
