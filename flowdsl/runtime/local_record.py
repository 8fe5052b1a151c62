"""The local run's record: created whole before anything runs, written as it goes, and given up when it fails.

Stage: runtime: local. Imports ``.record`` (the run recorder), ``flowdsl.runtime.execute`` (an error's words) and
stdlib. :class:`Recording` is mixed into :class:`~flowdsl.runtime.local.LocalRun` (whose attributes it uses),
whose feeding loop writes each decision's lines and flushes them after a burst (``LocalRun._absorb``,
``LocalRun._drain``): here the record is opened (:meth:`Recording._open_record`), discarded when the run never
began, a line written outside a decision (:meth:`Recording._write`), and a write that fails handled: the record is
closed and the run goes on unrecorded (:meth:`Recording._record_failed`; a :data:`NOTICED` warning on the
``flowdsl.local`` logger).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowdsl.runtime.execute import error_message
from flowdsl.runtime.record import RECORD_FAILED, RecordError, RecordWriteError, RunRecorder

__all__ = ["NOTICED", "Recording"]

_log = logging.getLogger("flowdsl.local")
#: the attribute of a warning on :data:`_log` that ``on_notice`` was told too (true), so that a program that shows
#: both — ``flowdsl run``'s progress — can say it once
NOTICED = "flowdsl_noticed"


class Recording:
    """The run record (see the module doc); a mixin of ``LocalRun``."""

    # what the run provides
    plan: dict[str, Any]
    run_input: dict[str, Any]
    run_id: str
    runs_dir: str | Path | None
    spec_path: str | None
    lm: object | str | None
    record_path: Path | None
    record_error: str | None
    on_notice: Callable[[str], None] | None
    state: dict[str, Any]
    _recorder: RunRecorder | None
    _wall0: float
    _now: Callable[[], int]
    _notice: Callable[[str], None]

    def _open_record(self, start: dict[str, Any]) -> None:
        """Create the record with its header and the ``start`` line, on disk before anything runs: written under a
        temporary name, then put in place whole (``RunRecorder.publish``), so that no listing finds it empty or
        with its header alone, and a stop signal meanwhile leaves nothing behind."""
        try:
            recorder = self._recorder = RunRecorder(self.run_id, self.runs_dir)
        except (RecordWriteError, RecordError) as exc:  # (a FileExistsError passes: another run took the id)
            code = getattr(exc, "errno", None)
            hint = (f" (each recorded run in progress holds a file descriptor, its record: raise the limit on open "
                    f"files — `ulimit -n`, now {_open_files_limit()} —, or run with record=False)"
                    if code in (errno.EMFILE, errno.ENFILE) else "")
            raise RecordWriteError(code, f"{exc}; the run did not start{hint}") from None
        try:
            spec = {"spec": self.spec_path} if self.spec_path is not None else {}
            if isinstance(self.lm, str):  # (a model's name: `flowdsl resume` goes on with it)
                spec["lm"] = self.lm
            recorder.header(self.plan, self.run_input, run_id=self.run_id, runtime="local",
                            started_at=int(self._wall0), **spec)
            recorder.write_many((start,))
            recorder.flush()
            recorder.publish()
        except BaseException as exc:  # nothing has run (a full disk, the id taken meanwhile, a stop signal): no
            self._discard_record()  # record is left behind
            if isinstance(exc, OSError) and not isinstance(exc, FileExistsError | RecordWriteError):
                raise RecordWriteError(exc.errno, f"cannot write the run record {recorder.path}: "
                                       f"{exc.strerror or exc}; the run did not start") from exc
            if isinstance(exc, RecordWriteError):
                raise RecordWriteError(exc.errno, f"{exc}; the run did not start") from None
            raise

    def _discard_record(self) -> None:
        """Remove the record of a run that never began (nothing ran: its record would only mislead)."""
        recorder, self._recorder = self._recorder, None
        if recorder is not None:
            recorder.discard()

    def _record_failed(self, exc: Exception) -> None:
        """A record write failed (a full disk, a file size limit, a line that could not be encoded): close the
        record and go on without it.

        The run must not stop half-way — its state has moved on, and the commands of that decision (a
        compensation among them) must still be carried out — so it goes on unrecorded, and says so."""
        recorder, self._recorder = self._recorder, None
        why = (exc.strerror or str(exc)) if isinstance(exc, OSError) else f"{type(exc).__name__}: {error_message(exc)}"
        if recorder is not None:  # back to its last whole line, ended by a line saying why when that fits
            recorder.stop({"type": RECORD_FAILED, "run_id": self.run_id, "at": self._now(),
                           "status": self.state.get("status") if self.state else None, "reason": why})
        self.record_error = f"writing the record failed ({why}); it stops there and the run went on unrecorded"
        _log.warning("run %s: %s: %s", self.run_id, self.record_path, self.record_error,
                     extra={NOTICED: self.on_notice is not None})
        self._notice(f"the run record {self.record_path} cannot be written ({why}): the run goes on unrecorded")

    def _write(self, item: dict[str, Any]) -> None:
        if self._recorder is not None:
            try:
                self._recorder.write_many((item,))
                self._recorder.flush()
            except Exception as exc:  # not only OSError: a line the encoder refuses must not stop the run either
                self._record_failed(exc)


def _open_files_limit() -> str:
    """This process's limit on open files (``ulimit -n``), as said in an error."""
    try:
        import resource

        return str(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    except (ImportError, OSError, ValueError):
        return "unknown"
