"""The Redis commands of the CLI when something is wrong: a server that is not Redis, a database it does not
have, bad or empty options, a run id reused for another submission, a run that disappears while followed,
and what they say while following or cancelling (``run --backend redis``, ``worker``, ``status``, ``runs``,
``cancel``). Every error is one line naming what is wrong, exit 2, never a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import tests.runtime.workers  # noqa: F401  (registers the conf.* workers this process serves)
from flowdsl import compile_text
from flowdsl.cli import app
from flowdsl.runtime.redis import RedisClient, RedisWorker, WorkerOptions
from flowdsl.runtime.redis.keys import Keys
from tests.redis.inproc import stopped
from tests.redis.procs import ROOT, worker_env
from tests.redis.server import RedisServer
from tests.runtime.conformance import HEADER
from tests.spawned import StderrReader

SAGA = HEADER.format(name="saga") + "steps:\n  - conf.a: {compensate: undo.a}\n  - conf.b\n"
OTHER = HEADER.format(name="other") + "steps:\n  - conf.a\n"


def cli(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(app, list(args), env=env)


def flowdsl(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real command in a process of its own (what asyncio prints on stderr is seen as a user sees it)."""
    return subprocess.run([sys.executable, "-m", "flowdsl", *args], cwd=ROOT, env=worker_env(env),
                          capture_output=True, text=True, timeout=timeout)


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "flowdsl", *args], cwd=ROOT, env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGINT, timeout: float = 20) -> tuple[str, str]:
    """Signal one of our processes (by its PID) and collect what it wrote."""
    if proc.poll() is None:
        os.kill(proc.pid, sig)
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        return proc.communicate(timeout=10)


def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    path = tmp_path / "saga.yaml"
    path.write_text(SAGA)
    return path


@pytest.fixture
def not_redis() -> Any:
    """A TCP server on 127.0.0.1 (a port the system picks) that answers every connection like a web server."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    done = threading.Event()

    def answer(conn: socket.socket) -> None:
        # each connection on its own, answered once and then kept open until the client closes it, so that
        # what the client sees is the answer (not a connection closed before or after it: a race)
        with conn:
            conn.settimeout(10)
            try:
                if conn.recv(4096):
                    conn.sendall(b"<!DOCTYPE HTML>\n<html><body>Error response</body></html>\n")
                    while conn.recv(4096):
                        pass
            except OSError:
                pass

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    done.set()
    thread.join(5)
    listener.close()


# --- 1. tracebacks ---------------------------------------------------------------------------------------



@contextlib.asynccontextmanager
async def _b_hanging(url: str, prefix: str, client: RedisClient, run_id: str) -> AsyncIterator[asyncio.Task[Any]]:
    """A worker serving a run of SAGA whose step b hangs, until b is scheduled; yields the follow task."""
    worker = RedisWorker(url, prefix=prefix, options=WorkerOptions(handle_signals=False))
    serving = asyncio.create_task(worker.serve())
    try:
        seen = asyncio.Event()
        follow = asyncio.create_task(client.follow(run_id, on_event=lambda e: seen.set()
                                                   if e["type"] == "step_scheduled" and e["step"] == "b" else None))
        await asyncio.wait_for(seen.wait(), 20)
        yield follow
    finally:
        worker.stop()
        await stopped([worker], [serving])

def test_a_server_that_is_not_redis_is_one_clean_line_for_every_command(not_redis: str, spec: Path) -> None:
    for args in (["runs"], ["status", "x"], ["cancel", "x"], ["run", str(spec), "--backend", "redis"]):
        r = flowdsl(*args, "--redis-url", not_redis)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and "Fatal error" not in r.stderr, r.stderr
        assert "did not answer in the Redis protocol" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_a_database_the_server_does_not_have_is_a_usage_error_naming_it(server: RedisServer, spec: Path) -> None:
    url = f"unix://{server.socket}?db=99"  # the test server has 4 databases
    for args in (["runs"], ["status", "x"], ["cancel", "x"], ["run", str(spec), "--backend", "redis"]):
        r = flowdsl(*args, "--redis-url", url)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and "selects database 99" in r.stderr, r.stderr


# --- 1c, 2. numeric options -----------------------------------------------------------------------------


@pytest.mark.parametrize("option, value", [
    ("--retention", "inf"), ("--retention", "nan"), ("--retention", "0"), ("--retention", "-5"),
    ("--retention", "1e30"), ("--schedule-timeout", "inf"), ("--schedule-timeout", "nan"),
    ("--schedule-timeout", "0"), ("--schedule-timeout", "-1"),
])
def test_run_refuses_durations_that_are_not_finite_positive_and_sane(option: str, value: str, spec: Path,
                                                                      tmp_path: Path) -> None:
    r = cli("run", str(spec), "--backend", "redis", "--redis-url", f"unix://{tmp_path}/none.sock", "--detach",
            option, value)
    assert r.exit_code == 2 and f"Invalid value for '{option}'" in r.output and "from" in r.output, r.output
    assert "Traceback" not in r.output and "none.sock" not in r.output  # refused before Redis is tried


@pytest.mark.parametrize("option, value", [
    ("--lease", "inf"), ("--lease", "nan"), ("--lease", "0"), ("--lease", "-1"), ("--grace", "-1"),
    ("--grace", "nan"), ("--retention", "-1"), ("--retention", "inf"), ("--schedule-timeout", "-1"),
    ("--schedule-timeout", "nan"), ("--concurrency", "100000000000000000000"), ("--concurrency", "0"),
])
def test_worker_refuses_bad_numbers_before_it_is_built(option: str, value: str, tmp_path: Path) -> None:
    # a process of its own, with a timeout: a worker that accepted the value would wait for Redis forever
    r = flowdsl("worker", "--redis-url", f"unix://{tmp_path}/none.sock", option, value, timeout=30)
    assert r.returncode == 2 and f"Invalid value for '{option}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_runs_refuses_a_limit_redis_cannot_take(tmp_path: Path) -> None:
    r = cli("runs", "--redis-url", f"unix://{tmp_path}/none.sock", "-n", "1000000000000000000000")
    assert r.exit_code == 2 and "Invalid value for '--limit'" in r.output and "Traceback" not in r.output


def test_a_bounded_duration_is_accepted_and_stored(url: str, prefix: str, spec: Path, server: RedisServer) -> None:
    r = cli("run", str(spec), "--backend", "redis", "--redis-url", url, "--prefix", prefix, "--detach",
            "--run-id", "kept", "--retention", "60", "--schedule-timeout", "0.5")
    assert r.exit_code == 0, r.output
    ret, sts = server.client().hmget(Keys(prefix).run("kept"), "ret", "sts")
    assert (ret, sts) == (b"60000", b"500")


def test_the_python_api_refuses_a_retention_that_cannot_be_stored(url: str, prefix: str) -> None:
    async def main() -> None:
        async with RedisClient(url, prefix=prefix) as client:
            await client.submit(compile_text(SAGA), {}, retention_s=float("inf"))

    with pytest.raises(ValueError, match="retention_s must be a finite number"):
        asyncio.run(main())


# --- 3. empty values ------------------------------------------------------------------------------------


def test_an_empty_url_or_prefix_is_a_usage_error_not_the_default(spec: Path, url: str) -> None:
    for args, env, message in [
        (["runs", "--redis-url", ""], None, "--redis-url is empty"),
        (["status", "x", "--redis-url", "  "], None, "--redis-url is empty"),
        (["runs", "--redis-url", url, "--prefix", ""], None, "--prefix is empty"),
        (["runs"], {"FLOWDSL_REDIS_URL": ""}, "$FLOWDSL_REDIS_URL is set but empty"),
        (["runs", "--redis-url", url], {"FLOWDSL_REDIS_PREFIX": ""}, "$FLOWDSL_REDIS_PREFIX is set but empty"),
        (["run", str(spec), "--backend", "redis", "--redis-url", ""], None, "--redis-url is empty"),
        (["worker", "--redis-url", ""], None, "--redis-url is empty"),
        (["run", str(spec), "--redis-url", ""], None, "need --backend redis"),
        (["run", str(spec), "--prefix", "p"], None, "need --backend redis"),
        (["runs", "--redis-url", "redis://[::1/0"], None, "cannot be read: Invalid IPv6 URL"),
        (["worker"], {"FLOWDSL_REDIS_URL": "redis://[::1/0"}, "cannot be read"),
    ]:
        r = cli(*args, env=env)
        assert r.exit_code == 2 and message in r.stderr, (args, r.output)
        assert "Traceback" not in r.output


def test_a_url_that_does_not_name_its_database_once_as_a_number_is_one_line_exit_2(spec: Path,
                                                                                 server: RedisServer) -> None:
    """Before, ``/x``, ``/1x`` and ``/O`` went to database 0 and ``/2?db=3`` to database 3, without a word."""
    for args, url, message in [
        (["runs"], "redis://127.0.0.1:1/x", "selects no database: its path must be empty or /<database number>"),
        (["status", "x"], "redis://127.0.0.1:1/O", "not '/O'"),
        (["worker"], f"unix://{server.socket}?db=1&db=2", "selects the database more than once (?db=1 and ?db=2)"),
        (["run", str(spec), "--backend", "redis"], "redis://127.0.0.1:1/2?db=3", "(the path /2 and ?db=3)"),
    ]:
        r = cli(*args, "--redis-url", url)
        said = " ".join(r.stderr.split())
        assert r.exit_code == 2 and said.startswith("error: the Redis URL ") and message in said, (args, r.output)
        assert "Traceback" not in r.output and r.stderr.count("error:") == 1


# --- 4. a run that disappears; cancel --wait of a run not started --------------------------------------------


def test_following_a_run_that_disappears_with_its_redis_says_so_and_exits_2(tmp_path: Path) -> None:
    private = RedisServer().start()  # a server of its own (in /tmp: a unix socket path is short)
    try:
        url = private.url
        asyncio.run(_submit(url, "p", "lost"))
        follower = spawn("status", "lost", "--follow", "--redis-url", url, "--prefix", "p")
        try:
            wait_for(lambda: _reading_the_journal(private), 30)  # following: the run waits for a worker process
            private.kill()
            shutil.rmtree(private.dir / "appendonlydir", ignore_errors=True)  # restarted without its data
            for name in ("appendonly.aof", "dump.rdb"):
                (private.dir / name).unlink(missing_ok=True)
            private.start()
            _, err = follower.communicate(timeout=30)
        finally:
            stop(follower)
        assert follower.returncode == 2, err
        assert "run 'lost' no longer exists in Redis (was Redis restarted without persistence" in err, err
        assert "Traceback" not in err
    finally:
        private.cleanup()


def _reading_the_journal(server: RedisServer) -> bool:
    """Whether a follower (its reader connection ``flowdsl-follow``) is blocked reading a run's journal."""
    client = server.client()
    try:
        return any(c.get("name") == "flowdsl-follow" and c.get("cmd") == "xread" for c in client.client_list())
    finally:
        client.close()


def test_cancel_wait_of_a_run_no_worker_started_says_why_it_waits(url: str, prefix: str) -> None:
    asyncio.run(_submit(url, prefix, "idle"))
    waiting = spawn("cancel", "idle", "--wait", "--redis-url", url, "--prefix", prefix)
    said = StderrReader(waiting)
    try:
        said.wait_until(lambda text: "no worker process is connected" in text)
    finally:
        os.kill(waiting.pid, signal.SIGINT)
        out, _ = said.finish()
    text = said.text()
    assert "run idle has not started" in out and "no worker process is connected" in text, (out, text)
    assert waiting.returncode == 130 and "flowdsl status idle --follow" in text and "RUN_ID" not in text


async def _submit(url: str, prefix: str, run_id: str, spec: str = SAGA, data: dict[str, Any] | None = None) -> None:
    async with RedisClient(url, prefix=prefix) as client:
        await client.submit(compile_text(spec), data if data is not None else {"script": {}}, run_id=run_id)


# --- 5. a run id reused for another submission ------------------------------------------------------------


def test_a_run_id_reused_with_another_flow_or_input_is_refused(url: str, prefix: str, spec: Path,
                                                              tmp_path: Path) -> None:
    other = tmp_path / "other.yaml"
    other.write_text(OTHER)
    common = ["--backend", "redis", "--redis-url", url, "--prefix", prefix, "--detach", "--run-id", "X"]
    first = cli("run", str(spec), *common, "--set", "script={}")
    assert first.exit_code == 0, first.output
    same = cli("run", str(spec), *common, "--set", "script={}")
    assert same.exit_code == 0 and "already submitted" in same.stderr  # idempotent: the same submission
    again = cli("run", str(spec), *common, "--set", 'script={"b": {"raise": "Boom"}}', "--format", "json")
    assert again.exit_code == 2 and "run id 'X' is taken by an earlier submission with another input" in \
        " ".join(again.stderr.split())
    assert json.loads(again.stdout) == {"status": "error", "run_id": "X", "error": {
        "type": "RunExists", "message": json.loads(again.stdout)["error"]["message"]}}
    flow = cli("run", str(other), *common, "--set", "script={}")
    assert flow.exit_code == 2 and "another plan" in flow.stderr and "flow 'saga'" in flow.stderr


# --- 6. runs --status ------------------------------------------------------------------------------------


def test_runs_status_must_be_a_run_state_any_case(url: str, prefix: str) -> None:
    asyncio.run(_submit(url, prefix, "s1"))
    bogus = cli("runs", "--redis-url", url, "--prefix", prefix, "--status", "bogus")
    assert bogus.exit_code == 2 and "not a run state" in bogus.stderr and "needs_intervention" in bogus.stderr
    upper = cli("runs", "--redis-url", url, "--prefix", prefix, "--status", "SUBMITTED", "-f", "json")
    assert upper.exit_code == 0 and [i["run_id"] for i in json.loads(upper.stdout)] == ["s1"]


# --- 7. cancelled before it started ---------------------------------------------------------------------------


def test_a_run_cancelled_twice_before_it_started_runs_nothing_and_journals_each_cancel_once(
        url: str, prefix: str, server: RedisServer) -> None:
    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            await client.submit(compile_text(SAGA), {"script": {}}, run_id="early")
            assert await client.cancel("early", "first") == "requested"
            assert await client.cancel("early", "second") == "requested"
            worker = RedisWorker(url, prefix=prefix, options=WorkerOptions(handle_signals=False, burst=True))
            await asyncio.wait_for(worker.serve(), 30)
            return await client.result("early")

    (result, journal) = asyncio.run(main())
    assert result is not None and result.status == "cancelled" and result.error["message"] == "first"
    inputs = [e["type"] for e in journal.inputs]
    assert inputs.count("cancel_requested") == 2 and inputs.count("start") == 1
    assert "attempt_started" not in [e["type"] for e in journal.events]
    keys = Keys(prefix)
    redis = server.client()
    for stream in (keys.queue("conf.a"), keys.queue("conf.b")):
        assert not redis.exists(stream) or redis.xinfo_stream(stream)["entries-added"] == 0  # nothing queued
    assert redis.xlen(keys.control) == 0  # the start request was acknowledged and deleted; no cancel request


def test_a_cancel_held_while_the_start_was_computed_is_applied_once_by_the_next_start(url: str, prefix: str,
                                                                                        server: RedisServer) -> None:
    """The CANCEL script holds a request when it finds the run not started; a start that read the run before
    the request was held learns of it from its own transition, or (when its process died first) the next
    start request of the run applies it: exactly once (``cc`` counts those applied)."""
    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(compile_text(SAGA), {"script": {"b": {"hang": True}}}, run_id="race")
            async with _b_hanging(url, prefix, client, sub.run_id) as follow:
                # as if a cancel had been held after the start read the run, and the starter died before
                # applying it: the next start request (a resubmission) finds it
                server.client().hset(Keys(prefix).run("race"), "cancel", '["held late"]')
                again = await client.submit(compile_text(SAGA), {"script": {"b": {"hang": True}}}, run_id="race")
                assert not again.created
                resent = await client.store.call("XADD", client.keys.control, "*", "c",
                                                 b'{"type":"start","run_id":"race"}')
                assert resent
                result = await asyncio.wait_for(follow, 20)
                _, journal = await client.result("race")
                return result, journal

    result, journal = asyncio.run(main())
    assert result.status == "cancelled" and result.error["message"] == "held late"
    assert [e["type"] for e in journal.inputs].count("cancel_requested") == 1


# --- 8. polish ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_ctrl_c_while_following_names_the_run_in_json_and_in_the_hint(url: str, prefix: str, spec: Path,
                                                                      sig: signal.Signals) -> None:
    """Ctrl-C — and SIGTERM or SIGHUP, as `timeout`, systemd or a closed terminal send — stops following (the
    run goes on): exit 130, the one JSON object, the hint; never a process killed mid-output."""
    run_id = f"stop-{sig.name.lower()}"
    proc = spawn("run", str(spec), "--backend", "redis", "--redis-url", url, "--prefix", prefix, "--run-id",
                 run_id, "--format", "json")
    wait_for(lambda: server_has(url, prefix, run_id))
    time.sleep(0.5)
    out, err = stop(proc, sig)
    assert proc.returncode == 130, err
    payload = json.loads(out)
    assert payload["run_id"] == run_id and payload["error"]["type"] == "Interrupted"
    assert f"flowdsl status {run_id} --follow" in " ".join(err.split()) and "RUN_ID" not in err
    assert "Traceback" not in err, err


def server_has(url: str, prefix: str, run_id: str) -> bool:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return bool(client.exists(Keys(prefix).run(run_id)))
    finally:
        client.close()


def test_runs_does_not_shorten_flow_names_when_not_a_terminal() -> None:
    from rich.console import Console

    from flowdsl.runtime.redis.client import RunInfo
    from flowdsl.runtime.redis.commands import _print_runs

    items = [RunInfo("ecommerce_order-20261203T113921-c20310", "ecommerce_order", "needs_intervention",
                     1764761961000, 1764761961000, 1764761961007)]
    piped = io.StringIO()
    _print_runs(items, Console(file=piped, width=60, highlight=False))
    assert "ecommerce_order " in piped.getvalue() and "…" not in piped.getvalue()
    term = io.StringIO()
    _print_runs(items, Console(file=term, width=60, highlight=False, force_terminal=True))
    assert "…" in term.getvalue()  # in a narrow terminal the flow's name is still what gives way


def test_status_of_a_running_run_says_it_is_running(url: str, prefix: str, spec: Path) -> None:
    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(compile_text(SAGA), {"script": {"b": {"hang": True}}}, run_id="live")
            async with _b_hanging(url, prefix, client, sub.run_id) as follow:
                shown = await asyncio.to_thread(cli, "status", "live", "--redis-url", url, "--prefix", prefix)
                await client.cancel("live")
                await asyncio.wait_for(follow, 20)
                return shown

    shown = asyncio.run(main())
    assert shown.exit_code == 0, shown.output
    assert "the run is still going: running so far" in shown.stdout and "record ends" not in shown.stdout


def test_runs_with_nothing_to_list_says_where_it_looked(url: str, prefix: str) -> None:
    """It said "no runs", whatever the server it asked: a user of the local runtime, whose runs are records, was
    told there were none."""
    r = cli("runs", "--redis-url", url, "--prefix", prefix)
    said = " ".join(r.stdout.split())
    assert r.exit_code == 0 and f"no runs in Redis at {url} under the prefix '{prefix}'" in said, said
    assert "runs of the local runtime are records in" in said and "`flowdsl runs --backend local`" in said


def test_runs_of_both_backends_are_json_objects_with_the_same_keys(url: str, prefix: str, tmp_path: Path) -> None:
    """`runs --backend local` gives each run as a Redis run is given, key for key and in the same order."""
    asyncio.run(_submit(url, prefix, "both1"))
    remote = json.loads(cli("runs", "--redis-url", url, "--prefix", prefix, "--format", "json").stdout)
    assert cli("run", str(_spec_file(tmp_path)), "--runs-dir", str(tmp_path / "runs"), "--run-id", "both1",
               "--set", "script={}").exit_code == 0
    local = json.loads(cli("runs", "--backend", "local", "--runs-dir", str(tmp_path / "runs"), "--format",
                           "json").stdout)
    assert [list(item) for item in remote] == [list(item) for item in local] == [
        ["run_id", "flow", "status", "submitted_at", "started_at", "finished_at"]]
    assert remote[0]["run_id"] == local[0]["run_id"] == "both1" and remote[0]["flow"] == local[0]["flow"]
    assert local[0]["status"] == "completed" and isinstance(local[0]["finished_at"], int)


def _spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "saga.yaml"
    path.write_text(SAGA)
    return path


def test_runs_that_match_no_filter_say_the_filter_not_that_redis_holds_none(url: str, prefix: str) -> None:
    """With runs in Redis, a filter matching none of them said "no runs in Redis at ...", as if there were none."""
    asyncio.run(_submit(url, prefix, "s1"))
    r = cli("runs", "--redis-url", url, "--prefix", prefix, "--status", "running", "--flow", "other")
    said = " ".join(r.stdout.split())
    assert r.exit_code == 0 and f"no runs with status 'running' and flow 'other' in Redis at {url}" in said, said


def test_a_worker_whose_modules_register_no_worker_warns(url: str, prefix: str) -> None:
    r = cli("worker", "--redis-url", url, "--prefix", prefix, "-w", "os.path", "--burst")
    assert r.exit_code == 0, r.output
    assert "warning: the module(s) os.path registered no worker" in " ".join(r.stderr.split())


def test_the_status_timeline_of_a_run_cancelled_before_it_started_follows_the_journal(url: str,
                                                                                      prefix: str) -> None:
    """The text timeline lists the events in the order the journal holds them (as the JSON does), not by
    their times: the cancel requested before the start comes before the run's end."""
    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            await client.submit(compile_text(SAGA), {"script": {}}, run_id="early2")
            assert await client.cancel("early2", "too soon") == "requested"
            worker = RedisWorker(url, prefix=prefix, options=WorkerOptions(handle_signals=False, burst=True))
            await asyncio.wait_for(worker.serve(), 30)
            return await client.result("early2")

    _, journal = asyncio.run(main())
    shown = cli("status", "early2", "--redis-url", url, "--prefix", prefix)
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()

    def where(text: str) -> int:
        return next(i for i, line in enumerate(lines) if text in line)

    assert where("run started") < where("cancel requested") < where("run finished: cancelled")
    order = [e["type"] for e in journal.timeline if e["type"] in ("run_started", "cancel_requested", "run_finished")]
    assert order == ["run_started", "cancel_requested", "run_finished"]


def test_the_parser_used_without_hiredis_refuses_what_is_not_redis_at_once() -> None:
    """Without hiredis (the default install), a reply that cannot be Redis is refused from its first byte —
    a web page has no CRLF to wait for."""
    import redis

    from flowdsl.runtime.redis.wire import _PyReader

    reader = _PyReader()
    reader.feed(b"*2\r\n$1\r\na\r\n:7\r\n")
    assert reader.gets() == [b"a", 7] and reader.gets() is False
    reader.feed(b"<!DOCTYPE HTML>\n<html>")
    with pytest.raises(redis.InvalidResponse, match="cannot start with b'<'"):
        reader.gets()


@pytest.mark.parametrize("use_hiredis", [True, False], ids=["hiredis", "python"])
def test_a_server_still_loading_its_data_is_a_transient_error(use_hiredis: bool,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``-LOADING`` (a restarted Redis reading its data back) is redis-py's BusyLoadingError — one of the
    errors every loop retries after a pause — with either reply parser, not a plain ResponseError that
    stops a worker's loop; a server with all its client slots taken is a ConnectionError, as redis-py says;
    NOSCRIPT keeps its class, and other errors stay ResponseError."""
    import redis

    from flowdsl.runtime.redis import wire
    from flowdsl.runtime.redis.connection import TRANSIENT

    if use_hiredis and wire._hiredis is None:
        pytest.skip("hiredis is not installed")
    if not use_hiredis:
        monkeypatch.setattr(wire, "_hiredis", None)
    protocol = wire._Protocol()
    loop = asyncio.new_event_loop()
    try:
        futures = [loop.create_future() for _ in range(4)]
        protocol.waiting.extend((f, True) for f in futures)
        protocol.data_received(b"-LOADING Redis is loading the dataset in memory\r\n-NOSCRIPT No matching script"
                               b"\r\n-ERR wrong number of arguments\r\n-ERR max number of clients reached\r\n")
        loading, noscript, other, crowded = (f.exception() for f in futures)
    finally:
        loop.close()
    assert isinstance(crowded, redis.ConnectionError) and isinstance(crowded, TRANSIENT)
    assert isinstance(loading, redis.BusyLoadingError) and isinstance(loading, TRANSIENT)
    assert "loading the dataset" in str(loading)
    assert isinstance(noscript, redis.exceptions.NoScriptError)
    assert type(other) is redis.ResponseError and not isinstance(other, TRANSIENT)


def test_every_reporting_command_says_its_failure_as_one_json_object(tmp_path: Path) -> None:
    """With --format json, stdout carries exactly one JSON object whatever happens (as for `run`): a command
    that fails before it has one to give says why in `{"status": "error", "error": {"type", "message"}}`."""
    nowhere = f"unix://{tmp_path}/none.sock"
    for args in (["status", "x", "--redis-url", nowhere], ["runs", "--redis-url", nowhere],
                 ["cancel", "x", "--redis-url", nowhere], ["show", "nope", "--runs-dir", str(tmp_path)]):
        r = flowdsl(*args, "--format", "json")
        assert r.returncode == 2, (args, r.stderr)
        out = json.loads(r.stdout)  # one object, nothing else
        assert out["status"] == "error" and out["error"]["type"] == "UsageError", out
        assert out["error"]["message"] and out["error"]["message"] in r.stderr.replace("\n", " "), (out, r.stderr)
