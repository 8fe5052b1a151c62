"""A signal to send to a run, checked against the run's plan before anything reaches the run: its name, its
payload and its key.

Stage: runtime (shared by every backend and the CLI: ``LocalRun.signal`` and ``signals=``, ``flowdsl run/resume
--signal``, the Redis client's ``signal()``). Imports the kernel's ``prepare`` (a plan's keyed signals),
``.execute`` (a payload's plain JSON copy), ``.inputs`` (:class:`~flowdsl.runtime.inputs.InputError`), ``.parking``
(how a signal is named) and ``flowdsl.shown``.

- :func:`check_signal` — a name a wait of the plan takes, a payload that is a JSON object or None, the key its wait
  needs or none (:func:`check_key`);
- :func:`check_signals` — the ``signals=`` of a run, each checked, none given twice;
- :func:`signal_names`, :func:`keyed_signals` — the signals a plan's waits take, and those whose wait is keyed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flowdsl.kernel import KEY_LIMIT, prepare
from flowdsl.runtime.execute import NotJSON, plain_json, text_problem
from flowdsl.runtime.inputs import InputError
from flowdsl.runtime.parking import signal_named
from flowdsl.shown import visible

__all__ = ["KEY_LIMIT", "Checked", "Payload", "Signals", "check_key", "check_signal", "check_signals",
           "keyed_signals", "signal_names"]


#: what ``signals=`` takes: a mapping name -> payload (unkeyed signals), or names, (name, payload) pairs and
#: (name, payload, key) triples
#: a signal's payload as given: a JSON object, or None for ``{}``
Payload = Mapping[str, Any] | None
Signals = Mapping[str, Payload] | Iterable[str | tuple[str, Payload] | tuple[str, Payload, str | int | None]]
#: a signal checked (:func:`check_signal`): its name, its payload (None for ``{}``) and its key (None: unkeyed)
Checked = tuple[str, dict[str, Any] | None, str | None]


def signal_names(plan: Mapping[str, Any]) -> dict[str, str]:
    """The signals the plan's waits take: name -> the key of the wait node taking it (at most one each)."""
    return {str(node["signal"]): key for key, node in (plan.get("nodes") or {}).items()
            if isinstance(node, Mapping) and node.get("kind") == "wait" and node.get("signal") is not None}


def keyed_signals(plan: Mapping[str, Any]) -> frozenset[str]:
    """The signals of ``plan`` whose wait is keyed (its ``key:`` tells its instances apart): the kernel's
    ``Program.keyed``."""
    return prepare(plan).keyed  # type: ignore[arg-type]  # (a plan is a dict; prepare caches it by identity)


def check_signal(plan: Mapping[str, Any], name: Any, payload: Any, names: Mapping[str, str] | None = None, *,
                 key: Any = None) -> Checked:
    """``(name, a plain copy of payload, key)`` for a signal to send to a run of ``plan`` (``names``: its
    :func:`signal_names`, when known; ``key``: as :func:`check_key` gives it). Raises ``TypeError`` for a name
    that is not a string, a payload that is neither a mapping nor None or a key of another type than
    :func:`check_key` takes, :class:`~flowdsl.runtime.inputs.InputError` (a ``ValueError``) for a payload that is
    not JSON, and ``ValueError`` for a name no wait of the plan takes (naming those it has) or a key that wait does
    not take (:func:`check_key`)."""
    if not isinstance(name, str):
        raise TypeError(f"a signal's name must be a string; got {type(name).__name__}")
    names = signal_names(plan) if names is None else names
    if name not in names:
        flow = visible(str((plan.get("flow") or {}).get("name")))
        known = ", ".join(f"'{visible(n)}'" for n in sorted(names))
        raise ValueError(f"no wait of flow '{flow}' takes signal '{visible(name)}': "
                         + (f"its signals are {known}" if known else "the flow waits for no signal"))
    key = check_key(plan, name, key, names)
    if payload is None:
        return name, None, key
    if not isinstance(payload, Mapping):
        raise TypeError(f"the payload of signal '{visible(name)}' must be a JSON object (a dict) or None; got "
                        f"{type(payload).__name__}")
    try:  # the run's own copy, as for the run input: what the caller keeps is not shared with the run
        return name, plain_json(dict(payload)), key
    except NotJSON as exc:
        raise InputError(f"the payload of signal '{visible(name)}' is not a JSON object: {exc}") from None


def check_key(plan: Mapping[str, Any], name: str, key: Any, names: Mapping[str, str] | None = None) -> str | None:
    """The key signal ``name`` (one a wait of ``plan`` takes; ``names``: its :func:`signal_names`, when known) is
    sent with: None for the signal of a wait without ``key:`` — which takes none: ``ValueError`` for one —, the
    key's text for the signal of a keyed wait — which needs one: ``ValueError`` for None. A key is a non-empty
    string of valid Unicode of at most ``KEY_LIMIT`` characters (the kernel's: ``ValueError`` else) or a whole number,
    taken as its decimal text (``42``, ``42.0`` and ``"42"`` are the same key, as for the key a wait evaluates); any
    other type is a ``TypeError``."""
    names = signal_names(plan) if names is None else names
    wait = names[name]
    said = f"wait '{visible(wait)}'"
    if name not in keyed_signals(plan):
        if key is None:
            return None
        raise ValueError(f"{said} takes signal '{visible(name)}' without a key (it has no 'key:'): send it with "
                         "none")
    if key is None:
        raise ValueError(f"{said} tells its instances apart by key: signal '{visible(name)}' needs a key (the "
                         "value of its 'key:' for the instance it is for)")
    if isinstance(key, float) and key.is_integer():
        key = int(key)
    if isinstance(key, bool) or not isinstance(key, str | int):
        raise TypeError(f"the key of signal '{visible(name)}' must be a string (or a whole number, taken as its "
                        f"decimal text); got {type(key).__name__}")
    if isinstance(key, int) and key.bit_length() > 4 * KEY_LIMIT:  # (its text would be too long: never made)
        raise ValueError(f"the key of signal '{visible(name)}' is an integer of more than {KEY_LIMIT} digits: a key "
                         f"has at most {KEY_LIMIT} characters")
    text = str(key)
    if not text:
        raise ValueError(f"the key of signal '{visible(name)}' is empty: a key is a non-empty string")
    if len(text) > KEY_LIMIT:
        raise ValueError(f"the key of signal '{visible(name)}' has {len(text)} characters: a key has at most "
                         f"{KEY_LIMIT}")
    if not text.isascii() and (problem := text_problem(text)) is not None:  # (a lone surrogate: no run has it)
        raise ValueError(f"the key of signal '{visible(name)}' {problem}")
    return text


def check_signals(plan: Mapping[str, Any], signals: Signals | None) -> list[Checked]:
    """The ``signals=`` of a run, checked (:func:`check_signal`) and in order: a mapping name -> payload (signals
    sent without a key), or an iterable of names (no payload, no key), ``(name, payload)`` pairs and ``(name,
    payload, key)`` triples (the key of a keyed wait's signal). A signal given twice — the same name, with the same
    key — is a ``ValueError`` (a signal goes to one wait, which takes one); anything else than those shapes a
    ``TypeError``."""
    if signals is None:
        return []
    if isinstance(signals, str | bytes) or not isinstance(signals, Mapping | Iterable):
        raise TypeError("signals must be a mapping (name -> payload) or a list of names, (name, payload) pairs and "
                        f"(name, payload, key) triples; got {type(signals).__name__}")
    items = signals.items() if isinstance(signals, Mapping) else signals
    names = signal_names(plan)
    checked: list[Checked] = []
    given: set[tuple[str, str | None]] = set()
    for item in items:
        if isinstance(item, str):
            item = (item, None)
        if not isinstance(item, tuple | list) or len(item) not in (2, 3):
            raise TypeError("each of signals must be a name, a (name, payload) pair or a (name, payload, key) "
                            f"triple; got {type(item).__name__}"
                            + (f" of {len(item)} items" if isinstance(item, tuple | list) else ""))
        name, payload, key = check_signal(plan, item[0], item[1], names, key=item[2] if len(item) == 3 else None)
        if (name, key) in given:
            raise ValueError(f"{signal_named(name, key)} is given twice: a signal goes to one wait, which takes one")
        given.add((name, key))
        checked.append((name, payload, key))
    return checked
