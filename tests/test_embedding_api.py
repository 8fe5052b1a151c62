"""flowdsl inside an application (audit of the Python API, session 20): it leaves the process's recursion limit and
``sys.path`` alone, tells an object with an ``async def __call__`` for an async worker, exports what a caller needs,
and raises one exception type for a bad run input and says how many errors a rejected spec has."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import flowdsl
from flowdsl.runtime.redis.client import RedisClient
from flowdsl.workers import WorkerRegistry

ROOT = Path(__file__).resolve().parents[1]
ONE_STEP = "flowdsl: 1\nname: emb\nsteps:\n  - a: {compensate: undo}\n  - b\n"


def test_compiling_and_running_leave_the_processs_recursion_limit_as_it_was() -> None:
    """jsonata-python sets it to 10,000 as it is imported: a host thread with a small stack then crashes where it
    raised RecursionError."""
    script = textwrap.dedent("""\
        import sys
        sys.setrecursionlimit(1234)
        import flowdsl
        plan = flowdsl.compile_text('flowdsl: 1\\nname: r\\nsteps:\\n  - a: {with: {x: "${ 1 + 1 }"}}\\n')
        print(sys.getrecursionlimit())
        """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout.strip()) == (0, "1234"), proc.stderr


class AsyncCallable:
    async def __call__(self, data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        await asyncio.sleep(3)
        return {}


def test_an_object_with_an_async_call_is_an_async_worker_and_a_cancel_stops_it() -> None:
    reg = WorkerRegistry()
    reg.register("a", AsyncCallable())

    async def undo(data: Any, ctx: Any) -> dict[str, Any]:
        return {}

    reg.register("undo", undo)
    reg.register("b", AsyncCallable())
    assert reg.get("a") is not None and reg.get("a").is_async  # type: ignore[union-attr]
    plan = flowdsl.compile_text(ONE_STEP)

    async def main() -> tuple[Any, float]:
        run = flowdsl.LocalRun(plan, {}, record=False, registry=reg, import_workers=False)
        task = asyncio.ensure_future(run.run())
        await asyncio.sleep(0.1)
        began = time.monotonic()
        run.cancel("enough")
        result = await asyncio.wait_for(task, 20)
        return result, time.monotonic() - began

    result, took = asyncio.run(main())
    assert result.status == "cancelled" and result.steps["a"]["status"] == "cancelled"
    assert took < 2.0  # cancelled at its await, not waited for as a thread is (3 s)


def test_worker_registry_is_exported() -> None:
    assert flowdsl.WorkerRegistry is WorkerRegistry and "WorkerRegistry" in flowdsl.__all__


@pytest.mark.parametrize("bad", [{"amount": float("nan")}, {"when": object()}])
def test_a_run_input_that_is_not_json_is_an_input_error_wherever_it_is_given(bad: dict[str, Any]) -> None:
    plan = flowdsl.compile_text("flowdsl: 1\nname: emb\nsteps: [a]\n")
    with pytest.raises(flowdsl.InputError, match="the run input is not a JSON object"):
        flowdsl.check_input(plan, bad)
    reg = WorkerRegistry()
    reg.register("a", AsyncCallable())
    with pytest.raises(flowdsl.InputError, match="the run input is not a JSON object"):
        flowdsl.LocalRun(plan, bad, record=False, registry=reg, import_workers=False)
    with pytest.raises(flowdsl.InputError, match="the run input is not a JSON object"):
        asyncio.run(RedisClient("unix:///nonexistent.sock").submit(plan, bad))
    assert issubclass(flowdsl.InputError, ValueError)  # (what run_flow raised for it before)


def test_a_spec_error_says_how_many_more_errors_there_are() -> None:
    with pytest.raises(flowdsl.SpecError) as caught:
        flowdsl.compile_text("flowdsl: 1\nname: emb\nsteps:\n  - a: {timeout: soon}\n  - b: {timeout: later}\n")
    errors = [d for d in caught.value.diagnostics if d.severity == "error"]
    assert len(errors) == 2
    assert str(caught.value) == errors[0].format() + " (and 1 more error: see .diagnostics)"


def test_runs_of_a_spec_whose_worker_modules_are_imported_leave_sys_path_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Other threads of a service see ``sys.path``: once a spec's worker modules are imported, a run puts nothing
    on it, even for a moment."""
    name = f"emb_workers_{os.getpid()}"
    installed, here = tmp_path / "site", tmp_path / "here"  # the module installed; the service's own directory
    installed.mkdir()
    here.mkdir()
    (installed / f"{name}.py").write_text("from flowdsl import worker\n\n@worker('emb_mod')\n"
                                          "async def mod(data, ctx):\n    return {}\n")
    monkeypatch.setattr(sys, "path", [str(installed), *(p for p in sys.path if p not in ("", os.getcwd()))])
    monkeypatch.chdir(here)
    plan = flowdsl.compile_text(f"flowdsl: 1\nname: emb\nworkers: [{name}]\nsteps: [emb_mod]\n")
    try:
        assert flowdsl.run(plan, {}, record=False).status == "completed"  # imports it
        seen: list[list[str]] = []

        class Watch(list):  # type: ignore[type-arg]
            def insert(self, index: Any, value: Any) -> None:
                seen.append(list(self))
                super().insert(index, value)

        monkeypatch.setattr(sys, "path", Watch(sys.path))
        assert flowdsl.run(plan, {}, record=False).status == "completed"
        assert seen == []
    finally:
        flowdsl.registry.unregister("emb_mod")
        sys.modules.pop(name, None)


async def run_or_compensate(plan: dict[str, Any], run_input: dict[str, Any], **options: Any) -> Any:
    """The recipe of docs/runtime.md ("Deadlines"), as written there."""
    run = flowdsl.LocalRun(plan, run_input, **options)
    task = asyncio.ensure_future(run.run())
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        run.cancel("the caller was cancelled")
        await asyncio.shield(task)
        raise


def test_the_documented_recipe_turns_a_cancelled_caller_into_a_compensated_run() -> None:
    reg = WorkerRegistry()
    undone: list[str] = []

    async def a(data: Any, ctx: Any) -> dict[str, Any]:
        return {}

    async def undo(data: Any, ctx: Any) -> dict[str, Any]:
        undone.append(ctx.step_id)
        return {}

    reg.register("a", a)
    reg.register("undo", undo)
    reg.register("b", AsyncCallable())  # 3 s
    plan = flowdsl.compile_text(ONE_STEP)
    seen: list[Any] = []

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(run_or_compensate(plan, {}, record=False, registry=reg, import_workers=False,
                                                     on_event=seen.append), 0.2)

    asyncio.run(main())
    assert undone == ["a"]
    assert [e["status"] for e in seen if e["type"] == "run_finished"] == ["cancelled"]
    text = (ROOT / "docs" / "runtime.md").read_text()
    assert "        await asyncio.shield(task)    # wait for the undo" in text  # (the recipe tested is the one shown)


def test_a_worker_error_message_of_megabytes_is_kept_to_its_first_16000_characters(tmp_path: Path) -> None:
    reg = WorkerRegistry()

    async def a(data: Any, ctx: Any) -> dict[str, Any]:
        raise RuntimeError("<html>" + "x" * 2_000_000)

    reg.register("a", a)
    plan = flowdsl.compile_text("flowdsl: 1\nname: emb\nsteps: [a]\n")
    result = flowdsl.run(plan, {}, registry=reg, import_workers=False, runs_dir=str(tmp_path), run_id="big")
    message = result.error["message"]
    assert message.startswith("<html>xxx") and message.endswith("… (1984006 more characters left out)")
    assert len(message) < 16_100
    assert (tmp_path / "big.jsonl").stat().st_size < 100_000


def test_a_run_awaited_without_an_asyncio_loop_says_flowdsl_needs_one() -> None:
    """Under trio (or a coroutine driven by hand) the error was asyncio's bare 'no running event loop'."""
    reg = WorkerRegistry()
    reg.register("a", AsyncCallable())
    run = flowdsl.LocalRun(flowdsl.compile_text("flowdsl: 1\nname: emb\nsteps: [a]\n"), {}, record=False,
                           registry=reg, import_workers=False)
    coro = run.run()
    with pytest.raises(RuntimeError, match="flowdsl runs on asyncio: no asyncio event loop is running"):
        coro.send(None)
    coro.close()


@pytest.mark.parametrize("take", [False, True])
def test_a_run_cancelled_as_asyncio_run_closes_leaves_no_dead_runners_ctrl_c_handler(take: bool) -> None:
    """asyncio.run() puts Python's default SIGINT handler back as its main task ends, but only when its own is still
    there; a run in a background task, cancelled as the Runner closes, put the dead Runner's handler back after
    that — and the next asyncio.run() then did not take Ctrl-C."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    reg = WorkerRegistry()
    reg.register("a", AsyncCallable())
    plan = flowdsl.compile_text("flowdsl: 1\nname: emb\nsteps: [a]\n")

    async def main() -> None:
        left = asyncio.ensure_future(flowdsl.run_flow(plan, {}, record=False, registry=reg, import_workers=False,
                                                      handle_sigint=take))
        await asyncio.sleep(0.05)
        assert not left.done()  # (still running: asyncio.run() cancels it as it closes)

    try:
        asyncio.run(main())
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
