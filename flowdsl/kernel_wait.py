"""Kernel, waits: ``wait`` nodes — a signal sent to the run from outside, or a durable timer (rules 9).

Stage: kernel — pure; imports the other ``kernel_*`` modules only; no I/O, no clock. A wait holds no
attempt: while it waits the run state records it under ``state["waits"]`` (instance key -> the signal it
takes and its timer), so an abort finds it without scanning every node. A signal that arrives before its
wait has started is kept under ``state["signals"]`` until the wait takes it (docs/kernel.md, "Waits").
Both keys appear in a state only once used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flowdsl.kernel_core import END_STATES, error
from flowdsl.kernel_program import Json

if TYPE_CHECKING:
    from flowdsl.kernel_core import Core
    from flowdsl.kernel_engine import Machine

#: the rules that brought wait nodes and the ``signal`` input event: a run of a plan with a wait never starts
#: under older ones
WAIT_RULES = 9
#: the error of a signal wait whose ``timeout_ms`` passed before its signal came (never retried)
WAIT_TIMEOUT = "WaitTimeout"


def begin_wait(m: Machine, ikey: str, node: dict[str, Any]) -> None:
    """Wait node instance ``ikey`` (recorded ``running``, its ``when`` held) starts: its timer, or the signal it
    takes — at once when one came before it started."""
    rec = m.nodes[ikey]
    rec["t0"] = m.tick()
    signal = node.get("signal")
    m.emit("step_started", ikey, signal=signal,
           wait_ms=node.get("delay_ms") if signal is None else node.get("timeout_ms"))
    timer = None
    if signal is None:
        timer = m.idempotency_key(ikey) + "@wait"
        m.schedule(timer, node["delay_ms"], "wait", ikey)
    else:
        kept = m.s.get("signals") or {}
        if signal in kept:
            sent = kept.pop(signal)
            _take(m, ikey, signal, sent["payload"], sent["at"], buffered=True)
            return
        if node.get("timeout_ms"):
            timer = m.idempotency_key(ikey) + "@wait"
            m.schedule(timer, node["timeout_ms"], "wait_timeout", ikey)
    m.s.setdefault("waits", {})[ikey] = {"signal": signal, "timer": timer}


def receive(m: Machine, event: dict[str, Any]) -> None:
    """A ``signal`` input event: taken by its wait if it waits, kept if the wait has not started, else refused
    (``signal_rejected``, with the reason)."""
    name = event.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("event 'signal' needs a 'name': a non-empty string")
    payload = event.get("payload")
    if payload is None:
        payload = {}
    elif not isinstance(payload, dict):
        raise ValueError(f"event 'signal': 'payload' must be a JSON object (or null), found {type(payload).__name__}")
    status = m.s["status"]
    key = m.p.signals.get(name)
    if status != "running":
        ended = "has ended" if status in END_STATES else "is being stopped"
        _reject(m, name, f"the run {ended} ({status}): it waits for nothing more")
        return
    if key is None:
        known = ", ".join(f"'{s}'" for s in sorted(m.p.signals)) or "none"
        _reject(m, name, f"no wait of flow '{m.p.flow.get('name')}' takes signal '{name}' (its signals: {known})")
        return
    waits = m.s.get("waits") or {}
    if key in waits:  # (a signal wait is never in a for_each body: its instance key is its plan key)
        _take(m, key, name, payload, m.at, buffered=False)
        return
    rec = m.nodes.get(key)
    kept = m.s.get("signals") or {}
    if rec is None and name not in kept:
        m.s.setdefault("signals", {})[name] = {"payload": payload, "at": m.at}
        m.emit("signal_buffered", None, signal=name, wait=key)
        return
    if rec is None:
        why = f"signal '{name}' was already received: it is kept until wait '{key}' starts"
    elif rec["status"] == "succeeded":
        why = f"wait '{key}' has already received signal '{name}'"
    elif rec["status"] == "failed":
        why = f"wait '{key}' has failed ({(rec['error'] or {}).get('type')}): it takes no signal any more"
    else:
        why = f"wait '{key}' is {rec['status']}: it takes no signal"
    _reject(m, name, why)


def wait_timer_fired(m: Machine, ikey: str, purpose: str) -> None:
    """A wait's timer is due: a timer wait ends (it succeeds with ``{}``), a signal wait's deadline passed (it
    fails for good with :data:`WAIT_TIMEOUT`)."""
    waits = m.s.get("waits") or {}
    if m.s["status"] != "running" or ikey not in waits:
        return
    if purpose == "wait":
        _succeed(m, ikey, {})
        return
    del waits[ikey]
    node = m.p.nodes[m.nodes[ikey]["node"]]
    m._node_failed(ikey, error(WAIT_TIMEOUT, f"no signal '{node['signal']}' came within {node['timeout_ms']} ms"))


def cancel_waits(m: Core) -> None:
    """The run is aborted: every wait still waiting is cancelled at once (it holds no attempt; its timer is
    cancelled)."""
    waits = m.s.get("waits")
    if not waits:
        return
    for ikey, entry in list(waits.items()):
        m.cancel_timer(entry["timer"])
        rec = m.nodes[ikey]
        rec.update(status="cancelled", finished_at=m.at)
        what = f"for signal '{entry['signal']}'" if entry["signal"] is not None else "for its timer"
        m.emit("step_cancelled", ikey, reason=f"the run was aborted while the wait waited {what}")
    waits.clear()


def _take(m: Machine, ikey: str, name: str, payload: dict[str, Json], sent_at: Any, *, buffered: bool) -> None:
    m.emit("signal_received", ikey, signal=name, buffered=buffered, sent_at=sent_at)
    _succeed(m, ikey, payload)


def _succeed(m: Machine, ikey: str, result: dict[str, Json]) -> None:
    """Wait ``ikey`` is over with ``result`` (the signal's payload; ``{}`` for a timer): its output rule applies."""
    entry = (m.s.get("waits") or {}).pop(ikey, None)
    if entry is not None:
        m.cancel_timer(entry["timer"])
    m._atom_succeeded(ikey, result)


def _reject(m: Machine, name: str, reason: str) -> None:
    m.emit("signal_rejected", None, signal=name, reason=reason)
