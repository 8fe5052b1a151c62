"""A local run whose process died: its record's header names the process (pid, host, start time, boot id), so
`runs` and `show` tell it from a run still going — `crashed`, with what is left to undo by hand and what is in
doubt, as for a run stopped at once — and say when that cannot be told (another host, an old record). Records
carry the flowdsl version that wrote them, and a record of a newer format is said to be newer, not malformed.

The crashes are real: each test starts its own `flowdsl run` process and SIGKILLs it, by its PID; every wait is
bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flowdsl import __version__
from flowdsl.cli import app
from flowdsl.runtime import owner
from flowdsl.runtime.plancheck import PLAN_VERSION
from flowdsl.runtime.record import RECORD_FORMAT
from tests.runtime.conformance import HEADER
from tests.runtime.test_local import ROOT, _wait_for
from tests.spawned import wait_for_file

#: seconds a process may take to end after SIGKILL
ENDS = 30
#: a completes (its undo undo.a), then b (its undo undo.b) runs
TWO = "steps:\n  - conf.a: {compensate: undo.a}\n  - conf.b: {compensate: undo.b}\n"


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FLOWDSL_LM", None)
    env.pop("FLOWDSL_RUNS_DIR", None)
    return env


def _start(runs: Path, steps: str, script: dict[str, Any], run_id: str) -> subprocess.Popen[str]:
    """``flowdsl run`` of ``steps`` (the scripted workers of tests.runtime.workers), recorded in ``runs``."""
    spec = runs.parent / f"{run_id}.yaml"
    spec.write_text(HEADER.format(name="crash") + steps)
    return subprocess.Popen(
        [sys.executable, "-c", "from flowdsl.cli import main; main()", "run", str(spec), "--format", "json",
         "--set", f"script={json.dumps(script)}", "--runs-dir", str(runs), "--run-id", run_id],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the process we started, by its PID, and reap it."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=ENDS)
    assert proc.returncode == -signal.SIGKILL


def _listed(runs: Path, *args: str) -> dict[str, dict[str, Any]]:
    r = cli("runs", "--backend", "local", "--runs-dir", str(runs), "--format", "json", *args)
    assert r.exit_code == 0, r.output
    return {row["run_id"]: row for row in json.loads(r.stdout)}


def _shown(runs: Path, run_id: str) -> tuple[dict[str, Any], str]:
    r = cli("show", run_id, "--runs-dir", str(runs), "--format", "json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout), " ".join(r.stderr.split())


def _header(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_bytes().split(b"\n", 1)[0]))


def _rewrite_header(path: Path, **changes: Any) -> None:
    """Change the record's header (a key set to None is taken out)."""
    first, rest = path.read_bytes().split(b"\n", 1)
    header = json.loads(first)
    for key, value in changes.items():
        if value is None:
            header.pop(key, None)
        else:
            header[key] = value
    path.write_bytes(json.dumps(header).encode() + b"\n" + rest)


def _dead_process() -> dict[str, Any]:
    """A ``process`` of a record header naming a process of this host that has ended (started and reaped here)."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        stat = owner._stat(proc.pid)
        assert stat is not None
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(ENDS)
    return {**owner.this_process(), "pid": proc.pid, "start": stat[1]}


# --- a real process, killed ------------------------------------------------------------------------------------


def test_a_run_killed_mid_run_is_listed_crashed_and_show_gives_what_is_left_to_undo(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    proc = _start(runs, TWO, {"b": {"hang": True, "mark": str(tmp_path / "b.called")}}, "k1")
    wait_for_file(tmp_path / "b.called", proc)
    _wait_for(runs / "k1.jsonl", "step_scheduled", "b", proc)
    header = _header(runs / "k1.jsonl")
    assert header["process"]["pid"] == proc.pid and header["process"]["host"] == socket.gethostname()
    assert (header["flowdsl_version"], header["record_format"]) == (__version__, RECORD_FORMAT)
    assert isinstance(header["process"]["start"], int) and isinstance(header["process"]["boot_id"], str)
    _kill(proc)

    assert _listed(runs)["k1"]["status"] == "crashed"
    assert list(_listed(runs, "--status", "crashed")) == ["k1"]
    assert _listed(runs, "--status", "running") == {}
    text = cli("runs", "--backend", "local", "--runs-dir", str(runs))
    assert "crashed" in text.stdout
    assert "1 run(s) crashed (k1): their process is gone" in " ".join(text.stderr.split())

    shown, notes = _shown(runs, "k1")
    assert (shown["status"], shown["stopped_in"]) == ("crashed", "running")
    assert shown["crashed"] == f"its process (pid {proc.pid} on {socket.gethostname()}) is gone"
    left = {item["step"]: item for item in shown["intervention"]["steps"]}
    assert [item["step"] for item in shown["intervention"]["steps"]] == ["a", "b"]
    assert (left["a"]["status"], left["a"]["worker"], left["a"]["idempotency_key"],
            left["a"]["step_idempotency_key"]) == ("not_attempted", "undo.a", "k1/a/compensate", "k1/a")
    assert left["a"]["input"]["script"] == {"b": {"hang": True, "mark": str(tmp_path / "b.called")}}
    assert left["b"]["status"] == "in_flight" and left["b"]["idempotency_key"] == "k1/b/compensate"  # may have run
    assert shown["resolved"] is None
    assert f"its process (pid {proc.pid} on {socket.gethostname()}) is gone, and the run stopped with it" in notes

    said = cli("show", "k1", "--runs-dir", str(runs))
    out = " ".join(said.stdout.split())
    assert said.exit_code == 0 and "crashed while it ran" in out
    assert "left to undo by hand (the run stopped before they were undone), in this order:" in out
    assert f"flowdsl resolve k1 --runs-dir {runs} --note TEXT" in out


def test_a_run_killed_while_undoing_lists_the_undo_in_flight_first(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    steps = TWO + "  - conf.c\n"
    script = {"c": {"raise": "Boom"}, "b/compensate": {"hang": True, "mark": str(tmp_path / "undo.called")}}
    proc = _start(runs, steps, script, "k2")
    wait_for_file(tmp_path / "undo.called", proc)
    _wait_for(runs / "k2.jsonl", "compensation_started", "b", proc)
    _kill(proc)

    shown, _ = _shown(runs, "k2")
    assert (shown["status"], shown["stopped_in"]) == ("crashed", "compensating")
    left = shown["intervention"]["steps"]
    assert [(i["step"], i["status"], i["idempotency_key"]) for i in left] == [
        ("b", "in_flight", "k2/b/compensate"), ("a", "not_attempted", "k2/a/compensate")]
    assert left[0]["attempts"] == 1 and left[0]["input"]["script"] == script
    assert _listed(runs)["k2"]["status"] == "crashed"
    said = " ".join(cli("show", "k2", "--runs-dir", str(runs)).stdout.split())
    assert "crashed while compensating" in said


def test_an_attempt_given_up_on_that_never_answered_is_in_doubt(tmp_path: Path) -> None:
    """A sync attempt timed out (its thread still ran) and the run waited to retry when its process was killed:
    whether that attempt completed is unknown — in doubt, with its task id and the step's keys."""
    runs = tmp_path / "runs"
    runs.mkdir()
    steps = ("steps:\n  - sync.a:\n      compensate: undo.a\n      timeout: 200ms\n"
             "      retry: {attempts: 2, initial: 60s}\n")
    proc = _start(runs, steps, {"a": {"sleep": 60}}, "k3")
    _wait_for(runs / "k3.jsonl", "step_retrying", "a", proc)
    _kill(proc)

    shown, _ = _shown(runs, "k3")
    assert shown["status"] == "crashed" and shown["intervention"] == {"steps": []}
    [doubt] = shown["in_doubt"]
    assert (doubt["step"], doubt["task_ids"], doubt["step_idempotency_key"], doubt["idempotency_key"]) == (
        "a", ["k3/a#1"], "k3/a", "k3/a/compensate")
    assert f"its process (pid {proc.pid} on {socket.gethostname()}) died" in doubt["reason"]
    said = " ".join(cli("show", "k3", "--runs-dir", str(runs)).stdout.split())
    assert "outcome unknown" in said


def test_a_run_still_going_is_told_from_a_crashed_one(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    proc = _start(runs, TWO, {"b": {"hang": True, "mark": str(tmp_path / "b.called")}}, "live1")
    try:
        wait_for_file(tmp_path / "b.called", proc)
        _wait_for(runs / "live1.jsonl", "step_scheduled", "b", proc)
        assert _listed(runs)["live1"]["status"] == "running"
        listing = cli("runs", "--backend", "local", "--runs-dir", str(runs))
        assert "note" not in listing.stderr  # (its process runs: nothing to say)
        shown, notes = _shown(runs, "live1")
        assert shown["status"] == "running" and shown["intervention"] is None
        assert f"its process (pid {proc.pid} on {socket.gethostname()}) still runs" in notes
        refused = cli("resolve", "live1", "--runs-dir", str(runs))
        assert refused.exit_code == 1 and "is not over" in " ".join(refused.stderr.split())
    finally:
        _kill(proc)
    assert _listed(runs)["live1"]["status"] == "crashed"


# --- what cannot be told ---------------------------------------------------------------------------------------


def _cut(runs: Path, run_id: str) -> Path:
    """The record of a run cut after its step a completed (no end), made in this process (whose pid is alive)."""
    from flowdsl import compile_text, run

    plan = compile_text(HEADER.format(name="crash") + TWO)
    run(plan, {"script": {}}, run_id=run_id, runs_dir=runs)
    path = runs / f"{run_id}.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    keep = next(i for i, line in enumerate(lines) if json.loads(line)["type"] == "step_succeeded") + 1
    path.write_bytes(b"".join(lines[:keep]))
    return path


def test_an_old_record_naming_no_process_cannot_be_told_and_still_reads(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    path = _cut(runs, "old1")
    _rewrite_header(path, process=None, flowdsl_version=None, record_format=None)  # as earlier versions wrote it
    assert _listed(runs)["old1"]["status"] == "running"
    listing = cli("runs", "--backend", "local", "--runs-dir", str(runs))
    assert "end before their run did (old1): the process stopped, or the run still goes — which cannot be told" in \
        " ".join(listing.stderr.split())
    shown, notes = _shown(runs, "old1")
    assert shown["status"] == "running" and shown["intervention"] is None
    assert "the record does not name its process" in notes
    refused = cli("resolve", "old1", "--runs-dir", str(runs))
    assert refused.exit_code == 1 and "--force" in refused.stderr
    forced = cli("resolve", "old1", "--runs-dir", str(runs), "--force", "--note", "its host is long gone")
    assert forced.exit_code == 0, forced.output
    assert _listed(runs)["old1"]["status"] == "resolved"


def test_a_run_of_another_host_cannot_be_told(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    path = _cut(runs, "far1")
    _rewrite_header(path, process={**owner.this_process(), "host": "elsewhere.example", "pid": 1})
    assert _listed(runs)["far1"]["status"] == "running"
    shown, notes = _shown(runs, "far1")
    assert shown["status"] == "running"
    assert "its process (pid 1 on elsewhere.example) ran on another host: whether it still runs cannot be told " \
        "here (look on elsewhere.example)" in notes


def test_a_dead_process_and_a_pid_taken_since_are_gone(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    path = _cut(runs, "gone1")
    assert _listed(runs)["gone1"]["status"] == "running"  # this process wrote it, and runs
    _rewrite_header(path, process=_dead_process())
    assert _listed(runs)["gone1"]["status"] == "crashed"
    mine = owner.this_process()
    _rewrite_header(path, process={**mine, "start": mine["start"] + 1})  # this pid, another process's start
    assert _listed(runs)["gone1"]["status"] == "crashed"
    shown, _ = _shown(runs, "gone1")
    assert shown["crashed"].endswith(f"is gone (pid {mine['pid']} is now another process)")
    assert [(i["step"], i["status"]) for i in shown["intervention"]["steps"]] == [("a", "not_attempted"),
                                                                                   ("b", "in_flight")]


def test_judge_tells_each_case() -> None:
    mine = owner.this_process()
    assert owner.judge(mine).state == owner.LIVE
    assert owner.judge({**mine, "start": mine["start"] + 1}).state == owner.GONE
    assert owner.judge(_dead_process()).state == owner.GONE
    restarted = owner.judge({**mine, "boot_id": "00000000-0000-0000-0000-000000000000"})
    assert restarted.state == owner.GONE and "restarted" in restarted.said
    assert owner.judge({**mine, "pid_ns": mine["pid_ns"] + 1}).state == owner.UNKNOWN
    assert owner.judge({**mine, "host": "elsewhere.example"}).state == owner.UNKNOWN
    assert owner.judge(None).state == owner.UNKNOWN
    assert owner.judge({"pid": "7", "host": mine["host"]}).state == owner.UNKNOWN
    zombie = subprocess.Popen(["true"])  # ended, not reaped yet: a zombie is gone
    try:
        deadline = time.monotonic() + ENDS
        while (stat := owner._stat(zombie.pid)) is not None and stat[0] != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stat is not None and stat[0] == "Z"
        assert owner.judge({**mine, "pid": zombie.pid, "start": stat[1]}).state == owner.GONE
    finally:
        zombie.wait(ENDS)


# --- version markers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("where", "said"), [
    ("record_format", "record format 2, this one reads 1"),
    ("plan_version", f"a plan of plan_version {PLAN_VERSION + 1}, this one reads 1 to {PLAN_VERSION}"),
    ("kernel", "kernel rules version 99"),
])
def test_a_record_of_a_newer_format_is_newer_not_malformed(tmp_path: Path, where: str, said: str) -> None:
    from flowdsl import compile_text, run

    runs = tmp_path / "runs"
    run(compile_text(HEADER.format(name="v") + TWO), {"script": {}}, run_id="v1", runs_dir=runs)
    path = runs / "v1.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    header, start = json.loads(lines[0]), json.loads(lines[1])
    if where == "record_format":
        header.update(record_format=2, flowdsl_version="9.0.0")
    elif where == "plan_version":
        header["plan"]["plan_version"] = PLAN_VERSION + 1
    else:
        start["kernel"] = 99
    path.write_bytes(json.dumps(header).encode() + b"\n" + json.dumps(start).encode() + b"\n" + b"".join(lines[2:]))
    shown = cli("show", "v1", "--runs-dir", str(runs))
    message = " ".join(shown.stderr.split())
    assert shown.exit_code == 2 and "malformed" not in message
    assert "the record is newer than this flowdsl" in message and said in message
    if where == "record_format":
        assert "written by flowdsl 9.0.0" in message
    assert _listed(runs)["v1"]["status"] == "newer"
    assert list(_listed(runs, "--status", "newer")) == ["v1"]
    listing = cli("runs", "--backend", "local", "--runs-dir", str(runs))
    assert "1 record(s) were written by a newer flowdsl (v1)" in " ".join(listing.stderr.split())


# --- what is never taken for a process gone (hardening) --------------------------------------------------------

_FIRST_THREAD_ENDS = """
import ctypes, os, sys, threading, time
threading.Thread(target=time.sleep, args=(60,)).start()
print(os.getpid(), flush=True)
sys.stdin.readline()  # (until the test has looked: then the first thread ends, the other goes on)
ctypes.CDLL(None).pthread_exit(None)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's /proc")
def test_a_process_whose_first_thread_ended_while_another_runs_is_live() -> None:
    # /proc/PID/stat then says Z (its first thread is a zombie), yet the process runs: never gone
    proc = subprocess.Popen([sys.executable, "-c", _FIRST_THREAD_ENDS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        pid = int(proc.stdout.readline())
        stat = owner._stat(pid)
        assert stat is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        deadline = time.monotonic() + ENDS
        while (now := owner._stat(pid)) is not None and now[0] != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert now is not None and now[0] == "Z"
        assert owner.judge({**owner.this_process(), "pid": pid, "start": stat[1]}).state == owner.LIVE
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(ENDS)


def test_a_process_proc_does_not_show_is_not_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    # /proc mounted hidepid: another user's processes are not there, or not readable; a signal 0 still finds them
    proc = subprocess.Popen(["sleep", "60"])
    try:
        stat = owner._stat(proc.pid)
        assert stat is not None
        named = {**owner.this_process(), "pid": proc.pid, "start": stat[1]}
        monkeypatch.setattr(owner, "_stat", lambda pid: None if pid == proc.pid else (real_stat)(pid))
        assert owner.judge(named).state != owner.GONE
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(ENDS)
    assert owner.judge(named).state == owner.GONE  # (reaped: no process has its pid)


real_stat = owner._stat


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0, reason="root, to mount /proc")
def test_another_users_process_under_hidepid_is_not_gone() -> None:
    import shutil

    if not (shutil.which("unshare") and shutil.which("setpriv")):
        pytest.skip("unshare and setpriv")
    proc = subprocess.Popen(["sleep", "60"])
    try:
        stat = owner._stat(proc.pid)
        assert stat is not None
        named = json.dumps({**owner.this_process(), "pid": proc.pid, "start": stat[1]})
        look = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from flowdsl.runtime import owner; "
                f"print(owner.judge(json.loads({named!r})).state)")
        for hidepid in ("1", "2"):
            done = subprocess.run(
                ["unshare", "-m", "--propagation", "private", "sh", "-c",
                 f'mount -t proc -o hidepid={hidepid} proc /proc && exec setpriv --reuid=65534 --regid=65534 '
                 f'--clear-groups "$0" -c "$1"', sys.executable, look],
                capture_output=True, text=True, timeout=ENDS)
            if done.returncode != 0 and "mount" in done.stderr:
                pytest.skip(f"cannot mount /proc here: {done.stderr}")
            if done.returncode == 127 and "error while loading shared libraries" in done.stderr:
                # (a Python built with a shared libpython under a directory that user cannot enter, as pyenv's
                # under /root: its loader cannot find the library)
                pytest.skip(f"{sys.executable} cannot start as user 65534 here: {done.stderr.strip()}")
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == owner.UNKNOWN, (hidepid, done.stdout)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(ENDS)


def test_another_machine_of_the_same_name_is_not_a_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(owner._HERE, "machine_id", "1" * 32)
    monkeypatch.setattr(owner, "_MINE", None)
    mine = owner.this_process()
    assert mine["machine_id"] == "1" * 32
    other_boot = "00000000-0000-0000-0000-000000000000"
    elsewhere = owner.judge({**mine, "machine_id": "2" * 32, "boot_id": other_boot})
    assert elsewhere.state == owner.UNKNOWN and "another machine named" in elsewhere.said
    unnamed = {key: value for key, value in mine.items() if key != "machine_id"}
    assert owner.judge({**unnamed, "boot_id": other_boot}).state == owner.UNKNOWN  # (which, nothing says)
    restarted = owner.judge({**mine, "boot_id": other_boot})  # this machine, booted since
    assert restarted.state == owner.GONE and "restarted" in restarted.said


def test_a_start_time_read_from_another_time_namespace_is_not_another_process() -> None:
    mine = owner.this_process()
    if mine.get("time_ns") is None:
        pytest.skip("no time namespaces here")
    shifted = owner.judge({**mine, "start": mine["start"] + 10_000_000, "time_ns": mine["time_ns"] + 1})
    assert shifted.state == owner.UNKNOWN and "time namespace" in shifted.said
    assert owner.judge({**mine, "start": mine["start"] + 1}).state == owner.GONE


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0, reason="root, for unshare --time")
def test_a_run_in_a_time_namespace_is_not_taken_for_gone(tmp_path: Path) -> None:
    import shutil

    if not shutil.which("unshare"):
        pytest.skip("unshare")
    proc = subprocess.Popen(
        ["unshare", "--time", "--boottime", "100000", "--fork", sys.executable, "-c",
         "import json, sys, time; from flowdsl.runtime import owner; print(json.dumps(owner.this_process()), "
         "flush=True); time.sleep(60)"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            pytest.skip(f"no time namespace here: {proc.communicate(timeout=ENDS)[1]}")
        assert owner.judge(json.loads(line)).state != owner.GONE
    finally:
        for child in subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True,
                                    text=True).stdout.split():
            os.kill(int(child), signal.SIGKILL)
        proc.wait(ENDS)


@pytest.mark.parametrize("pid", [0, -1, 1 << 70])
def test_a_pid_that_is_no_pid_cannot_be_told(pid: int) -> None:
    assert owner.judge({**owner.this_process(), "pid": pid}).state == owner.UNKNOWN


def test_show_quotes_the_host_a_record_names_inert(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    path = _cut(runs, "forged1")
    _rewrite_header(path, process={**owner.this_process(), "host": "far\nresolved: all good \x1b[2J"})
    r = cli("show", "forged1", "--runs-dir", str(runs))
    assert r.exit_code == 0, r.output
    said = [line for line in r.output.splitlines() if "far" in line]
    assert said and all("\x1b" not in line and "far\\nresolved: all good \\u001b[2J" in line for line in said)
    assert not any(line.startswith("resolved: all good") for line in r.output.splitlines())
