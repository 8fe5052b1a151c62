"""Durations shown in the language's own notation (``250ms``, ``1.5s``, ``2m``, ``1h30m``), as ``for:``,
``timeout:`` and retry delays are written.

Stage: shared by every stage that shows a duration (the diagrams, the run summaries and timelines, flow tests);
imports nothing of flowdsl. (Reading a written duration is the model's: ``flowdsl.model.parse_duration``.)
"""

from __future__ import annotations

__all__ = ["duration_text"]


def duration_text(ms: float | None) -> str:
    """``ms`` milliseconds (whole milliseconds are shown) in the language's notation: ``250ms``, ``1.5s``, ``2m``,
    ``1m30.5s``, ``26h0.6s`` — each part a whole number but the last, as a spec writes it; ``-`` for None."""
    if ms is None:
        return "-"
    ms = int(ms)
    if ms < 1000:
        return f"{ms}ms"
    if ms % 1000 and ms < 60_000:
        return f"{ms / 1000:g}s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:g}s" if rest else ""
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + secs
