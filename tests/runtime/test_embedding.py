"""The local runtime embedded in an application: run ids under load, worker results kept apart from the
run, exceptions asyncio handles specially, record writes that fail, cancelling before the start, the
application's SIGINT handler, a running event loop and ``sys.path``.

Workers live in a private registry (``registry=``), so nothing here leaks into the process-wide one.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import errno
import gc
import json
import logging
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import flowdsl
from flowdsl import compile_text
from flowdsl.cli import app
from flowdsl.kernel import replay
from flowdsl.runtime import record as record_module
from flowdsl.runtime.execute import NotJSON, json_problem, plain_json
from flowdsl.runtime.local import RECORDED_INPUTS, LocalRun, RunAborted, new_run_id, run_flow, run_on_new_loop
from flowdsl.runtime.rebuild import result_from_record
from flowdsl.runtime.record import RunRecorder, check_run_id, read_record
from flowdsl.runtime.report import NOT_STARTED
from flowdsl.workers import WorkerRegistry

#: seconds a run may take before a test calls it hung (every run here takes milliseconds)
HUNG = 10.0


def registry(**workers: Callable[..., Any]) -> WorkerRegistry:
    reg = WorkerRegistry()
    for name, fn in workers.items():
        reg.register(name, fn)
    return reg


def flow(steps: str, name: str = "emb") -> dict[str, Any]:
    return compile_text(f"flowdsl: 1\nname: {name}\nsteps:\n{steps}")


async def bounded(plan: dict[str, Any], reg: WorkerRegistry, run_input: dict[str, Any] | None = None,
                  **options: Any) -> Any:
    """Run to its end — or fail the test, rather than hang it, when the run never ends."""
    options.setdefault("record", False)
    return await asyncio.wait_for(run_flow(plan, run_input or {}, registry=reg, import_workers=False, **options),
                                  HUNG)


def replayed_context(path: Path) -> Any:
    header, lines = read_record(path)
    assert header is not None
    state, _, _ = replay(header["plan"], [e for e in lines if e["type"] in RECORDED_INPUTS])
    return state["context"]


# --- 1. run ids -----------------------------------------------------------------------------------------


def test_default_run_ids_stay_apart_however_many_start_in_one_second() -> None:
    """A run id prefixes every idempotency key: 50,000 ids (a few seconds' worth, at most) are all distinct
    — 24 random bits would give about 75 pairs — and each is a valid run id naming its flow."""
    plan = flow("  - a\n", name="pay")
    ids = [new_run_id(plan) for _ in range(50_000)]
    assert len(set(ids)) == len(ids)
    for run_id in ids[:100]:
        assert check_run_id(run_id) == run_id
        assert re.fullmatch(r"pay-\d{8}T\d{6}-[0-9a-f]{16}", run_id), run_id


def test_the_redis_client_names_runs_as_the_local_runtime_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """One function gives both runtimes' default run ids (checked without a server: the submission is refused
    for its retention, after the id is chosen and before Redis is asked anything)."""
    from flowdsl.runtime.redis import client as client_module
    from flowdsl.runtime.redis.client import RedisClient

    assert client_module.new_run_id is record_module.new_run_id
    asked: list[str] = []

    def fake(plan: Any) -> str:
        asked.append(plan["flow"]["name"])
        return "from-new-run-id"

    monkeypatch.setattr(client_module, "new_run_id", fake)

    async def submit() -> None:
        client = RedisClient("unix:///nonexistent/flowdsl-test.sock")
        with pytest.raises(ValueError, match="retention_s"):
            await client.submit(flow("  - a\n", name="pay"), {}, retention_s=-1)

    asyncio.run(submit())
    assert asked == ["pay"]


# --- 2. StopIteration and its kin ---------------------------------------------------------------------------


def _raiser(exc: type[BaseException], mode: str) -> Callable[..., Any]:
    if mode == "sync":
        def sync_worker(data: Any, ctx: Any) -> Any:
            raise exc()
        return sync_worker
    if mode == "async":
        async def async_worker(data: Any, ctx: Any) -> Any:
            raise exc()
        return async_worker

    async def waiting_worker(data: Any, ctx: Any) -> Any:
        await asyncio.sleep(0)
        raise exc()
    return waiting_worker


@pytest.mark.parametrize(("exc", "mode", "recorded"), [
    (StopIteration, "sync", "StopIteration"),
    (StopAsyncIteration, "sync", "StopAsyncIteration"),
    (StopAsyncIteration, "async", "StopAsyncIteration"),
    (StopAsyncIteration, "async-after-await", "StopAsyncIteration"),
    # in a coroutine Python itself turns StopIteration into RuntimeError (PEP 479): that is what it raised
    (StopIteration, "async", "RuntimeError"),
    (StopIteration, "async-after-await", "RuntimeError"),
])
def test_a_worker_raising_stop_iteration_fails_its_step_which_is_retried_then_compensated(
        exc: type[BaseException], mode: str, recorded: str) -> None:
    """asyncio refuses a StopIteration on a future: a sync worker's used to hang the run forever."""
    log: list[str] = []

    async def charge(data: Any, ctx: Any) -> Any:
        log.append("charge")

    async def refund(data: Any, ctx: Any) -> Any:
        log.append("refund")

    reg = registry(charge=charge, refund=refund, pick=_raiser(exc, mode))
    retry = f"{{attempts: 2, initial: 1ms, on: [{recorded}]}}"
    plan = flow(f"  - charge: {{compensate: refund}}\n  - pick: {{retry: {retry}}}\n")
    result = asyncio.run(bounded(plan, reg))
    assert result.status == "compensated" and result.failed_step == "pick"
    assert result.error["type"] == recorded
    assert result.steps["pick"]["attempts"] == 2
    assert log == ["charge", "refund"]


# --- 3. a record that cannot be written --------------------------------------------------------------------


def _failing(monkeypatch: pytest.MonkeyPatch, method: str, after: int) -> None:
    """``RunRecorder.<method>`` fails with ENOSPC from its ``after``-th call on a record (a disk that fills up)."""
    real = getattr(RunRecorder, method)
    calls = collections.Counter[Path]()

    def fails(self: RunRecorder, *args: Any) -> Any:
        calls[self.path] += 1
        if calls[self.path] > after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args)

    monkeypatch.setattr(RunRecorder, method, fails)


def _saga_workers(log: list[str]) -> WorkerRegistry:
    async def charge(data: Any, ctx: Any) -> Any:
        log.append("charge")
        return {"charged": True}

    async def refund(data: Any, ctx: Any) -> Any:
        log.append("refund")

    async def pack(data: Any, ctx: Any) -> Any:
        await asyncio.sleep(0.001)
        log.append("pack")
        return {"blob": "x" * 1000}

    async def ship(data: Any, ctx: Any) -> Any:
        await asyncio.sleep(0.001)
        log.append("ship")
        raise ConnectionError("carrier down")

    return registry(charge=charge, refund=refund, pack=pack, ship=ship)


SAGA = "  - charge: {compensate: refund}\n  - pack\n  - ship\n"


@pytest.mark.parametrize(("method", "after"), [("write_many", 3), ("write_many", 5), ("flush", 3)])
def test_a_record_that_cannot_be_written_mid_run_neither_hangs_the_run_nor_loses_its_saga(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, method: str,
        after: int) -> None:
    """The state has moved on when a write fails: the commands of that decision are carried out, the run goes on
    unrecorded to its end — here compensating — and the result, a warning and a notice say why the record is
    incomplete; what was written still shows."""
    _failing(monkeypatch, method, after)
    log: list[str] = []
    notices: list[str] = []
    with caplog.at_level(logging.WARNING, logger="flowdsl"):
        result = asyncio.run(bounded(flow(SAGA), _saga_workers(log), record=True, runs_dir=tmp_path,
                                     run_id="full", on_notice=notices.append))
    assert (result.status, result.compensated, log) == ("compensated", ["charge"], ["charge", "pack", "ship",
                                                                                    "refund"])
    assert result.record_error is not None and "No space left on device" in result.record_error
    assert result.to_json()["record_error"] == result.record_error
    assert any("No space left on device" in r.getMessage() and "full" in r.getMessage() for r in caplog.records)
    assert notices and "unrecorded" in notices[0]
    header, lines = read_record(tmp_path / "full.jsonl")
    shown = result_from_record(header, lines, tmp_path / "full.jsonl")
    assert shown.status == "running" and shown.run_id == "full"
    r = CliRunner().invoke(app, ["show", "full", "--runs-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output


def test_the_summary_and_the_json_object_say_the_record_is_incomplete(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from flowdsl.runtime.summary import print_summary

    _failing(monkeypatch, "write_many", 3)
    result = asyncio.run(bounded(flow(SAGA), _saga_workers([]), record=True, runs_dir=tmp_path, run_id="sum"))
    console = Console(record=True, width=200)
    print_summary(result, console)
    assert "the record is incomplete: writing the record failed (No space left on device)" in console.export_text()
    assert json.loads(json.dumps(result.to_json()))["record_error"] == result.record_error
    monkeypatch.undo()
    clean = asyncio.run(bounded(flow(SAGA), _saga_workers([]), record=True, runs_dir=tmp_path, run_id="whole"))
    assert clean.record_error is None and clean.to_json()["record_error"] is None


def test_flowdsl_run_says_the_record_is_incomplete_in_its_summary_and_its_json_object(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = tmp_path / "flow.yaml"
    spec.write_text("flowdsl: 1\nname: cli\nworkers: [tests.runtime.workers]\nsteps:\n"
                    "  - conf.a: {compensate: undo.a}\n  - conf.b\n")
    script = json.dumps({"b": {"sleep": 0.001, "raise": "Boom"}})
    _failing(monkeypatch, "write_many", 3)
    text = CliRunner().invoke(app, ["run", str(spec), "--set", f"script={script}", "--runs-dir", str(tmp_path),
                                    "--run-id", "cli-text"])
    assert text.exit_code == 1 and "compensated, in this order: a (undo.a)" in text.stderr
    assert "the record is incomplete: writing the record failed (No space left on device)" in text.stderr
    as_json = CliRunner().invoke(app, ["run", str(spec), "--set", f"script={script}", "--runs-dir", str(tmp_path),
                                       "--run-id", "cli-json", "--format", "json"])
    out = json.loads(as_json.stdout)
    assert (as_json.exit_code, out["status"], out["compensated"]) == (1, "compensated", ["a"])
    assert "No space left on device" in out["record_error"]


def test_a_record_whose_first_lines_cannot_be_written_stops_the_run_before_anything_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _failing(monkeypatch, "flush", 0)
    log: list[str] = []
    with pytest.raises(OSError, match=r"cannot write the run record .*first\.jsonl: No space left on device; the "
                                      r"run did not start"):
        asyncio.run(bounded(flow(SAGA), _saga_workers(log), record=True, runs_dir=tmp_path, run_id="first"))
    assert log == [] and not (tmp_path / "first.jsonl").exists()


# --- 4. results are copied ----------------------------------------------------------------------------------


class Colour(str, enum.Enum):  # noqa: UP042 — the mixin kind, whose str() is 'Colour.RED', not its value
    RED = "red"


class Size(enum.IntEnum):
    L = 3


class Tag(str):
    pass


def test_a_result_the_worker_keeps_and_changes_later_does_not_change_the_run(tmp_path: Path) -> None:
    """A worker handing out a cached object: the cache refreshed meanwhile must change neither the live run (its
    context, its next step's input) nor what its record replays to."""
    cache = {"sku1": {"price": 10}}

    async def get_price(data: Any, ctx: Any) -> Any:
        return {"pricing": cache["sku1"]}

    async def refresh(data: Any, ctx: Any) -> Any:
        cache["sku1"]["price"] = 999
        await asyncio.sleep(0)

    async def charge(data: Any, ctx: Any) -> Any:
        return {"charged": data["pricing"]["price"]}

    reg = registry(get_price=get_price, refresh=refresh, charge=charge)
    result = asyncio.run(bounded(flow("  - get_price\n  - refresh\n  - charge\n"), reg, record=True,
                                 runs_dir=tmp_path, run_id="alias"))
    assert result.context == {"pricing": {"price": 10}, "charged": 10}
    assert replayed_context(tmp_path / "alias.jsonl") == result.context


def test_runs_returning_one_shared_object_share_nothing() -> None:
    shared = {"config": {"limits": [1, 2]}}

    async def load(data: Any, ctx: Any) -> Any:
        return shared

    reg = registry(load=load)
    plan = flow("  - load\n")

    async def two() -> list[Any]:
        return list(await asyncio.gather(bounded(plan, reg), bounded(plan, reg)))

    first, second = asyncio.run(two())
    assert first.context == second.context == shared
    assert first.context["config"] is not second.context["config"] is not shared["config"]
    first.context["config"]["limits"].append(3)
    assert shared == {"config": {"limits": [1, 2]}} and second.context["config"]["limits"] == [1, 2]


@pytest.mark.parametrize("size", [1, 40])
def test_results_and_the_run_input_hold_plain_json_types_whatever_their_size(size: int) -> None:
    """str enums, IntEnums, str subclasses and dict subclasses become plain str, int and dict — in small
    containers (copied in Python) as in large ones."""
    fancy = {"colour": Colour.RED, "size": Size.L, "tag": Tag("t"), Tag("key"): 1,
             "nested": collections.OrderedDict(a=[Colour.RED, Size.L])}
    fancy.update({f"pad{i}": i for i in range(size)})

    async def fancy_worker(data: Any, ctx: Any) -> Any:
        return {"out": dict(fancy)}

    result = asyncio.run(bounded(flow("  - fancy\n"), registry(fancy=fancy_worker), {"given": dict(fancy)}))

    def plain(value: Any) -> None:
        assert type(value) in (dict, list, str, int, float, bool, type(None)), (type(value), value)
        for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
            plain(item)
        if isinstance(value, dict):
            assert all(type(k) is str for k in value)

    for value in (result.context["out"], result.context["given"]):
        plain(value)
        assert value["colour"] == "red" and value["size"] == 3 and value["tag"] == "t" and value["key"] == 1
        assert value["nested"] == {"a": ["red", 3]}


@pytest.mark.parametrize("bad", [
    {"a": {1, 2}}, {"a": float("nan")}, {"a": [1, (2, 3)]}, {1: "a"}, {"a": "\udc80"}, {"\ud800": 1},
    {"a": {"b": [Colour, 1]}}, [1, [2, [3, b"x"]]],
])
def test_plain_json_refuses_what_json_problem_refuses_saying_the_same(bad: Any) -> None:
    with pytest.raises(NotJSON) as caught:
        plain_json(bad)
    assert str(caught.value) == json_problem(bad)


def test_plain_json_refuses_data_nested_too_deep_and_copies_what_is_fine() -> None:
    deep: Any = {}
    for _ in range(250):
        deep = {"d": deep}
    with pytest.raises(NotJSON, match="nests deeper than 200 levels"):
        plain_json(deep)
    data = {"a": [1, 2.5, True, None, "ü", {"b": []}], "big": 2**80}
    copied = plain_json(data)
    assert copied == data and copied is not data and copied["a"] is not data["a"]


# --- 5. cancelling and aborting before the start --------------------------------------------------------------


def _cancel_workers(log: list[str]) -> WorkerRegistry:
    async def step(data: Any, ctx: Any) -> Any:
        log.append(ctx.step_id)

    def sync_step(data: Any, ctx: Any) -> Any:
        log.append(ctx.step_id)

    return registry(step=step, sync_step=sync_step)


CANCEL_FLOW = ("  - parallel: first\n    branches:\n      - a: {worker: step, compensate: step}\n"
               "      - b: {worker: sync_step}\n  - c: {worker: step}\n")


@pytest.mark.parametrize("when", ["before run()", "before the task starts"])
def test_cancel_before_the_run_starts_runs_nothing_and_ends_cancelled(tmp_path: Path, when: str) -> None:
    log: list[str] = []
    lr = LocalRun(flow(CANCEL_FLOW), {}, registry=_cancel_workers(log), import_workers=False, runs_dir=tmp_path,
                  run_id="early")

    async def main() -> Any:
        if when == "before run()":
            lr.cancel("the user changed their mind")
            return await asyncio.wait_for(lr.run(), HUNG)
        task = asyncio.create_task(lr.run())
        lr.cancel("the user changed their mind")
        return await asyncio.wait_for(task, HUNG)

    result = asyncio.run(main())
    assert result.status == "cancelled" and log == []
    assert result.error == {"type": "Cancelled", "message": "the user changed their mind"}
    assert {key: row["status"] for key, row in result.steps.items() if row["kind"] == "task"} == {
        "a": "cancelled", "b": "cancelled", "c": "pending"}
    assert replayed_context(tmp_path / "early.jsonl") == result.context  # the record replays


@pytest.mark.parametrize("when", ["before run()", "before the task starts"])
def test_abort_before_the_run_starts_raises_run_aborted_and_runs_and_records_nothing(tmp_path: Path,
                                                                                     when: str) -> None:
    log: list[str] = []
    lr = LocalRun(flow(CANCEL_FLOW), {}, registry=_cancel_workers(log), import_workers=False, runs_dir=tmp_path,
                  run_id="gone")

    async def main() -> Any:
        if when == "before run()":
            lr.cancel("first a cancel")
            lr.abort("shutting down")
            return await asyncio.wait_for(lr.run(), HUNG)
        task = asyncio.create_task(lr.run())
        lr.abort("shutting down")
        return await asyncio.wait_for(task, HUNG)

    with pytest.raises(RunAborted, match="run gone was aborted before it started: nothing ran") as caught:
        asyncio.run(main())
    assert (caught.value.status, caught.value.record) == (NOT_STARTED, None)
    assert log == [] and not (tmp_path / "gone.jsonl").exists()
    lr.cancel()
    lr.abort()  # over: ignored


# --- 6. the application's SIGINT handler ------------------------------------------------------------------------


def test_run_puts_back_the_applications_own_sigint_handler() -> None:
    calls: list[int] = []

    def app_handler(signum: int, frame: Any) -> None:
        calls.append(signum)

    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, app_handler)
    try:
        async def a(data: Any, ctx: Any) -> Any:
            return {}

        result = flowdsl.run(flow("  - a\n"), {}, record=False, registry=registry(a=a), import_workers=False)
        assert result.status == "completed"
        assert signal.getsignal(signal.SIGINT) is app_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_loops_own_sigint_handler_survives_a_run_that_handled_sigint() -> None:
    """A server's handler added with loop.add_signal_handler is still there, and still called, after a run."""

    async def a(data: Any, ctx: Any) -> Any:
        return {}

    async def server() -> None:
        loop = asyncio.get_running_loop()
        called = asyncio.Event()
        loop.add_signal_handler(signal.SIGINT, called.set)
        try:
            result = await bounded(flow("  - a\n"), registry(a=a), handle_sigint=True)
            assert result.status == "completed"
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.wait_for(called.wait(), HUNG)
        except KeyboardInterrupt:
            pytest.fail("the loop's SIGINT handler was dropped: Ctrl-C raised KeyboardInterrupt")
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    try:
        asyncio.run(server())
    finally:
        signal.signal(signal.SIGINT, before)


def test_runs_taking_ctrl_c_on_one_loop_hand_it_back_in_turn_and_the_last_puts_back_what_was_there() -> None:
    """Two runs with handle_sigint on one loop, the first to start ending first: while the second runs, Ctrl-C
    is the second's (not the ended run's); after both, Ctrl-C is what it was before them."""

    async def quick(data: Any, ctx: Any) -> Any:
        return {}

    async def slow(data: Any, ctx: Any) -> Any:
        await asyncio.sleep(0.3)
        return {}

    reg = registry(quick=quick, slow=slow)

    async def main() -> tuple[str, str]:
        first = asyncio.create_task(bounded(flow("  - quick\n"), reg, handle_sigint=True))
        second = asyncio.create_task(bounded(flow("  - slow\n"), reg, handle_sigint=True))
        assert (await first).status == "completed"
        os.kill(os.getpid(), signal.SIGINT)  # the second run's Ctrl-C: it is cancelled
        cancelled = (await second).status
        return cancelled, str(getattr(asyncio.get_running_loop(), "_signal_handlers", {}).get(signal.SIGINT))

    before = signal.getsignal(signal.SIGINT)
    try:
        cancelled, left = asyncio.run(main())
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, before)
    assert (cancelled, left) == ("cancelled", "None")


# --- 7. smaller things ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["async", "async-after-await", "sync"])
def test_a_worker_raising_cancelled_error_itself_is_its_failure_and_says_whose(mode: str) -> None:
    reg = registry(a=_raiser(asyncio.CancelledError, mode))
    result = asyncio.run(bounded(flow("  - a\n"), reg))
    assert result.status == "failed"
    assert result.error["type"] == "CancelledError"
    assert "the worker raised CancelledError itself; the runtime did not cancel the attempt" in \
        result.error["message"]


def test_run_inside_a_running_event_loop_names_run_flow_and_leaves_no_warning() -> None:
    async def a(data: Any, ctx: Any) -> Any:
        return {}

    async def handler() -> None:
        with pytest.raises(RuntimeError, match=r"running event loop.*await flowdsl\.run_flow\("):
            flowdsl.run(flow("  - a\n"), {}, record=False, registry=registry(a=a), import_workers=False)
        with pytest.raises(RuntimeError, match=r"cannot be called from a running event loop"):  # (what it runs on)
            run_on_new_loop(flowdsl.run_flow(flow("  - a\n"), {}, record=False, registry=registry(a=a),
                                             import_workers=False))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(handler())
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]


def test_show_of_a_record_holding_only_its_header_says_the_run_had_not_started(tmp_path: Path) -> None:
    async def a(data: Any, ctx: Any) -> Any:
        return {}

    asyncio.run(bounded(flow("  - a\n  - b: {worker: a}\n"), registry(a=a), record=True, runs_dir=tmp_path,
                        run_id="hdr"))
    record = tmp_path / "hdr.jsonl"
    record.write_bytes(record.read_bytes().splitlines(keepends=True)[0])
    shown = CliRunner().invoke(app, ["show", "hdr", "--runs-dir", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    assert "the record ends before the run started" in shown.stdout
    as_json = CliRunner().invoke(app, ["show", "hdr", "--runs-dir", str(tmp_path), "--format", "json"])
    out = json.loads(as_json.stdout)
    assert (as_json.exit_code, out["run_id"], out["status"], out["events"]) == (0, "hdr", NOT_STARTED, [])
    assert {key: row["status"] for key, row in out["steps"].items()} == {"a": "pending", "b": "pending"}


def test_running_a_plan_leaves_sys_path_as_it_was_unless_a_worker_module_came_from_the_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd(), str(tmp_path))])
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)

    async def a(data: Any, ctx: Any) -> Any:
        return {}

    reg = registry(a=a)
    flowdsl.run(flow("  - a\n"), {}, record=False, registry=reg)
    assert sys.path == before
    flowdsl.run(compile_text("flowdsl: 1\nname: emb\nworkers: [json]\nsteps: [a]\n"), {}, record=False,
                registry=reg)
    assert sys.path == before
    # a worker module found in the directory keeps it on sys.path: it may import its neighbours later
    name = f"embedded_workers_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text("from flowdsl import worker\n\n@worker('emb_here')\n"
                                         "async def here(data, ctx):\n    return {}\n")
    monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        result = flowdsl.run(compile_text(f"flowdsl: 1\nname: emb\nworkers: [{name}]\nsteps: [emb_here]\n"), {},
                             record=False)
        assert result.status == "completed" and sys.path == [str(tmp_path), *before]
    finally:
        flowdsl.registry.unregister("emb_here")
        sys.modules.pop(name, None)


def test_runs_overlapping_in_one_loop_leave_no_sigint_handlers_behind() -> None:
    """Runs whose lifetimes overlap without nesting (A starts, B starts, A ends, B ends), thousands of times in
    a long-lived application: they share the one handler that tells a real Ctrl-C from a worker's own
    KeyboardInterrupt, and the last one out removes it — handlers never pile up into a chain that a Ctrl-C
    walks (past the recursion limit it raised RecursionError instead of KeyboardInterrupt)."""
    from flowdsl.workers import _MarkingHandler

    async def pause(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        await asyncio.sleep(data["sleep"])
        return {}

    reg = registry(pause=pause)
    plan = flow("  - a: {worker: pause, with: {sleep: '${ $input.sleep }'}}\n")
    depths: list[int] = []

    def depth() -> int:
        handler, n = signal.getsignal(signal.SIGINT), 0
        while isinstance(handler, _MarkingHandler):
            handler, n = handler.previous, n + 1
        return n

    async def main() -> Any:
        inside = signal.getsignal(signal.SIGINT)  # asyncio.run's own Ctrl-C handler
        for _ in range(30):
            await asyncio.gather(bounded(plan, reg, {"sleep": 0.001}), bounded(plan, reg, {"sleep": 0.003}))
            depths.append(depth())
        return inside, signal.getsignal(signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    inside, after_runs = asyncio.run(main())
    assert depths == [0] * 30 and after_runs is inside
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("raised", [asyncio.CancelledError, GeneratorExit, ValueError])
def test_an_on_event_hook_raising_a_cancellation_is_switched_off_like_any_broken_hook(
        raised: type[BaseException], caplog: pytest.LogCaptureFixture) -> None:
    """A CancelledError from the hook (a cancelled future's result()) on an event of an attempt that had waited
    killed the attempt's task: run_flow never returned."""
    async def slow(data: Any, ctx: Any) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        return {}

    async def quick(data: Any, ctx: Any) -> dict[str, Any]:
        return {}

    def hook(event: dict[str, Any]) -> None:
        if event["type"] == "step_succeeded" and event["step"] == "a":
            raise raised()

    with caplog.at_level(logging.WARNING, logger="flowdsl.local"):
        result = asyncio.run(bounded(flow("  - a: {worker: slow}\n  - b: {worker: quick}\n"),
                                     registry(slow=slow, quick=quick), on_event=hook))
    assert result.status == "completed" and result.steps["b"]["status"] == "succeeded"
    assert f"the on_event hook raised {raised.__name__}" in caplog.text


def test_abort_from_an_on_event_hook_starts_nothing_more() -> None:
    """The decision whose event the hook aborted on still dispatched the next step, after the stop."""
    called: list[str] = []

    async def step(data: Any, ctx: Any) -> dict[str, Any]:
        called.append(ctx.step_id)
        return {}

    async def main() -> None:
        run = LocalRun(flow("  - a: {worker: step}\n  - b: {worker: step}\n"), {}, registry=registry(step=step),
                       import_workers=False, record=False,
                       on_event=lambda e: run.abort("seen enough") if e["type"] == "step_succeeded" else None)
        with pytest.raises(RunAborted):
            await asyncio.wait_for(run.run(), HUNG)

    asyncio.run(main())
    assert called == ["a"]


def test_wrong_types_for_paths_and_registries_are_type_errors(tmp_path: Path) -> None:
    """runs_dir=b"/x" wrote records into a directory named "b'"; registry={} stood for the default registry;
    @worker(registry_={}) registered into the default one."""
    plan = flow("  - a\n")
    with pytest.raises(TypeError, match=r"runs_dir must be a str, an os.PathLike or None; got bytes"):
        LocalRun(plan, {}, runs_dir=str(tmp_path).encode(), import_workers=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"registry must be a flowdsl.workers.WorkerRegistry or None; got dict"):
        LocalRun(plan, {}, registry={}, import_workers=False, record=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"registry_ must be a WorkerRegistry or None; got dict"):
        flowdsl.worker("zz_never", registry_={})  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


def test_cancel_from_another_thread_is_handed_to_the_runs_loop() -> None:
    """It ran on the calling thread, touching the run's state there; the cancellation reached the worker only
    when it finished by itself."""
    import threading

    seen: list[str] = []

    async def slow(data: Any, ctx: Any) -> dict[str, Any]:
        try:
            await asyncio.sleep(HUNG)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        return {}

    async def main() -> Any:
        run = LocalRun(flow("  - a: {worker: slow}\n"), {}, registry=registry(slow=slow), import_workers=False,
                       record=False)
        threading.Timer(0.2, run.cancel, args=("from a thread",)).start()
        return await asyncio.wait_for(run.run(), HUNG / 2)

    result = asyncio.run(main())
    assert result.status == "cancelled" and result.error["message"] == "from a thread" and seen == ["cancelled"]


def test_a_cancel_from_another_thread_as_the_run_starts_is_never_lost() -> None:
    """cancel() read "not started" and only then held the request: a thread switch in between (forced here: the
    calling thread is paused there) let run() start and look for held requests before it was held — the run
    completed, the cancel lost. Now run() waits for a cancel that is deciding, and the run ends cancelled."""
    import linecache
    import threading

    called: list[str] = []

    async def step(data: Any, ctx: Any) -> dict[str, Any]:
        called.append("step")
        return {}

    run = LocalRun(flow("  - a: {worker: step}\n"), {}, registry=registry(step=step), import_workers=False,
                   record=False)
    paused = threading.Event()

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is not LocalRun.cancel.__code__:
            return None

        def line(frame: Any, event: str, arg: Any) -> Any:
            source = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            if event == "line" and source == 'self._early = ("cancel", reason)':
                paused.set()
                threading.Event().wait(0.5)  # preempted here while the run starts
            return line
        return line

    def cancel() -> None:
        sys.settrace(tracer)
        try:
            run.cancel("before it starts")
        finally:
            sys.settrace(None)

    canceller = threading.Thread(target=cancel)
    canceller.start()
    assert paused.wait(HUNG)
    result = asyncio.run(asyncio.wait_for(run.run(), HUNG))
    canceller.join(HUNG)
    assert (result.status, result.error["message"], called) == ("cancelled", "before it starts", [])


def test_hooks_that_cannot_be_called_as_hooks_are_type_errors() -> None:
    """`on_event="print"` was dropped at its first call; an `async def` hook made coroutines nobody awaited."""
    async def async_hook(event: dict[str, Any]) -> None:
        pass

    plan = flow("  - a\n")
    for name, hook, said in (("on_event", "print", "got str"), ("on_notice", 3, "got int"),
                             ("on_event", async_hook, "got an async function")):
        with pytest.raises(TypeError, match=f"{name} must be a plain function or None .*{said}"):
            LocalRun(plan, {}, import_workers=False, record=False, **{name: hook})


def test_a_worker_that_cannot_take_its_input_and_context_is_refused_when_registered() -> None:
    """It failed every attempt at run time as the step's own error, retried and compensated like a real failure."""
    reg = WorkerRegistry()

    def nosig() -> dict[str, Any]:
        return {}

    async def one_arg(data: Any) -> dict[str, Any]:
        return {}

    async def stream(data: Any, ctx: Any) -> Any:
        yield {}

    class Step:
        def __init__(self, data: Any, ctx: Any) -> None:
            pass

    for name, fn, said in (("nosig", nosig, "must take the step's input and its context"),
                           ("one_arg", one_arg, "must take the step's input and its context"),
                           ("stream", stream, "a generator function is not a worker"),
                           ("cls", Step, "a class is not a worker")):
        with pytest.raises(TypeError, match=f"worker '{name}': .*{said}"):
            reg.register(name, fn)
    reg.register("fine", lambda data, ctx, *, extra=1: {})
    assert "fine" in reg


def test_compile_text_of_a_memoryview_reports_its_diagnostics() -> None:
    with pytest.raises(flowdsl.SpecError, match="FD201"):
        compile_text(memoryview(b"flowdsl: 1\nname: t\nsteps: 3\n"))
