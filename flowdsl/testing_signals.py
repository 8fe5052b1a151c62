"""Flow tests, signals: what a test file sends to its flow's ``wait`` nodes (``signals:``, docs/testing.md),
checked against the flow, and the signals of the ``--what-if`` runs.

Stage: tooling, beside :mod:`flowdsl.testing` (which imports it); imports ``flowdsl.diagnostics``,
``flowdsl.runtime.simulate`` (:class:`Signal`) and stdlib.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from flowdsl.diagnostics import did_you_mean, join, quote
from flowdsl.runtime.simulate import Signal

__all__ = ["can_time_out", "read_signal", "signal_waits", "unknown_signal", "what_if_signals"]

#: ``report(code, message, path)``: a diagnostic at ``path`` of the test file
Report = Callable[[str, str, str], None]
#: ``duration(value, path)``: milliseconds (0 allowed), or None after an error
Duration = Callable[[Any, str], int | None]


def signal_waits(plan: Mapping[str, Any]) -> dict[str, str]:
    """Signal name -> the key of the wait of ``plan`` that takes it, in plan order (timer waits take none)."""
    nodes = plan["nodes"]
    waits = sorted((k for k, n in nodes.items() if n["kind"] == "wait" and n.get("signal") is not None),
                   key=lambda k: nodes[k]["order"])
    return {nodes[k]["signal"]: k for k in waits}


def can_time_out(node: Mapping[str, Any]) -> bool:
    """Whether wait ``node`` can fail: a signal wait with a ``timeout`` (a timer wait, or a signal wait without
    one, never fails)."""
    return node["kind"] == "wait" and node.get("signal") is not None and node.get("timeout_ms") is not None


def unknown_signal(plan: Mapping[str, Any], name: str) -> str:
    """Why no wait of ``plan`` takes signal ``name``: the FD701 message, with the closest name."""
    takes = signal_waits(plan)
    said = f"no wait of the flow takes signal {quote(name)}"
    if not takes:
        return f"{said}: the flow waits for no signal"
    node = plan["nodes"].get(name)
    if node is not None and node["kind"] == "wait":  # the wait's id, where its signal has a name of its own
        hint = f" (wait {quote(name)} takes signal {quote(node['signal'])})" if node.get("signal") is not None \
            else f" ({quote(name)} is a timer wait: it takes no signal)"
    else:
        hint = did_you_mean(name, takes)
    return f"{said}{hint}; its signals: {', '.join(takes)}"


def read_signal(item: Any, path: str, plan: Mapping[str, Any], report: Report,
                duration: Duration) -> Signal | None:
    """The :class:`Signal` an entry of ``signals:`` sends (its shape checked by the schema already: a signal's
    name, or a mapping of ``signal``, ``at`` and ``data``), or None after reporting what does not fit the flow:
    FD701, a name no wait takes; FD702, data that is not a mapping."""
    written: dict[str, Any] = {"signal": item} if isinstance(item, str) else item
    name = written["signal"]
    bad = False
    if name not in signal_waits(plan):
        report("FD701", unknown_signal(plan, name), path if isinstance(item, str) else join(path, "signal"))
        bad = True
    data = written.get("data")
    if data is not None and not isinstance(data, dict):
        found = {list: "a list", str: "a string", bool: "a boolean"}.get(type(data), "a number")
        report("FD702", f"the data of signal {quote(name)} is its wait's result: a mapping (a JSON object), not "
              f"{found}", join(path, "data"))
        bad = True
    at = duration(written["at"], join(path, "at")) if "at" in written else 0
    if at is None or bad:
        return None
    try:
        return Signal(name, data, at)
    except ValueError as exc:  # (data YAML can hold and JSON cannot: a date)
        report("FD702", str(exc), join(path, "data"))
        return None


def what_if_signals(plan: Mapping[str, Any], sent: Sequence[Signal], withheld: Collection[str]) -> tuple[Signal, ...]:
    """The signals of a ``--what-if`` run: those the file sends (``sent``), less those of the waits made to time
    out (``withheld``: wait keys), and, for every other wait whose signal the file does not send, that signal at
    the run's start with ``{}`` — so that a run with nothing made to fail does not wait for ever."""
    nodes = plan["nodes"]
    kept = {nodes[k]["signal"] for k in withheld}
    given = {s.name for s in sent}
    return (*(s for s in sent if s.name not in kept),
            *(Signal(name) for name in signal_waits(plan) if name not in given and name not in kept))
