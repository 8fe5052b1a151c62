"""The shape of an execution plan, checked before a runtime (or ``flowdsl show``) hands it to the kernel.

Stage: runtime (shared). Imports ``flowdsl.schema`` (for the data files), jsonschema and stdlib. The kernel
trusts its plan (the compiler made it); a plan that comes from elsewhere — a Python caller, a run record's
header — is checked here first, so that a malformed one is refused with a sentence saying which field is
wrong and what was expected, instead of a ``KeyError`` from deep inside the kernel.

The shape is ``specs/plan.schema.json`` (JSON Schema 2020-12, the machine-readable twin of docs/plan.md);
what JSON Schema cannot say — that every key a node refers to is a node, every expression id is in
``expressions``, the nodes form one tree under ``root`` (each listed once, by its ``parent``), and a signal is
taken by one wait at most, and inside a ``for_each`` only by a keyed one (what the kernel's ``prepare`` refuses) — is
checked here after it. This is not a re-run of the compiler's checks: only what the kernel relies on.

Cost. The schema says a node's fields with ``if``/``then`` per kind and ``unevaluatedProperties``, which
``jsonschema`` evaluates slowly (about 1.2 ms a node). So the question *whether* a plan has the schema's shape
is asked of schemas derived from it once (:func:`_fast_validators`): the plan without its nodes, and each node
against a flat schema of its own kind (``additionalProperties`` in place of ``unevaluatedProperties``), chosen
in Python by its ``kind`` — they accept exactly what the schema accepts (tests/test_plan_schema.py holds them to
it). Only a plan found malformed is run through the whole schema, to say what is wrong exactly as the schema
says it, and then with only the nodes found malformed. And a plan is checked once: :func:`check_plan` (and
:func:`checked_problem`) remember a well-shaped plan by identity (the last :data:`_CHECKED_SIZE` plan objects) and
by a digest of its content (the last :data:`_GOOD_SIZE` contents), and take a plan the compiler made in this
process (:func:`vouch`) as well shaped while its content is as made. Both memories are safe to use from several
threads at once (``flowdsl.run()`` in a threaded server).
"""

from __future__ import annotations

import functools
import hashlib
import json
import marshal
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from flowdsl.schema import data_file

__all__ = ["PLAN_VERSION", "PlanError", "check_plan", "checked_problem", "plan_problem", "plan_schema", "vouch"]

#: the newest plan layout this code reads (``plan_version``: 1, 2 with a step's ``on_failure``, 3 with a ``wait``
#: node, 4 with a signal wait's ``signal_key``; the compiler writes the oldest that holds a plan)
PLAN_VERSION = 4


class PlanError(ValueError):
    """A value given as an execution plan is not one; the message names the field."""


#: plans found well shaped, by identity, the most recently used last (a plan is read as unchanging once checked, as
#: the kernel reads it); the entry is the plan itself, so that its id is not reused while it is remembered
_CHECKED: OrderedDict[int, Any] = OrderedDict()
_CHECKED_SIZE = 512
#: digests of plan contents found well shaped, or made by the compiler in this process (:func:`vouch`), the most
#: recently used last: a plan object not remembered by identity (one more than :data:`_CHECKED_SIZE` in use, a copy,
#: a plan read again from its file) costs a digest of its content (about 1 µs a node), not a check (about 100 µs)
_GOOD: OrderedDict[bytes, None] = OrderedDict()
_GOOD_SIZE = 8192
#: held while either memory changes (threads checking plans at once)
_LOCK = threading.Lock()
_EXPRESSION_FIELDS = ("when", "fail_when", "signal_key", "items", "on")


def require_plan(plan: Any) -> None:
    """What a runtime asks of the ``plan`` it is given: a dict (else :class:`TypeError`), shaped like an execution
    plan (else :class:`PlanError`, naming the field)."""
    if plan is None:  # the usual way to get here: compile_spec(...).plan of a spec with errors
        raise TypeError("plan must be an execution plan; got None — compile_spec() gives no plan when the spec "
                        "has errors: its .diagnostics say which (flowdsl.compile_text() raises SpecError instead)")
    if not isinstance(plan, dict):
        raise TypeError(f"plan must be an execution plan: a dict, the 'plan' of flowdsl.compile_spec() or "
                        f"flowdsl.compile_text(); got {type(plan).__name__}")
    check_plan(plan)


def check_plan(plan: Any, what: str = "the plan") -> None:
    """Raise :class:`PlanError` when ``plan`` is not shaped like an execution plan (docs/plan.md).

    Checked once (:func:`checked_problem`): a plan found well shaped is remembered by identity, and one the
    compiler made in this process passes unchecked while it is unchanged."""
    problem = checked_problem(plan)
    if problem is not None:
        raise PlanError(f"{what} is not a flowdsl execution plan: {problem}")


def checked_problem(plan: Any) -> str | None:
    """:func:`plan_problem`, asked once of a plan object.

    A plan found well shaped is remembered by identity (the last 512 used), so a second check of the same
    object (a runtime's at each run, ``flowdsl show``'s of a record header read a moment before) costs
    nothing: from then on it is read as unchanging, as the kernel reads it (:func:`flowdsl.kernel_program.prepare`
    keeps its indexes by identity too) — a plan to change is compiled anew, or copied. Its content is
    remembered too, by a digest (the last 8,192): another object of the same content — one of more plans than
    are remembered by identity, a copy — costs the digest (about 1 µs a node, against about 100 µs for the
    check). A plan the compiler made in this process (:func:`vouch`) is well shaped as made: it passes
    unchecked when its content is still what the compiler made, so a plan changed between compiling and its
    first check (a field set by hand, a node removed) is checked in full like any other, and a malformed one
    refused before a runtime can trip on it.
    """
    key = id(plan)
    if _CHECKED.get(key) is plan:
        with _LOCK:
            if key in _CHECKED:
                _CHECKED.move_to_end(key)
        return None
    digest = _digest(plan)
    if digest is None or digest not in _GOOD:
        problem = plan_problem(plan)
        if problem is not None:
            return problem
    with _LOCK:
        _remember(_CHECKED, key, plan, _CHECKED_SIZE)
        if digest is not None:
            _remember(_GOOD, digest, None, _GOOD_SIZE)
    return None


def vouch(plan: dict[str, Any]) -> None:
    """Note that the compiler has just made ``plan`` (it calls this): a :func:`check_plan` of a plan of that
    content is then a comparison of digests, not a check (see :func:`checked_problem`)."""
    digest = _digest(plan)
    if digest is not None:
        with _LOCK:
            _remember(_GOOD, digest, None, _GOOD_SIZE)


def _remember(cache: OrderedDict[Any, Any], key: Any, entry: Any, size: int) -> None:
    """Remember ``entry`` under ``key`` as the most recently used; forget the least recently used beyond ``size``
    (under :data:`_LOCK`)."""
    cache[key] = entry
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)


def _digest(plan: Any) -> bytes | None:
    """A digest of ``plan``'s content: values and their exact types (marshal format 2 keeps no references, so
    equal content gives equal bytes); None for content marshal cannot write (an object of another type, or
    nested too deeply), which is then checked."""
    try:
        return hashlib.blake2b(marshal.dumps(plan, 2), digest_size=20).digest()
    except (ValueError, TypeError, RecursionError):
        return None


def plan_problem(plan: Any) -> str | None:
    """The first way ``plan`` is not shaped like an execution plan, as a sentence (None when it is)."""
    if not isinstance(plan, dict):
        return (f"expected an object (the 'plan' of flowdsl.compile_spec() or flowdsl.compile_text()), "
                f"found {type(plan).__name__}")
    version = plan.get("plan_version")
    if type(version) is not int or not 1 <= version <= PLAN_VERSION:  # (or none): that explains every other error
        return f"'plan_version' must be 1 to {PLAN_VERSION}, found {plan['plan_version']!r}" if "plan_version" in plan \
            else f"it has no 'plan_version' (a compiled plan has plan_version 1 to {PLAN_VERSION})"
    if not _well_shaped(plan):
        problem = _schema_problem(plan)
        if problem is not None:
            return problem
    return _references_problem(plan)


def _references_problem(plan: dict[str, Any]) -> str | None:
    """What a plan of the schema's shape may still have wrong, which JSON Schema cannot say: the first of its
    layout (:func:`_layout_problem`), its references, its tree and its signal waits (:func:`_signal_problem`)."""
    return _layout_problem(plan) or next(_dangling(plan), None) or _tree_problem(plan) or _signal_problem(plan)


def _layout_problem(plan: dict[str, Any]) -> str | None:
    """What a plan of the schema's shape holds that its ``plan_version`` did not have yet (a ``signal_key`` before
    4, a wait node before 3, a step's ``on_failure`` before 2), or a wait node that is neither a signal wait nor a
    timer wait."""
    version = plan["plan_version"]
    waits = [key for key, node in plan["nodes"].items() if node["kind"] == "wait"]
    if waits and version < 3:
        return f"'nodes/{waits[0]}' is a wait node, which plan_version 3 brought: the plan's plan_version must be 3"
    keyed = next((key for key in waits if "signal_key" in plan["nodes"][key]), None)
    if keyed is not None and version < 4:
        return f"'nodes/{keyed}' has 'signal_key', which plan_version 4 brought: the plan's plan_version must be 4"
    for key in waits:
        node = plan["nodes"][key]
        if (node["signal"] is None) == (node["delay_ms"] is None):
            return (f"'nodes/{key}' must have either a 'signal' (a signal wait) or a 'delay_ms' (a timer wait), "
                    f"found {'neither' if node['signal'] is None else 'both'}")
    if version == 1:
        later = next((key for key, node in plan["nodes"].items() if "on_failure" in node), None)
        if later is not None:
            return f"'nodes/{later}' has 'on_failure', which plan_version 2 brought: the plan's plan_version must be 2"
    return None


def _well_shaped(plan: dict[str, Any]) -> bool:
    """Whether ``plan`` has the schema's shape, asked of the schemas derived from it (the module doc)."""
    top, kinds = _fast_validators()
    if not top.is_valid(plan):
        return False
    return all(_node_ok(node, kinds) for node in plan["nodes"].values())


def _node_ok(node: Any, kinds: dict[str, Any]) -> bool:
    if not isinstance(node, dict):
        return False
    kind = node.get("kind")
    validator = kinds.get(kind) if isinstance(kind, str) else None
    return validator is not None and bool(validator.is_valid(node))


def _schema_problem(plan: dict[str, Any]) -> str | None:
    """What the whole schema says is wrong with ``plan`` (None when it finds nothing), as one sentence. The
    nodes the derived schemas accept are left out first: they would add no error, only time."""
    nodes = plan.get("nodes")
    if isinstance(nodes, dict):
        _, kinds = _fast_validators()
        plan = {**plan, "nodes": {key: node for key, node in nodes.items() if not _node_ok(node, kinds)}}
    return _said(list(_validator().iter_errors(plan)))


def _said(errors: list[Any]) -> str | None:
    """The sentence for the whole schema's ``errors`` of a plan (None for none): the deepest error — "unevaluated
    properties" is only a symptom when another one exists (a node whose kind-specific part failed has all its
    kind-specific fields unevaluated) —, where it is, and why when the schema says it (the ``description`` of the
    innermost definition on its way)."""
    if not errors:
        return None
    causes = [e for e in errors if e.validator != "unevaluatedProperties"] or errors
    error = min(causes, key=lambda e: -len(e.absolute_path))
    where = "/".join(str(part) for part in error.absolute_path)
    why = _why(error.schema_path)
    message = f"{error.message} ({why})" if why else error.message
    return f"'{where}': {message}" if where else message


def _why(schema_path: Any) -> str | None:
    """The ``description`` of the innermost definition (``$defs``) along ``schema_path`` in the plan schema that
    has one: what the rule broken is for (a timer wait's fields, a wait's durations). (``jsonschema`` leaves the
    ``$ref`` it follows out of the path: one is followed where the next part is not in the schema at hand.)"""
    schema = plan_schema()
    at: Any = schema
    why = None
    for part in [*schema_path, None]:
        while isinstance(at, dict) and isinstance(at.get("$ref"), str) and part not in at:
            at = schema["$defs"][at["$ref"].removeprefix("#/$defs/")]
            why = at.get("description", why)
        if part is None:
            break
        at = at[part] if isinstance(at, dict | list) else None
    return why


@functools.lru_cache(maxsize=1)
def plan_schema() -> dict[str, Any]:
    """The JSON Schema of an execution plan (``plan_version`` 1 to 4)."""
    schema: dict[str, Any] = json.loads(data_file("plan.schema.json", "specs").read_text(encoding="utf-8"))
    return schema


@functools.lru_cache(maxsize=1)
def _validator() -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(plan_schema())


@functools.lru_cache(maxsize=1)
def _fast_validators() -> tuple[Any, dict[str, Any]]:
    """Validators of schemas derived from the plan schema, with every ``$ref`` written out: one of the plan
    whose ``nodes`` need only be an object, and one per node kind — the node schema's common part and its
    kind's ``then`` (with what that includes) in one object schema closed by ``additionalProperties``, which
    for a node of that kind accepts what the ``unevaluatedProperties`` of the whole does."""
    schema = plan_schema()
    defs = schema["$defs"]
    top = _inline({key: value for key, value in schema.items() if key != "$defs"}, defs)
    top["properties"]["nodes"] = {"type": "object"}
    node = defs["node"]
    if set(node) != {"type", "required", "properties", "unevaluatedProperties", "allOf"} \
            or node["unevaluatedProperties"] is not False or set(node["properties"]) != {"kind"}:
        raise AssertionError("plan.schema.json's node schema changed: derive its per-kind schemas anew")
    kinds: dict[str, Any] = {}
    for kind in node["properties"]["kind"]["enum"]:
        parts = [part["then"] if "if" in part else part for part in node["allOf"] if _applies(part, kind)]
        required = dict.fromkeys(node["required"])
        properties: dict[str, Any] = {"kind": {"const": kind}}
        conditions: list[dict[str, Any]] = []
        for part in parts:
            _flatten(_inline(part, defs), required, properties, conditions)
        flat = {"type": "object", "required": list(required), "properties": properties, "additionalProperties": False}
        kinds[kind] = _fast_validator_class()({**flat, "allOf": conditions} if conditions else flat)
    return _fast_validator_class()(top), kinds


@functools.lru_cache(maxsize=1)
def _fast_validator_class() -> Any:
    """Draft 2020-12's validator, whose ``properties``, ``items`` and ``additionalProperties`` first try each value
    in a way that avoids jsonschema's costly step, descending into a subschema (a new validator object for it)
    when that cannot tell the value valid — the descent then validates it as usual. The two ways:

    - a subschema made of keywords that assert something of the value itself (``type``, ``enum``, ``pattern``,
      ``required``, ``minimum``, ``additionalProperties: false``…: those keywords' own functions are called)
      and of ``properties``, ``items`` and ``prefixItems`` whose subschemas are the same (the value's members are
      tried the same way);
    - a value found valid against the same subschema before (the last few thousand, known by their content), as
      the ``retry`` and ``output`` of most nodes of a plan are.
    """
    from jsonschema import Draft202012Validator, validators

    keywords = Draft202012Validator.VALIDATORS
    shallow: dict[int, tuple[Any, bool]] = {}  # id(subschema) -> (it, whether tried without descending)
    valid: dict[tuple[int, bytes], None] = {}  # (id(subschema), content) of values found valid against it

    def is_shallow(schema: Any) -> bool:
        hit = shallow.get(id(schema))
        if hit is None or hit[0] is not schema:
            found = schema is True or (
                isinstance(schema, dict) and set(schema) <= _SHALLOW
                and isinstance(schema.get("additionalProperties", True), bool)
                and all(is_shallow(sub) for sub in [*schema.get("properties", {}).values(),
                                                    *schema.get("prefixItems", ()),
                                                    *([schema["items"]] if "items" in schema else ())]))
            hit = shallow[id(schema)] = (schema, found)
        return hit[1]

    def passes(validator: Any, schema: Any, instance: Any) -> bool:
        """Whether ``instance`` is valid against a shallow ``schema`` (False: maybe not)."""
        if schema is True:
            return True
        for keyword, value in schema.items():
            if keyword == "properties":
                if validator.is_type(instance, "object") and not all(passes(validator, sub, instance[name])
                                                          for name, sub in value.items() if name in instance):
                    return False
            elif keyword in ("items", "prefixItems"):
                if validator.is_type(instance, "array"):
                    start = len(schema.get("prefixItems", ())) if keyword == "items" else 0
                    subs = value[:len(instance)] if keyword == "prefixItems" else [value] * (len(instance) - start)
                    if not all(passes(validator, sub, item) for sub, item in zip(subs, instance[start:],
                                                                                   strict=False)):
                        return False
            elif keyword in keywords:
                for _ in keywords[keyword](validator, value, instance, schema) or ():
                    return False
        return True

    def tried(validator: Any, schema: Any, instance: Any) -> bool:
        if is_shallow(schema):
            return passes(validator, schema, instance)
        key = _content_key(schema, instance)
        return key is not None and key in valid

    def noted(schema: Any, instance: Any) -> None:
        key = _content_key(schema, instance)
        if key is not None:
            if len(valid) >= 4096:
                valid.clear()
            valid[key] = None

    def descend(validator: Any, instance: Any, schema: Any, path: Any, schema_path: Any = None) -> Iterator[Any]:
        if not tried(validator, schema, instance):
            failed = False
            for error in validator.descend(instance, schema, path=path, schema_path=schema_path):
                failed = True
                yield error
            if not failed and not is_shallow(schema):
                noted(schema, instance)

    def properties(validator: Any, properties: dict[str, Any], instance: Any, schema: Any) -> Iterator[Any]:
        if validator.is_type(instance, "object"):
            for name, subschema in properties.items():
                if name in instance:
                    yield from descend(validator, instance[name], subschema, name, name)

    def items(validator: Any, items: Any, instance: Any, schema: Any) -> Iterator[Any]:
        if items is False or "prefixItems" in schema or not validator.is_type(instance, "array"):
            yield from keywords["items"](validator, items, instance, schema)
            return
        for index, item in enumerate(instance):
            yield from descend(validator, item, items, index)

    def additional(validator: Any, additional: Any, instance: Any, schema: Any) -> Iterator[Any]:
        if not isinstance(additional, dict) or "properties" in schema or "patternProperties" in schema \
                or not validator.is_type(instance, "object"):
            yield from keywords["additionalProperties"](validator, additional, instance, schema)
            return
        for name, value in instance.items():
            yield from descend(validator, value, additional, name)

    return validators.extend(Draft202012Validator, {  # type: ignore[no-untyped-call]
        "properties": properties, "items": items, "additionalProperties": additional})


#: keywords a shallow subschema may hold: ones that assert something of the value itself (additionalProperties
#: only as true or false), ones that apply a subschema to its members, and annotations
_SHALLOW = frozenset({"type", "const", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                      "pattern", "minLength", "maxLength", "minItems", "maxItems", "required", "properties",
                      "items", "prefixItems", "additionalProperties", "description", "title"})


def _content_key(schema: Any, instance: Any) -> tuple[int, bytes] | None:
    """(id(schema), ``instance``'s content with exact types) for the memo of valid values; None if unwritable."""
    try:
        return id(schema), marshal.dumps(instance, 2)
    except (ValueError, TypeError, RecursionError):
        return None


def _applies(part: dict[str, Any], kind: str) -> bool:
    """Whether a part of the node schema's ``allOf`` applies to a node of ``kind``: unconditional, or an
    ``if`` on the kind alone that ``kind`` meets."""
    if "if" not in part:
        return True
    if set(part) != {"if", "then"} or set(part["if"]) != {"properties"} or set(part["if"]["properties"]) != {"kind"}:
        raise AssertionError("plan.schema.json's node schema changed: derive its per-kind schemas anew")
    test = part["if"]["properties"]["kind"]
    return kind in test["enum"] if "enum" in test else bool(kind == test["const"])


def _flatten(part: dict[str, Any], required: dict[str, None], properties: dict[str, Any],
             conditions: list[dict[str, Any]]) -> None:
    """Fold a part made of ``required``, ``properties`` and ``allOf`` (of the same) into one object schema's; a
    conditional part (``if``/``then`` on fields that are in ``properties`` already: a timer wait's) is kept as it
    is, in ``conditions``."""
    if set(part) <= {"if", "then", "description"} and {"if", "then"} <= set(part):
        conditions.append(part)
        return
    if not set(part) <= {"required", "properties", "allOf"}:
        raise AssertionError(f"plan.schema.json's node schema changed: cannot fold {sorted(part)}")
    required.update(dict.fromkeys(part.get("required", ())))
    for name, sub in part.get("properties", {}).items():
        properties[name] = sub if properties.get(name, sub) == sub else {"allOf": [properties[name], sub]}
    for sub in part.get("allOf", ()):
        _flatten(sub, required, properties, conditions)


def _inline(value: Any, defs: dict[str, Any]) -> Any:
    """``value`` with each ``{"$ref": "#/$defs/NAME"}`` replaced by (the inlined) ``defs[NAME]``; the plan schema
    has no recursive reference."""
    if isinstance(value, dict):
        if "$ref" in value:
            target = _inline(defs[value["$ref"].removeprefix("#/$defs/")], defs)
            rest = {key: _inline(sub, defs) for key, sub in value.items() if key != "$ref"}
            return {"allOf": [target], **rest} if rest else target
        return {key: _inline(sub, defs) for key, sub in value.items()}
    if isinstance(value, list):
        return [_inline(item, defs) for item in value]
    return value


def _dangling(plan: dict[str, Any]) -> Iterator[str]:
    """References the schema cannot check: node keys and expression ids that name nothing."""
    nodes: dict[str, Any] = plan["nodes"]
    expressions: dict[str, Any] = plan["expressions"]

    def keys(where: str, value: list[str] | None) -> Iterator[str]:
        for key in value or ():
            if key not in nodes:
                yield f"'{where}' names '{key}', which is not a key of 'nodes'"

    yield from keys("root", plan["root"])
    for key, node in nodes.items():
        at = f"nodes/{key}"
        if node["key"] != key:
            yield f"'{at}/key' is {node['key']!r}: a node's key must equal its key in 'nodes'"
        yield from keys(f"{at}/deps", node["deps"])
        yield from keys(f"{at}/children", node.get("children"))
        yield from keys(f"{at}/default", node.get("default"))
        for i, case in enumerate(node.get("cases", ())):
            yield from keys(f"{at}/cases/{i}/children", case["children"])
        for name in ("parent", "scope"):
            if node[name] is not None and node[name] not in nodes:
                yield f"'{at}/{name}' names '{node[name]}', which is not a key of 'nodes'"
        refs = [(name, node.get(name)) for name in _EXPRESSION_FIELDS]
        refs += _template_refs("with", node.get("with"))
        refs += [(f"output/map/{k}", eid) for k, eid in ((node.get("output") or {}).get("map") or {}).items()]
        refs += _template_refs("compensate/with", (node.get("compensate") or {}).get("with"))
        for where, eid in refs:
            if eid is not None and not isinstance(eid, str):  # (a template's, which the schema leaves as any JSON)
                yield f"'{at}/{where}/$expr' must be an expression id (a string), found {eid!r}"
            elif eid is not None and eid not in expressions:
                yield f"'{at}/{where}' names the expression '{eid}', which is not in 'expressions'"


def _tree_problem(plan: dict[str, Any]) -> str | None:
    """Whether the nodes form one tree under ``root``: each listed once (in ``root``, or a group's ``children``,
    ``cases`` or ``default``) by the node its ``parent`` names — else a group that holds itself, or a node in two
    groups, would send the kernel (and the renderers) round for ever. Iterative: the depth is not bounded."""
    nodes: dict[str, Any] = plan["nodes"]
    lister: dict[str, str] = {}
    stack: list[tuple[str, str | None, str]] = [(key, None, "root") for key in reversed(plan["root"])]
    while stack:
        key, parent, where = stack.pop()
        if key in lister:
            return f"'{where}' lists '{key}', which '{lister[key]}' lists already: a node is in one place"
        lister[key] = where
        node = nodes[key]
        if node["parent"] != parent:
            return (f"'nodes/{key}/parent' is {node['parent']!r}, but '{key}' is listed in '{where}'"
                    + (" (at the top: its parent is null)" if parent is None else ""))
        lists = [("children", node.get("children")), ("default", node.get("default"))]
        lists += [(f"cases/{i}/children", case["children"]) for i, case in enumerate(node.get("cases", ()))]
        for field, keys in lists:
            stack.extend((child, key, f"nodes/{key}/{field}") for child in reversed(keys or ()))
    left = next((key for key in nodes if key not in lister), None)
    if left is not None:
        return f"'nodes/{left}' is listed neither in 'root' nor in a group under it"
    return None


#: a signal name, as the language writes it (an id: ``flowdsl.model.ID_RE``); the schema's pattern says the same,
#: but for a final newline, which Python's ``$`` lets through
_SIGNAL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")


def _signal_problem(plan: dict[str, Any]) -> str | None:
    """What the kernel's ``prepare`` refuses of a plan's signal waits (``ValueError``, with the same words), which
    the compiler reports as FD316 and FD317: a signal taken by two waits (a signal sent to a run is for one wait),
    or a signal wait with no ``signal_key`` inside a ``for_each`` (which iteration a signal is for could not be said)
    — and a signal name that is not one. (A ``signal_key`` on a timer wait, FD309, the schema refuses.) Read after
    :func:`_tree_problem`: the ``parent`` of each node is the group that lists it."""
    nodes: dict[str, Any] = plan["nodes"]
    signals = [key for key, node in nodes.items() if node["kind"] == "wait" and node["signal"] is not None]
    taken: dict[str, str] = {}
    for key in sorted(signals, key=lambda k: nodes[k]["order"]):  # (in the kernel's order: it names the same pair)
        name = nodes[key]["signal"]
        if not _SIGNAL_NAME.match(name):
            return f"'nodes/{key}/signal': {name!r} is not a signal name (written as an id)"
        if name in taken:
            return (f"'nodes/{key}/signal': plan nodes {taken[name]!r} and {key!r} both wait for signal {name!r} "
                    "(a signal sent to a run is for one wait: FD316)")
        around = nodes[key]["parent"] if nodes[key].get("signal_key") is None else None
        while around is not None:
            if nodes[around]["kind"] == "for_each":
                return (f"'nodes/{key}/signal': plan node {key!r} waits for signal {name!r} inside for_each "
                        f"{around!r} with no 'signal_key' (which iteration would a signal be for?): FD317")
            around = nodes[around]["parent"]
        taken[name] = key
    return None


def _template_refs(where: str, value: Any) -> list[tuple[str, Any]]:
    """(path, expression id) of every ``{"$expr": id}`` slot in a template (docs/plan.md, Templates)."""
    if isinstance(value, dict):
        if "$literal" in value and len(value) == 1:
            return []
        if "$expr" in value and len(value) == 1:
            return [(where, value["$expr"])]
        return [ref for k, v in value.items() for ref in _template_refs(f"{where}/{k}", v)]
    if isinstance(value, list):
        return [ref for i, v in enumerate(value) for ref in _template_refs(f"{where}/{i}", v)]
    return []
