"""Helpers for tests that spawn a process and must wait on what it says rather than sleep a guessed time."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest


class StderrReader:
    """A spawned process's stderr, read line by line as it comes (a thread), for a test to wait on its text; then
    :meth:`finish` for its stdout and the whole of stderr once it has ended (never ``communicate``, which would
    race the thread for stderr)."""

    def __init__(self, proc: subprocess.Popen[str]):
        assert proc.stderr is not None
        self.proc = proc
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self.thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in iter(stream.readline, ""):
            self.lines.append(line)

    def text(self) -> str:
        """Everything written so far, whitespace (rich's wrapping) folded to single spaces."""
        return " ".join("".join(self.lines).split())

    def wait_until(self, holds: Callable[[str], bool], timeout: float = 30.0) -> None:
        """Wait until ``holds(self.text())`` (an AssertionError with the text so far after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while not holds(self.text()):
            if time.monotonic() > deadline:
                raise AssertionError(f"not said within {timeout:g} s; stderr so far: {self.text()}")
            time.sleep(0.02)

    def finish(self, timeout: float = 20.0) -> tuple[str, str]:
        """Wait for the process to end (SIGKILL, by its PID, after ``timeout``): its stdout and its stderr."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.thread.join(10)
        assert self.proc.stdout is not None
        return self.proc.stdout.read(), "".join(self.lines)


def wait_for_file(path: Path, proc: subprocess.Popen[str], seconds: float = 30) -> None:
    """Wait until ``path`` exists (a scripted worker's ``mark``: the worker was called); the test fails, and the
    process it started is killed, when ``proc`` ends first or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path.name} was not created: {proc.communicate()}")
        time.sleep(0.02)
