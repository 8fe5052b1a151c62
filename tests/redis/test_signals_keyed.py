"""Keyed waits on the Redis runtime: a signal wait in a for_each body with ``key:``, each instance taking the signal
sent with its own key (``flowdsl signal RUN NAME --key KEY``, ``RedisClient.signal(..., key=...)``).

The client checks the key before anything is sent (one for a keyed wait's signal, none for another: exit 2 in the
CLI); a signal sent raw, past those checks, is answered by the kernel. The stream message and the signal's id record
(``sigd:<id>``) carry the key; the outcome is the kernel's answer of the signal's name and key; ``flowdsl status``
says which key each instance waits for, ``flowdsl runs`` only which signals (its summary is bounded by the plan)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

import tests.runtime.workers  # noqa: F401  (registers the conf.* workers this process serves)
from flowdsl import compile_text
from flowdsl.cli import app
from flowdsl.runtime.codec import dumps
from flowdsl.runtime.redis import RedisClient, SignalIdReused
from flowdsl.runtime.redis.client_signals import signal_digest
from flowdsl.runtime.redis.control import signal_problem
from flowdsl.runtime.redis.waiting import Waiting, say_waiting
from tests.redis.inproc import serving, until_event, worker_here
from tests.redis.procs import WorkerProcs
from tests.redis.test_wait_signals import journal_of, replays, signals_in

#: ``a`` (undone by ``undo.a``), then a wait per parcel for ``delivered`` keyed by its tracking number, then a wait
#: for ``invoiced`` (no key), then ``c``
SPEC = """flowdsl: 1
name: parcels
workers: [tests.runtime.workers]
steps:
  - conf.a: {compensate: undo.a}
  - for_each: parcels
    items: "${ order.parcels }"
    as: parcel
    steps:
      - wait: delivered
        key: "${ $parcel.tracking }"
        timeout: 1h
        output: delivery
  - wait: invoiced
  - conf.c
"""
#: three parcels, the first one's tracking number an integer (its key is its decimal text)
ORDER = {"parcels": [{"tracking": 1001}, {"tracking": "T2"}, {"tracking": "T3"}]}

NEEDS_KEY = "wait 'delivered' tells its instances apart by key: signal 'delivered' needs a key"
NO_KEY = "wait 'invoiced' takes signal 'invoiced' without a key"


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def flat(text: str) -> str:
    return " ".join(text.split())


def _until(url: str, prefix: str, run_id: str, type_: str, step: str) -> None:
    async def main() -> None:
        async with RedisClient(url, prefix=prefix) as client:
            await until_event(client, run_id, type_, step)

    asyncio.run(main())


def test_each_parcel_takes_the_signal_of_its_own_key_sent_out_of_order_by_the_cli_and_the_client(
        url: str, prefix: str, tmp_path: Path) -> None:
    """T3 is sent while ``a`` runs (kept: no instance has taken its key), T2 by the CLI before 1001 (an integer, by
    the client): each instance takes its own, parcels[2] at once as it starts. A missing key, a key for the unkeyed
    wait, an empty or too long key are refused before anything is sent (exit 2); an id used for T2 is refused with
    key 1001, and answers T2's outcome when sent again as it was. ``status`` says which key each instance waits for
    (and how to send it), ``runs`` only that the run waits for ``delivered``."""
    common = ["--redis-url", url, "--prefix", prefix]
    plan = compile_text(SPEC)

    async def submit() -> None:
        async with RedisClient(url, prefix=prefix) as client:
            await client.submit(plan, {"script": {"a": {"sleep": 1.5}}, "order": ORDER}, run_id="p-1")

    procs = WorkerProcs(url, prefix, ["tests.runtime.workers"])
    try:
        procs.start(1)
        asyncio.run(submit())
        _until(url, prefix, "p-1", "step_started", "a")
        kept = cli("signal", "p-1", "delivered", "--key", "T3", "--data", '{"n": 3}', *common)
        assert kept.exit_code == 0, kept.output
        assert "signal 'delivered' key 'T3' kept by run p-1: no instance of its wait 'delivered' has started with " \
            "that key yet, and the one that does takes it" in flat(kept.stdout)
        _until(url, prefix, "p-1", "signal_received", "parcels[2]/delivered")  # (as it started: the kept one)
        _until(url, prefix, "p-1", "step_started", "parcels[1]/delivered")
        _until(url, prefix, "p-1", "step_started", "parcels[0]/delivered")

        shown = cli("status", "p-1", *common)
        assert shown.exit_code == 0, shown.output
        text = flat(shown.stdout)
        for step, key in (("parcels[0]/delivered", "1001"), ("parcels[1]/delivered", "T2")):
            assert f"wait {step}: waiting for signal 'delivered' key '{key}' for" in text, text
            assert f"`flowdsl signal p-1 delivered --key {key} --data JSON` sends it" in text, text
        assert "wait parcels[2]/delivered: waiting" not in text
        waiting = json.loads(cli("status", "p-1", *common, "--format", "json").stdout)["waiting"]
        assert [(w["step"], w["signal"], w["key"]) for w in waiting] == [
            ("parcels[0]/delivered", "delivered", "1001"), ("parcels[1]/delivered", "delivered", "T2")]
        rows = json.loads(cli("runs", *common, "--format", "json").stdout)
        assert [row["waits"]["signals"] for row in rows if row["run_id"] == "p-1"] == [["delivered"]]

        # refused before anything is sent: exit 2, one line, no traceback
        for args, said in [(("delivered",), NEEDS_KEY),
                           (("invoiced", "--key", "X"), NO_KEY),
                           (("delivered", "--key", ""), "the key of signal 'delivered' is empty"),
                           (("delivered", "--key", "x" * 201), "the key of signal 'delivered' has 201 characters: "
                                                               "a key has at most 200")]:
            refused = cli("signal", "p-1", *args, *common)
            assert refused.exit_code == 2 and said in flat(refused.stderr), (args, refused.output)
            assert "Traceback" not in refused.output and refused.stdout == ""
        as_json = cli("signal", "p-1", "delivered", *common, "--format", "json")
        assert as_json.exit_code == 2 and NEEDS_KEY in json.loads(as_json.stdout)["error"]["message"]

        got = cli("signal", "p-1", "delivered", "--key", "T2", "--id", "D2", "--data", '{"n": 2}', *common,
                  "--format", "json")
        assert got.exit_code == 0, got.output
        said = json.loads(got.stdout)
        assert (said["outcome"], said["wait"], said["signal"], said["key"], said["id"]) == (
            "received", "parcels[1]/delivered", "delivered", "T2", "D2")
        rows = json.loads(cli("runs", *common, "--format", "json").stdout)  # (one instance of two left waiting)
        assert [row["waits"]["signals"] for row in rows if row["run_id"] == "p-1"] == [["delivered"]]
        reused = cli("signal", "p-1", "delivered", "--key", "1001", "--id", "D2", "--data", '{"n": 2}', *common)
        assert reused.exit_code == 2 and reused.stdout == "", reused.output
        assert "signal id 'D2' was already used for signal 'delivered' key 'T2', not key '1001' (run 'p-1'); a new " \
            "signal needs a new id: nothing was sent" in flat(reused.stderr)
        again = cli("signal", "p-1", "delivered", "--key", "T2", "--id", "D2", "--data", '{"n": 2}', *common)
        assert again.exit_code == 0, again.output
        assert "signal 'delivered' key 'T2' received by wait 'parcels[1]/delivered' of run p-1" in flat(again.stdout)

        async def by_client() -> Any:
            async with RedisClient(url, prefix=prefix) as client:
                return await client.signal("p-1", "delivered", {"n": 1}, key=1001)

        first = asyncio.run(by_client())
        assert (first.outcome, first.wait, first.key) == ("received", "parcels[0]/delivered", "1001")
        late = cli("signal", "p-1", "delivered", "--key", "T3", "--data", '{"n": 4}', *common)
        assert late.exit_code == 1 and late.stdout == "", late.output
        assert "note: signal 'delivered' key 'T3' rejected by run p-1: wait 'parcels[2]/delivered' has already " \
            "received signal 'delivered'" in flat(late.stderr)
        assert cli("signal", "p-1", "invoiced", *common).exit_code == 0
        done = cli("status", "p-1", *common, "--follow", "--format", "json")
        assert done.exit_code == 0, done.output
        result = json.loads(done.stdout)
        assert result["status"] == "completed"
        assert result["context"]["parcels"] == [{"delivery": {"n": 1}}, {"delivery": {"n": 2}}, {"delivery": {"n": 3}}]
    finally:
        procs.stop_all()

    async def journal() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            return await journal_of(client, "p-1")

    entries = asyncio.run(journal())
    assert [(s["name"], s.get("key")) for s in signals_in(entries)] == [
        ("delivered", "T3"), ("delivered", "T2"), ("delivered", "1001"), ("delivered", "T3"), ("invoiced", None)]
    assert "key" not in signals_in(entries)[-1]  # (an unkeyed signal's input event is as before keys)
    replays(plan, entries)


def test_the_client_checks_the_key_and_the_kernel_answers_signals_sent_raw(url: str, prefix: str) -> None:
    """``RedisClient.signal`` refuses a missing key, a key for the unkeyed wait and a key of another type before
    anything is sent; an id is one signal's, its key included (``1001`` and ``"1001"`` are one key). Messages put
    on the signals stream by hand, past those checks, are answered by the kernel — rejected, saying why, the
    outcome matched by name and key —, and one whose key is not a string is set aside as a dead letter."""
    plan = compile_text(SPEC)

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(plan, {"script": {}, "order": ORDER})
            run_id = sub.run_id

            async def body() -> Any:
                await until_event(client, run_id, "step_started", "parcels[2]/delivered")
                with pytest.raises(ValueError, match=NEEDS_KEY):
                    await client.signal(run_id, "delivered")
                with pytest.raises(ValueError, match=NO_KEY):
                    await client.signal(run_id, "invoiced", key="X")
                with pytest.raises(TypeError, match="must be a string"):
                    await client.signal(run_id, "delivered", key=True)  # type: ignore[arg-type]
                with pytest.raises(ValueError, match="is not valid UTF-8"):
                    await client.signal(run_id, "delivered", key="T\udcff")
                sent = await client.signal(run_id, "delivered", {"n": 2}, key="T2", signal_id="C1", wait=False)
                with pytest.raises(SignalIdReused) as reused:
                    await client.signal(run_id, "delivered", {"n": 2}, key="T3", signal_id="C1")
                same = await client.signal(run_id, "delivered", {"n": 1}, key=1001, signal_id="C2")
                as_text = await client.signal(run_id, "delivered", {"n": 1}, key="1001", signal_id="C2")
                born = (await client.store.call("HGET", client.keys.run(run_id), "born")).decode()
                for raw in ({"name": "delivered", "id": "R1"}, {"name": "invoiced", "key": "X", "id": "R2"},
                            {"name": "delivered", "key": 5, "id": "R3"}):
                    message = {"type": "signal", "run_id": run_id, "payload": {}, "g": born, **raw}
                    await client.store.call("XADD", client.keys.signals, "*", "c", dumps(message))
                answers = [await client.signal_outcome(run_id, sid, timeout_s=10) for sid in ("R1", "R2")]
                for _ in range(200):
                    if await client.dead_letters():
                        break
                    await asyncio.sleep(0.05)
                await client.signal(run_id, "delivered", {"n": 3}, key="T3")
                await client.signal(run_id, "invoiced")
                return (await client.signal_outcome(run_id, sent.id), reused.value, same, as_text, answers,
                        await client.dead_letters(), await client.follow(run_id))

            got = await serving([worker_here(url, prefix)], body)
            return (*got, await journal_of(client, run_id))

    sent, reused, same, as_text, answers, letters, result, journal = asyncio.run(main())
    assert (sent.outcome, sent.wait, sent.key) == ("received", "parcels[1]/delivered", "T2")
    assert (reused.first, reused.first_key, reused.name, reused.key) == ("delivered", "T2", "delivered", "T3")
    assert "was already used for signal 'delivered' key 'T2', not key 'T3'" in str(reused)
    assert (same.outcome, same.key, same.at) == ("received", "1001", as_text.at)  # (answered, not sent again)
    assert [(a.outcome, a.reason, a.key, a.wait) for a in answers] == [
        ("rejected", NEEDS_KEY, None, "delivered"), ("rejected", NO_KEY, "X", "invoiced")]
    assert [letter.message and letter.message["id"] for letter in letters] == ["R3"]
    assert "its signal's 'key' is not a non-empty string of at most 200 characters" in letters[0].reason
    assert result.status == "completed"
    assert result.context["parcels"] == [{"delivery": {"n": 1}}, {"delivery": {"n": 2}}, {"delivery": {"n": 3}}]
    assert sorted((s["name"], s.get("key") or "") for s in signals_in(journal)) == [  # (each once; R3 never applied)
        ("delivered", ""), ("delivered", "1001"), ("delivered", "T2"), ("delivered", "T3"), ("invoiced", ""),
        ("invoiced", "X")]
    replays(plan, journal)


def test_an_unkeyed_signals_id_record_is_as_before_keys_and_a_message_key_is_checked() -> None:
    """A signal without a key has the digest it had before keys (a run's ``sigd:<id>`` recorded then still matches
    the same signal sent again); a key changes it, ``1001`` as text. A message's key is absent, null or a non-empty
    string of at most 200 characters."""
    before = hashlib.sha256(b'["paid",{"amount":42}]').hexdigest()[:32]
    assert signal_digest("paid", {"amount": 42}) == before
    assert signal_digest("paid", {"amount": 42}, "K") != before
    assert signal_digest("paid", None, "1001") == signal_digest("paid", {}, "1001")
    base = {"type": "signal", "run_id": "r", "name": "delivered", "payload": {}, "id": "i"}
    for key in (None, "T2", "k" * 200):
        assert signal_problem({**base, "key": key}) is None
    assert signal_problem(base) is None
    for key in ("", 5, ["T2"], "k" * 201):
        assert signal_problem({**base, "key": key}) == \
            "its signal's 'key' is not a non-empty string of at most 200 characters (nor null)"


def test_status_quotes_a_key_for_the_shell_and_leaves_one_it_cannot_show_to_python() -> None:
    """The command ``status`` shows for a keyed wait quotes its key when a shell needs it; a key holding a control
    character is sent from Python (the command line cannot show it safely)."""
    console = Console(record=True, width=400, color_system=None)
    say_waiting(console, "r-1", [Waiting("parcels[0]/delivered", "delivered", 1000, None, "a b"),
                                 Waiting("parcels[1]/delivered", "delivered", 1000, None, "x\x1by")])
    text = console.export_text()
    assert "wait parcels[0]/delivered: waiting for signal 'delivered' key 'a b' for 1.0 s — `flowdsl signal r-1 " \
        "delivered --key 'a b' --data JSON` sends it" in text, text
    assert "waiting for signal 'delivered' key 'x\\u001by' for 1.0 s — its key holds a character no command line " \
        "shows safely: `RedisClient.signal('r-1', 'delivered', key=...)` sends it" in text, text
