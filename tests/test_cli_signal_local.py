"""`flowdsl run --signal` and `flowdsl resume --signal` (the local runtime): signals sent as the run starts, what
is refused before anything runs (exit 2), the note on a signal wait nothing will signal, what the progress, `show`
and `--format json` say of waits and signals."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flowdsl.cli import app
from tests.runtime.conformance import HEADER

#: a (undone by undo.a), the wait for signal 'paid' (its payload as `confirmation`), a 40ms timer, then b
STEPS = ("steps:\n  - conf.a: {{compensate: undo.a}}\n  - wait: paid\n    output: confirmation\n{extra}"
         "  - wait: cool\n    for: 40ms\n  - conf.b\n")


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def spec(tmp: Path, extra: str = "") -> str:
    path = tmp / "pay.yaml"
    path.write_text(HEADER.format(name="pay") + STEPS.format(extra=extra))
    return str(path)


def said(text: str) -> str:
    return " ".join(text.split())


def test_a_signal_given_with_the_run_is_kept_until_its_wait_starts(tmp_path: Path) -> None:
    r = cli("run", spec(tmp_path), "--runs-dir", str(tmp_path / "runs"), "--run-id", "r1",
            "--signal", 'paid={"amount": 42}', "--format", "json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "completed" and out["context"]["confirmation"] == {"amount": 42}
    assert out["steps"]["paid"] | {"started_at": 0, "finished_at": 0} == {
        "status": "succeeded", "attempts": 0, "started_at": 0, "finished_at": 0, "error": None, "kind": "wait",
        "node": "paid", "signal": "paid", "key": None, "wait_ms": None}
    assert (out["steps"]["cool"]["signal"], out["steps"]["cool"]["wait_ms"]) == (None, 40)
    assert out["timing"]["critical_path"] == ["a", "paid", "cool", "b"]
    assert "waits for a signal this command does not send" not in r.stderr
    shown = cli("show", "r1", "--runs-dir", str(tmp_path / "runs"), "--format", "json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["steps"] == out["steps"]
    text = cli("show", "r1", "--runs-dir", str(tmp_path / "runs"))
    lines = said(text.stdout + text.stderr)
    for line in ("✉ signal 'paid' kept until wait 'paid' starts", "⚐ paid waits for signal 'paid' (no deadline)",
                 "✉ signal 'paid' received by wait 'paid' (it had been kept until the wait started)",
                 "✓ paid done waiting", "⚐ cool waits 40ms", "paid succeeded ⚐", "waits ⚐: paid: signal 'paid'",
                 "cool: timer 40ms"):
        assert line in lines, line


def test_a_payload_from_a_file_and_a_signal_without_one(tmp_path: Path) -> None:
    (tmp_path / "paid.json").write_text('\ufeff{"from": "file"}')
    r = cli("run", spec(tmp_path), "--no-record", "--signal", f"paid=@{tmp_path / 'paid.json'}", "--format", "json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["context"]["confirmation"] == {"from": "file"}
    r = cli("run", spec(tmp_path), "--no-record", "--signal", "paid", "--format", "json")
    assert r.exit_code == 0 and json.loads(r.stdout)["context"]["confirmation"] == {}


@pytest.mark.parametrize(("value", "message"), [
    ("paid={bad", "--signal paid: the payload is not valid JSON (line 1, column 2: Expecting property name enclosed "
                  "in double quotes); expected a JSON object"),
    ("paid=[1, 2]", "--signal paid: the payload must be a JSON object, found an array"),
    ("paid=", "--signal paid: the payload is empty"),
    ('paid={"a": 1, "a": 2}', "--signal paid (at character 10 of the value): the key \"a\" appears twice"),
    ("paid=NaN", "--signal paid: the payload is not valid JSON"),
    ("=x", "--signal =x: expected NAME, NAME=JSON or NAME=@FILE"),
    ("nope={}", "--signal nope: no wait of flow 'pay' takes signal 'nope': its signals are 'paid'"),
    ("paid=@missing.json", "--signal paid=@missing.json: cannot read the file: No such file or directory"),
])
def test_a_bad_signal_is_refused_before_the_run_starts(tmp_path: Path, value: str, message: str) -> None:
    r = cli("run", spec(tmp_path), "--runs-dir", str(tmp_path / "runs"), "--signal", value)
    assert r.exit_code == 2 and message in said(r.stderr), r.stderr
    assert not (tmp_path / "runs").exists()  # nothing ran
    j = cli("run", spec(tmp_path), "--no-record", "--signal", value, "--format", "json")
    assert j.exit_code == 2 and json.loads(j.stdout)["error"]["type"] == "UsageError"


def test_a_payload_from_stdin(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["run", spec(tmp_path), "--no-record", "--signal", "paid=@-", "--format", "json"],
                           input='{"from": "stdin"}')
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["context"]["confirmation"] == {"from": "stdin"}
    r = CliRunner().invoke(app, ["run", spec(tmp_path), "--no-record", "--signal", "paid=@-"], input="[1]")
    assert r.exit_code == 2 and "--signal paid=@- (stdin): the payload must be a JSON object, found an array" in \
        said(r.stderr)


@pytest.mark.parametrize(("args", "message"), [
    (["--input", "-", "--signal", "paid=@-"], "--signal paid=@-: stdin is read for the run input already "
                                              "(--input -): give the signal's payload inline"),
    (["--signal", "paid=@-", "--signal", "nope=@-"], "--signal nope=@-: stdin is read for the payload of --signal "
                                                     "paid=@- already: give one of them inline"),
])
def test_stdin_is_read_once(tmp_path: Path, args: list[str], message: str) -> None:
    r = CliRunner().invoke(app, ["run", spec(tmp_path), "--runs-dir", str(tmp_path / "runs"), *args],
                           input='{"a": 1}')
    assert r.exit_code == 2 and message in said(r.stderr), r.stderr
    assert not (tmp_path / "runs").exists()
    j = CliRunner().invoke(app, ["run", spec(tmp_path), "--no-record", *args, "--format", "json"], input="{}")
    assert j.exit_code == 2 and message in said(json.loads(j.stdout)["error"]["message"])


@pytest.mark.parametrize(("value", "message"), [
    ("paid=\udcff", "--signal paid: the payload is not UTF-8 text (byte 0xff at offset 0); expected a JSON object"),
    ('paid={"a": "\udcfe"}', "--signal paid: the payload is not UTF-8 text (byte 0xfe at offset 7)"),
    ("paid=\ud800", "--signal paid: the payload is not UTF-8 text (a lone surrogate, U+D800, at character 1)"),
])
def test_an_inline_payload_that_is_not_utf8_is_said_so(tmp_path: Path, value: str, message: str) -> None:
    r = cli("run", spec(tmp_path), "--no-record", "--signal", value)
    assert r.exit_code == 2 and message in said(r.stderr), r.stderr


def test_a_signal_given_twice_and_one_for_redis_are_refused(tmp_path: Path) -> None:
    r = cli("run", spec(tmp_path), "--no-record", "--signal", "paid", "--signal", "paid={}")
    assert r.exit_code == 2 and "--signal: signal 'paid' is given twice" in said(r.stderr)
    r = cli("run", spec(tmp_path), "--backend", "redis", "--signal", "paid")
    assert r.exit_code == 2 and "--signal is for --backend local" in said(r.stderr)


def test_a_signal_wait_nothing_signals_is_said_and_times_out(tmp_path: Path) -> None:
    r = cli("run", spec(tmp_path, "    timeout: 50ms\n"), "--no-record")
    assert r.exit_code == 1, r.stderr
    err = said(r.stderr)
    assert ("note: wait 'paid' waits for a signal this command does not send: a local run takes one only from "
            "Python (LocalRun.signal) or as it starts (`flowdsl run … --signal paid=JSON`); if the run reaches it, "
            "it waits 50ms and fails (WaitTimeout)") in err
    assert "⚐ paid waits for signal 'paid' (up to 50ms)" in err
    assert err.count("the run waits for signal 'paid' (up to 50ms: then it fails with WaitTimeout)") == 1
    assert "✗ paid — WaitTimeout: no signal 'paid' came within 50ms" in err
    assert "pay" in err and "compensated at paid — WaitTimeout: no signal 'paid' came within 50ms" in err
    assert "compensated, in this order: a (undo.a)" in err


def test_a_run_stopped_while_it_waits_is_resumed_with_its_signal(tmp_path: Path) -> None:
    runs = _stopped_as_it_waits(tmp_path, "s1")
    shown = cli("show", "s1", "--runs-dir", str(runs), "--format", "json")
    assert json.loads(shown.stdout)["steps"]["paid"]["status"] == "waiting"
    text = cli("show", "s1", "--runs-dir", str(runs))
    assert "with `--signal paid=JSON` to send the signal it waits for" in said(text.stdout + text.stderr)
    bad = cli("resume", "s1", "--runs-dir", str(runs), "--force", "--signal", "paid=1")
    assert bad.exit_code == 2 and "--signal paid: the payload must be a JSON object, found a number" in said(bad.stderr)
    r = cli("resume", "s1", "--runs-dir", str(runs), "--force", "--signal", 'paid={"late": true}', "--format", "json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "completed" and out["context"]["confirmation"] == {"late": True}
    again = cli("show", "s1", "--runs-dir", str(runs), "--format", "json")
    assert json.loads(again.stdout)["steps"] == out["steps"]


def test_a_deadline_that_passed_while_the_run_stood_beats_a_signal_sent_with_resume(tmp_path: Path) -> None:
    import time

    runs = _stopped_as_it_waits(tmp_path, "d1", "    timeout: 60ms\n")
    time.sleep(0.12)  # past the wait's deadline, with no process running the run
    r = cli("resume", "d1", "--runs-dir", str(runs), "--force", "--signal", 'paid={"late": true}', "--format", "json")
    assert r.exit_code == 1, r.stderr
    out = json.loads(r.stdout)
    assert (out["status"], out["error"]["type"], out["failed_step"]) == ("compensated", "WaitTimeout", "paid")
    assert out["error"]["message"] == "no signal 'paid' came within 60 ms"
    assert out["compensated"] == ["a"] and "confirmation" not in (out["context"] or {})
    told = [e["type"] for e in out["events"] if e["type"] in ("step_failed", "signal_received", "signal_rejected")]
    assert told == ["step_failed", "signal_rejected"]
    text = cli("show", "d1", "--runs-dir", str(runs))
    lines = said(text.stdout + text.stderr)
    assert "✗ paid failed — WaitTimeout: no signal 'paid' came within 60ms" in lines, lines
    assert "✉ signal 'paid' rejected: " in lines
    assert lines.index("✗ paid failed") < lines.index("✉ signal 'paid' rejected")


def test_the_note_on_a_wait_nothing_signals_says_ctrl_c_only_when_it_cancels(tmp_path: Path) -> None:
    from flowdsl import compile_spec
    from flowdsl.cli_signals import unsent_notes

    plan = compile_spec(spec(tmp_path)).plan
    assert plan is not None
    (taken,) = unsent_notes(plan, [])
    (ignored,) = unsent_notes(plan, [], ctrl_c=False)
    assert taken.endswith("it waits for ever (Ctrl-C cancels the run)") and ignored.endswith("it waits for ever")


def _stopped_as_it_waits(tmp_path: Path, run_id: str, options: str = "") -> Path:
    """A run of the spec (its wait given ``options``) stopped at once (``abort``: its record kept, as a process that
    died would leave it) as its wait starts; the runs directory holding its record."""
    from flowdsl import compile_spec
    from flowdsl.runtime.local import LocalRun, RunAborted

    path = spec(tmp_path, options)
    plan = compile_spec(path).plan
    assert plan is not None
    runs = tmp_path / "runs"

    async def stopped() -> None:
        run: LocalRun

        def on_event(event: dict[str, Any]) -> None:
            if event["type"] == "step_started" and event["step"] == "paid":
                asyncio.get_running_loop().call_soon(run.abort, "stopped by the test")

        run = LocalRun(plan, {}, runs_dir=runs, run_id=run_id, on_event=on_event, spec_path=path)
        with pytest.raises(RunAborted):
            await run.run()

    asyncio.run(stopped())
    return runs
