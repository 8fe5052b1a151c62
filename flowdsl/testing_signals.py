"""Flow tests, signals: what a test file sends to its flow's ``wait`` nodes (``signals:``, docs/testing.md),
checked against the flow, and the signals of the ``--what-if`` runs.

Stage: tooling, beside :mod:`flowdsl.testing` (which imports it); imports ``flowdsl.diagnostics``,
``flowdsl.runtime.simulate`` (:class:`Signal`) and stdlib.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from flowdsl.diagnostics import did_you_mean, join, quote
from flowdsl.kernel import key_text
from flowdsl.runtime.simulate import Signal

__all__ = ["can_time_out", "read_signal", "signal_waits", "unknown_signal", "wait_key", "what_if_keyed",
           "what_if_signals"]

#: the field of a keyed wait's plan node holding its key expression's id (docs/plan.md)
KEY_FIELD = "signal_key"
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


def wait_key(node: Mapping[str, Any]) -> str | None:
    """The expression id of a keyed wait's key (its ``key:``), or None for a wait that takes its signal without one
    (and for any other node)."""
    if node.get("kind") != "wait" or node.get("signal") is None:
        return None
    found = node.get(KEY_FIELD)
    return found if isinstance(found, str) else None


def _key_source(plan: Mapping[str, Any], node: Mapping[str, Any]) -> str:
    """The source of a keyed wait's key expression, as written between ``${`` and ``}``."""
    entry = (plan.get("expressions") or {}).get(wait_key(node)) or {}
    return " ".join(str(entry.get("source", "?")).split())


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
    name, or a mapping of ``signal``, ``key``, ``at`` and ``data``), or None after reporting what does not fit the
    flow: FD701, a name no wait takes, a key for a wait that takes its signal without one, or none for a keyed
    wait's; FD702, data that is not a mapping, a key that is none (neither a non-empty string of at most
    ``KEY_LIMIT`` characters nor a whole number)."""
    written: dict[str, Any] = {"signal": item} if isinstance(item, str) else item
    name, written_key = written["signal"], written.get("key")
    at_name = path if isinstance(item, str) else join(path, "signal")
    bad = False
    key = None
    if written_key is not None:  # (a whole number is its decimal text, as a wait's key: 7.0 is 7)
        try:
            key = key_text(written_key, "it is")
        except ValueError as exc:
            report("FD702", f"the key of signal {quote(name)} {exc}", join(path, "key"))
            bad = True
    takes = signal_waits(plan)
    if name not in takes:
        report("FD701", unknown_signal(plan, name), at_name)
        bad = True
    else:
        wait = plan["nodes"][takes[name]]
        if wait_key(wait) is not None and written_key is None:
            report("FD701", f"no wait of the flow takes signal {quote(name)} without a key: wait {quote(wait['key'])} "
                   f"tells its instances apart by key ({_key_source(plan, wait)}); give the signal its 'key'", at_name)
            bad = True
        elif wait_key(wait) is None and written_key is not None:
            report("FD701", f"no wait of the flow takes signal {quote(name)} with a key: wait {quote(wait['key'])} "
                   "takes it without one (only a wait with 'key:' tells its instances apart by key)",
                   join(path, "key"))
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
        return Signal(name, data, at, key)
    except ValueError as exc:  # (data YAML can hold and JSON cannot: a date)
        report("FD702", str(exc), join(path, "data"))
        return None


def what_if_signals(plan: Mapping[str, Any], sent: Sequence[Signal], withheld: Collection[str]) -> tuple[Signal, ...]:
    """The signals of a ``--what-if`` run: those the file sends (``sent``), less those of the waits made to time
    out (``withheld``: wait keys), and, for every other wait that takes its signal without a key and whose signal
    the file does not send, that signal at the run's start with ``{}`` — so that a run with nothing made to fail
    does not wait for ever (a keyed wait's, which needs the key the wait takes as it starts: :func:`what_if_keyed`)."""
    nodes = plan["nodes"]
    kept = {nodes[k]["signal"] for k in withheld}
    given = {s.name for s in sent}
    return (*(s for s in sent if s.name not in kept),
            *(Signal(name) for name, wait in signal_waits(plan).items()
              if name not in given and name not in kept and wait_key(nodes[wait]) is None))


def what_if_keyed(plan: Mapping[str, Any], withheld: Collection[str]) -> frozenset[str]:
    """The signals of the keyed waits of a ``--what-if`` run, less those made to time out (``withheld``: wait keys):
    each instance of such a wait is sent its signal, with its key and ``{}``, as it starts
    (:attr:`~flowdsl.runtime.simulate.Script.keyed_at_start`) — unless the file sends that signal with that key."""
    nodes = plan["nodes"]
    return frozenset(name for name, wait in signal_waits(plan).items()
                     if wait_key(nodes[wait]) is not None and wait not in withheld)
