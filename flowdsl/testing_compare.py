"""Flow tests: how a simulated run is compared with what a case expects (``expect:``, docs/testing.md).

Stage: tooling, beside :mod:`flowdsl.testing` (which imports it); imports
``flowdsl.durations`` (durations as the language writes them), ``flowdsl.runtime.simulate`` and stdlib.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from flowdsl.durations import duration_text
from flowdsl.runtime.simulate import Simulation

__all__ = ["Mismatch", "compare"]


@dataclass(frozen=True)
class Mismatch:
    """One expectation the run did not meet: which (``field``, e.g. ``status`` or ``steps.charge.attempts``),
    what the case expected and what the run did — or, when the run has no value there, ``note`` saying so
    (``no such key``, ``the run never ended``; ``got`` is then None)."""

    field: str
    expected: Any
    got: Any
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        """``{field, expected, got, note}``."""
        return {"field": self.field, "expected": self.expected, "got": self.got, "note": self.note}


def compare(expect: Mapping[str, Any], sim: Simulation) -> Iterator[Mismatch]:
    """Each expectation of ``expect`` (as :class:`FlowCase` holds them) that ``sim`` does not meet."""
    result = sim.result
    status = result.status if sim.ended else "running"  # (running, aborting, compensating: it never ended)
    if "status" in expect and expect["status"] != status:
        yield Mismatch("status", expect["status"], status)
    if "error" in expect:
        got = (result.error or {}).get("type")
        if expect["error"] != got:
            yield Mismatch("error", expect["error"], got)
    if "failed_step" in expect and expect["failed_step"] != result.failed_step:
        yield Mismatch("failed_step", expect["failed_step"], result.failed_step)
    if "ran" in expect:
        ran = list(dict.fromkeys(c.step for c in sim.calls if c.kind in ("task", "llm", "fallback")))
        if expect["ran"] != ran:
            yield Mismatch("ran", expect["ran"], ran)
    if "compensated" in expect and expect["compensated"] != result.compensated:
        yield Mismatch("compensated", expect["compensated"], result.compensated)
    if "intervention" in expect:
        left = [item["step"] for item in (result.intervention or {}).get("steps") or ()]
        if expect["intervention"] != left:
            yield Mismatch("intervention", expect["intervention"], left)
    if "passed_over" in expect:
        passed = [key for key, row in result.steps.items() if row.get("continued")]
        if expect["passed_over"] != passed:
            yield Mismatch("passed_over", expect["passed_over"], passed)
    for key, want in (expect.get("steps") or {}).items():
        yield from _step_mismatches(key, want, result.steps.get(key))
    if "context" in expect:
        yield from _not_within(expect["context"], result.context, "context")
    if "elapsed" in expect:
        yield from _elapsed_mismatch(expect["elapsed"], sim.elapsed_ms)


def _step_mismatches(key: str, want: Any, row: Mapping[str, Any] | None) -> Iterator[Mismatch]:
    want = {"status": want} if isinstance(want, str) else want
    where = f"steps.{key}"
    if row is None:  # a step of a for_each instance that never started, or a node never reached
        row = {"status": "pending", "attempts": 0, "error": None}
    status = row["status"]
    if row.get("kind") == "wait" and status == "running":  # a wait that waits: "waiting", as every report says it
        status = "waiting"  # (and "running", the kernel's word, which this expectation took first)
        if want.get("status") == "running":
            want = {**want, "status": "waiting"}
    if "status" in want and want["status"] != status:
        yield Mismatch(f"{where}.status", want["status"], status)
    if "attempts" in want and want["attempts"] != row["attempts"]:
        yield Mismatch(f"{where}.attempts", want["attempts"], row["attempts"])
    if "error" in want:
        got = (row.get("error") or {}).get("type")
        if want["error"] != got:
            yield Mismatch(f"{where}.error", want["error"], got)
    if "undone" in want:
        got = (row.get("compensation") or {}).get("status") == "done"
        if want["undone"] != got:
            yield Mismatch(f"{where}.undone", want["undone"], got)
    if "key" in want:  # (a keyed wait's, once it started: an integer is its decimal text, as the wait's key is)
        key = want["key"]
        key = str(key) if isinstance(key, int) and not isinstance(key, bool) else key
        if key != row.get("key"):
            yield Mismatch(f"{where}.key", key, row.get("key"))


def _not_within(want: Any, got: Any, where: str) -> Iterator[Mismatch]:
    """Where ``got`` does not hold ``want``: a mapping's keys may be more than the expected ones; a list must have
    the expected items, each held the same way; anything else must be equal (``1`` and ``1.0`` are, ``true`` and
    ``1`` are not)."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            yield Mismatch(where, want, got)
            return
        for key, value in want.items():
            if key not in got:
                yield Mismatch(f"{where}.{key}", value, None, "no such key")
            else:
                yield from _not_within(value, got[key], f"{where}.{key}")
    elif isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            yield Mismatch(where, want, got)
            return
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            yield from _not_within(w, g, f"{where}[{i}]")
    elif want != got or isinstance(want, bool) != isinstance(got, bool):
        yield Mismatch(where, want, got)


def _elapsed_mismatch(bounds: Mapping[str, int | None], elapsed: int | None) -> Iterator[Mismatch]:
    low, high = bounds.get("at_least"), bounds.get("at_most")
    if elapsed is None:
        yield Mismatch("elapsed", _bounds_text(low, high), None, "the run never ended")
    elif (low is not None and elapsed < low) or (high is not None and elapsed > high):
        yield Mismatch("elapsed", _bounds_text(low, high), duration_text(elapsed))


def _bounds_text(low: int | None, high: int | None) -> str:
    if low == high and low is not None:
        return duration_text(low)
    return " and ".join(p for p in (f"at least {duration_text(low)}" if low is not None else "",
                                     f"at most {duration_text(high)}" if high is not None else "") if p)
