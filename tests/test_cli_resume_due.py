"""`flowdsl resume --due`: every parked local run whose next timer is due is resumed, one after another, earliest due
first; parked runs not due (or with no timer) are left alone; a run another `flowdsl resume` took meanwhile is
skipped; what is refused before anything runs (exit 2); the exit code, the text and the JSON Lines it writes."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flowdsl.cli import app
from flowdsl.runtime.parking import at_text
from flowdsl.runtime.record import read_record
from tests.runtime.conformance import HEADER
from tests.runtime.test_local import ROOT

#: a (undone by undo.a), a timer wait of {t}, then b
TIMER = "steps:\n  - conf.a: {{compensate: undo.a}}\n  - wait: cool\n    for: {t}\n  - conf.b\n"
#: a, then the wait for signal 'paid' up to {t} (then it fails with WaitTimeout, and a is undone), then b
DEADLINE = "steps:\n  - conf.a: {{compensate: undo.a}}\n  - wait: paid\n    timeout: {t}\n  - conf.b\n"
#: the same, the run's timeout {t} its only timer
RUN_TIMEOUT = "timeout: {t}\nsteps:\n  - conf.a: {{compensate: undo.a}}\n  - wait: paid\n  - conf.b\n"
#: a wait for signal 'paid' without a deadline: no timer, never due
SIGNAL_ONLY = "steps:\n  - conf.a\n  - wait: paid\n  - conf.b\n"
#: a timer wait of {t}, then one of an hour: resumed with --park, it is parked again at the second
TWO_TIMERS = "steps:\n  - conf.a\n  - wait: cool\n    for: {t}\n  - wait: later\n    for: 1h\n  - conf.b\n"
#: as DEADLINE, but the undo of a is tried once, and fails when the input's script says so: needs_intervention
UNDO_ONCE = ("steps:\n  - conf.a: {{compensate: {{worker: undo.a, retry: {{attempts: 1}}}}}}\n  - wait: paid\n"
             "    timeout: {t}\n  - conf.b\n")
BOOM = {"script": {"a/compensate": {"raise": "Boom"}}}
#: the flowdsl command, in a process of its own
FLOWDSL = (sys.executable, "-c", "from flowdsl.cli import main; main()")
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def cli(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(app, list(args), env=env)


def said(text: str) -> str:
    return " ".join(text.split())


def park(tmp: Path, runs: Path, run_id: str, steps: str, t: str = "150ms", run_input: dict[str, Any] | None = None,
         workers: str = "tests.runtime.workers") -> int | None:
    """Run the flow ``steps`` as ``run_id`` with --park (exit 5): the due time of its next timer."""
    spec = tmp / f"{run_id}.yaml"
    spec.write_text(HEADER.replace("tests.runtime.workers", workers).format(name=run_id) + steps.format(t=t))
    given = []
    if run_input is not None:
        (tmp / f"{run_id}.json").write_text(json.dumps(run_input))
        given = ["--input", str(tmp / f"{run_id}.json")]
    r = cli("run", str(spec), "--runs-dir", str(runs), "--run-id", run_id, "--park", "--format", "json", *given)
    assert r.exit_code == 5, r.stderr
    due: int | None = json.loads(r.stdout)["parked"]["due_at"]
    return due


def until(*due: int | None) -> None:
    """Sleep until each of the times ``due`` (ms since the epoch) has passed."""
    latest = max(d for d in due if d is not None)
    time.sleep(max(0.0, latest / 1000 - time.time()) + 0.03)


def parked(runs: Path) -> list[str]:
    r = cli("runs", "--backend", "local", "--runs-dir", str(runs), "--status", "parked", "--format", "json")
    assert r.exit_code == 0, r.stderr
    return sorted(row["run_id"] for row in json.loads(r.stdout))


def resumed_lines(runs: Path, run_id: str) -> int:
    return sum(1 for line in read_record(runs / f"{run_id}.jsonl")[1] if line.get("type") == "runtime_resumed")


def test_the_due_runs_are_resumed_earliest_due_first_and_the_others_are_left_parked(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    due = {"b_dead": park(tmp_path, runs, "b_dead", DEADLINE, "150ms"),  # (due first, though named after a_early)
           "a_early": park(tmp_path, runs, "a_early", TIMER, "350ms"),
           "c_timeout": park(tmp_path, runs, "c_timeout", RUN_TIMEOUT, "250ms")}
    park(tmp_path, runs, "p_later", DEADLINE, "1h")
    park(tmp_path, runs, "s_signal", SIGNAL_ONLY)
    until(*due.values())
    r = cli("resume", "--due", "--runs-dir", str(runs))
    assert r.exit_code == 1, r.stderr  # (a run compensated: none needs intervention)
    err = said(r.stderr)
    order = sorted(due, key=lambda run: (due[run], run))
    assert order[0] == "b_dead"
    assert [err.index(f"resuming run {run} (parked, running), due since") for run in order] == \
        sorted(err.index(f"resuming run {run} (parked, running), due since") for run in order), err
    assert (f"resuming run b_dead (parked, running), due since {at_text(due['b_dead'])}: the deadline of wait 'paid' "
            "(it fails with WaitTimeout)") in err
    assert f"resuming run a_early (parked, running), due since {at_text(due['a_early'])}: the end of wait 'cool'" in err
    assert "c_timeout (parked, running), due since" in err and "the run's timeout" in err
    assert "b_dead b_dead: compensated at paid — WaitTimeout" in err and "a_early a_early: completed" in err
    shown = {run: json.loads(cli("show", run, "--runs-dir", str(runs), "--format", "json").stdout) for run in order}
    states = {run: out["status"] for run, out in shown.items()}
    assert states == {"b_dead": "compensated", "a_early": "completed", "c_timeout": "compensated"}
    assert shown["c_timeout"]["error"]["type"] == "RunTimeout"
    counts: dict[str, int] = {}
    for run in order:
        counts[states[run]] = counts.get(states[run], 0) + 1
    assert err.endswith(f"parked runs in {runs}: 3 due; 3 resumed: " + ", ".join(f"{n} {s}" for s, n in counts.items())
                        + "; 2 other parked run(s) not due"), err
    assert parked(runs) == ["p_later", "s_signal"]
    assert {run: resumed_lines(runs, run) for run in (*due, "p_later", "s_signal")} == \
        {"b_dead": 1, "a_early": 1, "c_timeout": 1, "p_later": 0, "s_signal": 0}


def test_with_park_each_goes_on_until_its_next_wait_and_json_gives_one_line_per_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    first = park(tmp_path, runs, "two", TWO_TIMERS, "150ms")
    second = park(tmp_path, runs, "one", TIMER, "200ms")
    assert first is not None and second is not None and first < second
    until(first, second)
    r = cli("resume", "--due", "--park", "--runs-dir", str(runs), "--format", "json")
    assert r.exit_code == 0, r.stderr  # (parked again counts as well as completed)
    objects = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(o["run_id"], o["status"]) for o in objects] == [("two", "parked"), ("one", "completed")]
    later = objects[0]["parked"]
    assert later["waits"] == [{"wait": "later", "signal": None, "due_at": later["due_at"]}]
    assert "resuming run" not in r.stderr  # (json: as for one run, nothing but notes and errors on stderr)
    assert said(r.stderr).endswith(f"parked runs in {runs}: 2 due; 2 resumed: 1 parked again, 1 completed"), r.stderr
    assert parked(runs) == ["two"]
    again = cli("resume", "--due", "--park", "--runs-dir", str(runs), "--format", "json")
    assert (again.exit_code, again.stdout, again.stderr) == (0, "", "")  # (nothing due: a cron job writes nothing)


def test_the_exit_code_is_the_gravest_of_the_runs_needs_intervention_over_compensated(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    due = [park(tmp_path, runs, "n1", UNDO_ONCE, run_input=BOOM), park(tmp_path, runs, "c1", DEADLINE),
           park(tmp_path, runs, "ok", TIMER)]
    until(*due)
    r = cli("resume", "--due", "--runs-dir", str(runs))
    assert r.exit_code == 4, r.stderr
    assert said(r.stderr).endswith("3 due; 3 resumed: 1 needs_intervention, 1 compensated, 1 completed"), r.stderr


def test_nothing_due_is_exit_0_and_writes_nothing(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    park(tmp_path, runs, "p_later", DEADLINE, "1h")
    park(tmp_path, runs, "s_signal", SIGNAL_ONLY)
    for args in (["--runs-dir", str(runs)], ["--runs-dir", str(tmp_path / "none")], ["--format", "json"]):
        r = cli("resume", "--due", *args, env={"FLOWDSL_RUNS_DIR": str(runs)})
        assert (r.exit_code, r.stdout, r.stderr) == (0, "", ""), (args, r.stderr)
    assert parked(runs) == ["p_later", "s_signal"]


def test_the_runs_directory_is_runs_dir_else_flowdsl_runs_dir(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    until(park(tmp_path, runs, "t1", TIMER))
    r = cli("resume", "--due", env={"FLOWDSL_RUNS_DIR": str(runs)})
    assert r.exit_code == 0, r.stderr
    assert said(r.stderr).endswith(f"parked runs in {runs}: 1 due; 1 resumed: 1 completed")


def test_a_runs_directory_that_is_not_one_is_exit_2(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("")
    r = cli("resume", "--due", "--runs-dir", str(file))
    assert r.exit_code == 2
    assert f"{file}: it is not a directory; --runs-dir (or $FLOWDSL_RUNS_DIR) names the directory of run records" \
        in said(r.stderr)


@pytest.mark.parametrize(("args", "message"), [
    ([], "missing RUN_ID: give the run to resume (its id, or the path of its record), or --due to resume every "
         "parked run whose next timer is due"),
    (["r1", "--due"], "RUN_ID and --due exclude each other: give a RUN_ID to resume that run, or --due to resume "
                      "every parked run whose next timer is due"),
    (["--due", "--signal", "paid={}"], "--signal is for one run, not with --due: `flowdsl resume RUN_ID --signal "
                                       "NAME=JSON` sends a signal to that run"),
    (["--due", "--cancel"], "--cancel is for one run, not with --due: `flowdsl resume RUN_ID --cancel` cancels that "
                            "run"),
    (["--due", "--force"], "--force is for one run, not with --due"),
])
def test_what_is_refused_before_anything_runs(tmp_path: Path, args: list[str], message: str) -> None:
    runs = tmp_path / "runs"
    due = park(tmp_path, runs, "r1", TIMER)
    until(due)
    r = cli("resume", *args, "--runs-dir", str(runs))
    assert r.exit_code == 2 and message in said(r.stderr), r.stderr
    j = cli("resume", *args, "--runs-dir", str(runs), "--format", "json")
    assert j.exit_code == 2
    out = json.loads(j.stdout)
    assert out["status"] == "error" and out["error"]["type"] == "UsageError" and message in out["error"]["message"]
    assert parked(runs) == ["r1"]


def _module(tmp: Path, body: str) -> str:
    """A worker module of its own (a name no other test imports), in ``tmp/mods``: its name."""
    name = f"due_{uuid.uuid4().hex[:12]}"
    (tmp / "mods").mkdir(exist_ok=True)
    (tmp / "mods" / f"{name}.py").write_text(body.replace("NAME", name))
    return name


def test_a_worker_module_that_cannot_be_imported_fails_its_run_alone(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    mods = tmp_path / "mods"
    name = _module(tmp_path, "from flowdsl.workers import registry\n\n\nasync def w(data, ctx):\n    return {}\n\n\n"
                             "registry.register('NAME.w', w)\n")
    first = park(mods, runs, "gone", "steps:\n  - wait: cool\n    for: {t}\n  - NAME.w\n".replace("NAME", name),
                 workers=name)
    second = park(tmp_path, runs, "fine", TIMER, "250ms")
    shutil.rmtree(mods)  # (its spec's directory, where its module was: it is gone now)
    sys.modules.pop(name, None)
    importlib.invalidate_caches()
    until(first, second)
    r = cli("resume", "--due", "--runs-dir", str(runs), "--format", "json")
    assert r.exit_code == 1, r.stderr
    failed, done = (json.loads(line) for line in r.stdout.splitlines())
    assert (failed["run_id"], failed["status"], failed["error"]["type"]) == ("gone", "error", "WorkerImportError")
    assert name in failed["error"]["message"]
    assert (done["run_id"], done["status"]) == ("fine", "completed")
    err = said(r.stderr)
    assert f"error: run gone: {said(failed['error']['message'])}" in err, err
    assert err.endswith("2 due; 1 resumed: 1 completed; 1 could not be resumed"), err
    assert parked(runs) == ["gone"] and resumed_lines(runs, "gone") == 0


def test_a_record_that_cannot_be_read_whole_fails_its_run_alone(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    first = park(tmp_path, runs, "torn", TIMER)
    second = park(tmp_path, runs, "fine", TIMER, "250ms")
    record = runs / "torn.jsonl"
    lines = record.read_bytes().split(b"\n")
    record.write_bytes(b"\n".join([*lines[:2], b"{not json", *lines[3:]]))  # (its ends are whole: listed parked)
    until(first, second)
    r = cli("resume", "--due", "--runs-dir", str(runs))
    assert r.exit_code == 1, r.stderr
    err = said(r.stderr)
    assert f"error: {record}:3:" in err and "fine fine: completed" in err, err
    assert err.endswith("2 due; 1 resumed: 1 completed; 1 could not be resumed"), err
    assert parked(runs) == ["torn"]


def _competing(runs: Path, run_id: str, park_it: bool) -> None:
    """Another `flowdsl resume` of ``run_id``, as from another cron job: it goes on with the run to its end, or until it
    is parked again."""
    from flowdsl.runtime.resume import resume_flow

    asyncio.run(resume_flow(run_id, runs_dir=runs, park=park_it))


@pytest.mark.parametrize(("steps", "park_it", "skip"), [
    (TWO_TIMERS, True, "since it was found due, it went on and is parked again, its next timer due at"),
    (TIMER, False, "run first ended completed: there is nothing to resume"),
])
def test_a_run_another_resume_took_after_it_was_found_due_is_skipped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, steps: str, park_it: bool, skip: str) -> None:
    from flowdsl.runtime import due as due_module

    runs = tmp_path / "runs"
    until(park(tmp_path, runs, "first", steps), park(tmp_path, runs, "second", TIMER, "200ms"))
    real = due_module.due_runs

    def found_then_taken(*args: Any, **kwargs: Any) -> Any:
        found = real(*args, **kwargs)
        assert [row.run_id for row in found.due] == ["first", "second"]
        _competing(runs, "first", park_it)  # between the listing and the reading of its record
        return found

    monkeypatch.setattr(due_module, "due_runs", found_then_taken)
    r = cli("resume", "--due", "--park", "--runs-dir", str(runs))
    assert r.exit_code == 0, r.stderr
    err = said(r.stderr)
    assert f"skipped: run first, taken meanwhile by another `flowdsl resume`: {skip}" in err, err
    assert "resuming run first" not in err and "resuming run second" in err
    assert err.endswith("2 due; 1 resumed: 1 completed; 1 skipped (taken meanwhile by another `flowdsl resume`)"), err
    assert resumed_lines(runs, "first") == 1 and resumed_lines(runs, "second") == 1


def test_a_run_another_resume_takes_as_this_one_begins_is_skipped_never_run_twice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flowdsl.runtime.resume import Resumption

    runs = tmp_path / "runs"
    log = tmp_path / "b.log"
    until(park(tmp_path, runs, "first", TIMER, run_input={"script": {"b": {"log": str(log)}}}),
          park(tmp_path, runs, "second", TIMER, "200ms"))
    real = Resumption.begin
    taken: list[str] = []

    def begin(self: Any, at: int) -> Any:
        if not taken:  # another process's resume takes the record first (Resumption.begin's lock), and runs the run
            taken.append(self.run_id)
            other = subprocess.run([*FLOWDSL, "resume", self.run_id, "--runs-dir", str(runs), "--park"], cwd=ROOT,
                                   env=ENV, capture_output=True, text=True, timeout=60)
            assert other.returncode == 0, other.stderr
        return real(self, at)

    monkeypatch.setattr(Resumption, "begin", begin)
    r = cli("resume", "--due", "--runs-dir", str(runs))
    assert r.exit_code == 0, r.stderr
    err = said(r.stderr)
    assert taken == ["first"]
    assert (f"skipped: run first, taken meanwhile by another `flowdsl resume`: the record {runs / 'first.jsonl'} "
            "changed while resume read it") in err, err
    assert err.endswith("2 due; 1 resumed: 1 completed; 1 skipped (taken meanwhile by another `flowdsl resume`)"), err
    assert len(log.read_text().splitlines()) == 1  # b ran once: in the other resume
    assert resumed_lines(runs, "first") == 1


def test_two_resume_due_at_once_never_resume_a_run_twice(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    logs = {run: tmp_path / f"{run}.log" for run in ("r1", "r2", "r3", "r4")}
    until(*(park(tmp_path, runs, run, TIMER, run_input={"script": {"b": {"log": str(log)}}})
            for run, log in logs.items()))
    procs = [subprocess.Popen([*FLOWDSL, "resume", "--due", "--park", "--runs-dir", str(runs)], cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    ended = [proc.communicate(timeout=60) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], ended
    assert {run: len(log.read_text().splitlines()) for run, log in logs.items()} == dict.fromkeys(logs, 1)
    assert {run: resumed_lines(runs, run) for run in logs} == dict.fromkeys(logs, 1)
    # each says how many it resumed (one that found none due says nothing: stderr is no terminal)
    done = [said(err).rsplit("parked runs in", 1)[1] for _, err in ended if "parked runs in" in err]
    assert sum(int(line.split("; ")[1].split(" resumed")[0]) for line in done) == 4, ended


@pytest.fixture
def stop_signals_put_back() -> Any:
    kept = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    # as a shell starts flowdsl: a test runner's worker may have inherited them ignored (the run then leaves them so)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    for signum, handler in kept.items():
        signal.signal(signum, handler)


@pytest.mark.usefixtures("stop_signals_put_back")
def test_in_the_flowdsl_process_each_run_takes_the_stop_signals(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a run has been reported, the flowdsl process leaves the stop signals ignored (it only exits then): the
    next due run must find Ctrl-C as the first did, or it could not be stopped."""
    from flowdsl import cli_common, cli_run

    runs = tmp_path / "runs"
    until(park(tmp_path, runs, "r1", TIMER), park(tmp_path, runs, "r2", TIMER, "200ms"))
    seen: list[Any] = []

    class Held(cli_run._HeldAfterEnd):
        def __enter__(self) -> Any:
            seen.append(signal.getsignal(signal.SIGINT))
            return super().__enter__()

    monkeypatch.setattr(cli_common, "_WHOLE_PROCESS", True)
    monkeypatch.setattr(cli_run, "_HeldAfterEnd", Held)
    r = cli("resume", "--due", "--runs-dir", str(runs))
    assert r.exit_code == 0, r.stderr
    assert len(seen) == 2 and seen[0] is seen[1] and seen[1] is not signal.SIG_IGN, seen


STOPPER = ("import asyncio, os, signal\nfrom flowdsl.workers import registry\n\n\nasync def halt(data, ctx):\n"
           "    os.kill(os.getpid(), signal.SIGINT)\n    await asyncio.sleep(10)\n    return {}\n\n\n"
           "registry.register('NAME.halt', halt)\n")


@pytest.mark.usefixtures("stop_signals_put_back")
def test_a_ctrl_c_cancels_the_run_going_on_and_no_further_run_is_resumed(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    name = _module(tmp_path, STOPPER)
    first = park(tmp_path / "mods", runs, "r1", ("steps:\n  - conf.a: {{compensate: undo.a}}\n  - wait: cool\n"
                                                 "    for: {t}\n  - NAME.halt\n").replace("NAME", name),
                 workers=f"tests.runtime.workers, {name}")
    second = park(tmp_path, runs, "r2", TIMER, "200ms")
    until(first, second)
    r = cli("resume", "--due", "--runs-dir", str(runs))
    assert r.exit_code == 1, r.stderr
    err = said(r.stderr)
    assert "r1 r1: cancelled" in err and "compensated, in this order: a (undo.a)" in err, err
    assert "a stop signal came while run r1 went on: no further due run is resumed" in err
    assert err.endswith("2 due; 1 resumed: 1 cancelled; 1 left parked (a stop signal ended the command: the next "
                        "`flowdsl resume --due` takes them)"), err
    assert parked(runs) == ["r2"]


#: a timer wait of {t}, then the wait for signal 'paid' (no deadline), then b
TIMER_THEN_SIGNAL = "steps:\n  - conf.a\n  - wait: cool\n    for: {t}\n  - wait: paid\n  - conf.b\n"


def test_without_park_a_due_run_is_still_parked_at_its_next_wait(tmp_path: Path) -> None:
    """Nothing could send a signal to a run going on in the batch: it is parked at its next wait (a cron job never
    hangs on it), and `flowdsl resume RUN --signal` goes on with it."""
    runs = tmp_path / "runs"
    until(park(tmp_path, runs, "r1", TIMER_THEN_SIGNAL))
    r = cli("resume", "--due", "--runs-dir", str(runs), "--format", "json")
    assert r.exit_code == 0, r.stderr
    (line,) = r.stdout.splitlines()
    assert json.loads(line)["status"] == "parked" and parked(runs) == ["r1"]
    assert "1 due; 1 resumed: 1 parked again" in said(r.stderr)
    assert cli("resume", "r1", "--runs-dir", str(runs), "--signal", "paid").exit_code == 0


def test_files_that_are_no_run_record_are_said_only_when_something_is_due(tmp_path: Path) -> None:
    """A cron job mails what it writes: a stray file in the runs directory is not worth a mail a minute."""
    runs = tmp_path / "runs"
    park(tmp_path, runs, "r1", TIMER, "1h")
    (runs / "README.txt").write_text("notes\n")
    quiet = cli("resume", "--due", "--runs-dir", str(runs))  # (stderr is no terminal here)
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == ""
    until(park(tmp_path, runs, "r2", TIMER))
    r = cli("resume", "--due", "--runs-dir", str(runs))
    assert r.exit_code == 0, r.stderr
    assert "README.txt is not a run record" in said(r.stderr) and "r2 r2: completed" in said(r.stderr)


def test_a_copy_of_a_record_is_not_resumed_under_its_file_s_name(tmp_path: Path) -> None:
    """A backup copy of a parked run's record, in the runs directory, would run the rest of that run twice."""
    runs = tmp_path / "runs"
    until(park(tmp_path, runs, "r1", TIMER))
    shutil.copy(runs / "r1.jsonl", runs / "copy1.jsonl")
    r = cli("resume", "--due", "--runs-dir", str(runs))
    assert r.exit_code == 1, r.stderr
    err = said(r.stderr)
    assert "its record holds run r1, not copy1 (a copy of that run's record, or one renamed?)" in err, err
    assert "r1 r1: completed" in err and resumed_lines(runs, "copy1") == 0 and resumed_lines(runs, "r1") == 1
