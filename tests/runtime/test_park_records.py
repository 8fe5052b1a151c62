"""The records of parked local runs (``park=True``, ``flowdsl run --park``) as the commands that read them say them:
``flowdsl runs --backend local`` lists them ``parked``, with what each waits for and its next due time (and
``--status parked`` finds them), ``show`` and the summary say how to go on, ``prune`` keeps them and ``resolve``
refuses them."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from flowdsl import compile_text
from flowdsl.cli import app
from flowdsl.runtime import listing
from flowdsl.runtime.local import run_flow
from flowdsl.runtime.parking import at_text
from flowdsl.runtime.redis.client import RunInfo
from flowdsl.runtime.resume import resume_flow
from tests.runtime.conformance import HEADER

#: a (undone by undo.a), the wait for signal 'paid' (up to 1h), the wait `cool` (2h), then b
PAID = ("steps:\n  - conf.a: {compensate: undo.a}\n  - wait: paid\n    timeout: 1h\n  - wait: cool\n    for: 2h\n"
        "  - conf.b\n")
#: a wait for 'paid' (no deadline) beside a step whose first attempt fails, retried after an hour
RETRYING = ("steps:\n  - parallel: both\n    branches:\n      - wait: paid\n"
            "      - conf.a: {retry: {attempts: 2, backoff: constant, initial: 1h, jitter: none}}\n")


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def said(text: str) -> str:
    return " ".join(text.split())


def park(runs: Path, run_id: str, steps: str = PAID, script: dict[str, Any] | None = None) -> Any:
    plan = compile_text(HEADER.format(name="pay") + steps)
    result = asyncio.run(run_flow(plan, {"script": script or {}}, run_id=run_id, runs_dir=runs, park=True))
    assert result.parked is not None, result.status
    return result


def completed(runs: Path, run_id: str) -> None:
    plan = compile_text(HEADER.format(name="pay") + "steps:\n  - conf.a\n")
    assert asyncio.run(run_flow(plan, {}, run_id=run_id, runs_dir=runs)).status == "completed"


def listed(runs: Path, *args: str) -> list[dict[str, Any]]:
    r = cli("runs", "--backend", "local", "--runs-dir", str(runs), "--format", "json", *args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert isinstance(out, list)
    return out


def test_a_parked_run_is_listed_parked_with_what_it_waits_for_and_its_next_due_time(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    p1 = park(runs, "p1")
    completed(runs, "ok1")
    rows = {row["run_id"]: row for row in listed(runs)}
    assert rows["p1"]["status"] == "parked" and rows["p1"]["finished_at"] is None
    assert rows["p1"]["parked"] == p1.parked
    assert list(rows["ok1"]) == list(RunInfo("r", "f", "completed", 1, 2, 3).to_json())  # (a parked one: + parked)
    assert [row["run_id"] for row in listed(runs, "--status", "PARKED")] == ["p1"]
    text = cli("runs", "--backend", "local", "--runs-dir", str(runs))
    assert text.exit_code == 0, text.output
    due = time.strftime("%m-%d %H:%M:%S", time.localtime(p1.parked["due_at"] / 1000))
    line = next(line for line in text.stdout.splitlines() if line.startswith("p1 "))
    assert f"parked (paid; due {due})" in line, text.stdout
    note = said(text.stderr)
    assert "note: 1 run(s) parked (p1): not over, and no process runs them" in note
    assert "`flowdsl resume RUN_ID --signal NAME=JSON` goes on with one and sends it that signal" in note
    # resumed with its signal, it is parked at its timer wait: `timer`, and that wait's end as its next due time
    again = asyncio.run(resume_flow("p1", runs_dir=runs, signals=["paid"], park=True))
    (row,) = listed(runs, "--status", "parked")
    assert row["parked"] == again.parked and again.parked["waits"][0]["signal"] is None
    due = time.strftime("%m-%d %H:%M:%S", time.localtime(again.parked["due_at"] / 1000))
    text = cli("runs", "--backend", "local", "--runs-dir", str(runs), "--status", "parked")
    assert f"parked (timer; due {due})" in text.stdout


def test_a_run_parked_with_no_timer_armed_has_no_due_time(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    park(runs, "p1", "steps:\n  - conf.a\n  - wait: paid\n")
    (row,) = listed(runs)
    assert row["parked"]["due_at"] is None and row["parked"]["waits"] == [
        {"wait": "paid", "signal": "paid", "due_at": None}]
    text = cli("runs", "--backend", "local", "--runs-dir", str(runs))
    assert re.search(r"^p1 +pay +parked \(paid\) ", text.stdout, re.M), text.stdout
    shown = said(cli("show", "p1", "--runs-dir", str(runs)).stdout)
    assert f"paid: signal 'paid', no deadline — `flowdsl resume p1 --runs-dir {runs} --signal paid=JSON`" in shown
    assert "next due" not in shown


def test_the_listing_from_the_records_ends_is_the_replays(tmp_path: Path) -> None:
    """A record whose ends do not say how it stands is replayed whole (listing's ``_replayed``): a parked one is
    listed alike either way."""
    runs = tmp_path / "runs"
    park(runs, "p1")
    path = runs / "p1.jsonl"
    quick, whole = listing.read_row(path), listing._replayed(path)[0]
    assert quick.status == whole.status == "parked" and quick.parked == whole.parked
    assert (quick.submitted_at, quick.started_at, quick.finished_at) == (whole.submitted_at, whole.started_at, None)
    assert listing.read_row(path, quick=True).status == "parked"


def test_the_summary_names_the_next_timer_when_it_is_none_of_the_waits(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    result = park(runs, "p1", RETRYING, {"a": [{"raise": "Flaky"}, {}]})
    due = result.parked["due_at"]
    assert result.steps["a"]["status"] == "retrying" and due is not None
    shown = said(cli("show", "p1", "--runs-dir", str(runs)).stdout)
    assert f"paid: signal 'paid', no deadline — `flowdsl resume p1 --runs-dir {runs} --signal paid=JSON`" in shown
    assert (f"next due: the retry backoff of step 'a', {at_text(due)} — `flowdsl resume p1 --runs-dir {runs}` "
            "fires it once it is due") in shown


def test_prune_keeps_a_parked_record_whatever_status_says(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    park(runs, "p1")
    completed(runs, "ok1")
    time.sleep(0.05)  # (both older than --older-than)
    for statuses in ((), ("--status", "completed,crashed,aborted,unrecorded")):
        r = cli("prune", "--older-than", "10ms", "--runs-dir", str(runs), "--dry-run", "--format", "json", *statuses)
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout)
        assert out["removed"]["runs"] == ["ok1"] and out["kept"]["by_reason"] == {"parked": {"count": 1,
                                                                                            "runs": ["p1"]}}
    r = cli("prune", "--older-than", "10ms", "--runs-dir", str(runs))
    assert r.exit_code == 0, r.output
    assert ("1 parked: not over, and no process runs it; `flowdsl resume RUN_ID` goes on with it (or `--cancel`s it) "
            "(p1)") in said(r.stdout)
    assert sorted(p.name for p in runs.iterdir()) == ["p1.jsonl"]
    refused = cli("prune", "--older-than", "10ms", "--runs-dir", str(runs), "--status", "parked")
    assert refused.exit_code == 2 and "--status 'parked': prune removes records of runs in these states only" in \
        said(refused.stderr)


def test_resolve_refuses_a_parked_run_saying_how_to_go_on_or_cancel(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    park(runs, "p1")
    before = (runs / "p1.jsonl").read_bytes()
    r = cli("resolve", "p1", "--runs-dir", str(runs), "--format", "json")
    assert r.exit_code == 1
    out = json.loads(r.stdout)
    assert (out["status"], out["refused"], out["resolved"]) == ("parked", "Parked", None)
    reason = out["reason"]
    assert reason.startswith("run p1 is parked: it is not over, and nothing is left to do by hand; it waits for "
                             "signal 'paid' (until "), reason
    assert f"`flowdsl resume p1 --runs-dir {runs} --signal paid=JSON`" in reason
    assert reason.endswith(f"or cancel it with `flowdsl resume p1 --runs-dir {runs} --cancel` (what completed is "
                           "undone)")
    assert (runs / "p1.jsonl").read_bytes() == before
    text = cli("resolve", "p1", "--runs-dir", str(runs))
    assert text.exit_code == 1 and "error: run p1 is parked" in said(text.stderr)


def test_a_parked_run_resumed_to_its_end_is_listed_by_its_end(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    park(runs, "p1", "steps:\n  - conf.a: {compensate: undo.a}\n  - wait: paid\n")
    ended = asyncio.run(resume_flow("p1", runs_dir=runs, cancel=True))
    assert ended.status == "cancelled"
    (row,) = listed(runs)
    assert (row["status"], row["finished_at"]) == ("cancelled", ended.finished_at) and "parked" not in row
    assert listed(runs, "--status", "parked") == []
    shown = said(cli("show", "p1", "--runs-dir", str(runs)).stdout)
    assert "parked: nothing was left but waiting — paid (signal 'paid') — and its process let the run go" in shown
    assert "its process had parked it (nothing was left but waiting)" in shown
    assert "not over, and no process runs it" not in shown
