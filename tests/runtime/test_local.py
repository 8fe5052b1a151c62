"""The local asyncio runtime: concurrency, timeouts, workers and their errors, cancelling, records,
replay, the JSON output and the CLI's exit codes.

Concurrency is shown by the order of events and by overlapping execution
intervals the workers report, never by wall-time bounds.
"""

from __future__ import annotations

import asyncio
import json
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
from flowdsl.runtime.record import read_record
from flowdsl.runtime.report import result_from_record
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


def test_an_aborting_run_waits_for_a_sync_worker_and_undoes_it() -> None:
    p = plan("steps:\n  - parallel: p\n    branches:\n      - sync.a: {compensate: undo.a}\n      - conf.b\n")
    r = go(p, {"a": {"sleep": 0.15}, "b": {"sleep": 0.02, "raise": "Boom"}})
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
    assert "↶ a undone" in shown.stderr and "run finished" in shown.stderr
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
    assert "the record's last line is incomplete" in shown.stderr
    record.write_bytes(b"".join(lines[:4]))  # the process died early: the run has no end in the record
    shown = cli("show", "cut1", "--runs-dir", str(tmp_path), "--format", "json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["status"] == "running"
    assert "the record ends before the run did" in shown.stderr
    record.write_bytes(b"".join(lines[:2]) + b"{not json\n" + b"".join(lines[2:]))  # damage inside: refused
    damaged = cli("show", "cut1", "--runs-dir", str(tmp_path))
    assert damaged.exit_code == 2 and "cut1.jsonl:3: not a JSON line" in damaged.stderr


def test_the_critical_path_runs_through_steps_that_took_no_time_and_a_long_one_is_shortened(tmp_path: Path) -> None:
    """A sequence of quick steps (most under a millisecond): its critical path is the whole sequence, not the
    part up to the last step that took a measurable time; the summary names a long path's ends only."""
    from flowdsl.runtime.report import critical_path

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


def test_no_record_writes_nothing(tmp_path: Path) -> None:
    r = cli("run", _spec(tmp_path, "ok"), "--no-record", "--runs-dir", str(tmp_path / "runs"), "--format", "json")
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
    assert out == "" and "was aborted while compensating" in err and "Traceback" not in err
    _, lines = read_record(record)
    assert lines[-1]["type"] == "runtime_aborted"


# --- the live view and the public API ---------------------------------------------------------------


def test_the_live_view_draws_on_a_terminal() -> None:
    import io

    from rich.console import Console

    from flowdsl.runtime.report import LiveView

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
