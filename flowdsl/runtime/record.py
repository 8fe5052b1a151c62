"""Run records: every run's events as JSON lines in ``.flowdsl/runs/<run_id>.jsonl``.

Stage: runtime (shared). Imports stdlib, ``.codec`` and (to check a header)
``.plancheck`` only. The first line of a record is a header
``{"type": "record", "plan": ..., "input": ...}`` so that a recorded run can
be replayed through the kernel and drawn without its spec; every other line is
one event, as the kernel emitted it or as it was fed to it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from flowdsl.runtime.codec import dumps

DEFAULT_RUNS_DIR = ".flowdsl/runs"
_RUN_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}\Z")


def runs_dir(explicit: str | None = None) -> Path:
    """The directory of run records: ``explicit``, else ``$FLOWDSL_RUNS_DIR``, else ``.flowdsl/runs``."""
    return Path(explicit or os.environ.get("FLOWDSL_RUNS_DIR") or DEFAULT_RUNS_DIR)


def check_run_id(run_id: str) -> str:
    """Return ``run_id``, or raise ``ValueError`` saying what a run id must be (1-128 of ``A-Za-z0-9_.:-``)."""
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        raise ValueError(f"invalid run id '{run_id}': use 1-128 letters, digits and _ . : -")
    return run_id


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
    """One record line: compact JSON with sorted keys (so records diff well) and a newline."""
    return dumps(item, sort_keys=True, default=str) + b"\n"


class RecordError(ValueError):
    """A run record is missing, unreadable or not JSON lines; the message names the file (and line)."""


def check_records_dir(path: Path) -> None:
    """Create the directory of the record ``path`` if needed; a ``RecordError`` saying why when records
    cannot be written there (checked before a run starts, so that no step runs unrecorded)."""
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RecordError(f"cannot keep run records in '{directory}': {exc.strerror or exc} "
                          "(choose another --runs-dir, or --no-record)") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise RecordError(f"cannot keep run records in '{directory}': it is not writable "
                          "(choose another --runs-dir, or --no-record)")


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

    Raises :class:`RecordError` naming the file looked for when there is none.
    """
    given = Path(run)
    if run.endswith(".jsonl") and given.is_file():
        return given
    try:
        path = record_path(run, directory)
    except ValueError as exc:
        raise RecordError(str(exc)) from None
    if not path.is_file():
        raise RecordError(f"no recorded run '{run}': {path} does not exist (see --runs-dir)")
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
    """Whether a record file's last line is incomplete (its process stopped while writing it)."""
    with open(path, "rb") as fh:
        if fh.seek(0, os.SEEK_END) == 0:
            return False
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) != b"\n"


def read_record(path: str | Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The header (or None) and the events of a record file; :class:`RecordError` says what is wrong.

    A last line cut short (a process killed while writing it, see :func:`ends_mid_line`) is left out: the
    record then reads as it was before that line."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise RecordError(f"no run record at {p}") from None
    except OSError as exc:
        raise RecordError(f"cannot read run record {p}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = raw[: exc.start].count(b"\n") + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise RecordError(f"{p}:{bad_line}:{col}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                          "a run record is JSON lines in UTF-8") from None
    header: dict[str, Any] | None = None
    events: list[dict[str, Any]] = []
    lines = text.splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            if lineno == len(lines) and not text.endswith("\n"):
                break  # the last line was cut short (its process stopped while writing it): the record ends before
            raise RecordError(f"{p}:{lineno}: not a JSON line: {exc.msg}") from None
        if not isinstance(item, dict):
            raise RecordError(f"{p}:{lineno}: expected a JSON object, found {type(item).__name__}")
        if item.get("type") == "record" and header is None:
            problem = header_problem(item)
            if problem is not None:
                raise RecordError(f"{p}:{lineno}: the record's header is malformed: {problem}")
            header = item
        else:
            events.append(item)
    return header, events
