"""Kernel, waits: ``wait`` nodes — a signal sent to the run from outside, or a durable timer (rules 9); keyed
waits, one signal per instance told apart by a key (rules 10).

Stage: kernel — pure; imports ``flowdsl.expr`` and the other ``kernel_*`` modules only; no I/O, no clock. A wait
holds no attempt: while it waits the run state records it under ``state["waits"]`` (instance key -> the signal
it takes, its timer and, keyed, its key), so an abort finds it without scanning every node. A signal that arrives
before its wait has started is kept under ``state["signals"]`` until the wait takes it (docs/kernel.md, "Waits").
A keyed wait (``key:``, an expression evaluated as it starts: in a for_each body, which item a signal is for)
records the key it took under ``state["keys"]`` (signal -> key -> instance), and a keyed signal that comes before
the instance of its key has started is kept under ``state["kept"]`` (signal -> key -> the signal). Each of these
keys appears in a state only once used.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from flowdsl.expr import ExpressionError
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
#: the rules that brought keyed waits (a ``key`` on a signal wait, one in a for_each body): a run of a plan with one
#: never starts under older ones
KEY_RULES = 10
#: the error of a keyed wait whose key expression gave neither a non-empty string nor an integer
WAIT_KEY_INVALID = "WaitKeyInvalid"
#: the error of a keyed wait whose key another instance of the same wait took first
WAIT_KEY_TAKEN = "WaitKeyTaken"
#: how many signals of one name are kept for keys no instance has taken yet: more are rejected
KEPT_MAX = 10_000
#: the longest key, in characters: a longer one a wait evaluates fails it (no signal could be sent with it), one a
#: signal names is refused
KEY_LIMIT = 200


def begin_wait(m: Machine, ikey: str, node: dict[str, Any]) -> None:
    """Wait node instance ``ikey`` (recorded ``running``, its ``when`` held) starts: its timer, or the signal it
    takes — at once when one came before it started. A keyed wait first evaluates its key: it fails for good when
    the key is not one (:data:`WAIT_KEY_INVALID`, or ``ExpressionError``) or another instance took it
    (:data:`WAIT_KEY_TAKEN`)."""
    rec = m.nodes[ikey]
    rec["t0"] = m.tick()
    signal = node.get("signal")
    wait_ms = node.get("delay_ms") if signal is None else node.get("timeout_ms")
    if node.get("signal_key") is None:
        m.emit("step_started", ikey, signal=signal, wait_ms=wait_ms)
    else:
        _begin_keyed(m, ikey, node, signal, wait_ms)
        return
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
        timer = _deadline(m, ikey, node)
    m.s.setdefault("waits", {})[ikey] = {"signal": signal, "timer": timer}


def _begin_keyed(m: Machine, ikey: str, node: dict[str, Any], signal: Any, wait_ms: int | None) -> None:
    """Keyed wait instance ``ikey`` starts: its key, then the signal kept for it or its wait."""
    failure = key = None
    try:
        key = key_text(m.evaluate(ikey, node["signal_key"], m.context(ikey), where="key"))
    except ExpressionError as exc:
        failure = error("ExpressionError", exc.message)
    except ValueError as exc:
        failure = error(WAIT_KEY_INVALID, f"the key of wait '{ikey}' {exc}")
    if key is None:
        m.emit("step_started", ikey, signal=signal, wait_ms=wait_ms)
        m._node_failed(ikey, failure or error(WAIT_KEY_INVALID, f"wait '{ikey}' has no key"))
        return
    m.emit("step_started", ikey, signal=signal, wait_ms=wait_ms, key=key)
    m.nodes[ikey]["key"] = key
    taken = m.s.setdefault("keys", {}).setdefault(signal, {})
    other = taken.get(key)
    if other is not None:
        m._node_failed(ikey, error(WAIT_KEY_TAKEN, f"key '{key}' of signal '{signal}' is taken by wait '{other}'"))
        return
    taken[key] = ikey
    kept = (m.s.get("kept") or {}).get(signal) or {}
    if key in kept:
        sent = kept.pop(key)
        _take(m, ikey, signal, sent["payload"], sent["at"], buffered=True, key=key)
        return
    m.s.setdefault("waits", {})[ikey] = {"signal": signal, "timer": _deadline(m, ikey, node), "key": key}


def key_text(value: Json, gave: str = "its expression gave") -> str:
    """A keyed wait's key as its expression gave it: a non-empty string of at most :data:`KEY_LIMIT` characters as
    it is, a whole number as its decimal text (so ``42``, ``42.0`` and ``"42"`` are one key); ValueError saying
    what it got otherwise (``gave``: how the message says where it came from)."""
    if isinstance(value, float) and value.is_integer():  # (JSON has one number type: 42.0 is 42)
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and value:
        if len(value) > KEY_LIMIT:
            raise ValueError(f"must have at most {KEY_LIMIT} characters (the longest key a signal is sent with); "
                             f"{gave} a string of {len(value)}: {value[:40]!r}...")
        return value
    text = json.dumps(value, ensure_ascii=False, default=str)
    what = "an empty string" if value == "" else "null" if value is None else \
        f"{_JSON_TYPES.get(type(value), type(value).__name__)} {text if len(text) <= 80 else text[:77] + '...'}"
    raise ValueError(f"must be a non-empty string or a whole number; {gave} {what}")


#: how an error names what a key expression gave instead of a key
_JSON_TYPES = {type(None): "null", bool: "a boolean", float: "a number", list: "an array", dict: "an object"}


def _deadline(m: Machine, ikey: str, node: dict[str, Any]) -> str | None:
    """Arm a signal wait's deadline (its ``timeout_ms``), when it has one: the timer's id."""
    if not node.get("timeout_ms"):
        return None
    timer = m.idempotency_key(ikey) + "@wait"
    m.schedule(timer, node["timeout_ms"], "wait_timeout", ikey)
    return timer


def receive(m: Machine, event: dict[str, Any]) -> None:
    """A ``signal`` input event: taken by its wait if it waits, kept if the wait has not started, else refused
    (``signal_rejected``, with the reason). A keyed wait's signal names its ``key``: the instance that took that key
    takes it (:func:`_receive_keyed`)."""
    name = event.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("event 'signal' needs a 'name': a non-empty string")
    sent_key = event.get("key")
    if sent_key is not None and (not isinstance(sent_key, str) or not sent_key or len(sent_key) > KEY_LIMIT):
        raise ValueError(f"event 'signal': 'key' must be a non-empty string of at most {KEY_LIMIT} characters (or "
                         "absent, or null)")
    payload = event.get("payload")
    if payload is None:
        payload = {}
    elif not isinstance(payload, dict):
        raise ValueError(f"event 'signal': 'payload' must be a JSON object (or null), found {type(payload).__name__}")
    status = m.s["status"]
    key = m.p.signals.get(name)
    if status != "running":
        ended = "has ended" if status in END_STATES else "is being stopped"
        _reject(m, name, f"the run {ended} ({status}): it waits for nothing more", sent_key)
        return
    if key is None:
        known = ", ".join(f"'{s}'" for s in sorted(m.p.signals)) or "none"
        _reject(m, name, f"no wait of flow '{m.p.flow.get('name')}' takes signal '{name}' (its signals: {known})",
                sent_key)
        return
    if (name in m.p.keyed) != (sent_key is not None):
        _reject(m, name, f"wait '{key}' tells its instances apart by key: signal '{name}' needs a key"
                if sent_key is None else f"wait '{key}' takes signal '{name}' without a key", sent_key)
        return
    if sent_key is not None:
        _receive_keyed(m, name, sent_key, payload, key)
        return
    waits = m.s.get("waits") or {}
    if key in waits:  # (an unkeyed signal wait is never in a for_each body: its instance key is its plan key)
        _take(m, key, name, payload, m.at, buffered=False)
        return
    rec = m.nodes.get(key)
    kept = m.s.get("signals") or {}
    if rec is None and name not in kept:
        m.s.setdefault("signals", {})[name] = {"payload": payload, "at": m.at}
        m.emit("signal_buffered", None, signal=name, wait=key)
        return
    _reject(m, name, f"signal '{name}' was already received: it is kept until wait '{key}' starts" if rec is None
            else _over(key, name, rec))


def _receive_keyed(m: Machine, name: str, sent_key: str, payload: dict[str, Json], node_key: str) -> None:
    """A keyed signal: taken by the instance that took its key if it waits; kept while no instance has taken it (at
    most :data:`KEPT_MAX` of one name); refused when that instance is over, or one is kept for the key already."""
    ikey = ((m.s.get("keys") or {}).get(name) or {}).get(sent_key)
    if ikey is not None and ikey in (m.s.get("waits") or {}):
        _take(m, ikey, name, payload, m.at, buffered=False, key=sent_key)
        return
    if ikey is not None:
        _reject(m, name, _over(ikey, name, m.nodes[ikey]), sent_key)
        return
    kept = (m.s.get("kept") or {}).get(name) or {}
    if sent_key in kept:
        why = f"signal '{name}' key '{sent_key}' was already received: it is kept until the wait with that key starts"
    elif len(kept) >= KEPT_MAX:
        why = f"too many signals '{name}' are kept for keys no wait has taken yet ({KEPT_MAX})"
    else:
        m.s.setdefault("kept", {}).setdefault(name, {})[sent_key] = {"payload": payload, "at": m.at}
        m.emit("signal_buffered", None, signal=name, wait=node_key, key=sent_key)
        return
    _reject(m, name, why, sent_key)


def _over(ikey: str, name: str, rec: dict[str, Any]) -> str:
    """Why wait instance ``ikey``, started and no longer waiting, refuses signal ``name``."""
    if rec["status"] == "succeeded":
        return f"wait '{ikey}' has already received signal '{name}'"
    if rec["status"] == "failed":
        return f"wait '{ikey}' has failed ({(rec['error'] or {}).get('type')}): it takes no signal any more"
    return f"wait '{ikey}' is {rec['status']}: it takes no signal"


def wait_timer_fired(m: Machine, ikey: str, purpose: str) -> None:
    """A wait's timer is due: a timer wait ends (it succeeds with ``{}``), a signal wait's deadline passed (it
    fails for good with :data:`WAIT_TIMEOUT`)."""
    waits = m.s.get("waits") or {}
    if m.s["status"] != "running" or ikey not in waits:
        return
    if purpose == "wait":
        _succeed(m, ikey, {})
        return
    entry = waits.pop(ikey)
    node = m.p.nodes[m.nodes[ikey]["node"]]
    m._node_failed(ikey, error(WAIT_TIMEOUT, f"no {_signal_said(entry)} came within {node['timeout_ms']} ms"))


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
        what = f"for {_signal_said(entry)}" if entry["signal"] is not None else "for its timer"
        m.emit("step_cancelled", ikey, reason=f"the run was aborted while the wait waited {what}")
    waits.clear()


def _signal_said(entry: dict[str, Any]) -> str:
    """The signal a waiting wait's ``state["waits"]`` entry takes, in words: ``signal 'paid'`` (``… key '1Z9'``)."""
    return f"signal '{entry['signal']}'" + (f" key '{entry['key']}'" if entry.get("key") is not None else "")


def _take(m: Machine, ikey: str, name: str, payload: dict[str, Json], sent_at: Any, *, buffered: bool,
          key: str | None = None) -> None:
    if key is None:
        m.emit("signal_received", ikey, signal=name, buffered=buffered, sent_at=sent_at)
    else:
        m.emit("signal_received", ikey, signal=name, buffered=buffered, sent_at=sent_at, key=key)
    _succeed(m, ikey, payload)


def _succeed(m: Machine, ikey: str, result: dict[str, Json]) -> None:
    """Wait ``ikey`` is over with ``result`` (the signal's payload; ``{}`` for a timer): its output rule applies."""
    entry = (m.s.get("waits") or {}).pop(ikey, None)
    if entry is not None:
        m.cancel_timer(entry["timer"])
    m._atom_succeeded(ikey, result)


def _reject(m: Machine, name: str, reason: str, key: str | None = None) -> None:
    if key is None:
        m.emit("signal_rejected", None, signal=name, reason=reason)
    else:
        m.emit("signal_rejected", None, signal=name, reason=reason, key=key)
