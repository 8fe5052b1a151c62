"""A stop signal at the edges of a local run, in real processes: as the run ends (its result must not be thrown
away: `flowdsl run` and `flowdsl resume` report it whole, with the run's exit code) and as its record is created
(nothing ran: no record is left, empty or header-only, and the run id stays free).

The moment is made exact, not raced: the `flowdsl` process is started through a launcher that wraps one of its
functions so that, at that point, the process sends the signal to itself (`os.kill(os.getpid(), …)`: Python runs
the handler before the next line). Every wait is bounded; each process is the test's own, signalled by its PID.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flowdsl import compile_text
from flowdsl.runtime.local import run_flow
from flowdsl.runtime.record import read_record
from tests.runtime.conformance import HEADER
from tests.runtime.test_local import CANCELLABLE, ROOT
from tests.runtime.test_stopped_runs import _dead_process, _rewrite_header

#: seconds a process may take to end
ENDS = 30

#: ``python -c LAUNCH HOOK SIGNALS flowdsl-args...``: the flowdsl command, sending itself SIGNALS (names, comma
#: separated) at HOOK
LAUNCH = """\
import os, signal, sys

hook, names = sys.argv[1], sys.argv[2]
sys.argv = [sys.argv[0], *sys.argv[3:]]


def send():
    for name in filter(None, names.split(",")):
        os.kill(os.getpid(), getattr(signal, "SIG" + name))


def after(owner, name):
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        send()
        return out

    setattr(owner, name, wrapped)


def before(owner, name):
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        send()
        return real(*args, **kwargs)

    setattr(owner, name, wrapped)


if hook == "given_back":  # the run has ended and given its signal handlers back; its result is not returned yet
    from flowdsl.runtime.local import LocalRun
    after(LocalRun, "_remove_signals")
elif hook == "loop_closing":  # the run has returned; its event loop is being closed
    import asyncio
    real_shutdown = asyncio.BaseEventLoop.shutdown_asyncgens

    async def shutdown_asyncgens(self):
        send()
        await real_shutdown(self)

    asyncio.BaseEventLoop.shutdown_asyncgens = shutdown_asyncgens
elif hook == "output":  # the result is being written (the JSON object built, the summary printed)
    from flowdsl.runtime import report, summary
    before(report.RunResult, "to_json")
    before(summary, "print_summary")
elif hook == "header_written":  # the record is being created: its header is written, its start line not yet
    from flowdsl.runtime.record import RunRecorder
    after(RunRecorder, "header")
elif hook == "record_written":  # the record holds its first lines; the run has not taken its signals yet
    from flowdsl.runtime.local import LocalRun
    before(LocalRun, "_install_signals")
elif hook != "none":
    raise SystemExit("unknown hook " + hook)

from flowdsl.cli import main

main()
"""

#: what must never be seen on stderr: a traceback, asyncio's complaints about a loop closed under a signal
NOISE = ("Traceback", "Task was destroyed", "RuntimeWarning", "was never awaited")


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("FLOWDSL_LM", "FLOWDSL_RUNS_DIR"):
        env.pop(name, None)
    return env


def _flowdsl(hook: str, signals: str, *args: str) -> tuple[int, str, str]:
    """Run ``flowdsl ARGS`` sending itself ``signals`` at ``hook``: (exit code, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, hook, signals, *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=ENDS)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"flowdsl did not end within {ENDS} s; stderr:\n{err}")
    assert not any(noise in err for noise in NOISE), err
    return proc.returncode, out, err


def _run(tmp_path: Path, hook: str, signals: str, run_id: str, *, as_json: bool = True,
         script: dict[str, Any] | None = None) -> tuple[int, str, str]:
    spec = tmp_path / "flow.yaml"
    spec.write_text(HEADER.format(name="edges") + CANCELLABLE)
    return _flowdsl(hook, signals, "run", str(spec), *(["--format", "json"] if as_json else []),
                    "--set", f"script={json.dumps(script or {})}", "--runs-dir", str(tmp_path / "runs"),
                    "--run-id", run_id)


def _recorded_status(tmp_path: Path, run_id: str) -> str:
    _, lines = read_record(tmp_path / "runs" / f"{run_id}.jsonl")
    [finished] = [line for line in lines if line["type"] == "run_finished"]
    return str(finished["status"])


# --- a stop signal as the run ends: its result is reported whole ---------------------------------------------------


@pytest.mark.parametrize(("hook", "sig", "verb"), [
    ("given_back", "TERM", "terminated"),
    ("given_back", "HUP", "hung up"),
    ("given_back", "INT", "interrupted"),
    ("loop_closing", "TERM", "terminated"),
    ("output", "TERM", "terminated"),  # one signal while the object is written: written whole all the same
])
def test_a_stop_signal_as_the_run_ends_stops_nothing_and_the_result_is_reported(
        tmp_path: Path, hook: str, sig: str, verb: str) -> None:
    code, out, err = _run(tmp_path, hook, sig, "e1")
    assert code == 0, err  # the run's own code, not 130
    result = json.loads(out)  # the run's object, not {"status": "error", "error": {"type": "KeyboardInterrupt"}}
    assert (result["run_id"], result["status"]) == ("e1", "completed")
    assert f"{verb}: the run has already ended completed" in err
    assert _recorded_status(tmp_path, "e1") == "completed"


@pytest.mark.parametrize("sig", ["INT", "TERM", "HUP"])
def test_in_text_the_summary_is_printed_whole_after_a_signal_as_the_run_ends(tmp_path: Path, sig: str) -> None:
    code, _, err = _run(tmp_path, "given_back", sig, "e2", as_json=False)
    assert code == 0, err
    assert "e2: completed" in err and "record:" in err  # the summary, down to its last line
    assert "the run has already ended completed" in err


def test_the_exit_code_is_the_runs_when_a_signal_lands_as_a_failed_run_ends(tmp_path: Path) -> None:
    code, out, err = _run(tmp_path, "given_back", "TERM", "e3", script={"b": {"raise": "Boom"}})
    assert code == 1, err
    assert (json.loads(out)["status"], json.loads(out)["compensated"]) == ("compensated", ["a"])


def test_sighups_never_cut_the_output_short(tmp_path: Path) -> None:
    """A closing terminal's hangups, then one SIGTERM: none is a second Ctrl-C or SIGTERM."""
    code, out, err = _run(tmp_path, "output", "HUP,HUP,TERM", "e4")
    assert code == 0, err
    assert json.loads(out)["status"] == "completed"
    assert err.count("the run has already ended completed") == 3


def test_a_second_stop_signal_while_the_json_is_written_cuts_it_short_naming_the_run(tmp_path: Path) -> None:
    """Not held for ever (a stdout nobody reads would hold the process): as a stdout that cannot be written, exit
    3, and stderr says how the run ended and where its record is — the run ran, it must not be run again."""
    code, out, err = _run(tmp_path, "output", "TERM,TERM", "e5")
    assert code == 3, err
    assert out == ""
    record = tmp_path / "runs" / "e5.jsonl"
    assert "terminated: the run has already ended completed" in err  # the first: held
    assert "error: cannot write to stdout: terminated (SIGTERM): a second stop signal after the run's end cut it " \
           f"short; the run e5 ended completed; its record: {record}" in " ".join(err.split())
    assert _recorded_status(tmp_path, "e5") == "completed"


def test_a_second_stop_signal_while_the_summary_prints_cuts_it_short_keeping_the_runs_exit_code(
        tmp_path: Path) -> None:
    code, _, err = _run(tmp_path, "output", "INT,TERM", "e6", as_json=False)
    assert code == 0, err  # the summary is for people, on stderr: as when stderr cannot be written
    said = " ".join(err.split())
    assert said.endswith("interrupted: the run has already ended completed terminated (SIGTERM): the summary was cut "
                         f"short; the run e6 ended completed; its record: {tmp_path / 'runs' / 'e6.jsonl'}"), said
    assert "(flowdsl show e6" not in said  # (the summary's last line)


def test_a_resumed_run_ending_under_a_stop_signal_is_reported_whole(tmp_path: Path) -> None:
    """`flowdsl resume` drives its run as `flowdsl run` does: the same holds."""
    runs = tmp_path / "runs"
    plan = compile_text(HEADER.format(name="edges") + CANCELLABLE)
    asyncio.run(run_flow(plan, {"script": {}}, run_id="r1", runs_dir=runs))
    record = runs / "r1.jsonl"
    lines = record.read_bytes().splitlines(keepends=True)
    cut = next(i for i, line in enumerate(lines) if json.loads(line)["type"] == "step_succeeded") + 1
    record.write_bytes(b"".join(lines[:cut]))  # the run's process died after a: it crashed
    _rewrite_header(record, process=_dead_process())

    code, out, err = _flowdsl("given_back", "TERM", "resume", "r1", "--runs-dir", str(runs), "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    assert (result["run_id"], result["status"], len(result["resumed"])) == ("r1", "completed", 1)
    assert "terminated: the run has already ended completed" in err


# --- a stop signal as the record is created: nothing ran, nothing is left -----------------------------------------


@pytest.mark.parametrize("hook", ["header_written", "record_written"])
@pytest.mark.parametrize("sig", ["TERM", "INT"])
def test_a_stop_signal_as_the_record_is_created_leaves_no_record(tmp_path: Path, hook: str, sig: str) -> None:
    code, out, err = _run(tmp_path, hook, sig, "s1")
    said = "terminated (SIGTERM)" if sig == "TERM" else "interrupted"
    assert code == 130, err
    assert json.loads(out) == {"status": "error", "error": {"type": "KeyboardInterrupt", "message": said}}
    runs = tmp_path / "runs"
    assert sorted(os.listdir(runs)) == []  # neither the record (empty, or header-only: "crashed") nor a temporary
    from tests.runtime.test_stopped_runs import cli

    listed = cli("runs", "--backend", "local", "--runs-dir", str(runs), "--format", "json")
    assert (listed.exit_code, json.loads(listed.stdout), listed.stderr) == (0, [], "")
    again = _run(tmp_path, "none", "", "s1")  # the run id is free (no RunExists)
    assert again[0] == 0 and json.loads(again[1])["status"] == "completed", again[2]
