"""`flowdsl workers`: the worker processes serving a prefix, from their liveness records, and the task queues."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import redis as redis_sync
from typer.testing import CliRunner

from flowdsl import compile_text
from flowdsl.cli import app
from flowdsl.runtime.codec import dumps
from flowdsl.runtime.redis import RedisClient
from flowdsl.runtime.redis.keys import Keys
from flowdsl.workers import WorkerRegistry
from tests.redis.inproc import serving, worker_here


def _cli(url: str, prefix: str, *more: str) -> Any:
    return CliRunner().invoke(app, ["workers", "--redis-url", url, "--prefix", prefix, *more],
                              env={"COLUMNS": "80"})


def _registry(name: str) -> WorkerRegistry:
    registry = WorkerRegistry()
    registry.register(name, lambda data, ctx: {})
    return registry


def test_two_live_workers_are_listed_with_the_names_each_serves(url: str, prefix: str) -> None:
    keys = Keys(prefix)
    a = worker_here(url, prefix, _registry("alpha.one"), llm=False, concurrency=3)
    b = worker_here(url, prefix, _registry("beta.two"), llm=False, concurrency=5)

    async def body() -> tuple[Any, Any]:
        async with RedisClient(url, prefix=prefix) as client:
            while len(await client.redis.hkeys(keys.workers)) < 2:
                await asyncio.sleep(0.02)
        text = await asyncio.to_thread(_cli, url, prefix)
        as_json = await asyncio.to_thread(_cli, url, prefix, "--format", "json")
        return text, as_json

    text, as_json = asyncio.run(serving([a, b], body))
    assert text.exit_code == 0, text.output
    assert "2 live worker processes" in text.output
    assert "serves: alpha.one" in text.output and "serves: beta.two" in text.output
    assert all(len(line) <= 80 for line in text.output.splitlines()), text.output
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.output)
    assert report["prefix"] == prefix and report["live"] == 2 and report["unserved"] == []
    by_name = {p["name"]: p for p in report["processes"]}
    assert set(by_name) == {a.name, b.name}
    assert by_name[a.name]["workers"] == ["alpha.one"] and by_name[b.name]["workers"] == ["beta.two"]
    assert by_name[a.name]["concurrency"] == 3 and by_name[b.name]["concurrency"] == 5
    assert all(p["live"] and p["age_ms"] < 60_000 and p["pid"] and p["host"] for p in report["processes"])
    assert {q["worker"]: (q["depth"], q["pending"], q["served"]) for q in report["queues"]} == {
        "alpha.one": (0, 0, True), "beta.two": (0, 0, True)}
    assert set(report) == {"prefix", "now", "live", "processes", "queues", "unserved", "complete", "more_queues"}
    assert report["complete"] is True and report["more_queues"] == 0


def test_a_stopped_worker_is_not_listed_and_one_that_died_is_not_live(url: str, prefix: str) -> None:
    keys = Keys(prefix)
    asyncio.run(worker_here(url, prefix, _registry("gamma.three"), llm=False, burst=True,
                            burst_horizon_s=0).serve())
    with redis_sync.Redis.from_url(url) as r:
        now = r.time()
        seen = now[0] * 1000 - 3_600_000  # an hour ago, its lease 30 s: it died
        r.hset(keys.workers, "dead-1", dumps({"pid": 4242, "host": "gone", "seen": seen, "lease_ms": 30000,
                                              "concurrency": 8, "workers": ["gamma.three"], "llm": False}))
    result = _cli(url, prefix)
    assert result.exit_code == 0, result.output
    assert "0 live worker processes" in result.output and "none is live" in result.output
    assert "dead-1" in result.output and "NOT LIVE, last seen 1h00m ago" in result.output
    report = json.loads(_cli(url, prefix, "-f", "json").output)
    assert [(p["name"], p["live"]) for p in report["processes"]] == [("dead-1", False)]  # the burst one: gone
    assert report["processes"][0]["age_ms"] >= 3_600_000
    assert report["unserved"] == ["gamma.three"]


def test_the_queue_of_a_step_no_worker_serves_shows_its_depth_and_is_flagged(url: str, prefix: str) -> None:
    plan = compile_text("flowdsl: 1\nname: lonely\nsteps:\n  - nobody.serves\n")

    async def main() -> None:
        async with RedisClient(url, prefix=prefix) as client:
            await client.submit(plan, {}, run_id="lonely-1")
        # a process serving something else starts the run: its step waits in a queue nobody reads
        await asyncio.wait_for(worker_here(url, prefix, _registry("other.one"), llm=False, burst=True,
                                           burst_horizon_s=0).serve(), 30)

    asyncio.run(main())
    report = json.loads(_cli(url, prefix, "--format", "json").output)
    assert report["processes"] == [] and report["live"] == 0
    (queue,) = [q for q in report["queues"] if q["worker"] == "nobody.serves"]
    assert queue == {"worker": "nobody.serves", "llm": False, "stream": Keys(prefix).queue("nobody.serves"),
                     "depth": 1, "pending": 0, "served": False}
    assert "nobody.serves" in report["unserved"]
    text = _cli(url, prefix).output
    assert "no worker process is recorded" in text
    assert any(line.split()[:3] == ["1", "0", "nobody.serves"] and "no live process serves it" in line
               for line in text.splitlines()), text


def test_redis_unreachable_is_exit_2_with_a_clear_message() -> None:
    result = CliRunner().invoke(app, ["workers", "--redis-url", "redis://127.0.0.1:1/0"])
    assert result.exit_code == 2
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in " ".join(result.output.split())
    as_json = CliRunner().invoke(app, ["workers", "--redis-url", "redis://127.0.0.1:1/0", "--format", "json"])
    assert as_json.exit_code == 2
    assert json.loads(as_json.stdout)["status"] == "error"


def test_hostile_names_from_redis_are_shown_inert(url: str, prefix: str) -> None:
    keys = Keys(prefix)
    evil = "ev\x1b[31mil\nall good: completed\u202e"
    with redis_sync.Redis.from_url(url) as r:
        secs, _ = r.time()
        r.hset(keys.workers, "proc" + evil, dumps({"pid": 1, "host": "h" + evil, "seen": secs * 1000,
                                                   "lease_ms": 30000, "workers": ["w" + evil], "llm": False}))
        r.xadd(keys.queue("q" + evil), {"m": "x"})
    result = _cli(url, prefix)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\u202e" not in result.output
    assert not any(line.startswith("all good") for line in result.output.splitlines())
    shown = "ev\\u001b[31mil\\nall good: completed\\u202e"
    assert "proc" + shown in result.output and "h" + shown in result.output
    assert "serves: w" + shown in result.output and "q" + shown in result.output
