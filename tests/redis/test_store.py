"""The Redis data model and its atomic transitions: key layout, JSON messages, idempotent submission,
version checks, lease guards, no trimming of pending work, retention, connection URLs."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

import tests.runtime.workers  # noqa: F401  (registers the conf.* workers this process serves)
from flowdsl import compile_text
from flowdsl.runtime.codec import dumps, loads
from flowdsl.runtime.redis import RedisClient, RedisWorker, WorkerOptions
from flowdsl.runtime.redis.advance import nonces
from flowdsl.runtime.redis.client import RunIdTaken
from flowdsl.runtime.redis.connection import RedisConfigError, connect, describe_url, resolve_url
from flowdsl.runtime.redis.keys import GROUP, Keys, TimerMember, check_run_id
from flowdsl.runtime.redis.store import Store
from tests.redis.server import RedisServer

SPEC = "flowdsl: 1\nname: m\nworkers: [tests.runtime.workers]\nsteps:\n  - conf.a: {compensate: undo.a}\n  - conf.b\n"


def _plan(spec: str = SPEC) -> dict[str, Any]:
    return compile_text(spec)


async def _burst(url: str, prefix: str, **options: Any) -> Any:
    worker = RedisWorker(url, prefix=prefix, options=WorkerOptions(burst=True, handle_signals=False, lease_s=5,
                                                                   **options))
    return await asyncio.wait_for(worker.serve(), 30)


# --- keys -----------------------------------------------------------------------------------


def test_every_key_of_a_run_shares_one_cluster_slot_and_shared_keys_share_another() -> None:
    keys = Keys("acme")
    per_run = keys.run_keys("order-7")
    assert per_run[0] == "acme:run:{order-7}" and all(k.startswith("acme:run:{order-7}") for k in per_run)
    assert len({key_slot(k.encode()) for k in per_run}) == 1
    shared = [keys.control, keys.llm, keys.timers, keys.timers_claimed, keys.runs, keys.workers,
              keys.queue("payments.charge")]
    assert len({key_slot(k.encode()) for k in shared}) == 1
    assert all(k.startswith("{acme}:") for k in shared)
    assert keys.queue_of({"kind": "llm", "worker": None}) == keys.llm


def test_timer_members_and_run_ids() -> None:
    member = TimerMember.decode(Keys.kernel_timer("r1", "r1/a#1@timeout"))
    assert member == TimerMember("t", "r1", "r1/a#1@timeout")
    assert TimerMember.decode("x|r1|y") is None and TimerMember.decode("t|r1") is None
    assert check_run_id("order-1042.v2") == "order-1042.v2"
    for bad in ("a/b", "a{b}", "a|b", "", "x" * 129):
        with pytest.raises(ValueError):
            check_run_id(bad)
    with pytest.raises(ValueError):
        Keys("bad prefix")


# --- connection URLs ---------------------------------------------------------------------------


def test_tokens_are_unique_per_draw_and_per_process_and_draw_randomness_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Transition and lease tokens: a random prefix drawn once per generator (one system call per process, not
    one per transition), a counter after it."""
    calls: list[int] = []
    real = secrets.token_hex
    monkeypatch.setattr(secrets, "token_hex", lambda n: calls.append(n) or real(n))
    first, second = nonces(6), nonces(6)
    a = [next(first) for _ in range(1000)]
    b = [next(second) for _ in range(3)]
    assert calls == [6, 6] and len(set(a + b)) == 1003
    assert {t.split(".")[0] for t in a} != {t.split(".")[0] for t in b} and len(a[0].split(".")[0]) == 12


def test_urls_from_the_option_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_url(None) == "redis://localhost:6379/0"
    monkeypatch.setenv("FLOWDSL_REDIS_URL", "unix:///run/redis.sock?db=2")
    assert resolve_url(None) == "unix:///run/redis.sock?db=2"
    assert resolve_url("rediss://u:p@h:6380/1") == "rediss://u:p@h:6380/1"
    for bad in ("http://h", "unix://", "redis://"):
        with pytest.raises(RedisConfigError):
            resolve_url(bad)
    assert describe_url("redis://alice:s3cret@h:1/0") == "redis://alice:***@h:1/0"
    # a password in the query (redis-py reads it too) is hidden as well; the rest is kept as written
    assert describe_url("unix:///tmp/r.sock?db=1&password=s3cret&username=alice") == \
        "unix:///tmp/r.sock?db=1&password=***&username=alice"
    with pytest.raises(RedisConfigError, match=r"'redis://u:\*\*\*@\[::1/0' cannot be read: Invalid IPv6 URL"):
        resolve_url("redis://u:s3cret@[::1/0")
    tls = connect("rediss://h:6380/0")
    assert tls.connection_pool.connection_class.__name__ == "SSLConnection"


@pytest.mark.parametrize("url", ["redis://:pa/SECRET@127.0.0.1:1/0", "redis://:pa#SECRET@h:1/0",
                                 "redis://:pa?SECRET@h:1/0", "redis://user:123/SECRET@h",
                                 "redis://user:123#SECRET@h:6379"])
def test_a_password_holding_a_url_delimiter_is_never_shown(url: str) -> None:
    """A password with `/`, `?` or `#` (as `openssl rand -base64` makes) ends a URL's host part early for every
    URL parser, which then reads it as the path, query or fragment: still hidden, and the error says why."""
    with pytest.raises(RedisConfigError, match="percent-encode") as caught:
        resolve_url(url)
    assert "SECRET" not in str(caught.value) and "SECRET" not in describe_url(url)
    assert describe_url(url).endswith(url[url.rfind("@"):])


def test_an_at_sign_in_a_query_value_is_no_ambiguity() -> None:
    assert resolve_url("redis://h:6379/0?password=a@b") == "redis://h:6379/0?password=a@b"
    assert describe_url("redis://h:6379/0?password=a@b") == "redis://h:6379/0?password=***"


@pytest.mark.parametrize(("url", "said"), [
    ("redis://h:1/x", "its path must be empty or /<database number> (as in redis://host:6379/0), not '/x'"),
    ("redis://h:1/1x", "not '/1x'"),
    ("rediss://u:s3cret@h:1/O", "not '/O'"),  # (the letter O typed for 0)
    ("redis://h:1/-1", "not '/-1'"),
    ("redis://h:1/2?db=3", "selects the database more than once (the path /2 and ?db=3): give it once, in the path "
                           "(redis://host:port/N) or as ?db=N"),
    ("redis://h:1?db=1&db=2", "more than once (?db=1 and ?db=2)"),
    ("unix:///r.sock?db=1&db=2", "more than once (?db=1 and ?db=2): give it once, as ?db=N"),
    ("unix:///r.sock?db=abc", "db must be a database number (?db=0), not 'abc'"),
    ("unix:///r.sock?db=", "db must be a database number (?db=0), not ''"),
])
def test_a_url_must_name_its_database_once_as_a_number(url: str, said: str) -> None:
    """redis-py reads a path that is no number as database 0, and of two databases takes one, without a word."""
    with pytest.raises(RedisConfigError, match=r"^the Redis URL '[^']*' selects ") as caught:
        resolve_url(url)
    assert said in str(caught.value) and "s3cret" not in str(caught.value)


def test_the_ways_of_naming_a_database_still_work(server: RedisServer, prefix: str) -> None:
    for url, db in (("redis://h:1/2", 2), ("redis://h:1", 0), ("redis://h:1/", 0), ("rediss://u:p@h:6380/3", 3),
                    ("rediss://h:6380?db=1&ssl_cert_reqs=none", 1), (f"unix://{server.socket}?db=3", 3)):
        assert resolve_url(url) == url
        assert connect(url).connection_pool.connection_kwargs.get("db", 0) == db, url

    async def write() -> None:  # (the client talks over its lean connection: SELECT 3 there)
        async with RedisClient(f"unix://{server.socket}?db=3", prefix=prefix) as client:
            await client.submit(_plan(), {}, run_id="in-db-3")

    asyncio.run(write())
    in_3 = redis.Redis(unix_socket_path=str(server.socket), db=3)
    try:
        assert in_3.exists(Keys(prefix).run("in-db-3")) == 1
        in_3.delete(*Keys(prefix).run_keys("in-db-3"), Keys(prefix).runs, Keys(prefix).control)
    finally:
        in_3.close()


def test_a_unix_socket_with_an_acl_user_and_password(server: RedisServer) -> None:
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", "flowuser", "on", ">s3cret", "~*", "&*", "+@all")
    try:
        async def ping(user: str) -> Any:
            client = connect(f"unix://{user}@{server.socket}?db=1")
            try:
                return await client.ping()
            finally:
                await client.aclose()

        assert asyncio.run(ping("flowuser:s3cret")) is True
        with pytest.raises((redis.AuthenticationError, redis.ConnectionError), match="username-password"):
            asyncio.run(ping("flowuser:wrong"))
    finally:
        admin.execute_command("ACL", "DELUSER", "flowuser")
        admin.close()


# --- submitting ------------------------------------------------------------------------------------


def test_a_client_encodes_a_plan_once_for_all_the_runs_it_submits_of_it(url: str, prefix: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import flowdsl.runtime.redis.client as client_module

    hashed: list[str] = []
    real = client_module.plan_id
    monkeypatch.setattr(client_module, "plan_id", lambda plan: hashed.append(plan["flow"]["name"]) or real(plan))
    plan, other = _plan(), _plan(SPEC.replace("name: m", "name: other"))

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            for i in range(3):
                await client.submit(plan, {"script": {}}, run_id=f"same-{i}")
            await client.submit(other, {"script": {}}, run_id="other")
            await client.submit(_plan(), {"script": {}}, run_id="equal")  # an equal plan, another object
            await _burst(url, prefix)
            return [(await client.info(r)).flow for r in ("same-0", "same-2", "other", "equal")]

    assert asyncio.run(main()) == ["m", "m", "other", "m"]
    assert hashed == ["m", "other", "m"]


def test_submit_refuses_what_is_not_a_plan_before_writing_anything(url: str, prefix: str, server: RedisServer) -> None:
    """A path was an AttributeError; {} or a hand-edited plan was stored, and its start request went round the
    workers as tracebacks until it became a dead letter, the run `submitted` for ever; a plan of version 2 ran."""
    from flowdsl.runtime.plancheck import PLAN_VERSION, PlanError

    edited = _plan()
    edited = {**edited, "plan_version": PLAN_VERSION + 1}
    dangling = _plan()
    dangling = {**dangling, "nodes": {**dangling["nodes"], "a": {**dangling["nodes"]["a"], "deps": ["nowhere"]}}}

    async def main() -> None:
        async with RedisClient(url, prefix=prefix) as client:
            with pytest.raises(TypeError, match=r"plan must be an execution plan: a dict.*got str"):
                await client.submit("flow.yaml", {})  # type: ignore[arg-type]
            newer = f"'plan_version' must be 1 to {PLAN_VERSION}, found {PLAN_VERSION + 1}"
            for bad, said in (({}, "it has no 'plan_version'"), (edited, newer), (dangling, "nowhere")):
                with pytest.raises(PlanError, match=said):
                    await client.submit(bad, {"script": {}}, run_id="bad")

    asyncio.run(main())
    assert server.client().zcard(Keys(prefix).runs) == 0


def test_submitting_a_run_id_twice_starts_one_run(url: str, prefix: str, server: RedisServer) -> None:
    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            first = await client.submit(_plan(), {"script": {}}, run_id="twice")
            second = await client.submit(_plan(), {"script": {}}, run_id="twice")  # the same submission again
            with pytest.raises(RunIdTaken, match="another input"):  # the same id for another input: refused
                await client.submit(_plan(), {"script": {"a": {"raise": "Other"}}}, run_id="twice")
            await _burst(url, prefix)
            third = await client.submit(_plan(), {"script": {}}, run_id="twice")
            result, journal = await client.result("twice")
            return first, second, third, result, journal

    first, second, third, result, journal = asyncio.run(main())
    assert (first.created, second.created, third.created) == (True, False, False)
    assert result.status == "completed"  # the first submission's input, not the refused one's
    assert [e["type"] for e in journal.inputs].count("start") == 1
    client = server.client()
    assert client.xlen(Keys(prefix).control) == 0 and client.zcard(Keys(prefix).runs) == 1


def test_messages_are_json(url: str, prefix: str, server: RedisServer) -> None:
    async def main() -> None:
        async with RedisClient(url, prefix=prefix) as client:
            await client.submit(_plan(), {"script": {}, "n": 1}, run_id="js")

    asyncio.run(main())
    client = server.client()
    keys = Keys(prefix)
    ((_, fields),) = client.xrange(keys.control)
    assert loads(fields[b"c"]) == {"type": "start", "run_id": "js"}
    assert loads(client.hget(keys.run("js"), "input")) == {"script": {}, "n": 1}
    # a worker that serves no task stream starts the run: the first task waits in its stream, as JSON
    asyncio.run(_burst_registry(url, prefix))
    ((_, fields),) = client.xrange(keys.queue("conf.a"))
    message = loads(fields[b"m"])
    assert (message["op"], message["task_id"], message["idempotency_key"]) == ("dispatch", "js/a#1", "js/a")
    assert client.hgetall(keys.tasks("js")) == {b"js/a#1": b"q"}


async def _burst_registry(url: str, prefix: str) -> None:
    from flowdsl.workers import WorkerRegistry

    worker = RedisWorker(url, prefix=prefix, registry=WorkerRegistry(),
                         options=WorkerOptions(burst=True, handle_signals=False, llm=False, burst_horizon_s=0))
    await asyncio.wait_for(worker.serve(), 30)


# --- transitions -------------------------------------------------------------------------------------


def test_a_transition_checks_the_version_the_lease_and_its_own_token(url: str, prefix: str) -> None:
    async def main() -> None:
        async with RedisClient(url, prefix=prefix) as client:
            await client.submit(_plan(), {"script": {}}, run_id="tx")
        await _burst_registry(url, prefix)
        store = Store(connect(url), Keys(prefix))
        record = await store.load("tx")
        assert record is not None and record.version == 1
        base = dict(state=dumps(record.state), entries=[(b"{}", b"[]", None, "")], status="running")
        stale = await store.transition("tx", expected=0 + 7, token="t1", **base)
        assert stale.code == 2 and stale.version == 1  # the caller loads the run again
        # the task is queued ("q"): a result guarded by a lease nobody holds is refused and journaled
        late = b'{"type":"task_succeeded","task_id":"tx/a#1","at":1764770000123}'
        refused = await store.transition("tx", expected=1, token="t2", **{
            **base, "entries": [(late, b"[]", ("tx/a#1", "lease", "tok"), "w9")]})
        assert refused.code == 3 and refused.lease == "q"
        garbled = await store.transition("tx", expected=1, token="t2b", **{
            **base, "entries": [(b"{", b"[]", ("tx/a#1", "lease", "tok"), "w9")]})
        assert garbled.code == 3  # a note is still journaled (without what the event would have said)
        # several input events (a group commit): every guard is checked first; one failing writes nothing at all
        several = await store.transition("tx", expected=1, token="t2c", **{
            **base, "entries": [(b"{}", b"[]", None, ""), (late, b"[]", ("tx/a#1", "lease", "tok"), "w9")]})
        assert several.code == 7 and several.version == 1
        assert await store.pickup("tx", "tx/a#1", "1-0@s", "1-0@s|w|n") == (1, "")
        assert (await store.pickup("tx", "tx/a#1", "2-0@s", "2-0@s|w2|n"))[0] == 3  # another delivery: a duplicate
        assert (await store.pickup("tx", "tx/a#1", "1-0@t", "1-0@t|w3|n"))[0] == 3  # same id, another stream
        # a lease in the format of the previous version (no stream in the trigger), left by a process that died,
        # is taken over by a new delivery of its entry
        await store.call("HSET", Keys(prefix).tasks("tx"), "tx/a#1", "r:1-0|old|n")
        assert await store.pickup("tx", "tx/a#1", "1-0@s", "1-0@s|w|n") == (1, "")
        held = {**base, "entries": [(b"{}", b"[]", ("tx/a#1", "lease", "1-0@s|w|n"), "")]}
        applied = await store.transition("tx", expected=1, token="t3", **held)
        assert applied.code == 1 and applied.version == 2
        again = await store.transition("tx", expected=1, token="t3", **held)
        assert again.code == 4  # the same transition sent twice (an unknown outcome retried) is applied once
        journal = await store.call("XRANGE", Keys(prefix).journal("tx"), "-", "+")
        assert [sorted(f) for _, f in journal] == [[b"ev", b"in", b"tk", b"v"], [b"note"], [b"note"],
                                                   [b"ev", b"in", b"tk", b"v"]]  # tk: the transition token
        assert loads(journal[2][1][b"note"])["worker"] == "w9"
        assert loads(journal[1][1][b"note"]) == {  # the refused result's note, built by the script
            "type": "result_rejected", "reason": "lease_lost", "run_id": "tx", "task_id": "tx/a#1",
            "result_type": "task_succeeded", "at": 1764770000123, "worker": "w9",
            "message": "the result came from a worker whose lease had expired; another worker holds the task"}
        await store.client.aclose()

    asyncio.run(main())


def test_a_self_dispatched_task_is_held_at_once_and_queued_again_when_its_trigger_is_taken_over(
        url: str, prefix: str) -> None:
    """The transition that dispatches a task to the calling process holds it under the caller's trigger and
    keeps its message; taking that trigger over queues the task again and hands its message to the relay."""
    keys = Keys(prefix)
    trigger = Keys.trigger(keys.control, "5-0")
    token = f"{trigger}|w1|n1"

    async def main() -> None:
        async with RedisClient(url, prefix=prefix) as client:
            await client.submit(_plan(), {"script": {}}, run_id="sd")
        await _burst_registry(url, prefix)
        store = Store(connect(url), keys)
        record = await store.load("sd")
        assert record is not None
        message = dumps({"op": "dispatch", "run_id": "sd", "task_id": "sd/b#1", "kind": "task", "worker": "conf.b"})
        base = dict(state=dumps(record.state), entries=[(b"{}", b"[]", None, "")], status="running")
        done = await store.transition("sd", expected=1, token="t1", task_ops=[
            ("d", "sd/a#1", ""), ("c", "sd/b#1", "r:" + token, message)], **base)
        assert done.applied
        lease, kept, fields = await asyncio.gather(store.call("HGET", keys.tasks("sd"), "sd/b#1"),
                                                   store.call("HGET", keys.outbox("sd"), "s:sd/b#1"),
                                                   store.call("HLEN", keys.tasks("sd")))
        assert (lease, kept, fields) == (b"r:" + token.encode(), message, 1)
        # another trigger's takeover leaves it alone: its holder is alive as far as anyone knows (and the
        # start's outbox entry, relayed, is gone: nothing else to relay)
        assert await store.outbox("sd", Keys.trigger(keys.queue("conf.b"), "5-0")) == []
        assert await store.call("HGET", keys.tasks("sd"), "sd/b#1") == b"r:" + token.encode()
        # taking its trigger over: queued again, its message to be relayed to its worker's stream
        born = (await store.call("HGET", keys.run("sd"), "born")).decode()  # the run's generation
        assert await store.outbox("sd", trigger) == [(None, [{"o": "task", "q": keys.queue("conf.b"),
                                                              "raw": message, "v": "", "g": born}])]
        assert await store.call("HGET", keys.tasks("sd"), "sd/b#1") == b"q"
        # once it is no longer in flight, its kept message goes with its lease
        gone = await store.transition("sd", expected=2, token="t2", task_ops=[("d", "sd/b#1", "")], **base)
        assert gone.applied and await store.outbox("sd") == []
        await store.client.aclose()

    asyncio.run(main())


def test_streams_are_never_trimmed_pending_entries_stay_and_acked_ones_go(url: str, prefix: str,
                                                                          server: RedisServer) -> None:
    client = server.client()
    keys = Keys(prefix)

    async def main() -> None:
        async with RedisClient(url, prefix=prefix) as c:
            await c.submit(_plan("flowdsl: 1\nname: h\nsteps:\n  - conf.a\n  - nobody.b\n"), {"script": {}},
                           run_id="h")
        await _burst(url, prefix, burst_horizon_s=0)

    asyncio.run(main())
    assert client.xlen(keys.queue("conf.a")) == 0  # done, acknowledged, deleted
    assert client.xlen(keys.queue("nobody.b")) == 1  # waiting for a worker that serves it: kept
    assert client.hget(keys.run("h"), "status") == b"running"


def test_an_acknowledgement_leaves_an_entry_another_process_has_taken_over(url: str, prefix: str,
                                                                          server: RedisServer) -> None:
    """A process paused past the lease resumes with a delivery another one has taken over — perhaps running a
    chain of tasks under it: its acknowledgement must not delete the entry (if the taker then died, nobody
    would ever find those tasks again: the run would hang). The holder's own acknowledgement does; so does one
    for an entry nobody holds any more."""
    client = server.client()
    stream = Keys(prefix).control

    async def ack(entry_id: str, consumer: str) -> None:
        conn = connect(url)
        try:
            store = Store(conn, Keys(prefix))
            await store.relay(None, None, [store.ack_op(stream, entry_id, consumer)])
        finally:
            await conn.aclose()

    client.xgroup_create(stream, GROUP, id="$", mkstream=True)
    taken, free = client.xadd(stream, {"c": "{}"}).decode(), client.xadd(stream, {"c": "{}"}).decode()
    client.xreadgroup(GROUP, "paused", {stream: ">"})  # both delivered to the process about to be paused
    client.xclaim(stream, GROUP, "taker", 0, [taken])  # after the lease, another takes the first over
    asyncio.run(ack(taken, "paused"))  # the paused one resumes and acknowledges what it had: not its own any more
    assert [e[0].decode() for e in client.xrange(stream)] == [taken, free]
    assert client.xpending_range(stream, GROUP, "-", "+", 10)[0]["consumer"] == b"taker"
    asyncio.run(ack(free, "paused"))  # still its own: acknowledged and deleted
    asyncio.run(ack(taken, "taker"))  # the taker's own acknowledgement
    assert client.xlen(stream) == 0 and client.xpending(stream, GROUP)["pending"] == 0
    client.delete(stream)


def test_finished_runs_expire_after_their_retention(url: str, prefix: str, server: RedisServer) -> None:
    async def main() -> None:
        async with RedisClient(url, prefix=prefix) as c:
            await c.submit(_plan(), {"script": {}}, run_id="kept", retention_s=60)
            await c.submit(_plan(), {"script": {}}, run_id="default")
            await c.submit(_plan("flowdsl: 1\nname: h\nsteps: [nobody.z]\n"), {}, run_id="open")
        await _burst(url, prefix, retention_s=3600, burst_horizon_s=0)

    asyncio.run(main())
    client = server.client()
    keys = Keys(prefix)
    assert 55_000 < client.pttl(keys.run("kept")) <= 60_000
    assert 55_000 < client.pttl(keys.journal("kept")) <= 60_000
    assert 3_500_000 < client.pttl(keys.run("default")) <= 3_600_000
    assert client.pttl(keys.run("open")) == -1 and client.pttl(keys.journal("open")) == -1
    assert client.xpending(keys.queue("conf.a"), GROUP)["pending"] == 0


@pytest.mark.parametrize("use_hiredis", [True, False])
def test_the_lean_worker_connection_with_and_without_hiredis(server: RedisServer, prefix: str,
                                                            monkeypatch: pytest.MonkeyPatch, use_hiredis: bool) -> None:
    from flowdsl.runtime.redis import wire

    if use_hiredis and wire._hiredis is None:
        pytest.skip("hiredis is not installed")
    if not use_hiredis:
        monkeypatch.setattr(wire, "_hiredis", None)

    async def main() -> list[Any]:
        conn = wire.WireConnection(server.url)
        try:
            key = f"{prefix}:wire"
            return await conn.execute([("PING",), ("HSET", key, "a", "1", "b", b"\xff\x00"), ("HGETALL", key),
                                       ("XADD", key + ":s", "*", "m", "x" * 70000), ("XRANGE", key + ":s", "-", "+"),
                                       ("EVALSHA", "0" * 40, 0), ("HGET", key, "missing"),
                                       ("INCRBYFLOAT", key + ":n", 1.5)])
        finally:
            await conn.aclose()

    pong, added, pairs, _, entries, missing_script, nothing, incr = asyncio.run(main())
    assert (pong, added, pairs, nothing, incr) == (b"PONG", 2, [b"a", b"1", b"b", b"\xff\x00"], None, b"1.5")
    assert entries[0][1] == [b"m", b"x" * 70000]
    assert isinstance(missing_script, redis.exceptions.NoScriptError)


def test_a_cancellation_landing_as_a_blocking_read_answers_is_not_lost(server: RedisServer, prefix: str) -> None:
    """A follower's Ctrl-C or SIGTERM cancels its task; when the cancellation lands in the loop iteration where
    its ``XREAD … BLOCK`` answers, the read must still end cancelled (with ``asyncio.wait_for`` on Python 3.11 the
    answer was returned and the cancellation dropped: ``flowdsl run --backend redis`` went on following)."""
    from flowdsl.runtime.redis import wire

    async def main() -> None:
        conn = wire.WireConnection(server.url)
        real = conn.execute
        reading: asyncio.Task[Any] | None = None

        async def execute(commands: list[tuple[Any, ...]]) -> list[Any]:
            replies = await real(commands)
            assert reading is not None
            reading.cancel()  # as the signal handler does, once the answer is in
            return replies

        conn.execute = execute  # type: ignore[method-assign]
        try:
            reading = asyncio.create_task(conn.blocking(("XREAD", "BLOCK", 10, "STREAMS", f"{prefix}:s", "0"), 10))
            with pytest.raises(asyncio.CancelledError):
                await reading
        finally:
            await conn.aclose()

    asyncio.run(main())


def test_a_server_that_accepts_but_never_answers_the_hello_is_given_up_on_and_its_socket_closed(
        tmp_path: Path) -> None:
    """The connection's hello (here CLIENT SETNAME) had no bound: a listener that accepts and stays silent held the
    connecting process for ever; and the socket of a hello refused or cancelled was left open."""
    import socket
    import threading

    from flowdsl.runtime.redis import wire

    path = tmp_path / "silent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    accepted: list[socket.socket] = []
    closed = threading.Event()

    def accept() -> None:
        conn, _ = listener.accept()
        accepted.append(conn)
        conn.settimeout(10)
        while conn.recv(4096):  # reads the hello, answers nothing, until the client closes the socket
            pass
        closed.set()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()

    async def main() -> None:
        conn = wire.WireConnection(f"unix://{path}", connect_timeout=0.3, client_name="flowdsl-test")
        with pytest.raises(redis.ConnectionError, match=r"no answer to CLIENT within 0.3 s"):
            await conn.execute([("PING",)])

    try:
        asyncio.run(asyncio.wait_for(main(), 10))
        assert closed.wait(5)  # the client closed its socket
    finally:
        for conn in accepted:
            conn.close()
        listener.close()
        thread.join(5)
