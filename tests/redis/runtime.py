"""The Redis runtime as a participant of the runtime conformance suite (tests/runtime/test_conformance.py).

One private redis-server per test session and two ``flowdsl worker``
processes serving ``tests.runtime.workers`` (states rebuilt from the journal:
``--snapshot-kb 0``), started on first use and stopped
by PID when the session ends. Each case is submitted as a run and followed to
its end, exactly as ``flowdsl run --backend redis`` does.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from flowdsl.runtime.redis import RedisClient
from flowdsl.runtime.report import RunResult
from tests.redis.procs import WorkerProcs
from tests.redis.server import session_server

PREFIX = "conformance"
_POOL: dict[str, WorkerProcs] = {}


class RedisRuntime:
    """Submit and follow on a private Redis, with two worker processes."""

    def __init__(self, url: str):
        self.url = url

    async def run(self, plan: dict[str, Any], run_input: dict[str, Any]) -> RunResult:
        async with RedisClient(self.url, prefix=PREFIX) as client:
            submission = await client.submit(plan, run_input)
            return await asyncio.wait_for(client.follow(submission.run_id), timeout=60)


def redis_runtime(request: pytest.FixtureRequest) -> RedisRuntime:
    """The factory the conformance suite's ``RUNTIMES`` table calls."""
    server = session_server(request.config)
    if "procs" not in _POOL:
        # --snapshot-kb 0: a state is written whole only at a run's start and end, so whenever the other
        # process takes a run up it rebuilds the state by replaying the run's journal
        procs = WorkerProcs(server.url, PREFIX, ["tests.runtime.workers"], lease=10.0, concurrency=64,
                            extra_args=["--snapshot-kb", "0"])
        _POOL["procs"] = procs
        request.config.add_cleanup(lambda: _POOL.pop("procs").stop_all())
        procs.start(2)
    return RedisRuntime(server.url)
