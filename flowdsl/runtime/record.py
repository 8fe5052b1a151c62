"""Run records: every run's events as JSON lines in ``.flowdsl/runs/<run_id>.jsonl``.

Stage: runtime (shared). Imports stdlib, ``.codec``, ``.owner`` and (to check a header)
``.plancheck`` and the kernel's version only. The first line of a record is a header
``{"type": "record", "record_format": 1, "flowdsl_version": ..., "plan": ..., "input": ..., "process": ...}`` so
that a recorded run can be replayed through the kernel and drawn without its spec, and whoever reads it later knows
which flowdsl wrote it and which process ran it (``.owner``); every other line is
one event, as the kernel emitted it or as it was fed to it — or, appended once the run is over, a
``resolved`` line (``flowdsl resolve``: a person finished what the run left to do by hand).

A record holds the run's whole input, every step's output and error, and the
prompts and replies of its LLM calls: it is created readable by its owner alone
(mode 0600), and a records directory flowdsl creates is its owner's alone
(0700), as ssh and gpg keep theirs. A directory that already exists keeps its
mode (it is the user's to choose); its records are 0600 all the same.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import json
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from flowdsl.runtime.codec import dumps

DEFAULT_RUNS_DIR = ".flowdsl/runs"
#: the layout of run records this code writes and reads (the header's ``record_format``; a header without one is
#: of format 1): a record of a later format was written by a newer flowdsl, and is said to be (:class:`NewerRecord`)
RECORD_FORMAT = 1
#: the type of the line ``flowdsl resolve`` appends to a record: ``{"type": "resolved", "run_id", "at", "by",
#: "note", "status"}`` — set aside by :func:`read_record` (``RecordLines.resolutions``), never replayed
RESOLVED = "resolved"
#: what a run id may be, in both runtimes: 1-128 letters, digits and ``_.:-``, the first neither ``-`` (the id
#: would read as an option: ``flowdsl show -x``) nor ``.`` (``.``, ``..``: hidden record files ``..jsonl``)
RUN_ID_RE = re.compile(r"[A-Za-z0-9_:][A-Za-z0-9_.:-]{0,127}\Z")
_RUN_ID_RULE = "use 1-128 letters, digits and _ . : -, the first not - or ."


def runs_dir(explicit: str | None = None) -> Path:
    """The directory of run records: ``explicit``, else ``$FLOWDSL_RUNS_DIR``, else ``.flowdsl/runs``.

    Raises ``ValueError`` when ``$FLOWDSL_RUNS_DIR`` is set but empty (as ``--runs-dir ''`` is refused: an
    empty setting is a mistake, never a request for the default)."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("FLOWDSL_RUNS_DIR")
    if env is not None and not env.strip():
        raise ValueError("FLOWDSL_RUNS_DIR is set but empty: set it to the directory of run records, or unset "
                         f"it for the default ({DEFAULT_RUNS_DIR})")
    return Path(env or DEFAULT_RUNS_DIR)


def check_run_id(run_id: str) -> str:
    """Return ``run_id``, or raise ``ValueError`` saying what a run id must be (:data:`RUN_ID_RE`): the rule of
    both runtimes (the Redis one's ``keys.check_run_id`` is this function)."""
    if isinstance(run_id, str) and RUN_ID_RE.match(run_id):
        return run_id
    if isinstance(run_id, str) and run_id[:1] == "-" and RUN_ID_RE.match("x" + run_id[1:]):
        raise ValueError(f"invalid run id {run_id!r}: it begins with '-', so commands would read it as an option; "
                         + _RUN_ID_RULE)
    if isinstance(run_id, str) and run_id[:1] == "." and RUN_ID_RE.match("x" + run_id[1:]):
        raise ValueError(f"invalid run id {run_id!r}: it begins with '.', so its record would be a hidden file "
                         f"('{run_id}.jsonl'); " + _RUN_ID_RULE)
    raise ValueError(f"invalid run id {run_id!r}: {_RUN_ID_RULE}")


def new_run_id(plan: Mapping[str, Any]) -> str:
    """A fresh run id, ``<flow name>-<UTC yyyymmddThhmmss>-<16 hex digits>`` — the default of both runtimes.

    The 64 random bits keep ids apart however many runs start in one second (a run id prefixes every
    idempotency key: two runs sharing one would have a payment gateway take the second for a repeat)."""
    name = str((plan.get("flow") or {}).get("name") or "run")[:48]
    return f"{name}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(8)}"


def record_path(run_id: str, directory: str | Path | None = None) -> Path:
    check_run_id(run_id)
    return runs_dir(str(directory) if directory else None) / f"{run_id}.jsonl"


def encode_line(item: dict[str, Any]) -> bytes:
    """One record line: compact JSON and a newline. Keys keep their order: expressions see it (``$keys()``),
    so a record with sorted keys would replay to other decisions than the run made."""
    return dumps(item, default=str) + b"\n"


#: the type of the line ``flowdsl resume`` appends to the record of a run whose process stopped before its end, as
#: the run goes on in the resuming process: ``{"type": "runtime_resumed", "run_id", "at", "by", "was", "process",
#: "attempts"}`` (``was``: ``crashed`` or ``aborted``; ``process``: the resuming one, which runs the run from there;
#: ``attempts``: ``{task_id, step, attempt}`` of those run again). The runtime lines before it — a
#: ``runtime_aborted`` — tell of the run's earlier process: how the run stands now is told by the lines after it
RESUMED = "runtime_resumed"
#: the type of a record's last line when writing it failed part-way through the run (a full disk, a file size
#: limit): ``{"type": "record_failed", "run_id", "at", "status", "reason"}`` — the record stops there, and the run
#: went on unrecorded (written when it fits: else the record ends at its last whole line)
RECORD_FAILED = "record_failed"


class RecordError(ValueError):
    """A run record is missing, unreadable or not JSON lines; the message names the file (and line)."""


class NewerRecord(RecordError):
    """A run record written by a newer flowdsl, in a layout this one does not read (a later ``record_format``, a
    plan of a later ``plan_version``, a run under newer kernel rules): not malformed, but for that flowdsl to read."""


class RecordWriteError(OSError):
    """A run record that cannot be created, or whose first lines cannot be written (a full disk, a directory
    that refuses files): nothing ran. ``errno`` is the cause's; ``str()`` is the message alone, naming the file."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


#: what to do instead, said for both the API and the CLI (a RecordError reaches both)
_ELSEWHERE = ("(choose another directory: runs_dir= from Python, --runs-dir on the command line; or keep no record: "
              "record=False, --no-record)")


def check_records_dir(path: Path) -> None:
    """Create the directory of the record ``path`` if needed; a ``RecordError`` saying why when records
    cannot be written there (checked before a run starts, so that no step runs unrecorded)."""
    directory = path.parent
    if directory.exists() and not directory.is_dir():  # (mkdir would say "File exists")
        raise RecordError(f"cannot keep run records in '{directory}': it is a file, not a directory {_ELSEWHERE}")
    if directory.is_symlink() and not directory.exists():  # (mkdir would say "File exists" too)
        raise RecordError(f"cannot keep run records in '{directory}': {broken_link(directory)} {_ELSEWHERE}")
    try:  # a directory made here is the owner's alone (its parents, made too, as the umask says)
        directory.mkdir(mode=RECORDS_DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise RecordError(f"cannot keep run records in '{directory}': {exc.strerror or exc} {_ELSEWHERE}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise RecordError(f"cannot keep run records in '{directory}': it is not writable {_ELSEWHERE}")


#: the mode of a record file: it holds the run's input, outputs and LLM prompts — its owner's to read alone
RECORD_MODE = 0o600
#: the mode of a records directory flowdsl creates (an existing one is left as it is)
RECORDS_DIR_MODE = 0o700


def _create(path: Path) -> BinaryIO:
    """Create the file ``path`` — it must not exist — readable and writable by its owner alone
    (:data:`RECORD_MODE`, whatever the umask allows more), open for unbuffered binary writing."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), RECORD_MODE)
    try:
        return os.fdopen(fd, "wb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


#: the temporary name a record is written under until its first lines are in it (:meth:`RunRecorder.publish`):
#: hidden, and not ``*.jsonl``, so that listings pass it over; ``flowdsl prune`` removes one its process left
_STAGED_RE = re.compile(r"\.(?P<run_id>[A-Za-z0-9_:][A-Za-z0-9_.:-]{0,127})\.jsonl\.[0-9a-f]{12}\.tmp\Z")
#: the errors of a file system that has no hard links (FAT, some network ones): a record is then put in place by
#: claiming its name and renaming the temporary file onto it
_NO_HARD_LINKS = frozenset(code for code in (getattr(errno, name, None) for name in (
    "EPERM", "EOPNOTSUPP", "ENOTSUP", "ENOSYS", "EMLINK")) if code is not None)


def staged_name(run_id: str) -> str:
    """A fresh temporary name for the record of ``run_id`` while its first lines are written:
    ``.<run id>.jsonl.<12 hex digits>.tmp``."""
    return f".{run_id}.jsonl.{secrets.token_hex(6)}.tmp"


def staged_run_id(name: str) -> str | None:
    """The run id whose record the file named ``name`` was to become (:func:`staged_name`): a record being created
    now, or one its process left as it was killed creating it (nothing of that run began). None for any other
    name."""
    found = _STAGED_RE.match(name)
    return found.group("run_id") if found else None


def _lock_file(fd: int, how: str) -> None:
    """``flock`` ``fd`` exclusively without waiting (``how`` ``"lock"``) or unlock it (``"unlock"``); a file
    system without locks, or a lock held elsewhere, is let be (the lock only keeps ``flowdsl prune`` off a record
    being created)."""
    try:
        import fcntl
    except ImportError:
        return
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if how == "lock" else fcntl.LOCK_UN)


def broken_link(link: Path) -> str:
    """What is wrong with ``link``, a symbolic link that leads to nothing: it loops, or what it names is missing."""
    try:
        os.stat(link)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "it is a symbolic link that loops (it leads back to itself, through links)"
    try:
        target = os.readlink(link)
    except OSError:
        return "it is a symbolic link to nothing"
    final = os.path.realpath(link)
    further = f" (through links, to {final})" if os.path.normpath(os.path.join(link.parent, target)) != final else ""
    return f"it is a symbolic link to {target}{further}, which does not exist"


class RunRecorder:
    """Writes a run's header and events to its record file, which it creates (it must not exist): first under a
    hidden temporary name, put in place by :meth:`publish` once the first lines are in it.

    Lines are held until :meth:`flush`; the local runtime flushes after
    every burst of decisions it makes without waiting (so a record is on disk
    whenever the run waits for a worker or a timer) and on :meth:`close`.
    The file holds whole lines but for a write that failed part-way (a full
    disk): :meth:`stop` then puts it back to its last whole line.
    """

    def __init__(self, run_id: str, directory: str | Path | None = None):
        self.path = record_path(run_id, directory)
        self.run_id = run_id
        check_records_dir(self.path)
        if os.path.lexists(self.path):  # (said at once; publish() checks it for good, exclusively)
            raise FileExistsError(f"a record of run '{run_id}' already exists: {self.path}")
        staged = self.path.with_name(staged_name(run_id))
        try:
            self._fh: BinaryIO | None = _create(staged)
        except OSError as exc:  # a directory os.access called writable (as root), a read-only file system...
            raise RecordWriteError(exc.errno, f"cannot create the run record {self.path}: {exc.strerror or exc}") \
                from None
        #: the hidden name the record is written under until :meth:`publish` puts it in place (then None)
        self.staged: Path | None = staged
        info = os.fstat(self._fh.fileno())
        self._file_id = (info.st_dev, info.st_ino)  # (which file is this record's, whatever its names)
        _lock_file(self._fh.fileno(), "lock")  # (flowdsl prune leaves a locked temporary file alone)
        self._held: list[bytes] = []  # lines not yet written
        self._whole = 0  # the bytes on disk that are whole lines: where a failed write is cut back to
        self._reserve: _Reserve | None = _RESERVES.take(self.path.parent)  # room, on a full disk, for its line

    @classmethod
    def appending(cls, path: Path, fh: BinaryIO) -> RunRecorder:
        """A recorder going on with the existing record ``path``, open for appending as ``fh`` (a resumed run's:
        ``.resume``)."""
        self = cls.__new__(cls)
        self.path = path
        self.run_id = path.name.removesuffix(".jsonl")
        self._fh = fh
        self.staged = None
        info = os.fstat(fh.fileno())
        self._file_id = (info.st_dev, info.st_ino)
        self._held = []
        self._whole = info.st_size
        self._reserve = _RESERVES.take(path.parent)
        return self

    def publish(self) -> None:
        """Put the record in place under its name, holding what was written to it so far — its header and its
        ``start`` line, flushed.

        Until then it is written under a hidden temporary name beside it (:func:`staged_run_id`), which listings
        pass over: a record appears with its first lines or not at all — never empty, never a header alone — and a
        run stopped before this leaves no record (:meth:`discard`). Exclusive, as creating the record with
        ``O_EXCL`` would be: a ``FileExistsError`` when a record of the run exists (another run took the id
        meanwhile), a :class:`RecordWriteError` when it cannot be put there; :meth:`discard` then removes the
        temporary file."""
        staged = self.staged
        if staged is None:
            return
        taken = f"a record of run '{self.run_id}' already exists: {self.path}"
        try:
            os.link(staged, self.path)  # (fails when the name exists: exclusive)
        except FileExistsError:
            raise FileExistsError(taken) from None
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise RecordWriteError(exc.errno, f"cannot create the run record {self.path}: "
                                       f"{exc.strerror or exc}") from None
            self._claim_and_move(staged, taken)
        self.staged = None
        with contextlib.suppress(OSError):
            os.unlink(staged)
        if self._fh is not None:
            _lock_file(self._fh.fileno(), "unlock")

    def _claim_and_move(self, staged: Path, taken: str) -> None:
        """:meth:`publish` on a file system without hard links: claim the record's name with an empty file
        (exclusive), then rename the temporary file onto it — the name is that empty file for an instant only."""
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                             RECORD_MODE))
        except FileExistsError:
            raise FileExistsError(taken) from None
        except OSError as exc:
            raise RecordWriteError(exc.errno, f"cannot create the run record {self.path}: {exc.strerror or exc}") \
                from None
        try:
            os.replace(staged, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            raise RecordWriteError(exc.errno, f"cannot create the run record {self.path}: {exc.strerror or exc}") \
                from None

    def discard(self) -> None:
        """Close the record and remove it — a run that never began (its first lines could not be written, or a
        stop signal came before its first step): nothing is left under its name nor its temporary one (a name that
        holds another file by now is left alone). Never raises."""
        fh, self._fh = self._fh, None
        self._held.clear()
        self._free_reserve()
        for name in (self.staged, self.path):
            if name is None:
                continue
            with contextlib.suppress(OSError):
                info = os.stat(name, follow_symlinks=False)
                if (info.st_dev, info.st_ino) == self._file_id:
                    os.unlink(name)
        self.staged = None
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()

    def header(self, plan: dict[str, Any], run_input: dict[str, Any], **extra: Any) -> None:
        """Write the header line: the record's format and the flowdsl version writing it, the plan and the input,
        ``extra``, and the process running the run (``.owner.this_process``), then flush it."""
        from flowdsl import __version__
        from flowdsl.runtime.owner import this_process

        self.write_many(({"type": "record", "record_format": RECORD_FORMAT, "flowdsl_version": __version__,
                          "plan": plan, "input": run_input, **extra, "process": this_process()},))
        self.flush()

    def write_many(self, items: Iterable[dict[str, Any]]) -> None:
        """Hold lines: a decision's input event and the events it caused."""
        if self._fh is not None:
            self._held.append(b"".join([encode_line(item) for item in items]))

    def flush(self) -> None:
        """Write the lines held; an ``OSError`` when that fails (the lines written whole before it stay)."""
        if self._fh is None or not self._held:
            return
        data = b"".join(self._held)
        self._held.clear()
        done = 0
        try:
            done = _write_all(self._fh, data)
        except _Partly as cut:
            self._whole += data.rfind(b"\n", 0, cut.done) + 1  # the lines that went whole: kept
            raise cut.error from None
        self._whole += done

    def stop(self, marker: dict[str, Any] | None = None) -> None:
        """After a write failed: put the file back to its last whole line (dropping the part of a line that went),
        end it with ``marker`` when that line can be written whole (else it ends at the last whole line), and close
        it. Never raises: the file is left as it could be left. A record never put in place (:meth:`publish`) is
        removed instead: its run never began."""
        if self.staged is not None:
            self.discard()
            return
        if self._fh is not None:  # the lines held before it (the others, when the encoder refused a line)
            with contextlib.suppress(OSError):
                self.flush()
        fh, self._fh = self._fh, None
        self._held.clear()
        self._free_reserve(spend=True)  # (before the line is written: it is there for it)
        if fh is None:
            return
        try:
            fh.truncate(self._whole)
            fh.seek(self._whole)
            if marker is not None:
                try:
                    self._whole += _write_all(fh, encode_line(marker))
                except (_Partly, ValueError, TypeError):
                    fh.truncate(self._whole)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                fh.close()

    def close(self) -> None:
        """Write the lines held and close the file; an ``OSError`` when they cannot be written (the file then stays
        open, for :meth:`stop`). A record never put in place (:meth:`publish`) is removed instead: its run never
        began."""
        if self.staged is not None:
            self.discard()
            return
        if self._fh is not None:
            self.flush()
            self._fh.close()
            self._fh = None
        self._free_reserve()

    def _free_reserve(self, spend: bool = False) -> None:
        """Done with the reserve: the record is closed, or a write failed (``spend``: the room is freed now, for
        the line saying so)."""
        reserve, self._reserve = self._reserve, None
        if reserve is not None:
            _RESERVES.give_back(reserve, spend=spend)


#: the room kept on a records directory's file system for the ``record_failed`` lines of the runs recording there
#: (sixteen blocks of most file systems: room for the lines of a few hundred runs)
RESERVE_BYTES = 65536


class _Reserve:
    """The room kept for one records directory: its file's descriptor (None once freed) and the records using it."""

    __slots__ = ("directory", "fd", "users")

    def __init__(self, directory: str, fd: int | None):
        self.directory, self.fd, self.users = directory, fd, 0


class _Reserves:
    """One reserve per records directory for the whole process, shared by the records open there (each run held a
    descriptor of its own for it besides its record's: two per run in flight, and 1,000 recorded runs at once did
    not fit ``ulimit -n 1024``). A record whose write failed frees it (every run recording there is then as short
    of room, and the lines saying so fit in it); the next record opened there makes a new one if it can. Safe
    from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_dir: dict[str, _Reserve] = {}

    def take(self, directory: Path) -> _Reserve:
        key = os.fspath(directory)
        with self._lock:
            reserve = self._by_dir.get(key)
            if reserve is None or reserve.fd is None:
                reserve = self._by_dir[key] = _Reserve(key, _reserve(directory))
            reserve.users += 1
            return reserve

    def give_back(self, reserve: _Reserve, *, spend: bool) -> None:
        """A record is done with ``reserve``: closed (the last one there closes the reserve too), or its write
        failed (``spend``: the room is freed now, for its line and those of the others)."""
        with self._lock:
            reserve.users -= 1
            if not (spend or reserve.users <= 0):
                return
            fd, reserve.fd = reserve.fd, None
            if self._by_dir.get(reserve.directory) is reserve:
                del self._by_dir[reserve.directory]
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


_RESERVES = _Reserves()


def _reserve(directory: Path) -> int | None:
    """A file with no name in ``directory`` holding :data:`RESERVE_BYTES` of its file system: closed when a
    record's write fails for want of room, it makes room for the line saying so (the file system frees it when
    it is closed, also when the process is killed: nothing is left behind). None when it cannot be made (a file
    system without ``O_TMPFILE``, already full): the line is then written only if it fits."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None:
        return None
    try:
        fd = os.open(directory, flag | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        os.posix_fallocate(fd, 0, RESERVE_BYTES)
    except OSError:
        os.close(fd)
        return None
    return fd


class _Partly(Exception):
    """A write that failed after ``done`` bytes went (``error``: why)."""

    def __init__(self, done: int, error: OSError):
        super().__init__(done, error)
        self.done, self.error = done, error


def _write_all(fh: BinaryIO, data: bytes) -> int:
    """Write all of ``data`` to ``fh`` (unbuffered); :class:`_Partly` saying how much went when that fails."""
    view = memoryview(data)
    done = 0
    while done < len(data):
        try:
            went = fh.write(view[done:])
        except OSError as exc:
            raise _Partly(done, exc) from None
        if not went:  # (a full file system answers a short write, then ENOSPC: never 0 from a regular file)
            raise _Partly(done, OSError(errno.EIO, os.strerror(errno.EIO)))
        done += went
    return done


def owner_of(header: Mapping[str, Any] | None, lines: Iterable[Mapping[str, Any]]) -> Any:
    """The process that runs (or ran) a record's run: the one its last :data:`RESUMED` line names, else its
    header's (``.owner.this_process``; None when the record names none)."""
    resumed = last_resumed(lines)
    if resumed is not None:
        return resumed.get("process")
    return header.get("process") if isinstance(header, Mapping) else None


def last_resumed(lines: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """A record's last :data:`RESUMED` line, or None."""
    found = None
    for line in lines:
        if line.get("type") == RESUMED:
            found = line
    return found


def resumptions(lines: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each :data:`RESUMED` line of a record as ``RunResult.resumed`` gives it: ``{at, by, was, pid, host,
    attempts}`` (``attempts``: the task ids run again)."""
    out = []
    for line in lines:
        if line.get("type") == RESUMED:
            named, listed = line.get("process"), line.get("attempts")
            process: Mapping[str, Any] = named if isinstance(named, Mapping) else {}
            attempts: list[Any] = listed if isinstance(listed, list) else []
            out.append({"at": line.get("at"), "by": line.get("by"), "was": line.get("was"),
                        "pid": process.get("pid"), "host": process.get("host"),
                        "attempts": [a.get("task_id") for a in attempts if isinstance(a, Mapping)]})
    return out


def since_resumed(lines: list[dict[str, Any]] | list[Mapping[str, Any]]) -> int:
    """The index in ``lines`` of the first line after the last :data:`RESUMED` one (0 when there is none): the
    runtime lines from there on say how the run stands now."""
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].get("type") == RESUMED:
            return i + 1
    return 0


class LockedRecord:
    """A record file opened for appending and held under an exclusive ``flock`` (:func:`locked_record`), its bytes
    read through that descriptor: ``raw``, ``header`` and ``lines`` (:func:`read_record`'s). ``unwritable``: why it
    could only be opened for reading (then :meth:`append` raises it as a ``RecordError``)."""

    def __init__(self, path: Path, fd: int, raw: bytes, unwritable: OSError | None):
        self.path, self.fd, self.raw, self.unwritable = path, fd, raw, unwritable
        self.header, self.lines = read_record(path, raw)
        self.mended = False

    def grown(self) -> bool:
        """Whether the file was written to since it was read (its process still writes it)."""
        return os.fstat(self.fd).st_size != len(self.raw)

    def check_writable(self) -> None:
        """A ``RecordError`` when the record could only be opened for reading."""
        if self.unwritable is not None:
            raise RecordError(f"cannot write the run record {self.path}: {self.unwritable.strerror or self.unwritable}")

    def append(self, data: bytes) -> None:
        """Append ``data`` (whole lines): first the record is put back to its last whole line — a last line cut short
        when its process was killed, never read, is dropped (``dropped_cut_line`` then says so); a whole last line
        without its newline gets one. A ``RecordError`` when it cannot be written."""
        self.check_writable()
        try:
            if not self.mended:
                self.mended = True
                if self.lines.cut_short:
                    os.ftruncate(self.fd, self.raw.rfind(b"\n") + 1)
                elif self.raw and not self.raw.endswith(b"\n"):
                    data = b"\n" + data
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            raise RecordError(f"cannot write the run record {self.path}: {exc.strerror or exc}") from None

    @property
    def dropped_cut_line(self) -> bool:
        """Whether :meth:`append` dropped a last line cut short."""
        return self.mended and self.lines.cut_short


@contextlib.contextmanager
def locked_record(path: Path, by: str) -> Iterator[LockedRecord]:
    """The record ``path`` opened for appending (for reading alone when it cannot be written: ``unwritable``),
    under an exclusive ``flock`` (``flowdsl resolve``, ``resume`` and ``prune`` take it: two of them never act on one
    record at once), read whole through that descriptor — a record renamed or relinked meanwhile is not another
    file. ``RecordError`` when it cannot be opened or read, is not a regular file, or was removed while this waited
    for the lock (``by``: the command that waited). Closed (and unlocked) on leaving."""
    flags = getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)  # (a FIFO put there: never waited on)
    unwritable: OSError | None = None
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | flags)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ETXTBSY):
            raise RecordError(f"cannot write the run record {path}: {exc.strerror or exc}") from None
        unwritable = exc  # (judged all the same: a run with nothing to do is said to be so)
        try:
            fd = os.open(path, os.O_RDONLY | flags)
        except OSError as again:
            raise RecordError(f"cannot read the run record {path}: {again.strerror or again}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RecordError(f"{path} is not a regular file, so not a run record")
        _flock(fd)
        if not _still_named(fd, path):  # (flowdsl prune removed it while this waited for its lock)
            raise RecordError(f"no run record at {path}: it was removed or replaced while {by} waited for it")
        chunks = []
        try:
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
        except OSError as exc:
            raise RecordError(f"cannot read the run record {path}: {exc.strerror or exc}") from None
        yield LockedRecord(path, fd, b"".join(chunks), unwritable)
    finally:
        os.close(fd)


def _still_named(fd: int, path: Path) -> bool:
    held = os.fstat(fd)
    try:
        named = os.stat(path)
    except OSError:
        return False
    return held.st_nlink > 0 and (named.st_ino, named.st_dev) == (held.st_ino, held.st_dev)


def _flock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # (no flock here: two at once are not kept apart)
        return
    with contextlib.suppress(OSError):  # (a file system without locks: likewise)
        fcntl.flock(fd, fcntl.LOCK_EX)


def find_record(run: str, directory: str | Path | None = None) -> Path:
    """The record file of run ``run`` (or ``run`` itself when it is a path to a ``.jsonl`` file).

    Raises :class:`RecordError` naming the file looked for when there is none, or saying what it is when it is
    not a regular file (a directory, a FIFO).
    """
    if run.endswith(".jsonl") and os.path.lexists(run):
        return _regular_file(Path(run), "")
    if run.endswith(".jsonl") and "/" in run:  # a path (a run id has no '/'): no such file
        raise RecordError(f"no run record at {run}: it does not exist")
    if "/" in run and os.path.isdir(run):  # (any other name with a '/' is refused below as a run id)
        raise RecordError(f"{run} is a directory, not a run record: give a run id (with --runs-dir {run} if its "
                          "records are there) or the path of a record file (.jsonl)")
    try:
        path = record_path(run, directory)
    except ValueError as exc:
        raise RecordError(str(exc)) from None
    if not os.path.lexists(path):
        raise RecordError(f"no recorded run '{run}': {path} does not exist (see --runs-dir)")
    return _regular_file(path, f"no recorded run '{run}': ")


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def _regular_file(path: Path, lead: str) -> Path:
    """``path``, when it is a regular file (or a link to one); else a :class:`RecordError` saying what it is."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise RecordError(f"{lead}{path} is a symbolic link to nothing, not a run record") from None
    except OSError as exc:
        raise RecordError(f"{lead}cannot read run record {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise RecordError(f"{lead}{path} is a directory, not a run record")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a file")
        raise RecordError(f"{lead}{path} is not a regular file ({kind}), so not a run record")
    return path


def newer_problem(header: dict[str, Any] | None, start: dict[str, Any] | None = None) -> str | None:
    """Why a record was written by a newer flowdsl than this one — its header's ``record_format`` or its plan's
    ``plan_version`` is later than this one reads, or its ``start`` line's kernel rules version newer than it knows
    — or None. The sentence names the version that wrote it, when the header says."""
    header = header or {}
    plan = header.get("plan")
    plan_version = plan.get("plan_version") if isinstance(plan, dict) else None
    kernel = start.get("kernel") if start is not None else None
    reads = versions_read()
    what = None
    if _later(header.get("record_format"), RECORD_FORMAT):
        what = f"record format {header['record_format']}, this one reads {RECORD_FORMAT}"
    elif _later(plan_version, reads[0]):
        what = f"a plan of plan_version {plan_version}, this one reads 1 to {reads[0]}"
    elif _later(kernel, reads[1]):
        what = f"kernel rules version {kernel}, this one knows {reads[1]}"
    if what is None:
        return None
    from flowdsl import __version__

    wrote = header.get("flowdsl_version")
    by = f"flowdsl {wrote}" if isinstance(wrote, str) and wrote else "a newer flowdsl"
    return (f"the record is newer than this flowdsl ({__version__}) reads: written by {by} ({what}); read it with "
            "that version (or upgrade this one)")


def _later(value: Any, mine: int) -> bool:
    return type(value) is int and value > mine


_VERSIONS: list[int] = []


def versions_read() -> list[int]:
    """The plan version and the kernel rules version this flowdsl reads (imported once, when first asked)."""
    if not _VERSIONS:
        from flowdsl.kernel import STATE_VERSION
        from flowdsl.runtime.plancheck import PLAN_VERSION

        _VERSIONS.extend((PLAN_VERSION, STATE_VERSION))
    return _VERSIONS


def header_problem(header: dict[str, Any]) -> str | None:
    """What is wrong with a record's header line (None when it holds a well-shaped plan and input)."""
    from flowdsl.runtime.plancheck import checked_problem

    if "plan" not in header:
        return "it has no 'plan'"
    problem = checked_problem(header["plan"])  # (remembered: result_from_record asks again, at no cost)
    if problem is not None:
        return f"'plan' is not a flowdsl execution plan: {problem}"
    if not isinstance(header.get("input", {}), dict):
        return "'input' must be an object"
    return None


def ends_mid_line(path: str | Path) -> bool:
    """Whether a record file's last line was cut short (its process stopped while writing it), the line
    :func:`read_record` leaves out: a last line without its newline that is not whole UTF-8 JSON. A last line
    without its newline that is whole JSON is read, and is not cut short."""
    with open(path, "rb") as fh:
        end = fh.seek(0, os.SEEK_END)
        parts: list[bytes] = []  # the last line's, from its end back
        while end > 0:  # back from the end to the last newline
            size = min(end, 1 << 16)
            end -= size
            fh.seek(end)
            chunk = fh.read(size)
            newline = chunk.rfind(b"\n")
            parts.append(chunk[newline + 1 :])
            if newline >= 0:
                break
    return _cut_short(b"".join(reversed(parts)))


def _cut_short(piece: bytes) -> bool:
    """Whether ``piece``, what follows a record file's last newline, is a line cut short: its UTF-8 ends inside a
    character, or it is not whole JSON. Bytes that are not UTF-8 before its end are damage, not a cut."""
    if not piece.strip():
        return False
    try:
        text = piece.decode("utf-8")
    except UnicodeDecodeError:
        try:  # not final: a character cut in two at the end is awaited, not an error
            codecs.getincrementaldecoder("utf-8")().decode(piece, final=False)
        except UnicodeDecodeError:
            return False
        return True
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return True
    return False


class RecordLines(list[dict[str, Any]]):
    """The events of a record as :func:`read_record` returns them: a list, plus ``line_numbers`` (the line
    of the file each event is on) and ``cut_short`` (whether a last line cut short was left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.line_numbers: list[int] = []
        self.cut_short = False
        #: the ``resolved`` lines (:data:`RESOLVED`), set aside: they are not events of the run
        self.resolutions: list[dict[str, Any]] = []


def read_record(path: str | Path, raw: bytes | None = None) -> tuple[dict[str, Any] | None, RecordLines]:
    """The header (or None) and the events of a record file (``raw``: its bytes, read already — ``path`` then only
    names it); :class:`RecordError` says what is wrong.

    Lines are split at ``\\n`` alone, as they were written. A last line cut short (a process killed while
    writing it, see :func:`ends_mid_line`) is left out: the record then reads as it was before that line.
    Every other line must be UTF-8 JSON, an object with a ``type``; one header (type ``record``). A record written
    by a newer flowdsl (:func:`newer_problem`) is a :class:`NewerRecord`. ``resolved`` lines are set aside, in
    ``RecordLines.resolutions``."""
    p = Path(path)
    try:
        if raw is None:
            if not stat.S_ISREG(p.stat().st_mode):  # (reading a FIFO would wait for a writer)
                _regular_file(p, "")
            raw = p.read_bytes()
    except FileNotFoundError:
        raise RecordError(f"no run record at {p}") from None
    except OSError as exc:
        raise RecordError(f"cannot read run record {p}: {exc.strerror or exc}") from None
    header: dict[str, Any] | None = None
    events = RecordLines()
    pieces = raw.split(b"\n")
    end = 0
    for lineno, piece in enumerate(pieces, 1):
        start, end = end, end + len(piece) + 1
        if lineno == len(pieces) and _cut_short(piece):
            events.cut_short = True  # its process stopped while writing it: the record ends before
            break
        try:
            line = piece.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecordError(f"{p}:{lineno}:{exc.start + 1}: not valid UTF-8 (byte 0x{piece[exc.start]:02x} at offset "
                              f"{start + exc.start}); a run record is JSON lines in UTF-8") from None
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except RecursionError:
            raise RecordError(f"{p}:{lineno}: not a JSON line: it nests too deeply to read") from None
        except ValueError as exc:  # not JSON, or an integer too long to read
            raise RecordError(f"{p}:{lineno}: not a JSON line: {getattr(exc, 'msg', exc)}") from None
        if not isinstance(item, dict):
            raise RecordError(f"{p}:{lineno}: expected a JSON object, found {type(item).__name__}")
        kind = item.get("type")
        if not isinstance(kind, str) or not kind:
            raise RecordError(f"{p}:{lineno}: a record line needs a 'type' (a string), found "
                              f"{json.dumps(kind) if 'type' in item else 'none'}")
        if kind == "record":
            if header is not None:
                raise RecordError(f"{p}:{lineno}: a second header line (type 'record'); a record has one")
            newer = newer_problem(item)
            if newer is not None:
                raise NewerRecord(f"{p}:{lineno}: {newer}")
            problem = header_problem(item)
            if problem is not None:
                raise RecordError(f"{p}:{lineno}: the record's header is malformed: {problem}")
            header = item
        elif kind == RESOLVED:
            if not (isinstance(item.get("at"), int) and isinstance(item.get("by"), str)
                    and isinstance(item.get("note"), str | None)):
                raise RecordError(f"{p}:{lineno}: a 'resolved' line gives 'at' (a time in milliseconds), 'by' "
                                  "(who) and 'note' (text or null)")
            events.resolutions.append(item)
        else:
            if kind == "start" and not events:
                newer = newer_problem(header, item)
                if newer is not None:
                    raise NewerRecord(f"{p}:{lineno}: {newer}")
            events.append(item)
            events.line_numbers.append(lineno)
    return header, events
