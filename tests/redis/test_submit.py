"""Submitting a run: listed whatever becomes of its submitter, and by the Redis server's clock."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

import tests.runtime.workers  # noqa: F401  (registers the conf.* workers this process serves)
from flowdsl import compile_text
from flowdsl.cli import app
from flowdsl.runtime.redis import RedisClient
from flowdsl.runtime.redis import client as client_module
from flowdsl.runtime.redis.keys import Keys
from tests.redis.inproc import worker_here
from tests.redis.server import RedisServer
from tests.runtime.conformance import HEADER

PLAN = compile_text(HEADER.format(name="sub") + "steps:\n  - conf.a\n")


def _dies_after_submit(client: RedisClient) -> None:
    """The submitter's connection drops after its first pipeline (the index entry and SUBMIT): its later
    writes (the index by the server's clock, the start request) fail."""
    call = client.store.call

    def failing(*args: Any) -> asyncio.Future[Any]:
        if args[0] == "XADD" or (args[0] == "ZADD" and "NX" not in args):
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            future.set_exception(redis.ConnectionError("connection lost"))
            return future
        return call(*args)

    client.store.call = failing  # type: ignore[method-assign]


def test_a_submission_cut_short_is_listed_and_a_second_one_starts_and_lists_it(
        url: str, prefix: str, server: RedisServer, tmp_path: Path) -> None:
    keys = Keys(prefix)

    async def cut_short() -> list[tuple[str, str]]:
        async with RedisClient(url, prefix=prefix) as client:
            _dies_after_submit(client)
            with pytest.raises(redis.ConnectionError):
                await client.submit(PLAN, {}, run_id="cut")
        async with RedisClient(url, prefix=prefix) as client:
            return [(r.run_id, r.status) for r in await client.runs()]  # visible, not an orphan

    async def served() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            again = await client.submit(PLAN, {}, run_id="cut")  # the same again: nothing more to do
            await worker_here(url, prefix, burst=True, llm=False).serve()
            result, _ = await client.result("cut")
            return again, [r.run_id for r in await client.runs()], result

    assert asyncio.run(cut_short()) == [("cut", "submitted")]
    server.client().zrem(keys.runs, "cut")  # as a submitter of an earlier version left it: not listed
    spec = tmp_path / "sub.yaml"
    spec.write_text(HEADER.format(name="sub") + "steps:\n  - conf.a\n")
    said = CliRunner().invoke(app, ["run", str(spec), "--backend", "redis", "--redis-url", url, "--prefix", prefix,
                                    "--run-id", "cut", "--detach"])  # as the docs say: submit again
    assert said.exit_code == 0, said.output
    assert "run 'cut' was already submitted: it had not started: its start request was sent again" in said.output
    again, runs, result = asyncio.run(served())
    assert (again.created, again.resent) == (False, True)
    assert runs == ["cut"] and result is not None and result.status == "completed"
    stored = server.client().hget(keys.run("cut"), "submitted")
    assert server.client().zscore(keys.runs, "cut") == int(stored)


def test_runs_are_listed_by_the_servers_clock_not_their_submitters(url: str, prefix: str, server: RedisServer,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real = time.time

    async def main() -> list[Any]:
        async with RedisClient(url, prefix=prefix) as client:
            await client.submit(PLAN, {}, run_id="first")
            monkeypatch.setattr(client_module.time, "time", lambda: real() - 120)  # a machine two minutes slow
            await client.submit(PLAN, {}, run_id="second")
            monkeypatch.undo()
            return await client.runs()

    before = server.client().time()
    runs = asyncio.run(main())
    assert [r.run_id for r in runs] == ["second", "first"]  # newest first
    server_ms = before[0] * 1000 + before[1] // 1000
    assert all(0 <= r.submitted_at - server_ms < 60_000 for r in runs)  # type: ignore[operator]


def test_a_tidy_that_read_the_early_entry_never_unlists_the_run(url: str, prefix: str, server: RedisServer) -> None:
    """The entry listed before the run is written (by the client's clock) and the final one (the server's) never
    share a score, even when the two clocks agree to the millisecond: a tidy (or `runs`) that read the early
    entry while the run did not exist yet removes an entry only while its score is the one it read."""
    scores: list[str] = []

    async def main() -> list[str]:
        async with RedisClient(url, prefix=prefix) as client:
            call = client.store.call

            def seen(*args: Any) -> asyncio.Future[Any]:
                if args[0] == "ZADD" and "NX" in args:
                    scores.append(str(args[3]))
                return call(*args)

            client.store.call = seen  # type: ignore[method-assign]
            await client.submit(PLAN, {}, run_id="early")
            await client.store.unlist([(b"early", scores[0].encode())])  # a tidy's late verdict on the early entry
            return [r.run_id for r in await client.runs()]

    assert asyncio.run(main()) == ["early"]
    early, final = float(scores[0]), server.client().zscore(Keys(prefix).runs, "early")
    assert early != int(early) and final == int(final)


def test_runs_refuses_a_status_that_is_no_run_state(url: str, prefix: str) -> None:
    """``RedisClient.runs(status=...)`` with a word that is no run state raises ValueError listing them, as
    ``flowdsl runs --status`` does (it returned [] quietly); a real state lists as before (audit F8)."""
    from flowdsl.runtime.redis.client import RUN_STATES

    async def main() -> list[str]:
        async with RedisClient(url, prefix=prefix) as client:
            await client.submit(PLAN, {}, run_id="st1")
            with pytest.raises(ValueError) as caught:
                await client.runs(status="bogus")
            said = str(caught.value)
            assert "'bogus' is not a run state" in said and all(state in said for state in RUN_STATES), said
            return [r.run_id for r in await client.runs(status="submitted")]

    assert asyncio.run(main()) == ["st1"]


def test_the_client_s_exceptions_are_exported_with_it() -> None:
    """``RunIdTaken`` (submit) and ``RunGone`` (follow) are importable from ``flowdsl.runtime.redis`` beside
    ``RunNotFound`` (audit F8)."""
    import flowdsl.runtime.redis as package

    for name in ("RunIdTaken", "RunGone", "RunNotFound", "DeadLetterNotFound"):
        assert name in package.__all__ and getattr(package, name) is getattr(client_module, name), name
