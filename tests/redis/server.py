"""A private redis-server for the tests: a unix socket in a temporary directory, no TCP port, AOF on.

Never the machine's shared Redis: the server is started here, listens on no
TCP port (``--port 0``), keeps its data in its own directory, and is checked to
be the process we spawned (``INFO server`` ``process_id`` equals our child's
PID) before any test talks to it. It is stopped (and only it) by its PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """One private redis-server process; :meth:`kill` and :meth:`start` again keep its data (AOF)."""

    def __init__(self, directory: Path | None = None, extra_args: tuple[str, ...] = ()):
        self.dir = Path(directory or tempfile.mkdtemp(prefix="fdr-", dir="/tmp"))
        self.extra_args = extra_args
        self.socket = self.dir / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"unix://{self.socket}?db=0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        if not Path(REDIS_SERVER).exists():
            pytest.skip("redis-server is not installed")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
             "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
             "--daemonize", "no", "--logfile", str(self.dir / "redis.log"), "--databases", "4", *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.dir}/redis.log")
            if self.socket.exists():
                try:
                    client = redis.Redis(unix_socket_path=str(self.socket))
                    info = client.info("server")
                    client.close()
                except (redis.ConnectionError, redis.BusyLoadingError):
                    time.sleep(0.02)
                    continue
                if int(info["process_id"]) != self.proc.pid:
                    raise RuntimeError("the socket answers for another redis-server than the one started here")
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not come up in time")

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket))

    def kill(self) -> None:
        """SIGKILL the server (by its PID) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        with_socket = self.socket
        if with_socket.exists():
            with_socket.unlink()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


_SESSION: dict[str, RedisServer] = {}


def session_server(config: pytest.Config) -> RedisServer:
    """The one private server of this test session (started on first use, stopped at the session's end)."""
    server = _SESSION.get("server")
    if server is None:
        server = RedisServer().start()
        _SESSION["server"] = server
        config.add_cleanup(server.cleanup)
        config.add_cleanup(lambda: _SESSION.pop("server", None))
    return server
