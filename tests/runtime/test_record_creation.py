"""A run record appears whole or not at all: its header and start line are written under a hidden temporary name
and put in place with a hard link (exclusive, as ``O_EXCL`` was). A listing never finds a healthy run's record
empty or header-only; a run that never began leaves nothing; a temporary file a killed process left is passed over
by `flowdsl runs` and removed by `flowdsl prune` once old enough."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from flowdsl import compile_text
from flowdsl.runtime import record as record_module
from flowdsl.runtime.listing import list_records
from flowdsl.runtime.local import LocalRun, run_flow
from flowdsl.runtime.prune import prune
from flowdsl.runtime.record import RECORD_MODE, RecordWriteError, RunRecorder, read_record
from tests.runtime.conformance import HEADER
from tests.runtime.test_local import CANCELLABLE
from tests.runtime.test_stopped_runs import cli

DAY = 86_400_000
PLAN = compile_text(HEADER.format(name="created") + CANCELLABLE)


def _listing(directory: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """(run id, status) of each run listed, and the warnings the listing gave."""
    said: list[str] = []
    rows = list_records(directory, limit=100, on_skip=said.append)
    return [(row.run_id, row.status) for row in rows], said


def _begin(directory: Path, run_id: str) -> RunRecorder:
    """A record being created: its header written (and flushed), its start line not yet."""
    recorder = RunRecorder(run_id, directory)
    recorder.header(PLAN, {}, run_id=run_id, runtime="local", started_at=int(time.time() * 1000))
    return recorder


def _start_line(run_id: str) -> dict[str, Any]:
    return {"type": "start", "run_id": run_id, "input": {}, "at": int(time.time() * 1000), "seed": None}


def test_a_record_being_created_is_not_listed_nor_warned_about_and_appears_whole(tmp_path: Path) -> None:
    created = RunRecorder("r1", tmp_path)  # (the file is made, nothing is in it yet)
    assert _listing(tmp_path) == ([], [])  # was: "warning: …/r1.jsonl is empty, not a run record"
    created.discard()
    recorder = _begin(tmp_path, "r1")
    assert _listing(tmp_path) == ([], [])  # was: a header-only record, listed as a run that never started
    assert not (tmp_path / "r1.jsonl").exists()
    [staged] = os.listdir(tmp_path)
    assert staged.startswith(".r1.jsonl.") and record_module.staged_run_id(staged) == "r1"

    recorder.write_many((_start_line("r1"),))
    recorder.flush()
    recorder.publish()
    assert os.listdir(tmp_path) == ["r1.jsonl"]  # the temporary name is gone
    assert stat.S_IMODE(os.stat(tmp_path / "r1.jsonl").st_mode) == RECORD_MODE
    header, lines = read_record(tmp_path / "r1.jsonl")
    assert header["run_id"] == "r1" and [line["type"] for line in lines] == ["start"]
    recorder.write_many(({"type": "cancel_requested", "reason": "x"},))  # the same file goes on being written
    recorder.close()
    _, lines = read_record(tmp_path / "r1.jsonl")
    assert [line["type"] for line in lines] == ["start", "cancel_requested"]


def test_putting_a_record_in_place_is_exclusive(tmp_path: Path) -> None:
    first, second = _begin(tmp_path, "r1"), _begin(tmp_path, "r1")  # two runs started at once with one id
    first.publish()
    with pytest.raises(FileExistsError, match="a record of run 'r1' already exists"):
        second.publish()
    second.discard()  # the other's record is left alone
    first.close()
    assert os.listdir(tmp_path) == ["r1.jsonl"]
    assert read_record(tmp_path / "r1.jsonl")[0]["run_id"] == "r1"


def test_without_hard_links_the_record_is_put_in_place_by_a_rename(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")  # (what FAT answers)

    monkeypatch.setattr(os, "link", no_links)
    recorder = _begin(tmp_path, "r1")
    recorder.write_many((_start_line("r1"),))
    recorder.flush()
    recorder.publish()
    recorder.close()
    assert os.listdir(tmp_path) == ["r1.jsonl"]
    assert stat.S_IMODE(os.stat(tmp_path / "r1.jsonl").st_mode) == RECORD_MODE
    assert [line["type"] for line in read_record(tmp_path / "r1.jsonl")[1]] == ["start"]
    with pytest.raises(FileExistsError):  # exclusive all the same
        _begin(tmp_path, "r1")


def test_a_record_whose_first_lines_cannot_be_written_leaves_nothing(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: RunRecorder, *args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunRecorder, "publish", full)
    run = LocalRun(PLAN, {"script": {}}, run_id="f1", runs_dir=tmp_path)
    with pytest.raises(RecordWriteError, match=r"f1\.jsonl: No space left on device; the run did not start"):
        asyncio.run(run.run())
    assert os.listdir(tmp_path) == []  # no record, no temporary file


def test_a_stop_signal_before_the_first_step_leaves_no_record(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The record holds its first lines, and a KeyboardInterrupt comes before the run takes its first step: nothing
    ran, and a header-only record would be listed crashed for ever."""
    def interrupted(self: LocalRun) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalRun, "_install_signals", interrupted)
    run = LocalRun(PLAN, {"script": {}}, run_id="k1", runs_dir=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        asyncio.run(run.run())
    assert os.listdir(tmp_path) == []


def _leftover(directory: Path, run_id: str, age_ms: int) -> Path:
    """The temporary file a process killed while creating its record leaves (its header, no start line), last
    written ``age_ms`` ago."""
    recorder = _begin(directory, run_id)
    staged = recorder.staged
    assert staged is not None and recorder._fh is not None
    recorder._fh.close()  # (dropped as a SIGKILL drops it: the file stays, its lock goes)
    recorder._fh = None
    recorder._free_reserve()
    when = time.time() - age_ms / 1000
    os.utime(staged, (when, when))
    return staged


def test_prune_removes_what_a_run_killed_as_it_started_left_once_old_enough(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    asyncio.run(run_flow(PLAN, {"script": {}}, run_id="ok1", runs_dir=runs))
    old = _leftover(runs, "k1", 2 * DAY)
    size = old.stat().st_size
    recent = _leftover(runs, "k2", 0)
    creating = _begin(runs, "k3")  # a record being created now, however old its file looks: locked
    assert creating.staged is not None
    stale = time.time() - 2 * DAY / 1000
    os.utime(creating.staged, (stale, stale))
    assert _listing(runs) == ([("ok1", "completed")], [])  # `flowdsl runs` passes them over in silence

    r = cli("prune", "--runs-dir", str(runs), "--older-than", "1d", "--format", "json")
    assert r.exit_code == 0 and r.stderr == "", r.output
    report = json.loads(r.stdout)
    assert report["leftovers"] == {"count": 1, "bytes": size, "files": [old.name]}
    assert report["removed"]["count"] == 0 and report["skipped"] == []
    assert not old.exists() and recent.exists() and creating.staged.exists()
    creating.discard()
    assert sorted(os.listdir(runs)) == sorted(["ok1.jsonl", recent.name])


def test_prune_says_in_text_what_it_removed_of_runs_killed_as_they_started(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    old = _leftover(runs, "k1", 2 * DAY)
    dry = cli("prune", "--runs-dir", str(runs), "--older-than", "1d", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "would remove 1 temporary file(s) of records never begun" in " ".join(dry.stdout.split())
    assert old.exists()
    report = prune(runs, older_than_ms=DAY)
    assert [name for name, _ in report.leftovers] == [old.name] and not old.exists()


def test_a_worker_is_called_only_once_its_dispatch_is_on_disk(tmp_path: Path) -> None:
    """Write-ahead: when a worker is called, the record on disk already says its step was dispatched — a process
    killed during the call leaves a record whose `show` lists every step that may have taken effect. (On Python
    3.12+ an attempt's task starts eagerly, inside the burst that dispatched it, before that burst's flush.)"""
    from flowdsl.workers import WorkerRegistry

    seen: list[list[str]] = []

    async def step(data: dict[str, Any], ctx: Any) -> Any:
        lines = (tmp_path / "r1.jsonl").read_text().splitlines()
        seen.append([json.loads(line).get("task_id", "") for line in lines if '"step_scheduled"' in line])
        return {}

    registry = WorkerRegistry()
    registry.register("a", step)
    registry.register("b", step)
    registry.register("c", step)
    plan = compile_text("flowdsl: 1\nname: w\nsteps:\n  - a\n  - parallel: p\n    branches: [b, c]\n")
    result = asyncio.run(run_flow(plan, {}, run_id="r1", runs_dir=tmp_path, registry=registry,
                                  import_workers=False))
    assert result.status == "completed"
    assert seen == [["r1/a#1"], ["r1/a#1", "r1/b#1", "r1/c#1"], ["r1/a#1", "r1/b#1", "r1/c#1"]]
