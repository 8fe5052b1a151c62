"""`flowdsl prune`: old local run records go; a record of a run that may still go, or that still needs a person,
or of a newer flowdsl, stays whatever --status says — and the report says how many were kept, and why. Files that
are not run records are never touched."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from flowdsl import compile_text
from flowdsl.runtime import prune as prune_module
from flowdsl.runtime.local import run_flow
from flowdsl.runtime.owner import this_process
from flowdsl.runtime.prune import parse_age, prune
from tests.runtime.conformance import HEADER
from tests.runtime.test_resolve_local import _run, cli
from tests.runtime.test_runs_local import NEEDS_HAND, SAGA
from tests.runtime.test_stopped_runs import _dead_process, _rewrite_header

DAY = 86_400_000


def _cut(path: Path) -> Path:
    """The record cut after its first step completed: it has no end."""
    lines = path.read_bytes().splitlines(keepends=True)
    keep = next(i for i, line in enumerate(lines) if json.loads(line)["type"] == "step_succeeded") + 1
    path.write_bytes(b"".join(lines[:keep]))
    return path


def _append(path: Path, *items: dict[str, Any]) -> None:
    with open(path, "ab") as fh:
        for item in items:
            fh.write(json.dumps(item).encode() + b"\n")


#: what the fixture's records are, and what a default prune does with each
EXPECTED_KEPT = {
    "hand1": "needs_intervention", "live1": "live", "far1": "unknown_process", "old1": "unknown_process",
    "crash1": "status", "crash0": "status", "ab1": "status", "newer1": "newer", "doubt1": "in_doubt",
    "recent1": "recent", "recent2": "recent",
}
EXPECTED_REMOVED = ["comp1", "fail1", "hand2", "ok1"]


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    d = tmp_path / "runs"
    _run(d, "ok1")
    _run(d, "comp1", {"d": {"raise": "Boom"}})
    _run(d, "fail1", {"a": {"raise": "Boom"}})
    _run(d, "hand1", NEEDS_HAND)  # needs_intervention, not resolved
    _append(_run(d, "hand2", NEEDS_HAND), {"type": "resolved", "run_id": "hand2", "at": int(time.time() * 1000),
                                           "by": "ops@here", "note": "done", "status": "needs_intervention"})
    _cut(_run(d, "live1"))  # written by this process, which runs: a run still going
    _rewrite_header(_cut(_run(d, "far1")), process={**this_process(), "host": "elsewhere.example"})
    _rewrite_header(_cut(_run(d, "old1")), process=None)  # an earlier flowdsl: names no process
    _rewrite_header(_cut(_run(d, "crash1")), process=_dead_process())  # crashed with a to undo
    header = _run(d, "crash0").read_bytes().split(b"\n", 1)[0] + b"\n"
    (d / "crash0.jsonl").write_bytes(header)
    _rewrite_header(d / "crash0.jsonl", process=_dead_process())  # crashed before it started: nothing to undo
    plan = compile_text(HEADER.format(name="saga") + SAGA)

    async def aborted() -> None:  # stopped at once with a, b, c left to undo
        with pytest.raises((asyncio.TimeoutError, TimeoutError)):
            await asyncio.wait_for(run_flow(plan, {"script": {"d": {"hang": True}}}, run_id="ab1", runs_dir=d), 0.3)

    asyncio.run(aborted())
    _rewrite_header(_run(d, "newer1"), record_format=99)
    doubt = _run(d, "doubt1", {"d": {"raise": "Boom"}})  # compensated, but an attempt it gave up on never answered
    attempt = {"task_id": "doubt1/a#1", "step": "a", "attempt": 1}
    now = int(time.time() * 1000)
    _append(doubt, {"type": "runtime_waiting", "run_id": "doubt1", "at": now, "status": "compensated",
                    "grace_ms": 0, "attempts": [attempt]},
            {"type": "runtime_waited", "run_id": "doubt1", "at": now, "status": "compensated",
             "reason": "after 0 s, the late_grace", "unanswered": [attempt]})
    _run(d, "recent1")  # its file written just before "now" (below: two days later)
    future = (now + 2 * DAY) * 1_000_000
    os.utime(d / "recent1.jsonl", ns=(future, future))
    _append(_run(d, "recent2", NEEDS_HAND), {"type": "resolved", "run_id": "recent2", "at": now + 2 * DAY - 3_600_000,
                                             "by": "ops@here", "note": None, "status": "needs_intervention"})
    (d / "notes.txt").write_text("not a record\n")
    (d / "plain.jsonl").write_text("hello\n")
    (d / "archive").mkdir()
    (d / "link.jsonl").symlink_to(d / "ok1.jsonl")
    return d


def _names(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


def test_prune_removes_old_finished_records_and_keeps_the_rest_saying_why(runs: Path) -> None:
    before = _names(runs)
    report = prune(runs, older_than_ms=DAY, older_than="1d", now_ms=int(time.time() * 1000) + 2 * DAY)
    assert sorted(run_id for run_id, _ in report.removed) == EXPECTED_REMOVED
    assert {run_id: reason for reason, ids in report.kept.items() for run_id in ids} == EXPECTED_KEPT
    assert _names(runs) == before - {f"{r}.jsonl" for r in EXPECTED_REMOVED}
    assert any("plain.jsonl" in s for s in report.skipped) and any("notes.txt" in s for s in report.skipped)
    assert any("link.jsonl is a symbolic link" in s for s in report.skipped)


def test_crashed_and_stopped_runs_go_only_when_asked_and_nothing_is_left_to_undo(runs: Path) -> None:
    report = prune(runs, older_than_ms=DAY, statuses=("crashed", "aborted"),
                   now_ms=int(time.time() * 1000) + 2 * DAY)
    assert [run_id for run_id, _ in report.removed] == ["crash0"]  # it never started: nothing to undo
    assert sorted(report.kept["left_to_undo"]) == ["ab1", "crash1"]
    assert report.kept["live"] == ["live1"] and sorted(report.kept["unknown_process"]) == ["far1", "old1"]
    assert report.kept["needs_intervention"] == ["hand1"]


def test_dry_run_removes_nothing_and_reports_it(runs: Path) -> None:
    time.sleep(0.01)
    before = {p.name: p.read_bytes() for p in runs.iterdir() if p.is_file()}
    r = cli("prune", "--runs-dir", str(runs), "--older-than", "1ms", "--dry-run")
    assert r.exit_code == 0, r.output
    assert {p.name: p.read_bytes() for p in runs.iterdir() if p.is_file()} == before
    out = " ".join(r.stdout.split())
    assert out.startswith("would remove 4 run record(s) (") and "(dry run: nothing removed)" in out
    assert "needs_intervention, not resolved: finish it by hand (`flowdsl show RUN_ID`), then `flowdsl resolve " \
        "RUN_ID` (hand1)" in out
    assert "still running: its process runs (live1)" in out
    assert "written by a newer flowdsl: prune it with that version (newer1)" in out
    assert "a step's outcome is in doubt, not resolved" in out
    assert "cannot be told here" in out and "(far1, old1)" in out
    warnings = " ".join(r.stderr.split())
    assert "plain.jsonl:1: not a run record" in warnings and "skipped" in warnings


def test_the_json_report_and_a_real_removal(runs: Path) -> None:
    time.sleep(0.01)
    r = cli("prune", "--runs-dir", str(runs), "--older-than", "1ms", "--format", "json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    removed = EXPECTED_REMOVED
    assert out["removed"]["runs"] == removed and out["removed"]["count"] == 4 and out["removed"]["bytes"] > 0
    assert out["dry_run"] is False and out["older_than"] == "1ms"
    assert out["statuses"] == ["completed", "failed", "compensated", "cancelled", "resolved"]
    kept = {reason: item["runs"] for reason, item in out["kept"]["by_reason"].items()}
    assert kept == {"status": ["ab1", "crash0", "crash1"], "live": ["live1"], "unknown_process": ["far1", "old1"],
                    "needs_intervention": ["hand1"], "in_doubt": ["doubt1"], "newer": ["newer1"],
                    "recent": ["recent1", "recent2"]}  # (written in the future: by its file's time, by its line's)
    assert out["kept"]["count"] == 11
    assert not any((runs / f"{run_id}.jsonl").exists() for run_id in removed)
    assert (runs / "notes.txt").exists() and (runs / "plain.jsonl").exists() and (runs / "link.jsonl").is_symlink()
    listed = cli("runs", "--backend", "local", "--runs-dir", str(runs), "--format", "json", "-n", "100")
    assert {row["run_id"] for row in json.loads(listed.stdout)} == set(EXPECTED_KEPT)

    again = cli("prune", "--runs-dir", str(runs), "--older-than", "1ms", "--status", "crashed,aborted")
    assert again.exit_code == 0, again.output
    assert not (runs / "crash0.jsonl").exists() and (runs / "crash1.jsonl").exists()


def test_a_record_written_within_the_age_is_not_even_read(runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[Path] = []
    real = prune_module.read_row

    def counting(path: Path, size: int | None = None) -> Any:
        read.append(path)
        return real(path, size)

    monkeypatch.setattr(prune_module, "read_row", counting)
    report = prune(runs, older_than_ms=30 * DAY, dry_run=True)
    assert read == [] and report.removed == []
    # (plain.jsonl, not a record, is not read either: it is named among the recent, and stays)
    assert sorted(report.kept["recent"]) == sorted([*EXPECTED_KEPT, *EXPECTED_REMOVED, "plain"])


@pytest.mark.parametrize(("args", "said"), [
    (("--older-than", "30"), "'30' has no unit: write 30d (days), 30h, 30m or 30s"),
    (("--older-than", "1x"), "'1x' is not an age"),
    (("--older-than", "30d", "--status", "needs_intervention"), "prune removes records of runs in these states only"),
    (("--older-than", "30d", "--status", "running"), "a run that may still go, or that needs a person, is never"),
])
def test_bad_options_are_usage_errors(tmp_path: Path, args: tuple[str, ...], said: str) -> None:
    r = cli("prune", "--runs-dir", str(tmp_path), *args)
    assert r.exit_code == 2 and said in " ".join(r.stderr.split())


def test_older_than_is_required_and_a_missing_directory_has_nothing_to_prune(tmp_path: Path) -> None:
    assert cli("prune", "--runs-dir", str(tmp_path)).exit_code == 2
    r = cli("prune", "--runs-dir", str(tmp_path / "none"), "--older-than", "30d")
    assert r.exit_code == 0 and "nothing to prune" in r.stdout
    r = cli("prune", "--runs-dir", str(tmp_path / "none"), "--older-than", "30d", "--format", "json")
    assert json.loads(r.stdout)["removed"]["count"] == 0


@pytest.mark.parametrize(("text", "ms"), [("30d", 30 * DAY), ("1d12h", 36 * 3_600_000), ("90m", 5_400_000),
                                          ("45s", 45_000), ("250ms", 250), ("1.5h", 5_400_000),
                                          ("3650d", 3650 * DAY)])
def test_ages_are_written_as_durations_with_days(text: str, ms: int) -> None:
    assert parse_age(text) == ms


@pytest.mark.parametrize("text", ["", "30", "d", "1h1d", "1h1h", "1.5d12h", "0s", "3651d", "30 d", "-1d",
                                  "9" * 400 + "d", "0.4ms"])  # (400 digits: an infinite float)
def test_ages_that_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_age(text)


def test_the_quick_read_of_prune_gives_the_states_of_the_listing(runs: Path) -> None:
    """prune reads a record that ends with its run's end without parsing its header (its first bytes are a header
    this flowdsl reads): the state is the listing's all the same, and the header is read where it matters."""
    from flowdsl.runtime.listing import read_row

    quick = {}
    for path in sorted(runs.glob("*.jsonl")):
        if path.name in ("plain.jsonl", "link.jsonl"):
            continue
        whole, fast = read_row(path), read_row(path, quick=True)
        assert (fast.status, fast.last_at, fast.doubt) == (whole.status, whole.last_at, whole.doubt), path.name
        quick[path.stem] = fast.flow is None  # (read quickly: without its flow's name)
    assert quick["ok1"] and quick["hand2"] and quick["ab1"]
    assert not quick["newer1"] and not quick["live1"] and not quick["crash1"]


# --- hardening: what else happens in the directory while prune runs ---------------------------------------------


def test_a_record_being_resolved_is_kept(runs: Path) -> None:
    import fcntl

    fd = os.open(runs / "ok1.jsonl", os.O_RDONLY)  # (flowdsl resolve holds this lock while it appends)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        report = prune(runs, older_than_ms=DAY, now_ms=int(time.time() * 1000) + 2 * DAY)
    finally:
        os.close(fd)
    assert report.kept["changed"] == ["ok1"] and (runs / "ok1.jsonl").exists()
    assert sorted(run_id for run_id, _ in report.removed) == [r for r in EXPECTED_REMOVED if r != "ok1"]


def test_records_changed_or_created_while_prune_runs_stay(runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = prune_module.read_row
    old = (time.time() - 10 * 86_400) * 1e9

    def meanwhile(path: Path, *args: Any, **kwargs: Any) -> Any:
        row = real(path, *args, **kwargs)
        if path.name == "ok1.jsonl":
            (runs / "new1.jsonl").write_bytes(path.read_bytes())  # a record made as prune runs (its times old)
            os.utime(runs / "new1.jsonl", ns=(int(old), int(old)))
            _append(runs / "fail1.jsonl", {"type": "note"})  # and one written to after prune began
        return row

    monkeypatch.setattr(prune_module, "read_row", meanwhile)
    report = prune(runs, older_than_ms=DAY, now_ms=int(time.time() * 1000) + 2 * DAY)
    assert (runs / "new1.jsonl").exists()
    if "fail1" not in [run_id for run_id, _ in report.removed]:  # (read before ok1: gone before it changed)
        assert (runs / "fail1.jsonl").exists() and "fail1" in report.kept.get("changed", [])


def test_a_live_run_of_another_process_waiting_long_is_kept(tmp_path: Path) -> None:
    from tests.runtime.test_local import _wait_for
    from tests.runtime.test_stopped_runs import TWO, _kill, _start
    from tests.spawned import wait_for_file

    runs = tmp_path / "runs"
    runs.mkdir()
    proc = _start(runs, TWO, {"b": {"hang": True, "mark": str(tmp_path / "b.called")}}, "wait1")
    try:
        wait_for_file(tmp_path / "b.called", proc)
        _wait_for(runs / "wait1.jsonl", "step_scheduled", "b", proc)
        long_ago = (time.time() - 40 * 86_400) * 1e9
        os.utime(runs / "wait1.jsonl", ns=(int(long_ago), int(long_ago)))  # (its file not written while it waits)
        r = cli("prune", "--older-than", "1ms", "--status", "crashed,unrecorded,completed", "--runs-dir", str(runs),
                "--format", "json")
        # (its last line is recent: by then, a second later, it is not)
        later = prune(runs, older_than_ms=1, statuses=("crashed", "unrecorded"),
                      now_ms=int(time.time() * 1000) + 40 * DAY)
        assert r.exit_code == 0, r.output
        assert (runs / "wait1.jsonl").exists() and later.kept == {"live": ["wait1"]}
    finally:
        _kill(proc)


def test_warnings_quote_file_names_inert(runs: Path) -> None:
    (runs / "evil\x1b[2J\nerror: forged.txt").write_text("x")
    for args in (("prune", "--older-than", "1d"), ("runs", "--backend", "local")):
        r = cli(*args, "--runs-dir", str(runs))
        assert r.exit_code == 0, r.output
        said = [line for line in r.stderr.splitlines() if "evil" in line]
        assert len(said) == 1 and "\x1b" not in said[0] and "evil\\u001b[2J" in said[0], (args, r.stderr)
        assert not any(line.startswith("error: forged") for line in r.stderr.splitlines())
