"""The operator's side of the Redis runtime: runs that need a person are kept until resolved (``resolve``), workers
log each run's end, dead letters are deleted in bulk, and a submission whose start request was never sent is
started (or cancelled) without its original files.

In-process workers on the session's private redis-server; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

import tests.runtime.workers  # noqa: F401  (registers the conf.*, sync.* and undo.* workers)
from flowdsl import compile_text
from flowdsl.cli import app
from flowdsl.runtime.codec import dumps
from flowdsl.runtime.redis import RedisClient, RunNotFound, advance_end
from flowdsl.runtime.redis.client import NothingToResolve
from flowdsl.runtime.redis.commands import cancel_command, resolve_command, status_command
from flowdsl.runtime.redis.keys import Keys
from flowdsl.workers import WorkerRegistry
from tests.redis.inproc import serving, worker_here

#: a ends undone by hand: b fails, and a's undo fails for good (one attempt)
UNDO_FAILS = compile_text("flowdsl: 1\nname: ni\nsteps:\n  - conf.a: {compensate: {worker: undo.a, retry: 1}}\n"
                          "  - conf.b\n")
NI_INPUT = {"script": {"b": {"raise": "Boom", "message": "the gateway said no"},
                       "a/compensate": {"raise": "UndoDown"}}}
PLAIN = compile_text("flowdsl: 1\nname: plain\nsteps:\n  - conf.a: {compensate: undo.a}\n  - conf.b\n")


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=300, color_system=None), out


async def _run_to_end(client: RedisClient, url: str, prefix: str, runs: list[tuple[dict[str, Any], dict[str, Any],
                                                                                   str]], **options: Any) -> list[Any]:
    """Submit ``runs`` (plan, input, run id; retention 60 s) and follow each to its end while a worker serves."""
    for plan, data, run_id in runs:
        await client.submit(plan, data, run_id=run_id, retention_s=60)

    async def body() -> list[Any]:
        return [await client.follow(run_id) for _, _, run_id in runs]

    return list(await serving([worker_here(url, prefix, **options)], body))


# --- runs that need a person ----------------------------------------------------------------------------


def test_a_run_that_ends_needs_intervention_is_kept_until_resolved_then_expires_by_its_retention(
        url: str, prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    keys = Keys(prefix)

    async def main() -> dict[str, Any]:
        async with RedisClient(url, prefix=prefix) as client:
            ni, done, failed = await _run_to_end(client, url, prefix, [
                (UNDO_FAILS, NI_INPUT, "ni-1"), (PLAIN, {}, "ok-1"),
                (PLAIN, {"script": {"b": {"raise": "Boom"}}}, "comp-1")])
            assert (ni.status, done.status, failed.status) == ("needs_intervention", "completed", "compensated")
            ttl = {run_id: [await client.redis.pttl(k) for k in keys.run_keys(run_id)[:2]]
                   for run_id in ("ni-1", "ok-1", "comp-1")}
            listed = {status: [r.run_id for r in await client.runs(status=status)]
                      for status in ("needs_intervention", "resolved")}
            with pytest.raises(NothingToResolve, match="ended completed: nothing is left to a person"):
                await client.resolve("ok-1", "nothing to do")
            with pytest.raises(RunNotFound):
                await client.resolve("nobody-1")
            with pytest.raises(ValueError, match="note"):
                await client.resolve("ni-1", "\udc80")
            resolution = await client.resolve("ni-1", "refunded by hand, ticket 42", by="ops@desk")
            after = {"ttl": [await client.redis.pttl(k) for k in keys.run_keys("ni-1")[:2]],
                     "listed": {status: [r.run_id for r in await client.runs(status=status)]
                                for status in ("needs_intervention", "resolved")},
                     "info": (await client.info("ni-1")).status}
            with pytest.raises(NothingToResolve, match="resolved already") as again:
                await client.resolve("ni-1", "twice")
            _, journal = await client.result("ni-1")
            return {"ttl": ttl, "listed": listed, "resolution": resolution, "after": after,
                    "again": again.value, "resolutions": journal.resolutions, "notes": journal.notes}

    got = asyncio.run(main())
    # kept with no expiry while it needs a person; the others by their retention
    assert got["ttl"]["ni-1"] == [-1, -1]
    assert all(55_000 < t <= 60_000 for run_id in ("ok-1", "comp-1") for t in got["ttl"][run_id]), got["ttl"]
    assert got["listed"] == {"needs_intervention": ["ni-1"], "resolved": []}
    resolution = got["resolution"]
    assert (resolution.by, resolution.note, resolution.status) == ("ops@desk", "refunded by hand, ticket 42",
                                                                   "needs_intervention")
    # resolved: its retention applies from now; listed as resolved, no longer as needing a person
    assert all(55_000 < t <= 60_000 for t in got["after"]["ttl"]), got["after"]
    assert got["after"]["listed"] == {"needs_intervention": [], "resolved": ["ni-1"]}
    assert got["after"]["info"] == "resolved" and got["again"].resolved_at == resolution.at
    assert got["resolutions"] == [{"type": "resolved", "at": resolution.at, "by": "ops@desk",
                                   "note": "refunded by hand, ticket 42", "status": "needs_intervention"}]
    assert got["notes"] == []  # (a resolution is no rejected late result)

    # the command: exit 1 for a run that needs no resolving (said), 2 for no such run; status shows who resolved it
    console, out = _console()
    assert resolve_command("ni-1", url=url, prefix=prefix, note=None, as_json=False, console=console) == 1
    assert "was resolved already" in out.getvalue()
    capsys.readouterr()
    assert resolve_command("ok-1", url=url, prefix=prefix, note="x", as_json=True, console=console) == 1
    said = json.loads(capsys.readouterr().out)
    assert said["run_id"] == "ok-1" and said["status"] == "completed" and said["resolved"] is None
    assert resolve_command("nobody-2", url=url, prefix=prefix, note=None, as_json=False, console=console) == 2
    assert "no run 'nobody-2'" in out.getvalue()
    assert status_command("ni-1", url=url, prefix=prefix, as_json=True, console=console) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == "needs_intervention"
    assert shown["resolved"] == {"at": resolution.at, "by": "ops@desk", "note": "refunded by hand, ticket 42",
                                 "status": "needs_intervention"}
    console, out = _console()
    assert status_command("ni-1", url=url, prefix=prefix, as_json=False, console=console) == 0
    assert "resolved" in out.getvalue() and "by ops@desk: refunded by hand, ticket 42" in out.getvalue()


def test_the_resolve_command_resolves_and_says_so_in_json(url: str, prefix: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    async def main() -> None:
        async with RedisClient(url, prefix=prefix) as client:
            (ended,) = await _run_to_end(client, url, prefix, [(UNDO_FAILS, NI_INPUT, "ni-2")])
            assert ended.status == "needs_intervention"

    asyncio.run(main())
    console, out = _console()
    capsys.readouterr()
    assert status_command("ni-2", url=url, prefix=prefix, as_json=False, console=console) == 0
    assert "flowdsl resolve ni-2 --backend redis" in out.getvalue()  # (how to say it is done)
    assert resolve_command("ni-2", url=url, prefix=prefix, note="done", as_json=True, console=console) == 0
    said = json.loads(capsys.readouterr().out)
    assert said["run_id"] == "ni-2" and said["status"] == "resolved"
    assert said["resolved"]["note"] == "done" and said["resolved"]["status"] == "needs_intervention"
    assert "@" in said["resolved"]["by"] and isinstance(said["resolved"]["at"], int)


def test_a_run_that_ends_while_a_worker_still_runs_an_attempt_it_gave_up_on_expires_once_that_answers(
        url: str, prefix: str) -> None:
    """The run failed (its step timed out) while a sync worker's thread still runs the attempt: its outcome is in
    doubt, and a late success must still find the run — kept with no expiry until the thread answers."""
    go = threading.Event()
    registry = WorkerRegistry()

    def charge(data: Any, ctx: Any) -> dict[str, Any]:
        assert go.wait(20)
        return {}

    registry.register("charge", charge)
    plan = compile_text("flowdsl: 1\nname: doubt\nsteps:\n  - charge: {timeout: 200ms}\n")
    keys = Keys(prefix)

    async def main() -> tuple[str, list[int], list[int]]:
        async with RedisClient(url, prefix=prefix) as client:
            await client.submit(plan, {}, run_id="doubt-1", retention_s=60)

            async def body() -> tuple[str, list[int], list[int]]:
                ended = await client.follow("doubt-1", late_grace=0)
                kept = [await client.redis.pttl(k) for k in keys.run_keys("doubt-1")[:3]]
                go.set()
                for _ in range(200):
                    if not await client.redis.exists(keys.tasks("doubt-1")):
                        break
                    await asyncio.sleep(0.05)
                return ended.status, kept, [await client.redis.pttl(k) for k in keys.run_keys("doubt-1")[:2]]

            try:
                return await serving([worker_here(url, prefix, registry)], body)
            finally:
                go.set()

    status, kept, after = asyncio.run(main())
    assert status == "failed"
    assert kept == [-1, -1, -1]  # the run, its journal, and its tasks hash holding the attempt
    assert all(55_000 < t <= 60_000 for t in after), after


# --- worker logs ---------------------------------------------------------------------------------------


def test_workers_log_each_run_end_with_its_fields(url: str, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="flowdsl.redis")

    async def main() -> None:
        async with RedisClient(url, prefix=prefix) as client:
            await client.redis.xadd(Keys(prefix).control, {"c": dumps({"type": "bogus", "run_id": "odd-1"})})
            await _run_to_end(client, url, prefix, [
                (UNDO_FAILS, NI_INPUT, "log-ni"), (PLAIN, {}, "log-ok"),
                (PLAIN, {"script": {"b": {"raise": "Boom", "message": "no\x1b[31m way " + "x" * 600}}}, "log-comp")])
            await client.cancel("log-ok", "late")  # (over: nothing logged)

    asyncio.run(main())
    ends = {r.run_id: r for r in caplog.records if hasattr(r, "status") and hasattr(r, "flow")}
    ni, ok, comp = ends["log-ni"], ends["log-ok"], ends["log-comp"]
    assert (ni.levelno, ni.flow, ni.status, ni.left_to_undo) == (logging.WARNING, "ni", "needs_intervention", ["a"])
    assert "left to undo by hand, in this order: a (undo worker undo.a)" in ni.getMessage()
    assert (ok.levelno, ok.status) == (logging.DEBUG, "completed")
    assert (comp.levelno, comp.status, comp.error_type) == (logging.INFO, "compensated", "Boom")
    message = comp.getMessage()
    assert "ended compensated at step b: Boom: no\\u001b[31m way xxx" in message and "\x1b" not in message
    assert len(message) < 500 and message.endswith("…")
    (dead,) = [r for r in caplog.records if getattr(r, "dead_letter", None)]
    assert dead.levelno == logging.ERROR and dead.run_id == "odd-1" and "(run odd-1)" in dead.getMessage()


def test_a_completed_run_costs_no_log_call_at_info(url: str, prefix: str, caplog: pytest.LogCaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The straight line of a run's steps: at INFO, a completed run's end costs the level check alone."""
    caplog.set_level(logging.INFO, logger="flowdsl.redis")
    said: list[str] = []
    monkeypatch.setattr(advance_end, "said_end", lambda run_id, plan, state: said.append(state["status"]))

    async def main() -> None:
        async with RedisClient(url, prefix=prefix) as client:
            await _run_to_end(client, url, prefix, [(PLAIN, {}, "q-1"), (PLAIN, {}, "q-2"),
                                                    (PLAIN, {"script": {"b": {"raise": "Boom"}}}, "q-3")])

    asyncio.run(main())
    assert said == ["compensated"]


# --- dead letters in bulk ---------------------------------------------------------------------------------


def test_dead_letters_are_deleted_in_bulk_by_age_with_a_dry_run_first(url: str, prefix: str) -> None:
    keys = Keys(prefix)
    runner = CliRunner()

    def cli(*args: str) -> Any:
        return runner.invoke(app, ["dead-letters", "--redis-url", url, "--prefix", prefix, *args])

    async def setup() -> list[str]:
        async with RedisClient(url, prefix=prefix) as client:
            ids = []
            for entry_id in ("1000-0", "2000-0", "*"):  # two set aside in 1970, one now
                ids.append((await client.redis.xadd(keys.dead, {"stream": keys.control, "id": "1-0", "reason": "r",
                                                                "f:c": "x"}, id=entry_id)).decode())
            return ids

    old1, old2, new = asyncio.run(setup())

    async def left() -> list[str]:
        async with RedisClient(url, prefix=prefix) as client:
            return [letter.id for letter in await client.dead_letters(limit=None)]

    for args in (["--dry-run"], ["--delete", old1, "--delete-all"], ["--older-than", "1d", "--delete", old1],
                 ["--retry-all", "--delete-all"], ["--older-than", "1d", "--retry", old1, "--dry-run"]):
        refused = cli(*args)
        assert refused.exit_code == 2 and "error" in refused.output, (args, refused.output)
    assert cli("--older-than", "7x").exit_code == 2 and cli("--older-than", "3600").exit_code == 2  # (no unit)
    listed = json.loads(cli("--older-than", "1d", "--format", "json").stdout)
    assert [d["id"] for d in listed] == [old1, old2]
    dry = json.loads(cli("--delete-all", "--older-than", "1d", "--dry-run", "--format", "json").stdout)
    assert dry["dry_run"] is True and [d["id"] for d in dry["would_delete"]] == [old1, old2]
    assert "2 dead letter(s) set aside more than" in cli("--delete-all", "--older-than", "1d", "--dry-run").output
    assert asyncio.run(left()) == [old1, old2, new]  # a dry run deletes nothing
    done = cli("--delete-all", "--older-than", "23h59m", "--format", "json")
    assert done.exit_code == 0 and json.loads(done.stdout) == {"deleted": [{"id": old1}, {"id": old2}],
                                                               "skipped": []}
    assert asyncio.run(left()) == [new]
    assert "no dead letters set aside more than" in cli("--delete-all", "--older-than", "1h").output
    everything = cli("--delete-all")
    assert everything.exit_code == 0 and "1 dead letter(s) deleted" in everything.output
    assert asyncio.run(left()) == []


# --- a submission whose start request was never sent ---------------------------------------------------------


async def _lost_start(client: RedisClient, plan: dict[str, Any], data: dict[str, Any], run_id: str) -> None:
    """A submission whose submitter stopped after recording the run, before sending its start request."""
    await client.submit(plan, data, run_id=run_id)
    for entry_id, fields in await client.redis.xrange(client.keys.control):
        if json.loads(fields[b"c"]).get("run_id") == run_id:
            await client.redis.xdel(client.keys.control, entry_id)


def test_a_second_start_request_is_harmless(url: str, prefix: str) -> None:
    """For a run already started (and ended), and twice for a run not started yet: one start, nothing else."""
    keys = Keys(prefix)

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            (first,) = await _run_to_end(client, url, prefix, [(PLAIN, {}, "twice-1")])
            version = await client.redis.hget(keys.run("twice-1"), "v")
            await client.store.send_start("twice-1")  # the run has ended
            await client.submit(PLAIN, {}, run_id="twice-2")
            await client.store.send_start("twice-2")  # two requests for a run not started
            assert await client.resend_start("twice-2") is True
            await asyncio.wait_for(worker_here(url, prefix, burst=True, burst_horizon_s=0).serve(), 30)
            outcome = []
            for run_id in ("twice-1", "twice-2"):
                result, journal = await client.result(run_id)
                outcome.append((result.status, [e["type"] for e in journal.inputs].count("start")))
            return (first.status, version, await client.redis.hget(keys.run("twice-1"), "v"), outcome,
                    await client.redis.xlen(keys.control), await client.dead_letters(),
                    await client.resend_start("twice-1"))

    first, version, again, outcome, queued, dead, resent = asyncio.run(main())
    assert first == "completed" and version == again  # nothing written to the run that had ended
    assert outcome == [("completed", 1), ("completed", 1)]
    assert queued == 0 and dead == [] and resent is False  # every request acknowledged; none set aside


def test_a_submission_never_started_is_said_and_its_start_request_sent_again_by_the_workers(
        url: str, prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    keys = Keys(prefix)

    async def setup() -> list[Any]:
        async with RedisClient(url, prefix=prefix) as client:
            await _lost_start(client, PLAIN, {}, "lost-1")
            await _lost_start(client, PLAIN, {}, "lost-2")
            await client.cancel("lost-2", "not wanted")  # kept for its start, which never comes
            await _lost_start(client, PLAIN, {}, "lost-3")
            # lost-3's start request is a dead letter: it waits for a person, never sent again
            await client.redis.xadd(keys.dead, {"stream": keys.control, "id": "1-0", "reason": "r",
                                                "f:c": dumps({"type": "start", "run_id": "lost-3"})})
            await client.submit(PLAIN, {}, run_id="queued-1")  # a start request queued: waits for a worker
            return [(await client.start_request(r)).state for r in ("lost-1", "lost-3", "queued-1")]

    assert asyncio.run(setup()) == ["missing", "dead_letter", "queued"]
    console, out = _console()
    assert status_command("lost-1", url=url, prefix=prefix, as_json=False, console=console) == 0
    said = out.getvalue()
    assert "no start request for it is waiting" in said and "Worker processes send it again" in said, said
    capsys.readouterr()
    assert status_command("lost-1", url=url, prefix=prefix, as_json=True, console=console) == 0
    assert json.loads(capsys.readouterr().out)["start_request"]["state"] == "missing"

    async def serve() -> tuple[list[str], Any]:
        async with RedisClient(url, prefix=prefix) as client:
            worker = worker_here(url, prefix, lease_s=0.1, tidy_s=0.3)

            async def body() -> list[str]:
                return [(await client.follow(r)).status for r in ("lost-1", "lost-2", "queued-1")]

            ended = await serving([worker], body)
            return ended, (worker.stats.starts_resent, (await client.info("lost-3")).status,
                           await client.start_request("lost-3"))

    ended, (resent, waiting, start) = asyncio.run(serve())
    assert ended == ["completed", "cancelled", "completed"]
    assert resent == 2 and waiting == "submitted" and start.state == "dead_letter"


def test_cancelling_a_submission_never_started_sends_its_start_request(url: str, prefix: str) -> None:
    async def setup() -> None:
        async with RedisClient(url, prefix=prefix) as client:
            await _lost_start(client, PLAIN, {}, "lost-c")

    asyncio.run(setup())
    console, out = _console()
    assert cancel_command("lost-c", url=url, prefix=prefix, reason="stop", wait=False, as_json=False,
                          console=console) == 0
    assert "was sent now" in out.getvalue()

    async def serve() -> str:
        async with RedisClient(url, prefix=prefix) as client:
            async def body() -> str:
                return (await client.follow("lost-c")).status

            return str(await serving([worker_here(url, prefix)], body))  # (the default lease: no tidying resends)

    assert asyncio.run(serve()) == "cancelled"
