"""``flowdsl signal`` and ``flowdsl status`` of a run that waits, with real ``flowdsl worker`` processes — one of
them SIGKILLed (by its PID) while the run waits: another finishes the run once the signal comes — and a
``flowdsl signal`` process stopped (by its PID) while it waits for the outcome."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

import tests.runtime.workers  # noqa: F401  (registers the conf.* workers this process serves)
from flowdsl import compile_text
from flowdsl.cli import app
from flowdsl.runtime.redis import RedisClient
from flowdsl.runtime.redis.keys import Keys
from tests.redis.inproc import serving, worker_here
from tests.redis.procs import WorkerProcs
from tests.redis.test_cli_errors import spawn, stop, wait_for
from tests.redis.test_cli_signals import _ours, _stopped, _wchan
from tests.redis.test_wait_signals import waits_for, when_waiting


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def _waiting(url: str, prefix: str, run_id: str) -> None:
    async def main() -> None:
        async with RedisClient(url, prefix=prefix) as client:
            await when_waiting(client, run_id)

    asyncio.run(main())


def test_flowdsl_signal_says_what_the_run_made_of_it_and_exits_by_it(url: str, prefix: str, tmp_path: Path) -> None:
    spec = tmp_path / "paid.yaml"
    spec.write_text(waits_for("60s"))
    common = ["--redis-url", url, "--prefix", prefix]
    procs = WorkerProcs(url, prefix, ["tests.runtime.workers"])
    try:
        procs.start(1)
        r = cli("run", str(spec), "--backend", "redis", *common, "--set", 'script={"b": {"sleep": 1.0}}', "--detach",
                "--run-id", "w-1")
        assert r.exit_code == 0, r.output
        _waiting(url, prefix, "w-1")

        shown = cli("status", "w-1", *common)
        assert shown.exit_code == 0 and "wait paid: waiting for signal 'paid'" in shown.stdout, shown.output
        assert "(it times out in" in shown.stdout and "`flowdsl signal w-1 paid --data JSON` sends it" in shown.stdout
        waiting = json.loads(cli("status", "w-1", *common, "--format", "json").stdout)["waiting"]
        assert [(w["step"], w["signal"]) for w in waiting] == [("paid", "paid")] and waiting[0]["due_in_ms"] > 0

        # refused before anything is sent: exit 2, one line, no traceback
        for args, said in [(("w-1", "shipped"), "takes no signal 'shipped': its waits take 'paid'"),
                           (("nope", "paid"), "no run 'nope'"),
                           (("w-1", "paid", "--data", "[1]"), "--data: the signal's data must be a JSON object, "
                                                             "found an array"),
                           (("w-1", "paid", "--data", "{"),
                            "--data: the signal's data is not valid JSON (line 1, column 2"),
                           (("w-1", "paid", "--data", "{}", "--data-file", "x.json"), "do not go together"),
                           (("w-1", "paid", "--data-file", str(tmp_path / "none.json")), "cannot read the file")]:
            refused = cli("signal", *args, *common)
            assert refused.exit_code == 2 and said in refused.stderr, (args, refused.output)
            assert "Traceback" not in refused.output and refused.stdout == ""
        as_json = cli("signal", "nope", "paid", *common, "--format", "json")
        assert as_json.exit_code == 2 and json.loads(as_json.stdout)["status"] == "error"

        data = tmp_path / "payment.json"
        data.write_text('{"amount": 42}')
        got = cli("signal", "w-1", "paid", "--data-file", str(data), *common, "--format", "json")
        assert got.exit_code == 0, got.output
        said = json.loads(got.stdout)
        assert (said["outcome"], said["wait"], said["signal"], said["reason"]) == ("received", "paid", "paid", None)
        assert said["status"] == "running" and said["at"] and said["id"]

        again = cli("signal", "w-1", "paid", "--data", '{"amount": 1}', *common)  # (b still runs)
        assert again.exit_code == 1 and again.stdout == ""
        assert "note: signal 'paid' rejected by run w-1: wait 'paid' has already received signal 'paid'" in \
            " ".join(again.stderr.split())

        done = cli("status", "w-1", *common, "--follow", "--format", "json")
        assert done.exit_code == 0 and json.loads(done.stdout)["context"]["payment"] == {"amount": 42}
        over = cli("signal", "w-1", "paid", *common, "--format", "json")
        assert over.exit_code == 1 and json.loads(over.stdout)["reason"] == \
            "the run has ended (completed): it waits for nothing more"

        # sent, not waited for; then received text
        cli("run", str(spec), "--backend", "redis", *common, "--set", "script={}", "--detach", "--run-id", "w-2")
        _waiting(url, prefix, "w-2")
        sent = cli("signal", "w-2", "paid", "--no-wait", *common)
        assert sent.exit_code == 0 and "signal 'paid' sent to run w-2" in sent.stdout, sent.output
        cli("run", str(spec), "--backend", "redis", *common, "--set", "script={}", "--detach", "--run-id", "w-3")
        _waiting(url, prefix, "w-3")
        text = cli("signal", "w-3", "paid", "--data", '{"amount": 3}', *common)
        assert text.exit_code == 0 and "signal 'paid' received by wait 'paid' of run w-3" in text.stdout, text.output
        for run_id in ("w-2", "w-3"):
            assert cli("status", run_id, *common, "--follow").exit_code == 0
    finally:
        procs.stop_all()


def test_a_worker_killed_while_a_run_waits_leaves_it_to_another_which_finishes_it_after_the_signal(
        url: str, prefix: str, tmp_path: Path) -> None:
    """The only worker process is SIGKILLed while the run waits (nothing in flight: nothing to take over). The
    signal is sent while no process serves (it waits in Redis); a new process applies it and finishes the run."""
    spec = tmp_path / "paid.yaml"
    spec.write_text(waits_for("60s"))
    common = ["--redis-url", url, "--prefix", prefix]
    procs = WorkerProcs(url, prefix, ["tests.runtime.workers"], lease=1.0)
    try:
        first = procs.start(1)[0]
        r = cli("run", str(spec), "--backend", "redis", *common, "--set", "script={}", "--detach", "--run-id", "k-1")
        assert r.exit_code == 0, r.output
        _waiting(url, prefix, "k-1")
        procs.kill(first)
        # waited for up to --timeout: not applied (exit 5); the process listed live (until three leases) is said to
        # be silent, never "busy"
        late = cli("signal", "k-1", "paid", "--data", '{"amount": 5}', "--id", "K1", "--timeout", "4", *common)
        assert late.exit_code == 5 and late.stdout == "", late.output
        said = " ".join(late.stderr.split())
        assert "note: no worker process has been heard from for" in said and "busy" not in said, said
        assert "note: signal 'paid' to run k-1 not applied within 4 s: it was sent, and a worker process applies " \
            "it once it takes it (the same command with `--id K1` asks again" in said, said
        sent = cli("signal", "k-1", "paid", "--data", '{"amount": 5}', "--id", "K1", "--no-wait", *common,
                   "--format", "json")
        assert sent.exit_code == 0 and json.loads(sent.stdout)["outcome"] == "sent", sent.output
        procs.start(1)
        done = cli("status", "k-1", *common, "--follow", "--format", "json")
        assert done.exit_code == 0, done.output
        result = json.loads(done.stdout)
        assert result["status"] == "completed" and result["context"]["payment"] == {"amount": 5}
        assert [e["type"] for e in result["events"] if e["type"].startswith("signal_")] == ["signal_received"]
    finally:
        procs.stop_all()


TWO = """flowdsl: 1
name: two
workers: [tests.runtime.workers]
steps:
  - wait: paid
  - wait: shipped
  - conf.b
"""


def test_flowdsl_signal_refuses_an_id_used_for_another_signal_and_takes_ids_with_quotes_and_backslashes(
        url: str, prefix: str, tmp_path: Path) -> None:
    spec = tmp_path / "two.yaml"
    spec.write_text(TWO)
    common = ["--redis-url", url, "--prefix", prefix]
    procs = WorkerProcs(url, prefix, ["tests.runtime.workers"])
    try:
        procs.start(1)
        assert cli("run", str(spec), "--backend", "redis", *common, "--set", "script={}", "--detach", "--run-id",
                   "r5").exit_code == 0
        _waiting(url, prefix, "r5")
        first = cli("signal", "r5", "paid", "--data", '{"n": 1}', "--id", "ID1", *common)
        assert first.exit_code == 0 and "signal 'paid' received by wait 'paid' of run r5" in first.stdout
        for args, said in [(("paid", "--data", '{"n": 2}'), "signal id 'ID1' was already used for signal 'paid' "
                                                            "with other data (run 'r5'); a new signal needs a new id"),
                           (("shipped",), "signal id 'ID1' was already used for signal 'paid', not 'shipped'")]:
            refused = cli("signal", "r5", *args, "--id", "ID1", *common)
            assert refused.exit_code == 2 and refused.stdout == "", refused.output
            assert said in " ".join(refused.stderr.split()), refused.stderr
        as_json = cli("signal", "r5", "shipped", "--id", "ID1", *common, "--format", "json")
        assert as_json.exit_code == 2 and "already used for signal 'paid'" in \
            json.loads(as_json.stdout)["error"]["message"]
        again = cli("signal", "r5", "paid", "--data", '{"n": 1}', "--id", "ID1", *common, "--format", "json")
        assert again.exit_code == 0 and json.loads(again.stdout)["outcome"] == "received", again.output

        quoted = cli("signal", "r5", "shipped", "--id", 'a"b\\c', *common, "--format", "json")
        assert quoted.exit_code == 0, quoted.output
        assert (json.loads(quoted.stdout)["outcome"], json.loads(quoted.stdout)["id"]) == ("received", 'a"b\\c')
        assert cli("status", "r5", *common, "--follow").exit_code == 0
        over = cli("signal", "r5", "shipped", "--id", 'a"b\\c', *common, "--format", "json")  # (applied: its outcome)
        assert over.exit_code == 0 and json.loads(over.stdout)["outcome"] == "received", over.output
    finally:
        procs.stop_all()


def test_flowdsl_signal_waits_up_to_its_timeout_then_says_the_signal_stays_sent(url: str, prefix: str) -> None:
    """No worker process: the signal is sent and not applied; --timeout ends the waiting (exit 5, the outcome
    ``sent`` with the reason), saying why first; the same command with the same id, once a worker serves, gets it
    applied once."""
    plan = compile_text(waits_for(first=True))

    async def submit() -> None:
        async with RedisClient(url, prefix=prefix) as client:
            await client.submit(plan, {"script": {}}, run_id="t-1")

    asyncio.run(submit())
    common = ["--redis-url", url, "--prefix", prefix]
    both = cli("signal", "t-1", "paid", "--timeout", "1", "--no-wait", *common)
    assert both.exit_code == 2 and "--timeout and --no-wait do not go together" in both.stderr
    assert cli("signal", "t-1", "paid", "--timeout", "0", *common).exit_code == 2
    late = cli("signal", "t-1", "paid", "--data", '{"n": 1}', "--id", "T1", "--timeout", "0.5", *common,
               "--format", "json")
    assert late.exit_code == 5, late.output
    said = json.loads(late.stdout)
    assert (said["outcome"], said["id"], said["wait"], said["at"], said["status"]) == ("sent", "T1", "paid", None,
                                                                                       "submitted")
    assert said["reason"].startswith("not applied within 0.5 s: it was sent")
    text = cli("signal", "t-1", "paid", "--data", '{"n": 1}', "--id", "T1", "--timeout", "3.5", *common)
    assert text.exit_code == 5 and "note: the signal waits in Redis: no worker process is live under this prefix" \
        in " ".join(text.stderr.split()), text.output

    async def served() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            return await serving([worker_here(url, prefix)], lambda: client.follow("t-1"))

    result = asyncio.run(served())
    assert result.status == "completed" and result.context["payment"] == {"n": 1}
    assert [e["type"] for e in result.events if e["type"].startswith("signal_")] == ["signal_received"]
    done = cli("signal", "t-1", "paid", "--data", '{"n": 1}', "--id", "T1", *common, "--format", "json")
    assert done.exit_code == 0 and json.loads(done.stdout)["outcome"] == "received"


def test_flowdsl_status_says_an_overdue_wait_and_signals_set_aside_as_they_are(url: str, prefix: str) -> None:
    """A wait whose deadline passed while no worker process is live is overdue (nothing fires it until one runs),
    not "times out in 0.0 s"; a signal message set aside as a dead letter is one the run did not get, not one it
    waits for."""
    plan = compile_text(waits_for("2s"))

    async def main() -> None:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(plan, {"script": {}}, run_id="o-1")

            async def body() -> None:
                await when_waiting(client, sub.run_id)
                bad = {"type": "signal", "run_id": "o-1", "name": "paid", "payload": [1], "id": "x"}
                await client.store.call("XADD", client.keys.signals, "*", "c", json.dumps(bad))
                for _ in range(100):
                    if await client.dead_letters():
                        return
                    await asyncio.sleep(0.05)

            await serving([worker_here(url, prefix)], body)  # (stopped gracefully: no longer listed)
            await asyncio.sleep(2.2)

    asyncio.run(main())
    common = ["--redis-url", url, "--prefix", prefix]
    shown = cli("status", "o-1", *common)
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.stdout.split())
    assert "waiting for signal 'paid'" in text and "its deadline passed" in text, text
    assert "overdue — no worker process is live to fire it: it fires as soon as one runs" in text, text
    assert "times out in" not in text
    notes = " ".join(shown.stderr.split())
    assert "1 signal message(s) sent to this run could not be handled and were set aside as dead letters" in notes
    assert "the run did not get it and does not wait for it" in notes and "the run waits for" not in notes, notes
    waiting = json.loads(cli("status", "o-1", *common, "--format", "json").stdout)["waiting"]
    assert waiting[0]["due_in_ms"] < 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_flowdsl_signal_stopped_while_it_waits_ends_as_cancel_wait_does_and_the_signal_still_applies(
        url: str, prefix: str, sig: signal.Signals) -> None:
    """No worker process: the signal is sent and waits in Redis, and so does `flowdsl signal`; a stop signal ends
    the waiting (exit 130, the one JSON object, the hint), not the signal — a worker that comes applies it."""
    plan = compile_text(waits_for(first=True))
    run_id = f"stop-{sig.name.lower()}"

    async def submit() -> None:
        async with RedisClient(url, prefix=prefix) as client:
            await client.submit(plan, {"script": {}}, run_id=run_id)

    asyncio.run(submit())
    proc = spawn("signal", run_id, "paid", "--data", '{"n": 1}', "--redis-url", url, "--prefix", prefix,
                 "--format", "json")
    with _ours(proc):
        admin = redis.Redis.from_url(url)
        try:
            wait_for(lambda: admin.xlen(Keys(prefix).signals) == 1)
        finally:
            admin.close()
        wait_for(lambda: "epoll" in _wchan(proc.pid))  # (waiting for the run to apply it)
        out, err = stop(proc, sig)
    payload = _stopped(proc, out, err, run_id)
    assert payload["error"]["message"].startswith("stopped waiting; the signal was sent"), payload

    async def served() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            return await serving([worker_here(url, prefix)], lambda: client.follow(run_id))

    result = asyncio.run(served())
    assert result.status == "completed" and result.context["payment"] == {"n": 1}
