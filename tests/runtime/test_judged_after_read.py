"""`runs` and `show` judge a local record by what it holds and by whether its process runs — two looks, one after the
other. A record read while its run still went, whose process then ended the run and exited before the look at the
process, must not be called `crashed` (with a list of steps "left to undo by hand"): a process that is gone writes
no more, so after a `gone` verdict the record is read again and judged as it ends. A record that ends while its
runtime waits, after the run's end, for attempts the run gave up on, whose process still runs, is still waiting —
nothing is in doubt yet, nor final. And the live table of `flowdsl run` is drawn on a real terminal only, whatever
FORCE_COLOR says.

The race is made deterministic: the look at the process (``owner.judge``) first appends the rest of the record, as
the run's process would have just before exiting. No process is started here but short-lived `sleep`s (reaped).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from flowdsl import compile_text, run
from flowdsl.cli import app
from flowdsl.runtime import owner, stopped
from flowdsl.runtime.local import LocalRun
from flowdsl.runtime.rebuild import result_from_record
from flowdsl.runtime.record import read_record
from flowdsl.runtime.timeline import LiveView, draws_live, print_timeline, record_end_note
from flowdsl.workers import WorkerRegistry
from tests.runtime.conformance import HEADER
from tests.runtime.test_stopped_runs import TWO, _dead_process

#: seconds a run (or a wait in a worker) may take before a test calls it hung
HUNG = 10.0
#: charge times out; its sync thread runs on, so the run's end waits for it (late_grace)
LONE = compile_text("flowdsl: 1\nname: lone\nsteps:\n  - charge: {compensate: refund, timeout: 100ms}\n")


def cli(*args: str, **kwargs: Any) -> Any:
    return CliRunner().invoke(app, list(args), **kwargs)


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _with_process(lines: list[bytes], process: dict[str, Any]) -> list[bytes]:
    """The record's lines with its header naming ``process``."""
    header = json.loads(lines[0])
    header["process"] = process
    return [json.dumps(header).encode() + b"\n", *lines[1:]]


def _completed(runs: Path, run_id: str) -> list[bytes]:
    """The lines of a whole record of a run that completed (a, then b, each with an undo), its header naming a
    process that has ended."""
    run(compile_text(HEADER.format(name="saga") + TWO), {"script": {}}, run_id=run_id, runs_dir=runs)
    return _with_process(_lines(runs / f"{run_id}.jsonl"), _dead_process())


def _waited(runs: Path, run_id: str) -> list[bytes]:
    """The lines of a whole record of a run whose end waited for a late answer: charge timed out, the run ended
    failed, then charge's thread succeeded during the wait — a late completion: needs_intervention."""
    go = threading.Event()
    reg = WorkerRegistry()

    def charge(data: Any, ctx: Any) -> dict[str, Any]:
        assert go.wait(HUNG)
        return {"charge_id": "ch1"}

    async def refund(data: Any, ctx: Any) -> dict[str, Any]:
        return {}

    reg.register("charge", charge)
    reg.register("refund", refund)

    def answer_once_ended(event: dict[str, Any]) -> None:
        if event["type"] == "run_finished" and event["status"] == "failed":
            threading.Timer(0.05, go.set).start()  # (once the wait is written: the runtime writes it at once)

    async def main() -> Any:
        local = LocalRun(LONE, {}, run_id=run_id, runs_dir=runs, registry=reg, import_workers=False,
                         late_grace=HUNG, on_event=answer_once_ended)
        return await asyncio.wait_for(local.run(), HUNG)

    try:
        result = asyncio.run(main())
    finally:
        go.set()
    assert result.status == "needs_intervention"
    lines = _lines(runs / f"{run_id}.jsonl")
    kinds = [json.loads(line)["type"] for line in lines]
    assert kinds[-1] == "runtime_waited" and "runtime_waiting" in kinds
    return lines


def _until(lines: list[bytes], kind: str, *, status: str | None = None) -> int:
    """The number of lines up to and with the first line of ``kind`` (of ``status``)."""
    return next(i for i, line in enumerate(lines) if (e := json.loads(line))["type"] == kind
                and (status is None or e.get("status") == status)) + 1


@pytest.fixture
def grows_when_judged(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[Path, bytes]]]:
    """Append to a record (``(path, bytes)`` items put in the list yielded) at the first look at a process, then
    look: the run wrote the rest of its record, and its process exited, between the reading and the look."""
    pending: list[tuple[Path, bytes]] = []
    real = owner.judge

    def judge(process: Any) -> owner.Verdict:
        while pending:
            path, rest = pending.pop()
            with open(path, "ab") as fh:
                fh.write(rest)
        return real(process)

    monkeypatch.setattr(owner, "judge", judge)
    monkeypatch.setattr(stopped, "judge", judge)
    yield pending


def _cut_record(tmp_path: Path, where: str) -> tuple[Path, Path, bytes, str]:
    """A record of a run that went to its end, cut as it was read while the run went (``where``: mid-run, with its
    header alone, during the wait after the run's end); its header names a process that has ended. Returns the
    records directory, the record, the rest of it (what its process wrote before exiting) and how the run ended."""
    runs = tmp_path / "runs"
    if where == "waiting":
        lines, end = _with_process(_waited(runs, "r1"), _dead_process()), "needs_intervention"
        keep = _until(lines, "runtime_waiting")
    else:
        lines, end = _completed(runs, "r1"), "completed"
        keep = 1 if where == "header" else _until(lines, "step_succeeded")
    path = runs / "r1.jsonl"
    path.write_bytes(b"".join(lines[:keep]))
    return runs, path, b"".join(lines[keep:]), end


# --- F1: a run that ends between the reading and the look at its process ---------------------------------------


@pytest.mark.parametrize("where", ["mid-run", "header", "waiting"])
def test_runs_lists_a_run_that_ended_meanwhile_as_it_ended(tmp_path: Path, where: str,
                                                           grows_when_judged: list[tuple[Path, bytes]]) -> None:
    runs, path, rest, end = _cut_record(tmp_path, where)
    grows_when_judged.append((path, rest))
    listed = cli("runs", "--backend", "local", "--runs-dir", str(runs), "--format", "json")
    assert listed.exit_code == 0, listed.output
    [row] = json.loads(listed.stdout)
    assert row["status"] == end and isinstance(row["finished_at"], int), row
    assert "crashed" not in listed.stderr and "gone" not in listed.stderr and "waits" not in listed.stderr
    assert not grows_when_judged  # (it did grow, at the look)


@pytest.mark.parametrize("where", ["mid-run", "header", "waiting"])
def test_show_shows_a_run_that_ended_meanwhile_as_it_ended(tmp_path: Path, where: str,
                                                           grows_when_judged: list[tuple[Path, bytes]]) -> None:
    runs, path, rest, end = _cut_record(tmp_path, where)
    grows_when_judged.append((path, rest))
    shown = cli("show", "r1", "--runs-dir", str(runs), "--format", "json")
    assert shown.exit_code == 0, shown.output
    result = json.loads(shown.stdout)
    assert result["status"] == end and "crashed" not in result and "stopped_in" not in result, result
    assert result["in_doubt"] == [] and isinstance(result["finished_at"], int)
    if end == "completed":
        assert result["intervention"] is None
    said = " ".join(shown.stderr.split())
    assert "gone" not in said and "ends before" not in said and "ends while" not in said, said


def test_resolve_refuses_a_record_that_ended_meanwhile(tmp_path: Path,
                                                       grows_when_judged: list[tuple[Path, bytes]]) -> None:
    """resolve judges the record it holds locked: one that changed meanwhile is refused, and left as it is."""
    runs, path, rest, _ = _cut_record(tmp_path, "mid-run")
    grows_when_judged.append((path, rest))
    refused = cli("resolve", "r1", "--runs-dir", str(runs), "--format", "json")
    assert refused.exit_code == 1, refused.output
    assert json.loads(refused.stdout)["resolved"] is None
    assert b'"resolved"' not in path.read_bytes()


def test_a_record_that_holds_no_more_after_the_verdict_is_a_crash(tmp_path: Path,
                                                                  grows_when_judged: list[tuple[Path, bytes]]) -> None:
    """The verdict stands when the record is as it was read — and when it grew but still has no end, the crash is
    told from what it holds now."""
    runs, path, rest, _ = _cut_record(tmp_path, "mid-run")
    lines = rest.splitlines(keepends=True)
    more = b"".join(lines[:_until(lines, "step_scheduled")])  # b dispatched, then the process died
    assert b'"step":"b"' in more and b"run_finished" not in more
    listed = json.loads(cli("runs", "--backend", "local", "--runs-dir", str(runs), "-f", "json").stdout)
    assert [row["status"] for row in listed] == ["crashed"]
    grows_when_judged.append((path, more))
    shown = json.loads(cli("show", "r1", "--runs-dir", str(runs), "--format", "json").stdout)
    assert shown["status"] == "crashed" and shown["stopped_in"] == "running"
    assert path.read_bytes().endswith(more)
    assert [row["status"] for row in json.loads(
        cli("runs", "--backend", "local", "--runs-dir", str(runs), "-f", "json").stdout)] == ["crashed"]


# --- F2, N6: a run whose runtime still waits after its end; a run still going ----------------------------------


def _waiting(tmp_path: Path, process: dict[str, Any]) -> tuple[Path, Path]:
    """A record that ends during the wait after the run's end (failed; charge's attempt 1 waited for), its header
    naming ``process``."""
    runs = tmp_path / "runs"
    lines = _with_process(_waited(runs, "w1"), process)
    path = runs / "w1.jsonl"
    path.write_bytes(b"".join(lines[:_until(lines, "runtime_waiting")]))
    return runs, path


def test_runs_marks_a_run_whose_live_runtime_still_waits(tmp_path: Path) -> None:
    """Its end state, not finished yet: the keys of a Redis run's object, finished_at null until the wait is over."""
    runs, _ = _waiting(tmp_path, owner.this_process())  # (this process runs: its runtime still waits)
    listed = cli("runs", "--backend", "local", "--runs-dir", str(runs), "--format", "json")
    [row] = json.loads(listed.stdout)
    assert (row["status"], row["finished_at"]) == ("failed", None) and isinstance(row["started_at"], int)
    said = " ".join(listed.stderr.split())
    assert "1 run(s) ended, and their runtime still waits for attempts the run had given up on (w1)" in said
    assert "not final yet" in said
    text = cli("runs", "--backend", "local", "--runs-dir", str(runs))
    assert "failed (waiting)" in text.stdout


def test_runs_lists_the_wait_of_a_process_that_is_gone_in_doubt_and_final(tmp_path: Path) -> None:
    runs, _ = _waiting(tmp_path, _dead_process())
    listed = cli("runs", "--backend", "local", "--runs-dir", str(runs), "--format", "json")
    [row] = json.loads(listed.stdout)
    assert row["status"] == "failed" and isinstance(row["finished_at"], int)
    assert "still waits" not in listed.stderr


def test_show_of_a_run_whose_live_runtime_still_waits_says_so(tmp_path: Path) -> None:
    """Nothing in doubt yet (its runtime waits), no `resolve` hint, and one note: the run ended and still waits."""
    runs, path = _waiting(tmp_path, owner.this_process())
    shown = cli("show", "w1", "--runs-dir", str(runs), "--format", "json")
    result = json.loads(shown.stdout)
    assert (result["status"], result["in_doubt"], result["intervention"]) == ("failed", [], None)
    text = cli("show", "w1", "--runs-dir", str(runs)).stdout
    assert "flowdsl resolve" not in text and "outcome unknown" not in text
    # what `flowdsl show` prints of it, as cli_run's _show calls these
    header, lines = read_record(path)
    outcome = result_from_record(header, lines, path)
    standing = stopped.settle(header, lines, outcome)
    assert standing.live and standing.awaited == ("w1/charge#1",) and outcome.in_doubt == []
    note = record_end_note(outcome, lines, standing) or ""
    assert note.startswith("the run ended failed, and its runtime still waits for 1 attempt(s) the run had given "
                           "up on (w1/charge#1)") and "nothing is final, nor in doubt, yet" in note
    out = io.StringIO()
    print_timeline(outcome, lines, Console(file=out, width=400), standing=standing)
    said = " ".join(out.getvalue().split())
    assert "still waits for 1 attempt(s)" in said and "process stopped" not in said and "unknown" not in said
    said = " ".join((shown.stderr + text).split())  # the command itself: each note once, none contradicting it
    assert said.count("its runtime still waits for 1 attempt(s)") == 2 and "its process stopped" not in said


def test_show_of_the_wait_of_a_process_that_is_gone_leaves_the_attempt_in_doubt(tmp_path: Path) -> None:
    runs, path = _waiting(tmp_path, _dead_process())
    result = json.loads(cli("show", "w1", "--runs-dir", str(runs), "--format", "json").stdout)
    assert result["status"] == "failed" and [i["step"] for i in result["in_doubt"]] == ["charge"]
    header, lines = read_record(path)
    outcome = result_from_record(header, lines, path)
    standing = stopped.settle(header, lines, outcome)
    assert standing.process is not None and standing.process.state == owner.GONE and standing.awaited == ()
    assert "its process stopped, and what they did is unknown" in (record_end_note(outcome, lines, standing) or "")


def test_show_of_a_run_still_going_says_one_thing(tmp_path: Path) -> None:
    """N6: its process runs — the run is still going; not also "its process stopped … or still going"."""
    runs = tmp_path / "runs"
    lines = _with_process(_completed(runs, "g1"), owner.this_process())
    path = runs / "g1.jsonl"
    path.write_bytes(b"".join(lines[:_until(lines, "step_succeeded")]))
    header, read = read_record(path)
    outcome = result_from_record(header, read, path)
    standing = stopped.settle(header, read, outcome)
    assert standing.live and not standing.crashed
    said = "the record ends before the run did: the run is still going; state so far: running"
    assert record_end_note(outcome, read, standing) == said
    out = io.StringIO()
    print_timeline(outcome, read, Console(file=out, width=400), standing=standing)
    assert said in out.getvalue() and "stopped" not in out.getvalue()
    # of another host's run it cannot be told: both are said possible, and that it cannot be told
    far = {**owner.this_process(), "host": "elsewhere.example"}
    path.write_bytes(b"".join(_with_process(lines, far)[:_until(lines, "step_succeeded")]))
    header, read = read_record(path)
    outcome = result_from_record(header, read, path)
    standing = stopped.settle(header, read, outcome)
    assert "or the run is still going — which cannot be told here" in (record_end_note(outcome, read, standing) or "")


# --- F6: the live table is for a real terminal -----------------------------------------------------------------


def _plan() -> dict[str, Any]:
    return compile_text(HEADER.format(name="t") + "steps: [conf.a]\n")


@pytest.mark.parametrize("env", [{"FORCE_COLOR": "1"}, {"TTY_COMPATIBLE": "1"}])
def test_force_color_colours_the_lines_of_a_log_but_draws_no_live_table(tmp_path: Path, env: dict[str, str],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from flowdsl.stdio import console

    for key in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR", "TERM"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with open(tmp_path / "log", "w") as log:
        monkeypatch.setattr("sys.stderr", log)
        made = console(stderr=True)
        assert made.is_terminal  # (rich takes the file for a terminal: colours)
        view = LiveView(_plan(), console=made)
        assert view.mode == "lines" and not draws_live(made)
        view.on_event({"type": "run_started", "run_id": "r1", "at": 0, "flow": "t"})
    written = (tmp_path / "log").read_text()
    assert "r1" in written and "\x1b[" in written and "\x1b[1A" not in written  # coloured, no cursor moves


def test_flowdsl_run_under_force_color_writes_lines_not_redraws(tmp_path: Path) -> None:
    spec = tmp_path / "slow.yaml"
    spec.write_text(HEADER.format(name="slow") + "steps: [conf.a, conf.b]\n")
    done = cli("run", str(spec), "--no-record", "--set", 'script={"a": {"sleep": 0.4}}',
               env={"FORCE_COLOR": "1", "TERM": "xterm-256color"})
    assert done.exit_code == 0, done.output
    assert "\x1b[1A" not in done.stderr and "\x1b[2K" not in done.stderr, done.stderr  # no redraws
    assert "✓" in done.stderr and "\x1b[" in done.stderr  # a line per step, coloured


def test_a_real_terminal_gets_the_live_table_unless_term_is_dumb(monkeypatch: pytest.MonkeyPatch) -> None:
    leader, follower = os.openpty()
    try:
        with open(follower, "w", closefd=False) as tty:
            for key in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR"):
                monkeypatch.delenv(key, raising=False)
            monkeypatch.setenv("TERM", "xterm-256color")
            assert LiveView(_plan(), console=Console(file=tty)).mode == "live"
            monkeypatch.setenv("TERM", "dumb")
            assert LiveView(_plan(), console=Console(file=tty)).mode == "lines"
            monkeypatch.setenv("TERM", "xterm-256color")
            monkeypatch.setenv("TTY_COMPATIBLE", "0")  # (said not to be one)
            assert LiveView(_plan(), console=Console(file=tty)).mode == "lines"
    finally:
        os.close(leader)
        os.close(follower)
    # a console its maker made a terminal draws the table (tests, embedding code that asks for it)
    assert LiveView(_plan(), console=Console(file=io.StringIO(), force_terminal=True)).mode == "live"
