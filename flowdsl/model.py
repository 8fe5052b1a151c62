"""The spec model: frozen dataclasses built from schema-valid spec data.

Stage: model. Imports ``flowdsl.diagnostics`` only (plus ``flowdsl.llm``'s
signature parser, which never imports dspy). ``build_flow`` turns the plain
data of one spec file into a :class:`Flow`, collecting the diagnostics that
need only the node at hand (ids, durations, retry policies, LLM signatures,
options that do not apply). Cross-node checks (references, cycles, expression
names, workers) come later, in ``checks`` and ``compiler``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flowdsl.diagnostics import Diagnostic, Positions, join, make, node_keyword

ID_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
GROUP_KINDS = ("sequence", "parallel", "for_each", "switch", "flow")

#: one part of a duration: a decimal number and its unit ("ms" is tried before "m")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|h|m|s)")
#: the units, largest first: the order they must be written in, each at most once
_UNIT_MS = {"h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}
_UNITS = list(_UNIT_MS)
#: a part after the first is less than one of the next larger unit: at most 59m, 59s, 999ms
_PART_LIMIT = {"m": 60, "s": 60, "ms": 1000}
MAX_DURATION_MS = 30 * 24 * 3_600_000
_EXPECTED = "expected a number with a unit: 250ms, 10s, 5m, 2h, or several units, largest first and each once: 1m30s"


def _duration_parts(text: str) -> list[tuple[str, str]]:
    """The (number, unit) parts of a duration string; ValueError saying what is wrong with its form."""
    pos = 0
    parts: list[tuple[str, str]] = []
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        unit = m.group(2)
        if any(unit == u for _, u in parts):
            raise ValueError(f"'{text}' has the unit '{unit}' twice; {_EXPECTED}")
        if parts and _UNITS.index(unit) < _UNITS.index(parts[-1][1]):
            raise ValueError(f"'{text}' has its units out of order ('{unit}' after '{parts[-1][1]}'); {_EXPECTED}")
        parts.append((m.group(1), unit))
        pos = m.end()
    if pos != len(text) or not text:
        if re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", text):
            raise ValueError(f"'{text}' is text, not a number; {_EXPECTED} (or a number of seconds, unquoted)")
        if any(c.isspace() for c in text) and _is_duration(joined := "".join(text.split())):
            raise ValueError(f"'{text}' has spaces; a duration is written without spaces: '{_well_written(joined)}'")
        raise ValueError(f"'{text}' is not a duration; {_EXPECTED}{_spelled(text)}")
    return parts


#: units written as words or in other tools' spelling -> (flowdsl's unit, how many of it one is)
_UNIT_WORDS = {
    **dict.fromkeys(("d", "day", "days"), ("h", 24)), **dict.fromkeys(("w", "week", "weeks"), ("h", 168)),
    **dict.fromkeys(("hr", "hrs", "hour", "hours"), ("h", 1)),
    **dict.fromkeys(("min", "mins", "minute", "minutes"), ("m", 1)),
    **dict.fromkeys(("sec", "secs", "second", "seconds"), ("s", 1)),
    **dict.fromkeys(("msec", "msecs", "millis", "millisecond", "milliseconds"), ("ms", 1)),
}


def _spelled(text: str) -> str:
    """`` (write '24h')`` for a duration written with a unit word flowdsl does not take (`1d`, `2sec`), else ''."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]+)", text.strip())
    if m is None or m.group(2).lower() not in _UNIT_WORDS:
        return ""
    unit, times = _UNIT_WORDS[m.group(2).lower()]
    amount = float(m.group(1)) * times
    if amount * _UNIT_MS[unit] > MAX_DURATION_MS:
        return " (a duration is 30 days at most: 720h)"
    return f" (write '{int(amount) if amount.is_integer() else amount}{unit}')"


def _duration_text_ms(text: str) -> float:
    """The milliseconds a duration string spells (unrounded); ValueError saying what is wrong with it.

    After the first part each part is less than one of the unit above its own (``1h30m``, ``1m59s``,
    ``1s500ms``), and only the last part has a fraction: ``1h60m`` and ``1.5m30s`` spell 2h and 2m in a way a
    reader has to work out, so they are refused, with the plain spelling to write instead.
    """
    parts = _duration_parts(text)
    ms = sum(float(number) * _UNIT_MS[unit] for number, unit in parts)
    if ms > MAX_DURATION_MS:
        return ms  # too long however it is spelt: said as such (parse_duration)
    for i, (number, unit) in enumerate(parts):
        if i and float(number) >= _PART_LIMIT[unit]:
            raise ValueError(f"'{text}' has '{number}{unit}' after a larger unit, where it must be less than "
                             f"{_PART_LIMIT[unit]}{unit}; write {_plain(ms)}")
        if i < len(parts) - 1 and "." in number:
            raise ValueError(f"'{text}' has a fraction in '{number}{unit}', which is not its last part; only the "
                             f"last part may have one: write {_plain(ms)}")
    return ms


def _well_written(text: str) -> str:
    """``text``, a duration in form, as it is best written: itself, or its plain spelling (``1h60m``: ``2h``)."""
    ms = sum(float(number) * _UNIT_MS[unit] for number, unit in _duration_parts(text))
    try:
        _duration_text_ms(text)
    except ValueError:
        return _plain(ms) if ms <= MAX_DURATION_MS else text
    return text


def _plain(ms: float) -> str:
    """A duration of ``ms`` milliseconds (rounded) written the plain way: ``2h``, ``1h30m``, ``3s500ms``."""
    left, out = round(ms), ""
    for unit, size in _UNIT_MS.items():
        count, left = divmod(left, size)
        out += f"{count}{unit}" if count else ""
    return out or "0ms"


def _is_duration(text: str) -> bool:
    """Whether ``text`` is written in the form of a duration (to say what is wrong with one that nearly is)."""
    try:
        _duration_parts(text)
    except ValueError:
        return False
    return True


def _shown(value: Any) -> str:
    """A value as written in a message, at most 40 characters (a number may have thousands of digits)."""
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_duration(value: Any, written: str | None = None) -> int:
    """Milliseconds for ``250ms``, ``10s``, ``1m30s``, ``2h`` or a number of seconds (docs/language.md).

    Units are h, m, s, ms, written largest first, each at most once, with no spaces; each part's number may
    have a fraction (``1.5s``). The result is rounded to whole milliseconds, and must be at least 1ms and at
    most 30 days. Raises ValueError with a message saying what was found and what was expected, quoting a
    number as ``written`` in the source when given (``1e306``, which Python prints ``1e+306``).
    """
    shown = _shown(value if written is None else written)
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 10s, found {str(value).lower()}")
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"'{shown}' is not a finite number of seconds")
        exact = value * 1000  # an int stays exact however large; a float may become infinity, refused below
    elif isinstance(value, str):
        if value.startswith("-") and _is_duration(value[1:]):
            raise ValueError(f"a duration must be positive, found '{_shown(value)}'")
        exact = _duration_text_ms(value)
    else:
        raise ValueError(f"expected a duration like 10s, found {type(value).__name__}")
    if exact <= 0:
        raise ValueError(f"a duration must be positive, found '{shown}'")
    # compared before rounding: rounding infinity (1e306 seconds in ms, or 400 digits of seconds) fails
    ms = round(exact) if exact <= 2 * MAX_DURATION_MS else MAX_DURATION_MS + 1
    if ms == 0:
        raise ValueError(f"'{shown}' is less than 1ms once rounded to whole milliseconds; durations are counted "
                         "in milliseconds, and the shortest is 1ms")
    if ms > MAX_DURATION_MS:
        raise ValueError(f"'{shown}' is longer than the maximum of 30 days ({MAX_DURATION_MS // 3_600_000}h)")
    return int(ms)


def whole_number(value: Any) -> Any:
    """An integer field's value as an ``int``: the schema reads a number whose fraction is zero (``2.0``,
    ``2e0``) as an integer, as JSON Schema does, and so does the model (docs/language.md, "How values are
    read"); anything else is returned as it is."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value


@dataclass(frozen=True)
class Loc:
    """Where a model element came from: its JSON pointer, its file and (when known) its line."""

    path: str
    file: str | None = None
    line: int | None = None

    def describe(self) -> str:
        """``line N`` when the line is known, else the JSON pointer (for messages citing another place)."""
        return f"line {self.line}" if self.line is not None else self.path


@dataclass(frozen=True)
class Retry:
    """A retry policy as written; unset fields are None and are resolved by the compiler."""

    attempts: int | None = None
    backoff: str | None = None
    initial_ms: int | None = None
    max_ms: int | None = None
    multiplier: float | None = None
    jitter: str | None = None
    on: tuple[str, ...] | None = None
    not_on: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Compensation:
    worker: str
    loc: Loc
    with_: Any = None
    retry: Retry | None = None
    timeout_ms: int | None = None


@dataclass(frozen=True)
class Output:
    mode: str  # merge | name | map
    name: str | None = None
    map: tuple[tuple[str, str], ...] = ()  # (key, expression source), sorted by key


@dataclass(frozen=True)
class Field:
    name: str
    type: str = "str"
    desc: str | None = None
    enum: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class LlmSpec:
    inputs: tuple[Field, ...]
    outputs: tuple[Field, ...]
    instructions: str | None
    module: str | None
    lm: str | None
    demos: tuple[Any, ...] = ()
    redact: tuple[str, ...] = ()  # input fields masked in what is recorded of a call


@dataclass(frozen=True)
class Node:
    """A step (``task``/``llm``), a ``wait`` or a group. Fields that do not apply to a kind stay at their default."""

    kind: str
    id: str
    loc: Loc
    opts: str = ""  # JSON pointer of the options mapping (the value under a step's name; a group's own path)
    needs: tuple[str, ...] | None = None
    when: str | None = None
    description: str | None = None
    # steps
    worker: str | None = None
    llm: LlmSpec | None = None
    fallback: str | None = None
    compensate: Compensation | None = None
    with_: Any = None
    output: Output = Output("merge")
    fail_when: str | None = None
    retry: Retry | None = None
    timeout_ms: int | None = None  # a step's per attempt; a sub-flow node's per run; a signal wait's deadline
    #: ``continue``: a failure for good of the step (or of a signal wait: its timeout, a when: or output map that
    #: cannot be evaluated) does not fail the run (``on_failure``);
    #: None: it does
    on_failure: str | None = None
    # waits
    #: the name of the signal a signal wait takes (its ``signal:``, else its id); None for a timer wait (``for:``)
    signal: str | None = None
    #: a signal wait's ``key:``, the expression telling which of its instances a signal is for (None: unkeyed)
    signal_key: str | None = None
    #: a timer wait's duration (``for:``)
    delay_ms: int | None = None
    # groups
    children: tuple[Node, ...] = ()
    items: str | None = None
    as_: str = "item"
    concurrency: int | None = None
    on: str | None = None
    cases: tuple[tuple[str, tuple[Node, ...]], ...] = ()
    quoted_cases: frozenset[str] = frozenset()  # the labels written in quotes: strings as the user said
    default: tuple[Node, ...] | None = None
    path: str | None = None
    subflow: Flow | None = None

    @property
    def is_step(self) -> bool:
        return self.kind in ("task", "llm")

    @property
    def is_leaf(self) -> bool:
        """A step or a wait: a node with no nodes inside, one vertex of the flow graph (weighing 1 on its paths)."""
        return self.kind in ("task", "llm", "wait")

    def child_lists(self) -> Iterator[tuple[str, tuple[Node, ...]]]:
        """Each list of sibling nodes under this node, with its JSON-pointer suffix."""
        if self.kind == "switch":
            for label, nodes in self.cases:
                yield join("/cases", label), nodes
            if self.default is not None:
                yield "/default", self.default
        elif self.kind == "flow":
            if self.subflow is not None:
                yield "/steps", self.subflow.steps
        elif self.kind == "parallel":
            # branches are not a sequence: each one is its own list of one
            for i, child in enumerate(self.children):
                yield f"/branches/{i}", (child,)
        elif self.children:
            yield "/steps", self.children


@dataclass(frozen=True)
class Defaults:
    retry: Retry | None = None
    timeout_ms: int | None = None
    compensate_retry: Retry | None = None
    compensate_timeout_ms: int | None = None
    llm_lm: str | None = None
    llm_module: str | None = None


@dataclass(frozen=True)
class Flow:
    """One spec file."""

    name: str
    steps: tuple[Node, ...]
    file: str | None = None
    version: str | None = None
    description: str | None = None
    workers: tuple[str, ...] = ()
    input_schema: Any = None
    timeout_ms: int | None = None
    defaults: Defaults = field(default_factory=Defaults)


def walk(nodes: tuple[Node, ...]) -> Iterator[Node]:
    """Every node, depth first in spec order (sub-flow contents excluded)."""
    for node in nodes:
        yield node
        for _, kids in node.child_lists():
            if node.kind != "flow":
                yield from walk(kids)


SubflowLoader = Callable[[str, Loc], "Flow | None"]


class _Builder:
    def __init__(self, file: str | None, load_subflow: SubflowLoader | None, positions: Positions | None):
        self.file = file
        self.load_subflow = load_subflow
        self.positions = positions
        self.diags: list[Diagnostic] = []
        self.default_llm_module: str | None = None  # defaults.llm.module: the module of steps naming none

    def err(self, code: str, message: str, path: str) -> None:
        self.diags.append(make(code, message, path, file=self.file))

    def loc(self, path: str) -> Loc:
        line = self.positions.find(path)[0] if self.positions is not None else None
        return Loc(path, self.file, line)

    def as_written(self, value: Any, path: str) -> str:
        """``value`` (at ``path``) as the source wrote it: a number's own text (``1e306``, not ``1e+306``)."""
        written = self.positions.written.get(path) if self.positions is not None else None
        return written if written is not None else _shown(value)

    def version(self, value: Any) -> str | None:
        """The flow's version: a string, or a whole number written in digits (``version: 2`` is ``"2"``).

        Any other number is FD201: YAML reads ``1.10`` as the number 1.1, ``1e3`` as 1000.0 and ``0x10`` as
        16, so the version the plan would hold is not the one written.
        """
        if value is None or isinstance(value, str):
            return value
        written = self.positions.written.get("/version") if self.positions is not None else None
        if type(value) is int and written is None:
            return str(value)
        text = written if written is not None else _shown(value)
        hint = f"version {json.dumps(text)}" if (self.file or "").endswith(".flow") else \
            f"version: {json.dumps(text)}"
        self.err("FD201", f"the version {text} is read as the number {_shown(value)}; write it as a string: "
                 f"{hint} (a version may be a number only when it is a whole number written in digits, like 2)",
                 "/version")
        return None

    def duration(self, value: Any, path: str) -> int | None:
        if value is None:
            return None
        try:
            return parse_duration(value, self.positions.written.get(path) if self.positions is not None else None)
        except ValueError as exc:
            self.err("FD401", str(exc), path)
            return None

    def retry(self, value: Any, path: str) -> Retry | None:
        if value is None:
            return None
        if not isinstance(value, dict):  # a number of attempts (the schema allows an integer only, 2.0 too)
            return Retry(attempts=whole_number(value))
        initial = self.duration(value.get("initial"), join(path, "initial"))
        maximum = self.duration(value.get("max"), join(path, "max"))
        on = tuple(value["on"]) if "on" in value else None
        not_on = tuple(value["not_on"]) if "not_on" in value else None
        if initial is not None and maximum is not None and initial > maximum:
            self.err("FD402", f"retry 'initial' ({self.as_written(value['initial'], join(path, 'initial'))}) is "
                     f"longer than 'max' ({self.as_written(value['max'], join(path, 'max'))})", join(path, "initial"))
        both = sorted(set(on or ()) & set(not_on or ()))
        if both:
            listed = f"error type {both[0]} is" if len(both) == 1 else f"error types {', '.join(both)} are"
            self.err("FD402", f"{listed} listed both in 'on' (retry) and in 'not_on' (never retry); keep one",
                     join(path, "not_on"))
        if "multiplier" in value and value.get("backoff", "exponential") != "exponential":
            self.err("FD402", f"'multiplier' applies to exponential backoff only, not '{value['backoff']}'",
                     join(path, "multiplier"))
        return Retry(whole_number(value.get("attempts")), value.get("backoff"), initial, maximum,
                     self.multiplier(value.get("multiplier"), join(path, "multiplier")), value.get("jitter"),
                     on, not_on)

    def multiplier(self, value: Any, path: str) -> float | None:
        """A retry multiplier as the plan holds it, a float; FD201 (and None) for an integer too large for
        one (the schema takes any number > 1, and ``1e999`` was refused when the file was read)."""
        if value is None:
            return None
        try:
            return float(value)
        except OverflowError:
            self.err("FD201", f"the multiplier {_shown(value)} is beyond the largest number, about 1.8e308; "
                     "expected a number > 1 (delays are capped by 'max' anyway: 2 or 3 is usual)", path)
            return None

    def output(self, value: Any, path: str) -> Output:
        if value is None:
            return Output("merge")
        if isinstance(value, str):
            return Output("name", name=value)
        for key in value:
            if not ID_RE.match(key):
                self.err("FD302", f"invalid output name '{key}'", join(path, key))
        return Output("map", map=tuple(sorted(value.items())))

    def group_output(self, data: dict[str, Any], kw: str, path: str) -> Output:
        """A for_each's or sub-flow's output rule: its result goes under its id unless ``output:`` says otherwise."""
        if "output" not in data:
            return Output("name", name=data[kw])
        return self.output(data["output"], join(path, "output"))

    def compensation(self, value: Any, path: str) -> Compensation | None:
        if value is None:
            return None
        if isinstance(value, str):
            return Compensation(value, self.loc(path))
        return Compensation(
            value["worker"], self.loc(path), value.get("with"), self.retry(value.get("retry"), join(path, "retry")),
            self.duration(value.get("timeout"), join(path, "timeout")))

    def llm(self, value: dict[str, Any], path: str) -> LlmSpec | None:
        from flowdsl.llm_signature import check_llm_block, read_signature

        # every field whose type is wrong is reported at once; the step is checked on with each such field as a
        # str (its demo values unchecked), unless another error stopped the reading of the signature
        norm, errors = read_signature(value["signature"])
        for exc in errors:
            what = "malformed signature: " if exc.code == "FD601" else "in the signature: "
            self.err(exc.code, f"{what}{exc.describe()}", join(path, "signature") + exc.path)
        if norm is None:
            return None

        def fields(items: list[dict[str, Any]]) -> tuple[Field, ...]:
            return tuple(Field(f["name"], f.get("type") or "str", f.get("desc"),
                               tuple(f["enum"]) if f.get("enum") is not None else None) for f in items)

        spec = LlmSpec(fields(norm["inputs"]), fields(norm["outputs"]), value.get("instructions"),
                       value.get("module"), value.get("lm"), tuple(value.get("demos") or ()),
                       tuple(value.get("redact") or ()))
        # checked with the module the step runs with: its own, else the flow's defaults.llm.module
        module = value.get("module") or self.default_llm_module
        untyped = {exc.field for exc in errors if exc.field is not None}
        for code, where, message in check_llm_block({**value, "module": module, "signature": norm}, untyped):
            if where == "/signature" and value.get("module") is None:
                message += " (the step's module, chain_of_thought, comes from 'defaults: {llm: {module: ...}}')"
            self.err(code, message, path + where)
        return spec

    def node(self, data: Any, path: str) -> Node | None:
        if isinstance(data, str):
            return self.step(data, {}, path, path)
        kw = node_keyword(data)  # (a step named 'wait' is a step: a wait's value is its id)
        if kw == "wait":
            return self.wait(data, path)
        if kw is not None:
            return self.group(kw, data, path)
        ((key, options),) = data.items()
        return self.step(key, options or {}, path, join(path, key))

    def common(self, data: dict[str, Any]) -> dict[str, Any]:
        needs = data.get("needs")
        return {"needs": tuple(needs) if needs is not None else None, "when": data.get("when"),
                "description": data.get("description")}

    def step(self, key: str, opts: dict[str, Any], node_path: str, opt_path: str) -> Node | None:
        if "worker" in opts:
            worker, node_id = opts["worker"], key
            if not ID_RE.match(key):
                self.err("FD302", f"'{key}' is used as a step id (the step names its worker), but ids cannot "
                         "contain dots; write the worker name as the key or pick a plain id", opt_path)
        else:
            worker, node_id = key, key.rsplit(".", 1)[-1]
        llm = None
        if "llm" in opts:
            if "worker" in opts:
                self.err("FD309", "an LLM step has no worker; use 'fallback' for the worker to use when the model "
                         "cannot answer", join(opt_path, "worker"))
            llm = self.llm(opts["llm"], join(opt_path, "llm"))
        elif "fallback" in opts:
            self.err("FD309", "'fallback' applies to LLM steps only (steps with an 'llm' block)",
                     join(opt_path, "fallback"))
        # the paths of options are built only for the options written (most steps write few)
        compensate, output, retry, timeout = (opts.get(k) for k in ("compensate", "output", "retry", "timeout"))
        return Node(
            kind="llm" if "llm" in opts else "task", id=node_id, loc=self.loc(node_path), opts=opt_path,
            **self.common(opts),
            worker=None if "llm" in opts else worker, llm=llm, fallback=opts.get("fallback"),
            compensate=None if compensate is None else self.compensation(compensate, join(opt_path, "compensate")),
            with_=opts.get("with"),
            output=Output("merge") if output is None else self.output(output, join(opt_path, "output")),
            fail_when=opts.get("fail_when"),
            on_failure="continue" if opts.get("on_failure") == "continue" else None,
            retry=None if retry is None else self.retry(retry, join(opt_path, "retry")),
            timeout_ms=None if timeout is None else self.duration(timeout, join(opt_path, "timeout")))

    def wait(self, data: dict[str, Any], path: str) -> Node:
        """A ``wait`` node: a timer wait with ``for:``, else a signal wait (FD309 for an option that does not
        apply to its kind)."""
        if "for" in data:
            for key, why in _TIMER_REFUSES.items():
                if key in data:
                    self.err("FD309", f"'{key}' does not go with 'for': {why}", join(path, key))
            return Node(kind="wait", id=data["wait"], loc=self.loc(path), opts=path, **self.common(data),
                        delay_ms=self.duration(data["for"], join(path, "for")))
        # (a signal wait fails when its timeout passes, when its when:, key: or output map cannot be evaluated, or
        # when its key is not one or is taken: its on_failure says what any of those does, with a timeout or without)
        output, timeout = data.get("output"), data.get("timeout")
        return Node(
            kind="wait", id=data["wait"], loc=self.loc(path), opts=path, **self.common(data),
            signal=data.get("signal", data["wait"]), signal_key=data.get("key"),
            timeout_ms=None if timeout is None else self.duration(timeout, join(path, "timeout")),
            output=Output("merge") if output is None else self.output(output, join(path, "output")),
            on_failure="continue" if data.get("on_failure") == "continue" else None)

    def nodes(self, items: list[Any], path: str) -> tuple[Node, ...]:
        built = (self.node(item, join(path, i)) for i, item in enumerate(items))
        return tuple(n for n in built if n is not None)

    def group(self, kw: str, data: dict[str, Any], path: str) -> Node:
        base = {"kind": kw, "id": data[kw], "loc": self.loc(path), "opts": path, **self.common(data)}
        if kw == "sequence":
            return Node(**base, children=self.nodes(data["steps"], join(path, "steps")))
        if kw == "parallel":
            return Node(**base, children=self.nodes(data["branches"], join(path, "branches")))
        if kw == "for_each":
            return Node(**base, children=self.nodes(data["steps"], join(path, "steps")), items=data["items"],
                        as_=data.get("as", "item"), concurrency=whole_number(data.get("concurrency")),
                        output=self.group_output(data, kw, path))
        if kw == "switch":
            cases = tuple((label, self.nodes(nodes, join(path, "cases", label)))
                          for label, nodes in sorted(data["cases"].items()))
            default = self.nodes(data["default"], join(path, "default")) if "default" in data else None
            quoted = self.positions.quoted_keys if self.positions is not None else set()
            written = frozenset(label for label in data["cases"] if join(path, "cases", label) in quoted)
            return Node(**base, on=data["on"], cases=cases, default=default, quoted_cases=written)
        sub = self.load_subflow(data["path"], self.loc(join(path, "path"))) if self.load_subflow else None
        # the node's own timeout bounds each of its runs; without one, the sub-flow file's `timeout:` does
        timeout = data.get("timeout")
        return Node(**base, path=data["path"], subflow=sub, with_=data.get("with"),
                    output=self.group_output(data, kw, path),
                    timeout_ms=None if timeout is None else self.duration(timeout, join(path, "timeout")))


#: the options a timer wait (``for:``) refuses (FD309), and why
_TIMER_REFUSES = {
    "signal": "a wait with 'for' is a timer, which waits for its duration and takes no signal (to wait for a "
              "signal, leave 'for' out)",
    "key": "a timer wait takes no signal, so it has no instances for a signal to tell apart ('key' is a signal "
           "wait's option)",
    "timeout": "a timer wait ends when its duration is over ('timeout' is a signal wait's deadline)",
    "output": "a timer wait's result is {}, with nothing to store ('output' places a signal's payload)",
    "on_failure": "a timer wait has no timeout and no output map to fail ('on_failure' is a signal wait's option; a "
                  "timer wait whose 'when:' cannot be evaluated fails the run)",
}


def build_flow(data: dict[str, Any], file: str | None = None, load_subflow: SubflowLoader | None = None,
               positions: Positions | None = None) -> tuple[Flow, list[Diagnostic]]:
    """The model of one schema-valid spec, and the diagnostics found building it.

    ``positions`` (from the front end) gives every location its line, for messages that cite another place.
    """
    b = _Builder(file, load_subflow, positions)
    d = data.get("defaults") or {}
    comp = d.get("compensate") or {}
    llm = d.get("llm") or {}
    b.default_llm_module = llm.get("module")
    defaults = Defaults(
        retry=b.retry(d.get("retry"), "/defaults/retry"),
        timeout_ms=b.duration(d.get("timeout"), "/defaults/timeout"),
        compensate_retry=b.retry(comp.get("retry"), "/defaults/compensate/retry"),
        compensate_timeout_ms=b.duration(comp.get("timeout"), "/defaults/compensate/timeout"),
        llm_lm=llm.get("lm"), llm_module=llm.get("module"))
    flow = Flow(
        name=data["name"], steps=b.nodes(data["steps"], "/steps"), file=file,
        version=b.version(data.get("version")), description=data.get("description"),
        workers=tuple(data.get("workers") or ()), input_schema=data.get("input"),
        timeout_ms=b.duration(data.get("timeout"), "/timeout"), defaults=defaults)
    return flow, b.diags
