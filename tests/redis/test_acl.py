"""ACL users (docs/runtime.md, "ACL users"): a worker whose ACL user lacks a permission it needs stops at startup
with one line naming what Redis refused and what the user needs (exit 2), before it reads anything; one that Redis
refuses later (an ACL changed while it serves) stops the same way and leaves the entry pending, never a dead
letter; and the permissions the docs list are enough for the worker, the client and the CLI.

Each test makes its own ACL users on the session's server (``ACL SETUSER … reset``, so nothing comes from the
server's defaults) and removes them at its end."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

import tests.runtime.workers  # noqa: F401  (registers the conf.* workers this process serves)
from flowdsl import compile_text
from flowdsl.cli import app
from flowdsl.runtime.redis import RedisClient
from flowdsl.runtime.redis.connection import RedisConfigError
from flowdsl.runtime.redis.keys import ACL_COMMANDS, GROUP, Keys
from tests.redis.inproc import worker_here
from tests.redis.procs import ROOT, worker_env
from tests.redis.server import RedisServer
from tests.runtime.conformance import HEADER

SAGA = HEADER.format(name="saga") + ("steps:\n  - conf.a: {compensate: undo.a}\n"
                                     "  - b: {worker: conf.b, retry: {attempts: 2, initial: 10ms}}\n")

MakeUser = Callable[..., str]


@pytest.fixture
def acl(server: RedisServer, prefix: str) -> Iterator[MakeUser]:
    """``acl(*rules)``: a URL that logs in as a new ACL user of this test with exactly those rules."""
    admin = server.client()
    made: list[str] = []

    def make(*rules: str) -> str:
        name = f"{prefix}-user{len(made)}"
        admin.execute_command("ACL", "SETUSER", name, "reset", "on", ">pw", *rules)
        made.append(name)
        return f"unix://{name}:pw@{server.socket}?db=0"

    yield make
    if made:
        admin.execute_command("ACL", "DELUSER", *made)
    admin.close()


def documented(prefix: str) -> list[str]:
    """The rules docs/runtime.md gives an ACL user of ``prefix``: its keys and channel, and the commands."""
    return [*Keys(prefix).acl_keys().split(), *ACL_COMMANDS.split()]


def without(rules: list[str], *left_out: str) -> list[str]:
    return [rule for rule in rules if rule not in left_out]


def refused(url: str, prefix: str, **options: Any) -> str:
    """What the worker's startup says when Redis refuses its ACL user (it must: a RedisConfigError)."""
    async def main() -> None:
        await asyncio.wait_for(worker_here(url, prefix, **options).serve(), 20)

    with pytest.raises(RedisConfigError) as caught:
        asyncio.run(main())
    return str(caught.value)


def needs(prefix: str) -> str:
    return (f"a worker's ACL user needs the keys ~{prefix}:run:* and ~{{{prefix}}}:*, the channel &{prefix}:cancel "
            'and the commands listed in docs/runtime.md, "ACL users"')


# --- refused at startup -------------------------------------------------------------------------------------


def test_a_worker_whose_user_has_no_channel_is_refused_at_startup(acl: MakeUser, prefix: str) -> None:
    """Redis 7 gives a new user no pub/sub channel: such a worker stops at once (it would fail in its cancels loop,
    exit 1, and be restarted in a loop by its supervisor)."""
    url = acl(*without(documented(prefix), f"&{prefix}:cancel"))
    said = refused(url, prefix)
    assert f"refused the worker's ACL user '{prefix}-user0' while subscribing to the channel '{prefix}:cancel' " \
           "(SUBSCRIBE): this user has no permissions to access one of the channels used as arguments; " in said
    assert said.endswith(needs(prefix)) and ":pw@" not in said


def test_a_worker_whose_user_may_not_persist_is_refused_at_startup(acl: MakeUser, prefix: str) -> None:
    """A transition that ends a run needs_intervention takes any expiry off its keys (PERSIST): an ACL user set up
    before that command was needed is refused at startup, not at the first such run."""
    said = refused(acl(*without(documented(prefix), "+persist")), prefix)
    assert "while running a script (EVALSHA) on the keys of a run" in said, said
    assert "may not run the PERSIST command" in said, said
    assert said.endswith(needs(prefix))


def test_flowdsl_worker_whose_user_has_no_channel_exits_2_with_one_line(acl: MakeUser, prefix: str) -> None:
    url = acl(*without(documented(prefix), f"&{prefix}:cancel"))
    r = subprocess.run([sys.executable, "-m", "flowdsl", "worker", "--redis-url", url, "--prefix", prefix, "-w",
                        "tests.runtime.workers"], cwd=ROOT, env=worker_env(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert f"while subscribing to the channel '{prefix}:cancel'" in errors[0] and f"&{prefix}:cancel" in errors[0]


def test_a_user_that_may_not_name_its_connections_serves_and_submits_unnamed(acl: MakeUser, prefix: str) -> None:
    """CLIENT SETNAME only labels connections: an ACL user without ``+client|setname`` (or a server with CLIENT
    renamed away) still serves, submits and follows, its connections unnamed (docs/runtime.md, "ACL users"). (The
    worker's and the client's lean connections need the change of wire.py in /tmp/redisfix/pending-wire.py.diff.)"""
    url = acl(*without(documented(prefix), "+client|setname"))

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(compile_text(SAGA), {})
            worker = worker_here(url, prefix)
            serving = asyncio.create_task(worker.serve())
            try:
                return await asyncio.wait_for(client.follow(sub.run_id), 20)
            finally:
                worker.stop()
                await asyncio.wait_for(serving, 20)

    assert asyncio.run(main()).status == "completed"
    r = CliRunner().invoke(app, ["runs", "--redis-url", url, "--prefix", prefix])
    assert r.exit_code == 0, r.output


def test_a_worker_whose_user_may_not_run_scripts_is_refused_at_startup(acl: MakeUser, prefix: str) -> None:
    said = refused(acl(*without(documented(prefix), "+evalsha")), prefix)
    assert f"while running a script (EVALSHA) on the keys of a run ('{prefix}:run:{{-acl-probe}}', …): this user " \
           "has no permissions to run the 'evalsha' command; " in said


def test_a_worker_whose_user_has_no_run_keys_is_refused_at_startup_and_makes_no_dead_letter(
        acl: MakeUser, prefix: str, url: str, server: RedisServer) -> None:
    """Only the shared keys (``~{P}:*``): before, every start request failed three times and was set aside."""
    keys = Keys(prefix)

    async def submit() -> str:
        async with RedisClient(url, prefix=prefix) as client:
            return (await client.submit(compile_text(SAGA), {"script": {}})).run_id

    run_id = asyncio.run(submit())
    said = refused(acl(*without(documented(prefix), f"~{prefix}:run:*")), prefix, max_failures=1)
    assert f"while running a script (EVALSHA) on the keys of a run ('{prefix}:run:{{-acl-probe}}', …): this user " \
           "has no permissions to access one of the keys used as arguments; " in said
    admin = server.client()
    try:
        assert admin.xlen(keys.control) == 1 and admin.xlen(keys.dead) == 0  # the start request was left alone
        assert admin.hget(keys.run(run_id), "status") in (None, b"submitted")
    finally:
        admin.close()


def test_a_worker_whose_user_lacks_a_shared_key_is_refused_at_startup(acl: MakeUser, prefix: str) -> None:
    rules = [*without(documented(prefix), f"~{{{prefix}}}:*"), f"~{{{prefix}}}:control", f"~{{{prefix}}}:task:*"]
    said = refused(acl(*rules), prefix)
    assert f"while running a script (EVALSHA) on the shared keys ('{{{prefix}}}:control', …)" in said


# --- refused while serving ----------------------------------------------------------------------------------


def _serve_until_refused(url: str, prefix: str, admin: redis.Redis, meanwhile: Callable[[], Any]) -> tuple[str, Any]:
    """Serve (in this process) with ``url``; once the worker serves, call ``meanwhile()``; the worker must then
    stop by itself with a RedisConfigError: its message, and the worker."""
    worker = worker_here(url, prefix, max_failures=1, lease_s=0.5)

    async def main() -> None:
        serving = asyncio.create_task(worker.serve())
        try:
            while not await asyncio.to_thread(admin.hexists, Keys(prefix).workers, worker.name):  # (set up)
                await asyncio.sleep(0.02)
            await asyncio.to_thread(meanwhile)
            await asyncio.wait_for(asyncio.shield(serving), 20)
        finally:
            worker.stop()
            await asyncio.gather(serving, return_exceptions=True)

    with pytest.raises(RedisConfigError) as caught:
        asyncio.run(main())
    return str(caught.value), worker


def test_an_acl_changed_while_serving_stops_the_worker_and_leaves_the_entry_pending(
        acl: MakeUser, prefix: str, url: str, server: RedisServer) -> None:
    """The run keys taken away while the worker serves: the start request it reads next is refused (NOPERM). Not
    the message's fault: it stays pending for a worker that may (before, with --max-failures 1, it was set aside
    at once as a dead letter, and the worker went on doing so with every run)."""
    user_url = acl(*documented(prefix))
    user = user_url.split("//", 1)[1].split(":", 1)[0]
    keys = Keys(prefix)
    admin = server.client()

    def take_the_run_keys_away_and_submit() -> None:
        admin.execute_command("ACL", "SETUSER", user, "resetkeys", f"~{{{prefix}}}:*")

        async def submit() -> None:
            async with RedisClient(url, prefix=prefix) as client:
                await client.submit(compile_text(SAGA), {"script": {}})

        asyncio.run(submit())

    try:
        said, worker = _serve_until_refused(user_url, prefix, admin, take_the_run_keys_away_and_submit)
        assert f"refused the worker's ACL user '{user}' while handling entry " in said
        assert f" of '{{{prefix}}}:control' (left pending): " in said and said.endswith(needs(prefix))
        assert admin.xlen(keys.dead) == 0 and worker.stats.dead_letters == 0
        assert admin.xpending(keys.control, GROUP)["pending"] == 1
    finally:
        admin.close()


def test_scripting_taken_away_while_serving_stops_the_worker_with_a_configuration_error(
        acl: MakeUser, prefix: str, server: RedisServer) -> None:
    """A loop refused (the timers loop's script): before, the loop failed with a traceback and the worker exited 1,
    which a supervisor restarts."""
    user_url = acl(*documented(prefix))
    user = user_url.split("//", 1)[1].split(":", 1)[0]
    admin = server.client()
    try:
        said, worker = _serve_until_refused(user_url, prefix, admin,
                                            lambda: admin.execute_command("ACL", "SETUSER", user, "-evalsha"))
        assert "no permissions to run the 'evalsha' command" in said and said.endswith(needs(prefix))
        assert worker.stats.failure is None
    finally:
        admin.close()


def test_a_command_refused_inside_a_script_that_takes_errors_as_answers_stops_the_worker(
        acl: MakeUser, prefix: str, server: RedisServer) -> None:
    """The scripts that set an entry aside (DEAD_LETTER) and acknowledge one (RELAY) ask XPENDING with
    ``redis.pcall``: a refusal there was taken for "not pending with this process", so an unreadable entry was
    silently never set aside (nor logged), and acknowledgements skipped their check."""
    user_url = acl(*without(documented(prefix), "+xpending"))
    admin = server.client()
    try:
        said, worker = _serve_until_refused(user_url, prefix, admin,
                                            lambda: admin.xadd(Keys(prefix).control, {"junk": "1"}))
        assert "while handling entry " in said and "The user executing the script can't run this command" in said
        assert admin.xlen(Keys(prefix).dead) == 0 and worker.stats.dead_letters == 0
    finally:
        admin.close()


# --- what the docs list is enough ---------------------------------------------------------------------------


def test_the_documented_permissions_are_enough_for_the_worker_the_client_and_the_cli(
        acl: MakeUser, prefix: str, server: RedisServer) -> None:
    """A user with exactly the rules docs/runtime.md lists: runs with a retry (a timer), a compensation and a
    cancel (published to the workers), a message set aside, put back and deleted, the tidier forgetting a silent
    consumer, and the CLI's status, runs and dead-letters."""
    docs = {word.strip("'") for word in (ROOT / "docs" / "runtime.md").read_text().split()}
    assert set(documented("flowdsl")) <= docs
    user_url = acl(*documented(prefix))
    keys = Keys(prefix)
    admin = server.client()
    spec = compile_text(SAGA)

    async def main() -> Any:
        async with RedisClient(user_url, prefix=prefix) as client:
            worker = worker_here(user_url, prefix, lease_s=0.2, tidy_s=0.2, forget_s=0.0)
            serving = asyncio.create_task(worker.serve())
            try:
                failed = await client.submit(spec, {"script": {"b": {"raise": "Boom"}}})
                first = await asyncio.wait_for(client.follow(failed.run_id), 20)
                started = asyncio.Event()
                hanging = await client.submit(spec, {"script": {"a": {"hang": True}}})
                follow = asyncio.create_task(client.follow(hanging.run_id, on_event=lambda e: started.set()
                                                           if e["type"] == "step_started" else None))
                await asyncio.wait_for(started.wait(), 20)
                assert await client.cancel(hanging.run_id, "stop") == "requested"
                second = await asyncio.wait_for(follow, 20)
                await asyncio.to_thread(admin.xadd, keys.control, {"junk": "1"})
                letters = []
                while not letters:
                    letters = await client.dead_letters()
                    await asyncio.sleep(0.05)
                await client.requeue_dead_letter(letters[0].id)
                while len(letters := await client.dead_letters()) != 1 or letters[0].deliveries == 0:
                    await asyncio.sleep(0.05)
                await client.delete_dead_letter(letters[0].id)
                await asyncio.to_thread(admin.execute_command, "XGROUP", "CREATECONSUMER", keys.control, GROUP,
                                        "ghost")
                while any(c["name"] == b"ghost" for c in await asyncio.to_thread(admin.xinfo_consumers,
                                                                                  keys.control, GROUP)):
                    await asyncio.sleep(0.1)
                return first, second, failed.run_id, worker.stats
            finally:
                worker.stop()
                await asyncio.wait_for(serving, 20)

    try:
        first, second, run_id, stats = asyncio.run(asyncio.wait_for(main(), 60))
        user = user_url.split("//", 1)[1].split(":", 1)[0]
        # nothing refused, not even inside a script that takes an error reply as an answer (redis.pcall)
        assert [e for e in admin.acl_log() if e.get("username") == user] == []
    finally:
        admin.close()
    assert (first.status, first.compensated, first.steps["b"]["attempts"]) == ("compensated", ["a"], 2)
    assert second.status == "cancelled" and stats.failure is None and stats.dead_letters == 2
    for args in (["status", run_id], ["runs"], ["dead-letters"]):
        r = CliRunner().invoke(app, [*args, "--redis-url", user_url, "--prefix", prefix])
        assert r.exit_code == 0, (args, r.output)


def test_the_documented_permissions_are_enough_for_signals(acl: MakeUser, prefix: str, server: RedisServer) -> None:
    """Signals under an ACL user with exactly the documented rules: the id recorded before sending (a script), an
    id used for another signal refused, why a signal is not applied yet (the pending entries, the liveness
    records), the worker applying it, the outcome followed."""
    user_url = acl(*documented(prefix))
    admin = server.client()
    plan = compile_text(HEADER.format(name="paid") + "steps:\n  - wait: paid\n    output: payment\n  - conf.b\n")

    async def main() -> Any:
        async with RedisClient(user_url, prefix=prefix) as client:
            await client.submit(plan, {"script": {}}, run_id="s-1")
            sent = await client.signal("s-1", "paid", {"n": 1}, signal_id="A1", wait=False)
            why = await client._why_not_applied("s-1", sent.id)
            with pytest.raises(ValueError, match="already used for signal 'paid' with other data"):
                await client.signal("s-1", "paid", {"n": 2}, signal_id="A1")
            worker = worker_here(user_url, prefix)
            serving = asyncio.create_task(worker.serve())
            try:
                outcome = await asyncio.wait_for(client.signal_outcome("s-1", "A1"), 20)
                return why, outcome, await asyncio.wait_for(client.follow("s-1"), 20)
            finally:
                worker.stop()
                await asyncio.wait_for(serving, 20)

    try:
        why, outcome, result = asyncio.run(asyncio.wait_for(main(), 60))
        user = user_url.split("//", 1)[1].split(":", 1)[0]
        assert [e for e in admin.acl_log() if e.get("username") == user] == []
    finally:
        admin.close()
    assert why is not None and why[0] == "none"
    assert outcome.outcome == "received" and result.status == "completed" and result.context["payment"] == {"n": 1}


def test_no_permission_is_told_apart_from_other_refusals() -> None:
    from flowdsl.runtime.redis.connection import no_permission

    assert no_permission(redis.exceptions.NoPermissionError("this user has no permissions to run the 'x' command"))
    # a command inside a script: Redis 7.0, through redis-py and raw; Redis 6, wrapped
    assert no_permission(redis.ResponseError("The user executing the script can't run this command or subcommand"))
    assert no_permission(redis.ResponseError("ERR The user executing the script can't publish to the channel"))
    assert no_permission(redis.ResponseError("ERR Error running script (call to f_1): @user_script:1: "
                                             "@user_script: 1: -NOPERM this user has no permissions"))
    assert not no_permission(redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"))
    assert not no_permission(redis.AuthenticationError("invalid username-password pair"))
    assert not no_permission(ValueError("NOPERM"))


def test_a_client_refused_by_acl_says_where_the_permissions_are_listed(acl: MakeUser, prefix: str) -> None:
    url = acl("&*", "+@all")  # every command, no key
    r = CliRunner().invoke(app, ["runs", "--redis-url", url, "--prefix", prefix])
    assert r.exit_code == 2
    assert "no permissions to access one of the keys" in r.stderr
    assert f"(the ACL user '{prefix}-user0' lacks a permission flowdsl needs: see docs/runtime.md, \"ACL users\")" \
           in " ".join(r.stderr.split())
