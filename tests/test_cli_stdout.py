"""The real ``flowdsl`` command when stdout or stderr cannot take its output: full (/dev/full), closed (``>&-``),
a pipe whose reader went away, an encoding that is not UTF-8, a ``COLUMNS`` that leaked into a redirected run.

A stdout that cannot be written is one line on stderr (``error: cannot write to stdout: …``) and exit 3, never a
traceback nor an exit 0 with the output lost; a reader gone (``| head``) is a quiet exit 141; a stderr that cannot
be written changes no exit code (docs/runtime.md, "Output and exit codes")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOWDSL = str(Path(sys.executable).with_name("flowdsl"))
EXAMPLE = ROOT / "examples" / "ecommerce_order"
SPEC = str(EXAMPLE / "flow.yaml")
SUCCESS = str(EXAMPLE / "inputs" / "success.json")
DECLINED = str(EXAMPLE / "inputs" / "payment_declined.json")
FULL = "error: cannot write to stdout: No space left on device"
CLOSED = "error: cannot write to stdout: it is closed"


def _env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("FLOWDSL_RUNS_DIR", "FLOWDSL_LM", "COLUMNS", "PYTHONIOENCODING")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _flowdsl(args: list[str], *, stdout: Any = subprocess.PIPE, stderr: Any = subprocess.PIPE,
             env: dict[str, str] | None = None, closed: str = "") -> subprocess.CompletedProcess[bytes]:
    """The console script; ``closed`` ``">&-"`` / ``"2>&-"`` runs it with that descriptor closed (a shell's
    ``>&-``: not /dev/null, which is a stdout that takes everything)."""
    command = [FLOWDSL, *args]
    if closed:
        command = ["sh", "-c", f'exec "$@" {closed}', "sh", *command]
    return subprocess.run(command, stdout=stdout, stderr=stderr, env=env or _env(), cwd=ROOT, timeout=120)


def _to_full(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    with open("/dev/full", "wb") as full:  # (only ever written through the child's stdout)
        return _flowdsl(args, stdout=full, **kwargs)


def _said(done: subprocess.CompletedProcess[bytes]) -> list[str]:
    assert b"Traceback" not in done.stderr, done.stderr.decode(errors="replace")
    return done.stderr.decode("utf-8", errors="replace").splitlines()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A records directory holding one compensated run (a step undone, a failed one): its id."""
    runs = tmp_path_factory.mktemp("runs")
    done = _flowdsl(["run", SPEC, "-i", DECLINED, "--runs-dir", str(runs), "--run-id", "declined1"])
    assert done.returncode == 1, done.stderr
    return runs, "declined1"


def _commands(runs: Path, run_id: str) -> list[list[str]]:
    """Every command that writes its output on stdout, in text and JSON."""
    return [["--help"], ["--version"], ["validate", SPEC, "--format", "json"], ["plan", SPEC],
            ["convert", SPEC, "--to", "flow"], ["diagram", SPEC], ["diagram", SPEC, "--format", "png"],
            ["show", run_id, "--runs-dir", str(runs)], ["show", run_id, "--runs-dir", str(runs), "--format", "json"],
            ["runs", "--backend", "local", "--runs-dir", str(runs)],
            ["runs", "--backend", "local", "--runs-dir", str(runs), "--format", "json"],
            ["runs", "--backend", "local", "--runs-dir", str(runs / "none"), "--format", "json"]]


COMMANDS = ["--help", "--version", "validate json", "plan", "convert", "diagram", "diagram png", "show", "show json",
            "runs", "runs json", "runs json, none"]


@pytest.mark.parametrize("which", range(len(COMMANDS)), ids=COMMANDS)
def test_a_full_stdout_is_one_line_naming_stdout_and_exit_3(recorded: tuple[Path, str], which: int) -> None:
    args = _commands(*recorded)[which]
    if args[-1] == "png":
        pytest.importorskip("graphviz")
    done = _to_full(args)
    assert _said(done)[-1:] == [FULL] and done.returncode == 3


@pytest.mark.parametrize("which", range(len(COMMANDS)), ids=COMMANDS)
def test_a_closed_stdout_is_one_line_saying_so_and_exit_3(recorded: tuple[Path, str], which: int) -> None:
    args = _commands(*recorded)[which]
    if args[-1] == "png":
        pytest.importorskip("graphviz")
    done = _flowdsl(args, stdout=None, closed=">&-")
    assert _said(done)[-1:] == [CLOSED] and done.returncode == 3


def test_run_json_to_a_full_stdout_says_which_run_ran_and_where_its_record_is(tmp_path: Path) -> None:
    done = _to_full(["run", SPEC, "-i", SUCCESS, "--runs-dir", str(tmp_path), "--run-id", "r1", "--format", "json"])
    [line] = _said(done)
    assert done.returncode == 3  # not 1, "failed": the run completed, its result could not be written
    assert line == f"{FULL}; the run r1 ended completed; its record: {tmp_path / 'r1.jsonl'}"
    show = _flowdsl(["show", "r1", "--runs-dir", str(tmp_path), "--format", "json"])
    assert show.returncode == 0 and json.loads(show.stdout)["status"] == "completed"


def test_run_json_to_a_closed_stdout_runs_nothing(tmp_path: Path) -> None:
    done = _flowdsl(["run", SPEC, "-i", SUCCESS, "--runs-dir", str(tmp_path), "--format", "json"], stdout=None,
                    closed=">&-")
    assert _said(done) == [CLOSED] and done.returncode == 3
    assert list(tmp_path.iterdir()) == []


def test_a_closed_stdout_is_no_descriptor_for_the_files_a_run_opens(tmp_path: Path) -> None:
    """With fd 1 closed, the next file the process opened took its number (asyncio's epoll descriptor), and a
    worker's ``os.write(1, …)`` failed its step; fd 1 is /dev/null instead, as for a run whose stdout is."""
    (tmp_path / "say_wk.py").write_text(
        "import os\nfrom flowdsl.workers import worker\n\n@worker('say')\nasync def say(data, ctx):\n"
        "    os.write(1, b'hello\\n')\n    return {}\n", encoding="utf-8")
    (tmp_path / "say.yaml").write_text("flowdsl: 1\nname: say\nworkers: [say_wk]\nsteps: [say]\n", encoding="utf-8")
    done = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", FLOWDSL, "run", "say.yaml", "--no-record"],
                          stderr=subprocess.PIPE, env=_env(), cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr  # run's text goes to stderr: nothing of it was lost
    assert b"completed" in done.stderr and b"Traceback" not in done.stderr


@pytest.mark.parametrize("args", [["show", "{id}", "--runs-dir", "{runs}"], ["--help"],
                                  ["runs", "--backend", "local", "--runs-dir", "{runs}", "--format", "json"]])
def test_a_reader_gone_ends_it_quietly_with_141(recorded: tuple[Path, str], args: list[str]) -> None:
    runs, run_id = recorded
    read, write = os.pipe()
    os.close(read)  # (the reader went away before a byte was written: every write is EPIPE)
    try:
        done = _flowdsl([a.format(id=run_id, runs=runs) for a in args], stdout=write)
    finally:
        os.close(write)
    assert _said(done) == [] and done.returncode == 141


@pytest.mark.parametrize("stderr", ["full", "closed"])
@pytest.mark.parametrize(("data", "code"), [(SUCCESS, 0), (DECLINED, 1)])
def test_a_stderr_that_cannot_be_written_leaves_the_run_its_exit_code(tmp_path: Path, stderr: str, data: str,
                                                                     code: int) -> None:
    args = ["run", SPEC, "-i", data, "--runs-dir", str(tmp_path), "--run-id", "r1"]
    if stderr == "full":
        with open("/dev/full", "wb") as full:
            done = _flowdsl(args, stderr=full)
    else:
        done = _flowdsl(args, stderr=None, closed="2>&-")
    assert done.returncode == code
    assert (tmp_path / "r1.jsonl").is_file()


def test_show_on_an_ascii_stdout_escapes_what_it_cannot_write(recorded: tuple[Path, str]) -> None:
    runs, run_id = recorded
    done = _flowdsl(["show", run_id, "--runs-dir", str(runs)], env=_env(PYTHONIOENCODING="ascii"))
    assert done.returncode == 0 and _said(done) == []
    text = done.stdout.decode("ascii")
    assert "check_inventory \\u2192 process_payment" in text and "undone #1" in text


def test_json_on_an_ascii_stdout_stays_json_of_the_same_value(tmp_path: Path, recorded: tuple[Path, str]) -> None:
    (tmp_path / "uni.yaml").write_text("flowdsl: 1\nname: x\nworkers: []\nsteps: [n\u00f6pe\U0001f600]\n",
                                       encoding="utf-8")
    utf8 = _flowdsl(["validate", str(tmp_path / "uni.yaml"), "--format", "json"], env=_env(PYTHONIOENCODING="utf-8"))
    done = _flowdsl(["validate", str(tmp_path / "uni.yaml"), "--format", "json"], env=_env(PYTHONIOENCODING="ascii"))
    assert done.returncode == 1 and _said(done) == []
    assert done.stdout.isascii() and json.loads(done.stdout) == json.loads(utf8.stdout)
    assert "n\u00f6pe\U0001f600" in json.loads(done.stdout)[0]["message"]
    runs, run_id = recorded
    for latin1 in ("ascii", "latin-1"):
        shown = _flowdsl(["show", run_id, "--runs-dir", str(runs), "--format", "json"],
                         env=_env(PYTHONIOENCODING=latin1))
        assert shown.returncode == 0 and shown.stdout.isascii()
        assert json.loads(shown.stdout)["status"] == "compensated"
    ran = _flowdsl(["run", SPEC, "-i", SUCCESS, "--no-record", "--format", "json"], env=_env(PYTHONIOENCODING="ascii"))
    assert ran.returncode == 0 and ran.stdout.isascii() and json.loads(ran.stdout)["status"] == "completed"


def test_columns_does_not_shorten_what_goes_to_a_file(tmp_path: Path, recorded: tuple[Path, str]) -> None:
    runs, run_id = recorded
    outs = []
    for columns in ("20", "1000"):
        with open(tmp_path / f"show{columns}.txt", "wb") as out:
            done = _flowdsl(["show", run_id, "--runs-dir", str(runs)], stdout=out, env=_env(COLUMNS=columns))
        assert done.returncode == 0
        outs.append((tmp_path / f"show{columns}.txt").read_text(encoding="utf-8"))
    assert outs[0] == outs[1]
    [row] = [line for line in outs[0].splitlines() if line.startswith("check_inventory ")]
    assert row.split() == ["check_inventory", "succeeded", "1", *row.split()[3:5], "undone", "#1"]
    with open(tmp_path / "summary.txt", "wb") as err:
        done = _flowdsl(["run", SPEC, "-i", DECLINED, "--no-record"], stderr=err, env=_env(COLUMNS="20"))
    assert done.returncode == 1
    summary = (tmp_path / "summary.txt").read_text(encoding="utf-8")
    assert "attempts" in summary.split("\n\nstep", 1)[-1].splitlines()[0]
    assert any(line.startswith("check_inventory ") and line.rstrip().endswith("undone #1")
               for line in summary.splitlines())


@pytest.mark.parametrize("command", [["plan"], ["validate", "--format", "json"]])
def test_what_a_worker_module_writes_to_fd_1_as_it_is_imported_goes_to_stderr(tmp_path: Path,
                                                                             command: list[str]) -> None:
    """`plan > plan.json` and `validate --format json | jq`: stdout is the plan or the JSON alone, whatever the
    spec's worker modules write as they are imported — `print`, and `os.write(1, …)` (a C library, a child
    process) too."""
    (tmp_path / "noisy_at_import.py").write_text(
        "import os\nfrom flowdsl import worker\nprint('printed at import')\nos.write(1, b'written to fd 1\\n')\n\n"
        "@worker('noisy.a')\nasync def a(data, ctx):\n    return {}\n", encoding="utf-8")
    (tmp_path / "noisy.yaml").write_text("flowdsl: 1\nname: noisy\nworkers: [noisy_at_import]\nsteps:\n  - noisy.a\n",
                                         encoding="utf-8")
    done = subprocess.run([FLOWDSL, *command, "noisy.yaml"], capture_output=True, env=_env(), cwd=tmp_path,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    parsed = json.loads(done.stdout)
    assert parsed == [] if command[0] == "validate" else parsed["flow"]["name"] == "noisy"
    assert _said(done)[:2] == ["printed at import", "written to fd 1"]
