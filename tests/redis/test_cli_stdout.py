"""The Redis commands when stdout cannot take their output (/dev/full, a reader gone): a stdout error is said as
one, exit 3 (141 for a reader gone) — never "cannot reach Redis" (``OSError`` is what a lost connection raises,
not what a full stdout is), and a submitted run's id reaches stderr, so that nobody submits it again."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flowdsl import compile_text
from flowdsl.runtime.redis import RedisClient
from tests.redis.procs import ROOT, WorkerProcs, worker_env
from tests.runtime.conformance import HEADER

FLOWDSL = str(Path(sys.executable).with_name("flowdsl"))
FULL = "error: cannot write to stdout: No space left on device"


def _flowdsl(args: list[str], stdout: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([FLOWDSL, *args], stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                          env=worker_env(), timeout=120)
    assert "Traceback" not in done.stderr and "Redis" not in done.stderr, done.stderr
    return done


def _to_full(args: list[str]) -> subprocess.CompletedProcess[str]:
    with open("/dev/full", "wb") as full:  # (only ever written through the child's stdout)
        return _flowdsl(args, full)


def _runs(url: str, prefix: str) -> list[str]:
    listed = _flowdsl(["runs", "--format", "json", "--redis-url", url, "--prefix", prefix], subprocess.PIPE)
    assert listed.returncode == 0
    return [run["run_id"] for run in json.loads(listed.stdout)]


def _submitted(url: str, prefix: str, spec: Path, run_id: str) -> None:
    """The run ``run_id`` of ``spec`` (no input) submitted from this process, as `flowdsl run --detach` submits it:
    the tests that only need a run there to read (submitting in a process of its own is tested above)."""
    async def submit() -> None:
        async with RedisClient(url, prefix=prefix) as client:
            await client.submit(compile_text(spec.read_text()), {}, run_id=run_id)

    asyncio.run(submit())


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    path = tmp_path / "saga.yaml"
    path.write_text(HEADER.format(name="saga") + "steps:\n  - conf.a: {compensate: undo.a}\n  - conf.b\n")
    return path


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_detached_run_whose_id_cannot_be_written_says_it_on_stderr(url: str, prefix: str, spec: Path,
                                                                     fmt: str) -> None:
    done = _to_full(["run", str(spec), "--backend", "redis", "--redis-url", url, "--prefix", prefix, "--detach",
                     "--format", fmt])
    assert done.returncode == 3
    [line] = done.stderr.splitlines()[-1:]
    said = re.fullmatch(re.escape(FULL) + r"; the run (\S+) was submitted: `flowdsl status \1` shows it", line)
    assert said is not None, line
    assert _runs(url, prefix) == [said.group(1)]  # the one run there is: the id said is the id to follow


def test_a_followed_run_whose_result_cannot_be_written_names_the_run(url: str, prefix: str, spec: Path) -> None:
    workers = WorkerProcs(url, prefix, ["tests.runtime.workers"])
    workers.start()
    try:
        done = _to_full(["run", str(spec), "--backend", "redis", "--redis-url", url, "--prefix", prefix,
                         "--run-id", "followed1", "--format", "json"])
    finally:
        workers.stop_all()
    assert done.returncode == 3
    assert done.stderr.splitlines()[-1] == f"{FULL}; the run followed1 was submitted: `flowdsl status followed1` " \
        "shows it"
    shown = _flowdsl(["status", "followed1", "--redis-url", url, "--prefix", prefix], subprocess.PIPE)
    assert shown.returncode == 0 and "completed" in shown.stdout


@pytest.mark.parametrize("args", [["runs"], ["runs", "--format", "json"], ["dead-letters"],
                                  ["dead-letters", "--format", "json"], ["status", "{run}"],
                                  ["status", "{run}", "--format", "json"]])
def test_reading_commands_say_a_full_stdout_as_such(url: str, prefix: str, spec: Path, args: list[str]) -> None:
    _submitted(url, prefix, spec, "s1")
    done = _to_full([a.format(run="s1") for a in args] + ["--redis-url", url, "--prefix", prefix])
    assert done.stderr.splitlines() == [FULL] and done.returncode == 3


def test_a_reader_gone_is_no_redis_error(url: str, prefix: str, spec: Path) -> None:
    _submitted(url, prefix, spec, "s1")
    read, write = os.pipe()
    os.close(read)
    try:
        done = _flowdsl(["status", "s1", "--format", "json", "--redis-url", url, "--prefix", prefix], write)
    finally:
        os.close(write)
    assert done.stderr == "" and done.returncode == 141


def test_a_worker_with_stdout_closed_runs_steps_that_print(url: str, prefix: str, tmp_path: Path) -> None:
    """A worker's own output is its log, on stderr: stdout closed at start is no output lost, and what a step prints
    there is dropped (descriptor 1 is /dev/null) — never an error failing the step, as it was once stdout was
    guarded for the commands whose output it is."""
    (tmp_path / "printing.py").write_text(
        "from flowdsl import worker\n\n\n@worker('pr.say')\nasync def say(data, ctx):\n"
        "    print('hello from a step', flush=True)\n    return {'said': True}\n", encoding="utf-8")
    spec = tmp_path / "p.yaml"
    spec.write_text("flowdsl: 1\nname: p\nworkers: [printing]\nsteps:\n  - pr.say\n")
    common = ["--redis-url", url, "--prefix", prefix]
    submitted = _flowdsl(["run", str(spec), "--backend", "redis", *common, "--detach", "--run-id", "pr1"],
                         subprocess.PIPE)
    assert submitted.returncode == 0, submitted.stderr
    served = subprocess.run(f"{FLOWDSL} worker -w printing --burst --redis-url '{url}' --prefix {prefix} >&-",
                            shell=True, cwd=tmp_path, env=worker_env(), capture_output=True, text=True, timeout=120)
    assert served.returncode == 0 and "Traceback" not in served.stderr, served.stderr
    status = _flowdsl(["status", "pr1", *common, "--format", "json"], subprocess.PIPE)
    assert json.loads(status.stdout)["status"] == "completed", status.stdout
