"""Front end: the writers — spec data as canonical YAML or ``.flow`` text — and the converter.

Stage: front end (the way back from data to text). Imports ``flowdsl.diagnostics``,
``flowdsl.source`` (how plain values are read, so that strings that would read as
something else are quoted), ``flowdsl.textsyntax`` (the vocabulary and token shapes of the text syntax),
``json`` and, lazily, ``yaml`` and ``flowdsl.checks`` (FD312's rule: a switch case label written
bare that it would warn about is written quoted instead).

``canonical`` puts a spec's keys in the order of docs/language.md (the document:
flowdsl, name, version, description, workers, input, timeout, defaults, steps;
each node: its keyword or name first, then its options, its nodes last). Both
writers use it: ``to_yaml`` and ``write_flow`` (which is
``flowdsl.textsyntax.to_flow``). Neither changes the data: loading what they
write gives back exactly what they were given.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterator
from typing import Any

from flowdsl.diagnostics import join, node_keyword
from flowdsl.source import WORD_VALUES, NumberError, core_resolvers, read_number
from flowdsl.textsyntax import (
    BAD_CHAR_RE,
    BODIES,
    KEYWORDS,
    LLM_KEYS,
    NAME_LISTS,
    NUMBER_RE,
    OPTION_KEYS,
    WORD_RE,
)

DOC_ORDER = ("flowdsl", "name", "version", "description", "workers", "input", "timeout", "defaults", "steps")
STEP_ORDER = (
    "worker", "llm", "fallback", "compensate", "with", "output", "when", "fail_when", "on_failure", "needs",
    "retry", "timeout", "description",
)  # fmt: skip
#: the keywords of groups, and ``wait``: a mapping holding one is that node (in the schema's order of precedence)
GROUP_KEYWORDS = ("sequence", "parallel", "for_each", "switch", "flow", "wait")
GROUP_ORDER = ("items", "as", "concurrency", "on", "path", "with", "output", "when", "needs", "timeout", "description")
WAIT_ORDER = ("signal", "key", "timeout", "for", "output", "on_failure", "when", "needs", "description")
NODE_LISTS = ("steps", "branches", "cases", "default")
RETRY_ORDER = ("attempts", "backoff", "initial", "max", "multiplier", "jitter", "on", "not_on")
FORMATS = ("yaml", "flow")

#: a list of strings at most this long (written as YAML) is written in flow style: [a, b]
_SHORT_LIST = 60


def _ordered(d: Any, order: tuple[str, ...]) -> Any:
    if not isinstance(d, dict):
        return d
    out = {k: d[k] for k in order if k in d}
    out.update((k, v) for k, v in d.items() if k not in out)
    return out


def _with_retry(d: dict[Any, Any]) -> dict[Any, Any]:
    if isinstance(d.get("retry"), dict):
        d["retry"] = _ordered(d["retry"], RETRY_ORDER)
    return d


def group_keyword(node: dict[Any, Any]) -> str | None:
    """The group keyword (or ``wait``) of a mapping node (in the schema's order of precedence), or None for a
    step — ``{wait: {worker: w}}`` and ``{wait: None}`` are steps named ``wait``
    (:func:`flowdsl.diagnostics.node_keyword`)."""
    return node_keyword(node)


def canonical(doc: Any) -> Any:
    """Spec data with its keys in canonical order; values are unchanged.

    User mappings (``input``, ``with``, output mappings, signatures, demos) keep their order.
    """
    if not isinstance(doc, dict):
        return doc
    out = _ordered(doc, DOC_ORDER)
    defaults = out.get("defaults")
    if isinstance(defaults, dict):
        d = _with_retry(_ordered(defaults, ("retry", "timeout", "compensate", "llm")))
        if isinstance(d.get("compensate"), dict):
            d["compensate"] = _with_retry(_ordered(d["compensate"], ("retry", "timeout")))
        if isinstance(d.get("llm"), dict):
            d["llm"] = _ordered(d["llm"], ("lm", "module"))
        out["defaults"] = d
    if isinstance(out.get("steps"), list):
        out["steps"] = [_canonical_node(n) for n in out["steps"]]
    return out


def _canonical_node(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    kw = group_keyword(node)
    if kw is None:
        if len(node) != 1 or not isinstance(next(iter(node.values())), dict):
            return node
        ((name, opts),) = node.items()
        opts = _with_retry(_ordered(opts, STEP_ORDER))
        if isinstance(opts.get("compensate"), dict):
            opts["compensate"] = _with_retry(_ordered(opts["compensate"], ("worker", "with", "retry", "timeout")))
        if isinstance(opts.get("llm"), dict):
            opts["llm"] = _ordered(opts["llm"], LLM_KEYS)
        return {name: opts}
    if kw == "wait":
        return _ordered(node, (kw, *WAIT_ORDER))
    out = _ordered(node, (kw, *GROUP_ORDER, *NODE_LISTS))
    for key in ("steps", "branches", "default"):
        if isinstance(out.get(key), list):
            out[key] = [_canonical_node(n) for n in out[key]]
    if isinstance(out.get("cases"), dict):
        out["cases"] = {
            k: [_canonical_node(n) for n in v] if isinstance(v, list) else v for k, v in out["cases"].items()
        }
    return out


class _FlowList(list):  # type: ignore[type-arg]
    """A list the YAML writer puts on one line."""


def _mark_short_lists(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _mark_short_lists(x) for k, x in v.items()}
    if isinstance(v, list):
        if v and all(isinstance(x, str) and "\n" not in x for x in v) and sum(len(x) + 2 for x in v) <= _SHORT_LIST:
            return _FlowList(v)
        return [_mark_short_lists(x) for x in v]
    return v


@functools.cache
def _dumper() -> Any:
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    # a string is written plain only when neither flowdsl's loader (YAML 1.2 core) nor a YAML 1.1 loader
    # would read it as something else: '1e3', '0o17' and 'yes', 'on', '0777' are all quoted
    merged = {k: list(v) for k, v in yaml.SafeDumper.yaml_implicit_resolvers.items()}
    for first, resolvers in core_resolvers().items():
        merged.setdefault(first, []).extend(resolvers)
    Dumper.yaml_implicit_resolvers = merged

    def flow_list(dumper: Any, data: Any) -> Any:
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)

    Dumper.add_representer(_FlowList, flow_list)
    return Dumper


def _strings(v: Any) -> Iterator[str]:
    if isinstance(v, str):
        yield v
    elif isinstance(v, dict):
        for k, x in v.items():
            yield from _strings(k)
            yield from _strings(x)
    elif isinstance(v, list):
        for x in v:
            yield from _strings(x)


def to_yaml(data: dict[str, Any]) -> str:
    """Canonical, readable YAML for spec ``data``; ``yaml.safe_load`` of it gives ``data`` back.

    Keys in canonical order, block style, short lists of strings on one line
    (``steps: [a, b]``). A step is a plain string exactly when the data has it
    so (``- a``); ``{a: {}}`` and ``{a: null}`` stay as they are, so that the
    round trip is exact. Text is written as UTF-8, unless it holds control
    characters (which PyYAML would write raw and read back changed): then
    everything beyond ASCII is escaped.
    """
    import yaml

    text: str = yaml.dump(
        _mark_short_lists(canonical(data)),
        Dumper=_dumper(),
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=not any(BAD_CHAR_RE.search(s) for s in _strings(data)),
        width=88,
    )
    return text


# ---------------------------------------------------------------------------- .flow

#: lines the writer keeps within, where it can
WIDTH = 88


def _quote(s: str) -> str:
    text = json.dumps(s, ensure_ascii=False)
    return _ESCAPED.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


#: characters a .flow string writes as escapes: those a spec may not hold raw, and the line and paragraph
#: separators (many editors and tools break the line there; a string is written on one line)
_ESCAPED = re.compile(f"{BAD_CHAR_RE.pattern[:-1]}\u2028\u2029]")


def _scalar_text(v: Any, where: str) -> str:
    if v is None or isinstance(v, bool):
        return {None: "null", True: "true", False: "false"}[v]
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        text = repr(v)
        if not NUMBER_RE.fullmatch(text) or _number(text) != v:
            raise ValueError(f"{where or '/'}: the number {text} cannot be written in the text syntax")
        return text
    if isinstance(v, str):
        return v if _reads_as_itself(v) else _quote(v)
    raise ValueError(f"{where or '/'}: a {type(v).__name__} value cannot be written in the text syntax")


def _number(text: str) -> int | float | None:
    try:
        return read_number(text)
    except NumberError:
        return None


def _reads_as_itself(v: str) -> bool:
    """Whether the string ``v`` written bare reads back as the string ``v`` (a word that is not a value, or a
    number-like token that is not a number, such as 10s)."""
    if WORD_RE.fullmatch(v):
        return v not in WORD_VALUES
    if NUMBER_RE.fullmatch(v):
        try:
            return read_number(v) is None
        except NumberError:
            return False
    return False


def _key_text(k: Any, where: str) -> str:
    if not isinstance(k, str):
        raise ValueError(f"{where or '/'}: mapping keys are strings, not {type(k).__name__}")
    return k if WORD_RE.fullmatch(k) or NUMBER_RE.fullmatch(k) else _quote(k)


def _label_text(label: Any, where: str) -> str:
    """A switch case label: as a mapping key, and quoted when, written bare, it would spell a number, a boolean or
    null otherwise than the value is matched as (``1.50``, ``01``, ``True``: FD312's rule, the same function), so
    that the label reads back as the string it is without a warning about a number it never was."""
    from flowdsl.checks import case_label_mismatch

    text = _key_text(label, where)
    return _quote(label) if text == label and case_label_mismatch(label) is not None else text


def _compact(v: Any, where: str) -> str:
    if isinstance(v, dict):
        items = (f"{_key_text(k, where)}: {_compact(x, join(where, k))}" for k, x in v.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_compact(x, join(where, i)) for i, x in enumerate(v)) + "]"
    return _scalar_text(v, where)


def _value(v: Any, where: str, indent: int, column: int) -> str:
    """``v`` as a value starting at ``column`` on a line indented by ``indent``; long ones span lines."""
    text = _compact(v, where)
    if column + len(text) <= WIDTH or not isinstance(v, (dict, list)) or not v:
        return text
    pad = " " * (indent + 2)
    if isinstance(v, dict):
        items = []
        for k, x in v.items():
            key = _key_text(k, where) + ": "
            items.append(pad + key + _value(x, join(where, k), indent + 2, indent + 2 + len(key)))
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [pad + _value(x, join(where, i), indent + 2, indent + 2) for i, x in enumerate(v)]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def _name(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise ValueError(f"{where}: a name must be a string, not {type(v).__name__}")
    return v if WORD_RE.fullmatch(v) else _quote(v)


def _bare(v: Any) -> bool:
    return isinstance(v, str) and bool(WORD_RE.fullmatch(v)) and v not in KEYWORDS


def _names(v: Any, where: str) -> str:
    if not isinstance(v, list):
        raise ValueError(f"{where}: a list of names is expected, not {type(v).__name__}")
    if v and all(isinstance(x, str) for x in v):
        return ", ".join(_name(x, where) for x in v)
    return _compact(v, where)


def write_flow(data: dict[str, Any]) -> str:
    """Canonical ``.flow`` text for spec ``data``: the implementation of ``flowdsl.textsyntax.to_flow``."""
    if not isinstance(data, dict):
        raise ValueError("a spec document is a mapping")
    data = canonical(data)
    if unknown := [k for k in data if k not in DOC_ORDER]:
        raise ValueError(f"/{unknown[0]}: not a key of a spec document; it cannot be written as .flow")
    lines: list[str] = []
    version = data.get("flowdsl", 1)
    if not (type(version) is int and version == 1):
        lines.append("flowdsl " + _compact(version, "/flowdsl"))
    if "name" in data:
        lines.append("flow " + _name(data["name"], "/name"))
    for key in ("version", "description"):
        if key in data:
            value = data[key]
            text = _quote(value) if key == "description" and isinstance(value, str) else None
            lines.append(f"{key} " + (text or _compact(value, "/" + key)))
    if "workers" in data:
        lines.append("workers " + _names(data["workers"], "/workers"))
    for key in ("input", "timeout"):
        if key in data:
            lines.append(f"{key} " + _value(data[key], "/" + key, 0, len(key) + 1))
    if "defaults" in data:
        if not isinstance(data["defaults"], dict):
            raise ValueError("/defaults: a mapping is expected")
        pairs = _pairs(data["defaults"], "/defaults", "compensate")
        lines += _statement("", "defaults", pairs) if pairs else ["defaults {}"]
    if "steps" in data:
        steps = data["steps"]
        if not isinstance(steps, list) or not steps:
            raise ValueError("/steps: a non-empty list of nodes is expected")
        if lines:
            lines.append("")
        for i, node in enumerate(steps):
            lines += _node(node, 0, f"/steps/{i}")
    return "\n".join(lines) + "\n"


def _pairs(opts: dict[Any, Any], where: str, undo: str = "undo") -> list[tuple[str, Any, str]]:
    """(keyword, value, pointer) for each option; the value is rendered by ``_statement``."""
    out = []
    for key, value in opts.items():
        if key not in OPTION_KEYS:
            raise ValueError(f"{join(where, key)}: not an option of the language; it cannot be written as .flow")
        out.append((undo if key == "compensate" else key, value, join(where, key)))
    return out


def _render(key: str, value: Any, where: str, indent: int, column: int) -> str:
    if key in NAME_LISTS:
        return _names(value, where)
    if key in ("description", "instructions") and isinstance(value, str):
        return _quote(value)
    return _value(value, where, indent, column)


def _statement(pad: str, head: str, pairs: list[tuple[str, Any, str]]) -> list[str]:
    """A statement with options: on one line when it fits, else options one per line in a block."""
    line = pad + head + "".join(f" {k} {_render(k, v, w, 0, 0)}" for k, v, w in pairs)
    if not pairs or (len(line) <= WIDTH and "\n" not in line):
        return [line]
    inner = pad + "  "
    body = [f"{inner}{k} {_render(k, v, w, len(inner), len(inner) + len(k) + 1)}" for k, v, w in pairs]
    return [pad + head + " {", *body, pad + "}"]


def _node(node: Any, indent: int, where: str) -> list[str]:
    pad = " " * indent
    if isinstance(node, str):
        return [f"{pad}step {_name(node, where)}"]
    if not isinstance(node, dict):
        raise ValueError(f"{where}: a node is a name or a mapping, not {type(node).__name__}")
    kw = group_keyword(node)
    if kw is not None:
        return _group(node, kw, indent, where)
    if len(node) != 1:
        raise ValueError(f"{where}: a step is a mapping with exactly one key")
    ((name, opts),) = node.items()
    head, sub = _name(name, where), join(where, name)
    if opts is None or opts == {}:
        return [f"{pad}step {head} " + ("null" if opts is None else "{}")]
    if not isinstance(opts, dict):
        raise ValueError(f"{sub}: the options of a step are a mapping")
    llm = opts.get("llm")
    if isinstance(llm, dict) and set(llm) <= set(LLM_KEYS) and not set(opts) & set(LLM_KEYS):
        llm, lsub = dict(llm), join(sub, "llm")
        if isinstance(llm.get("signature"), str):
            head += " " + _quote(llm.pop("signature"))
        rest = {k: v for k, v in opts.items() if k != "llm"}
        return _statement(pad, "llm " + head, _pairs(llm, lsub) + _pairs(rest, sub))
    return _statement(pad, "step " + head, _pairs(opts, sub))


def _group(node: dict[Any, Any], kw: str, indent: int, where: str) -> list[str]:
    pad = " " * indent
    body_keys = ("cases", "default") if kw == "switch" else (BODIES.get(kw),)
    opts = {k: v for k, v in node.items() if k != kw and k not in body_keys}
    pairs = _pairs(opts, where)
    head = f"{kw} {_name(node[kw], join(where, kw))}"
    if kw == "flow":
        return _statement(pad, head, pairs) if pairs else [f"{pad}{head} {{}}"]
    if kw == "wait":
        return _statement(pad, head, pairs)
    head = pad + head + "".join(f" {k} {_render(k, v, w, 0, 0)}" for k, v, w in pairs)
    if kw != "switch":
        key = BODIES[kw]
        return _block(head, node[key], indent, join(where, key)) if key in node else [head]
    if "cases" not in node:
        if "default" in node:
            raise ValueError(f"{where}: a switch with a default has cases")
        return [head]
    cases = node["cases"]
    if not isinstance(cases, dict):
        raise ValueError(f"{where}/cases: a mapping is expected")
    lines = [head + " {"]
    for label, nodes in cases.items():
        sub = join(where, "cases", label)
        lines += _block(f"{pad}  case {_label_text(label, sub)}", nodes, indent + 2, sub)
    if "default" in node:
        lines += _block(f"{pad}  default", node["default"], indent + 2, join(where, "default"))
    return [*lines, pad + "}"]


def _block(head: str, nodes: Any, indent: int, where: str) -> list[str]:
    if not isinstance(nodes, list):
        raise ValueError(f"{where}: a list of nodes is expected")
    if all(_bare(n) for n in nodes):
        line = head + (" { " + " ".join(nodes) + " }" if nodes else " {}")
        if len(line) <= WIDTH:
            return [line]
    lines = [head + " {"]
    for i, n in enumerate(nodes):
        lines += [" " * (indent + 2) + n] if _bare(n) else _node(n, indent + 2, join(where, i))
    return [*lines, " " * indent + "}"]


# ---------------------------------------------------------------------------- dispatch


def rebase_subflow_paths(data: dict[str, Any], source_dir: str, target_dir: str) -> dict[str, Any]:
    """Spec ``data`` read from a file in ``source_dir``, to be written into ``target_dir``: every relative sub-flow
    ``path`` (relative to the spec's own file) rewritten to name the same file from there; the data is not
    changed (a copy is returned where a path changes). Only nodes are looked at, never ``with`` data."""
    source, target = os.path.abspath(source_dir), os.path.abspath(target_dir)
    if source == target:
        return data

    def nodes(items: Any) -> Any:
        return [node(n) for n in items] if isinstance(items, list) else items

    def node(n: Any) -> Any:
        if not isinstance(n, dict):
            return n
        out = dict(n)
        path = n.get("path")
        if "flow" in n and isinstance(path, str) and path and not os.path.isabs(path):
            out["path"] = os.path.relpath(os.path.join(source, path), target).replace(os.sep, "/")
        for key in ("steps", "branches", "default"):
            if key in n:
                out[key] = nodes(n[key])
        if isinstance(n.get("cases"), dict):
            out["cases"] = {label: nodes(body) for label, body in n["cases"].items()}
        return out

    return {**data, "steps": nodes(data.get("steps"))} if "steps" in data else data


def convert_text(data: dict[str, Any], to: str) -> str:
    """Spec ``data`` written in the form ``to``: ``"yaml"`` or ``"flow"``."""
    if to == "yaml":
        return to_yaml(data)
    if to == "flow":
        return write_flow(data)
    raise ValueError(f"unknown format {to!r}; expected one of: {', '.join(FORMATS)}")
