"""The shape of an execution plan, checked before a runtime (or ``flowdsl show``) hands it to the kernel.

Stage: runtime (shared). Imports ``flowdsl.schema`` (for the data files), jsonschema and stdlib. The kernel
trusts its plan (the compiler made it); a plan that comes from elsewhere — a Python caller, a run record's
header — is checked here first, so that a malformed one is refused with a sentence saying which field is
wrong and what was expected, instead of a ``KeyError`` from deep inside the kernel.

The shape is ``specs/plan.schema.json`` (JSON Schema 2020-12, the machine-readable twin of docs/plan.md);
what JSON Schema cannot say — that every key a node refers to is a node, every expression id is in
``expressions``, and the nodes form one tree under ``root`` (each listed once, by its ``parent``) — is
checked here after it. This is not a re-run of the compiler's checks.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any

from flowdsl.schema import data_file

__all__ = ["PLAN_VERSION", "PlanError", "check_plan", "plan_problem", "plan_schema"]

#: the plan layout this code reads (``plan_version``; the compiler writes the same)
PLAN_VERSION = 1


class PlanError(ValueError):
    """A value given as an execution plan is not one; the message names the field."""


#: plans found well shaped, by identity (a plan is read as unchanging once compiled, as the kernel reads it)
_CHECKED: dict[int, Any] = {}
_CHECKED_SIZE = 32
_EXPRESSION_FIELDS = ("when", "fail_when", "items", "on")


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
    """Raise :class:`PlanError` when ``plan`` is not shaped like an execution plan (docs/plan.md)."""
    if _CHECKED.get(id(plan)) is plan:
        return
    problem = plan_problem(plan)
    if problem is not None:
        raise PlanError(f"{what} is not a flowdsl execution plan: {problem}")
    if len(_CHECKED) >= _CHECKED_SIZE:
        _CHECKED.pop(next(iter(_CHECKED)))
    _CHECKED[id(plan)] = plan


def plan_problem(plan: Any) -> str | None:
    """The first way ``plan`` is not shaped like an execution plan, as a sentence (None when it is)."""
    if not isinstance(plan, dict):
        return (f"expected an object (the 'plan' of flowdsl.compile_spec() or flowdsl.compile_text()), "
                f"found {type(plan).__name__}")
    if plan.get("plan_version") != PLAN_VERSION:  # another version (or none): that explains every other error
        return f"'plan_version' must be {PLAN_VERSION}, found {plan['plan_version']!r}" if "plan_version" in plan \
            else f"it has no 'plan_version' (a compiled plan has plan_version {PLAN_VERSION})"
    errors = list(_validator().iter_errors(plan))
    if errors:
        # the deepest error says the most; "unevaluated properties" is only a symptom when another one exists
        # (a node whose kind-specific part failed has all its kind-specific fields unevaluated)
        causes = [e for e in errors if e.validator != "unevaluatedProperties"] or errors
        error = min(causes, key=lambda e: -len(e.absolute_path))
        where = "/".join(str(part) for part in error.absolute_path)
        return f"'{where}': {error.message}" if where else error.message
    return next(_dangling(plan), None) or _tree_problem(plan)


@functools.lru_cache(maxsize=1)
def plan_schema() -> dict[str, Any]:
    """The JSON Schema of an execution plan (``plan_version`` 1)."""
    schema: dict[str, Any] = json.loads(data_file("plan.schema.json", "specs").read_text(encoding="utf-8"))
    return schema


@functools.lru_cache(maxsize=1)
def _validator() -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(plan_schema())


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
            if eid is not None and eid not in expressions:
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
