"""Stop signals and the Redis commands that follow a run besides ``run --backend redis``: ``cancel --wait`` and
``status --follow``. Whenever a Ctrl-C, SIGTERM or SIGHUP comes before the command has printed its result — as
it loads, while Redis has not answered yet, while it follows, as it reads the rest of the result — it stops the
command as it stops ``run --backend redis``: exit 130, one JSON object with the error type ``Interrupted``, a hint
naming the run; never a process killed without a word. Once the result is printed, a signal changes nothing.

Real ``python -m flowdsl`` processes on the session's private Redis, each signalled by its PID and bounded in
time; the restore order of the follower's handlers is checked at function level (in a process of its own)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

import tests.runtime.workers  # noqa: F401  (registers the conf.* workers the burst worker serves)
from flowdsl import compile_text
from flowdsl.runtime.redis import RedisClient, RedisWorker, WorkerOptions
from flowdsl.runtime.redis.keys import Keys
from tests.redis.procs import ROOT, worker_env
from tests.redis.server import RedisServer
from tests.redis.test_cli_errors import SAGA, _submit, spawn, stop, wait_for

STOPS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


def _name(sig: signal.Signals) -> str:
    return sig.name


@contextlib.contextmanager
def _ours(*procs: subprocess.Popen[Any]) -> Iterator[None]:
    """Whatever happens in the test, the processes it started are gone after it (SIGKILL, by their PID)."""
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _wchan(pid: int) -> str:
    """Where the process waits in the kernel (Linux): ``do_epoll_wait`` in an event loop, ``pipe_write`` when
    blocked writing to a full pipe."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read()
    except OSError:
        return ""


def _one_object(out: str) -> dict[str, Any]:
    lines = out.strip().splitlines()
    assert len(lines) == 1, f"not exactly one JSON object on stdout: {out!r}"
    value: dict[str, Any] = json.loads(lines[0])
    return value


def _stopped(proc: subprocess.Popen[str], out: str, err: str, run_id: str) -> dict[str, Any]:
    """The command ended as ``run --backend redis`` ends on a stop signal: exit 130, the one object, no traceback."""
    assert proc.returncode == 130, (proc.returncode, out, err)
    payload = _one_object(out)
    assert payload["status"] == "error" and payload["run_id"] == run_id, payload
    assert payload["error"]["type"] == "Interrupted", payload
    assert "Traceback" not in err, err
    return payload


def _flat(text: str) -> str:
    return " ".join(text.split())


def _cancel_held(url: str, prefix: str, run_id: str) -> bool:
    """The cancel request of a run not started is held in the run's hash."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        return bool(client.hexists(Keys(prefix).run(run_id), "cancel"))
    finally:
        client.close()


async def _cancelled_run(url: str, prefix: str, run_id: str) -> None:
    """A run that has ended (cancelled before it started; a burst worker started it)."""
    async with RedisClient(url, prefix=prefix) as client:
        await client.submit(compile_text(SAGA), {"script": {}}, run_id=run_id)
        assert await client.cancel(run_id, "over before it began") == "requested"
        worker = RedisWorker(url, prefix=prefix, options=WorkerOptions(handle_signals=False, burst=True))
        await asyncio.wait_for(worker.serve(), 30)
        assert (await client.info(run_id)).status == "cancelled"


def _driven(script: str, *args: str) -> subprocess.Popen[str]:
    """``python -c script ARGS``: the real command (``flowdsl.launch.main``) after ``script`` set up when a signal
    comes."""
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


# --- cancel --wait, while it waits -------------------------------------------------------------------------


@pytest.mark.parametrize("sig", STOPS, ids=_name)
def test_cancel_wait_stopped_while_it_waits_ends_as_run_does(url: str, prefix: str, sig: signal.Signals) -> None:
    """`cancel --wait` follows the run as `run --backend redis` does, and a stop signal ends it the same way (the
    run goes on to its end); SIGTERM and SIGHUP used to kill it with no JSON object, and Ctrl-C gave the error
    type `Error`."""
    run_id = f"wait-{sig.name.lower()}"
    asyncio.run(_submit(url, prefix, run_id))  # no worker process: the run never starts, and the wait goes on
    proc = spawn("cancel", run_id, "--wait", "--redis-url", url, "--prefix", prefix, "--format", "json")
    with _ours(proc):
        wait_for(lambda: _cancel_held(url, prefix, run_id))
        wait_for(lambda: "epoll" in _wchan(proc.pid))  # (following: waiting for the run's news)
        time.sleep(0.3)
        out, err = stop(proc, sig)
    payload = _stopped(proc, out, err, run_id)
    assert payload["error"]["message"].startswith("stopped waiting; the cancel was requested"), payload
    assert f"flowdsl status {run_id} --follow" in _flat(err) and "RUN_ID" not in err, err


# --- before Redis has answered -----------------------------------------------------------------------------


def test_a_signal_before_redis_answered_stops_status_follow_and_cancel_wait(url: str, prefix: str,
                                                                              server: RedisServer) -> None:
    """Redis holds every command (its process stopped): `status --follow` has not read the plan, `cancel --wait`
    has not had its request answered, when SIGTERM and SIGHUP come. Both end at once, exit 130 with the object
    and the hint (`cancel` says the request may not have been made); neither is killed."""
    asyncio.run(_submit(url, prefix, "held-s"))
    asyncio.run(_submit(url, prefix, "held-c"))
    common = ("--redis-url", url, "--prefix", prefix, "--format", "json")
    bound_s = 20.0
    assert server.proc is not None
    # (SIGSTOP rather than CLIENT PAUSE: an UNPAUSE waits for the pause's whole term; SIGCONT is at once)
    os.kill(server.proc.pid, signal.SIGSTOP)
    held_at = time.monotonic()
    try:
        following = spawn("status", "held-s", "--follow", *common)
        cancelling = spawn("cancel", "held-c", "--wait", *common)
        with _ours(following, cancelling):
            # (in the event loop: Redis holds their first command)
            wait_for(lambda: all("epoll" in _wchan(p.pid) for p in (following, cancelling)), timeout=bound_s - 2)
            time.sleep(0.2)
            os.kill(following.pid, signal.SIGTERM)
            os.kill(cancelling.pid, signal.SIGHUP)
            f_out, f_err = following.communicate(timeout=bound_s)
            c_out, c_err = cancelling.communicate(timeout=bound_s)
            assert time.monotonic() < held_at + bound_s, "the commands were not stopped at once"
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)  # Redis answers again for the next tests
    status = _stopped(following, f_out, f_err, "held-s")
    assert status["error"]["message"] == "stopped following; the run itself goes on, in Redis", status
    assert "flowdsl status held-s --follow" in _flat(f_err), f_err
    cancel = _stopped(cancelling, c_out, c_err, "held-c")
    assert "may not have been asked to cancel" in cancel["error"]["message"], cancel
    assert "flowdsl status held-c" in _flat(c_err) and "flowdsl cancel held-c --wait" in _flat(c_err), c_err


# --- while the command loads -------------------------------------------------------------------------------

_SIGNAL_AS_IT_LOADS = """
import os, signal, sys

SIG = getattr(signal, sys.argv[1])

class Signalling:  # a stop signal in the middle of importing the Redis commands
    def find_spec(self, name, path=None, target=None):
        if name == "flowdsl.runtime.redis.commands":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), SIG)
        return None

sys.meta_path.insert(0, Signalling())
sys.argv = ["flowdsl", *sys.argv[2:]]
from flowdsl.launch import main
main()
"""


@pytest.mark.parametrize("command, sig", [("status", signal.SIGTERM), ("cancel", signal.SIGHUP),
                                          ("status", signal.SIGINT)], ids=lambda v: getattr(v, "name", v))
def test_a_signal_while_the_command_loads_stops_it_once_loaded(url: str, prefix: str, command: str,
                                                               sig: signal.Signals) -> None:
    """A signal as the command imports its Redis module (a few tenths of a second) is held, then ends the
    command as any other: no process killed, no half-done import, no traceback."""
    run_id = f"loading-{command}"
    asyncio.run(_submit(url, prefix, run_id))
    wait = "--follow" if command == "status" else "--wait"
    proc = _driven(_SIGNAL_AS_IT_LOADS, sig.name, command, run_id, wait, "--redis-url", url, "--prefix", prefix,
                   "--format", "json")
    with _ours(proc):
        out, err = proc.communicate(timeout=60)
    payload = _stopped(proc, out, err, run_id)
    said = _flat(err)
    if command == "status":
        assert payload["error"]["message"].startswith("stopped following"), payload
        assert f"flowdsl status {run_id} --follow" in said, err
    else:
        assert "may not have been asked to cancel" in payload["error"]["message"], payload
        assert f"flowdsl cancel {run_id} --wait" in said, err
    assert not _cancel_held(url, prefix, run_id)  # (nothing was asked of Redis)


# --- as the rest of the result is read ------------------------------------------------------------------------

_SIGNAL_AS_DEAD_LETTERS_ARE_READ = """
import asyncio, os, signal, sys
import flowdsl.runtime.redis.commands as commands

async def reading(client, run_id):  # a stop signal while status reads the run's dead letters, after following
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.sleep(30)
    return []

commands._dead_letters_of = reading
sys.argv = ["flowdsl", *sys.argv[1:]]
from flowdsl.launch import main
main()
"""


def test_status_follow_stopped_as_it_reads_dead_letters_says_the_run_has_ended(url: str, prefix: str) -> None:
    """After following, `status --follow --format json` reads the run's dead letters: a SIGTERM then used to kill
    it. It stops it as at any other moment before the result is out, and says the run has ended (not that it
    goes on)."""
    asyncio.run(_cancelled_run(url, prefix, "over"))
    proc = _driven(_SIGNAL_AS_DEAD_LETTERS_ARE_READ, "status", "over", "--follow", "--redis-url", url, "--prefix",
                   prefix, "--format", "json")
    with _ours(proc):
        out, err = proc.communicate(timeout=25)  # (the dead letters read would take 30 s)
    payload = _stopped(proc, out, err, "over")
    assert payload["error"]["message"] == "stopped before the result was printed; the run has ended cancelled"
    assert "flowdsl status over" in _flat(err) and "goes on" not in err, err


# --- once the result is printed ------------------------------------------------------------------------------


def _fill(fd: int) -> int:
    """Fill the pipe whose write end is ``fd`` to its last byte; how many bytes that took."""
    os.set_blocking(fd, False)
    written = 0
    try:
        for size in (65536, 4096, 1):
            while True:
                try:
                    written += os.write(fd, b"x" * size)
                except BlockingIOError:
                    break
    finally:
        os.set_blocking(fd, True)  # (the file description is shared with the child: it must block)
    return written


def _drain(fd: int, deadline: float) -> bytes:
    chunks = []
    while time.monotonic() < deadline:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("sig", STOPS, ids=_name)
@pytest.mark.parametrize("command", ["status", "cancel"])
def test_a_signal_once_the_result_is_printed_changes_nothing(url: str, prefix: str, command: str,
                                                             sig: signal.Signals) -> None:
    """The command has its result and prints it, but stdout is full (a slow reader): the process waits in the
    write. A stop signal then changes nothing: the object comes out whole once read, and the exit code is the
    run's (cancelled: 1), not 130, with no `interrupted` said."""
    run_id = f"printed-{command}-{sig.name.lower()}"
    asyncio.run(_cancelled_run(url, prefix, run_id))
    wait = "--follow" if command == "status" else "--wait"
    read_end, write_end = os.pipe()
    try:
        filled = _fill(write_end)
        proc = subprocess.Popen([sys.executable, "-m", "flowdsl", command, run_id, wait, "--redis-url", url,
                                 "--prefix", prefix, "--format", "json"], cwd=ROOT, env=worker_env(),
                                stdout=write_end, stderr=subprocess.PIPE, text=True, start_new_session=True)
        os.close(write_end)
        write_end = -1
        with _ours(proc):
            wait_for(lambda: "pipe_write" in _wchan(proc.pid), timeout=30)  # printing: the pipe is full
            os.kill(proc.pid, sig)
            time.sleep(0.3)  # (the signal is handled, or kills, before the output goes on)
            out = _drain(read_end, time.monotonic() + 30)
            _, err = proc.communicate(timeout=20)
    finally:
        os.close(read_end)
        if write_end != -1:
            os.close(write_end)
    assert proc.returncode == 1, (proc.returncode, out[filled:], err)
    payload = _one_object(out[filled:].decode())
    if command == "status":
        assert payload["run_id"] == run_id and payload["status"] == "cancelled", payload
    else:
        assert payload == {"run_id": run_id, "cancel": "finished", "status": "cancelled"}, payload
    assert "interrupted" not in err and "Traceback" not in err, err


_SIGNAL_JUST_AFTER_THE_RESULT = """
import asyncio, os, signal, sys
import flowdsl.runtime.redis.commands as commands
from flowdsl.runtime.redis import RedisClient

SIG = getattr(signal, sys.argv[1])
printed, closing = commands._json_out, RedisClient.aclose

def printing(value):  # a stop signal just after the result is written, as the command closes its connections
    printed(value)
    os.kill(os.getpid(), SIG)

async def slowly(self):  # (closing takes a while: the signal lands in the event loop meanwhile)
    await asyncio.sleep(0.3)
    await closing(self)

commands._json_out = printing
RedisClient.aclose = slowly
sys.argv = ["flowdsl", *sys.argv[2:]]
from flowdsl.launch import main
main()
"""


@pytest.mark.parametrize("sig", STOPS, ids=_name)
@pytest.mark.parametrize("command", ["status", "cancel"])
def test_a_signal_just_after_the_result_is_printed_changes_nothing(url: str, prefix: str, command: str,
                                                                   sig: signal.Signals) -> None:
    """The signal lands in the event loop, as the command closes its Redis connections after printing: the exit
    code stays the run's, with one object and nothing said about stopping."""
    run_id = f"just-{command}-{sig.name.lower()}"
    asyncio.run(_cancelled_run(url, prefix, run_id))
    wait = "--follow" if command == "status" else "--wait"
    proc = _driven(_SIGNAL_JUST_AFTER_THE_RESULT, sig.name, command, run_id, wait, "--redis-url", url, "--prefix",
                   prefix, "--format", "json")
    with _ours(proc):
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, (proc.returncode, out, err)
    assert _one_object(out)["status"] == "cancelled", out
    assert "interrupted" not in err and "Traceback" not in err, err


# --- the follower's handlers are put back in a safe order ------------------------------------------------------

_SIGTERM_AS_HANDLERS_ARE_PUT_BACK = """
import asyncio, signal
from flowdsl.runtime.redis.commands import _stopped_by_termination

seen = []
def handler(signum, frame):
    seen.append(signum)

signal.signal(signal.SIGTERM, handler)
real = signal.signal
putting_back = False

def spying(signum, action):  # a SIGTERM right after every change of its handler while they are put back
    previous = real(signum, action)
    if putting_back and signum == signal.SIGTERM:
        signal.raise_signal(signal.SIGTERM)
    return previous

signal.signal = spying  # (asyncio's remove_signal_handler sets the handler through it too)

async def main():
    global putting_back
    loop = asyncio.get_running_loop()
    with _stopped_by_termination(None, []):
        assert signal.SIGTERM in loop._signal_handlers and signal.getsignal(signal.SIGTERM) is not handler
        putting_back = True
    putting_back = False
    assert signal.SIGTERM not in loop._signal_handlers and signal.SIGHUP not in loop._signal_handlers
    assert signal.getsignal(signal.SIGTERM) is handler and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL

asyncio.run(main())
assert seen == [signal.SIGTERM], seen
assert signal.set_wakeup_fd(-1) == -1  # (the loop's wakeup fd was dropped with its last handler)
print("survived")
"""


def test_the_follower_puts_the_python_handler_back_before_it_drops_the_loop_entry() -> None:
    """`_stopped_by_termination` puts back the handlers it found: the Python-level one first, so that a SIGTERM
    at any moment of that reaches it. `loop.remove_signal_handler` first (SIG_DFL), then `signal.signal(...)`,
    left a moment in which a SIGTERM killed the process."""
    proc = _driven(_SIGTERM_AS_HANDLERS_ARE_PUT_BACK)
    with _ours(proc):
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == "survived", (proc.returncode, out, err)


@pytest.mark.parametrize("args", [["runs"], ["status", "r1"], ["cancel", "r1"], ["dead-letters"]],
                         ids=lambda a: a[0])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=_name)
def test_a_reporting_command_stopped_while_redis_is_silent_says_so_with_its_json_object(
        tmp_path: Any, args: list[str], sig: signal.Signals) -> None:
    """`runs`, `status`, `cancel` (without waiting) and `dead-letters` took SIGTERM and SIGHUP at their default: a
    stop while Redis had not answered killed them without a word, and without the one JSON object `--format json`
    promises however the command ends. A listener that accepts the connection and says nothing holds them there
    (it is not Redis: nothing here needs one)."""
    import socket
    import threading

    path = tmp_path / "silent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True)
    thread.start()
    proc = spawn(*args, "--redis-url", f"unix://{path}", "--format", "json")
    try:
        thread.join(30)
        assert accepted, "the command never connected"
        out, err = stop(proc, sig)
    finally:
        stop(proc, signal.SIGKILL)
        for conn in accepted:
            conn.close()
        listener.close()
    said = "terminated (SIGTERM)" if sig == signal.SIGTERM else "hung up (SIGHUP)"
    assert proc.returncode == 130, err
    assert json.loads(out)["error"] == {"type": "KeyboardInterrupt", "message": said}
    assert said in err and "Traceback" not in err
