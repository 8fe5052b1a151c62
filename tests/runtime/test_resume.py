"""`flowdsl resume`: a local run whose process stopped before the run's end goes on from its record, in another
process — the attempts it had in flight run again (same attempt, same idempotency key), its timers are armed again
(an attempt's timeout afresh), nothing that completed runs again, and the record tells the whole run (`show`,
`runs`) with the process now running it.

The crashes are real: each test starts its own `flowdsl run` (or `flowdsl resume`) process and SIGKILLs it, by its
PID; every wait is bounded. The scripted workers (tests.runtime.workers) log each call to a file, so the calls of a
killed process are counted too.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from flowdsl.runtime import owner
from flowdsl.runtime.local import LocalRun, RunAborted
from flowdsl.runtime.record import RESUMED, read_record
from flowdsl.runtime.resume import NotResumable, prepare_resumption, resume_flow
from tests.runtime.conformance import HEADER
from tests.runtime.test_local import ROOT, _wait_for
from tests.runtime.test_stopped_runs import _env, _kill, _listed, _rewrite_header, _shown, cli
from tests.spawned import wait_for_file

#: a (undo.a), then b (undo.b), then c
STEPS = "steps:\n  - conf.a: {compensate: undo.a}\n  - conf.b: {compensate: undo.b}\n  - conf.c\n"


def _script(tmp: Path, **extra: dict[str, Any]) -> dict[str, Any]:
    """Every step and undo logs its calls to ``tmp/calls.log``; ``extra`` adds to a key's outcome."""
    log = str(tmp / "calls.log")
    script: dict[str, Any] = {key: {"log": log} for key in ("a", "b", "c", "a/compensate", "b/compensate")}
    for key, more in extra.items():
        script[key.replace("__", "/")] = {**script.get(key.replace("__", "/"), {}), **more}
    return script


def _calls(tmp: Path) -> list[tuple[str, str, int, int]]:
    """(role, idempotency key, attempt, pid) of each call, in order."""
    lines = (tmp / "calls.log").read_text().splitlines()
    return [(c["role"], c["key"], c["attempt"], c["pid"]) for c in map(json.loads, lines)]


def _spec(tmp: Path, steps: str = STEPS) -> Path:
    spec = tmp / "flow.yaml"
    spec.write_text(HEADER.format(name="resumable") + steps)
    return spec


def _flowdsl(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", "from flowdsl.cli import main; main()", *args], cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _start(tmp: Path, run_id: str, script: dict[str, Any], steps: str = STEPS) -> subprocess.Popen[str]:
    return _flowdsl("run", str(_spec(tmp, steps)), "--format", "json", "--set", f"script={json.dumps(script)}",
                    "--runs-dir", str(tmp / "runs"), "--run-id", run_id)


def _resume_cli(tmp: Path, run_id: str, *args: str) -> tuple[int, dict[str, Any], str]:
    r = cli("resume", run_id, "--runs-dir", str(tmp / "runs"), "--format", "json", *args)
    return r.exit_code, json.loads(r.stdout), " ".join(r.stderr.split())


def _crash_in_b(tmp: Path, run_id: str, steps: str = STEPS, b_sleep: float | None = None,
                **extra: dict[str, Any]) -> int:
    """Start a run of ``steps`` whose b hangs (unless ``go`` exists; then it sleeps ``b_sleep`` s, if given), kill
    its process once b was called: its pid."""
    b: dict[str, Any] = {"mark": str(tmp / "b.called"), "hang_unless": str(tmp / "go")}
    if b_sleep is not None:
        b["sleep"] = b_sleep
    proc = _start(tmp, run_id, _script(tmp, b=b, **extra), steps)
    wait_for_file(tmp / "b.called", proc)
    _wait_for(tmp / "runs" / f"{run_id}.jsonl", "step_scheduled", "b", proc)
    _kill(proc)
    return proc.pid


def test_a_crashed_run_resumed_runs_only_what_was_in_flight_again_and_completes(tmp_path: Path) -> None:
    first = _crash_in_b(tmp_path, "r1")
    assert _listed(tmp_path / "runs")["r1"]["status"] == "crashed"
    (tmp_path / "go").touch()

    code, out, said = _resume_cli(tmp_path, "r1")
    assert code == 0 and out["status"] == "completed", said
    me = os.getpid()
    assert _calls(tmp_path) == [("step", "r1/a", 1, first), ("step", "r1/b", 1, first),  # a: once, before the crash
                                ("step", "r1/b", 1, me), ("step", "r1/c", 1, me)]  # b again: same attempt and key
    assert out["steps"]["b"]["attempts"] == 1 and out["compensated"] == []
    [again] = out["resumed"]
    assert (again["was"], again["pid"], again["attempts"]) == ("crashed", me, ["r1/b#1"])
    assert out["events"][0]["type"] == "run_started" and out["events"][-1]["type"] == "run_finished"  # all of them

    listed = _listed(tmp_path / "runs")["r1"]
    assert listed["status"] == "completed"
    shown, _ = _shown(tmp_path / "runs", "r1")  # the whole record replays, the resumed part too
    assert shown["status"] == "completed" and shown["resumed"] == out["resumed"]
    text = " ".join(cli("show", "r1", "--runs-dir", str(tmp_path / "runs")).stdout.split())
    assert f"resumed by {owner.by_whom()} (pid {me} on " in text and "its process had died" in text
    assert "run again: r1/b#1" in text


def test_a_run_crashed_while_undoing_is_resumed_to_compensated_each_undo_done_once_more_at_most(
        tmp_path: Path) -> None:
    script = _script(tmp_path, c={"raise": "Boom"},
                     b__compensate={"mark": str(tmp_path / "undo.called"), "hang_unless": str(tmp_path / "go")})
    proc = _start(tmp_path, "r2", script)
    wait_for_file(tmp_path / "undo.called", proc)
    _wait_for(tmp_path / "runs" / "r2.jsonl", "compensation_started", "b", proc)
    _kill(proc)
    (tmp_path / "go").touch()

    code, out, said = _resume_cli(tmp_path, "r2")
    assert code == 1 and out["status"] == "compensated" and out["compensated"] == ["b", "a"], said
    undos = [(role, key, pid) for role, key, _, pid in _calls(tmp_path) if role == "compensate"]
    assert undos == [("compensate", "r2/b/compensate", proc.pid), ("compensate", "r2/b/compensate", os.getpid()),
                     ("compensate", "r2/a/compensate", os.getpid())]
    assert [(role, key) for role, key, _, _ in _calls(tmp_path) if role == "step"] == [
        ("step", "r2/a"), ("step", "r2/b"), ("step", "r2/c")]  # no step ran again


def test_an_attempts_timeout_is_given_afresh_to_the_attempt_run_again(tmp_path: Path) -> None:
    """b's timeout (1.5 s) passed while its process was dead; run again, b takes 0.3 s and succeeds — the timer
    armed at its old time would have failed it at once."""
    steps = "steps:\n  - conf.a\n  - conf.b: {timeout: 1500ms}\n"
    _crash_in_b(tmp_path, "r3", steps, b_sleep=0.3)
    _move_back(tmp_path / "runs" / "r3.jsonl", 1_600)  # b's 1.5 s passed while the process was dead
    (tmp_path / "go").touch()
    code, out, said = _resume_cli(tmp_path, "r3")
    assert code == 0 and out["status"] == "completed" and out["steps"]["b"]["attempts"] == 1, said


def test_a_retry_wait_that_passed_while_the_run_stood_fires_at_once(tmp_path: Path) -> None:
    steps = "steps:\n  - conf.a: {retry: {attempts: 2, initial: 60s}}\n"
    log = str(tmp_path / "calls.log")
    proc = _start(tmp_path, "r4", {"a": [{"log": log, "raise": "Flaky"}, {"log": log}]}, steps)
    _wait_for(tmp_path / "runs" / "r4.jsonl", "step_retrying", "a", proc)
    _kill(proc)
    _move_back(tmp_path / "runs" / "r4.jsonl", 61_000)  # the 60 s wait passed while the run stood
    started = time.monotonic()
    code, out, said = _resume_cli(tmp_path, "r4")
    assert code == 0 and out["steps"]["a"]["attempts"] == 2, said
    assert time.monotonic() - started < 30  # (not the 60 s wait)


def test_a_run_stopped_at_once_is_resumed_and_undone(tmp_path: Path) -> None:
    """A second Ctrl-C (abort) stopped the run at once as c failed and b's undo ran: resumed, the saga finishes."""
    from flowdsl import compile_spec

    plan = compile_spec(_spec(tmp_path)).plan
    assert plan is not None
    runs = tmp_path / "runs"
    script = _script(tmp_path, c={"raise": "Boom"}, b__compensate={"hang_unless": str(tmp_path / "go")})

    _abort_when(plan, script, "r5", runs, "compensation_started")
    assert _listed(runs)["r5"]["status"] == "aborted"
    # the process that stopped it at once (this one) still runs: an attempt the stop abandoned may still run here
    refused = _flowdsl("resume", "r5", "--runs-dir", str(runs), "--format", "json")
    try:
        stdout, stderr = refused.communicate(timeout=60)
    finally:
        if refused.poll() is None:  # (it went on with the run: b's undo hangs)
            _kill(refused)
    out, said = json.loads(stdout), " ".join(stderr.split())
    assert (refused.returncode, out["error"]["type"], out["run_status"]) == (1, "StillRunning", "aborted"), said
    assert f"pid {os.getpid()}" in said and "add --force" in said
    # resumed (--force: nothing of it runs here any more) in a process of its own, where b's undo hangs again: the
    # stop at once before tells of the process before — the run is going (not aborted), and resuming it again is
    # refused while that process runs
    second = _flowdsl("resume", "r5", "--runs-dir", str(runs), "--format", "json", "--force")
    try:
        deadline = time.monotonic() + 30
        while sum(1 for call in _calls(tmp_path) if call[1] == "r5/b/compensate") < 2:
            assert second.poll() is None and time.monotonic() < deadline, second.stderr
            time.sleep(0.05)
        assert _listed(runs)["r5"]["status"] == "compensating"
        shown, _ = _shown(runs, "r5")
        assert shown["status"] == "compensating" and "aborted" not in shown
        code, out, said = _resume_cli(tmp_path, "r5")
        assert (code, out["error"]["type"]) == (1, "StillRunning") and f"pid {second.pid}" in said
    finally:
        _kill(second)
    assert _listed(runs)["r5"]["status"] == "crashed"
    (tmp_path / "go").touch()
    result = asyncio.run(resume_flow("r5", runs_dir=runs))
    assert (result.status, result.compensated) == ("compensated", ["b", "a"])
    assert [r["was"] for r in result.resumed] == ["aborted", "crashed"]
    assert _listed(runs)["r5"]["status"] == "compensated"
    shown, _ = _shown(runs, "r5")
    assert shown["status"] == "compensated" and "aborted" not in shown  # the stop before tells of the process before


def test_a_resumed_run_is_judged_by_the_process_running_it_now(tmp_path: Path) -> None:
    """Resumed in a process of its own that hangs in b again: listed running (not crashed: its first process is
    gone but the resuming one runs); that one killed too, it is crashed again, and resumed again to its end."""
    first = _crash_in_b(tmp_path, "r6")
    runs = tmp_path / "runs"
    second = _flowdsl("resume", "r6", "--runs-dir", str(runs), "--format", "json")
    try:
        deadline = time.monotonic() + 30
        while sum(1 for call in _calls(tmp_path) if call[1] == "r6/b") < 2:
            assert second.poll() is None and time.monotonic() < deadline, second.stderr
            time.sleep(0.05)
        assert _listed(runs)["r6"]["status"] == "running"
        code, out, said = _resume_cli(tmp_path, "r6")
        assert (code, out["error"]["type"]) == (1, "StillRunning") and f"pid {second.pid}" in said
    finally:
        _kill(second)
    assert _listed(runs)["r6"]["status"] == "crashed"
    (tmp_path / "go").touch()
    code, out, said = _resume_cli(tmp_path, "r6")
    assert code == 0 and out["status"] == "completed", said
    assert [r["pid"] for r in out["resumed"]] == [second.pid, os.getpid()]
    assert [pid for _, key, _, pid in _calls(tmp_path) if key == "r6/b"] == [first, second.pid, os.getpid()]


def test_two_resumes_of_one_run_never_both_go_on(tmp_path: Path) -> None:
    _crash_in_b(tmp_path, "r7")
    path = tmp_path / "runs" / "r7.jsonl"
    one, two = prepare_resumption(path), prepare_resumption(path)
    fh = one.begin(int(time.time() * 1000))
    fh.close()
    with pytest.raises(NotResumable, match="changed while resume read it") as caught:
        two.begin(int(time.time() * 1000))
    assert caught.value.kind == "Changed"
    _, lines = read_record(path)
    assert [e["type"] for e in lines].count(RESUMED) == 1


def test_a_record_cut_short_as_its_process_died_is_completed_before_the_run_goes_on(tmp_path: Path) -> None:
    """The process died between writing an input event and the events it caused, in the middle of a line: the
    torn line is dropped, the missing events are written from the replay, and the whole record reads back."""
    _crash_in_b(tmp_path, "r8")
    path = tmp_path / "runs" / "r8.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    answered = max(i for i, raw in enumerate(lines) if json.loads(raw)["type"] == "task_succeeded")
    assert json.loads(lines[answered + 1])["type"] == "step_succeeded"
    path.write_bytes(b"".join(lines[:answered + 1]) + lines[answered + 1][:25])  # a's success: cut mid-line
    _, before = read_record(path)
    assert before.cut_short and before[-1]["type"] == "task_succeeded"
    (tmp_path / "go").touch()
    code, out, said = _resume_cli(tmp_path, "r8")
    assert code == 0 and out["status"] == "completed", said
    shown, _ = _shown(tmp_path / "runs", "r8")
    assert shown["status"] == "completed" and shown["events"] == out["events"]
    _, after = read_record(path)
    assert not after.cut_short and [e["type"] for e in after].count("step_succeeded") == 3


@pytest.mark.parametrize("case", ["ended", "resolved", "not_started", "unrecorded", "elsewhere"])
def test_what_cannot_be_resumed_is_refused_saying_why(tmp_path: Path, case: str) -> None:
    runs = tmp_path / "runs"
    if case == "ended":
        (tmp_path / "go").touch()
        proc = _start(tmp_path, "x", _script(tmp_path))
        proc.communicate(timeout=60)
        kind, text = "Ended", "ended completed: there is nothing to resume"
    else:
        _crash_in_b(tmp_path, "x")
        path = runs / "x.jsonl"
        if case == "resolved":
            assert cli("resolve", "x", "--runs-dir", str(runs), "--note", "undone by hand").exit_code == 0
            kind, text = "Resolved", "was resolved by hand"
        elif case == "not_started":
            path.write_bytes(path.read_bytes().split(b"\n", 1)[0] + b"\n")
            kind, text = "NotStarted", "had not started"
        elif case == "unrecorded":
            with open(path, "a") as fh:
                fh.write(json.dumps({"type": "record_failed", "run_id": "x", "at": 1, "status": "running",
                                     "reason": "No space left on device"}) + "\n")
            kind, text = "Unrecorded", "the run went on unrecorded"
        else:
            _rewrite_header(path, process={**json.loads(path.read_bytes().split(b"\n", 1)[0])["process"],
                                           "host": "elsewhere", "machine_id": "0" * 32})
            kind, text = "CannotTell", "add --force"
    before = (runs / "x.jsonl").read_bytes()
    code, out, said = _resume_cli(tmp_path, "x")
    assert (code, out["status"], out["error"]["type"]) == (1, "refused", kind) and text in said, said
    assert (runs / "x.jsonl").read_bytes() == before  # nothing written
    if case == "elsewhere":  # told it is gone, it goes on
        (tmp_path / "go").touch()
        code, out, said = _resume_cli(tmp_path, "x", "--force")
        assert code == 0 and out["status"] == "completed" and out["resumed"][0]["was"] == "gone", said


def test_a_run_still_going_is_refused(tmp_path: Path) -> None:
    script = _script(tmp_path, b={"mark": str(tmp_path / "b.called"), "hang": True})
    proc = _start(tmp_path, "live", script)
    try:
        wait_for_file(tmp_path / "b.called", proc)
        _wait_for(tmp_path / "runs" / "live.jsonl", "step_scheduled", "b", proc)
        code, out, said = _resume_cli(tmp_path, "live")
        assert (code, out["error"]["type"]) == (1, "StillRunning") and f"pid {proc.pid}" in said
    finally:
        _kill(proc)


def test_the_workers_are_found_from_the_spec_the_record_names(tmp_path: Path) -> None:
    """Resumed from another directory: the worker module next to the spec is imported from there."""
    work = tmp_path / "flow"
    work.mkdir()
    (work / "resume_here_workers.py").write_text(
        "from flowdsl import worker\n\n@worker('here.a')\nasync def a(data, ctx):\n    return {'a': 1}\n")
    spec = work / "flow.yaml"
    spec.write_text("flowdsl: 1\nname: here\nworkers: [resume_here_workers]\nsteps:\n  - here.a\n")
    runs = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-c", "from flowdsl.cli import main; main()", "run", str(spec),
                           "--runs-dir", str(runs), "--run-id", "h1"], cwd=tmp_path, env=_env(), timeout=60,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    header = json.loads((runs / "h1.jsonl").read_bytes().split(b"\n", 1)[0])
    assert header["spec"] == str(spec)
    lines = (runs / "h1.jsonl").read_bytes().splitlines(keepends=True)
    scheduled = next(i for i, raw in enumerate(lines) if json.loads(raw)["type"] == "step_scheduled")
    (runs / "h1.jsonl").write_bytes(b"".join(lines[:scheduled + 1]))  # as if it died with a in flight
    _rewrite_header(runs / "h1.jsonl", process={**header["process"], "pid": 2 ** 22 + 1})
    resumed = subprocess.run([sys.executable, "-c", "from flowdsl.cli import main; main()", "resume", "h1",
                              "--runs-dir", str(runs), "--format", "json"], cwd=ROOT, env=_env(), timeout=60,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["context"]["a"] == 1


@pytest.mark.parametrize("far", [False, True])
def test_the_process_of_a_resumed_record_is_the_one_its_resume_line_names(tmp_path: Path, far: bool) -> None:
    """A resumed run whose record then stopped where writing failed is judged by the resuming process (here: this
    one, live), not by its header's (dead) — also when the resume line lies further back than the end `runs` reads
    (``far``)."""
    from flowdsl.runtime.listing import TAIL_BYTES, read_row

    _crash_in_b(tmp_path, "u1")
    path = tmp_path / "runs" / "u1.jsonl"
    assert read_row(path).process == "gone"
    lines = [{"type": RESUMED, "run_id": "u1", "at": 1, "by": owner.by_whom(), "was": "crashed",
              "process": owner.this_process(), "attempts": []}]
    if far:  # (answers for no task in flight: ignored by the kernel, and never read by the listing's tail)
        lines += [{"type": "task_started", "task_id": "u1/none#1", "at": 1}] * (TAIL_BYTES // 40)
    lines.append({"type": "record_failed", "run_id": "u1", "at": 2, "status": "running", "reason": "disk full"})
    with open(path, "a") as fh:
        fh.writelines(json.dumps(line) + "\n" for line in lines)
    row = read_row(path)
    assert (row.status, row.process) == ("unrecorded", "live")


def test_a_diagram_of_a_resumed_run_draws_it_going_not_stopped() -> None:
    from flowdsl.render.runstate import derive_states

    plan = {"plan_version": 1, "flow": {"name": "f"}, "root": ["a"],
            "nodes": {"a": {"kind": "task", "worker": "w", "parent": None}}}
    events = [{"type": "run_started", "run_id": "d1"}, {"type": "runtime_aborted", "reason": "x"},
              {"type": RESUMED, "run_id": "d1"}, {"type": "step_scheduled", "step": "a", "node": "a"}]
    assert derive_states(plan, events).status == "running"
    assert derive_states(plan, events[:2]).status == "aborted"


def test_an_attempt_run_again_is_never_cancelled_its_answer_says_what_it_did(tmp_path: Path) -> None:
    """The run's timeout passed while its process was dead: resumed, it fires at once and the run aborts — but b,
    in flight when the process died (it may have taken effect there), runs to its answer and is undone, not
    `cancelled` with nothing to undo."""
    steps = "timeout: 2s\n" + STEPS
    _crash_in_b(tmp_path, "r9", steps, b_sleep=0.5)
    _move_back(tmp_path / "runs" / "r9.jsonl", 2_100)  # the run's 2 s passed while its process was dead
    (tmp_path / "go").touch()
    code, out, said = _resume_cli(tmp_path, "r9")
    assert (code, out["status"], out["error"]["type"]) == (1, "compensated", "RunTimeout"), (said, out)
    assert out["compensated"] == ["b", "a"] and out["steps"]["b"]["status"] == "succeeded"
    assert [(role, key) for role, key, _, _ in _calls(tmp_path)][-3:] == [
        ("step", "r9/b"), ("compensate", "r9/b/compensate"), ("compensate", "r9/a/compensate")]


def test_an_attempt_given_up_on_that_died_with_its_process_stays_in_doubt(tmp_path: Path) -> None:
    """a's first attempt timed out (its sync thread still ran) and the run waited to retry when its process was
    killed; resumed, the retry fails for good: whether the first attempt completed is unknown — in doubt, exit 4
    (it was forgotten: exit 1, `failed`, nothing in doubt)."""
    steps = ("steps:\n  - sync.a:\n      compensate: undo.a\n      timeout: 200ms\n"
             "      retry: {attempts: 2, initial: 60s}\n")
    proc = _start(tmp_path, "r10", {"a": [{"sleep": 60}, {"raise": "Boom"}]}, steps)
    _wait_for(tmp_path / "runs" / "r10.jsonl", "step_retrying", "a", proc)
    _kill(proc)
    _move_back(tmp_path / "runs" / "r10.jsonl", 61_000)
    code, out, said = _resume_cli(tmp_path, "r10")
    assert (code, out["status"]) == (4, "failed"), said
    [doubt] = out["in_doubt"]
    assert (doubt["step"], doubt["task_ids"]) == ("a", ["r10/a#1"]) and f"pid {proc.pid}" in doubt["reason"]
    shown, _ = _shown(tmp_path / "runs", "r10")
    assert shown["in_doubt"] == out["in_doubt"]


def test_a_clock_behind_the_records_never_runs_the_run_backwards(tmp_path: Path) -> None:
    """Resumed on a host whose clock is 10 minutes behind the one that began the run: the run's times go on from
    the record's last, never before it (a negative wall time and step times, timers fired late)."""
    _crash_in_b(tmp_path, "r11")
    path = tmp_path / "runs" / "r11.jsonl"
    _move_back(path, -600_000)  # (its times ahead of this clock by 10 minutes)
    last = max(at for e in read_record(path)[1] if isinstance(at := e.get("at"), int))
    (tmp_path / "go").touch()
    code, out, said = _resume_cli(tmp_path, "r11")
    assert code == 0, said
    assert out["timing"]["wall_ms"] >= 0 and all(
        step["finished_at"] >= step["started_at"] for step in out["steps"].values())
    assert out["finished_at"] >= out["resumed"][0]["at"] >= last


def test_the_model_a_run_was_started_with_is_the_one_it_goes_on_with(tmp_path: Path) -> None:
    from flowdsl import compile_spec
    from flowdsl.runtime.local import run_flow

    plan = compile_spec(_spec(tmp_path, "steps:\n  - conf.a\n")).plan
    assert plan is not None
    runs = tmp_path / "runs"
    asyncio.run(run_flow(plan, {}, run_id="m1", runs_dir=runs, lm="openai/some-model"))
    path = runs / "m1.jsonl"
    header = json.loads(path.read_bytes().split(b"\n", 1)[0])
    assert header["lm"] == "openai/some-model"
    lines = path.read_bytes().splitlines(keepends=True)  # as if its process had died with a in flight
    scheduled = next(i for i, raw in enumerate(lines) if json.loads(raw)["type"] == "step_scheduled")
    path.write_bytes(b"".join(lines[:scheduled + 1]))
    _rewrite_header(path, process={**header["process"], "pid": 2 ** 22 + 1})
    assert prepare_resumption(path).lm == "openai/some-model"


def test_a_usage_error_of_resume_with_format_json_is_one_json_object(tmp_path: Path) -> None:
    for args in (["resume", "--format", "json"], ["resume", "x", "--bogus", "--format", "json"],
                 ["resolve", "--format", "json"], ["prune", "--format", "json"]):
        done = subprocess.run([sys.executable, "-c", "from flowdsl.cli import main; main()", *args], cwd=tmp_path,
                              env=_env(), capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and json.loads(done.stdout)["error"]["type"] == "UsageError", (args, done)


def _move_back(path: Path, ms: int) -> None:
    """Move every time a record holds ``ms`` milliseconds back (as if that long had passed since it was written)."""
    moved = []
    for raw in path.read_bytes().splitlines():
        item = json.loads(raw)
        for key in ("at", "started_at"):
            if isinstance(item.get(key), int) and not isinstance(item.get(key), bool):
                item[key] -= ms
        moved.append(json.dumps(item))
    path.write_text("\n".join(moved) + "\n")


def test_a_run_stopped_at_once_says_it_can_be_resumed(tmp_path: Path) -> None:
    from flowdsl.runtime.report import RunResult

    result = RunResult(run_id="r0", flow="f", status="running", context={}, steps={}, compensated=[], events=[])
    said = str(RunAborted("r0", "running", tmp_path / "r0.jsonl", result=result))
    assert said.endswith("(`flowdsl resume r0` goes on with it from there)")
    assert "resume" not in str(RunAborted("r0", "running", None))


def test_a_run_stopped_at_once_in_a_process_that_still_runs_goes_on_with_force(tmp_path: Path) -> None:
    """Refused while the process that stopped it still runs (this one); `force` says no attempt the stop abandoned
    still runs here, and the run goes on."""
    from flowdsl import compile_spec

    plan = compile_spec(_spec(tmp_path, "steps:\n  - conf.a: {compensate: undo.a}\n  - conf.b\n")).plan
    assert plan is not None
    runs = tmp_path / "runs"
    script = {"b": {"hang_unless": str(tmp_path / "go")}}

    _abort_when(plan, script, "f1", runs, "step_scheduled")
    with pytest.raises(NotResumable, match="add --force"):
        asyncio.run(resume_flow("f1", runs_dir=runs))
    (tmp_path / "go").touch()
    result = asyncio.run(resume_flow("f1", runs_dir=runs, force=True))
    assert (result.status, [r["was"] for r in result.resumed]) == ("completed", ["aborted"])


def _abort_when(plan: dict[str, Any], script: dict[str, Any], run_id: str, runs: Path, kind: str) -> None:
    """Run ``plan`` in this process and stop it at once (``LocalRun.abort``) soon after the event ``kind`` of b."""
    async def main() -> None:
        local: LocalRun

        def on_event(event: dict[str, Any]) -> None:
            if event["type"] == kind and event["step"] == "b":
                asyncio.get_running_loop().call_later(0.1, local.abort, "stopped by the test")

        local = LocalRun(plan, {"script": script}, run_id=run_id, runs_dir=runs, on_event=on_event)
        with pytest.raises(RunAborted):
            await local.run()

    asyncio.run(main())
