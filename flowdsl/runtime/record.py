"""Run records: every run's events as JSON lines in ``.flowdsl/runs/<run_id>.jsonl``.

Stage: runtime (shared). Imports stdlib, ``.codec`` and (to check a header)
``.plancheck`` only. The first line of a record is a header
``{"type": "record", "plan": ..., "input": ...}`` so that a recorded run can
be replayed through the kernel and drawn without its spec; every other line is
one event, as the kernel emitted it or as it was fed to it.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from flowdsl.runtime.codec import dumps

DEFAULT_RUNS_DIR = ".flowdsl/runs"
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


class RecordError(ValueError):
    """A run record is missing, unreadable or not JSON lines; the message names the file (and line)."""


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
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RecordError(f"cannot keep run records in '{directory}': {exc.strerror or exc} {_ELSEWHERE}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise RecordError(f"cannot keep run records in '{directory}': it is not writable {_ELSEWHERE}")


class RunRecorder:
    """Writes a run's header and events to its record file, which it creates (it must not exist).

    Lines are buffered until :meth:`flush`; the local runtime flushes after
    every burst of decisions it makes without waiting (so a record is on disk
    whenever the run waits for a worker or a timer) and on :meth:`close`.
    """

    def __init__(self, run_id: str, directory: str | Path | None = None):
        self.path = record_path(run_id, directory)
        check_records_dir(self.path)
        try:  # exclusive: two runs started at once with one run id must not write one record
            self._fh: BinaryIO | None = self.path.open("xb")
        except FileExistsError:
            raise FileExistsError(f"a record of run '{run_id}' already exists: {self.path}") from None
        except OSError as exc:  # a directory os.access called writable (as root), a read-only file system...
            raise RecordWriteError(exc.errno, f"cannot create the run record {self.path}: {exc.strerror or exc}") \
                from None

    def header(self, plan: dict[str, Any], run_input: dict[str, Any], **extra: Any) -> None:
        self.write_many(({"type": "record", "plan": plan, "input": run_input, **extra},))
        self.flush()

    def write_many(self, items: Iterable[dict[str, Any]]) -> None:
        """Buffer lines: a decision's input event and the events it caused."""
        if self._fh is not None:
            self._fh.write(b"".join([encode_line(item) for item in items]))

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


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


def header_problem(header: dict[str, Any]) -> str | None:
    """What is wrong with a record's header line (None when it holds a well-shaped plan and input)."""
    from flowdsl.runtime.plancheck import plan_problem

    if "plan" not in header:
        return "it has no 'plan'"
    problem = plan_problem(header["plan"])
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


def read_record(path: str | Path) -> tuple[dict[str, Any] | None, RecordLines]:
    """The header (or None) and the events of a record file; :class:`RecordError` says what is wrong.

    Lines are split at ``\\n`` alone, as they were written. A last line cut short (a process killed while
    writing it, see :func:`ends_mid_line`) is left out: the record then reads as it was before that line.
    Every other line must be UTF-8 JSON, an object with a ``type``; one header (type ``record``)."""
    p = Path(path)
    try:
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
            problem = header_problem(item)
            if problem is not None:
                raise RecordError(f"{p}:{lineno}: the record's header is malformed: {problem}")
            header = item
        else:
            events.append(item)
            events.line_numbers.append(lineno)
    return header, events
