"""Stop signals and a local run, in real processes: SIGTERM and SIGHUP as Ctrl-C, what an aborted run leaves
to undo by hand, waiting for a sync worker, signals inherited as ignored, Ctrl-C while worker modules import,
and the library API, which leaves SIGTERM to the application unless asked.

Every test starts its own ``flowdsl`` (or Python) process and signals it by its PID; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flowdsl import compile_text
from flowdsl.runtime.local import run_flow
from flowdsl.runtime.record import read_record
from flowdsl.workers import WorkerRegistry
from tests.runtime.conformance import HEADER
from tests.runtime.test_local import CANCELLABLE, ROOT, _wait_for
from tests.spawned import StderrReader, wait_for_file

#: seconds a process may take to end after its last signal
ENDS = 30


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FLOWDSL_LM", None)
    return env


def _flowdsl(tmp_path: Path, steps: str, script: dict[str, Any], run_id: str, *, as_json: bool = True,
             preexec: Callable[[], Any] | None = None) -> subprocess.Popen[str]:
    """``flowdsl run`` of ``steps`` (the scripted workers of tests.runtime.workers), recorded in ``tmp_path``."""
    path = tmp_path / f"{run_id}.yaml"
    path.write_text(HEADER.format(name="sig") + steps)
    fmt = ["--format", "json"] if as_json else []
    return subprocess.Popen(
        [sys.executable, "-c", "from flowdsl.cli import main; main()", "run", str(path), *fmt,
         "--set", f"script={json.dumps(script)}", "--runs-dir", str(tmp_path), "--run-id", run_id],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec)


def _ended(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """The process's stdout and stderr once it has ended (killed, and the test failed, if it does not)."""
    try:
        return proc.communicate(timeout=ENDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the process did not end within {ENDS} s of its last signal; stderr:\n{err}")


def _aborted_record(record: Path) -> list[dict[str, Any]]:
    _, lines = read_record(record)
    assert lines[-1]["type"] == "runtime_aborted"
    return lines


# --- SIGTERM and SIGHUP do what Ctrl-C does -----------------------------------------------------------------


@pytest.mark.parametrize(("sig", "reason"), [(signal.SIGTERM, "terminated (SIGTERM)"),
                                             (signal.SIGHUP, "hung up (SIGHUP)")])
def test_sigterm_and_sighup_cancel_the_run_and_undo_what_completed(tmp_path: Path, sig: signal.Signals,
                                                                   reason: str) -> None:
    proc = _flowdsl(tmp_path, CANCELLABLE, {"b": {"hang": True}}, "t1")
    _wait_for(tmp_path / "t1.jsonl", "step_scheduled", "b", proc)
    os.kill(proc.pid, sig)
    out, err = _ended(proc)
    assert proc.returncode == 1, err  # cancelled, as after a first Ctrl-C
    result = json.loads(out)  # --format json: exactly one object on stdout
    assert (result["status"], result["compensated"], result["error"]) == (
        "cancelled", ["a"], {"type": "Cancelled", "message": reason})
    assert result["steps"]["b"]["status"] == "cancelled"
    verb = reason.split(" (")[0]
    assert f"{verb}: cancelling the run and undoing the steps that completed" in err and "Traceback" not in err


@pytest.mark.parametrize(("first", "second"), [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGTERM),
                                               (signal.SIGTERM, signal.SIGINT)])
def test_a_second_stop_signal_stops_at_once_and_the_record_says_so(tmp_path: Path, first: signal.Signals,
                                                                     second: signal.Signals) -> None:
    proc = _flowdsl(tmp_path, CANCELLABLE, {"b": {"hang": True}, "a/compensate": {"hang": True}}, "t2")
    record = tmp_path / "t2.jsonl"
    _wait_for(record, "step_scheduled", "b", proc)
    os.kill(proc.pid, first)
    _wait_for(record, "compensation_started", "a", proc)
    os.kill(proc.pid, second)
    out, err = _ended(proc)
    assert proc.returncode == 130, err  # as after a second Ctrl-C
    aborted = json.loads(out)
    assert (aborted["status"], aborted["run_id"], aborted["error"]["type"]) == ("aborted", "t2", "RunAborted")
    assert "stopping at once, nothing more is compensated" in err and "Traceback" not in err
    _aborted_record(record)


@pytest.mark.parametrize(("first", "later", "code"), [
    (signal.SIGHUP, [signal.SIGHUP], 1),  # a closing terminal: the tty's hangup, then the shell's
    (signal.SIGINT, [signal.SIGHUP], 1),
    (signal.SIGTERM, [signal.SIGHUP], 1),
    (signal.SIGHUP, [signal.SIGTERM], 1),  # the first SIGTERM: the run is already cancelling
    (signal.SIGHUP, [signal.SIGTERM, signal.SIGTERM], 130),
], ids=["hup-hup", "int-hup", "term-hup", "hup-term", "hup-term-term"])
def test_a_sighup_never_stops_the_run_at_once(tmp_path: Path, first: signal.Signals, later: list[signal.Signals],
                                              code: int) -> None:
    """Only a second Ctrl-C or SIGTERM stops at once; a SIGHUP cancels the run or, once it is cancelled, nothing."""
    proc = _flowdsl(tmp_path, CANCELLABLE, {"b": {"hang": True}, "a/compensate": {"sleep": 1.0}}, "h1")
    record = tmp_path / "h1.jsonl"
    _wait_for(record, "step_scheduled", "b", proc)
    os.kill(proc.pid, first)
    said = StderrReader(proc)
    _wait_for(record, "compensation_started", "a", proc)  # (two signals sent at once would be merged into one)
    for taken, sig in enumerate(later, 1):
        os.kill(proc.pid, sig)
        said.wait_until(lambda text, n=taken: text.count(": the run is already") + text.count("stopping at once") >= n,
                        ENDS)
    out, err = said.finish(ENDS)
    assert proc.returncode == code, err
    result = json.loads(out)
    assert "Traceback" not in err
    if code == 1:
        assert (result["status"], result["compensated"]) == ("cancelled", ["a"])
        assert "stopping at once" not in err
    else:
        assert result["status"] == "aborted" and "terminated again: stopping at once" in err
        _aborted_record(record)


def test_putting_the_handlers_back_never_leaves_a_stop_signal_on_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the run's handler and the application's, no SIG_DFL (a SIGTERM there would kill the process)."""
    reg = WorkerRegistry()

    async def step(data: Any, ctx: Any) -> dict[str, Any]:
        return {}

    reg.register("step", step)
    plan = compile_text("flowdsl: 1\nname: h\nsteps:\n  - step\n")
    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def app_handler(signum: int, frame: Any) -> None:
        pass

    before = {signum: signal.getsignal(signum) for signum in signums}
    real_signal = signal.signal
    calls: list[tuple[int, Any]] = []

    def recording(signum: int, handler: Any) -> Any:
        calls.append((signum, handler))
        return real_signal(signum, handler)

    try:
        for signum in signums:
            real_signal(signum, app_handler)
        monkeypatch.setattr(signal, "signal", recording)
        result = asyncio.run(run_flow(plan, {}, registry=reg, import_workers=False, record=False,
                                      handle_sigint=True, handle_sigterm=True))
        monkeypatch.undo()
        assert result.status == "completed"
        for signum in signums:
            set_to = [handler for num, handler in calls if num == signum]
            assert len(set_to) == 2 and set_to[-1] is app_handler, (signum, set_to)  # the loop's, then the app's
            assert signal.getsignal(signum) is app_handler
    finally:
        monkeypatch.undo()
        for signum, handler in before.items():
            signal.signal(signum, handler)


# --- what a run stopped at once leaves to undo by hand -------------------------------------------------------------

#: a completed step with an undo, then a sync one that cannot be interrupted
BLOCKING = "steps:\n  - conf.a: {compensate: undo.a}\n  - sync.b: {compensate: undo.b, timeout: 20s}\n"


def test_a_run_stopped_while_cancelling_says_which_completed_steps_are_left_to_undo(tmp_path: Path) -> None:
    """A second Ctrl-C while the run waits for a sync worker: nothing was undone; the JSON object lists step a
    as the needs_intervention listing would, its undo not run, then step b, whose worker was still running (it may
    have completed): ``in_flight``."""
    proc = _flowdsl(tmp_path, BLOCKING, {"b": {"hang": True, "mark": str(tmp_path / "b.called")}}, "u1")
    record = tmp_path / "u1.jsonl"
    wait_for_file(tmp_path / "b.called", proc)  # (a sync worker still queued for a thread would be taken back)
    proc.send_signal(signal.SIGINT)
    _wait_for(record, "cancel_requested", None, proc)  # an input event: it names no step
    proc.send_signal(signal.SIGINT)
    out, err = _ended(proc)
    assert proc.returncode == 130, err
    aborted = json.loads(out)
    assert aborted["compensated"] == []
    [left, in_flight] = aborted["intervention"]["steps"]
    assert (left["step"], left["worker"], left["status"], left["attempts"]) == ("a", "undo.a", "not_attempted", 0)
    assert (left["idempotency_key"], left["step_idempotency_key"]) == ("u1/a/compensate", "u1/a")
    assert (in_flight["step"], in_flight["worker"], in_flight["status"]) == ("b", "undo.b", "in_flight")
    assert "in flight when the run stopped" in in_flight["reason"]
    message = aborted["error"]["message"]
    assert "aborted while cancelling its steps in flight (before undoing any)" in message
    assert "left to undo by hand: a, b" in message and "while aborting" not in message
    _aborted_record(record)


def test_the_text_summary_of_a_run_stopped_while_compensating_lists_the_undo_it_abandoned(tmp_path: Path) -> None:
    """b was undone, a's undo was running: only a is left, and said to be perhaps done."""
    steps = "steps:\n  - conf.a: {compensate: undo.a}\n  - conf.b: {compensate: undo.b}\n  - conf.c\n"
    proc = _flowdsl(tmp_path, steps, {"c": {"hang": True}, "a/compensate": {"hang": True}}, "u2", as_json=False)
    record = tmp_path / "u2.jsonl"
    _wait_for(record, "step_scheduled", "c", proc)
    proc.send_signal(signal.SIGINT)
    _wait_for(record, "compensation_started", "a", proc)
    proc.send_signal(signal.SIGINT)
    _, err = _ended(proc)
    assert proc.returncode == 130, err
    lines = err.splitlines()
    heading = lines.index("left to undo by hand (the run stopped before they were undone), in this order:")
    assert lines[heading + 1] == ("  a: undo.a was running when the run stopped: it may or may not have taken "
                                  "effect (the step's idempotency key u2/a, its undo's u2/a/compensate)")
    assert not [line for line in lines[heading:] if line.startswith("  b: ")]  # undone: not left
    assert "sig u2: stopped at once while compensating (undoing the steps that completed)" in err
    # `flowdsl show` of the record lists the same
    shown = subprocess.run([sys.executable, "-m", "flowdsl", "show", "u2", "--runs-dir", str(tmp_path), "--format",
                            "json"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=ENDS)
    result = json.loads(shown.stdout)
    assert result["compensated"] == ["b"]
    [left] = result["intervention"]["steps"]
    assert (left["step"], left["status"]) == ("a", "in_flight")


def test_after_a_first_ctrl_c_the_run_says_it_waits_for_a_sync_worker(tmp_path: Path) -> None:
    proc = _flowdsl(tmp_path, BLOCKING, {"b": {"sleep": 2.0, "mark": str(tmp_path / "b.called")}}, "w1")
    wait_for_file(tmp_path / "b.called", proc)
    proc.send_signal(signal.SIGINT)
    out, err = _ended(proc)
    assert proc.returncode == 1, err
    assert ("waiting for step b (times out 20 s after it started) to return: a sync worker cannot be interrupted"
            in err.splitlines())
    result = json.loads(out)  # it returned: it completed, so it was undone too
    assert (result["status"], result["compensated"]) == ("cancelled", ["b", "a"])


# --- a signal inherited as ignored stays ignored ----------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_inherited_as_ignored_does_not_cancel_the_run(tmp_path: Path, sig: signal.Signals) -> None:
    """`flowdsl run … &` from a non-interactive shell (SIGINT ignored), nohup (SIGHUP ignored): the run goes on."""
    proc = _flowdsl(tmp_path, CANCELLABLE, {"b": {"sleep": 2.0}}, "i1",
                    preexec=lambda: signal.signal(sig, signal.SIG_IGN))
    _wait_for(tmp_path / "i1.jsonl", "step_scheduled", "b", proc)
    os.kill(proc.pid, sig)
    time.sleep(0.1)
    os.kill(proc.pid, sig)
    out, err = _ended(proc)
    assert proc.returncode == 0, err
    assert json.loads(out)["status"] == "completed"
    assert "cancelling" not in err


# --- a stop signal while the worker modules are imported ----------------------------------------------------------


@pytest.mark.parametrize(("sig", "as_json", "said"), [(signal.SIGINT, False, "interrupted"),
                                                      (signal.SIGINT, True, "interrupted"),
                                                      (signal.SIGTERM, True, "terminated (SIGTERM)")])
def test_a_stop_signal_while_worker_modules_import_says_so_and_exits_130(tmp_path: Path, sig: signal.Signals,
                                                                        as_json: bool, said: str) -> None:
    (tmp_path / "slow_import_workers.py").write_text(textwrap.dedent("""\
        import pathlib
        import time

        pathlib.Path("importing").write_text("yes")
        time.sleep(60)
        """))
    (tmp_path / "imp.yaml").write_text("flowdsl: 1\nname: imp\nworkers: [slow_import_workers]\nsteps: [a]\n")
    proc = subprocess.Popen([sys.executable, "-c", "from flowdsl.cli import main; main()", "run", "imp.yaml",
                             "--no-record", *(["--format", "json"] if as_json else [])],
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + ENDS
    while not (tmp_path / "importing").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    os.kill(proc.pid, sig)
    out, err = _ended(proc)
    assert proc.returncode == 130, err
    assert err.splitlines()[-1:] == [said] and "Traceback" not in err
    if as_json:
        assert json.loads(out) == {"status": "error", "error": {"type": "KeyboardInterrupt", "message": said}}


# --- the library API: SIGTERM is the application's unless handle_sigterm ------------------------------------------

_API_SCRIPT = """\
import json, signal, sys
import flowdsl

called = []
signal.signal(signal.SIGTERM, lambda signum, frame: called.append(signum))
app_handler = signal.getsignal(signal.SIGTERM)
plan = flowdsl.compile_text({spec!r})
options = json.loads(sys.argv[1])
result = flowdsl.run(plan, {{"script": options.pop("script")}}, run_id="api", runs_dir=sys.argv[2], **options)
print(json.dumps({{"status": result.status, "compensated": result.compensated, "app_called": called,
                  "sigterm_put_back": signal.getsignal(signal.SIGTERM) is app_handler,
                  "sigint_put_back": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
                  "wakeup_fd": signal.set_wakeup_fd(-1)}}))
"""


def _api_run(tmp_path: Path, options: dict[str, Any], script: dict[str, Any]) -> dict[str, Any]:
    code = _API_SCRIPT.format(spec=HEADER.format(name="api") + CANCELLABLE)
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps({**options, "script": script}), str(tmp_path)],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "api.jsonl", "step_scheduled", "b", proc)
    os.kill(proc.pid, signal.SIGTERM)
    out, err = _ended(proc)
    assert proc.returncode == 0, err
    return dict(json.loads(out))


def test_flowdsl_run_leaves_sigterm_to_the_application_by_default(tmp_path: Path) -> None:
    seen = _api_run(tmp_path, {}, {"b": {"sleep": 0.5}})
    assert (seen["status"], seen["app_called"]) == ("completed", [signal.SIGTERM])
    assert seen["sigterm_put_back"] and seen["sigint_put_back"] and seen["wakeup_fd"] == -1


def test_handle_sigterm_cancels_an_api_run_then_puts_back_the_applications_handler(tmp_path: Path) -> None:
    seen = _api_run(tmp_path, {"handle_sigterm": True}, {"b": {"hang": True}})
    assert (seen["status"], seen["compensated"], seen["app_called"]) == ("cancelled", ["a"], [])
    assert seen["sigterm_put_back"] and seen["sigint_put_back"] and seen["wakeup_fd"] == -1


def test_a_stop_signal_after_the_command_has_said_everything_does_not_change_its_exit_code(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """In the flowdsl process, once `run` has printed its summary (or JSON) the process only exits: a SIGTERM then
    is ignored (the exit code stays the run's, not 143); inside another program the handlers found are put back."""
    from flowdsl import cli_common as cli

    for whole, expected in ((True, signal.SIG_IGN), (False, signal.SIG_DFL)):
        monkeypatch.setattr(cli, "_WHOLE_PROCESS", whole)
        # both stop signals are taken (SIGHUP too): put both back, or every process this one starts later
        # inherits SIGHUP ignored (a later test's `flowdsl run` then ignored the SIGHUP it was sent)
        previous = {signum: signal.signal(signum, signal.SIG_DFL) for signum in (signal.SIGTERM, signal.SIGHUP)}
        try:
            with cli._stopping_as_ctrl_c():
                assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
            assert signal.getsignal(signal.SIGTERM) == expected
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def test_a_stop_signal_taken_after_the_run_ended_says_so_and_stops_nothing() -> None:
    """A second signal that lands as the run ends (its handlers not yet removed) says the run has ended — not
    "stopping at once, nothing more is compensated" of a run that was over."""
    from flowdsl.runtime.local import LocalRun

    notices: list[str] = []
    run = LocalRun(compile_text(HEADER.format(name="s") + "steps: [conf.a]\n"), {"script": {}}, record=False,
                   on_notice=notices.append)
    result = asyncio.run(run.run())
    run._on_signal(signal.SIGTERM)
    run._on_signal(signal.SIGTERM)
    assert result.status == "completed"
    assert notices == ["terminated: the run has already ended completed"] * 2


def test_a_signal_is_not_taken_outside_the_main_thread() -> None:
    """take_signal said it leaves the signal as it was there, but set the wakeup fd first: a ValueError."""
    import threading

    from flowdsl.runtime.signals import take_signal

    taken: list[bool] = []

    def elsewhere() -> None:
        loop = asyncio.new_event_loop()
        try:
            taken.append(take_signal(loop, signal.SIGTERM, lambda signum: None))
        finally:
            loop.close()

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join(10)
    assert taken == [False]
