"""Stopping a worker process from outside: cancelling the task running ``RedisWorker.serve()``, the signal
handlers it takes and gives back, and an interrupt that an async worker swallows."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
from redis.asyncio.client import PubSub

from flowdsl import compile_text
from flowdsl.runtime.redis import RedisClient, RedisWorker
from flowdsl.runtime.redis.advance import Advancer
from flowdsl.workers import StepContext, WorkerRegistry
from tests.redis.inproc import worker_here
from tests.redis.server import RedisServer

ONE_STEP = "flowdsl: 1\nname: {name}\nsteps:\n  - cw.a: {{compensate: cw.undo}}\n"


def _registry(step: Any, undo: Any = None) -> WorkerRegistry:
    registry = WorkerRegistry()
    registry.register("cw.a", step)
    if undo is not None:
        registry.register("cw.undo", undo)
    return registry


async def _until_reading(server: RedisServer, seconds: float = 10.0) -> None:
    """Wait until a worker's reader is blocked in ``XREADGROUP`` on ``server``."""
    client = server.client()
    try:
        async with asyncio.timeout(seconds):
            while not any(c.get("name", "").startswith("flowdsl-reader") and c.get("cmd") == "xreadgroup"
                          for c in client.client_list()):
                await asyncio.sleep(0.01)
    finally:
        client.close()


async def _until(check: Any, seconds: float = 10.0) -> None:
    async with asyncio.timeout(seconds):
        while not check():
            await asyncio.sleep(0.01)


T = TypeVar("T")


def _watched(main: Callable[[], Coroutine[Any, Any, T]], seconds: float = 30.0) -> T:
    """``asyncio.run(main())`` in a thread of its own, the test failed if it has not ended within ``seconds``: a
    serve() that outlives its cancel, with a loop that never ends, would hang the test — and the suite — rather than
    fail it (awaiting it under a timeout waits for it once more, and so does asyncio.run's own shutdown)."""
    ended: list[T] = []
    raised: list[BaseException] = []

    def run() -> None:
        try:
            ended.append(asyncio.run(main()))
        except BaseException as exc:  # (handed to the test's thread)
            raised.append(exc)

    thread = threading.Thread(target=run, name="watched event loop", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():  # (left behind, a daemon thread: the failure is said, the suite goes on)
        pytest.fail(f"still running after {seconds:g} s: serve() outlived its cancel")
    if raised:
        raise raised[0]
    return ended[0]


async def _cancelled_serve_ends(serving: asyncio.Task[Any], worker: RedisWorker, seconds: float = 10.0) -> None:
    """Cancel serve()'s task and see it end by that cancellation within ``seconds`` — waited for without cancelling
    it again, so that a serve() that outlived its cancel fails the test here, saying what still ran."""
    serving.cancel()
    await asyncio.wait({serving}, timeout=seconds)
    if not serving.done():
        running = sorted(t.get_name() for t in asyncio.all_tasks() if not t.done()
                         and t is not serving and t is not asyncio.current_task())
        pytest.fail(f"serve() still running {seconds:g} s after its cancel; tasks still running: {running}")
    assert serving.cancelled()
    assert all(task.done() for task in worker._active)  # no handler left running after serve()


async def _losing_the_cancel() -> None:
    """The end of a Redis call that loses the cancellation coming meanwhile: it returns as if none had come (what
    Python 3.11's asyncio.wait_for does when its call ended in the turn the cancellation came)."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(30)


async def _end(serving: asyncio.Task[Any], worker: RedisWorker) -> None:
    """(a test's ``finally``) serve() stopped, and waited for at most 10 s: a test that failed still ends."""
    worker.stop(graceful=False)
    serving.cancel()
    await asyncio.wait({serving}, timeout=10)


async def _serve_then_cancel(url: str, prefix: str, registry: WorkerRegistry, until: Callable[[], object],
                             run: str | None = None) -> None:
    """Serve (with a one-step run named ``run`` submitted first, if given) until ``until()`` holds, then cancel
    serve()'s task and see it end by that cancellation (:func:`_cancelled_serve_ends`)."""
    worker = worker_here(url, prefix, registry=registry, llm=False)
    if run is not None:
        async with RedisClient(url, prefix=prefix) as client:
            await client.submit(compile_text(ONE_STEP.format(name=run)), {})
    serving = asyncio.create_task(worker.serve())
    try:
        await _until(until)
        await _cancelled_serve_ends(serving, worker)
    finally:
        await _end(serving, worker)  # (if serve() outlived its cancel: the test fails, but ends)


def test_cancelling_serve_stops_its_step_handlers_too(url: str, prefix: str) -> None:
    """The task running serve() cancelled while a step runs (an application's shutdown): the step is stopped
    with it — left running, with no heartbeat renewing its lease, it would report later, and another process
    may meanwhile have run the same step again."""
    seen: list[str] = []
    slow = _slow_step(seen)

    _watched(lambda: _serve_then_cancel(url, prefix, _registry(slow), lambda: seen, run="orphan"))
    assert seen == ["start", "cancelled"]


def test_cancelling_serve_stops_a_loop_whose_redis_call_lost_the_cancel(url: str, prefix: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancellation that lands inside a Redis call can be lost: the call returns as if none had come (Python
    3.11's asyncio.wait_for, under which redis-py sends each command of a connection with a socket timeout, returns
    the result of a call that ended in the same turn and drops the cancellation). The cancel listener, whose
    SUBSCRIBE lost it, went round for ever — serve() cancelled never checks a stop — and serve() waited for it in its
    ``finally`` (a flaky failure of the test above under load: the subscription was on its way as serve() was
    cancelled)."""
    real = PubSub.subscribe
    lost: list[str] = []

    async def subscribe(self: PubSub, *args: Any, **kwargs: Any) -> None:
        await real(self, *args, **kwargs)
        task = asyncio.current_task()
        if task is not None and task.get_name() == "cancels" and not lost:  # (the listener's; not the startup's)
            lost.append(task.get_name())
            await _losing_the_cancel()

    monkeypatch.setattr(PubSub, "subscribe", subscribe)

    _watched(lambda: _serve_then_cancel(url, prefix, WorkerRegistry(), lambda: lost))


def test_cancelling_serve_stops_a_handler_whose_redis_call_lost_the_cancel(url: str, prefix: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The same loss in a step handler (the start of its run, before it runs the run's first step): left running,
    it went on to run its step after serve() had returned — with no heartbeat renewing its lease."""
    seen: list[str] = []
    slow = _slow_step(seen)

    real = Advancer.start
    started: list[str] = []

    async def start(self: Advancer, *args: Any, **kwargs: Any) -> Any:
        outcome = await real(self, *args, **kwargs)
        started.append("started")
        await _losing_the_cancel()
        return outcome

    monkeypatch.setattr(Advancer, "start", start)

    _watched(lambda: _serve_then_cancel(url, prefix, _registry(slow), lambda: started, run="lost"))
    assert seen in ([], ["start", "cancelled"])  # the step went no further than it had when serve() ended


def test_a_cancel_of_serve_landing_while_it_stops_is_not_swallowed(url: str, prefix: str, server: RedisServer) -> None:
    """A cancellation of serve()'s task that lands while a graceful stop waits for the reader (an
    asyncio.Runner's Ctrl-C) propagates at once: serve() does not return its stats as if nothing happened."""
    async def main() -> None:
        # the reader blocks 20 s in XREADGROUP: the graceful stop below waits that long for it (long enough that a
        # loaded machine, slow to see the reader blocked, still cancels serve() well inside that wait)
        worker = worker_here(url, prefix, registry=WorkerRegistry(), llm=False, block_ms=20_000)
        entered = asyncio.Event()
        shutdown = worker._shutdown

        async def spied(loops: list[asyncio.Task[None]]) -> None:
            entered.set()
            await shutdown(loops)

        worker._shutdown = spied  # type: ignore[method-assign]
        serving = asyncio.create_task(worker.serve())
        try:
            await _until(lambda: getattr(worker, "store", None) is not None)
            await _until_reading(server)  # serving: the reader is blocked
            worker.stop(graceful=True)
            async with asyncio.timeout(10):
                await entered.wait()
            await asyncio.sleep(0.05)  # inside _shutdown, waiting (shielded) for the reader
            serving.cancel()
            t0 = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                async with asyncio.timeout(10):
                    await serving
            assert time.monotonic() - t0 < 1.0  # it did not first wait for the reader
        finally:
            async with asyncio.timeout(10):
                await asyncio.gather(serving, return_exceptions=True)

    asyncio.run(main())


async def _stop_by_sigterm(worker: RedisWorker, during: list[Any]) -> None:
    """serve() until a SIGTERM this process sends itself, which the worker must take (a graceful stop);
    ``during``: the SIGINT handler while it serves."""
    serving = asyncio.create_task(worker.serve())
    try:
        await _until(lambda: getattr(worker, "store", None) is not None)
        during.append(signal.getsignal(signal.SIGINT))
        os.kill(os.getpid(), signal.SIGTERM)
        async with asyncio.timeout(10):
            await serving
    finally:
        serving.cancel()
        async with asyncio.timeout(10):
            await asyncio.gather(serving, return_exceptions=True)


def _wait_for(check: Any) -> None:
    deadline = time.monotonic() + 5
    while not check() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_serve_puts_back_the_applications_signal_handlers_and_leaves_an_ignored_signal_ignored(
        url: str, prefix: str) -> None:
    got: list[int] = []

    def app_handler(signum: int, frame: Any) -> None:
        got.append(signum)

    before_term = signal.signal(signal.SIGTERM, app_handler)
    before_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # (asyncio.run then leaves it alone)
    try:
        async def main() -> None:
            worker = worker_here(url, prefix, registry=WorkerRegistry(), llm=False, block_ms=100,
                                 handle_signals=True)
            during: list[Any] = []
            await _stop_by_sigterm(worker, during)
            assert got == []  # the SIGTERM sent while serving was the worker's
            assert during == [signal.SIG_IGN]  # ignored all along
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN

        asyncio.run(main())
        assert signal.getsignal(signal.SIGTERM) is app_handler
        os.kill(os.getpid(), signal.SIGTERM)  # (safe: the application's handler is back)
        _wait_for(lambda: got)
        assert got == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, before_term)
        signal.signal(signal.SIGINT, before_int)


def test_serve_puts_back_the_event_loops_own_handlers_with_no_default_handler_in_between(
        url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The application's loop handler (SIGTERM) and asyncio.Runner's Ctrl-C handler (SIGINT) are back after
    serve(); SIGTERM is never set to SIG_DFL on the way (a SIGTERM in that window would kill the process)."""
    set_to: list[tuple[int, Any]] = []
    real = signal.signal

    def recording(signum: int, handler: Any) -> Any:
        set_to.append((signum, handler))
        return real(signum, handler)

    before_term = signal.getsignal(signal.SIGTERM)
    try:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            got: list[str] = []
            loop.add_signal_handler(signal.SIGTERM, got.append, "app")
            handlers = loop._signal_handlers  # type: ignore[attr-defined]
            app_handle = handlers[signal.SIGTERM]
            runner_sigint = signal.getsignal(signal.SIGINT)
            worker = worker_here(url, prefix, registry=WorkerRegistry(), llm=False, block_ms=100,
                                 handle_signals=True)
            monkeypatch.setattr(signal, "signal", recording)
            during: list[Any] = []
            await _stop_by_sigterm(worker, during)
            assert during[0] is not runner_sigint  # the worker had Ctrl-C
            assert got == []  # the SIGTERM sent while serving was the worker's
            assert (signal.SIGTERM, signal.SIG_DFL) not in set_to
            assert handlers.get(signal.SIGTERM) is app_handle
            assert signal.getsignal(signal.SIGINT) is runner_sigint
            os.kill(os.getpid(), signal.SIGTERM)  # (safe: the loop's handler is back)
            await _until(lambda: got, 5)
            assert got == ["app"]

        asyncio.run(main())
    finally:
        monkeypatch.undo()
        signal.signal(signal.SIGTERM, before_term)


def test_a_task_chained_after_a_worker_swallowed_its_interrupt_can_be_interrupted(url: str, prefix: str) -> None:
    """An async worker swallows the CancelledError of a cancel request and returns: its success is reported,
    and the compensation the transition chains under the same handler runs in a task no longer "being
    cancelled" — so a graceful stop interrupts it and hands it back at once (and a CancelledError it raised
    itself would be its failure, not a cancellation)."""
    seen: list[str] = []
    undo_cancelling: list[int] = []

    async def stubborn(data: Any, ctx: StepContext) -> dict[str, Any]:
        seen.append("a")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("a swallowed its cancel")
        return {}

    async def undo(data: Any, ctx: StepContext) -> dict[str, Any]:
        task = asyncio.current_task()
        undo_cancelling.append(task.cancelling() if task is not None else -1)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("undo interrupted")
            raise
        return {}

    async def main() -> Any:
        worker = worker_here(url, prefix, registry=_registry(stubborn, undo), llm=False, grace_s=0.1,
                             block_ms=100)
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(compile_text(ONE_STEP.format(name="swallow")), {})
            serving = asyncio.create_task(worker.serve())
            try:
                await _until(lambda: "a" in seen)
                assert await client.cancel(sub.run_id, "enough") == "requested"
                await _until(lambda: undo_cancelling)
                worker.stop(graceful=True)
                async with asyncio.timeout(4):  # (the hand-back is at once: not after the 5 s of an outright cancel)
                    return await serving
            finally:
                serving.cancel()
                async with asyncio.timeout(10):
                    await asyncio.gather(serving, return_exceptions=True)

    stats = asyncio.run(main())
    assert seen == ["a", "a swallowed its cancel", "undo interrupted"]
    assert undo_cancelling == [0]
    assert stats.handed_back == 1 and stats.chained >= 1


def test_cancelling_serve_stops_a_loop_whose_redis_call_turned_the_cancel_into_an_error(url: str,
                                                                                       prefix: str) -> None:
    """A cancellation that lands inside a Redis call can come out of it as a TimeoutError or a connection error (as
    asyncio.timeout does on 3.11 when its own deadline fires in the same turn): the tidier took it for Redis's,
    went round again and paused a whole minute, and serve() — cancelled — waited for it (a flaky CI failure)."""
    entered = asyncio.Event()

    async def main() -> float:
        worker = worker_here(url, prefix, registry=WorkerRegistry(), llm=False, tidy_s=0.05)

        async def tidy(cursor: int) -> int:
            entered.set()
            try:
                assert worker._stopped is not None
                await worker._stopped.wait()  # (a call that ends when the worker stops)
            except asyncio.CancelledError:
                raise TimeoutError("the call's own timeout") from None  # (what such a call may raise instead)
            return cursor

        worker._tidy = tidy  # type: ignore[method-assign]
        serving = asyncio.create_task(worker.serve())
        try:
            await asyncio.wait_for(entered.wait(), 20)
            began = time.monotonic()
            await _cancelled_serve_ends(serving, worker)
            return time.monotonic() - began
        finally:
            await _end(serving, worker)  # (if serve() outlived its cancel: the test fails, but ends)

    assert _watched(main) < 5


def _slow_step(seen: list[str]) -> Any:
    """A worker that waits 30 s, noting in ``seen`` that it started, was cancelled, or ended."""
    async def slow(data: Any, ctx: StepContext) -> dict[str, Any]:
        seen.append("start")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        seen.append("end")
        return {}

    return slow
