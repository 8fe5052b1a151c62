"""The local asyncio runtime: concurrency, timeouts, workers and their errors, cancelling, records,
replay, the JSON output and the CLI's exit codes.

Concurrency is shown by the order of events and by overlapping execution
intervals the workers report, never by wall-time bounds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from examples.ecommerce_order import services as svc
from flowdsl import compile_spec, compile_text
from flowdsl.cli import app
from flowdsl.kernel import replay
from flowdsl.runtime.local import RECORDED_INPUTS, LocalRun, WorkersMissing, run_flow
from flowdsl.runtime.rebuild import result_from_record
from flowdsl.runtime.record import read_record
from flowdsl.workers import WorkerRegistry
from tests.runtime import workers as tw
from tests.runtime.conformance import HEADER

ROOT = Path(__file__).resolve().parents[2]
ECOM = ROOT / "examples" / "ecommerce_order"


def plan(steps: str, name: str = "t") -> dict[str, Any]:
    return compile_text(HEADER.format(name=name) + steps)


def go(plan_: dict[str, Any], script: dict[str, Any], **options: Any) -> Any:
    options.setdefault("record", False)
    return asyncio.run(run_flow(plan_, {"script": script}, **options))


def types(result: Any) -> list[tuple[str, str | None]]:
    return [(e["type"], e["step"]) for e in result.events]


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWDSL_LM", raising=False)
    tw.PROBE.clear()


# --- concurrency ----------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["conf", "sync"])
def test_parallel_branches_really_run_at_the_same_time(prefix: str) -> None:
    p = plan(f"steps:\n  - parallel: p\n    branches: [{prefix}.a, {prefix}.b]\n  - conf.c\n")
    r = go(p, {"a": {"sleep": 0.1, "stamp": True}, "b": {"sleep": 0.1, "stamp": True}})
    assert r.status == "completed"
    seen = types(r)
    last_start = max(seen.index(("step_scheduled", s)) for s in "ab")
    first_end = min(seen.index(("step_succeeded", s)) for s in "ab")
    assert last_start < first_end  # both were in flight together
    ctx = r.context
    assert ctx["a_t0"] < ctx["b_t1"] and ctx["b_t0"] < ctx["a_t1"]  # and their bodies overlapped
    assert seen.index(("step_scheduled", "c")) > max(seen.index(("step_succeeded", s)) for s in "ab")


def test_a_sequence_runs_one_step_after_the_other() -> None:
    r = go(plan("steps: [conf.a, sync.b, conf.c]\n"), {k: {"sleep": 0.01, "stamp": True} for k in "abc"})
    ctx = r.context
    assert ctx["a_t1"] <= ctx["b_t0"] and ctx["b_t1"] <= ctx["c_t0"]


# --- timeouts -------------------------------------------------------------------------------


def test_a_timeout_cancels_the_attempt_in_the_worker() -> None:
    r = go(plan("steps:\n  - conf.a: {timeout: 50ms}\n"), {"a": {"hang": True}})
    assert r.status == "failed"
    assert r.error["type"] == "StepTimeout"
    assert ("step_timed_out", "a") in types(r)
    assert tw.PROBE == [("step", "a")]  # the coroutine saw its CancelledError


def test_a_timed_out_attempt_is_retried_while_the_first_is_cancelled() -> None:
    r = go(plan("steps:\n  - conf.a: {timeout: 50ms, retry: {attempts: 2, initial: 1ms}}\n"),
           {"a": [{"hang": True}, {"result": {"v": 2}}]})
    assert (r.status, r.steps["a"]["attempts"], r.context["v"]) == ("completed", 2, 2)
    assert tw.PROBE == [("step", "a")]


# --- workers and their errors ------------------------------------------------------------------


class PaymentGatewayTimeout(Exception):
    pass


def _registry() -> WorkerRegistry:
    reg = WorkerRegistry()

    async def gateway(data: dict[str, Any], ctx: Any) -> Any:
        raise PaymentGatewayTimeout(f"no answer for {ctx.idempotency_key}")

    def sync_bad(data: dict[str, Any], ctx: Any) -> Any:
        raise ValueError("bad value")

    async def returns_text(data: dict[str, Any], ctx: Any) -> Any:
        return "done"

    async def returns_set(data: dict[str, Any], ctx: Any) -> Any:
        return {"tags": {1, 2}}

    async def returns_none(data: dict[str, Any], ctx: Any) -> Any:
        return None

    def sync_context(data: dict[str, Any], ctx: Any) -> Any:
        data["mutated"] = True  # the worker's own copy
        return {"seen": [ctx.run_id, ctx.step_id, ctx.attempt, ctx.idempotency_key, ctx.compensating]}

    for name, fn in [("gateway", gateway), ("sync_bad", sync_bad), ("returns_text", returns_text),
                     ("returns_set", returns_set), ("returns_none", returns_none), ("sync_context", sync_context)]:
        reg.register(name, fn)
    return reg


@pytest.mark.parametrize(("worker", "error_type", "message"), [
    ("gateway", "PaymentGatewayTimeout", "no answer for r1/gateway"),
    ("sync_bad", "ValueError", "bad value"),
    ("returns_text", "OutputInvalid", "the worker returned str, expected a JSON object (a dict) or None"),
    ("returns_set", "OutputInvalid", "the worker's result is not JSON: at /tags: a set is not JSON"),
])
def test_a_worker_failure_is_recorded_by_its_exception_class_name(worker: str, error_type: str,
                                                                  message: str) -> None:
    p = compile_text(f"flowdsl: 1\nname: t\nsteps: [{worker}]\n")
    r = asyncio.run(run_flow(p, {}, run_id="r1", record=False, registry=_registry(), import_workers=False))
    assert r.status == "failed"
    assert r.error["type"] == error_type
    assert r.error["message"].startswith(message)
    assert r.steps[worker]["error"] == r.error


def test_workers_get_a_step_context_and_a_private_copy_of_their_input() -> None:
    p = compile_text("flowdsl: 1\nname: t\nsteps: [returns_none, sync_context]\n")
    r = asyncio.run(run_flow(p, {"k": 1}, run_id="r1", record=False, registry=_registry(), import_workers=False))
    assert r.status == "completed"
    assert r.context == {"k": 1, "seen": ["r1", "sync_context", 1, "r1/sync_context", False]}


def test_a_step_whose_worker_is_not_registered_fails_before_the_run_starts(tmp_path: Path) -> None:
    p = compile_text("flowdsl: 1\nname: t\nsteps:\n  - gateway: {compensate: refund}\n")
    with pytest.raises(WorkersMissing, match="compensation 'refund' of step 'gateway' is not a registered worker"):
        LocalRun(p, {}, runs_dir=tmp_path, registry=_registry(), import_workers=False)
    assert list(tmp_path.iterdir()) == []


# --- cancelling -----------------------------------------------------------------------------------

CANCELLABLE = "steps:\n  - conf.a: {compensate: undo.a}\n  - conf.b: {compensate: undo.b}\n"


def test_cancel_stops_what_runs_and_undoes_what_completed() -> None:
    async def main() -> Any:
        run: LocalRun

        def watch(event: dict[str, Any]) -> None:
            if event["type"] == "step_scheduled" and event["step"] == "b":
                asyncio.get_running_loop().call_later(0.02, run.cancel, "enough")

        run = LocalRun(plan(CANCELLABLE), {"script": {"b": {"hang": True}}}, record=False, on_event=watch)
        return await run.run()

    r = asyncio.run(main())
    assert (r.status, r.compensated, r.error["type"]) == ("cancelled", ["a"], "Cancelled")
    assert r.steps["b"]["status"] == "cancelled"
    assert tw.PROBE == [("step", "b")]


def test_cancelling_the_awaiting_task_aborts_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        run = LocalRun(plan(CANCELLABLE), {"script": {"b": {"hang": True}}}, run_id="ab1", runs_dir=tmp_path)
        task = asyncio.create_task(run.run())
        while run.status != "running" or "b" not in {e["step"] for e in run.events}:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    _, lines = read_record(tmp_path / "ab1.jsonl")
    assert lines[-1]["type"] == "runtime_aborted"
    assert not any(e["type"].startswith("compensation") for e in lines)


def test_a_deadline_on_the_awaiting_task_is_not_silent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``asyncio.wait_for(run_flow(...), t)`` (a request deadline) stops the run at once, as documented — but says
    so: a WARNING on ``flowdsl.local`` (and a notice) names the run, its record and what is left to undo by hand
    with the idempotency keys; ``flowdsl show`` says the run was aborted, not ``running`` (audit F3)."""
    notices: list[str] = []

    async def main() -> None:
        with pytest.raises((asyncio.TimeoutError, TimeoutError)):
            await asyncio.wait_for(run_flow(plan(CANCELLABLE), {"script": {"b": {"hang": True}}}, run_id="dl1",
                                            runs_dir=tmp_path, on_notice=notices.append), 1.5)

    with caplog.at_level(logging.WARNING, logger="flowdsl.local"):
        asyncio.run(main())
    said = [r.getMessage() for r in caplog.records if r.name == "flowdsl.local" and r.levelno == logging.WARNING]
    assert len(said) == 1, said
    text = said[0]
    assert "run dl1 was stopped at once" in text and "nothing more was compensated" in text
    assert str(tmp_path / "dl1.jsonl") in text
    assert "a: its undo undo.a was not run [step key dl1/a, undo key dl1/a/compensate]" in text, text
    assert "b: its undo undo.b was not run" in text  # in flight when it stopped: it may have completed
    assert "LocalRun.cancel()" in text
    assert notices and notices[-1] == text
    shown = cli("show", "dl1", "--runs-dir", str(tmp_path), "--format", "json")
    assert shown.exit_code == 0, shown.output
    out = json.loads(shown.stdout)
    assert (out["status"], out["stopped_in"], out["aborted"]) == ("aborted", "running",
                                                                   "the task running it was cancelled")
    assert [i["step"] for i in out["intervention"]["steps"]] == ["a", "b"]
    text_shown = cli("show", "dl1", "--runs-dir", str(tmp_path))
    assert "stopped at once while it ran" in text_shown.stdout and "left to undo by hand" in text_shown.stdout


def test_an_aborting_run_waits_for_a_sync_worker_and_undoes_it(tmp_path: Path) -> None:
    p = plan("steps:\n  - parallel: p\n    branches:\n      - sync.a: {compensate: undo.a}\n      - conf.b\n")
    called = str(tmp_path / "a.called")  # (b fails once a runs: a sync job still queued would be taken back)
    r = go(p, {"a": {"sleep": 0.15, "mark": called}, "b": {"after": called, "raise": "Boom"}})
    # a's thread could not be stopped: the kernel got its real result, so a was undone
    assert (r.status, r.steps["a"]["status"], r.compensated) == ("compensated", "succeeded", ["a"])


# --- records and replay ----------------------------------------------------------------------------


def _ecommerce_plan() -> dict[str, Any]:
    result = compile_spec(str(ECOM / "flow.yaml"), check_workers=True)
    assert result.plan is not None, result.diagnostics
    return result.plan


@pytest.mark.parametrize("scenario", ["gateway_timeout", "payment_declined"])
def test_a_recorded_run_replays_to_the_same_decisions(tmp_path: Path, scenario: str) -> None:
    svc.STATE.reset()
    run_input = json.loads((ECOM / "inputs" / f"{scenario}.json").read_text())
    r = asyncio.run(run_flow(_ecommerce_plan(), run_input, run_id="rec1", runs_dir=tmp_path))
    svc.STATE.reset()
    header, lines = read_record(tmp_path / "rec1.jsonl")
    assert header is not None and header["input"] == run_input and header["run_id"] == "rec1"
    inputs = [e for e in lines if e["type"] in RECORDED_INPUTS]
    emitted = [e for e in lines if e["type"] not in RECORDED_INPUTS]
    assert inputs[0]["type"] == "start" and len(inputs) >= 5
    state, _, events = replay(header["plan"], inputs)
    assert json.loads(json.dumps(events)) == emitted == json.loads(json.dumps(r.events))
    assert json.loads(json.dumps(state)) == json.loads(json.dumps(r.state))
    again = result_from_record(header, lines)
    assert (again.status, again.compensated, again.context) == (r.status, r.compensated, r.context)
    if scenario == "gateway_timeout":
        assert any(e["type"] == "timer_fired" for e in inputs)  # the retry waited on a recorded timer


def test_an_llm_step_records_its_prompt_and_reply(tmp_path: Path) -> None:
    dspy = pytest.importorskip("dspy")
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)
    lm = dspy.utils.DummyLM([{"greeting": "Hi Ann!"}], adapter=adapter)
    p = plan("steps:\n  - g:\n      llm: {signature: 'name -> greeting'}\n")
    r = asyncio.run(run_flow(p, {"name": "Ann"}, lm=lm, adapter=adapter, run_id="llm1", runs_dir=tmp_path))
    assert (r.status, r.context["greeting"]) == ("completed", "Hi Ann!")
    (call,) = r.llm_calls["g"]
    assert call["outcome"] == "step_succeeded" and "Hi Ann!" in call["raw"] and call["model"] == "dummy"
    assert any("Ann" in str(m["content"]) for m in call["prompt"])
    (done,) = [e for e in r.events if e["type"] == "step_succeeded"]
    assert done["meta"]["llm"] == {k: call[k] for k in ("prompt", "raw", "reasoning", "model")}
    header, lines = read_record(tmp_path / "llm1.jsonl")
    (answer,) = [e for e in lines if e["type"] == "task_succeeded"]
    assert answer["meta"] == done["meta"]  # recorded with the input event, so replay reproduces it
    again = result_from_record(header, lines)
    assert again.llm_calls == r.llm_calls and "llm" not in r.to_json()["steps"]["g"]


# --- the CLI -------------------------------------------------------------------------------------------

SPECS = {
    "ok": "steps: [conf.a, conf.b]\n",
    "compensated": "steps:\n  - conf.a: {compensate: undo.a}\n  - conf.b\n",
    "stuck": "steps:\n  - conf.a:\n      compensate: {worker: undo.a, retry: 1}\n  - conf.b\n",
}
SCRIPTS = {"ok": {}, "compensated": {"b": {"raise": "Boom"}},
           "stuck": {"b": {"raise": "Boom"}, "a/compensate": {"raise": "UndoDown"}}}


def _spec(tmp_path: Path, name: str, text: str | None = None) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text if text is not None else HEADER.format(name=name) + SPECS[name])
    return str(path)


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize(("name", "code", "status"), [("ok", 0, "completed"), ("compensated", 1, "compensated"),
                                                      ("stuck", 4, "needs_intervention")])
def test_run_exit_codes_and_the_json_object(tmp_path: Path, name: str, code: int, status: str) -> None:
    r = cli("run", _spec(tmp_path, name), "--set", f"script={json.dumps(SCRIPTS[name])}", "--format", "json",
            "--runs-dir", str(tmp_path / "runs"), "--run-id", f"cli-{name}")
    assert r.exit_code == code, r.output
    out = json.loads(r.stdout)
    assert {"run_id", "status", "context", "steps", "compensated", "events"} <= set(out)
    assert (out["run_id"], out["status"]) == (f"cli-{name}", status)
    assert out["context"] == {"script": SCRIPTS[name]}
    assert set(out["steps"]["a"]) >= {"status", "attempts", "started_at", "finished_at", "error"}
    assert out["compensated"] == (["a"] if name == "compensated" else [])
    assert out["events"][0]["type"] == "run_started" and out["events"][-1]["type"] == "run_finished"
    assert (tmp_path / "runs" / f"cli-{name}.jsonl").is_file()
    shown = cli("show", f"cli-{name}", "--runs-dir", str(tmp_path / "runs"), "--format", "json")
    assert shown.exit_code == 0
    again = json.loads(shown.stdout)
    assert (again["status"], again["compensated"], again["events"]) == (status, out["compensated"], out["events"])


def test_run_text_output_summarises_and_show_prints_the_timeline(tmp_path: Path) -> None:
    r = cli("run", _spec(tmp_path, "compensated"), "--set", 'script={"b": {"raise": "Boom"}}',
            "--runs-dir", str(tmp_path), "--run-id", "txt1")
    assert r.exit_code == 1
    assert "compensated, in this order: a (undo.a)" in r.stderr
    assert "✓ a" in r.stderr and "✗ b — Boom" in r.stderr and "↶ a undone" in r.stderr  # progress lines
    assert "critical path" in r.stderr and "Boom" in r.stderr
    shown = cli("show", "txt1", "--runs-dir", str(tmp_path))
    assert shown.exit_code == 0
    assert "↶ a undone" in shown.stdout and "run finished" in shown.stdout
    assert cli("show", str(tmp_path / "txt1.jsonl")).exit_code == 0


def test_show_reads_a_record_cut_short_by_a_killed_process(tmp_path: Path) -> None:
    """A process killed while writing leaves a partial last line, or no end at all: `show` prints what was
    recorded up to there and says so, instead of refusing the record."""
    assert cli("run", _spec(tmp_path, "ok"), "--runs-dir", str(tmp_path), "--run-id", "cut1").exit_code == 0
    record = tmp_path / "cut1.jsonl"
    lines = record.read_bytes().splitlines(keepends=True)
    record.write_bytes(b"".join(lines[:-1]) + lines[-1][:25])  # the last line half written
    shown = cli("show", "cut1", "--runs-dir", str(tmp_path))
    assert shown.exit_code == 0, shown.stderr
    assert "the record's last line is incomplete" in shown.stdout
    record.write_bytes(b"".join(lines[:4]))  # the process died early: the run has no end in the record
    shown = cli("show", "cut1", "--runs-dir", str(tmp_path), "--format", "json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["status"] == "running"
    assert "the record ends before the run did" in shown.stderr  # (with --format json, notes go to stderr)
    record.write_bytes(b"".join(lines[:2]) + b"{not json\n" + b"".join(lines[2:]))  # damage inside: refused
    damaged = cli("show", "cut1", "--runs-dir", str(tmp_path))
    assert damaged.exit_code == 2 and "cut1.jsonl:3: not a JSON line" in damaged.stderr


def test_the_critical_path_runs_through_steps_that_took_no_time_and_a_long_one_is_shortened(tmp_path: Path) -> None:
    """A sequence of quick steps (most under a millisecond): its critical path is the whole sequence, not the
    part up to the last step that took a measurable time; the summary names a long path's ends only."""
    from flowdsl.runtime.timing import critical_path

    plan = compile_text(HEADER.format(name="quick") + "steps: [" + ", ".join(f"conf.{i}" for i in "abcdefgpqrsuvw")
                        + "]\n")
    rows = {k: {"node": k, "kind": "task", "started_at": 100 + (i if i < 3 else 3), "finished_at": 100 + (
        i + 1 if i < 3 else 3)} for i, k in enumerate(plan["root"])}  # 1 ms each for three steps, then 0 ms
    assert critical_path(plan, rows) == (plan["root"], 3)
    r = cli("run", _spec(tmp_path, "quick", HEADER.format(name="quick") + "steps: [" + ", ".join(
        f"conf.{i}" for i in "abcdefgpqrsuvw") + "]\n"), "--no-record")
    assert r.exit_code == 0
    line = next(x for x in r.stderr.splitlines() if x.startswith("critical path"))
    assert line.endswith(": a → b → c → d → e → f → … 2 more … → q → r → s → u → v → w")


def test_no_record_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWDSL_RUNS_DIR", str(tmp_path / "runs"))  # (--no-record with --runs-dir is refused)
    r = cli("run", _spec(tmp_path, "ok"), "--no-record", "--format", "json")
    assert r.exit_code == 0
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("make", "message"), [
    (lambda t: ["run", _spec(t, "bad", "flowdsl: 1\nname: bad\nsteps: [conf.a]\nbogus: 1\n")], "FD202"),
    (lambda t: ["run", _spec(t, "nomod", "flowdsl: 1\nname: nomod\nworkers: [no_such_module_x]\nsteps: [a]\n")],
     "cannot import worker module 'no_such_module_x'"),
    (lambda t: ["run", _spec(t, "unknown", "flowdsl: 1\nname: unknown\nworkers: [tests.runtime.workers]\n"
                                           "steps: [conf.nope]\n")], "is not a known worker"),
    (lambda t: ["run", _spec(t, "schema", HEADER.format(name="schema") + "input: {type: object, required: [n]}\n"
                                          "steps: [conf.a]\n")],
     "does not match the spec's input schema"),
    (lambda t: ["run", _spec(t, "ok"), "--input", str(t / "missing.json")], "cannot read input file"),
    (lambda t: ["run", _spec(t, "ok"), "--set", "novalue"], "--set expects key=value"),
    (lambda t: ["run", _spec(t, "ok"), "--run-id", "bad/id"], "invalid run id 'bad/id': use 1-128 letters"),
    (lambda t: ["run", _spec(t, "ok"), "--runs-dir", _spec(t, "ok")],
     "cannot keep run records in '"),  # a file, not a directory: refused before any step runs
    (lambda t: ["run", _spec(t, "ok"), "--input", _write(t / "deep.json", "[" * 100_000 + "]" * 100_000)],
     "deep.json: the input nests too deeply to read"),
    (lambda t: ["run", _spec(t, "ok"), "--set", "a=" + "[" * 20_000 + "]" * 20_000],
     "--set a: the value nests too deeply to read"),
    (lambda t: ["run", _spec(t, "ok"), "--input", _write(t / "d300.json", '{"a":' * 300 + "1" + "}" * 300)],
     "the data nests deeper than 200 levels"),
    (lambda t: ["show", "nothing-here", "--runs-dir", str(t)], "no recorded run 'nothing-here'"),
])
def test_rejected_specs_inputs_and_usage_exit_2_without_a_traceback(tmp_path: Path, make: Any, message: str) -> None:
    r = cli(*make(tmp_path))
    assert r.exit_code == 2, r.output
    assert message in r.stderr
    assert "Traceback" not in r.output
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit)


def test_what_workers_print_goes_to_stderr_and_stdout_stays_machine_output(tmp_path: Path) -> None:
    """A worker module that prints when imported, and workers (async, and sync in a thread) that print: with
    --format json, stdout is still exactly one JSON object; the prints are on stderr. The same for `plan`."""
    (tmp_path / "noisy_cli_workers.py").write_text(
        "from flowdsl import worker\nprint('importing noisy workers')\n\n\n@worker('noisy.step')\n"
        "async def step(data, ctx):\n    print('hello from the step')\n    return {'ok': True}\n\n\n"
        "@worker('noisy.sync')\ndef sync(data, ctx):\n    print('hello from a thread')\n    return {}\n")
    spec = _spec(tmp_path, "noisy", "flowdsl: 1\nname: noisy\nworkers: [noisy_cli_workers]\n"
                                    "steps:\n  - s: {worker: noisy.step}\n  - t: {worker: noisy.sync}\n")
    r = cli("run", spec, "--format", "json", "--no-record")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["status"] == "completed"
    assert r.stderr.splitlines()[-2:] == ["hello from the step", "hello from a thread"]
    plan = cli("plan", spec)
    assert plan.exit_code == 0 and json.loads(plan.stdout)["flow"]["name"] == "noisy"


def test_a_record_made_by_another_run_meanwhile_stops_this_one_before_any_step(tmp_path: Path) -> None:
    """Two runs started at once with one run id: the second to create the record does not write into the
    first's (the record is created exclusively) and runs nothing."""
    plan = compile_text(HEADER.format(name="race") + "steps: [conf.a]\n")
    run = LocalRun(plan, {"script": {"a": {"raise": "ShouldNotRun"}}}, run_id="race", runs_dir=tmp_path)
    (tmp_path / "race.jsonl").write_text("the other run's record\n")
    with pytest.raises(FileExistsError, match="a record of run 'race' already exists"):
        asyncio.run(run.run())
    assert (tmp_path / "race.jsonl").read_text() == "the other run's record\n"
    assert run.events == []


def test_an_existing_run_id_is_refused(tmp_path: Path) -> None:
    args = ["run", _spec(tmp_path, "ok"), "--runs-dir", str(tmp_path), "--run-id", "same", "--format", "json"]
    assert cli(*args).exit_code == 0
    again = cli(*args)
    assert again.exit_code == 2 and "already exists" in again.stderr
    out = json.loads(again.stdout)  # the error object names the run it was about, as docs/runtime.md says
    assert (out["status"], out["run_id"], out["error"]["type"]) == ("error", "same", "RunExists")


def test_the_record_hint_gives_a_show_command_that_finds_the_record(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """After a run, the summary's hint is a command that works: with --runs-dir when the record is not where
    `flowdsl show` looks by default ($FLOWDSL_RUNS_DIR, else .flowdsl/runs)."""
    monkeypatch.delenv("FLOWDSL_RUNS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    spec = _spec(tmp_path, "ok")
    elsewhere = tmp_path / "my runs"
    r = cli("run", spec, "--runs-dir", str(elsewhere), "--run-id", "hint1")
    assert r.exit_code == 0, r.output
    hint = next(x for x in r.stderr.splitlines() if x.startswith("record: "))
    assert hint.endswith(f"(flowdsl show hint1 --runs-dir '{elsewhere}')")
    assert cli("show", "hint1", "--runs-dir", str(elsewhere)).exit_code == 0
    monkeypatch.setenv("FLOWDSL_RUNS_DIR", str(elsewhere))  # the default directory: the plain command finds it
    r = cli("run", spec, "--run-id", "hint2")
    assert r.exit_code == 0, r.output
    assert next(x for x in r.stderr.splitlines() if x.startswith("record: ")).endswith("(flowdsl show hint2)")
    assert cli("show", "hint2").exit_code == 0
    monkeypatch.delenv("FLOWDSL_RUNS_DIR")
    r = cli("run", spec, "--run-id", "hint3")
    assert r.exit_code == 0, r.output
    assert next(x for x in r.stderr.splitlines() if x.startswith("record: ")).endswith("(flowdsl show hint3)")
    assert (tmp_path / ".flowdsl" / "runs" / "hint3.jsonl").is_file()


# --- Ctrl-C, in a real process ------------------------------------------------------------------------


def _start(tmp_path: Path, spec: str, script: dict[str, Any], run_id: str) -> subprocess.Popen[str]:
    path = tmp_path / "sig.yaml"
    path.write_text(HEADER.format(name="sig") + spec)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FLOWDSL_LM", None)
    return subprocess.Popen(
        [sys.executable, "-c", "from flowdsl.cli import main; main()", "run", str(path), "--format", "json",
         "--set", f"script={json.dumps(script)}", "--runs-dir", str(tmp_path), "--run-id", run_id],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(record: Path, event_type: str, step: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = record.read_text().splitlines(keepends=True) if record.exists() else []
        done = [json.loads(line) for line in lines if line.endswith("\n")]  # the last may be half written
        if any(e.get("type") == event_type and e.get("step") == step for e in done):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no {event_type} for {step} in {record}")


def test_ctrl_c_cancels_the_run_and_compensates_what_completed(tmp_path: Path) -> None:
    proc = _start(tmp_path, CANCELLABLE, {"b": {"hang": True}}, "sig1")
    _wait_for(tmp_path / "sig1.jsonl", "step_scheduled", "b", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    result = json.loads(out)
    assert (result["status"], result["compensated"]) == ("cancelled", ["a"])
    assert result["steps"]["b"]["status"] == "cancelled"
    assert "interrupted: cancelling the run" in err and "Traceback" not in err


def test_a_second_ctrl_c_stops_at_once(tmp_path: Path) -> None:
    proc = _start(tmp_path, CANCELLABLE, {"b": {"hang": True}, "a/compensate": {"hang": True}}, "sig2")
    record = tmp_path / "sig2.jsonl"
    _wait_for(record, "step_scheduled", "b", proc)
    proc.send_signal(signal.SIGINT)
    _wait_for(record, "compensation_started", "a", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "was aborted while compensating" in err and "Traceback" not in err
    aborted = json.loads(out)  # --format json: still exactly one object on stdout
    assert (aborted["status"], aborted["run_id"], aborted["error"]["type"]) == ("aborted", "sig2", "RunAborted")
    _, lines = read_record(record)
    assert lines[-1]["type"] == "runtime_aborted"


# --- the live view and the public API ---------------------------------------------------------------


def test_the_live_view_draws_on_a_terminal() -> None:
    import io

    from rich.console import Console

    from flowdsl.runtime.timeline import LiveView

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, height=30)
    p = plan("steps:\n  - conf.a: {compensate: undo.a}\n  - parallel: p\n    branches: [conf.b, conf.c]\n")
    view = LiveView(p, console=console)
    assert view.mode == "live"
    with view:
        r = go(p, {"b": {"sleep": 0.3}, "c": {"sleep": 0.05, "raise": "Boom"}}, on_event=view.on_event)
        frame = view._render()
    console.print(frame)
    text = out.getvalue()
    assert r.status == "compensated"
    assert "a" in text and "undo: succeeded" in text and "compensated" in text


def test_the_package_exports_the_runtime() -> None:
    import flowdsl
    from flowdsl.runtime import local, report

    assert (flowdsl.run, flowdsl.run_flow, flowdsl.LocalRun, flowdsl.RunResult) == (
        local.run, local.run_flow, local.LocalRun, report.RunResult)
    r = flowdsl.run(plan("steps: [conf.a]\n"), {"script": {"a": {"result": {"v": 1}}}}, record=False)
    assert (r.status, r.context["v"], r.exit_code, r.ok) == ("completed", 1, 0, True)
    assert "status='completed'" in repr(r)


# --- the run input: bytes that are not UTF-8, malformed --set paths, run ids ------------------------------------


@pytest.mark.parametrize(("make", "stdin", "message"), [
    (lambda t: ["--input", _write_bytes(t / "bin.json", b"\xff\xfe{}")], None,
     "bin.json:1:1: not valid UTF-8 (byte 0xff at offset 0)"),
    (lambda t: ["--input", "-"], b'{"a":\n "\xe9"}', "stdin:2:3: not valid UTF-8 (byte 0xe9 at offset 8)"),
    (lambda t: ["--input", _write(t / "sur.json", '{"a": ["\\ud800"]}')], None,
     "sur.json: the input is not plain JSON data: at /a/0: the text holds a lone surrogate (\\ud800 at character 1)"),
    (lambda t: ["--set", "a=\udcff"], None,
     "--set a=\\xff: the argument is not valid UTF-8 (byte 0xff at character 3)"),
    (lambda t: ["--set", 'a="\\udc00"'], None, "--set a: the value is not plain JSON data: at /: the text holds a "
                                               "lone surrogate"),
    (lambda t: ["--set", "a.=1"], None, "--set a.=1: the key 'a.' has an empty name; a key is one or more names "
                                        "joined by single dots, with none empty (e.g. order.notify=false)"),
    (lambda t: ["--set", ".a=1"], None, "--set .a=1: the key '.a' has an empty name"),
    (lambda t: ["--set", "a..b=1"], None, "--set a..b=1: the key 'a..b' has an empty name"),
    (lambda t: ["--set", "script.x=1", "--set", "script.x.y=2"], None,
     "--set script.x.y=2: it sets what --set script.x=1 sets already"),
    (lambda t: ["--input", "-", "--set", "script.x.y=2"], b'{"script": {"x": 1}}',
     "--set script.x.y=2: 'script.x' is not an object in the input (it is a number)"),
    (lambda t: ["--run-id", ""], None, "--run-id: invalid run id '': use 1-128 letters, digits and _ . : -"),
    (lambda t: ["--input", "-"], b"[1, 2]", "stdin: the run input must be a JSON object, found an array"),
])
def test_bad_run_input_is_a_clear_usage_error(tmp_path: Path, make: Any, stdin: bytes | None, message: str) -> None:
    r = CliRunner().invoke(app, ["run", _spec(tmp_path, "ok"), "--runs-dir", str(tmp_path / "runs"),
                                 *make(tmp_path)], input=stdin)
    assert r.exit_code == 2, r.output
    assert message in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "runs").exists()  # nothing ran


def _write_bytes(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_stdin_input_in_utf8_is_read_exactly(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["run", _spec(tmp_path, "ok"), "-i", "-", "-f", "json", "--no-record"],
                           input='{"name": "Zoë ✓"}'.encode())
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["context"]["name"] == "Zoë ✓"


def test_a_worker_result_that_is_not_valid_unicode_fails_its_attempt(tmp_path: Path) -> None:
    reg = WorkerRegistry()

    async def lone(data: Any, ctx: Any) -> Any:
        return {"text": "half a pair: \ud83d"}

    reg.register("lone", lone)
    p = compile_text("flowdsl: 1\nname: t\nsteps: [lone]\n")
    r = asyncio.run(run_flow(p, {}, run_id="u1", runs_dir=tmp_path, registry=reg, import_workers=False))
    assert (r.status, r.error["type"]) == ("failed", "OutputInvalid")
    assert "at /text: the text holds a lone surrogate (\\ud83d at character 14)" in r.error["message"]
    header, lines = read_record(tmp_path / "u1.jsonl")  # the record was written whole
    assert header is not None and lines[-1]["type"] == "run_finished"


# --- BaseExceptions raised by workers ------------------------------------------------------------------------


def _base_registry() -> WorkerRegistry:
    reg = WorkerRegistry()

    async def ok(data: Any, ctx: Any) -> Any:
        return {"done": True}

    async def undo(data: Any, ctx: Any) -> Any:
        return {}

    async def kbi(data: Any, ctx: Any) -> Any:
        raise KeyboardInterrupt("raised by the worker")

    async def kbi_later(data: Any, ctx: Any) -> Any:
        await asyncio.sleep(0.01)
        raise KeyboardInterrupt("raised after a wait")

    def kbi_sync(data: Any, ctx: Any) -> Any:
        raise KeyboardInterrupt("raised in a thread")

    async def genexit(data: Any, ctx: Any) -> Any:
        raise GeneratorExit("closed")

    for name, fn in [("ok", ok), ("undo", undo), ("kbi", kbi), ("kbi_later", kbi_later), ("kbi_sync", kbi_sync),
                     ("genexit", genexit)]:
        reg.register(name, fn)
    return reg


@pytest.mark.parametrize(("worker", "error_type", "message"), [
    ("kbi", "KeyboardInterrupt", "raised by the worker"),
    ("kbi_later", "KeyboardInterrupt", "raised after a wait"),
    ("kbi_sync", "KeyboardInterrupt", "raised in a thread"),
    ("genexit", "GeneratorExit", "closed"),
])
def test_a_base_exception_a_worker_raises_fails_its_step_and_the_run_is_compensated(
        worker: str, error_type: str, message: str, tmp_path: Path) -> None:
    """As with sys.exit() in a worker: the step fails with that error type, what completed is undone, the record
    ends with the run's end (not runtime_aborted)."""
    p = compile_text(f"flowdsl: 1\nname: t\nsteps:\n  - ok: {{compensate: undo}}\n  - {worker}\n")
    r = asyncio.run(run_flow(p, {}, run_id="b1", runs_dir=tmp_path, registry=_base_registry(),
                             import_workers=False, handle_sigint=True))
    assert (r.status, r.failed_step, r.compensated) == ("compensated", worker, ["ok"])
    assert r.error == {"type": error_type, "message": message, "types": [error_type]}
    _, lines = read_record(tmp_path / "b1.jsonl")
    assert lines[-1]["type"] == "run_finished"


def test_the_cli_reports_a_worker_keyboard_interrupt_as_a_failed_step(tmp_path: Path) -> None:
    (tmp_path / "kbi_cli_workers.py").write_text(
        "from flowdsl import worker\n\n\n@worker('kbi.ok')\nasync def ok(data, ctx):\n    return {}\n\n\n"
        "@worker('kbi.undo')\nasync def undo(data, ctx):\n    return {}\n\n\n"
        "@worker('kbi.bad')\ndef bad(data, ctx):\n    raise KeyboardInterrupt('from the worker')\n")
    spec = _write(tmp_path / "kbi.yaml", "flowdsl: 1\nname: kbi\nworkers: [kbi_cli_workers]\nsteps:\n"
                                         "  - a: {worker: kbi.ok, compensate: kbi.undo}\n  - b: {worker: kbi.bad}\n")
    proc = subprocess.run([sys.executable, "-m", "flowdsl", "run", spec, "--runs-dir", str(tmp_path / "runs"),
                           "--run-id", "k1"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "compensated, in this order: a (kbi.undo)" in proc.stderr
    assert "KeyboardInterrupt: from the worker" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("waits_first", [False, True])
def test_a_real_ctrl_c_while_a_worker_runs_is_not_taken_for_its_failure(waits_first: bool) -> None:
    """Without the runtime's own Ctrl-C handling, the KeyboardInterrupt of a real SIGINT that lands inside a worker
    still stops the run (as Python does), where a KeyboardInterrupt the worker raises itself fails its step — raised
    where the run is awaited, through its cleanup (it escaped from the attempt's own task, leaving the run's
    pending and its handlers in place)."""
    reg = WorkerRegistry()

    async def presses_ctrl_c(data: Any, ctx: Any) -> Any:
        if waits_first:
            await asyncio.sleep(0.01)
        signal.raise_signal(signal.SIGINT)  # the default handler raises KeyboardInterrupt right here
        return {}

    reg.register("presses_ctrl_c", presses_ctrl_c)
    p = compile_text("flowdsl: 1\nname: t\nsteps: [presses_ctrl_c]\n")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(run_flow(p, {}, record=False, registry=reg, import_workers=False))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the marking handler is gone
    finally:
        loop.close()
        signal.signal(signal.SIGINT, previous)


# --- show: a record whose header is not what a run writes ---------------------------------------------------


@pytest.mark.parametrize(("change", "message"), [
    (lambda h: {**h, "plan": {}}, ":1: the record's header is malformed: 'plan' is not a flowdsl execution plan: "
                                  "it has no 'plan_version'"),
    (lambda h: {**h, "plan": {**h["plan"], "nodes": {"ok": 1}, "root": ["ok"]}},
     ":1: the record's header is malformed: 'plan' is not a flowdsl execution plan: 'nodes/ok': 1 is not of "
     "type 'object'"),
    (lambda h: {**h, "plan": {**h["plan"], "root": "a"}},
     ":1: the record's header is malformed: 'plan' is not a flowdsl execution plan: 'root': 'a' is not of type "
     "'array'"),
    (lambda h: {**h, "input": [1]}, ":1: the record's header is malformed: 'input' must be an object"),
    (lambda h: {k: v for k, v in h.items() if k != "plan"}, ":1: the record's header is malformed: it has no 'plan'"),
])
def test_show_names_what_is_malformed_in_a_record_header(tmp_path: Path, change: Any, message: str) -> None:
    assert cli("run", _spec(tmp_path, "ok"), "--runs-dir", str(tmp_path), "--run-id", "h1").exit_code == 0
    record = tmp_path / "h1.jsonl"
    header, *rest = record.read_text().splitlines(keepends=True)
    record.write_text(json.dumps(change(json.loads(header))) + "\n" + "".join(rest))
    shown = cli("show", "h1", "--runs-dir", str(tmp_path))
    assert shown.exit_code == 2 and f"error: {record}{message}" in shown.stderr, shown.stderr
    assert "object is not subscriptable" not in shown.stderr and "'nodes'" not in shown.stderr


def test_show_names_the_bad_byte_and_a_malformed_start(tmp_path: Path) -> None:
    assert cli("run", _spec(tmp_path, "ok"), "--runs-dir", str(tmp_path), "--run-id", "h2").exit_code == 0
    record = tmp_path / "h2.jsonl"
    good = record.read_bytes()
    record.write_bytes(good.replace(b'"record"', b'"rec\xffrd"', 1))
    shown = cli("show", "h2", "--runs-dir", str(tmp_path))
    assert shown.exit_code == 2 and f"{record}:1:" in shown.stderr and "not valid UTF-8 (byte 0xff" in shown.stderr
    header, start, *rest = good.decode().splitlines(keepends=True)
    record.write_text(header + json.dumps({**json.loads(start), "input": 3}) + "\n" + "".join(rest))
    shown = cli("show", "h2", "--runs-dir", str(tmp_path))
    assert shown.exit_code == 2 and "the record's 'start' event is malformed" in shown.stderr


# --- --format json: exactly one JSON object on stdout, whatever happens -----------------------------------------


@pytest.mark.parametrize(("make", "status", "error_type"), [
    (lambda t: [_spec(t, "bad", "flowdsl: 1\nname: bad\nsteps: [conf.a]\nbogus: 1\n")], "rejected", "SpecRejected"),
    (lambda t: [_spec(t, "ok"), "--input", str(t / "missing.json")], "error", "InputInvalid"),
    (lambda t: [_spec(t, "ok"), "--set", "a..b=1"], "error", "InputInvalid"),
    (lambda t: [_spec(t, "ok"), "--run-id", "bad/id"], "error", "UsageError"),
    (lambda t: [_spec(t, "ok"), "--detach"], "error", "UsageError"),
    (lambda t: [_spec(t, "ok"), "--backend", "redis", "--redis-url", "ftp://nowhere"], "error", "RedisError"),
])
def test_with_format_json_every_refusal_is_one_json_object(tmp_path: Path, make: Any, status: str,
                                                           error_type: str) -> None:
    r = cli("run", *make(tmp_path), "--format", "json")
    assert r.exit_code == 2, r.output
    out = json.loads(r.stdout)  # one object, nothing else
    assert isinstance(out, dict) and out["status"] == status and out["error"]["type"] == error_type
    assert out["error"]["message"] in r.stderr  # the same sentence people read on stderr
    if status == "rejected":
        assert [d["code"] for d in out["diagnostics"]] == ["FD202"]
        assert "FD202" in r.stderr  # and the diagnostics, as a compiler prints them, on stderr


def test_with_format_json_what_workers_write_to_fd_1_goes_to_stderr(tmp_path: Path) -> None:
    """os.write(1, ...) — at import, in an async worker, in a sync worker's thread, from a child process — does not
    reach stdout, which carries the one JSON object; the shell's stdout is back in place afterwards."""
    (tmp_path / "fd1_workers.py").write_text(
        "import os, subprocess, sys\nfrom flowdsl import worker\nos.write(1, b'import noise\\n')\n\n\n"
        "@worker('fd1.a')\nasync def a(data, ctx):\n    os.write(1, b'async noise\\n')\n    return {'x': 1}\n\n\n"
        "@worker('fd1.s')\ndef s(data, ctx):\n    os.write(1, b'thread noise\\n')\n"
        "    subprocess.run([sys.executable, '-c', 'print(\"child noise\")'], check=True)\n    return {}\n")
    spec = _write(tmp_path / "fd1.yaml", "flowdsl: 1\nname: fd1\nworkers: [fd1_workers]\nsteps:\n"
                                         "  - a: {worker: fd1.a}\n  - s: {worker: fd1.s}\n")
    script = ("import os, sys\nfrom flowdsl.cli import main\ntry:\n    main()\nexcept SystemExit as e:\n"
              "    os.write(1, b'AFTER\\n')\n    sys.exit(e.code)\n")
    proc = subprocess.run([sys.executable, "-c", script, "run", spec, "--format", "json", "--no-record"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    body, after = proc.stdout.rsplit("\n", 2)[:2], proc.stdout.splitlines()[-1]
    assert after == "AFTER" and json.loads(body[0])["status"] == "completed"  # fd 1 is restored after the run
    for noise in ("import noise", "async noise", "thread noise", "child noise"):
        assert noise in proc.stderr and noise not in proc.stdout
    rejected = subprocess.run([sys.executable, "-c", script, "run", spec, "--format", "json", "--set", "x.=1"],
                              capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert rejected.returncode == 2
    first, second = rejected.stdout.splitlines()
    assert json.loads(first)["error"]["type"] == "InputInvalid" and second == "AFTER"


def test_the_json_channel_restores_stdout_however_the_block_ends(capfd: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from flowdsl.cli import _JsonChannel

    monkeypatch.setattr(sys, "stdout", open(1, "w", closefd=False))  # noqa: SIM115
    before = os.fstat(1)
    with pytest.raises(RuntimeError), _JsonChannel(True) as channel:
        os.write(1, b"noise\n")
        channel.emit({"one": 1})
        raise RuntimeError("ends abruptly")
    after = os.fstat(1)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    out, err = capfd.readouterr()
    assert out == '{"one": 1}\n' and "noise" in err


# --- a failure in the same turn of the loop as the dispatch of a sibling --------------------------------------


@pytest.mark.parametrize("shape", ["parallel", "for_each", "bad_with"])
def test_a_sibling_dispatched_in_the_same_turn_as_a_failure_is_cancelled_and_answers(shape: str) -> None:
    """The abort cancels an attempt whose task has not taken its first step yet: the attempt must still see
    CancelledError at its await (its cleanup runs) and answer task_cancelled, so that the run ends."""
    reg = WorkerRegistry()
    cleaned: list[str] = []

    async def slow(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        try:
            await asyncio.sleep(0.3)
        finally:
            cleaned.append(ctx.step_id)
        return {}

    async def fail_at_once(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        raise RuntimeError("boom")

    async def fail_second(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        await asyncio.sleep(0.05)
        if data["item"] == 2:
            raise RuntimeError("boom")
        await asyncio.sleep(0.3)
        return {}

    async def undo(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {}

    for name, fn in [("slow", slow), ("fail_at_once", fail_at_once), ("fail_second", fail_second), ("undo", undo)]:
        reg.register(name, fn)
    steps = {
        "parallel": "  - parallel: p\n    branches:\n      - b: {worker: slow, compensate: undo}\n"
                    "      - c: {worker: fail_at_once}\n",
        "for_each": "  - for_each: L\n    items: '${ [1, 2, 3, 4] }'\n    concurrency: 2\n"
                    "    steps:\n      - it: {worker: fail_second, compensate: undo}\n",
        "bad_with": "  - parallel: p\n    branches:\n      - b: {worker: slow}\n"
                    "      - c: {worker: slow, with: {x: \"${ $number('abc') }\"}}\n",
    }[shape]
    plan_ = compile_text(f"flowdsl: 1\nname: same_turn\nsteps:\n{steps}")

    async def main() -> Any:
        return await asyncio.wait_for(run_flow(plan_, {}, record=False, registry=reg, import_workers=False), 10)

    result = asyncio.run(main())
    assert result.status in ("failed", "compensated"), result.status
    assert all(s["status"] != "running" for s in result.steps.values()), result.steps
    if shape != "for_each":
        assert cleaned == ["b"]  # the cancelled attempt saw CancelledError at its await: its finally ran


# --- retry filters and base classes; the step logger -------------------------------------------------------


@pytest.mark.parametrize("sync", [False, True])
def test_a_retry_filter_covers_the_subclasses_of_the_class_it_names(sync: bool, tmp_path: Path) -> None:
    """`on: [ConnectionError]` retries a ConnectionRefusedError, as `except ConnectionError` would; the record
    keeps the class names of the error's MRO, and replaying it reproduces the decisions."""
    reg = WorkerRegistry()
    calls: list[int] = []

    def refused(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        calls.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionRefusedError("refused")
        if data.get("invalid"):
            raise json.JSONDecodeError("bad", "x", 0)
        return {"ok": ctx.attempt}

    async def refused_async(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return refused(data, ctx)

    reg.register("refused", refused if sync else refused_async)
    spec = ("flowdsl: 1\nname: sub\nsteps:\n  - s: {worker: refused, retry: {attempts: 4, initial: 1ms, "
            "\"on\": [ConnectionError], not_on: [ValueError]}}\n")
    r = asyncio.run(run_flow(compile_text(spec), {}, run_id="sub1", runs_dir=tmp_path, registry=reg,
                             import_workers=False))
    assert (r.status, r.steps["s"]["attempts"], calls) == ("completed", 3, [1, 2, 3])
    retrying = [e for e in r.events if e["type"] == "step_retrying"]
    assert [e["error"] for e in retrying] == [{"type": "ConnectionRefusedError", "message": "refused", "types": [
        "ConnectionRefusedError", "ConnectionError", "OSError", "Exception"]}] * 2
    header, lines = read_record(tmp_path / "sub1.jsonl")
    inputs = [line for line in lines if line["type"] in RECORDED_INPUTS]
    _, _, emitted = replay(header["plan"], inputs)
    assert [e["type"] for e in emitted] == [e["type"] for e in r.events]
    calls.clear()  # not_on: [ValueError] stops at a JSONDecodeError (a ValueError) after the retried refusals
    r = asyncio.run(run_flow(compile_text(spec), {"invalid": True}, record=False, registry=reg, import_workers=False))
    assert (r.status, r.steps["s"]["attempts"], r.error["type"]) == ("failed", 3, "JSONDecodeError")


def test_the_step_logger_says_which_run_step_and_attempt_a_line_is_from() -> None:
    import logging

    reg = WorkerRegistry()

    async def chatty(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        ctx.logger.info("charging %s", data["item"], extra={"order": "o-1"})
        await asyncio.sleep(0)
        if ctx.attempt == 1:
            raise TimeoutError("slow")
        return {}

    reg.register("pay.chatty", chatty)
    spec = ("flowdsl: 1\nname: logs\nsteps:\n  - for_each: lines\n    items: '${ [1, 2] }'\n    steps:\n"
            "      - charge: {worker: pay.chatty, with: {item: '${ $item }'}, retry: {attempts: 2, initial: 1ms}}\n")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("flowdsl.worker.pay.chatty")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        async def both() -> list[Any]:
            return list(await asyncio.gather(*(run_flow(compile_text(spec), {}, run_id=run_id, record=False,
                                                        registry=reg, import_workers=False)
                                               for run_id in ("run-a", "run-b"))))

        assert [r.status for r in asyncio.run(both())] == ["completed", "completed"]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert {r.name for r in records} == {"flowdsl.worker.pay.chatty"}  # the documented logger name
    seen = sorted((r.run_id, r.idempotency_key, r.attempt, r.step_id, r.order, r.getMessage())  # type: ignore[attr-defined]
                  for r in records)
    assert seen == sorted((run, f"{run}/lines[{i}]/charge", attempt, "charge", "o-1",
                           f"[{run}/lines[{i}]/charge#{attempt}] charging {i + 1}")
                          for run in ("run-a", "run-b") for i in (0, 1) for attempt in (1, 2))


async def _bounded_call(data: Any, ctx: Any) -> dict[str, Any]:
    """A worker bounding its own slow call with asyncio.timeout, as the asyncio docs recommend."""
    if ctx.attempt == 1 and data.get("flaky"):
        raise ConnectionError("the first attempt fails")
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(0.2):
            await asyncio.sleep(3)
    except TimeoutError:
        return {"own_timeout_after": time.monotonic() - t0}
    return {"own_timeout_after": None}


async def _grouped(data: Any, ctx: Any) -> dict[str, Any]:
    """A worker whose TaskGroup's sub-call fails: the group cancels the rest and the worker fails."""
    async def fails() -> None:
        await asyncio.sleep(0.05)
        raise ValueError("the sub-call failed")

    async with asyncio.TaskGroup() as group:
        group.create_task(fails())
        await asyncio.sleep(3)
    return {}


async def _quick(data: Any, ctx: Any) -> dict[str, Any]:
    await asyncio.sleep(0.01)
    return {}


@pytest.mark.parametrize("steps,run_input", [
    ("  - own.bounded\n", {}),  # dispatched by the run's start
    ("  - own.quick\n  - own.bounded\n", {}),  # dispatched as the step before answers
    ("  - own.bounded: {retry: {attempts: 2, initial: 10ms}}\n", {"flaky": True}),  # by a retry's timer
], ids=["first", "after_a_step", "retried"])
def test_a_worker_s_own_asyncio_timeout_binds_to_its_own_attempt(steps: str, run_input: dict[str, Any]) -> None:
    """The worker's first step ran by hand in whatever task was current: its own timeout cancelled the task running
    the whole run (a traceback, nothing compensated), never fired (the previous attempt's finished task), or raised
    'Timeout should be used inside a task' (a timer's callback, no task)."""
    reg = WorkerRegistry()
    for name, fn in [("own.bounded", _bounded_call), ("own.quick", _quick)]:
        reg.register(name, fn)
    plan = compile_text(HEADER.format(name="own") + "steps:\n" + steps)
    result = asyncio.run(asyncio.wait_for(run_flow(plan, run_input, record=False, registry=reg,
                                                   import_workers=False), 10))
    assert result.status == "completed", result.error
    assert 0.2 <= result.context["own_timeout_after"] < 2.5  # its own timeout fired, not the 3 s sleep's end


def test_a_worker_s_own_task_group_fails_its_attempt_not_the_run() -> None:
    reg = WorkerRegistry()
    reg.register("own.grouped", _grouped)
    plan = compile_text(HEADER.format(name="own") + "steps:\n  - own.grouped\n")
    result = asyncio.run(asyncio.wait_for(run_flow(plan, {}, record=False, registry=reg, import_workers=False), 10))
    assert result.status == "failed" and result.error["type"] == "ExceptionGroup", result.error
