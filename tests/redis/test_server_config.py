"""The Redis runtime under real server configurations (docs/runtime.md, "The Redis server's settings"): several
databases of one server, eviction policies, persistence settings, renamed commands, maxclients, a replica.

Each test that needs a configuration of its own starts a private redis-server for it (a unix socket in a
temporary directory, no TCP port), stopped by its PID at its end.

Some of these tests need the changes of worker.py, store.py, wire.py and scripts.py described in
/tmp/redisfix/pending-*.diff (marked "pending diff" below): they fail until those are applied."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import tests.runtime.workers  # noqa: F401  (registers the conf.* workers this process serves)
from flowdsl import compile_text
from flowdsl.runtime.redis import RedisClient
from flowdsl.runtime.redis.client import RunNotFound
from flowdsl.runtime.redis.connection import (
    RedisConfigError,
    ServerFacts,
    connect,
    groups_lost,
    naming_refused,
    role_changed,
    server_unwell,
    unreachable_reason,
)
from flowdsl.runtime.redis.store import Clock
from flowdsl.workers import StepContext, WorkerRegistry
from tests.redis.inproc import serving, worker_here
from tests.redis.procs import ROOT, worker_env
from tests.redis.server import RedisServer
from tests.redis.test_cancels import SAGA, _when_running
from tests.runtime.conformance import HEADER

QUICK = HEADER.format(name="quick") + "steps:\n  - conf.a\n  - conf.b\n"
Private = Callable[..., RedisServer]


@pytest.fixture
def private() -> Iterator[Private]:
    """``private(*args)``: a redis-server of this test alone, started with ``args`` (after the test servers'
    own: AOF on, no RDB), stopped by its PID at the test's end."""
    started: list[RedisServer] = []

    def start(*args: str) -> RedisServer:
        server = RedisServer(extra_args=args).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.cleanup()


def _db(url: str, db: int) -> str:
    return url.replace("?db=0", f"?db={db}")


def _cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flowdsl", *args], cwd=ROOT, env=worker_env(), capture_output=True,
                          text=True, timeout=timeout)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "flowdsl.redis"]


async def _serve_briefly(url: str, prefix: str, seconds: float = 0.5, **options: Any) -> None:
    async def body() -> None:
        await asyncio.sleep(seconds)

    await serving([worker_here(url, prefix, **options)], body)


# --- F1: pub/sub is server-wide -------------------------------------------------------------------------------


def test_a_cancel_in_one_database_leaves_a_run_of_the_same_id_in_another_alone(server: RedisServer,
                                                                                prefix: str) -> None:
    """Two deployments in databases 1 and 2 of one server, with the same prefix and the same run id (so the
    same task ids), each running its step b: a cancel of the run in database 2 must not interrupt the step of
    database 1's run (whose saga would then be compensated): the cancel channel is shared by every database."""
    one, two = _db(server.url, 1), _db(server.url, 2)
    plan = compile_text(SAGA)

    async def main() -> Any:
        async with RedisClient(one, prefix=prefix) as c1, RedisClient(two, prefix=prefix) as c2:
            for client in (c1, c2):
                await client.submit(plan, {"script": {"b": {"sleep": 1.5}}}, run_id="order-1")

            async def body() -> Any:
                await asyncio.gather(_when_running(c1, "order-1", "b"), _when_running(c2, "order-1", "b"))
                await asyncio.sleep(0.1)  # both steps b running
                assert await c2.cancel("order-1", "staging only") == "requested"
                return await asyncio.gather(c1.follow("order-1"), c2.follow("order-1"))

            return await serving([worker_here(one, prefix, lease_s=10.0), worker_here(two, prefix, lease_s=10.0)],
                                 body)

    prod, staging = asyncio.run(main())
    assert staging.status == "cancelled"
    assert prod.status == "completed", prod.error


# --- F2, F3: eviction and persistence -------------------------------------------------------------------------


def test_a_worker_warns_once_at_start_of_a_server_that_evicts_and_keeps_nothing_on_disk(
        private: Private, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    evicting = private("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru", "--appendonly", "no")
    caplog.set_level(logging.INFO, "flowdsl.redis")
    asyncio.run(_serve_briefly(evicting.url, prefix))
    said = _warnings(caplog)
    evicts = [m for m in said if "evicts keys when it is full (maxmemory 64mb, maxmemory-policy allkeys-lru)" in m]
    assert len(evicts) == 1 and "set maxmemory-policy noeviction" in evicts[0], said
    assert len([m for m in said if "keeps no data on disk (appendonly no, save \"\")" in m]) == 1, said


def test_a_worker_warns_of_rdb_snapshots_only_and_of_volatile_eviction(private: Private, prefix: str,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    rdb = private("--appendonly", "no", "--save", "3600 1", "--maxmemory", "64mb", "--maxmemory-policy",
                  "volatile-lru")
    caplog.set_level(logging.INFO, "flowdsl.redis")
    asyncio.run(_serve_briefly(rdb.url, prefix))
    said = " | ".join(_warnings(caplog))
    assert "persists by RDB snapshots only (appendonly no): a restart of it takes every run back" in said
    assert "finished runs before their retention ends" in said


def test_a_worker_of_a_server_set_up_as_documented_says_nothing_of_it(url: str, prefix: str,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "flowdsl.redis")
    asyncio.run(_serve_briefly(url, prefix))
    said = " | ".join(_warnings(caplog))
    assert "evicts" not in said and "persist" not in said and "disk" not in said, said


def test_a_worker_says_when_the_server_restarted_and_what_it_may_have_lost(
        private: Private, prefix: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    srv = private()
    monkeypatch.setattr(Clock, "resync_s", 0.1)  # the server's settings are read again with every resync
    caplog.set_level(logging.INFO, "flowdsl.redis")

    async def main() -> None:
        async def body() -> None:
            await asyncio.sleep(0.6)
            await asyncio.to_thread(srv.kill)
            await asyncio.to_thread(srv.start)
            async with asyncio.timeout(10):
                while not any("restarted" in m for m in _warnings(caplog)):
                    await asyncio.sleep(0.05)

        await serving([worker_here(srv.url, prefix, lease_s=0.6)], body)

    asyncio.run(main())
    said = [m for m in _warnings(caplog) if "restarted" in m]
    assert "the Redis server restarted (its run_id changed): with appendfsync everysec, up to about a second of " \
           "writes may be lost" in said[0], said


def test_run_warns_of_an_evicting_server_and_a_missing_run_names_eviction(private: Private, prefix: str,
                                                                          tmp_path: Path) -> None:
    evicting = private("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-random")

    async def main() -> tuple[list[str], str]:
        async with RedisClient(evicting.url, prefix=prefix) as client:
            warnings = await client.server_warnings()
            with pytest.raises(RunNotFound) as missing:
                await client.info("gone-1")
            return warnings, str(missing.value)

    warnings, missing = asyncio.run(main())
    assert len(warnings) == 1 and "maxmemory-policy allkeys-random" in warnings[0]
    assert "or evicted by the server (maxmemory 64mb, maxmemory-policy allkeys-random)" in missing
    flow = tmp_path / "quick.yaml"
    flow.write_text(QUICK)
    r = _cli("run", str(flow), "--backend", "redis", "--redis-url", evicting.url, "--prefix", prefix, "--detach")
    assert r.returncode == 0 and "warning: this Redis evicts keys when it is full" in r.stderr, r.stderr


def test_the_server_facts_say_what_is_needed() -> None:
    documented = ServerFacts(run_id="x", role="master", maxmemory=1 << 30, policy="noeviction", aof=True,
                             fsync="everysec", save="")
    assert documented.warnings() == [] and not documented.evicts
    assert ServerFacts(maxmemory=0, policy="allkeys-lru").warnings() == []  # no maxmemory: nothing is evicted
    assert "evicted by the server" in ServerFacts(maxmemory=10, policy="allkeys-lru").loss_causes()
    assert ServerFacts(aof=False, save=None).warnings() == []  # (CONFIG refused: RDB unknown, nothing said)


# --- F8: CLIENT SETNAME refused -------------------------------------------------------------------------------


def test_processes_start_and_runs_complete_on_a_server_without_client(private: Private, prefix: str) -> None:
    """``rename-command CLIENT ""``: connection names are cosmetic; every process goes on unnamed (pending diff
    for the worker's and client's lean connections: wire.py)."""
    srv = private("--rename-command", "CLIENT", "")

    async def main() -> Any:
        async with RedisClient(srv.url, prefix=prefix) as client:
            sub = await client.submit(compile_text(QUICK), {})

            async def body() -> Any:
                return await client.follow(sub.run_id)

            return await serving([worker_here(srv.url, prefix)], body)

    assert asyncio.run(main()).status == "completed"
    r = _cli("runs", "--redis-url", srv.url, "--prefix", prefix)
    assert r.returncode == 0, r.stderr


def test_naming_refusals_are_told_apart() -> None:
    assert naming_refused(redis.ResponseError("unknown command 'CLIENT', with args beginning with: 'SETNAME' 'x'"))
    assert naming_refused(redis.exceptions.NoPermissionError(
        "this user has no permissions to run the 'client|setname' command"))
    assert not naming_refused(redis.ResponseError("unknown command 'SCRIPT', with args beginning with: 'LOAD'"))


# --- F7: maxclients -------------------------------------------------------------------------------------------


def _fill(srv: RedisServer) -> list[socket.socket]:
    """Open connections until the server refuses one (it says so as it accepts, and closes)."""
    held = []
    for _ in range(64):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(srv.socket))
        sock.settimeout(0.3)
        try:
            answer = sock.recv(100)
        except TimeoutError:  # taken: it waits for a command
            held.append(sock)
            continue
        sock.close()
        assert b"max number of clients" in answer, answer
        return held
    raise AssertionError("the server took every connection")


def test_a_client_of_a_server_at_its_maxclients_is_told_so(private: Private, prefix: str) -> None:
    srv = private("--maxclients", "4")
    held = _fill(srv)
    try:
        r = _cli("runs", "--redis-url", srv.url, "--prefix", prefix)
        assert r.returncode == 2
        assert "the server has reached its maxclients" in r.stderr and "Broken pipe" not in r.stderr, r.stderr
        assert "maxclients" in unreachable_reason(srv.url, redis.ConnectionError("Error 32: Broken pipe"))
    finally:
        for sock in held:
            sock.close()


def test_a_worker_does_not_serve_half_connected(private: Private, prefix: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Room for two connections only: the worker must not say it serves (nor count as live for long) with its
    reading loops unconnected; it says maxclients is reached (pending diff: worker.py)."""
    srv = private("--maxclients", "6")
    held = _fill(srv)
    for sock in held[-2:]:
        sock.close()
    caplog.set_level(logging.INFO, "flowdsl.redis")
    try:
        async def main() -> None:
            worker = worker_here(srv.url, prefix)
            task = asyncio.create_task(worker.serve())
            await asyncio.sleep(2.0)
            worker.stop()
            await asyncio.wait_for(task, 10)

        asyncio.run(main())
        said = [r.getMessage() for r in caplog.records]
        assert not any("serving" in m for m in said), said
        assert any("maxclients" in m for m in said), said
    finally:
        for sock in held[:-2]:
            sock.close()


# --- F6: failover -------------------------------------------------------------------------------------------


def test_role_changes_are_not_data_lost() -> None:
    unblocked = redis.ResponseError("UNBLOCKED force unblock from blocking operation, instance state changed "
                                    "(master -> replica?)")
    assert role_changed(unblocked) and server_unwell(unblocked) and not groups_lost(unblocked)
    deleted = redis.ResponseError("UNBLOCKED the stream key no longer exists")
    assert groups_lost(deleted) and not role_changed(deleted)


def test_a_worker_pointed_at_a_replica_refuses_to_start(private: Private, prefix: str) -> None:
    """A replica refuses every write for good: the worker says so and stops (pending diff: worker.py)."""
    srv = private()
    admin = srv.client()
    admin.execute_command("REPLICAOF", "127.0.0.1", "9")  # a primary that is not there: a replica all the same
    admin.close()

    async def main() -> None:
        await asyncio.wait_for(worker_here(srv.url, prefix).serve(), 8)

    with pytest.raises(RedisConfigError) as caught:
        asyncio.run(main())
    assert "is a read-only replica of 127.0.0.1:9" in str(caught.value)
    assert "point --redis-url at the primary" in str(caught.value)


def test_following_goes_on_when_the_server_becomes_a_replica_and_back(private: Private, prefix: str) -> None:
    """A failover ends a blocked read with UNBLOCKED: following says the run goes on, and goes on."""
    srv = private()
    notices: list[str] = []

    async def main() -> Any:
        async with RedisClient(srv.url, prefix=prefix) as client:
            sub = await client.submit(compile_text(QUICK), {})
            follow = asyncio.create_task(client.follow(sub.run_id, on_notice=notices.append, hint_after_s=60))
            await asyncio.sleep(0.3)
            admin = srv.client()
            admin.execute_command("REPLICAOF", "127.0.0.1", "9")
            await asyncio.sleep(0.5)
            admin.execute_command("REPLICAOF", "NO", "ONE")
            admin.close()
            assert not follow.done()

            async def body() -> Any:
                return await follow

            return await serving([worker_here(srv.url, prefix)], body)

    assert asyncio.run(main()).status == "completed"
    assert any("the run goes on" in n for n in notices), notices


# --- F4: the clock ----------------------------------------------------------------------------------------------


def test_a_step_of_the_wall_clock_does_not_move_the_runtime_clock(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """NTP, ``date -s``, a VM resumed: the runtime's clock is the server's, kept by the monotonic clock between
    syncs (pending diff: store.py)."""
    import time as real_time

    async def main() -> tuple[int, int]:
        client = connect(url)
        clock = Clock()
        await clock.sync(client)
        await client.aclose()
        before = clock.now()
        wall = real_time.time
        monkeypatch.setattr(real_time, "time", lambda: wall() - 300.0)  # the wall clock steps back 5 minutes
        return before, clock.now()

    before, after = asyncio.run(main())
    assert abs(after - before) < 1000, (before, after)


# --- F9, F10, F11: renamed SCRIPT, proto-max-bulk-len, out of memory ------------------------------------------


def test_a_server_without_script_is_named_without_printing_the_scripts(private: Private, prefix: str,
                                                                       tmp_path: Path) -> None:
    srv = private("--rename-command", "SCRIPT", "")
    flow = tmp_path / "quick.yaml"
    flow.write_text(QUICK)
    r = _cli("run", str(flow), "--backend", "redis", "--redis-url", srv.url, "--prefix", prefix, "--detach")
    assert r.returncode == 2
    assert "unknown command 'SCRIPT'" in r.stderr and "redis.call" not in r.stderr and "KEYS[" not in r.stderr, \
        r.stderr

    async def main() -> None:
        await asyncio.wait_for(worker_here(srv.url, prefix).serve(), 20)

    with pytest.raises(RedisConfigError) as caught:  # (pending diff: scripts.py)
        asyncio.run(main())
    assert "SCRIPT LOAD" in str(caught.value) and "redis.call" not in str(caught.value)


def test_a_result_larger_than_proto_max_bulk_len_is_set_aside_at_once_naming_the_setting(
        private: Private, prefix: str) -> None:
    """(pending diff: store.py) The step runs once, and the dead letter names proto-max-bulk-len."""
    srv = private("--proto-max-bulk-len", "1mb")
    calls: list[str] = []

    async def big(data: Any, ctx: StepContext) -> dict[str, Any]:
        calls.append(ctx.idempotency_key)
        return {"pad": "y" * 1_500_000}

    registry = WorkerRegistry()
    registry.register("pb.big", big)

    async def main() -> Any:
        async with RedisClient(srv.url, prefix=prefix) as client:
            await client.submit(compile_text("flowdsl: 1\nname: big\nsteps:\n  - pb.big\n"), {}, run_id="big-1")

            async def body() -> Any:
                async with asyncio.timeout(15):
                    while not await client.dead_letters():
                        await asyncio.sleep(0.1)
                return await client.dead_letters()

            return await serving([worker_here(srv.url, prefix, registry=registry, lease_s=1.0, llm=False)], body)

    letters = asyncio.run(main())
    assert "proto-max-bulk-len" in letters[0].reason, letters[0].reason
    assert len(calls) == 1


def test_run_under_an_out_of_memory_server_says_so_not_that_no_worker_is_connected(private: Private, prefix: str,
                                                                                   tmp_path: Path) -> None:
    srv = private("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    admin = srv.client()
    try:
        for i in range(4000):
            admin.set(f"junk:{i}", "x" * 2048)
    except redis.exceptions.OutOfMemoryError:
        pass
    finally:
        admin.close()
    flow = tmp_path / "quick.yaml"
    flow.write_text(QUICK)
    r = _cli("run", str(flow), "--backend", "redis", "--redis-url", srv.url, "--prefix", prefix, "--detach")
    assert r.returncode == 2 and "OOM" in r.stderr, r.stderr
    assert "no worker process is connected" not in r.stderr, r.stderr



# --- F5: client-output-buffer-limit ---------------------------------------------------------------------------


def test_a_run_larger_than_the_output_buffer_limit_becomes_a_dead_letter_naming_it(private: Private,
                                                                                 prefix: str) -> None:
    """Redis closes the connection at every read of the run's submission (plan and input, 300 KB, over a 256 KB
    limit): the worker backs off, and the start request becomes a dead letter naming the setting, instead of a
    run stuck in `submitted` and a worker reconnecting many times a second (pending diff: worker.py)."""
    srv = private("--client-output-buffer-limit", "normal 256kb 128kb 5")

    async def main() -> Any:
        async with RedisClient(srv.url, prefix=prefix) as client:
            await client.submit(compile_text(QUICK), {"pad": "y" * 300_000}, run_id="cob-1")

            async def body() -> Any:
                async with asyncio.timeout(20):
                    while not await client.dead_letters():
                        await asyncio.sleep(0.2)
                return await client.dead_letters()

            return await serving([worker_here(srv.url, prefix, lease_s=1.0, max_failures=1)], body)

    letters = asyncio.run(main())
    assert "client-output-buffer-limit" in letters[0].reason, letters[0].reason
    admin = srv.client()
    connections = int(admin.info("stats")["total_connections_received"])
    admin.close()
    assert connections < 60, connections  # backed off: not ~25 reconnections a second
