"""Worker processes for the Redis tests: real ``flowdsl worker`` processes, started and stopped by PID.

Every process a test starts is tracked here and ended in a ``finally`` (or at
the session's end) by its own PID: SIGTERM, then SIGKILL after a timeout.
Nothing else is ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis

ROOT = Path(__file__).resolve().parents[2]
#: the connections on which a worker blocks reading (XREADGROUP … BLOCK block_ms), by the client name it gives them
READERS = ("flowdsl-reader:", "flowdsl-cancels:")


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra or {})}
    for name in ("FLOWDSL_LM", "FLOWDSL_REDIS_URL", "FLOWDSL_REDIS_PREFIX"):
        env.pop(name, None)
    return env


class WorkerProcs:
    """A group of ``flowdsl worker`` processes on one Redis URL and prefix."""

    def __init__(self, url: str, prefix: str, modules: list[str], *, lease: float = 5.0, concurrency: int = 32,
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None, log_dir: Path | None = None):
        self.url, self.prefix, self.modules = url, prefix, modules
        self.lease, self.concurrency = lease, concurrency
        self.extra_args = extra_args or []
        self.env = worker_env(env)
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def command(self) -> list[str]:
        args = [sys.executable, "-c", "from flowdsl.cli import main; main()", "worker", "--redis-url", self.url,
                "--prefix", self.prefix, "--lease", str(self.lease), "--concurrency", str(self.concurrency),
                "--grace", "2"]
        for module in self.modules:
            args += ["-w", module]
        return args + self.extra_args

    def start(self, n: int = 1, *, wait: bool = True) -> list[subprocess.Popen[bytes]]:
        started = []
        for _ in range(n):
            log = subprocess.DEVNULL
            if self.log_dir is not None:
                log = open(self.log_dir / f"worker-{len(self.procs)}.log", "wb")  # noqa: SIM115
            proc = subprocess.Popen(self.command(), cwd=ROOT, env=self.env, stdout=log, stderr=log,
                                    start_new_session=True)
            self.procs.append(proc)
            started.append(proc)
        if wait:
            self.wait_ready(started)
        return started

    def wait_ready(self, procs: list[subprocess.Popen[bytes]], timeout: float = 30.0) -> None:
        """Until each process has registered its liveness record (it serves its streams then)."""
        client = redis.Redis.from_url(self.url)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                names = [n.decode() for n in client.hkeys("{" + self.prefix + "}:workers")]
                if all(any(f":{p.pid}:" in n for n in names) for p in procs):
                    return
                for p in procs:
                    if p.poll() is not None:
                        raise RuntimeError(f"worker process {p.pid} exited with {p.returncode}")
                time.sleep(0.05)
            raise RuntimeError("worker processes did not come up in time")
        finally:
            client.close()

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None]

    @staticmethod
    def signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, sig)

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL one of our processes, by its PID."""
        self.signal(proc, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_all(self, timeout: float = 10.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                    os.kill(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        unblocker = Unblocker(self.url, [proc.pid for proc in self.procs if proc.poll() is None])
        try:
            for proc in self.procs:
                last = max(deadline, time.monotonic() + 0.1)
                while True:
                    try:
                        proc.wait(timeout=0.05)
                        break
                    except subprocess.TimeoutExpired:
                        if time.monotonic() >= last:
                            os.kill(proc.pid, signal.SIGKILL)
                            proc.wait(timeout=10)
                            break
                        unblocker.poke()
        finally:
            unblocker.close()


def anonymous(url: str) -> bool:
    """Whether ``url`` names no user (an ACL user's refusals are what some tests check: never ask as one)."""
    return urlsplit(url).username is None and urlsplit(url).password is None


class Unblocker:
    """Ends the blocked reads (``XREADGROUP … BLOCK``, 1 s) of worker processes that were asked to stop.

    A worker stopped gracefully (SIGTERM) lets each reading loop end at its next turn, so a loop blocked in a read
    holds the process for up to a second with nothing to do. ``CLIENT UNBLOCK`` ends such a read as if its block
    had run out (nothing read, nothing lost: the loop sees the stop, as it would a moment later); what the
    process does on its way out is unchanged, only its idle wait is cut. Best effort: a server that cannot be
    reached, or refuses ``CLIENT``, is left alone (the read runs out by itself)."""

    def __init__(self, url: str, pids: list[int]):
        self.marks = [f":{pid}:" for pid in pids]
        self.client: redis.Redis | None = None
        if self.marks and anonymous(url):
            with contextlib.suppress(Exception):
                self.client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)

    def poke(self) -> None:
        """Unblock each blocked reading connection of those processes (their client names hold their pids)."""
        if self.client is None:
            return
        try:
            for entry in self.client.client_list():
                name = entry.get("name", "")
                if name.startswith(READERS) and "b" in entry.get("flags", "") and any(m in name for m in self.marks):
                    self.client.client_unblock(int(entry["id"]))
        except Exception:  # (the server gone, held, or refusing CLIENT: the reads are left to run out)
            self.close()

    def close(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            with contextlib.suppress(Exception):
                client.close()
