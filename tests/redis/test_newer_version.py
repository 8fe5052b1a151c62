"""A rolling upgrade: a worker never advances a run of newer kernel rules (or a newer plan) than it knows.

The "newer flowdsl" is this process with its kernel told it knows one more rules version (the same rules) and
its runs started under it; the older one is this process as it is. The older worker leaves what it cannot
advance pending — no dead letter, nothing applied, the state untouched — and an upgraded worker takes it over
after the lease.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest
from typer.testing import CliRunner

import flowdsl.kernel as kernel_module
from flowdsl import compile_text
from flowdsl.cli import app
from flowdsl.kernel import STATE_VERSION, NewerVersion
from flowdsl.runtime import plancheck
from flowdsl.runtime.codec import loads
from flowdsl.runtime.redis import RedisClient, RedisWorker, advance_start
from flowdsl.runtime.redis import client as client_module
from flowdsl.runtime.redis.keys import Keys
from flowdsl.workers import WorkerRegistry
from tests.redis.inproc import stopped, worker_here

NEWER = STATE_VERSION + 1
LEFT = "left for an upgraded worker"


def _be_newer(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as a flowdsl whose kernel knows rules version NEWER (its workers start runs under it with
    ``rules=NEWER``)."""
    monkeypatch.setattr(kernel_module, "STATE_VERSION", NEWER)


async def _serve_until(worker: RedisWorker, done: Callable[[], bool], limit: float = 20.0) -> None:
    """Serve until ``done()`` (checked every 20 ms, at most ``limit`` seconds), then stop."""
    task = asyncio.create_task(worker.serve())
    try:
        async with asyncio.timeout(limit):
            while not done():
                await asyncio.sleep(0.02)
    finally:
        worker.stop()
        await stopped([worker], [task])


def _said(caplog: pytest.LogCaptureFixture, text: str) -> Callable[[], bool]:
    return lambda: any(text in r.getMessage() for r in caplog.records)


def _registry(calls: list[str], fail_first: bool = False) -> WorkerRegistry:
    registry = WorkerRegistry()

    async def step(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        calls.append(ctx.idempotency_key)
        if fail_first and len(calls) == 1:
            raise RuntimeError("once")
        return {"n": len(calls)}

    registry.register("nv_step", step)
    return registry


async def _state(url: str, prefix: str, run_id: str) -> tuple[int, int]:
    """The run's (kernel rules version, state version) as stored, read without the kernel."""
    async with RedisClient(url, prefix=prefix) as client:
        raw, version = await client.store.call("HMGET", Keys(prefix).run(run_id), "state", "v")
    return loads(raw)["kernel"], int(version)


def test_an_older_worker_leaves_a_step_of_a_newer_run_pending_for_an_upgraded_one(
        url: str, prefix: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="flowdsl.redis")
    calls: list[str] = []
    plan = compile_text("flowdsl: 1\nname: nv\nsteps: [nv_step]\n")

    async def started_by_a_newer_flowdsl() -> str:  # no worker of it serves the step yet
        async with RedisClient(url, prefix=prefix) as client:
            run_id = (await client.submit(plan, {})).run_id
        await worker_here(url, prefix, WorkerRegistry(), burst=True, llm=False, rules=NEWER).serve()
        assert await _state(url, prefix, run_id) == (NEWER, 1)
        return run_id

    async def an_older_worker_serves_the_step() -> None:  # it leaves it, without running it
        older = worker_here(url, prefix, _registry(calls), lease_s=0.5, llm=False)
        await _serve_until(older, _said(caplog, LEFT))
        assert calls == [] and older.stats.dead_letters == 0
        assert await _state(url, prefix, run_id) == (NEWER, 1)  # nothing applied
        async with RedisClient(url, prefix=prefix) as client:
            pending = await client.store.call("XPENDING", Keys(prefix).queue("nv_step"), "flowdsl")
            assert int(pending[0]) == 1  # left pending, not acknowledged
            assert await client.dead_letters() == []
            with pytest.raises(NewerVersion, match=rf"kernel rules version {NEWER}, newer than this flowdsl knows"):
                await client.result(run_id)  # nor does an older client read it as its own

    async def upgraded() -> Any:  # the step is taken over after the lease and the run completes
        newer = worker_here(url, prefix, _registry(calls), lease_s=0.5, llm=False)
        async with RedisClient(url, prefix=prefix) as client:
            result = await asyncio.wait_for(_following(newer, client.follow(run_id)), 20)
        assert newer.stats.reclaimed == 1
        return result

    _be_newer(monkeypatch)
    run_id = asyncio.run(started_by_a_newer_flowdsl())
    monkeypatch.undo()
    asyncio.run(an_older_worker_serves_the_step())
    said = CliRunner().invoke(app, ["status", run_id, "--redis-url", url, "--prefix", prefix])
    assert said.exit_code == 2 and f"kernel rules version {NEWER}, newer than this flowdsl knows" in said.output
    assert "Traceback" not in said.output
    _be_newer(monkeypatch)
    result = asyncio.run(upgraded())
    assert result.status == "completed" and calls == [f"{run_id}/nv_step"]  # run once, by the upgraded worker
    warning = next(r.getMessage() for r in caplog.records if LEFT in r.getMessage())
    assert f"follows kernel rules version {NEWER}, newer than this flowdsl knows (1 to {STATE_VERSION})" in warning


async def _following(worker: RedisWorker, follow: Any) -> Any:
    task = asyncio.create_task(worker.serve())
    try:
        return await follow
    finally:
        worker.stop()
        await stopped([worker], [task])


def test_an_older_worker_leaves_a_timer_of_a_newer_run_to_an_upgraded_one(
        url: str, prefix: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="flowdsl.redis")
    calls: list[str] = []
    registry = _registry(calls, fail_first=True)
    plan = compile_text("flowdsl: 1\nname: nvt\nsteps:\n  - nv_step:\n      retry: {attempts: 2, initial: 300ms}\n")

    async def main() -> None:
        _be_newer(monkeypatch)  # the first attempt fails under the newer flowdsl: its retry timer is armed
        async with RedisClient(url, prefix=prefix) as client:
            run_id = (await client.submit(plan, {})).run_id
        await worker_here(url, prefix, registry, burst=True, burst_horizon_s=0, llm=False, rules=NEWER).serve()
        assert len(calls) == 1
        kernel, version = await _state(url, prefix, run_id)

        monkeypatch.undo()  # the older worker claims the due timer and leaves it
        older = worker_here(url, prefix, WorkerRegistry(), lease_s=0.5, llm=False)
        await _serve_until(older, _said(caplog, LEFT))
        assert await _state(url, prefix, run_id) == (kernel, version) == (NEWER, version)
        assert older.stats.timers == 1 and older.stats.dead_letters == 0

        _be_newer(monkeypatch)  # upgraded: the claim expires, the timer fires, the retry succeeds
        newer = worker_here(url, prefix, registry, lease_s=0.5, llm=False)
        async with RedisClient(url, prefix=prefix) as client:
            result = await asyncio.wait_for(_following(newer, client.follow(run_id)), 20)
        assert result.status == "completed" and result.steps["nv_step"]["attempts"] == 2

    asyncio.run(main())
    assert any(LEFT in r.getMessage() and "timer" in r.getMessage() for r in caplog.records)


def test_a_start_request_with_a_newer_plan_is_left_to_an_upgraded_worker(
        url: str, prefix: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="flowdsl.redis")
    calls: list[str] = []
    plan = dict(compile_text("flowdsl: 1\nname: nvp\nsteps: [nv_step]\n"), plan_version=plancheck.PLAN_VERSION + 1)

    async def main() -> None:
        # a newer client submits a plan of a newer layout (this client would refuse it: its check is skipped)
        monkeypatch.setattr(client_module, "require_plan", lambda plan: None)
        async with RedisClient(url, prefix=prefix) as client:
            run_id = (await client.submit(plan, {})).run_id
        older = worker_here(url, prefix, _registry(calls), lease_s=0.5, llm=False)
        await _serve_until(older, _said(caplog, LEFT))
        assert calls == [] and older.stats.runs_started == 0 and older.stats.dead_letters == 0
        async with RedisClient(url, prefix=prefix) as client:
            info = await client.info(run_id)
            assert info.started_at is None and info.status == "submitted"

        monkeypatch.setattr(advance_start, "PLAN_VERSION", plancheck.PLAN_VERSION + 1)  # upgraded
        newer = worker_here(url, prefix, _registry(calls), lease_s=0.5, llm=False)
        async with RedisClient(url, prefix=prefix) as client:
            result = await asyncio.wait_for(_following(newer, client.follow(run_id)), 20)
        assert result.status == "completed" and calls == [f"{run_id}/nv_step"]

    asyncio.run(main())
    warning = next(r.getMessage() for r in caplog.records if LEFT in r.getMessage())
    assert f"plan_version {plancheck.PLAN_VERSION + 1}, newer than this flowdsl reads" in warning


def test_a_worker_told_older_rules_starts_runs_under_them(url: str, prefix: str) -> None:
    """A rolling upgrade's first step (docs/runtime.md, "Upgrading"): new workers start runs under the rules the
    old ones still serving know; here ``$steps.<for_each>`` stays null, as rules 5 say."""
    calls: list[str] = []
    registry = _registry(calls)
    seen: list[Any] = []

    async def echo(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        seen.append(data["lines"])
        return {}

    registry.register("nv_echo", echo)
    plan = compile_text("flowdsl: 1\nname: nvr\nsteps:\n  - for_each: lines\n    items: \"${ [1] }\"\n"
                        "    steps: [nv_step]\n  - nv_echo: {with: {lines: \"${ $steps.lines }\"}}\n")

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            run_id = (await client.submit(plan, {})).run_id
            await worker_here(url, prefix, registry, burst=True, llm=False, rules=5).serve()
            result, _ = await client.result(run_id)
            return run_id, result

    run_id, result = asyncio.run(main())
    assert result.status == "completed" and seen == [None]
    assert asyncio.run(_state(url, prefix, run_id))[0] == 5
    for wrong in (0, STATE_VERSION + 1, "5"):
        with pytest.raises(ValueError, match=f"rules must be a kernel rules version from 1 to {STATE_VERSION}"):
            worker_here(url, prefix, registry, rules=wrong)


def test_flowdsl_worker_rules_option(monkeypatch: pytest.MonkeyPatch) -> None:
    import flowdsl.runtime.redis.commands as commands

    given: list[Any] = []
    monkeypatch.setattr(commands, "worker_command", lambda **kwargs: given.append(kwargs["options"].rules) or 0)
    ok = CliRunner().invoke(app, ["worker", "--redis-url", "unix:///nonexistent.sock", "--rules", "5"])
    assert ok.exit_code == 0 and given == [5], ok.output
    bad = CliRunner().invoke(app, ["worker", "--redis-url", "unix:///nonexistent.sock", "--rules", str(NEWER)])
    said = " ".join(bad.output.replace("│", " ").split())
    assert bad.exit_code == 2 and f"rules must be a kernel rules version from 1 to {STATE_VERSION}, not {NEWER}" in said
    assert given == [5]


def test_a_worker_told_rules_7_starts_a_plan_with_on_failure_continue_under_rules_8(url: str, prefix: str) -> None:
    """Rules 8 and plan layout 2 (docs/runtime.md, "Upgrading"): a plan with ``on_failure: continue`` is of a layout
    only processes that know rules 8 read, so a worker pinned to ``--rules 7`` starts its runs under 8 (under 7 the
    step passed over would fail the run) and the others under 7; the step that fails is passed over."""
    calls: list[str] = []
    registry = _registry(calls)

    async def tell(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        raise ConnectionError("smtp down")

    registry.register("nv_tell", tell)
    plan = compile_text("flowdsl: 1\nname: nvc\nsteps:\n  - nv_tell: {on_failure: continue}\n  - nv_step\n")
    plain = compile_text("flowdsl: 1\nname: nvp\nsteps: [nv_step]\n")
    assert (plan["plan_version"], plain["plan_version"]) == (2, 1)

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            run_id = (await client.submit(plan, {})).run_id
            other = (await client.submit(plain, {})).run_id
            await worker_here(url, prefix, registry, burst=True, llm=False, rules=7).serve()
            return run_id, other, (await client.result(run_id))[0]

    run_id, other, result = asyncio.run(main())
    assert result.status == "completed" and len(calls) == 2
    assert result.steps["nv_tell"]["status"] == "failed" and result.steps["nv_tell"]["continued"] is True
    assert asyncio.run(_state(url, prefix, run_id))[0] == 8 and asyncio.run(_state(url, prefix, other))[0] == 7
