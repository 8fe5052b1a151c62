"""Finding the parked local runs whose next timer is due, and saying which timer it is (``flowdsl resume --due``).

Stage: runtime: local (CLI support). Imports stdlib, ``.listing`` and ``.parking`` (whose :func:`timer_said`, what
a timer is in words, is named here too).

A parked run's record ends with its ``runtime_parked`` line, whose ``due_at`` is the earliest timer it has armed
(``.parking``): a timer wait's end, a signal wait's deadline, a retry's backoff, the run's or a sub-flow's timeout.
:func:`due_runs` lists, by :func:`~flowdsl.runtime.listing.list_records` (so exactly as ``flowdsl runs --backend
local --status parked`` lists them), the parked runs of a directory whose ``due_at`` has come; a parked run without
a timer waits for a signal only, and is never due.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowdsl.runtime.listing import RecordRow, Skip, list_records
from flowdsl.runtime.parking import PARKED_STATE, timer_said

__all__ = ["DueRuns", "due_runs", "earliest", "timer_said"]  # (timer_said: .parking's, used with earliest)


@dataclass(frozen=True)
class DueRuns:
    """The parked runs of a directory: ``due``, those whose next timer is due, earliest due first (then by run id);
    ``waiting``, how many others are parked (their next timer is not due yet, or they have none: only a signal goes
    on with them)."""

    due: list[RecordRow]
    waiting: int


def due_runs(directory: Path, now: int, *, on_skip: Skip | None = None) -> DueRuns:
    """The parked runs recorded in ``directory`` whose next timer is due at ``now`` (ms since the epoch) or before
    (:class:`DueRuns`). A file that is not a run record it can read is handed to ``on_skip`` and passed over, as
    :func:`~flowdsl.runtime.listing.list_records` does; ``OSError`` when the directory itself cannot be read."""
    parked = list_records(directory, limit=sys.maxsize, status=PARKED_STATE, on_skip=on_skip)
    timed = [(due_at, row.run_id, row) for row in parked if (due_at := _due_at(row)) is not None and due_at <= now]
    return DueRuns(due=[row for *_, row in sorted(timed, key=lambda item: item[:2])],
                   waiting=len(parked) - len(timed))


def _due_at(row: RecordRow) -> int | None:
    due = (row.parked or {}).get("due_at")
    return due if isinstance(due, int) and not isinstance(due, bool) else None


def earliest(timers: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """Of a resumed run's timers (``schedule_timer`` commands: ``Resumption.timers``), the one due first, or None."""
    return min(timers, key=lambda timer: int(timer["due_at"]), default=None)
