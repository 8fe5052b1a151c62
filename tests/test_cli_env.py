"""The command line in hostile environments (docs/runtime.md; the audit of the CLI's environment): ``-o`` onto
device nodes, FIFOs and this process's own descriptors (written in place, never replaced), an endless or huge run
input (a size cap), a records directory that is a broken symbolic link, a full file system under an output file and
under a run's record, bytes of a path that are not UTF-8, a terminal on stdin, a record removed while listed.

The devices used are made here, in a temporary directory (``os.mknod``: root only, else skipped): never the
machine's ``/dev/null`` or ``/dev/full``. A full file system is a small tmpfs mounted here (skipped when mounting
is not allowed)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pty
import select
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flowdsl.runtime import inputs, listing
from flowdsl.runtime.inputs import InputError, read_input
from flowdsl.runtime.record import RESERVE_BYTES, RunRecorder, check_records_dir, ends_mid_line

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "ecommerce_order"
FLOW = EXAMPLE / "flow.yaml"
SUCCESS = EXAMPLE / "inputs" / "success.json"
#: the type of a record's last line when writing it failed (flowdsl.runtime.record.RECORD_FAILED)
RECORD_FAILED = "record_failed"
#: the real console script (the behaviour depends on the process: its descriptors, its stdin)
FLOWDSL = Path(sys.executable).parent / "flowdsl"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWDSL_")}
    return {**env, "PYTHONPATH": str(ROOT), "LITELLM_LOCAL_MODEL_COST_MAP": "True", "COLUMNS": "200"}


def _flowdsl(*args: str | bytes | Path, cwd: Path, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    if not FLOWDSL.exists():
        pytest.skip(f"no console script at {FLOWDSL}")
    kw.setdefault("capture_output", "stdout" not in kw and "stdin" not in kw)
    if not kw["capture_output"]:
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("stdout", subprocess.PIPE)
    argv: list[str | bytes] = [str(FLOWDSL), *(a if isinstance(a, bytes) else str(a) for a in args)]
    return subprocess.run(argv, cwd=cwd, env=_env(), timeout=120, check=False, **kw)


def _mknod(path: Path, kind: int, major: int, minor: int) -> Path:
    try:
        os.mknod(path, kind | 0o666, os.makedev(major, minor))
    except PermissionError:
        pytest.skip("making a device node needs root")
    return path


def _private_null(tmp_path: Path) -> Path:
    return _mknod(tmp_path / "mynull", stat.S_IFCHR, 1, 3)  # a private /dev/null


@contextlib.contextmanager
def _tiny_tmpfs(where: Path, size: str = "64k") -> Iterator[Path]:
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def _fill(directory: Path, leave: int) -> None:
    """Fill the file system of ``directory`` but for ``leave`` bytes (tmpfs: whole pages)."""
    free = shutil.disk_usage(directory).free
    (directory / "fill").write_bytes(b"\0" * (free - leave))
    assert shutil.disk_usage(directory).free == leave


# --- -o onto what is not a regular file ----------------------------------------------------------------------------

@pytest.mark.parametrize("command", [
    ["plan", FLOW, "-o"],
    ["convert", FLOW, "--to", "flow", "-o"],
    ["diagram", FLOW, "--format", "ascii", "-o"],
])
def test_output_onto_a_character_device_writes_into_it_and_leaves_the_node(tmp_path: Path,
                                                                           command: list[Any]) -> None:
    null = _private_null(tmp_path)
    ran = _flowdsl(*command, null, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert stat.S_ISCHR(os.lstat(null).st_mode) and os.lstat(null).st_rdev == os.makedev(1, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["mynull"]  # no temporary file left beside it


def test_output_onto_a_full_device_is_an_error_naming_it_and_leaves_the_node(tmp_path: Path) -> None:
    full = _mknod(tmp_path / "myfull", stat.S_IFCHR, 1, 7)  # a private /dev/full
    ran = _flowdsl("plan", FLOW, "-o", full, cwd=tmp_path)
    assert ran.returncode == 2
    assert ran.stderr.decode().strip() == f"error: cannot write {full}: No space left on device"
    assert stat.S_ISCHR(os.lstat(full).st_mode)


def test_output_onto_a_symlink_to_a_device_writes_through_it(tmp_path: Path) -> None:
    null = _private_null(tmp_path)
    (tmp_path / "link").symlink_to("mynull")
    ran = _flowdsl("plan", FLOW, "-o", "link", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert stat.S_ISCHR(os.lstat(null).st_mode) and (tmp_path / "link").is_symlink()


def test_output_onto_a_fifo_is_written_to_its_reader_and_the_fifo_stays(tmp_path: Path) -> None:
    fifo = tmp_path / "ofifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    ran = _flowdsl("diagram", FLOW, "--format", "ascii", "-o", fifo, cwd=tmp_path)
    reader.join(30)
    assert ran.returncode == 0, ran.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert got and b"validate_order" in got[0]


def test_output_onto_a_block_device_or_a_socket_is_refused(tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s.sock"))
    try:
        ran = _flowdsl("plan", FLOW, "-o", "s.sock", cwd=tmp_path)
        assert ran.returncode == 2
        assert ran.stderr.decode().strip() == "error: cannot write s.sock: it is a socket, not a file (-o takes a " \
                                              "file name)"
        assert stat.S_ISSOCK(os.lstat(tmp_path / "s.sock").st_mode)
    finally:
        sock.close()
    blk = _mknod(tmp_path / "myblk", stat.S_IFBLK, 7, 250)  # (never opened: refused on sight)
    ran = _flowdsl("plan", FLOW, "-o", blk, cwd=tmp_path)
    assert ran.returncode == 2 and b"it is a block device" in ran.stderr
    assert stat.S_ISBLK(os.lstat(blk).st_mode)


def test_output_to_dev_stdout_goes_down_a_pipe(tmp_path: Path) -> None:
    ran = _flowdsl("plan", FLOW, "-o", "/dev/stdout", cwd=tmp_path)  # (stdout: a pipe)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["flow"]["name"] == "ecommerce_order"


def test_output_to_dev_stdout_writes_into_the_open_file_not_over_it(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    out.write_bytes(b"before\n")
    inode = out.stat().st_ino
    with open(out, "ab") as fh:  # `>> out.txt`: appended, at the descriptor's offset
        ran = _flowdsl("plan", FLOW, "-o", "/dev/stdout", cwd=tmp_path, stdout=fh)
    assert ran.returncode == 0, ran.stderr
    assert out.stat().st_ino == inode
    text = out.read_text()
    assert text.startswith("before\n{") and json.loads(text.removeprefix("before\n"))["flow"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_output_to_dev_stdout_on_a_full_device_is_an_error_naming_it(tmp_path: Path) -> None:
    full = _mknod(tmp_path / "myfull", stat.S_IFCHR, 1, 7)  # a private /dev/full
    with open(full, "wb") as fh:
        ran = _flowdsl("plan", FLOW, "-o", "/dev/stdout", cwd=tmp_path, stdout=fh)
    assert ran.returncode == 2
    assert ran.stderr.decode().strip() == "error: cannot write /dev/stdout: No space left on device"
    assert stat.S_ISCHR(os.lstat(full).st_mode)


def test_output_files_keep_their_refusals(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    ran = _flowdsl("plan", FLOW, "-o", "d", cwd=tmp_path)
    assert ran.returncode == 2 and b"it is a directory" in ran.stderr
    ran = _flowdsl("plan", FLOW, "-o", FLOW, cwd=tmp_path)
    assert ran.returncode == 2 and b"refusing to write over it" in ran.stderr


def test_output_on_a_full_file_system_names_the_file(tmp_path: Path) -> None:
    with _tiny_tmpfs(tmp_path / "full") as full:
        _fill(full, 0)
        ran = _flowdsl("plan", FLOW, "-o", "full/p.json", cwd=tmp_path)
        assert ran.returncode == 2
        assert ran.stderr.decode().strip() == "error: cannot write full/p.json: No space left on device"
        assert sorted(p.name for p in full.iterdir()) == ["fill"]  # no temporary file left


# --- the run input: a size cap -------------------------------------------------------------------------------------

def _memory_bounded() -> None:
    """(In the child) at most 3 GiB of address space: without the cap, the read ends in a MemoryError, not in the
    machine's OOM killer."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


@pytest.mark.parametrize("how", ["-i /dev/zero", "-i - < /dev/zero"])
def test_an_endless_run_input_is_refused_at_the_cap(tmp_path: Path, how: str) -> None:
    with open("/dev/zero", "rb") as zero:
        args = ["-i", "/dev/zero"] if how.startswith("-i /dev") else ["-i", "-"]
        started = time.monotonic()
        ran = _flowdsl("run", FLOW, *args, "--no-record", "--format", "json", cwd=tmp_path,
                       stdin=zero if "<" in how else subprocess.DEVNULL, preexec_fn=_memory_bounded)
    assert time.monotonic() - started < 60
    assert ran.returncode == 2
    name = "/dev/zero" if "<" not in how else "stdin"
    message = json.loads(ran.stdout)["error"]["message"]
    assert message.startswith(f"{name}: the run input is larger than 256 MiB (268435456 bytes)"), message
    assert b"Traceback" not in ran.stderr and ran.stderr.count(b"\n") == 1


def test_a_run_input_file_larger_than_the_cap_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    monkeypatch.setattr(inputs, "MAX_INPUT_BYTES", 16)
    big = tmp_path / "big.json"
    big.write_text('{"a": "' + "x" * 20 + '"}')
    with pytest.raises(InputError, match=r"big.json: the run input is larger than 0 MiB \(16 bytes\)"):
        read_input(str(big))
    (tmp_path / "ok.json").write_text('{"a": 1234567}')  # 14 bytes: under it
    assert read_input(str(tmp_path / "ok.json")) == {"a": 1234567}


def test_a_run_input_from_a_pipe_or_dev_stdin_is_read(tmp_path: Path) -> None:
    for source in ("-", "/dev/stdin"):
        with open(SUCCESS, "rb") as fh:
            piped = subprocess.Popen(["cat"], stdin=fh, stdout=subprocess.PIPE)
            assert piped.stdout is not None
            ran = _flowdsl("run", FLOW, "-i", source, "--no-record", "--format", "json", cwd=tmp_path,
                           stdin=piped.stdout)
            piped.wait()
        assert ran.returncode == 0, ran.stderr
        assert json.loads(ran.stdout)["status"] == "completed"
        assert b"Ctrl-D" not in ran.stderr  # not a terminal: no hint


def test_a_run_input_read_from_a_terminal_says_how_to_end_it(tmp_path: Path) -> None:
    if not FLOWDSL.exists():
        pytest.skip(f"no console script at {FLOWDSL}")
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen([str(FLOWDSL), "run", str(FLOW), "-i", "-", "--no-record", "--format", "json"],
                                cwd=tmp_path, env=_env(), stdin=follower, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        os.close(follower)
        assert proc.stderr is not None
        said = b""
        deadline = time.monotonic() + 30
        while b"\n" not in said and time.monotonic() < deadline:  # the hint comes before any input
            ready, _, _ = select.select([proc.stderr], [], [], 1)
            if ready:
                said += os.read(proc.stderr.fileno(), 4096)
        assert said == b"reading the run input from stdin; end it with Ctrl-D\n"
        os.write(leader, SUCCESS.read_bytes().replace(b"\n", b" ") + b"\n\x04")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert json.loads(out)["status"] == "completed"
    finally:
        os.close(leader)


# --- the records directory -----------------------------------------------------------------------------------------

def test_a_records_directory_that_is_a_looping_or_dangling_symlink_says_so(tmp_path: Path) -> None:
    from flowdsl.runtime.record import RecordError

    (tmp_path / "loopA").symlink_to("loopB")
    (tmp_path / "loopB").symlink_to("loopA")
    (tmp_path / "dang").symlink_to("/nonexistent/zz")
    (tmp_path / "dang2").symlink_to("dang")
    with pytest.raises(RecordError, match=r"'.*loopA': it is a symbolic link that loops"):
        check_records_dir(tmp_path / "loopA" / "r.jsonl")
    with pytest.raises(RecordError, match=r"'.*dang': it is a symbolic link to /nonexistent/zz, which does not "
                                          r"exist"):
        check_records_dir(tmp_path / "dang" / "r.jsonl")
    with pytest.raises(RecordError, match=r"'.*dang2': it is a symbolic link to dang \(through links, to "
                                          r"/nonexistent/zz\), which does not exist"):
        check_records_dir(tmp_path / "dang2" / "r.jsonl")
    ran = _flowdsl("run", FLOW, "-i", SUCCESS, "--runs-dir", "loopA", cwd=tmp_path)
    assert ran.returncode == 2 and b"File exists" not in ran.stderr
    assert ran.stderr.startswith(b"error: cannot keep run records in 'loopA': it is a symbolic link that loops")
    listed = _flowdsl("runs", "--backend", "local", "--runs-dir", "dang", cwd=tmp_path)
    assert listed.returncode == 2
    assert listed.stderr.startswith(b"error: dang: it is a symbolic link to /nonexistent/zz, which does not exist")


# --- a record whose writing fails mid-run --------------------------------------------------------------------------

class _FailingAfter:
    """A record file that takes ``room`` more bytes, then answers ENOSPC (a short write first, as a disk does)."""

    def __init__(self, fh: Any, room: int):
        self.fh, self.room = fh, room

    def write(self, data: Any) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        went: int = self.fh.write(bytes(data)[: self.room])
        self.room -= went
        return went

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fh, name)


def _recorder_failing(tmp_path: Path, room_after_header: int) -> RunRecorder:
    recorder = RunRecorder("r1", tmp_path)
    recorder.write_many(({"type": "record", "plan": {}, "input": {}},))
    recorder.flush()
    recorder.publish()  # (in place under its name: until then, a record that fails is removed, never begun)
    recorder._fh = _FailingAfter(recorder._fh, room_after_header)  # type: ignore[assignment]
    return recorder


def test_a_failed_record_write_is_cut_back_to_its_last_whole_line_and_says_why(tmp_path: Path) -> None:
    recorder = _recorder_failing(tmp_path, 30)
    line = {"type": "task_succeeded", "task_id": "r1/a#1", "result": {"x": "y" * 40}}
    recorder.write_many(({"type": "start", "n": 1}, line))  # the first fits whole, the second does not
    with pytest.raises(OSError, match="No space left"):
        recorder.flush()
    fh = recorder._fh.fh  # type: ignore[union-attr]
    recorder._fh = fh  # (room again: the reserve freed, say)
    recorder.stop({"type": RECORD_FAILED, "run_id": "r1", "at": 5, "status": "running",
                   "reason": "No space left on device"})
    raw = recorder.path.read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 3
    assert [json.loads(x)["type"] for x in raw.splitlines()] == ["record", "start", RECORD_FAILED]


def test_a_failed_record_write_without_room_for_its_note_ends_at_its_last_whole_line(tmp_path: Path) -> None:
    recorder = _recorder_failing(tmp_path, 30)
    recorder.write_many(({"type": "start", "n": 1}, {"type": "task_succeeded", "result": "z" * 80}))
    with pytest.raises(OSError):
        recorder.flush()
    recorder._fh.room = 20  # type: ignore[union-attr]  # not enough for the note
    recorder.stop({"type": RECORD_FAILED, "run_id": "r1", "at": 5, "status": "running", "reason": "x" * 50})
    raw = recorder.path.read_bytes()
    assert raw.endswith(b"\n") and [json.loads(x)["type"] for x in raw.splitlines()] == ["record", "start"]
    assert not ends_mid_line(recorder.path)


def test_a_full_disk_mid_run_leaves_a_record_that_show_and_runs_read_truthfully(tmp_path: Path) -> None:
    with _tiny_tmpfs(tmp_path / "full", size="160k") as full:  # (room for the directory's reserve)
        # room for the header and the start line (about 10.5 KB: three pages) and the reserve, not for the run
        _fill(full, 12288 + RESERVE_BYTES)
        ran = _flowdsl("run", FLOW, "-i", SUCCESS, "--runs-dir", "full", "--run-id", "r1", cwd=tmp_path)
        assert ran.returncode == 0, ran.stderr
        err = ran.stderr.decode()
        assert err.count("No space left on device") == 2, err  # the progress's line, and the summary's
        assert "the run record full/r1.jsonl cannot be written (No space left on device)" in err
        raw = (full / "r1.jsonl").read_bytes()
        assert raw.endswith(b"\n")
        last = json.loads(raw.splitlines()[-1])
        assert last["type"] == RECORD_FAILED and last["status"] == "running"
        shown = _flowdsl("show", "r1", "--runs-dir", "full", cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        said = shown.stdout + shown.stderr  # (show's notes: on stdout in text)
        assert b"stopped while writing" not in said and b"its process stopped" not in said
        assert b"the record ends before the run did: writing it failed (No space left on device)" in said
        as_json = json.loads(_flowdsl("show", "r1", "--runs-dir", "full", "--format", "json", cwd=tmp_path).stdout)
        assert as_json["record_error"] == ("writing the record failed (No space left on device); it stops there "
                                           "and the run went on unrecorded")
        runs = _flowdsl("runs", "--backend", "local", "--runs-dir", "full", "--format", "json", cwd=tmp_path)
        assert [(r["run_id"], r["status"]) for r in json.loads(runs.stdout)] == [("r1", "unrecorded")]
        assert sorted(p.name for p in full.iterdir()) == ["fill", "r1.jsonl"]  # (the reserve had no name)


def test_a_record_removed_while_runs_lists_is_passed_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran = _flowdsl("run", FLOW, "-i", SUCCESS, "--runs-dir", "rr", "--run-id", "a", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    shutil.copy(tmp_path / "rr" / "a.jsonl", tmp_path / "rr" / "b.jsonl")
    real = listing.read_row

    def vanishing(path: Path, size: int | None = None) -> Any:
        if path.name == "b.jsonl":
            path.unlink()  # another process's clean-up, between the directory's listing and the read
        return real(path, size)

    monkeypatch.setattr(listing, "read_row", vanishing)
    skipped: list[str] = []
    rows = listing.list_records(tmp_path / "rr", limit=10, on_skip=skipped.append)
    assert [r.run_id for r in rows] == ["a"] and skipped == []


# --- bytes of a path that are not UTF-8 ----------------------------------------------------------------------------

def test_a_path_byte_that_is_not_utf8_is_shown_as_its_escape(tmp_path: Path) -> None:
    (tmp_path / os.fsdecode(b"b\xe9d.yaml")).write_text("flowdsl: 1\nname: x\nsteps: [1]\n")
    ran = _flowdsl("validate", b"b\xe9d.yaml", "--no-import", cwd=tmp_path)
    assert ran.returncode == 1
    assert ran.stderr.startswith(b"b\\xe9d.yaml:") and b"\\udce9" not in ran.stderr
    ran = _flowdsl("run", FLOW, "-i", b"\xe9x.json", "--no-record", cwd=tmp_path)
    assert ran.returncode == 2
    assert ran.stderr.decode().strip() == "error: cannot read input file '\\xe9x.json': No such file or directory"


@pytest.mark.parametrize("value", ["abc", "0", "-1", "10001"])
def test_a_bad_thread_pool_size_is_refused_before_anything_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                value: str) -> None:
    """`$FLOWDSL_THREADS` wrong: `run`, `resume` and `worker` say so at once, exit 2 (it was a log line once the first
    sync worker started, and 256 threads used), as a bad `$FLOWDSL_LATE_GRACE` is."""
    monkeypatch.setenv("FLOWDSL_THREADS", value)
    runs = tmp_path / "runs"
    example = ROOT / "examples" / "order_management"
    for args in (["run", str(example / "flow.yaml"), "-i", str(example / "inputs" / "order.json"), "--runs-dir",
                  str(runs), "--format", "json"],
                 ["resume", "nothing", "--runs-dir", str(runs), "--format", "json"],
                 ["worker", "--redis-url", "unix:///nonexistent/flowdsl.sock"]):
        from typer.testing import CliRunner

        from flowdsl.cli import app

        done = CliRunner().invoke(app, args)
        assert done.exit_code == 2, (args, done.output)
        assert "FLOWDSL_THREADS must be a whole number from 1 to 10000" in " ".join(done.stderr.split()), args
        if "--format" in args:
            assert json.loads(done.stdout)["error"]["type"] == "UsageError"
    assert not runs.exists()  # (nothing ran, nothing was recorded)
