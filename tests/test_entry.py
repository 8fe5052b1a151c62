"""The ``flowdsl`` entry point (flowdsl/launch.py, ``flowdsl.cli.main``): a stop signal before a command handles
signals itself, and a wrong command line, end the command cleanly — ``interrupted`` (or what the signal did)
and exit 130, the usage error and exit 2 — and under ``--format json`` a reporting command still gives its one
JSON object (docs/runtime.md). Never a traceback."""

from __future__ import annotations

import importlib.abc
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flowdsl import launch

FLOWDSL = str(Path(sys.executable).with_name("flowdsl"))


@pytest.fixture(autouse=True)
def _signals_kept() -> Iterator[None]:
    """``launch.main`` takes SIGTERM and SIGHUP over for the process: give this one its own back."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def _exit(main: Any, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    from flowdsl import cli_common

    monkeypatch.setattr(sys, "argv", ["flowdsl", *argv])
    # (cli.main marks this process as the flowdsl one, which then leaves stop signals ignored after a command:
    # put back as it was for the tests that follow in this process)
    monkeypatch.setattr(cli_common, "_WHOLE_PROCESS", cli_common._WHOLE_PROCESS)
    with pytest.raises(SystemExit) as ended:
        main()
    return int(ended.value.code or 0)


class _Interrupting(importlib.abc.MetaPathFinder):
    """Raises, while ``flowdsl.cli`` is being imported, what a stop signal raises through launch's handlers."""

    def __init__(self, said: str):
        self.said = said

    def find_spec(self, name: str, path: Any, target: Any = None) -> None:
        if name == "flowdsl.cli":
            raise KeyboardInterrupt(self.said)


@pytest.mark.parametrize(("argv", "json_wanted"), [
    (["run", "x.yaml", "--format", "json"], True), (["status", "r1", "-f", "json"], True),
    (["show", "r1", "--format=json"], True), (["run", "x.yaml"], False),
    (["validate", "x.yaml", "--format", "json"], False),  # (validate's JSON is its diagnostics list)
])
def test_a_stop_signal_while_the_cli_loads_ends_cleanly(argv: list[str], json_wanted: bool,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delitem(sys.modules, "flowdsl.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_Interrupting("terminated (SIGTERM)"), *sys.meta_path])
    assert _exit(launch.main, argv, monkeypatch) == 130
    out, err = capsys.readouterr()
    assert err == "terminated (SIGTERM)\n"
    if json_wanted:
        assert json.loads(out) == {"status": "error", "error": {"type": "KeyboardInterrupt",
                                                                "message": "terminated (SIGTERM)"}}
    else:
        assert out == ""


def test_launch_turns_sigterm_into_a_stop_the_commands_see_as_ctrl_c(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("flowdsl.cli.main", lambda: None)
    monkeypatch.setattr(sys, "argv", ["flowdsl", "--version"])
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # one inherited as ignored stays ignored
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    launch.main()
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    with pytest.raises(KeyboardInterrupt, match=r"terminated \(SIGTERM\)"):
        signal.raise_signal(signal.SIGTERM)


def test_an_interrupt_no_command_handled_is_said_once_with_the_json_object(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import flowdsl.runtime.record as record
    from flowdsl import cli

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(record, "find_record", interrupted)
    assert _exit(cli.main, ["show", "r1", "--format", "json"], monkeypatch) == 130
    out, err = capsys.readouterr()
    assert json.loads(out)["error"] == {"type": "KeyboardInterrupt", "message": "interrupted"}
    assert err == "interrupted\n"


@pytest.mark.parametrize("bad", [["--seed", "abc"], ["--late-grace", "-1"], ["--bogus"],
                                 ["--schedule-timeout", "0.0001", "--backend", "redis"]])
def test_a_wrong_command_line_under_format_json_is_a_usage_error_object_too(
        bad: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from flowdsl import cli

    assert _exit(cli.main, ["run", "x.yaml", *bad, "--format", "json"], monkeypatch) == 2
    out, err = capsys.readouterr()
    said = json.loads(out)
    assert said["status"] == "error" and said["error"]["type"] == "UsageError"
    option = bad[0]
    assert option in said["error"]["message"] and option in err and "Traceback" not in err


def test_without_format_json_a_wrong_command_line_is_the_usage_error_alone(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from flowdsl import cli

    assert _exit(cli.main, ["run", "x.yaml", "--seed", "abc"], monkeypatch) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Invalid value for '--seed'" in err


def test_the_console_script_and_python_m_run_through_launch(tmp_path: Path) -> None:
    for cmd in ([FLOWDSL], [sys.executable, "-m", "flowdsl"]):
        done = subprocess.run([*cmd, "show", str(tmp_path), "--format", "json"], capture_output=True, text=True)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert "is a directory, not a run record" in json.loads(done.stdout)["error"]["message"]


def test_once_the_command_is_built_sigterm_and_sighup_are_the_commands_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands that take these signals take them from the default (``run`` marks their interrupt as a stop, not
    a failure of what it interrupted; a worker process dies of a SIGHUP, its step taken over after the lease)."""
    from flowdsl import cli

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    monkeypatch.setattr("flowdsl.cli.main", lambda: None)
    monkeypatch.setattr(sys, "argv", ["flowdsl", "--version"])
    launch.main()
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # while the CLI loads
    monkeypatch.undo()
    assert _exit(cli.main, ["--version"], monkeypatch) == 0
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL


def test_a_stop_while_the_command_is_built_is_said_with_the_json_object(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from flowdsl import cli

    def interrupted(app: Any) -> Any:
        raise KeyboardInterrupt("terminated (SIGTERM)")

    monkeypatch.setattr(cli.typer.main, "get_command", interrupted)
    assert _exit(cli.main, ["runs", "--format", "json"], monkeypatch) == 130
    out, err = capsys.readouterr()
    assert json.loads(out)["error"]["message"] == "terminated (SIGTERM)" and "Traceback" not in err


def test_sigterm_while_worker_modules_import_stops_the_run_and_blames_no_module(tmp_path: Path) -> None:
    (tmp_path / "slowmod.py").write_text(
        "import pathlib, time\npathlib.Path('importing').write_text('x')\ntime.sleep(20)\n", encoding="utf-8")
    (tmp_path / "flow.yaml").write_text("flowdsl: 1\nname: slow\nworkers: [slowmod]\nsteps: [a]\n",
                                        encoding="utf-8")
    proc = subprocess.Popen([FLOWDSL, "run", "flow.yaml", "--no-record", "--format", "json"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if (tmp_path / "importing").exists():
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert json.loads(out)["error"] == {"type": "KeyboardInterrupt", "message": "terminated (SIGTERM)"}
    assert "FD205" not in err and "cannot import" not in err


def test_python_m_names_itself_and_a_closed_stdout_is_no_traceback(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "flowdsl", "run", "x.yaml", "--bogus"], capture_output=True,
                          text=True)
    assert done.returncode == 2 and "python -m flowdsl run --help" in done.stderr
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([FLOWDSL, "run", "x.yaml", "--bogus", "--format", "json"], stdout=write,
                              stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write)
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_the_console_script_imports_next_to_nothing_before_it_takes_the_stop_signals() -> None:
    """Until ``launch.main`` takes SIGTERM and SIGHUP (and guards SIGINT), a stop signal ends the process with a
    traceback or without a word: ``import flowdsl.launch`` (the console script's first line, ``flowdsl`` included)
    loads no module the interpreter has not loaded already but ``signal`` — not ``typing`` and ``re`` (~40 ms),
    nor ``json``."""
    probe = ("import sys; before = set(sys.modules); import flowdsl.launch; "
             "print(' '.join(sorted(set(sys.modules) - before)))")
    loaded = set(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
                                ).stdout.split())
    assert not loaded & {"typing", "re", "json", "collections.abc"}, loaded
    assert {"flowdsl", "flowdsl.launch"} <= loaded
