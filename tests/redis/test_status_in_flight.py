"""``flowdsl status`` of a Redis run still going says where each attempt in flight is: queued, and whether a live
process serves its queue (a warning, with the command that would serve it, when none does), or running, and on
which process (a warning when that process is no longer seen); ``--format json`` lists them in ``in_flight``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

import tests.runtime.workers  # noqa: F401  (registers the conf.* workers this process serves)
from flowdsl import compile_text
from flowdsl.cli import app
from flowdsl.runtime.redis import RedisClient
from flowdsl.runtime.redis.keys import Keys
from flowdsl.workers import WorkerRegistry
from tests.redis.inproc import serving, worker_here
from tests.runtime.conformance import HEADER

FLOW = HEADER.format(name="wait") + "steps:\n  - conf.a: {compensate: undo.a}\n  - conf.b\n"


def _status(url: str, prefix: str, run_id: str, *more: str) -> Any:
    return CliRunner().invoke(app, ["status", run_id, "--redis-url", url, "--prefix", prefix, *more],
                              env={"COLUMNS": "200"})


def _other() -> WorkerRegistry:
    """A process that starts runs but serves none of their workers."""
    registry = WorkerRegistry()
    registry.register("other.x", lambda data, ctx: {})
    return registry


async def _dispatched(client: RedisClient, run_id: str, task_id: str) -> None:
    for _ in range(600):
        if await client.redis.hexists(client.keys.tasks(run_id), task_id):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{task_id} was never dispatched")


def test_a_step_queued_for_a_worker_no_live_process_serves_is_a_warning_naming_the_command(
        url: str, prefix: str) -> None:
    starter = worker_here(url, prefix, _other(), llm=False)

    async def body() -> tuple[Any, Any, str]:
        async with RedisClient(url, prefix=prefix) as client:
            run = await client.submit(compile_text(FLOW), {"script": {}})
            await _dispatched(client, run.run_id, f"{run.run_id}/a#1")
        text = await asyncio.to_thread(_status, url, prefix, run.run_id)
        as_json = await asyncio.to_thread(_status, url, prefix, run.run_id, "--format", "json")
        return text, as_json, run.run_id

    text, as_json, run_id = asyncio.run(serving([starter], body))
    assert text.exit_code == 0, text.output
    out = " ".join(text.output.split())
    assert "warning: step a (attempt 1) has waited for" in out
    assert ("in the queue of worker 'conf.a', which no live worker process serves: it waits until one does (start "
            "`flowdsl worker -w tests.runtime.workers`)") in out
    assert out.index("warning: step a") < out.index("still running")
    [attempt] = json.loads(as_json.output)["in_flight"]
    assert attempt == {"step": "a", "task_id": f"{run_id}/a#1", "attempt": 1, "kind": "task", "worker": "conf.a",
                       "state": "queued", "process": None, "process_live": None, "served_by": 0,
                       "age_ms": attempt["age_ms"]}
    assert 0 <= attempt["age_ms"] < 60_000


def test_a_step_running_says_on_which_process_and_a_process_no_longer_seen_is_a_warning(
        url: str, prefix: str, tmp_path: Path) -> None:
    worker = worker_here(url, prefix, llm=False)
    release = tmp_path / "go"

    async def body() -> tuple[Any, Any, Any]:
        async with RedisClient(url, prefix=prefix) as client:
            run = await client.submit(compile_text(FLOW), {"script": {"a": {"after": str(release)}}})
            while not worker.in_flight:
                await asyncio.sleep(0.02)
            text = await asyncio.to_thread(_status, url, prefix, run.run_id)
            as_json = await asyncio.to_thread(_status, url, prefix, run.run_id, "--format", "json")
            # its liveness record gone (as when a process killed is forgotten), it holds the attempt still
            await client.redis.hdel(Keys(prefix).workers, worker.name)
            gone = await asyncio.to_thread(_status, url, prefix, run.run_id)
            release.touch()
            return text, as_json, gone

    text, as_json, gone = asyncio.run(serving([worker], body))
    out = " ".join(text.output.split())
    assert f"step a (attempt 1): running on {worker.name} for " in out and "warning" not in out
    [attempt] = json.loads(as_json.output)["in_flight"]
    assert (attempt["state"], attempt["process"], attempt["process_live"], attempt["served_by"]) == (
        "running", worker.name, True, 1)
    out = " ".join(gone.output.split())
    assert f"warning: step a (attempt 1): running on {worker.name} for " in out
    assert "a process not seen for more than three leases" in out


def test_an_llm_step_queued_with_no_process_running_llm_steps_says_so(url: str, prefix: str) -> None:
    plan = compile_text("flowdsl: 1\nname: ask\nsteps:\n  - ask:\n      llm: {signature: 'q -> a'}\n")
    starter = worker_here(url, prefix, _other(), llm=False)

    async def body() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            run = await client.submit(plan, {"q": "?"})
            await _dispatched(client, run.run_id, f"{run.run_id}/ask#1")
        return await asyncio.to_thread(_status, url, prefix, run.run_id)

    out = " ".join(asyncio.run(serving([starter], body)).output.split())
    assert ("warning: step ask (attempt 1) has waited for" in out and "in the LLM steps' queue, which no live worker "
            "process serves: it waits until one does (start a process that runs LLM steps (`flowdsl worker` "
            "without --no-llm))") in out


def test_a_run_that_ended_has_nothing_in_flight(url: str, prefix: str) -> None:
    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            run = await client.submit(compile_text(FLOW), {"script": {}})
            await asyncio.wait_for(worker_here(url, prefix, burst=True, llm=False).serve(), 30)
        return await asyncio.to_thread(_status, url, prefix, run.run_id, "--format", "json")

    out = json.loads(asyncio.run(main()).output)
    assert out["status"] == "completed" and out["in_flight"] == []
