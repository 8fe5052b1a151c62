"""`flowdsl run --park` and `flowdsl resume --park / --cancel` (the local runtime): a run that has nothing left but
waiting is parked, exit 5, and its summary says what each wait waits for, until when, and the command that goes on
with it; `show` says the same of its record; what is refused before anything runs (exit 2)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flowdsl.cli import app
from flowdsl.runtime.parking import at_text
from tests.runtime.conformance import HEADER

#: a (undone by undo.a), the wait for signal 'paid' (up to 72h; its payload as `confirmation`), a timer wait
#: ({cool}), then b
STEPS = ("steps:\n  - conf.a: {{compensate: undo.a}}\n  - wait: paid\n    timeout: 72h\n    output: confirmation\n"
         "  - wait: cool\n    for: {cool}\n  - conf.b\n")


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def spec(tmp: Path, cool: str = "2h", steps: str = STEPS) -> str:
    path = tmp / "pay.yaml"
    path.write_text(HEADER.format(name="pay") + steps.format(cool=cool))
    return str(path)


def said(text: str) -> str:
    return " ".join(text.split())


def parked_at_paid(tmp_path: Path, cool: str = "2h", *more: str) -> tuple[Path, dict[str, Any]]:
    """Run the flow with --park: parked at its wait for 'paid'; the runs directory and the JSON object."""
    runs = tmp_path / "runs"
    r = cli("run", spec(tmp_path, cool), "--runs-dir", str(runs), "--run-id", "p1", "--park", "--format", "json",
            *more)
    assert r.exit_code == 5, r.stderr
    return runs, json.loads(r.stdout)


def test_a_run_that_only_waits_is_parked_exit_5_and_says_how_to_go_on(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    r = cli("run", spec(tmp_path), "--runs-dir", str(runs), "--run-id", "p1", "--park")
    assert r.exit_code == 5, r.stderr
    out = json.loads(cli("show", "p1", "--runs-dir", str(runs), "--format", "json").stdout)
    due = out["parked"]["waits"][0]["due_at"]
    resume = f"flowdsl resume p1 --runs-dir {runs}"
    err = said(r.stderr)
    assert "pay p1: parked — not over, and no process runs it" in err, err
    assert (f"its waits, and how to go on with each: paid: signal 'paid', until {at_text(due)} (then it fails with "
            f"WaitTimeout) — `{resume} --signal paid=JSON`") in err
    assert f"or `{resume} --cancel` cancels the run (what completed is undone)" in err
    assert "waits for a signal this command does not send: if the run reaches it, the run is parked there" in err
    assert "(within 72h of the wait's start: then it fails with WaitTimeout)" in err
    assert "the run waits for signal 'paid'" not in err  # (parked instead: what it waits for is said then)


def test_the_json_object_of_a_parked_run(tmp_path: Path) -> None:
    runs, out = parked_at_paid(tmp_path)
    assert (out["status"], out["stopped_in"], out["context"]) == ("parked", "running", None)
    (wait,) = out["parked"]["waits"]
    started = out["steps"]["paid"]["started_at"]
    assert wait == {"wait": "paid", "signal": "paid", "due_at": started + 72 * 3_600_000}
    assert out["parked"]["due_at"] == wait["due_at"] and out["steps"]["paid"]["status"] == "waiting"
    shown = cli("show", "p1", "--runs-dir", str(runs), "--format", "json")
    assert shown.exit_code == 0
    again = json.loads(shown.stdout)
    assert (again["status"], again["stopped_in"], again["parked"]) == ("parked", "running", out["parked"])
    assert again["steps"] == out["steps"] and again["resolved"] is None
    assert ("note: the run is parked: not over, and no process runs it; it waits for signal 'paid'"
            in said(shown.stderr)), shown.stderr
    assert f"`flowdsl resume p1 --runs-dir {runs} --cancel`" in said(shown.stderr)


def test_show_of_a_parked_run_ends_its_timeline_with_it_and_says_how_to_go_on(tmp_path: Path) -> None:
    runs, out = parked_at_paid(tmp_path)
    r = cli("show", "p1", "--runs-dir", str(runs))
    assert r.exit_code == 0, r.output
    text = said(r.stdout)
    timeline = text[:text.index("step status")].rstrip()
    assert timeline.endswith("parked: nothing was left but waiting — paid (signal 'paid') — and its process let "
                             "the run go"), timeline
    due = out["parked"]["due_at"]
    assert "pay p1: parked — not over, and no process runs it" in text
    assert (f"paid: signal 'paid', until {at_text(due)} (then it fails with WaitTimeout) — `flowdsl resume p1 "
            f"--runs-dir {runs} --signal paid=JSON`") in text
    assert "the record ends before the run did" not in text and "resolve" not in text


def test_resumed_with_its_signal_and_park_it_is_parked_again_at_its_timer_then_goes_on(tmp_path: Path) -> None:
    runs, _ = parked_at_paid(tmp_path, "150ms")
    r = cli("resume", "p1", "--runs-dir", str(runs), "--signal", 'paid={"amount": 42}', "--park", "--format", "json")
    assert r.exit_code == 5, r.stderr
    out = json.loads(r.stdout)
    (wait,) = out["parked"]["waits"]
    assert (out["status"], wait["wait"], wait["signal"]) == ("parked", "cool", None)
    assert out["steps"]["paid"]["status"] == "succeeded" and [x["was"] for x in out["resumed"]] == ["parked"]
    text = cli("show", "p1", "--runs-dir", str(runs))
    lines = said(text.stdout)
    assert f"cool: timer, until {at_text(wait['due_at'])} — `flowdsl resume p1 --runs-dir {runs}` once it is due" \
        in lines
    assert "its process had parked it (nothing was left but waiting)" in lines
    time.sleep(max(0.0, wait["due_at"] / 1000 - time.time()) + 0.05)
    done = cli("resume", "p1", "--runs-dir", str(runs), "--park", "--format", "json")
    assert done.exit_code == 0, done.stderr
    ended = json.loads(done.stdout)
    assert (ended["status"], ended["context"]["confirmation"]) == ("completed", {"amount": 42})
    assert "parked" not in ended and [x["was"] for x in ended["resumed"]] == ["parked", "parked"]


def test_resume_cancel_cancels_a_parked_run_and_undoes_what_completed(tmp_path: Path) -> None:
    runs, _ = parked_at_paid(tmp_path)
    r = cli("resume", "p1", "--runs-dir", str(runs), "--cancel")
    assert r.exit_code == 1, r.stderr
    err = said(r.stderr)
    assert "resuming run p1 (parked, running); cancelling it" in err
    assert "pay p1: cancelled — Cancelled: cancelled as it was resumed" in err
    assert "compensated, in this order: a (undo.a)" in err
    assert "waits for a signal this command does not send" not in err  # (its waits end: nothing to send)
    out = json.loads(cli("show", "p1", "--runs-dir", str(runs), "--format", "json").stdout)
    assert (out["status"], out["compensated"], out["steps"]["paid"]["status"]) == ("cancelled", ["a"], "cancelled")


def test_a_flow_with_no_wait_is_never_parked(tmp_path: Path) -> None:
    path = tmp_path / "plain.yaml"
    path.write_text(HEADER.format(name="plain") + "steps:\n  - conf.a\n  - conf.b\n")
    r = cli("run", str(path), "--runs-dir", str(tmp_path / "runs"), "--park", "--format", "json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "completed" and "parked" not in out


@pytest.mark.parametrize(("args", "message"), [
    (["--no-record"], "--park and --no-record contradict each other: a parked run goes on from its record (`flowdsl "
                      "resume`), which --no-record does not write; give one of them"),
    (["--backend", "redis"], "--park is for the local runtime: a Redis run's waits outlast every process already "
                             "(--detach: print the run id and exit)"),
])
def test_park_without_a_record_or_on_redis_is_a_usage_error(tmp_path: Path, args: list[str], message: str) -> None:
    r = cli("run", spec(tmp_path), "--park", *args)
    assert r.exit_code == 2 and message in said(r.stderr), r.stderr
    j = cli("run", spec(tmp_path), "--park", *args, "--format", "json")
    assert j.exit_code == 2
    out = json.loads(j.stdout)
    assert out["status"] == "error" and out["error"] == {"type": "UsageError", "message": message}


def test_the_help_of_run_and_resume_names_park_and_exit_code_5() -> None:
    for command in ("run", "resume"):
        text = said(cli(command, "--help").stdout)
        assert "--park" in text and "5 parked" in text, command
    assert "--cancel" in said(cli("resume", "--help").stdout)
