"""Worker behaviour (burst, schedule-to-start deadlines, heartbeats, cancelling) and the CLI commands of
the Redis runtime: ``run --backend redis`` (live and ``--detach``), ``worker``, ``status``, ``runs``,
``cancel``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import tests.runtime.workers  # noqa: F401  (registers the conf.* workers this process serves)
from flowdsl import compile_text
from flowdsl.cli import app
from flowdsl.runtime.local import run_flow
from flowdsl.runtime.redis import RedisClient, RedisWorker, WorkerOptions
from flowdsl.workers import WorkerRegistry
from flowdsl.workers import registry as default_registry
from tests.redis.inproc import serving, worker_here
from tests.redis.procs import ROOT, WorkerProcs
from tests.runtime.conformance import HEADER

SAGA = HEADER.format(name="saga") + "steps:\n  - conf.a: {compensate: undo.a}\n  - conf.b\n"




def test_burst_drains_the_queues_and_exits(url: str, prefix: str) -> None:
    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            ids = [(await client.submit(compile_text(SAGA), {"script": {}})).run_id for _ in range(3)]
            stats = await asyncio.wait_for(worker_here(url, prefix, burst=True).serve(), 30)
            return stats, [(await client.info(r)).status for r in ids]

    stats, statuses = asyncio.run(main())
    assert statuses == ["completed"] * 3
    assert (stats.runs_started, stats.tasks, stats.reclaimed) == (3, 6, 0)


def test_a_worker_keeps_at_most_cache_runs_states_and_with_none_still_runs_every_run(url: str, prefix: str) -> None:
    """``cache_runs`` bounds the run states a process keeps (runs whose next step went to a stream stay cached
    otherwise); 0 keeps none, every event then reading its run back from Redis."""
    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            ids = [(await client.submit(compile_text(SAGA), {"script": {}})).run_id for _ in range(5)]
            starter = worker_here(url, prefix, registry=WorkerRegistry(), burst=True, burst_horizon_s=0, cache_runs=2)
            await asyncio.wait_for(starter.serve(), 30)  # starts the runs, queues their first steps
            kept = sorted(starter.advancer._cache)
            runner = worker_here(url, prefix, burst=True, cache_runs=0)
            stats = await asyncio.wait_for(runner.serve(), 30)
            return kept, len(runner.advancer._cache), stats, [(await client.info(r)).status for r in ids]

    kept, left, stats, statuses = asyncio.run(main())
    assert len(kept) == 2 and left == 0
    assert statuses == ["completed"] * 5 and stats.tasks == 10
    with pytest.raises(ValueError, match="cache_runs must be a whole number of runs"):
        WorkerOptions(cache_runs=-1)
    r = cli("worker", "--redis-url", url, "--prefix", prefix, "--cache-runs", "-1")
    assert r.exit_code == 2 and "--cache-runs" in r.stderr and "Traceback" not in r.output


def test_runs_beyond_the_concurrency_still_run_their_first_step_where_they_start(url: str, prefix: str) -> None:
    """40 runs submitted at once to a worker with 4 slots: the worker reads no more start requests than it has
    free slots, so every run's first step (and so every step) runs in the process that started the run, none
    through its stream (a detour of a stream entry, a PICKUP and an acknowledgement per run)."""
    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            ids = [(await client.submit(compile_text(SAGA), {"script": {}})).run_id for _ in range(40)]
            worker = worker_here(url, prefix, burst=True, concurrency=4)
            stats = await asyncio.wait_for(worker.serve(), 30)
            assert not worker._starting and not worker._held  # nothing left counted as taken
            return stats, [(await client.info(r)).status for r in ids]

    stats, statuses = asyncio.run(main())
    assert statuses == ["completed"] * 40
    assert (stats.runs_started, stats.tasks, stats.chained) == (40, 80, 80)


def test_a_step_no_worker_picks_up_fails_at_its_schedule_to_start_deadline_and_the_run_compensates(
        url: str, prefix: str) -> None:
    spec = HEADER.format(name="sts") + "steps:\n  - conf.a: {compensate: undo.a}\n  - nobody.b\n"

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(compile_text(spec), {"script": {}}, schedule_timeout_s=0.3)
            return await serving([worker_here(url, prefix)], lambda: client.follow(sub.run_id))

    result = asyncio.run(main())
    assert (result.status, result.compensated, result.failed_step) == ("compensated", ["a"], "b")
    assert result.error["type"] == "ScheduleToStartTimeout"
    assert "is a process serving worker 'nobody.b' running?" in result.error["message"]  # (it names the worker)


def test_the_schedule_to_start_deadline_names_the_worker_of_each_kind_of_attempt() -> None:
    from flowdsl.runtime.redis.advance import _worker_of
    from flowdsl.runtime.redis.store import RunRecord

    plan = {"nodes": {"a": {"kind": "task", "worker": "w.a", "fallback": "w.fb", "compensate": {"worker": "w.undo"}},
                      "q": {"kind": "llm"}}}
    tasks = {"r/a#1": {"step": "a", "kind": "task"}, "r/a#f2": {"step": "a", "kind": "fallback"},
             "r/a#c1": {"step": "a", "kind": "compensate"}, "r/q#1": {"step": "q", "kind": "llm"}}
    state = {"tasks": tasks, "nodes": {"a": {"node": "a"}, "q": {"node": "q"}}}
    record = RunRecord("r", state, 3, plan, 100)
    assert [_worker_of(record, t) for t in tasks] == ["w.a", "w.fb", "w.undo", ""]
    assert _worker_of(record, "r/a#9") is None  # no longer in flight


def test_a_step_timeout_counts_the_wait_in_its_stream_and_an_attempt_timed_out_there_never_runs(
        url: str, prefix: str) -> None:
    """A step's timeout counts from its dispatch (docs/runtime.md, "Sizing"): attempts that wait in their stream
    longer time out there — each retry queued again — and the run compensates; a process that reads those
    messages afterwards answers them cancelled without running the worker."""
    spec = HEADER.format(name="queued") + (
        "steps:\n  - conf.a: {compensate: undo.a}\n"
        "  - b: {worker: backlog.b, timeout: 200ms, retry: {attempts: 2, initial: 10ms}}\n")
    calls: list[str] = []
    first, late = WorkerRegistry(), WorkerRegistry()
    first.register("conf.a", default_registry.get("conf.a").fn)
    first.register("undo.a", default_registry.get("undo.a").fn)

    async def b(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        calls.append(ctx.task_id)
        return {}

    late.register("backlog.b", b)

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(compile_text(spec), {"script": {}})
            result = await serving([worker_here(url, prefix, registry=first)], lambda: client.follow(sub.run_id))
            await asyncio.wait_for(worker_here(url, prefix, registry=late, burst=True).serve(), 30)
            return result, await client.store.call("XLEN", client.keys.queue("backlog.b"))

    result, left = asyncio.run(main())
    assert (result.status, result.compensated, result.failed_step) == ("compensated", ["a"], "b")
    assert result.error["type"] == "StepTimeout" and result.steps["b"]["attempts"] == 2
    assert calls == [] and left == 0  # both messages read, answered cancelled, acknowledged: the worker never ran


def test_a_worker_process_survives_a_step_that_calls_sys_exit(tmp_path: Path, url: str, prefix: str) -> None:
    """sys.exit() in a step fails that step (the run compensates); the process keeps serving — else the step
    would be taken over by the next process after the lease and end that one too."""
    module = tmp_path / "exiting_workers.py"
    module.write_text("import sys\nfrom flowdsl import worker\n\n\n@worker('exiting.quit')\n"
                      "async def quit_(data, ctx):\n    sys.exit(3)\n")
    spec = ("flowdsl: 1\nname: exiting\nworkers: [tests.runtime.workers]\n"
            "steps:\n  - conf.a: {compensate: undo.a}\n  - q: {worker: exiting.quit}\n")
    procs = WorkerProcs(url, prefix, ["tests.runtime.workers", "exiting_workers"],
                        env={"PYTHONPATH": os.pathsep.join((str(ROOT), str(tmp_path)))})
    try:
        procs.start(1)

        async def main() -> Any:
            async with RedisClient(url, prefix=prefix) as client:
                first = await client.submit(compile_text(spec), {"script": {}})
                second = await client.submit(compile_text(SAGA), {"script": {}})
                return [await asyncio.wait_for(client.follow(s.run_id), 30) for s in (first, second)]

        failed, after = asyncio.run(main())
        assert (failed.status, failed.compensated, failed.error["type"]) == ("compensated", ["a"], "SystemExit")
        assert after.status == "completed" and procs.alive() == procs.procs  # the same process served both
    finally:
        procs.stop_all()


LONG = """flowdsl: 1
name: long
steps:
  - prepare: {worker: long.prepare}
  - for_each: each
    items: "${ $.items }"
    concurrency: 1
    steps:
      - one: {worker: long.item, with: {x: "${ $item }", base: "${ $.base }"}}
"""


@pytest.mark.parametrize("snapshot_bytes", [0, 512])
def test_a_long_run_writes_its_state_in_snapshots_and_a_load_replays_the_journal_after_the_last(
        url: str, prefix: str, snapshot_bytes: int) -> None:
    """A for_each over 300 items: the state is written whole only now and then (at the start and end only with
    0), yet loading the run from Redis at any step gives exactly the state the worker holds, and the run ends
    as it does on the local runtime."""
    registry = WorkerRegistry()
    checked: list[int] = []  # per check: how many transitions the load replayed
    local_run = False

    async def prepare(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {"base": 1000}

    async def item(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        if data["x"] % 60 == 59 and not local_run:
            loaded, held = await worker.store.load(ctx.run_id), worker.advancer._cache[ctx.run_id]
            assert loaded is not None
            assert (loaded.version, loaded.state) == (held.version, held.state)
            checked.append(loaded.since)
        return {"sum": data["base"] + data["x"]}

    registry.register("long.prepare", prepare)
    registry.register("long.item", item)
    worker = worker_here(url, prefix, registry, snapshot_bytes=snapshot_bytes)
    plan, run_input = compile_text(LONG), {"items": list(range(300))}

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(plan, run_input)
            return await serving([worker], lambda: client.follow(sub.run_id))

    result = asyncio.run(main())
    local_run = True
    local = asyncio.run(run_flow(plan, run_input, record=False, registry=registry, import_workers=False))
    assert result.status == local.status == "completed"
    assert result.context == local.context and result.context["each"][299] == {"sum": 1299}
    transitions, snapshots = worker.advancer.transitions, worker.advancer.snapshots
    assert transitions == 302 and len(checked) == 5  # start, prepare, one per item
    if snapshot_bytes == 0:
        assert snapshots == 2 and checked == [60, 120, 180, 240, 300]  # all replayed from the start
    else:
        assert 2 < snapshots < transitions / 10 and any(checked)


@pytest.mark.parametrize("alternate", [False, True])
def test_a_chain_kept_by_its_process_writes_its_small_state_every_16_transitions_else_every_transition(
        url: str, prefix: str, alternate: bool) -> None:
    """40 steps in a row. Served by one process, each step's transition hands it the next (a chain): nobody
    else is about to load the run, so its state (small) is written at the start, every 16 transitions and at
    the end only. Alternating between two processes, each transition queues the next step for the other one,
    which then loads the run: the state is written every transition. Either way a load gives exactly the state
    the serving process holds."""
    names = ["chain.a", "chain.b"] if alternate else ["chain.a"]
    registries = [WorkerRegistry() for _ in names]
    since: list[int] = []  # per step: how many transitions a load replayed
    workers: list[RedisWorker] = []

    def step(index: int) -> Any:
        async def run(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
            loaded = await workers[index].store.load(ctx.run_id)
            held = max((r for w in workers if (r := w.advancer._cache.get(ctx.run_id))), key=lambda r: r.version)
            assert loaded is not None and (loaded.version, loaded.state) == (held.version, held.state)
            since.append(loaded.since)
            return {ctx.step_id: True}
        return run

    for index, (name, registry) in enumerate(zip(names, registries, strict=True)):
        registry.register(name, step(index))
        workers.append(worker_here(url, prefix, registry))
    spec = "flowdsl: 1\nname: chain\nsteps:\n" + "".join(
        f"  - s{i}: {{worker: {names[i % len(names)]}}}\n" for i in range(40))

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(compile_text(spec), {})
            return await serving(workers, lambda: client.follow(sub.run_id))

    result = asyncio.run(main())
    assert result.status == "completed" and len(result.context) == 40 and len(since) == 40
    transitions = sum(w.advancer.transitions for w in workers)
    snapshots = sum(w.advancer.snapshots for w in workers)
    assert transitions == 41  # the start, then one per step
    if alternate:
        assert snapshots == 41 and set(since) == {0}
    else:
        assert snapshots == 4 and since == list(range(16)) * 2 + list(range(8))  # v1, v17, v33, v41


def test_two_processes_sharing_one_wide_run_both_get_their_results_in(url: str, prefix: str) -> None:
    """Two worker processes serve one run's 600 iterations, 16 at a time: their transitions conflict, and the
    one that loses backs off and tries again instead of giving up after a few dozen conflicts in a row and
    leaving its step to wait for the lease (30 s)."""
    registry = WorkerRegistry()

    async def item(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {"y": data["x"]}

    registry.register("long.item", item)
    spec = LONG.replace("concurrency: 1", "concurrency: 16").replace("  - prepare: {worker: long.prepare}\n", "")
    workers = [worker_here(url, prefix, registry, concurrency=8) for _ in range(2)]  # 16 at a time: both hold steps

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(compile_text(spec), {"items": list(range(600))})
            return await serving(workers, lambda: client.follow(sub.run_id))

    result = asyncio.run(main())
    assert result.status == "completed" and len(result.context["each"]) == 600
    assert [w.stats.reclaimed for w in workers] == [0, 0]  # no step waited for its lease to expire
    assert sum(w.advancer.conflicts for w in workers) > 0  # (they did contend)
    assert all(w.stats.transitions > 0 for w in workers)


def test_integers_beyond_64_bits_come_back_from_redis_as_they_were(url: str, prefix: str) -> None:
    """A wide integer in the run input and in a result goes through messages, journal and state: it is the same
    integer at the end (orjson alone would read it back as a float, and 2**70 + 1 would lose its last bit)."""
    wide = 2**70 + 1
    script = {"a": {"result": {"big": wide, "neg": -(2**64) - 3}}}

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(compile_text(SAGA), {"script": script, "given": [wide]})
            return await serving([worker_here(url, prefix)], lambda: client.follow(sub.run_id))

    result = asyncio.run(main())
    assert result.status == "completed"
    assert (result.context["big"], result.context["neg"], result.context["given"]) == (wide, -(2**64) - 3, [wide])
    assert type(result.context["big"]) is int


def test_heartbeats_keep_a_long_step_from_being_reclaimed(url: str, prefix: str) -> None:
    calls: list[str] = []
    registry = WorkerRegistry()

    async def long_step(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        calls.append(ctx.idempotency_key)
        await asyncio.sleep(1.5)
        return {"done": True}

    registry.register("long", long_step)
    spec = "flowdsl: 1\nname: hb\nsteps: [long]\n"

    async def main() -> Any:
        workers = [worker_here(url, prefix, registry, lease_s=0.4), worker_here(url, prefix, registry, lease_s=0.4)]
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(compile_text(spec), {})
            result = await serving(workers, lambda: client.follow(sub.run_id))
        return result, workers

    result, workers = asyncio.run(main())
    assert result.status == "completed" and len(calls) == 1  # four leases long, never run twice
    assert sum(w.stats.reclaimed for w in workers) == 0


def test_heartbeats_go_on_while_a_worker_is_idle_and_keep_a_later_long_step(url: str, prefix: str) -> None:
    """Workers that idle for several heartbeats first (nothing held, no start request being handled) still
    renew their liveness record, and the leases of a long step they take up afterwards (a second step, so
    not the one run under the start request): it runs once, nothing is reclaimed."""
    calls: list[str] = []
    registry = WorkerRegistry()

    async def quick(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {}

    async def long_step(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        calls.append(ctx.idempotency_key)
        await asyncio.sleep(1.5)
        return {"done": True}

    registry.register("quick", quick)
    registry.register("long", long_step)
    spec = "flowdsl: 1\nname: hb2\nsteps: [quick, long]\n"

    async def main() -> Any:
        workers = [worker_here(url, prefix, registry, lease_s=0.4), worker_here(url, prefix, registry, lease_s=0.4)]
        async with RedisClient(url, prefix=prefix) as client:
            async def body() -> Any:
                await asyncio.sleep(1.0)  # ~7 heartbeats with nothing to renew
                seen = {w["name"]: w["seen"] for w in await client.workers(max_age_ms=600)}
                sub = await client.submit(compile_text(spec), {})
                return seen, await client.follow(sub.run_id)

            started = (await client.redis.time())[0] * 1000
            seen, result = await serving(workers, body)
        return started, seen, result, workers

    started, seen, result, workers = asyncio.run(main())
    assert sorted(seen) == sorted(w.name for w in workers), "a liveness record went stale while its worker idled"
    assert all(at >= started + 500 for at in seen.values()), seen
    assert result.status == "completed" and len(calls) == 1  # four leases long, never run twice
    assert sum(w.stats.reclaimed for w in workers) == 0


def test_cancel_stops_the_run_and_undoes_what_completed(url: str, prefix: str) -> None:
    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(compile_text(SAGA), {"script": {"b": {"hang": True}}})

            async def body() -> Any:
                seen = asyncio.Event()

                def watch(event: dict[str, Any]) -> None:
                    if event["type"] == "step_scheduled" and event["step"] == "b":
                        seen.set()

                follow = asyncio.create_task(client.follow(sub.run_id, on_event=watch))
                await seen.wait()
                assert await client.cancel(sub.run_id, "enough") == "requested"
                return await follow

            result = await serving([worker_here(url, prefix)], body)
            return result, await client.cancel(sub.run_id)

    result, again = asyncio.run(main())
    assert (result.status, result.compensated, result.error["type"]) == ("cancelled", ["a"], "Cancelled")
    assert again == "finished"


def test_a_run_cancelled_before_any_worker_started_it_ends_cancelled(url: str, prefix: str) -> None:
    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(compile_text(SAGA), {"script": {}})
            assert (await client.info(sub.run_id)).status == "submitted"
            assert await client.cancel(sub.run_id) == "requested"
            return await serving([worker_here(url, prefix)], lambda: client.follow(sub.run_id))

    result = asyncio.run(main())
    assert result.status == "cancelled" and result.steps["b"]["status"] in ("pending", "cancelled")


# --- the CLI ------------------------------------------------------------------------------------


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def test_the_cli_runs_follows_lists_shows_and_cancels(url: str, prefix: str, tmp_path: Path) -> None:
    spec = tmp_path / "saga.yaml"
    spec.write_text(SAGA)
    script = json.dumps({"b": {"raise": "Boom"}})
    common = ["--redis-url", url, "--prefix", prefix]
    procs = WorkerProcs(url, prefix, ["tests.runtime.workers"])
    try:
        procs.start(1)
        r = cli("run", str(spec), "--backend", "redis", *common, "--set", f"script={script}", "--format", "json",
                "--run-id", "cli-1")
        assert r.exit_code == 1, r.output
        remote = json.loads(r.stdout)
        local = asyncio.run(run_flow(compile_text(SAGA), {"script": {"b": {"raise": "Boom"}}}, run_id="cli-1",
                                     record=False)).to_json()
        assert set(remote) == set(local)
        for key in ("run_id", "status", "compensated", "context", "error", "failed_step"):
            assert remote[key] == local[key], key
        assert {k: (v["status"], v["attempts"]) for k, v in remote["steps"].items()} == \
               {k: (v["status"], v["attempts"]) for k, v in local["steps"].items()}
        assert [e["type"] for e in remote["events"]] == [e["type"] for e in local["events"]]

        r = cli("run", str(spec), "--backend", "redis", *common, "--set", 'script={"b": {"hang": true}}',
                "--detach", "--run-id", "cli-2")
        assert r.exit_code == 0 and r.stdout.strip() == "cli-2"
        again = cli("run", str(spec), "--backend", "redis", *common, "--set", 'script={"b": {"hang": true}}',
                    "--detach", "--run-id", "cli-2")
        assert again.exit_code == 0 and "already submitted" in again.stderr
        other = cli("run", str(spec), "--backend", "redis", *common, "--detach", "--run-id", "cli-2")
        assert other.exit_code == 2 and "cli-2" in other.stderr  # the same id with another input: refused
        assert "no live worker" not in r.stderr + again.stderr  # the worker process serves every step

        listed = cli("runs", *common, "--format", "json")
        assert [i["run_id"] for i in json.loads(listed.stdout)] == ["cli-2", "cli-1"]
        only = cli("runs", *common, "--status", "compensated", "--format", "json")
        assert [i["run_id"] for i in json.loads(only.stdout)] == ["cli-1"]
        assert "cli-1" in cli("runs", *common).stdout

        shown = cli("status", "cli-1", *common, "--format", "json")
        assert shown.exit_code == 0 and json.loads(shown.stdout)["events"] == remote["events"]
        text = cli("status", "cli-1", *common)
        assert text.exit_code == 0 and "↶ a undone" in text.stdout

        # the Redis run drawn with its states: exactly what the same run recorded locally draws
        from flowdsl.render import render
        from flowdsl.render.runstate import derive_states

        drawn = cli("diagram", str(spec), "--format", "mermaid", "--run", "cli-1", *common)
        assert drawn.exit_code == 0, drawn.output
        plan = compile_text(SAGA)
        assert drawn.stdout == render(plan, "mermaid", run_states=derive_states(plan, local["events"]))
        assert "compensated" in drawn.stdout and "failed" in drawn.stdout
        assert cli("diagram", str(spec), "--run", "nope", *common).exit_code == 2

        cancelled = cli("cancel", "cli-2", *common, "--wait", "--format", "json")
        assert cancelled.exit_code == 0 and json.loads(cancelled.stdout)["status"] == "cancelled"
        assert cli("cancel", "cli-2", *common).exit_code == 1
        # a cancel whose undo fails for good: the run needs a person, and `cancel --wait` exits 4 as `run` does
        script = 'script={"b": {"hang": true}, "a/compensate": {"raise": "RefundDown"}}'
        cli("run", str(spec), "--backend", "redis", *common, "--set", script, "--detach", "--run-id", "cli-3")
        stuck = cli("cancel", "cli-3", *common, "--wait")
        assert stuck.exit_code == 4 and "it ended needs_intervention" in stuck.stdout, stuck.output
        missing = cli("status", "nope", *common)
        assert missing.exit_code == 2 and "no run 'nope'" in missing.stderr and "Traceback" not in missing.output
    finally:
        procs.stop_all()


def test_status_follow_shows_a_run_to_its_end_and_exits_by_its_end_state(url: str, prefix: str,
                                                                         tmp_path: Path) -> None:
    spec = tmp_path / "saga.yaml"
    spec.write_text(SAGA)
    common = ["--redis-url", url, "--prefix", prefix]
    procs = WorkerProcs(url, prefix, ["tests.runtime.workers"])
    try:
        procs.start(1)
        slow = cli("run", str(spec), "--backend", "redis", *common, "--set", 'script={"b": {"sleep": 0.5}}',
                   "--detach", "--run-id", "follow-1")
        assert slow.exit_code == 0 and "flowdsl status follow-1 --follow" in slow.stderr
        followed = cli("status", "follow-1", "--follow", "--format", "json", *common)
        assert followed.exit_code == 0, followed.output
        out = json.loads(followed.stdout)
        assert out["status"] == "completed" and out["rejected_late_results"] == []  # it waited for the end
        assert set(out) == set(json.loads(cli("status", "follow-1", "--format", "json", *common).stdout))
        cli("run", str(spec), "--backend", "redis", *common, "--set", 'script={"b": {"raise": "Boom"}}',
            "--detach", "--run-id", "follow-2")
        text = cli("status", "follow-2", "--follow", *common)
        assert text.exit_code == 1 and "compensated" in text.stdout and "↶" in text.stdout
        assert cli("status", "follow-2", *common).exit_code == 0  # without --follow: 0 when the run exists
        missing = cli("status", "nope", "--follow", *common)
        assert missing.exit_code == 2 and "no run 'nope'" in missing.stderr
    finally:
        procs.stop_all()


@pytest.mark.parametrize("width", [80, 60])
def test_runs_shows_whole_run_ids_and_states_in_a_narrow_terminal(width: int) -> None:
    """`flowdsl runs` in an 80-column terminal (or a pipe): run ids are what `status` and `cancel` take, so they
    are never cut short, nor are states; a long flow name is shortened instead."""
    import io

    from rich.console import Console

    from flowdsl.runtime.redis.client import RunInfo
    from flowdsl.runtime.redis.commands import _print_runs

    items = [RunInfo("ecommerce_order-20261203T113921-c20310", "ecommerce_order", "needs_intervention",
                     1764761961000, 1764761961000, 1764761961007),
             RunInfo("ecommerce_order-20261203T113913-dd2003", "ecommerce_order", "compensated",
                     1764761953000, 1764761953000, 1764761954500)]
    out = io.StringIO()
    _print_runs(items, Console(file=out, width=width, highlight=False))
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    for item, line in zip(items, lines[1:], strict=True):
        assert line.split()[0] == item.run_id and item.status in line.split() and "12-03" in line
    assert lines[1].rstrip().endswith("7 ms") and lines[2].rstrip().endswith("1.5 s")
    assert "ecommerc" in lines[1]  # the flow's name, shortened


def test_run_warns_of_steps_no_live_worker_process_serves(url: str, prefix: str, tmp_path: Path) -> None:
    spec = tmp_path / "other.yaml"
    spec.write_text(HEADER.format(name="other") + "steps:\n  - conf.a: {compensate: nobody.undo}\n  - nobody.b\n")
    common = ["--redis-url", url, "--prefix", prefix]
    args = ["run", str(spec), "--backend", "redis", *common, "--detach"]
    alone = cli(*args, "--run-id", "w-1")  # no worker process at all: one sentence, not a list of every worker
    assert alone.exit_code == 0 and alone.stdout.strip() == "w-1"
    assert (f"warning: no worker process is connected (prefix '{prefix}'): the run's steps wait until one is; start "
            "one with `flowdsl worker -w tests.runtime.workers`") in " ".join(alone.stderr.split())
    assert "conf.a" not in alone.stderr
    procs = WorkerProcs(url, prefix, ["tests.runtime.workers"])
    try:
        procs.start(1)
        r = cli(*args, "--run-id", "w-2", "--schedule-timeout", "0.2")
        assert r.exit_code == 0 and r.stdout.strip() == "w-2"
        assert ("warning: no live worker process serves the compensation worker 'nobody.undo' of step 'a'; the step "
                "worker 'nobody.b' of step 'b': the step fails after 0.2 s (--schedule-timeout)") in " ".join(
                    r.stderr.split())
        assert "conf.a' of step 'a'" not in r.stderr  # a live process serves it
        many = tmp_path / "many.yaml"  # past four workers nobody serves, the rest are counted
        many.write_text(HEADER.format(name="many") + "steps:\n" + "".join(f"  - nobody.s{i}\n" for i in range(6)))
        r = cli("run", str(many), "--backend", "redis", *common, "--detach", "--run-id", "w-3")
        said = " ".join(r.stderr.split())
        assert r.exit_code == 0 and "the step worker 'nobody.s3' of step 's3'; 2 more: the step waits" in said, said
        assert "nobody.s4" not in said
    finally:
        procs.stop_all()


def test_cli_errors_are_one_line_without_a_traceback(tmp_path: Path) -> None:
    spec = tmp_path / "saga.yaml"
    spec.write_text(SAGA)
    (tmp_path / "file.sock").write_text("")
    os.mkfifo(tmp_path / "fifo.sock")
    for path, kind in [("file.sock", "a regular file"), ("fifo.sock", "a FIFO"), ("", "a directory")]:
        r = cli("runs", "--redis-url", f"unix://{tmp_path / path}")  # a socket path that is something else
        assert r.exit_code == 2 and f"is {kind}, not a Unix socket: give the path of the socket the server " \
            "listens on" in " ".join(r.stderr.split()), r.output
    for args, message in [
        (["runs", "--redis-url", "http://nope"], "unsupported Redis URL"),
        (["status", "x", "--redis-url", f"unix://{tmp_path}/none.sock"], "cannot reach Redis"),
        (["run", str(spec), "--detach"], "need --backend redis"),
        (["run", str(spec), "--backend", "redis", "--redis-url", f"unix://{tmp_path}/none.sock"], "cannot reach"),
        (["worker", "-w", "no_such_module_x", "--redis-url", f"unix://{tmp_path}/none.sock"], "cannot import"),
    ]:
        r = cli(*args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.stderr and "Traceback" not in r.output


def test_the_worker_command_in_burst_mode(url: str, prefix: str) -> None:
    async def submit() -> str:
        async with RedisClient(url, prefix=prefix) as client:
            return (await client.submit(compile_text(SAGA), {"script": {}})).run_id

    run_id = asyncio.run(submit())
    r = cli("worker", "--redis-url", url, "--prefix", prefix, "-w", "tests.runtime.workers", "--burst")
    assert r.exit_code == 0, r.output
    assert "2 step(s) run, 1 run(s) started" in r.stderr
    assert json.loads(cli("status", run_id, "--redis-url", url, "--prefix", prefix, "-f", "json").stdout)[
        "status"] == "completed"


# --- a worker that cannot serve: refused by Redis, stopped before connecting, a loop that fails ---------------


def test_a_worker_refused_by_redis_stops_with_a_configuration_error(url: str, prefix: str, tmp_path: Path) -> None:
    """A wrong user and password is Redis saying no, not an outage: no endless retrying."""
    from flowdsl.runtime.redis.connection import RedisConfigError

    wrong = url.replace("unix://", "unix://nobody:wrong@", 1)

    async def main() -> None:
        await asyncio.wait_for(worker_here(wrong, prefix).serve(), 10)

    with pytest.raises(RedisConfigError, match=r"refused the worker while connecting: AuthenticationError"):
        asyncio.run(main())


def test_a_worker_stopped_while_redis_is_unreachable_stops(prefix: str, tmp_path: Path) -> None:
    async def main() -> Any:
        worker = worker_here(f"unix://{tmp_path}/no-such.sock", prefix)
        task = asyncio.create_task(worker.serve())
        await asyncio.sleep(0.3)  # retrying the connection by now
        worker.stop()
        return await asyncio.wait_for(task, 5)

    stats = asyncio.run(main())
    assert stats.tasks == 0 and stats.failure is None


def test_a_worker_whose_loop_fails_says_why_and_stops(url: str, prefix: str, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    async def broken(self: RedisWorker) -> None:
        raise RuntimeError("the timer loop broke")

    monkeypatch.setattr(RedisWorker, "_timers", broken)

    async def main() -> Any:
        return await asyncio.wait_for(worker_here(url, prefix).serve(), 10)

    stats = asyncio.run(main())
    assert stats.failure == "its timers loop failed: RuntimeError: the timer loop broke"
    assert any(r.levelname == "CRITICAL" and "timer loop broke" in r.getMessage() for r in caplog.records)


def test_flowdsl_worker_exits_1_when_a_loop_failed(url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    from flowdsl.runtime.redis.commands import worker_command

    async def broken(self: RedisWorker) -> None:
        raise RuntimeError("the timer loop broke")

    monkeypatch.setattr(RedisWorker, "_timers", broken)
    out = io.StringIO()
    code = worker_command(url=url, prefix=prefix, modules=["tests.runtime.workers"],
                          options=WorkerOptions(handle_signals=False), console=Console(file=out, width=200))
    assert code == 1
    assert "stopped because its timers loop failed: RuntimeError: the timer loop broke" in out.getvalue()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_worker_error_with_a_lone_surrogate_or_a_sync_generator_exit_fails_its_step_and_the_run_compensates(
        url: str, prefix: str, mode: str) -> None:
    """The journal is written by orjson, which refuses lone surrogates: a worker's message holding one (a file
    name decoded with surrogateescape) is escaped first. A sync worker's GeneratorExit fails its step like any
    exception (thrown into the handler as is, it used to close the coroutines, its answer lost)."""
    name = b"report-\xff.csv".decode("utf-8", "surrogateescape")
    reg = WorkerRegistry()
    undone: list[str] = []

    async def ok(data: Any, ctx: Any) -> Any:
        return {"done": True}

    async def undo(data: Any, ctx: Any) -> Any:
        undone.append(ctx.idempotency_key)

    def closes(data: Any, ctx: Any) -> Any:
        raise GeneratorExit(f"closed {name}")

    async def closes_async(data: Any, ctx: Any) -> Any:
        raise GeneratorExit(f"closed {name}")

    reg.register("hw.ok", ok)
    reg.register("hw.undo", undo)
    reg.register("hw.closes", closes if mode == "sync" else closes_async)
    plan = compile_text("flowdsl: 1\nname: hostile\nsteps:\n  - hw.ok: {compensate: hw.undo}\n  - hw.closes\n")

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(plan, {})
            return await serving([worker_here(url, prefix, registry=reg)], lambda: client.follow(sub.run_id))

    result = asyncio.run(main())
    assert (result.status, result.compensated, result.failed_step) == ("compensated", ["ok"], "closes")
    assert result.error == {"type": "GeneratorExit", "message": "closed report-\\udcff.csv",
                            "types": ["GeneratorExit"]}
    assert len(undone) == 1


def test_the_signal_log_says_the_grace_as_given(caplog: pytest.LogCaptureFixture) -> None:
    """``--grace 0.5`` was logged as "up to 0 s"."""
    worker = RedisWorker("unix:///nowhere.sock", options=WorkerOptions(handle_signals=False, grace_s=0.5))
    with caplog.at_level("INFO", logger="flowdsl.redis"):
        worker._on_signal(signal.SIGTERM)
    assert "finishing in-flight steps (up to 0.5 s;" in caplog.text and worker._stopping


def test_a_graceful_stop_waits_for_the_loops_that_start_handlers_by_name() -> None:
    """``_shutdown`` took the loops by their place in the list: with the cancel reader added second, it waited for
    it and the heartbeat, not for the timers loop and the reclaimer — a timer fired during the stop could be cut
    short and fired again only after a lease."""
    async def main() -> list[str]:
        worker = RedisWorker("unix:///nowhere.sock", options=WorkerOptions(handle_signals=False, block_ms=100))

        async def ends_after(seconds: float) -> None:
            await asyncio.sleep(seconds)

        async def never_ends() -> None:
            await asyncio.Event().wait()

        ending = {"reader": 0, "cancel reader": 0, "heartbeat": 0, "timers": 0.3, "reclaimer": 0.3}
        names = ["reader", "cancel reader", "timers", "heartbeat", "reclaimer", "cancels", "tidier"]
        loops = [asyncio.create_task(ends_after(ending[name]) if name in ending else never_ends(), name=name)
                 for name in names]
        await asyncio.sleep(0)
        await worker._shutdown(loops)
        done = [task.get_name() for task in loops if task.done()]
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        return done

    assert asyncio.run(main()) == ["reader", "cancel reader", "timers", "heartbeat", "reclaimer"]
