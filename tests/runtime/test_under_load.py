"""The local runtime embedded in a service under load: many runs on one loop, a loop held up, a thread pool
that fills, run ids used twice at once, many plans (the audit of /tmp/audit_load/REPORT.md, F1 to F8).

Workers live in private registries; every run is bounded (``asyncio.wait_for`` / a ``HUNG`` wait), so a hang
fails its test instead of stopping the suite.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import pytest

import flowdsl
from flowdsl.runtime.local import LocalRun, run_flow
from flowdsl.workers import WorkerRegistry

#: seconds a test's runs may take before it calls them hung
HUNG = 20.0


def _blocker(reg: WorkerRegistry, seconds: float) -> dict[str, Any]:
    """A plan whose one async worker blocks the loop for ``seconds`` (CPU work written in an async worker: a
    mistake, but a common one), registered in ``reg``."""

    async def hog(data: Any, ctx: Any) -> dict[str, Any]:
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            pass
        return {}

    reg.register("hog", hog)
    return flowdsl.compile_text("flowdsl: 1\nname: hog\nsteps:\n  - hog: {timeout: 60s}\n")


def _charge_plan(timeout: str, retry: int = 1) -> dict[str, Any]:
    return flowdsl.compile_text(f"""flowdsl: 1
name: pay
steps:
  - charge:
      with: {{i: "${{ i }}"}}
      timeout: {timeout}
      retry: {retry}
      compensate: refund
""")


async def _with_a_stall(reg: WorkerRegistry, plan: dict[str, Any], runs: int, stall: float) -> list[Any]:
    """``runs`` runs of ``plan``; while their steps are in flight, another run blocks the loop for ``stall`` s."""
    started = [asyncio.create_task(run_flow(plan, {"i": i}, record=False, registry=reg, import_workers=False))
               for i in range(runs)]
    await asyncio.sleep(0.01)  # every charge is in flight now
    hog = asyncio.create_task(run_flow(_blocker(reg, stall), {}, record=False, registry=reg, import_workers=False))
    results = await asyncio.wait_for(asyncio.gather(*started), HUNG)
    assert (await asyncio.wait_for(hog, HUNG)).status == "completed"
    return results


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_a_loop_stall_does_not_let_deadlines_beat_answers_already_due(kind: str) -> None:
    """F1: steps whose work ended well before their 500 ms timeout complete after a 0.8 s stall of the loop,
    each charged once (retries on: the timeout winning charged twice), none undone, none needs_intervention.

    An async worker's sleep ends before the deadline, but its task wakes a turn after every timer due during
    the stall ran (the deadline fires late: it lets the loop turn first); a sync worker's thread returned before
    the deadline, its answer a turn away (the deadline waits for it)."""
    reg = WorkerRegistry()
    charges: collections.Counter[str] = collections.Counter()
    refunds: list[str] = []

    if kind == "async":
        async def charge(data: Any, ctx: Any) -> dict[str, Any]:
            await asyncio.sleep(0.05)
            charges[ctx.idempotency_key] += 1
            return {"charged": data["i"]}
    else:
        def charge(data: Any, ctx: Any) -> dict[str, Any]:  # type: ignore[misc]
            time.sleep(0.05)
            charges[ctx.idempotency_key] += 1
            return {"charged": data["i"]}

    async def refund(data: Any, ctx: Any) -> None:
        refunds.append(ctx.idempotency_key)

    reg.register("charge", charge)
    reg.register("refund", refund)
    results = asyncio.run(_with_a_stall(reg, _charge_plan("500ms", retry=3), 10, 0.8))
    assert collections.Counter(r.status for r in results) == {"completed": 10}, \
        [(r.status, r.error) for r in results if r.status != "completed"]
    assert all(r.context["charged"] == i for i, r in enumerate(results))
    assert len(charges) == 10 and set(charges.values()) == {1}
    assert refunds == []


def test_a_sync_worker_that_returned_after_its_deadline_during_a_stall_still_timed_out() -> None:
    """F1, kept precise: a sync worker's thread that returned after its deadline (0.6 s of work, a 300 ms timeout)
    timed out, stall or not — its answer, also waiting when the loop wakes, does not go first."""
    reg = WorkerRegistry()

    def slow(data: Any, ctx: Any) -> dict[str, Any]:
        time.sleep(0.6)
        return {}

    reg.register("slow", slow)
    plan = flowdsl.compile_text("flowdsl: 1\nname: slow\nsteps:\n  - slow: {timeout: 300ms}\n")
    results = asyncio.run(_with_a_stall(reg, plan, 3, 0.9))
    assert [r.status for r in results] == ["failed"] * 3
    assert all(r.error["type"] == "StepTimeout" for r in results)


def test_a_deadline_on_time_fires_at_once() -> None:
    """F1: without a stall, a timeout fires when due (no turn of the loop is added)."""
    reg = WorkerRegistry()

    async def hang(data: Any, ctx: Any) -> dict[str, Any]:
        await asyncio.sleep(30)
        return {}

    reg.register("hang", hang)
    plan = flowdsl.compile_text("flowdsl: 1\nname: hang\nsteps:\n  - hang: {timeout: 100ms}\n")

    async def main() -> tuple[Any, float]:
        began = time.perf_counter()
        result = await asyncio.wait_for(run_flow(plan, {}, record=False, registry=reg, import_workers=False), HUNG)
        return result, time.perf_counter() - began

    result, took = asyncio.run(main())
    assert result.status == "failed" and result.error["type"] == "StepTimeout"
    assert took < 1.0


def _own_pool(monkeypatch: pytest.MonkeyPatch, limit: int) -> Any:
    """A pool of sync worker threads of this test's own, of ``limit`` threads; returned."""
    import flowdsl.runtime.execute as execute

    pool = execute._DaemonThreads(limit=limit)
    monkeypatch.setattr(execute, "_threads", pool)
    return pool


def test_a_step_that_times_out_waiting_for_a_thread_says_it_was_never_called(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """F3: two threads, both held by attempts that timed out (their workers hang): another flow's quick sync step
    is never called, and its failure says so — it waited for a free thread, all of them busy with attempts given
    up on — rather than that the worker was slow; the pool's saturation is logged once, on flowdsl.threads."""
    _own_pool(monkeypatch, 2)
    go = __import__("threading").Event()
    quick_calls: list[str] = []
    reg = WorkerRegistry()

    def hung(data: Any, ctx: Any) -> dict[str, Any]:
        go.wait(HUNG)
        return {}

    def quick(data: Any, ctx: Any) -> dict[str, Any]:
        quick_calls.append(ctx.run_id)
        return {}

    reg.register("hung", hung)
    reg.register("quick", quick)
    stuck = flowdsl.compile_text("flowdsl: 1\nname: stuck\nsteps:\n  - hung: {timeout: 100ms}\n")
    good = flowdsl.compile_text("flowdsl: 1\nname: good\nsteps:\n  - quick: {timeout: 200ms, retry: 2}\n")

    async def main() -> tuple[list[Any], Any]:
        bad = await asyncio.wait_for(asyncio.gather(*(
            run_flow(stuck, {}, record=False, registry=reg, import_workers=False, late_grace=0) for _ in range(2))),
            HUNG)
        return bad, await asyncio.wait_for(run_flow(good, {}, record=False, registry=reg, import_workers=False), HUNG)

    caplog.set_level("WARNING", logger="flowdsl.threads")
    try:
        bad, result = asyncio.run(main())
    finally:
        go.set()
    assert [r.error["type"] for r in bad] == ["StepTimeout", "StepTimeout"]
    assert result.status == "failed" and quick_calls == []
    assert result.error["type"] == "StepTimeout"
    assert result.error["message"] == (
        "the attempt was never called: it waited for a free worker thread until its timeout (200 ms) passed — all "
        "of this process's 2 worker threads were busy, 2 of them with attempts that timed out or were cancelled and "
        "cannot be stopped ($FLOWDSL_THREADS sets how many there may be)")
    assert result.steps["quick"]["attempts"] == 2  # a retry is a StepTimeout's as ever
    said = [r.getMessage() for r in caplog.records if r.name == "flowdsl.threads"]
    assert len(said) == 1 and said[0].startswith("all 2 worker threads of this process are busy (2 of them")
    assert "FLOWDSL_THREADS" in said[0]


def _queued_sync_registry() -> tuple[WorkerRegistry, list[str], Any]:
    """Workers for a sync attempt left queued behind a busy thread: ``slow`` (sync) holds the pool's one thread
    until the returned event is set, ``queued`` (sync) notes its calls in the returned list, ``boom`` fails as soon
    as ``slow`` runs, ``undo`` undoes."""
    running = __import__("threading").Event()
    calls: list[str] = []
    reg = WorkerRegistry()

    def slow(data: Any, ctx: Any) -> dict[str, Any]:
        calls.append(ctx.step_id)
        running.set()
        time.sleep(0.3)
        return {}

    def queued(data: Any, ctx: Any) -> dict[str, Any]:
        calls.append(ctx.step_id)
        return {}

    async def boom(data: Any, ctx: Any) -> dict[str, Any]:
        while not running.is_set():
            await asyncio.sleep(0.005)
        raise RuntimeError("declined")

    async def undo(data: Any, ctx: Any) -> dict[str, Any]:
        calls.append(f"undo {ctx.step_id}")
        return {}

    for name, fn in {"slow": slow, "queued": queued, "boom": boom, "undo": undo}.items():
        reg.register(name, fn)
    return reg, calls, running


def test_a_sync_attempt_still_queued_for_a_thread_when_its_sibling_fails_is_never_called(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One thread, held by ``slow``: ``queued`` waits for it when ``boom`` fails the group. The kernel cancels the
    siblings: ``slow`` runs on (a thread cannot be stopped) and is awaited, ``queued`` is taken off the queue and
    never called — not called after the run decided to fail, then undone."""
    _own_pool(monkeypatch, 1)
    reg, calls, _ = _queued_sync_registry()
    plan = flowdsl.compile_text("flowdsl: 1\nname: q\nsteps:\n  - parallel: g\n    branches:\n      - slow\n"
                                "      - queued: {compensate: undo}\n      - boom\n")

    async def main() -> Any:
        result = await asyncio.wait_for(run_flow(plan, {}, record=False, registry=reg, import_workers=False), HUNG)
        await asyncio.sleep(0.4)  # (time for a queued job to have been called, had it been left queued)
        return result

    result = asyncio.run(main())
    assert calls == ["slow"]
    assert result.status == "failed" and result.compensated == []
    assert {k: v["status"] for k, v in result.steps.items()} == {
        "g": "failed", "slow": "succeeded", "queued": "cancelled", "boom": "failed"}


def test_a_sync_attempt_still_queued_for_a_thread_when_its_run_is_cancelled_is_never_called(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with a cancel of the run, from outside, while ``queued`` waits for the thread."""
    _own_pool(monkeypatch, 1)
    reg, calls, running = _queued_sync_registry()
    plan = flowdsl.compile_text("flowdsl: 1\nname: q\nsteps:\n  - parallel: g\n    branches:\n"
                                "      - slow: {compensate: undo}\n      - queued: {compensate: undo}\n")

    async def main() -> Any:
        run = LocalRun(plan, {}, record=False, registry=reg, import_workers=False)
        task = asyncio.ensure_future(run.run())
        while not running.is_set():
            await asyncio.sleep(0.005)
        run.cancel("enough")
        result = await asyncio.wait_for(task, HUNG)
        await asyncio.sleep(0.4)
        return result

    result = asyncio.run(main())
    assert calls == ["slow", "undo slow"]
    assert (result.status, result.compensated) == ("cancelled", ["slow"])
    assert result.steps["queued"]["status"] == "cancelled"


def test_the_thread_limit_is_set_by_flowdsl_threads() -> None:
    """F3: $FLOWDSL_THREADS sets how many worker threads a process may have; a bad value says what it takes."""
    from flowdsl.runtime.execute import THREADS, thread_limit

    assert thread_limit({}) == THREADS == 256
    assert thread_limit({"FLOWDSL_THREADS": " 1000 "}) == 1000
    for bad in ("0", "-3", "lots", "1e3", "10001"):
        with pytest.raises(ValueError, match=r"FLOWDSL_THREADS must be a whole number from 1 to 10000"):
            thread_limit({"FLOWDSL_THREADS": bad})


# --- F8: one run id, two runs at once ----------------------------------------------------------------------------


@pytest.mark.parametrize("record", [False, True])
def test_a_run_id_in_use_by_a_run_in_progress_is_refused(tmp_path: Any, record: bool) -> None:
    """F8: two orders started with one explicit run id at once would hand the gateway one idempotency key: the
    second is refused (records on or off), nothing of it runs; once the first has ended, the id is free again
    (without records: with them, its record holds it)."""
    from flowdsl.runtime.local import RunIdInUse

    reg = WorkerRegistry()
    keys: collections.Counter[str] = collections.Counter()

    async def charge(data: Any, ctx: Any) -> dict[str, Any]:
        keys[ctx.idempotency_key] += 1
        await asyncio.sleep(0.05)
        return {"charged": data["amount"]}

    reg.register("charge", charge)
    plan = flowdsl.compile_text('flowdsl: 1\nname: s\nsteps:\n  - charge: {with: {amount: "${ amount }"}}\n')
    options: dict[str, Any] = {"run_id": "order-42", "record": record, "runs_dir": tmp_path, "registry": reg,
                               "import_workers": False}

    async def main() -> list[Any]:
        first = asyncio.create_task(run_flow(plan, {"amount": 10}, **options))
        await asyncio.sleep(0.01)
        with pytest.raises(RunIdInUse, match=r"^run id 'order-42' is in use by a run in progress in this process: "
                                             r"two runs of one id would hand their workers the same idempotency"):
            LocalRun(plan, {"amount": 99}, **options)
        second = await asyncio.gather(run_flow(plan, {"amount": 99}, **options), return_exceptions=True)
        return [await asyncio.wait_for(first, HUNG), *second]

    done, refused = asyncio.run(main())
    assert (done.status, done.context["charged"]) == ("completed", 10)
    assert isinstance(refused, RunIdInUse) and isinstance(refused, ValueError)
    assert keys == {"order-42/charge": 1}
    if not record:
        again = asyncio.run(run_flow(plan, {"amount": 5}, **options))
        assert again.status == "completed"


def test_a_run_id_is_taken_once_across_threads() -> None:
    """F8: flowdsl.run() from several threads at once with one run id: one runs, the others are refused."""
    import threading

    reg = WorkerRegistry()

    def slow(data: Any, ctx: Any) -> dict[str, Any]:
        time.sleep(0.2)
        return {}

    reg.register("slow", slow)
    plan = flowdsl.compile_text("flowdsl: 1\nname: t\nsteps:\n  - slow\n")
    outcomes: list[str] = []

    def one() -> None:
        try:
            outcomes.append(flowdsl.run(plan, {}, run_id="same", record=False, registry=reg,
                                        import_workers=False).status)
        except ValueError as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HUNG)
    assert sorted(outcomes) == ["RunIdInUse"] * 5 + ["completed"]


# --- F4, F5: many plans, several threads --------------------------------------------------------------------------


def _plans(count: int, steps: int = 3) -> list[dict[str, Any]]:
    """``count`` distinct plans of ``steps`` steps, compiled elsewhere as far as this process knows (JSON copies)."""
    import json

    from flowdsl.runtime import plancheck

    body = "".join(f"  - s{i}: {{worker: w}}\n" for i in range(steps))
    plans = [json.loads(json.dumps(flowdsl.compile_text(f"flowdsl: 1\nname: f{k}\nsteps:\n{body}")))
             for k in range(count)]
    plancheck._GOOD.clear()  # (their contents as if compiled in another process)
    return plans


def test_a_service_of_hundreds_of_plans_checks_each_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """F4: 300 plans used in turn, twice: each is checked once, not at every use (the memory of checked plans held
    32, so every run start of a service with more flows checked its plan in full again)."""
    from flowdsl.runtime import plancheck

    plans = _plans(300)
    checked: list[int] = []
    whole = plancheck.plan_problem

    def counted(plan: Any) -> str | None:
        checked.append(id(plan))
        return whole(plan)

    monkeypatch.setattr(plancheck, "plan_problem", counted)
    for _ in range(2):
        for plan in plans:
            plancheck.check_plan(plan)
    assert len(checked) == 300 == len(set(checked))
    monkeypatch.setattr(plancheck, "_CHECKED", type(plancheck._CHECKED)())  # forgotten by identity: by content
    for plan in plans:
        plancheck.check_plan(plan)
    assert len(checked) == 300


def test_a_run_builds_its_plan_s_kernel_indexes_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """F4: 100 runs at once of 100 distinct plans (more than the kernel keeps indexes of, 64): each run builds its
    plan's indexes once or twice (as it starts, and maybe for its result), not once per event."""
    import flowdsl.kernel_program as kernel_program

    reg = WorkerRegistry()

    async def w(data: Any, ctx: Any) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        return {}

    reg.register("w", w)
    plans = _plans(100, steps=6)
    built: list[int] = []
    original = kernel_program.Program

    class Counted(original):  # type: ignore[misc,valid-type]
        def __init__(self, plan: dict[str, Any]):
            built.append(id(plan))
            super().__init__(plan)

    monkeypatch.setattr(kernel_program, "Program", Counted)

    async def main() -> list[Any]:
        return list(await asyncio.wait_for(asyncio.gather(*(
            run_flow(plan, {}, record=False, registry=reg, import_workers=False) for plan in plans)), HUNG))

    results = asyncio.run(main())
    assert {r.status for r in results} == {"completed"}
    events = sum(len(r.events) for r in results)
    assert events > 1000 and len(built) <= 2 * len(plans), (len(built), events)


def test_plans_are_checked_safely_from_many_threads() -> None:
    """F5: eight threads checking 300 plans in turn (threads switched every microsecond): no KeyError, no
    'dictionary changed size during iteration' out of the memory of checked plans."""
    import sys
    import threading

    from flowdsl.runtime import plancheck

    monkey_size = plancheck._CHECKED_SIZE
    plans = _plans(300, steps=1)
    errors: collections.Counter[str] = collections.Counter()

    def hammer(t: int) -> None:
        for i in range(3000):
            try:
                plancheck.check_plan(plans[(i * 31 + t * 17) % len(plans)])
            except Exception as exc:
                errors[f"{type(exc).__name__}: {exc}"] += 1

    interval = sys.getswitchinterval()
    plancheck._CHECKED_SIZE = 64  # (evictions all along)
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=hammer, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(HUNG)
    finally:
        sys.setswitchinterval(interval)
        plancheck._CHECKED_SIZE = monkey_size
    assert not errors


# --- F7: the loop shutting down with runs in flight ----------------------------------------------------------------


def test_a_loop_shutting_down_with_runs_in_flight_records_only_what_happened(tmp_path: Any) -> None:
    """F7: asyncio.run() returning while runs are in flight cancels every task, attempts and runs in no set order;
    an attempt cancelled so is not fed as a failure of its step (TaskCancelled) with an undo started on a dying
    loop: each record ends with the run stopped at once while running, its step in flight, nothing undone."""
    import json
    import logging

    reg = WorkerRegistry()
    refunds: list[str] = []

    async def charge(data: Any, ctx: Any) -> dict[str, Any]:
        return {}

    async def ship(data: Any, ctx: Any) -> dict[str, Any]:
        await asyncio.sleep(5)
        return {}

    async def refund(data: Any, ctx: Any) -> None:
        refunds.append(ctx.idempotency_key)

    for name, fn in (("charge", charge), ("ship", ship), ("refund", refund)):
        reg.register(name, fn)
    plan = flowdsl.compile_text("""flowdsl: 1
name: shut
steps:
  - charge: {compensate: refund}
  - ship: {timeout: 10s, compensate: refund}
""")

    async def service() -> None:
        left = [asyncio.create_task(run_flow(plan, {}, run_id=f"sd{i}", runs_dir=tmp_path, registry=reg,
                                             import_workers=False)) for i in range(10)]
        await asyncio.sleep(0.2)  # every charge done, every ship in flight: then the service returns
        assert not any(task.done() for task in left)

    logging.getLogger("flowdsl.local").disabled = True  # (the warnings each stopped run logs)
    try:
        asyncio.run(service())
    finally:
        logging.getLogger("flowdsl.local").disabled = False
    assert refunds == []
    for i in range(10):
        lines = [json.loads(line) for line in (tmp_path / f"sd{i}.jsonl").read_text().splitlines()]
        kinds = [line["type"] for line in lines]
        assert kinds[-2:] == ["step_scheduled", "runtime_aborted"], (i, kinds)
        assert lines[-1]["status"] == "running" and lines[-1]["reason"] == "the task running it was cancelled"
        assert "step_failed" not in kinds and "compensation_started" not in kinds


# --- F6: file descriptors of recorded runs --------------------------------------------------------------------------


def _open_fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_a_recorded_run_in_flight_holds_one_file_descriptor(tmp_path: Any) -> None:
    """F6: 200 recorded runs in flight hold a descriptor each (their record), plus one reserve for the directory —
    not two each (a reserve per run: 1,000 recorded runs at once did not fit `ulimit -n 1024`)."""
    reg = WorkerRegistry()
    counts: list[int] = []

    async def wait(data: Any, ctx: Any) -> dict[str, Any]:
        await asyncio.sleep(0.3)
        return {}

    reg.register("wait", wait)
    plan = flowdsl.compile_text("flowdsl: 1\nname: fds\nsteps:\n  - wait\n")

    async def main() -> list[Any]:
        base = _open_fds()
        runs = [asyncio.create_task(run_flow(plan, {}, runs_dir=tmp_path, registry=reg, import_workers=False))
                for _ in range(200)]
        await asyncio.sleep(0.15)
        counts.append(_open_fds() - base)
        return list(await asyncio.wait_for(asyncio.gather(*runs), HUNG))

    results = asyncio.run(main())
    assert {r.status for r in results} == {"completed"}
    assert 200 <= counts[0] <= 210, counts


def test_a_record_that_cannot_be_opened_for_want_of_descriptors_says_what_to_do(tmp_path: Any) -> None:
    """F6: out of file descriptors, a recorded run does not start, and says why and what to do."""
    import contextlib
    import os
    import resource

    from flowdsl.runtime.record import RecordWriteError

    reg = WorkerRegistry()

    async def quick(data: Any, ctx: Any) -> dict[str, Any]:
        return {}

    reg.register("quick", quick)
    plan = flowdsl.compile_text("flowdsl: 1\nname: few\nsteps:\n  - quick\n")

    async def main() -> Any:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (_open_fds() + 8, hard))
        held: list[int] = []
        try:
            with contextlib.suppress(OSError):  # every descriptor left taken
                while len(held) < 10_000:
                    held.append(os.open(os.devnull, os.O_RDONLY))
            return (await asyncio.gather(run_flow(plan, {}, runs_dir=tmp_path, registry=reg, import_workers=False),
                                         return_exceptions=True))[0]
        finally:
            for fd in held:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    refused = asyncio.run(main())
    assert isinstance(refused, RecordWriteError), refused
    assert "Too many open files; the run did not start (each recorded run in progress holds a file descriptor, " \
           "its record: raise the limit on open files — `ulimit -n`, now " in str(refused)
    assert str(refused).endswith("—, or run with record=False)")


def test_the_records_of_one_directory_share_one_reserve(tmp_path: Any) -> None:
    """F6: the room kept for the line saying a record's write failed is one file per directory, shared; a record
    whose write failed frees it for them all, and the next record opened there makes a new one."""
    from flowdsl.runtime.record import RunRecorder

    first, second = RunRecorder("r1", tmp_path), RunRecorder("r2", tmp_path)
    shared = first._reserve
    assert shared is second._reserve and shared is not None
    if shared.fd is None:
        pytest.skip("this file system keeps no reserve (no O_TMPFILE)")
    first.close()
    assert shared.fd is not None  # the other record still uses it
    second.stop({"type": "record_failed"})  # (as after a write that failed)
    assert shared.fd is None
    third = RunRecorder("r3", tmp_path)
    assert third._reserve is not shared and third._reserve is not None and third._reserve.fd is not None
    third.close()
    assert third._reserve is None
