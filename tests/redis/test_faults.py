"""Fault tests of the Redis runtime: processes killed, paused and restarted while runs go on.

Every test starts its own ``flowdsl worker`` processes (and, for the Redis
crash, its own redis-server), kills only those, by PID, and stops them in a
``finally``. Each is bounded by timeouts. The workers of
``tests.redis.fault_workers`` keep a ledger: the checks are that every run
reaches its end state, that each step's side effect was applied exactly once
under its one idempotency key, and that no step began again once it was
recorded as done.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import redis

from flowdsl import compile_text
from flowdsl.runtime.redis import Keys, RedisClient
from flowdsl.runtime.report import RunResult
from tests.redis.fault_workers import make_ledger, read_ledger
from tests.redis.procs import WorkerProcs
from tests.redis.server import RedisServer

SEQUENCE = """flowdsl: 1
name: faults
workers: [tests.redis.fault_workers]
steps:
  - s1: {worker: fault.step, retry: {attempts: 3, initial: 20ms}}
  - s2: {worker: fault.step, retry: {attempts: 3, initial: 20ms}}
  - s3: {worker: fault.step, retry: {attempts: 3, initial: 20ms}}
  - s4: {worker: fault.step, retry: {attempts: 3, initial: 20ms}}
"""
STEPS = ("s1", "s2", "s3", "s4")


async def _submit(url: str, prefix: str, spec: str, inputs: list[dict[str, Any]]) -> list[str]:
    plan = compile_text(spec)
    async with RedisClient(url, prefix=prefix) as client:
        return [(await client.submit(plan, data, run_id=f"{prefix}-r{i}")).run_id for i, data in enumerate(inputs)]


async def _results(url: str, prefix: str, run_ids: list[str], timeout: float) -> list[RunResult]:
    """Every run followed to its end; and no message set aside on the way (a crash is never a failure)."""
    async with RedisClient(url, prefix=prefix) as client:
        results = list(await asyncio.wait_for(asyncio.gather(*(client.follow(r) for r in run_ids)), timeout))
        assert await client.dead_letters() == []
        return results


def _check_ledger(ledger: str, results: list[RunResult], steps: tuple[str, ...] = STEPS) -> dict[str, int]:
    """The exactly-once-effect and never-again-after-done checks; returns executions per idempotency key."""
    lines = read_ledger(ledger)
    begins: dict[str, list[float]] = defaultdict(list)
    applied: dict[str, int] = defaultdict(int)
    for line in lines:
        if line["ev"] == "begin":
            begins[line["key"]].append(line["t"])
        elif line["ev"] == "effect" and line["applied"]:
            applied[line["key"]] += 1
    # the effect files are the effects (O_EXCL: at most one per key); a process killed between making one
    # and writing its ledger line leaves the file without the line, so the files are counted, not the lines
    made = set(os.listdir(os.path.join(ledger, "effects")))
    for result in results:
        assert result.status == "completed", (result.run_id, result.status, result.error)
        done_at = {e["step"]: e["at"] for e in result.events if e["type"] == "step_succeeded"}
        for step in steps:
            key = f"{result.run_id}/{step}"
            assert key.replace("/", "__") in made, f"{key}: recorded as done, but its side effect was never made"
            assert applied[key] <= 1, f"{key}: side effect applied {applied[key]} times"
            late = [t for t in begins[key] if t * 1000 > done_at[step] + 50]
            assert not late, f"{key} began again after it was recorded as done"
    known = {f"{r.run_id}/{s}" for r in results for s in steps}
    assert set(begins) <= known, f"executions under unexpected keys: {set(begins) - known}"
    return {k: len(v) for k, v in begins.items()}


def _open_steps(ledger: str) -> dict[int, int]:
    """pid -> number of steps it has begun and not finished (per the ledger)."""
    count: dict[int, int] = defaultdict(int)
    for line in read_ledger(ledger):
        count[line["pid"]] += 1 if line["ev"] == "begin" else -1
    return count


def test_sigkill_workers_in_the_middle_of_steps(url: str, prefix: str, tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path)
    # states are written at a run's start and end only: a process taking over rebuilds them from the journal
    procs = WorkerProcs(url, prefix, ["tests.redis.fault_workers"], lease=1.0, concurrency=8,
                        extra_args=["--snapshot-kb", "0"])
    try:
        procs.start(2)
        runs = asyncio.run(_submit(url, prefix, SEQUENCE, [{"ledger": ledger, "step_sleep": 0.25}] * 6))
        rng = random.Random(7)
        kills = 0
        deadline = time.monotonic() + 15
        while kills < 5 and time.monotonic() < deadline:
            busy = _open_steps(ledger)
            victims = [p for p in procs.alive() if busy.get(p.pid, 0) > 0]
            if victims:
                procs.kill(rng.choice(victims))  # mid-step: it has begun a step and not finished it
                kills += 1
                procs.start(1, wait=False)
                time.sleep(rng.uniform(0.2, 0.5))
            else:
                time.sleep(0.02)
        assert kills == 5
        results = asyncio.run(_results(url, prefix, runs, timeout=45))
        executions = _check_ledger(ledger, results)
        assert max(executions.values()) >= 2  # the kills did interrupt steps, which ran again with the same key
    finally:
        procs.stop_all()


def test_sigkill_a_worker_running_steps_it_dispatched_to_itself(url: str, prefix: str, tmp_path: Path) -> None:
    """One worker process runs each run's steps one after the other without queueing them (self-dispatch:
    each is held under the stream entry that started the chain). Killed while such steps run, it leaves
    only pending entries; the next process takes them over, queues the held steps again and finishes."""
    ledger = make_ledger(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = WorkerProcs(url, prefix, ["tests.redis.fault_workers"], lease=1.0, concurrency=8, log_dir=logs)
    try:
        (first,) = procs.start(1)
        runs = asyncio.run(_submit(url, prefix, SEQUENCE, [{"ledger": ledger, "step_sleep": 0.3}] * 3))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # until s3 is running somewhere: two chained steps in
            lines = read_ledger(ledger)
            done = {line["key"] for line in lines if line["ev"] == "effect"}
            if any(line["ev"] == "begin" and line["key"].endswith("/s3") and line["key"] not in done
                   for line in lines):
                break
            time.sleep(0.01)
        time.sleep(0.1)  # the runs go in step: every one is now well inside a step's sleep, none at its effect
        procs.kill(first)
        interrupted = {line["key"] for line in read_ledger(ledger) if line["ev"] == "begin"} - \
            {line["key"] for line in read_ledger(ledger) if line["ev"] == "effect"}
        assert any(key.endswith("/s3") for key in interrupted)
        assert all(line["pid"] == first.pid for line in read_ledger(ledger))  # every step so far ran here
        procs.start(1)
        results = asyncio.run(_results(url, prefix, runs, timeout=30))
        executions = _check_ledger(ledger, results)
        assert all(executions[key] == 2 for key in interrupted)  # ran again, with the same key
        procs.stop_all()
        # its exit line counts what it took over (the chains' start entries: it said "0 reclaimed")
        taken = re.search(r"(\d+) reclaimed", (logs / "worker-1.log").read_text())
        assert taken is not None and int(taken.group(1)) >= 1, (logs / "worker-1.log").read_text()
    finally:
        procs.stop_all()


def test_sigkill_the_processes_advancing_runs_at_varied_moments(url: str, prefix: str, tmp_path: Path) -> None:
    """Kill right after a step's effect (its worker is then applying the result and relaying the outcome)
    and kill a process that only starts runs and fires timers, at random moments."""
    ledger = make_ledger(tmp_path)
    replaying = ["--snapshot-kb", "0"]  # states rebuilt from the journal by whoever takes a run up
    workers = WorkerProcs(url, prefix, ["tests.redis.fault_workers"], lease=1.0, concurrency=8, extra_args=replaying)
    advancers = WorkerProcs(url, prefix, [], lease=1.0, extra_args=replaying)
    try:
        workers.start(2)
        advancers.start(1)
        data = {"ledger": ledger, "step_sleep": 0.05, "flaky": ["s2", "s4"]}  # retries go through timers
        runs = asyncio.run(_submit(url, prefix, SEQUENCE, [data] * 6))
        rng = random.Random(11)
        seen = 0
        kills = 0
        deadline = time.monotonic() + 15
        while kills < 8 and time.monotonic() < deadline:
            lines = read_ledger(ledger)
            effects = [line for line in lines[seen:] if line["ev"] == "effect"]
            seen = len(lines)
            if effects and kills % 2 == 0:
                victim = next((p for p in workers.alive() if p.pid == effects[-1]["pid"]), None)
                if victim is not None:
                    time.sleep(rng.choice([0, 0.001, 0.002, 0.005, 0.01]))
                    workers.kill(victim)
                    workers.start(1, wait=False)
                    kills += 1
            elif kills % 2 == 1 and advancers.alive():
                time.sleep(rng.uniform(0.0, 0.05))
                advancers.kill(advancers.alive()[0])
                advancers.start(1, wait=False)
                kills += 1
            time.sleep(0.005)
        assert kills >= 4
        results = asyncio.run(_results(url, prefix, runs, timeout=45))
        _check_ledger(ledger, results)
    finally:
        workers.stop_all()
        advancers.stop_all()


def test_sigkill_redis_under_load_then_restart(tmp_path: Path) -> None:
    """AOF on, appendfsync everysec: a killed and restarted server loses nothing it acknowledged."""
    server = RedisServer().start()
    ledger = make_ledger(tmp_path)
    # states rebuilt from the journal after the restart (the LOAD script, loaded again after NOSCRIPT)
    procs = WorkerProcs(server.url, "crash", ["tests.redis.fault_workers"], lease=3.0, concurrency=16,
                        extra_args=["--snapshot-kb", "0"])
    try:
        procs.start(2)
        runs = asyncio.run(_submit(server.url, "crash", SEQUENCE, [{"ledger": ledger, "step_sleep": 0.3}] * 10))
        deadline = time.monotonic() + 20  # steps are running everywhere: some done, most to come
        while not any(line["ev"] == "effect" for line in read_ledger(ledger)) and time.monotonic() < deadline:
            time.sleep(0.02)
        server.kill()
        effects = sum(line["ev"] == "effect" for line in read_ledger(ledger))
        assert 0 < effects < 10 * len(STEPS)  # killed under load: some steps done, most still to come
        time.sleep(1.0)
        server.start()
        results = asyncio.run(_results(server.url, "crash", runs, timeout=45))
        _check_ledger(ledger, results)
        assert all(p.poll() is None for p in procs.procs)  # the workers survived the outage
    finally:
        procs.stop_all()
        server.cleanup()


def test_workers_ride_out_a_restart_while_redis_loads_its_data(tmp_path: Path) -> None:
    """A restarted Redis answers ``-LOADING`` until it has read its data back; every loop of a worker
    (reader, timers, reclaimer, heartbeats) waits that out as it waits out an outage, instead of stopping
    the process — with a dataset big enough that the loading is seen. Following a run started meanwhile waits
    too (it failed with ``LOADING``)."""
    server = RedisServer(extra_args=("--enable-debug-command", "local")).start()
    ledger = make_ledger(tmp_path)
    procs = WorkerProcs(server.url, "loading", ["tests.redis.fault_workers"], lease=1.0, concurrency=4)
    try:
        filler = server.client()
        filler.execute_command("SELECT", 3)  # another database: the runs' keys are not touched
        filler.execute_command("DEBUG", "POPULATE", 1_500_000, "filler", 32)
        filler.bgrewriteaof()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (filler.info("persistence")["aof_rewrite_in_progress"]
                                              or filler.info("persistence")["aof_rewrite_scheduled"]):
            time.sleep(0.1)
        filler.close()
        procs.start(2)
        async def submit_early() -> list[str]:
            async with RedisClient(server.url, prefix="loading") as client:
                data = {"ledger": make_ledger(tmp_path / "early"), "step_sleep": 0.0}
                return [(await client.submit(compile_text(SEQUENCE), data, run_id="early")).run_id]

        early = asyncio.run(submit_early())
        asyncio.run(_results(server.url, "loading", early, timeout=30))
        server.stop()  # SIGTERM: the data stays (AOF)
        server.start(timeout=60)  # answers INFO while it loads
        probe = server.client()
        assert probe.info("persistence")["loading"] == 1, "the restart loaded too fast to test anything"
        [followed] = asyncio.run(_results(server.url, "loading", early, timeout=60))  # starts while it loads
        assert followed.status == "completed"
        while probe.info("persistence")["loading"]:
            time.sleep(0.05)
        probe.close()
        time.sleep(1.5)  # past a lease: every loop has met the server again
        assert all(p.poll() is None for p in procs.procs), "a worker stopped while Redis was loading its data"
        runs = asyncio.run(_submit(server.url, "loading", SEQUENCE, [{"ledger": ledger, "step_sleep": 0.0}] * 3))
        _check_ledger(ledger, asyncio.run(_results(server.url, "loading", runs, timeout=30)))
    finally:
        procs.stop_all()
        server.cleanup()


def test_a_paused_worker_loses_its_lease_and_its_late_result_is_rejected(url: str, prefix: str,
                                                                        tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path)
    spec = "flowdsl: 1\nname: paused\nsteps:\n  - slow: {worker: fault.slow_once}\n"
    procs = WorkerProcs(url, prefix, ["tests.redis.fault_workers"], lease=1.0)
    paused = None
    try:
        first, second = procs.start(2)
        (run_id,) = asyncio.run(_submit(url, prefix, spec, [{"ledger": ledger, "first_sleep": 3.0}]))
        deadline = time.monotonic() + 10
        while paused is None and time.monotonic() < deadline:
            begun = [line["pid"] for line in read_ledger(ledger) if line["ev"] == "begin"]
            if begun:
                paused = first if begun[0] == first.pid else second
            time.sleep(0.01)
        assert paused is not None
        procs.signal(paused, signal.SIGSTOP)
        # the step never went through its stream: the start request's transition gave it to the process that
        # started the run (self-dispatch), so it is found again through that request, reclaimed after the lease
        redis_client = redis.Redis.from_url(url)
        assert redis_client.xlen(Keys(prefix).queue("fault.slow_once")) == 0
        redis_client.close()
        (result,) = asyncio.run(_results(url, prefix, [run_id], timeout=20))
        other = second if paused is first else first
        assert result.status == "completed" and result.context["by"] == other.pid
        procs.signal(paused, signal.SIGCONT)

        async def rejection() -> list[dict[str, Any]]:
            async with RedisClient(url, prefix=prefix) as client:
                while True:
                    _, journal = await client.result(run_id)
                    late = [e for e in journal.events if e["type"] == "result_rejected"] + journal.notes
                    if late:
                        return late
                    await asyncio.sleep(0.05)

        late = asyncio.run(asyncio.wait_for(rejection(), 15))
        assert late[0]["task_id"] == f"{run_id}/slow#1"
        assert late[0]["result_type"] == "task_succeeded"
        effects = [line for line in read_ledger(ledger) if line["ev"] == "effect"]
        assert sorted(line["pid"] for line in effects) == sorted([paused.pid, other.pid])  # both ran it ...
        assert [line["applied"] for line in effects if line["pid"] == other.pid] == [True]  # ... once for real
        _, journal = asyncio.run(_journal(url, prefix, run_id))
        assert [e["type"] for e in journal.events].count("step_succeeded") == 1
    finally:
        if paused is not None:
            procs.signal(paused, signal.SIGCONT)
        procs.stop_all()


async def _journal(url: str, prefix: str, run_id: str) -> Any:
    async with RedisClient(url, prefix=prefix) as client:
        return await client.result(run_id)


@pytest.mark.parametrize("grace", [0.3])
def test_sigterm_hands_back_an_unfinished_step_at_once(url: str, prefix: str, tmp_path: Path, grace: float) -> None:
    """A worker stopped with SIGTERM gives its in-flight step back: another runs it long before the lease."""
    ledger = make_ledger(tmp_path)
    spec = "flowdsl: 1\nname: handback\nsteps:\n  - slow: {worker: fault.slow_once}\n"
    procs = WorkerProcs(url, prefix, ["tests.redis.fault_workers"], lease=30.0,
                        extra_args=["--grace", str(grace)])
    try:
        (first,) = procs.start(1)
        (run_id,) = asyncio.run(_submit(url, prefix, spec, [{"ledger": ledger, "first_sleep": 20.0}]))
        deadline = time.monotonic() + 10
        while not read_ledger(ledger) and time.monotonic() < deadline:
            time.sleep(0.01)
        procs.signal(first, signal.SIGTERM)
        assert first.wait(timeout=10) == 0
        procs.start(1)
        t0 = time.monotonic()
        (result,) = asyncio.run(_results(url, prefix, [run_id], timeout=15))
        assert result.status == "completed" and time.monotonic() - t0 < 10  # not after the 30 s lease
    finally:
        procs.stop_all()


def test_following_waits_for_a_redis_that_is_down_when_it_is_called(tmp_path: Path) -> None:
    """``RedisClient.follow`` called while Redis is unreachable waits for it, as for a connection lost later (it
    raised redis-py's ConnectionError at once): within ``timeout_s`` it raises TimeoutError, saying why; with
    Redis back in time, it follows the run to its end (audit F7)."""
    import tests.runtime.workers  # noqa: F401  (registers the conf.* workers served here)
    from tests.redis.inproc import worker_here
    from tests.runtime.conformance import HEADER

    plan = compile_text(HEADER.format(name="down") + "steps:\n  - conf.a\n")
    server = RedisServer().start()

    async def done_run() -> None:
        async with RedisClient(server.url, prefix="down") as client:
            await client.submit(plan, {}, run_id="down1")
            await worker_here(server.url, "down", burst=True, llm=False).serve()
            assert (await client.info("down1")).status == "completed"

    async def while_down() -> tuple[float, list[str]]:
        notices: list[str] = []
        async with RedisClient(server.url, prefix="down") as client:
            t0 = time.monotonic()
            with pytest.raises(TimeoutError, match=r"did not finish within 0\.6 s: Redis could not be reached"):
                await client.follow("down1", timeout_s=0.6, on_notice=notices.append)
            return time.monotonic() - t0, notices

    async def back_in_time() -> RunResult:
        async with RedisClient(server.url, prefix="down") as client:
            following = asyncio.create_task(client.follow("down1", timeout_s=20))
            await asyncio.sleep(0.5)
            assert not following.done()  # waiting, not failed
            await asyncio.to_thread(server.start)
            return await asyncio.wait_for(following, 20)

    try:
        asyncio.run(done_run())
        server.stop()  # (SIGTERM: the AOF is written; the data comes back with the server)
        waited, notices = asyncio.run(while_down())
        assert waited >= 0.6 and any("lost the connection to Redis" in n for n in notices), (waited, notices)
        result = asyncio.run(back_in_time())
        assert result.status == "completed"
    finally:
        server.cleanup()
