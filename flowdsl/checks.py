"""Semantic checks over a built model: ids, expressions, workers, the input schema.

Stage: checks. Imports ``flowdsl.diagnostics``, ``flowdsl.model``,
``flowdsl.expr`` and ``flowdsl.workers``. Checks *yield* diagnostics; nothing
stops at the first. Graph checks (references, cycles, concurrent writers)
belong to the compiler, which owns the dependency graph.
"""

from __future__ import annotations

import decimal
import json
import math
import os
import re
import time
from collections.abc import Iterator
from typing import Any

from flowdsl import expr
from flowdsl.diagnostics import BIDI_MARKS, Diagnostic, did_you_mean, join, make, quote
from flowdsl.model import Flow, Node, walk

#: variables every expression may read
BASE_VARIABLES = frozenset({"input", "steps", "run"})
#: what fail_when and output mappings may read in addition
RESULT_VARIABLES = frozenset({"context"})
#: the options whose value is one expression, written as one ``${ }`` (output mappings' values are too)
BARE_FIELDS = frozenset({"when", "fail_when", "key", "items", "on"})


def check_flow(flow: Flow, *, check_workers: bool = False, search_path: str | None = None) -> list[Diagnostic]:
    """Every diagnostic the model's nodes give on their own (ids, expressions, workers, input schema)."""
    diags = [*check_ids(flow), *check_expressions(flow), *check_input_schema(flow), *check_llm_with(flow),
             *check_llm_options(flow), *check_constant_items(flow), *check_case_labels(flow)]
    if check_workers:
        diags.extend(check_worker_names(flow, search_path))
    return diags


def _err(node_or_file: Node | Flow, code: str, message: str, path: str) -> Diagnostic:
    file = node_or_file.loc.file if isinstance(node_or_file, Node) else node_or_file.file
    return make(code, message, path, file=file)


def check_ids(flow: Flow) -> Iterator[Diagnostic]:
    seen: dict[str, Node] = {}
    for node in walk(flow.steps):
        first = seen.get(node.id)
        if first is not None:
            yield _err(node, "FD301", f"duplicate id '{node.id}' (first used on {first.loc.describe()}); "
                       f"give one of them another id {_another_id(node)}", node.loc.path)
        else:
            seen[node.id] = node


def _another_id(node: Node) -> str:
    """How ``node`` (the second of two nodes of one id) takes another id and keeps what the id gave it: a step its
    worker, a signal wait the signal it waits for (its id, unless it has ``signal:``)."""
    if node.kind != "wait":
        return "(for a step: '<id>: {worker: ...}')"
    text = (node.loc.file or "").endswith(".flow")
    how = "'wait <id>'" if text else "'wait: <id>'"
    if node.signal != node.id:  # (a timer, or a wait with its own signal: name)
        return f"(for a wait: {how})"
    keep = f"'signal {node.signal}'" if text else f"'signal: {node.signal}'"
    return f"(for a wait: {how}, with {keep} to keep waiting for the signal '{node.signal}')"


def check_llm_with(flow: Flow) -> Iterator[Diagnostic]:
    """FD604: an LLM step's ``with:`` mapping must give exactly the signature's input fields.

    A key that is not an input field would reach nobody, and an input field
    without a key would have no value at run time (``InputInvalid``).
    """
    for node in walk(flow.steps):
        if node.kind != "llm" or node.llm is None or not isinstance(node.with_, dict):  # no with: the context
            continue
        inputs = [f.name for f in node.llm.inputs]
        path = join(node.opts, "with")
        listed = ", ".join(inputs)
        for key in node.with_:
            if key not in inputs:
                yield _err(node, "FD604", f"'with' gives {quote(key)}, which is not an input field of the signature"
                           f"{did_you_mean(str(key), inputs)}; the input fields are: {listed}", join(path, key))
        missing = [name for name in inputs if name not in node.with_]
        if missing:
            names = ", ".join(f"'{n}'" for n in missing)
            yield _err(node, "FD604", f"'with' gives no value for the input field{'s' if len(missing) > 1 else ''} "
                       f"{names}; with a 'with' mapping the model gets only its keys, so map every input field: "
                       f"{listed}", path)


def check_llm_options(flow: Flow) -> Iterator[Diagnostic]:
    """FD201: an LLM step's ``instructions`` with ``${``, and a blank model string (``lm``, ``defaults.llm.lm``).

    Instructions are sent to the model as written, never interpolated, so a template there would reach the
    model as its literal text. A model string of spaces only would be taken as no model at all.
    """
    if flow.defaults.llm_lm is not None and not flow.defaults.llm_lm.strip():
        yield _err(flow, "FD201", _blank_lm(flow.defaults.llm_lm, "--lm or FLOWDSL_LM"), "/defaults/llm/lm")
    for node in walk(flow.steps):
        if node.kind != "llm" or node.llm is None:
            continue
        path = join(node.opts, "llm")
        if node.llm.lm is not None and not node.llm.lm.strip():
            yield _err(node, "FD201", _blank_lm(node.llm.lm, "--lm, defaults.llm.lm or FLOWDSL_LM"),
                       join(path, "lm"))
        text = node.llm.instructions
        if isinstance(text, str) and (template := _TEMPLATE_START.search(text)) is not None:
            at = template.start()
            end = text.find("}", at)
            found = text[at:end + 1] if 0 <= end - at < 60 else text[at:at + 20] + "…"
            yield _err(node, "FD201", f"the instructions contain {json.dumps(found, ensure_ascii=False)}, but "
                       "instructions are sent to the model as written, not filled in like a 'with:' template; to "
                       "give the model a value from the context, add an input field to the signature (e.g. "
                       "'order_id, question -> answer') and map it with 'with:' "
                       "(e.g. with: {order_id: \"${ order.id }\"}); write '$${' for a literal '${'",
                       join(path, "instructions"))


#: a ``${`` that starts a template (``$${`` is a literal ``${``, as in every template of the language)
_TEMPLATE_START = re.compile(r"(?<!\$)\$\{")


def _blank_lm(value: str, instead: str) -> str:
    return (f"the model string {json.dumps(value)} is blank; expected 'provider/model', e.g. 'openai/gpt-4o-mini', "
            f"or no 'lm' at all to use the model from {instead}")


# --- expressions -------------------------------------------------------------


def expression_fields(node: Node, path: str) -> Iterator[tuple[str, str, str, bool]]:
    """(field, expression source, JSON pointer, reads-a-result) for every expression of ``node``."""
    if node.when is not None:
        yield "when", node.when, join(path, "when"), False
    if node.fail_when is not None:
        yield "fail_when", node.fail_when, join(path, "fail_when"), True
    if node.signal_key is not None:
        yield "key", node.signal_key, join(path, "key"), False
    if node.items is not None:
        yield "items", node.items, join(path, "items"), False
    if node.on is not None:
        yield "on", node.on, join(path, "on"), False
    for key, source in node.output.map:
        yield f"output.{key}", source, join(path, "output", key), True
    if node.with_ is not None:
        yield from _template_fields(node.with_, join(path, "with"), "with")
    if node.compensate is not None and node.compensate.with_ is not None:
        yield from _template_fields(node.compensate.with_, join(node.compensate.loc.path, "with"),
                                    "compensate.with", result=True)


def _template_fields(value: Any, path: str, name: str, result: bool = False) -> Iterator[tuple[str, str, str, bool]]:
    if isinstance(value, str):
        yield name, value, path, result
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _template_fields(v, join(path, k), f"{name}.{k}", result)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _template_fields(v, join(path, i), f"{name}[{i}]", result)


def expression_slots(text: str) -> list[str]:
    """The expression sources inside one template string (raises ExpressionError when unclosed)."""
    return [p.source for p in expr.split_template(text) if isinstance(p, expr.Slot)]


def check_expressions(flow: Flow) -> Iterator[Diagnostic]:
    builtins = expr.builtin_functions()
    loops = {v: n.id for n in reversed(list(walk(flow.steps))) if n.kind == "for_each" for v in (n.as_, "index")}
    yield from _check_nodes(flow, flow.steps, frozenset(), builtins, loops)


def _input_fields(flow: Flow) -> frozenset[str]:
    """The top-level fields the flow's input schema names (``properties``, ``required``)."""
    schema = flow.input_schema
    if not isinstance(schema, dict):
        return frozenset()
    props, required = schema.get("properties"), schema.get("required")
    names = [*(props if isinstance(props, dict) else ()), *(required if isinstance(required, list) else ())]
    return frozenset(n for n in names if isinstance(n, str))


#: a word that could name a field or a variable (what a ``with`` value missing its ``${ }`` looks like)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _text_naming_a_field(node: Node, fname: str, text: str, path: str, loop_vars: frozenset[str],
                         fields: frozenset[str]) -> Iterator[Diagnostic]:
    """FD311: a ``with`` value that is plain text equal to a loop variable or an input field's name — most
    likely the field or variable was meant and ``${ }`` forgotten; the step would get the text itself."""
    if not (fname.startswith(("with.", "compensate.with.")) and _NAME.match(text)):
        return
    if text in loop_vars:
        yield _err(node, "FD311", f"in '{fname}': the text '{text}' is the name of the loop variable ${text}, but "
                   f"the step gets the text: write '${{ ${text} }}' to pass the variable (or '${{ \"{text}\" }}' to "
                   "mean the text)", path)
    elif text in fields:
        yield _err(node, "FD311", f"in '{fname}': the text '{text}' is the name of the input field '{text}', but "
                   f"the step gets the text: write '${{ {text} }}' to pass the field (or '${{ \"{text}\" }}' to "
                   "mean the text)", path)


def _check_nodes(flow: Flow, nodes: tuple[Node, ...], loop_vars: frozenset[str],
                 builtins: frozenset[str], loops: dict[str, str]) -> Iterator[Diagnostic]:
    fields = _input_fields(flow)
    for node in nodes:
        for fname, text, path, reads_result in expression_fields(node, node.opts):
            bare = fname in BARE_FIELDS or fname.startswith("output.")
            if not bare:
                yield from _text_naming_a_field(node, fname, text, path, loop_vars, fields)
            yield from _check_one(node, fname, text, path, bare, loop_vars | (RESULT_VARIABLES if reads_result
                                                                                 else frozenset()), builtins, loops)
        inner = loop_vars | {node.as_, "index"} if node.kind == "for_each" else loop_vars
        for _, kids in node.child_lists():
            if node.kind != "flow":
                yield from _check_nodes(flow, kids, inner, builtins, loops)


#: characters of an expression that an FD501 message quotes, at most
_SOURCE_SHOWN = 200


def bidi_mark_message(char: str) -> str:
    """FD111 for a bidirectional mark inside an expression's ``${ }``."""
    import unicodedata

    return (f"bidirectional mark U+{ord(char):04X} ({unicodedata.name(char)}) is not allowed in an expression: it "
            "is invisible, and can change the order in which the expression around it is displayed (marks are "
            "allowed in text outside '${ }')")


def _check_one(node: Node, fname: str, text: str, path: str, bare: bool, extra_vars: frozenset[str],
               builtins: frozenset[str], loops: dict[str, str]) -> Iterator[Diagnostic]:
    """Check one expression field: conditions must be exactly one ``${ }``; templates may interpolate."""
    try:
        if bare:
            source = expr.single_expression(text)
            if source is None:
                yield _err(node, "FD501", f"'{fname}' must be one expression written as \"${{ ... }}\", "
                           f"found {quote(text)}", path)
                return
            sources = [source]
        else:
            sources = expression_slots(text)
    except expr.ExpressionError as exc:
        yield _err(node, "FD501", f"in '{fname}': {exc.message}", path)
        return
    for source in sources:
        mark = BIDI_MARKS.search(source)
        if mark is not None:
            yield _err(node, "FD111", f"in '{fname}': {bidi_mark_message(mark.group())}", path)
        try:
            analysis = expr.analyse(source)
        except expr.ExpressionError as exc:
            at = f" at character {exc.position}" if exc.position is not None else ""
            yield _err(node, "FD501", f"in '{fname}': {exc.message}{at} of {quote(source.strip(), _SOURCE_SHOWN)}",
                       path)
            continue
        allowed = BASE_VARIABLES | extra_vars
        for var in sorted(analysis.variables - allowed - builtins):
            if var in loops:
                hint = f" (it is defined only inside for_each '{loops[var]}')"
            elif var in RESULT_VARIABLES:
                hint = " (it is defined only where a step's result is read: fail_when, output, compensate.with)"
            else:
                hint = did_you_mean("$" + var, {"$" + v for v in allowed})
            yield _err(node, "FD502", f"in '{fname}': undefined variable '${var}'{hint}; expected one of "
                       f"{', '.join('$' + v for v in sorted(allowed))} or a variable bound in the expression", path)
        for name in sorted(analysis.names & extra_vars & loops.keys()):
            yield _err(node, "FD310", f"in '{fname}': '{name}' reads the context's field '{name}', not the loop "
                       f"variable: write '${name}' (if the context has such a field, give the loop variable another "
                       "name with 'as:')", path)
        for fn in sorted(analysis.functions & expr.NONDETERMINISTIC):
            yield _err(node, "FD503", f"in '{fname}': '${fn}' is not allowed: {expr.refusal(fn)}", path)
        for fn in sorted(analysis.functions - builtins - allowed - expr.NONDETERMINISTIC):
            yield _err(node, "FD502", f"in '{fname}': unknown function '${fn}'"
                       f"{did_you_mean('$' + fn, {'$' + b for b in builtins})}", path)


class Constants:
    """The values of options that are one constant expression (``when: "${ 1 > 2 }"``), known before any run.

    Each evaluation is bounded (``expr.TIME_LIMIT_MS``), and all of them together by ``budget`` seconds: past
    it (a hostile spec with thousands of slow constants such as ``[1..10000000]``) no value is sought any more,
    and what would depend on one goes unreported, instead of the check taking minutes.
    """

    def __init__(self, budget: float = 1.0):
        self.left = budget
        self.found: dict[str, tuple[bool, Any]] = {}

    def value(self, text: str) -> tuple[bool, Any]:
        """(True, its value) when ``text`` is one ``${ }`` that reads nothing and evaluates; else (False, None)."""
        if text in self.found:
            return self.found[text]
        known: tuple[bool, Any] = (False, None)
        if self.left > 0:
            started = time.perf_counter()
            try:  # a malformed expression is FD501, reported with the expressions
                source = expr.single_expression(text)
                if source is not None and expr.is_constant(source):
                    known = (True, expr.compile_expression(source).evaluate(None))
            except expr.ExpressionError:
                pass
            self.left -= time.perf_counter() - started
        self.found[text] = known
        return known


def check_constant_items(flow: Flow) -> Iterator[Diagnostic]:
    """FD201: a for_each whose ``items`` is a constant that is not a list (``"${ 5 }"``, ``"${ 'abc' }"``).

    At run time such a value is taken as a list of one item (JSONata's rule), so the loop would run its steps
    once, with that value as the item: never what a loop is written for, and known before anything runs.
    (null, the empty list and a constant list are what they say: no iteration, or one per item.)
    """
    constants = Constants()
    for node in walk(flow.steps):
        if node.kind != "for_each" or node.items is None:
            continue
        known, value = constants.value(node.items)
        if not known or value is None or isinstance(value, list):
            continue
        text = json.dumps(value, ensure_ascii=False)
        shown = text if len(text) <= 40 else text[:37] + "..."
        what = {bool: "true or false", str: "a string", dict: "an object"}.get(type(value), "a number")
        ways = [f"\"${{ [{text}] }}\" for that one item"] if len(text) <= 40 else []
        if type(value) is int and 0 < value <= 10_000:
            ways.append(f"\"${{ [1..{value}] }}\" to run the steps {value} times")
        yield _err(node, "FD201", f"for_each '{node.id}' iterates over {what}, {shown}, not a list: its steps would "
                   "run once, with it as the item; expected an expression that gives a list"
                   + (f" ({'; '.join(ways)})" if ways else ""), join(node.opts, "items"))


# --- switch cases -----------------------------------------------------------------


def check_case_labels(flow: Flow) -> Iterator[Diagnostic]:
    """FD312: a switch case written without quotes that reads as a number, a boolean or null, but not as the
    kernel writes that value (``1.50``, ``01``, ``1e3``, ``True``): a label is a string, kept as written, and a
    value of ``on`` that is not a string is matched by its JSON text (``1.5``, ``1``, ``1000``, ``true``), so
    the case can only ever match the string itself. A label in quotes is that string, as the user said."""
    for node in walk(flow.steps):
        if node.kind != "switch":
            continue
        for label, _ in node.cases:
            if label in node.quoted_cases:
                continue
            message = case_label_mismatch(label)
            if message is not None:
                yield _err(node, "FD312", message, join(node.opts, "cases", label))


#: digits, with ``_`` between them (``1_000``: YAML 1.1 and Python write numbers so)
_DIGITS = r"[0-9](?:_*[0-9])*"
#: a label that reads as a number: decimal (a sign, leading zeros, a fraction, an exponent: ``+1``, ``01``, ``.5``,
#: ``1.``, ``1.50``, ``2E3``), hexadecimal, octal or binary (``0x10``, ``0o17``, ``0b101``), or YAML's ``.inf``
_DECIMAL_LABEL = re.compile(rf"[-+]?(?:{_DIGITS}(?:\.(?:{_DIGITS})?)?|\.{_DIGITS})(?:[eE][-+]?{_DIGITS})?\Z")
_RADIX_LABEL = re.compile(r"([-+]?)0(?:([xX])([0-9a-fA-F](?:_*[0-9a-fA-F])*)|([oO])([0-7](?:_*[0-7])*)"
                          r"|([bB])([01](?:_*[01])*))\Z")
_SPECIAL_LABEL = re.compile(r"[-+]?\.(?:inf|Inf|INF)\Z|\.(?:nan|NaN|NAN)\Z")
#: the JSON text of an integer, as the kernel writes one (``flowdsl.kernel_core.switch_label``)
_INTEGER_TEXT = re.compile(r"-?(?:0|[1-9][0-9]*)\Z")
#: labels that read as a boolean or null, but are not its JSON text -> that text
_WORD_LABELS = {"True": "true", "TRUE": "true", "False": "false", "FALSE": "false", "Null": "null", "NULL": "null",
                "~": "null"}
#: the longest number a message writes out
_NUMBER_SHOWN = 40


def case_label_mismatch(label: str) -> str | None:
    """The FD312 message for a case ``label`` written without quotes, or None when it does not read as a number,
    a boolean or null, or when a value of that kind is matched as it.

    A number is matched by the kernel's text for it: an integer (or a float with no fraction: ``3.0`` is ``3``) by
    its decimal digits, ``-?(0|[1-9][0-9]*)`` but not ``-0``; any other float by Python's shortest text that
    reads back as it (``1.5``, ``0.1``, ``1e-07``); so exactly these labels can match a number."""
    if label in _WORD_LABELS:
        text = _WORD_LABELS[label]
        what = "null (and a missing value)" if text == "null" else f"the boolean {text}"
        return (f"case {quote(label)} can only match the string {quote(label)}: {what} is matched as '{text}' "
                f"(write the case as {text}, or quote it to mean the string)")
    if _INTEGER_TEXT.match(label):
        if label != "-0":
            return None
        number: str | None = "0"
    elif _SPECIAL_LABEL.match(label):
        return (f"case {quote(label)} can only match the string {quote(label)}: a number is always finite "
                "(quote it to mean the string)")
    elif (radix := _RADIX_LABEL.match(label)) is not None:
        sign, digits, base = _radix_parts(radix)
        value = int(digits.replace("_", ""), base)  # linear in the length: a power of two
        number = str(-value if sign == "-" else value) if value.bit_length() <= 4 * _NUMBER_SHOWN else None
    elif _DECIMAL_LABEL.match(label):
        number = _decimal_number(label)
        if number == label:
            return None
        if number is None:
            return (f"case {quote(label)} can only match the string {quote(label)}: it is beyond the largest "
                    "number, about 1.8e308 (quote it to mean the string)")
    else:
        return None
    if number is None:  # (an integer too long to write out)
        return (f"case {quote(label)} can only match the string {quote(label)}: a number is matched by its decimal "
                "digits (write the case so, or quote it to mean the string)")
    shown = number if len(number) <= _NUMBER_SHOWN else number[:_NUMBER_SHOWN - 3] + "..."
    return (f"case {quote(label)} can only match the string {quote(label)}: the number {shown} is matched as "
            f"{quote(number, _NUMBER_SHOWN)} (write the case as {shown}, or quote it to mean the string)")


def _radix_parts(radix: re.Match[str]) -> tuple[str, str, int]:
    """(sign, digits, base) of a label :data:`_RADIX_LABEL` matched."""
    sign, hex_digits, oct_digits, bin_digits = radix.group(1), radix.group(3), radix.group(5), radix.group(7)
    if hex_digits is not None:
        return sign, hex_digits, 16
    if oct_digits is not None:
        return sign, oct_digits, 8
    return sign, bin_digits, 2


def _decimal_number(label: str) -> str | None:
    """The kernel's text for the number a decimal ``label`` spells (``flowdsl.kernel_core.switch_label``), or
    None when it is beyond the range of a float (``1e999``). Exact: digits without a fraction or an exponent
    are an integer of any length; a whole number written with either (``1.0e30``) is that integer; any other,
    the float nearest to it, as Python writes it."""
    text = label.replace("_", "")
    if not any(c in text for c in ".eE"):
        digits = text.lstrip("+-").lstrip("0") or "0"
        return "-" + digits if text.startswith("-") and digits != "0" else digits
    approx = float(text)
    if not math.isfinite(approx):
        return None
    try:
        exact = decimal.Decimal(text)
    except decimal.InvalidOperation:  # an exponent beyond the decimal module's (1e-99999999999999999999: 0)
        return _switch_text(approx)
    if exact == exact.to_integral_value():
        return str(int(exact))  # at most 309 digits: the float is finite
    return _switch_text(approx)


def _switch_text(value: float) -> str:
    """The text a switch value that is a float is matched as (``flowdsl.kernel_core.switch_label``)."""
    return str(int(value)) if value.is_integer() else repr(value)


# --- the input schema ----------------------------------------------------------


#: keywords whose values the 2020-12 meta-schema checks with a ``format`` (regex, uri, uri-reference), which
#: python-jsonschema's check_schema applies and jsonschema-rs does not, or that make jsonschema-rs pick
#: another meta-schema; a schema holding one anywhere is checked by python-jsonschema only
_FORMAT_CHECKED = frozenset({"pattern", "patternProperties", "$schema", "$id", "$ref", "$dynamicRef", "$vocabulary"})


def _without_format_checked(schema: Any) -> bool:
    if isinstance(schema, dict):
        return _FORMAT_CHECKED.isdisjoint(schema) and all(_without_format_checked(v) for v in schema.values())
    if isinstance(schema, list):
        return all(_without_format_checked(v) for v in schema)
    return True


def check_input_schema(flow: Flow) -> Iterator[Diagnostic]:
    """FD206 when ``input:`` is not a valid JSON Schema (2020-12), or holds a reference that does not resolve."""
    if flow.input_schema is None or isinstance(flow.input_schema, bool):
        return
    if _without_format_checked(flow.input_schema):
        import jsonschema_rs

        # without format-checked keywords both check the same meta-schema rules; jsonschema-rs is
        # compiled and light to import, and python-jsonschema (below) is needed only to explain an error
        # (with no $ref, there is no reference to resolve either)
        if jsonschema_rs.meta.is_valid(flow.input_schema):
            return
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(flow.input_schema)
    except SchemaError as exc:
        where = join("/input", *exc.path)
        yield _err(flow, "FD206", f"the input schema is not a valid JSON Schema: {exc.message}", where)
        return
    schema = flow.input_schema
    named = [f"#/{where}/{name}" for where in ("$defs", "definitions") if isinstance(schema.get(where), dict)
             for name in schema[where]]
    for parts, keyword, ref, why in _dangling_references(schema):
        hint = did_you_mean(ref, named) if ref.startswith("#/") else ""
        yield _err(flow, "FD206", f"the input schema's {keyword} '{ref}' {why}{hint}; a reference must point "
                   "inside the input schema (like '#/$defs/name') or to a JSON Schema meta-schema: flowdsl never "
                   "fetches a schema from elsewhere", join("/input", *parts, keyword))


#: JSON Schema 2020-12 keywords whose value is a schema, a list of schemas, or a mapping of names to schemas
_SUBSCHEMA = frozenset({"additionalProperties", "contains", "contentSchema", "else", "if", "items", "not",
                        "propertyNames", "then", "unevaluatedItems", "unevaluatedProperties"})
_SUBSCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_SUBSCHEMA_MAPS = frozenset({"$defs", "definitions", "dependentSchemas", "patternProperties", "properties"})


def _dangling_references(schema: Any) -> Iterator[tuple[list[Any], str, str, str]]:
    """(path to the subschema, keyword, reference, why) for each ``$ref``/``$dynamicRef`` of a valid ``schema``
    that does not resolve as the run input's check resolves it (``flowdsl.runtime.inputs.check_input``):
    inside the schema (with its ``$id``s and anchors) or to a bundled meta-schema, never by fetching."""
    from jsonschema_specifications import REGISTRY
    from referencing import Registry
    from referencing.exceptions import Unresolvable
    from referencing.jsonschema import DRAFT202012

    root = REGISTRY.combine(Registry()).resolver_with_root(DRAFT202012.create_resource(schema))
    stack: list[tuple[Any, list[Any], Any]] = [(schema, [], root)]
    while stack:
        node, parts, resolver = stack.pop()
        if not isinstance(node, dict):
            continue
        if parts and isinstance(node.get("$id"), str):
            resolver = resolver.in_subresource(DRAFT202012.create_resource(node))
        for keyword in ("$ref", "$dynamicRef"):
            ref = node.get(keyword)
            if not isinstance(ref, str):
                continue
            try:
                target = resolver.lookup(ref).contents
            except Unresolvable:
                yield parts, keyword, ref, "cannot be resolved"
                continue
            if not isinstance(target, dict | bool):
                yield parts, keyword, ref, f"points to {json.dumps(target)[:40]}, which is not a schema"
        for keyword, value in node.items():
            if keyword in _SUBSCHEMA and not isinstance(value, list):
                stack.append((value, [*parts, keyword], resolver))
            elif keyword in _SUBSCHEMA or keyword in _SUBSCHEMA_LISTS:
                stack.extend((v, [*parts, keyword, i], resolver) for i, v in enumerate(value))
            elif keyword in _SUBSCHEMA_MAPS and isinstance(value, dict):
                stack.extend((v, [*parts, keyword, k], resolver) for k, v in value.items())


# --- workers --------------------------------------------------------------------


def worker_references(flow: Flow) -> Iterator[tuple[Node, str, str, str]]:
    """(node, role, worker name, JSON pointer) for every worker a flow names (sub-flows excluded)."""
    for node in walk(flow.steps):
        if node.kind == "task" and node.worker:
            explicit = node.opts != node.loc.path and not node.opts.endswith("/" + node.worker)
            yield node, "step", node.worker, join(node.opts, "worker") if explicit else node.loc.path
        if node.fallback:
            yield node, "fallback", node.fallback, join(node.opts, "fallback")
        if node.compensate is not None:
            yield node, "compensation", node.compensate.worker, node.compensate.loc.path


def _shown_dir(path: str) -> str:
    """A searched directory as given, or relative to the working directory when it lies below it."""
    if not os.path.isabs(path):
        return path
    rel = os.path.relpath(path)
    return path if rel.startswith("..") or rel == "." else rel


#: the modules of ``workers:`` that cannot be imported that get a "did you mean" (the first ones)
_SUGGESTED_MODULES = 8


def check_worker_names(flow: Flow, search_path: str | None) -> Iterator[Diagnostic]:
    """Import the worker modules, then check that every named worker is registered."""
    from flowdsl.workers import WorkerImportError, did_you_mean_module, import_worker_modules, registry

    spec_dir = os.path.dirname(os.path.abspath(flow.file)) if flow.file else None
    first = search_path or os.getcwd()
    also = [spec_dir] if spec_dir and os.path.abspath(first) != spec_dir else []
    failed = 0
    for i, module in enumerate(flow.workers):
        try:  # (each "did you mean" compares the name with a directory's modules: a few are enough)
            import_worker_modules([module], first, also, suggest=failed < _SUGGESTED_MODULES)
        except WorkerImportError as exc:
            failed += 1
            where = f"in {_shown_dir(exc.origin)}; " if exc.origin else "" if exc.found else \
                f"searched {', '.join(_shown_dir(p) for p in exc.searched)}; "
            yield _err(flow, "FD205", f"cannot import worker module '{module}'{did_you_mean_module(exc.suggestion)}: "
                       f"{exc.reason} ({where}"
                       "`flowdsl validate --no-import` checks the spec without importing)", join("/workers", i))
    if failed:
        return  # the names the missing module would register are unknown: no FD204 guesses
    known = registry.names()
    for node, role, name, path in worker_references(flow):
        if name not in known:
            where = "by the modules in 'workers:'" if flow.workers else "('workers:' lists no modules)"
            if role == "step" and path.endswith("/worker"):  # the step names its worker: say which is which
                what = f"step '{node.id}': worker '{name}' is not registered"
            else:  # a step written as its worker's name, a fallback, a compensation
                what = f"{role} '{name}' is not a known worker: none is registered under that name"
            yield _err(node, "FD204", f"{what} {where}{did_you_mean(name, known)}", path)
