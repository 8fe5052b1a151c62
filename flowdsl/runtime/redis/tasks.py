"""The worker process's held tasks: take the lease, run the step, report its outcome, chain, hand back.

Stage: runtime: redis. Imports ``flowdsl.kernel`` (its rules check), ``flowdsl.runtime.execute`` (to run steps),
``flowdsl.runtime.codec``, this package's ``advance``, ``connection`` and ``serving``, and stdlib.
:class:`Tasks` is mixed into :class:`~flowdsl.runtime.redis.worker.RedisWorker` (whose attributes it uses); this is
the worker's hot path, one turn of :meth:`Tasks._serve`'s loop per step:

- **pickup** — takes the task's lease (``PICKUP``: dropped when the task is no longer in flight, another
  delivery holds it, or its step's timeout passed before it was picked up — its timer times it out; a task taken
  over is first recovered: the tasks held under its entry are queued again and the run's outbox relayed), under a
  free slot.
- **execute** — runs it with :func:`flowdsl.runtime.execute.execute` in the handler's own task; a cancel request
  or a hand-back interrupts it (:meth:`~flowdsl.runtime.redis.control.Control._interrupt`) and the interruption is
  taken back here.
- **report** — applies the answer through the kernel with a lease guard, retried while Redis is unreachable or
  refusing work for now; a result from a worker that lost its lease is rejected and journaled, and a rejected
  success is reported again once its task has ended (:mod:`.late_results`); a result the kernel rejects (its
  attempt had timed out or ended) is counted and said too (:meth:`Tasks._result_refused`). The stream entry is
  acknowledged (and deleted) only with the transition and its relay.
- **chain** — when that transition dispatches a task this process serves, the task is held here at once
  (self-dispatch, :class:`~flowdsl.runtime.redis.advance.Chain`) and run next, under the same pending entry.
- **hand back** — stopping, a task is given back: its lease released, its message queued again, this delivery
  acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from time import perf_counter
from typing import TYPE_CHECKING, Any

from flowdsl.kernel import check_rules
from flowdsl.runtime.codec import dumps
from flowdsl.runtime.execute import execute, wait_for_thread
from flowdsl.runtime.redis.advance import Chain, Contended, Outcome
from flowdsl.runtime.redis.connection import TRANSIENT, Backoff
from flowdsl.runtime.redis.serving import Held, describe, for_now
from flowdsl.shown import visible

if TYPE_CHECKING:
    from flowdsl.runtime.redis.advance import Advancer
    from flowdsl.runtime.redis.keys import Keys
    from flowdsl.runtime.redis.serving import WorkerOptions, WorkerStats
    from flowdsl.runtime.redis.store import Store
    from flowdsl.workers import WorkerRegistry

__all__ = ["Tasks"]

log = logging.getLogger("flowdsl.redis")


class Tasks:
    """Held tasks: pickup, execution, report, chain, hand-back (see the module doc); a mixin of ``RedisWorker``."""

    # what the worker provides
    name: str
    keys: Keys
    options: WorkerOptions
    stats: WorkerStats
    registry: WorkerRegistry
    store: Store
    advancer: Advancer
    _by_task: dict[str, Held]
    _late: set[asyncio.Task[None]]
    _stopping: bool
    _slots: asyncio.Semaphore | None
    _closed_on: Callable[[Backoff, BaseException], Coroutine[Any, Any, None]]
    _serves: Callable[[dict[str, Any]], bool]
    _unhold: Callable[[Held], None]
    _loss_causes: Callable[[], str]
    _late_result: Callable[[str, dict[str, Any], str, str], Coroutine[Any, Any, None]]
    _late_done: Callable[[asyncio.Task[None]], None]
    #: called with the command, the answer's type and the seconds it took, for every step executed here (None:
    #: nothing is timed; ``flowdsl worker --metrics-port`` sets it)
    on_step: Callable[[dict[str, Any], str, float], None] | None

    async def _task(self, held: Held, recover: bool) -> None:
        assert self._slots is not None
        try:
            async with self._slots:
                if self._stopping:
                    if not recover:
                        await self._hand_back(held)
                    # a delivery taken over from a process that may have died is left pending, not handed
                    # back: its task may be held under it, with an outbox to relay, which only a taker's
                    # recovery (RECOVER, then _flush) puts right; another process takes it after the lease
                    return
                await self._run_task(held, recover)
        except TRANSIENT:
            pass  # Redis went away mid-way and we are stopping: the entry is reclaimed after the lease
        finally:
            self._unhold(held)

    async def _run_task(self, held: Held, recover: bool) -> None:
        ack = [self.store.ack_op(held.stream, held.entry_id, self.name)]
        if recover:
            self.stats.reclaimed += 1
        backoff = Backoff()
        while True:
            try:
                if recover:
                    await self.advancer.recover(held.run_id, held.trigger)
                code, value = await self.store.pickup(held.run_id, held.task_id, held.trigger, held.token,
                                                      held.outbox_version, held.generation)
                break
            except TRANSIENT as exc:
                if self._stopping:
                    raise
                recover = True
                await self._closed_on(backoff, exc)
        log.debug("pickup %s entry %s recover=%s: %s", held.task_id, held.entry_id, recover, code)
        if code == 4:  # a newer flowdsl's run: its step is not run here (left pending: see _guarded)
            check_rules(int(value), held.run_id)
        if code == 5:  # too late to start: run now, it could only make an effect its timeout has ruled out
            self.stats.expired += 1
            log.info("worker %s: attempt %s not started: its step's timeout had passed %s ms before it was picked up "
                     "(a step's timeout counts from its dispatch: the wait in its stream and the round trips to Redis "
                     "count); the run times it out", self.name, held.task_id, value, extra={"run_id": held.run_id})
        if code in (0, 3, 5):
            if code != 5:
                self.stats.dropped += 1
            await self.advancer.relay(None, None, ack)
            return
        await self._serve(held, ack, code)

    async def _serve(self, held: Held, ack: list[dict[str, Any]], code: int) -> None:
        """Run the held task (``code`` 2: answer it cancelled) and report its outcome; while the transition
        hands this process the run's next task (self-dispatch), run that one too, under the same entry."""
        held.picked = True
        # one chain offer (its token is the entry's throughout) and one look-up of the handler's task serve every
        # step of the chain: a chained step makes neither again
        offer = Chain(held.token, self._serves)
        handler = asyncio.current_task()
        wait_for_thread.set(held)  # (a sync worker's job is kept on it; see _cancel_requested)
        while True:
            event = await self._execute(held, code == 2, handler)
            if event is None:
                return  # handed back
            offer.command = None  # (a transition that takes no task leaves it as it is)
            chain = None if self._stopping else offer
            await self._report(held, event, ack, chain)
            if chain is None or chain.command is None:
                return  # the entry was acknowledged with the transition's relay
            self.stats.chained += 1
            if self._by_task.get(held.task_id) is held:
                del self._by_task[held.task_id]
            held.task_id, held.command, held.raw, held.outbox_version = chain.command["task_id"], chain.command, \
                None, ""
            held.cancel, held.thread, code = False, None, 1
            self._by_task[held.task_id] = held
            if self._stopping:
                await self._hand_back(held)  # held already: give it to another process at once
                return

    async def _execute(self, held: Held, cancelled: bool, handler: asyncio.Task[Any] | None
                       ) -> dict[str, Any] | None:
        """The input event answering the held task, or None when it was handed back (graceful stop).
        ``handler``: the task running this (``asyncio.current_task()``)."""
        if cancelled or held.cancel:
            return {"type": "task_cancelled", "task_id": held.task_id}
        self.stats.tasks += 1
        observe = self.on_step
        began = perf_counter() if observe is not None else 0.0
        # the worker runs in this handler's own task (no task of its own: no extra turns of the loop); to stop
        # it, _interrupt cancels the handler while it is here, and the cancellation is taken back below
        held.handler = handler
        try:
            event = await execute(held.command, registry=self.registry, lm=self.options.lm)
        except asyncio.CancelledError:
            handler, held.handler = held.handler, None  # from here on, nothing more to interrupt
            if not held.interrupted or handler is None or handler.uncancel() > 0:
                raise  # cancelled from outside (stopping at once)
            held.interrupted = False
            if held.hand_back:
                await self._hand_back(held)
                return None
            if observe is not None:
                observe(held.command, "task_cancelled", perf_counter() - began)
            return {"type": "task_cancelled", "task_id": held.task_id}
        finally:
            held.handler = None
        if observe is not None:
            observe(held.command, event["type"], perf_counter() - began)
        if held.interrupted:  # the worker swallowed the interrupt's cancellation and returned: take that cancel
            # back too, else the handler stays "being cancelled": a task chained here next could not be
            # interrupted, and a CancelledError it raised itself would pass for a cancellation
            held.interrupted = False
            if handler is not None:
                handler.uncancel()
        return event

    async def _report(self, held: Held, event: dict[str, Any], ack: list[dict[str, Any]],
                      chain: Chain | None) -> None:
        mode = "strict" if event["type"] == "task_cancelled" else "lease"
        backoff: Backoff | None = None
        while True:  # report until Redis takes it (the heartbeat keeps the lease meanwhile): a result in hand is
            # never dropped for an outage or a refusal for now (out of memory, …) — the step would run again
            try:
                if chain is not None and backoff is None:  # (the usual case: apply_event's straight line)
                    outcome = await self.advancer.report(held.run_id, event, (held.task_id, mode, held.token),
                                                         self.name if mode == "lease" else "", ack, chain)
                else:
                    outcome = await self.advancer.apply_event(
                        held.run_id, event, guard=(held.task_id, mode, held.token),
                        reporter=self.name if mode == "lease" else "", ack=ack, recover=backoff is not None,
                        chain=chain)
                break
            except Exception as exc:
                if not (for_now(exc) or isinstance(exc, Contended)):
                    raise
                if backoff is None:
                    backoff = Backoff()
                    log.warning("worker %s: reporting %s failed for now (%s); retrying with backoff", self.name,
                                held.task_id, describe(exc))
                try:
                    await backoff.wait()
                except asyncio.CancelledError:  # stopping: the result in hand is dropped — say so
                    log.warning("worker %s: the %s result of %s was never taken by Redis (%s) and is dropped as the "
                                "process stops: another process runs the step again after the lease, with the same "
                                "idempotency key", self.name, event["type"], held.task_id, describe(exc))
                    raise
        if outcome == Outcome.MISSING:
            log.warning("worker %s: the %s result of %s is dropped: its run is gone from Redis (%s)%s", self.name,
                        event["type"], held.task_id, self._loss_causes(),
                        "; its effect, if it has one, is undone by nobody (idempotency key "
                        f"{held.command.get('idempotency_key', '?')})" if event["type"] == "task_succeeded" else "")
        if outcome == Outcome.REJECTED and mode == "lease":
            self.stats.rejected += 1
            held.lost = True  # (said here: the heartbeat, which may have read the lease meanwhile, says it no more)
            log.warning("worker %s: result of %s rejected: its lease had been lost (another process took its entry "
                        "over)", self.name, held.task_id, extra={"run_id": held.run_id})
            if event["type"] == "task_succeeded":  # its effect may have to be undone: the kernel must see it
                task = asyncio.ensure_future(self._late_result(held.run_id, dict(event), held.token,
                                                               held.generation))
                self._late.add(task)
                task.add_done_callback(self._late_done)

    def _result_refused(self, run_id: str, task_id: str, result_type: str, reason: str,
                        late: dict[str, Any] | None) -> None:
        """A result this process reported was written, and the kernel rejected it (``result_rejected``): its
        attempt was no longer in flight — it had timed out, or another process answered it after this one lost its
        lease — or the run had ended. ``late``: the ``late_completion`` the run made of a success, if any."""
        self.stats.rejected += 1
        why = "its attempt was no longer in flight (it had timed out, or another process answered it after this " \
            "one lost its lease)" + ("; the run had ended" if reason == "run finished" else "")
        if late is None:
            took = ""
        elif late.get("by_hand", True):
            took = (f"; the run took it as a late completion of step {visible(str(late.get('step')))}, left to undo "
                    f"by hand (`flowdsl status {run_id}` says how)")
        else:
            took = (f"; the run took it as a late completion of step {visible(str(late.get('step')))}, undone with the "
                    "rest of the saga")
        log.warning("worker %s: result of %s (%s) rejected: %s%s", self.name, task_id, result_type, why, took,
                    extra={"run_id": run_id})

    async def _hand_back(self, held: Held) -> None:
        """Give a task back: release its lease, queue its message again, acknowledge this delivery."""
        if held.picked:
            await self.store.release(held.run_id, held.task_id, held.token)
        raw = held.raw if held.raw is not None else dumps(held.command)
        generation = held.generation if held.raw is not None else \
            ((await self.store.call("HGET", self.keys.run(held.run_id), "born")) or b"").decode()
        await self.advancer.relay(None, None, [{"o": "task", "q": self.keys.queue_of(held.command), "raw": raw,
                                                "v": held.outbox_version, "g": generation},
                                               self.store.ack_op(held.stream, held.entry_id, self.name)])
        self.stats.handed_back += 1
