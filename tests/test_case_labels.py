"""FD312: a switch case label written without quotes that spells a number, a boolean or null otherwise than the
kernel writes that value, so that only the string itself can match it (docs/diagnostics.md, FD312).

The boundary is the kernel's: ``flowdsl.kernel_core.switch_label`` is what a value of ``on`` is matched as.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowdsl.api import compile_loaded, load_text
from flowdsl.checks import case_label_mismatch
from flowdsl.diagnostics import CODES, Diagnostic
from flowdsl.kernel_core import switch_label


def diagnostics(text: str, filename: str) -> list[Diagnostic]:
    result = compile_loaded(load_text(text, filename), filename)
    assert result.plan is not None, [d.format() for d in result.diagnostics]  # a warning: the plan is made
    return result.diagnostics


def fd312(text: str, filename: str = "spec.yaml") -> list[tuple[int | None, int | None, str, str]]:
    """(line, column, path, label quoted first in the message) of every FD312."""
    out = []
    for d in diagnostics(text, filename):
        assert d.code == "FD312", d.format()
        out.append((d.line, d.column, d.path, d.message.split("'")[1]))
    return out


def yaml_switch(*labels: str) -> str:
    cases = "".join(f"      {label}: [s{i}]\n" for i, label in enumerate(labels))
    return ("flowdsl: 1\nname: t\nsteps:\n  - switch: pick\n    on: \"${ order.kind }\"\n    cases:\n"
            f"{cases}    default: [other]\n")


def flow_switch(*labels: str) -> str:
    cases = "".join(f"  case {label} {{ s{i} }}\n" for i, label in enumerate(labels))
    return f"flow t\n\nswitch pick on \"${{ order.kind }}\" {{\n{cases}  default {{ other }}\n}}\n"


# --- the rule -------------------------------------------------------------------------------------------------

#: labels a value of `on` that is not a string is matched as: never reported
MATCHABLE = ["0", "1", "-1", "3", "42", "-7", "1000", "123456789012345678901234567890", "1.5", "-0.25", "0.1",
             "0.05", "0.30000000000000004", "1e-07", "1.5e-07", "5e-324", "1500000000000000.5", "true", "false",
             "null"]
#: labels that read as something else: never reported (strings, not numbers)
NOT_NUMBERS = ["express", "yes", "no", "on", "off", "y", "n", "1.2.3", "10s", "1m30s", "1:30", "2024-05-01", "v1",
               "1a", "nan", "inf", "Infinity", "0x", "1e", ".", "-", "+", "1__", "_1", "1_", "٣", "", "NaN", "tRue"]


@pytest.mark.parametrize("label", MATCHABLE)
def test_a_label_a_value_is_matched_as_is_not_reported(label: str) -> None:
    assert case_label_mismatch(label) is None


@pytest.mark.parametrize("label", NOT_NUMBERS)
def test_a_label_that_does_not_read_as_a_number_or_boolean_is_not_reported(label: str) -> None:
    assert case_label_mismatch(label) is None


@pytest.mark.parametrize(("label", "matched"), [
    ("1.50", "1.5"), ("01", "1"), ("007", "7"), ("+1", "1"), ("1e3", "1000"), ("1E3", "1000"), (".5", "0.5"),
    ("-.5", "-0.5"), ("1.", "1"), ("0x10", "16"), ("-0x10", "-16"), ("0o17", "15"), ("0b101", "5"),
    ("1_000", "1000"), ("-0", "0"), ("+0", "0"), ("00", "0"), ("-0.0", "0"), ("3.0", "3"), ("-3.0", "-3"),
    ("2.50", "2.5"), ("1e-7", "1e-07"), ("1E-07", "1e-07"), ("1e+16", "10000000000000000"), ("1.0e30", "1" + "0" * 30),
    ("0.100", "0.1"), ("1_0.5", "10.5"), ("4.9e-324", "5e-324"),
])
def test_a_number_spelt_otherwise_than_it_is_matched_is_reported(label: str, matched: str) -> None:
    message = case_label_mismatch(label)
    assert message == (f"case '{label}' can only match the string '{label}': the number {matched} is matched as "
                       f"'{matched}' (write the case as {matched}, or quote it to mean the string)")


@pytest.mark.parametrize(("label", "matched"), [("True", "true"), ("TRUE", "true"), ("False", "false"),
                                                ("FALSE", "false"), ("Null", "null"), ("NULL", "null"), ("~", "null")])
def test_a_boolean_or_null_spelt_otherwise_than_it_is_matched_is_reported(label: str, matched: str) -> None:
    message = case_label_mismatch(label)
    assert message is not None
    assert message.startswith(f"case '{label}' can only match the string '{label}': ")
    assert f"is matched as '{matched}' (write the case as {matched}, or quote it to mean the string)" in message


@pytest.mark.parametrize("label", [".inf", "-.inf", "+.Inf", ".INF", ".nan", ".NaN", "1e999", "-1.5e400"])
def test_a_label_no_finite_number_is_matched_as_is_reported(label: str) -> None:
    message = case_label_mismatch(label)
    assert message is not None and message.startswith(f"case '{label}' can only match the string '{label}': ")
    assert message.endswith("(quote it to mean the string)")


def test_the_labels_a_message_quotes_are_bounded() -> None:
    for label in ["0" * 5000 + "1", "1" * 400 + ".5", "0x" + "f" * 5000, "1" + "0" * 1000 + ".0"]:
        message = case_label_mismatch(label)
        assert message is not None and len(message) < 400, label


# --- the rule is the kernel's ------------------------------------------------------------------------------------


@given(st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none()))
def test_what_the_kernel_matches_a_value_as_is_never_reported(value: object) -> None:
    assert case_label_mismatch(switch_label(value)) is None


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_a_float_written_otherwise_is_reported_with_the_text_the_kernel_matches(value: float) -> None:
    padded = repr(value) + "0" if "e" not in repr(value) else ""  # 1.5 as 1.50, 3.0 as 3.00
    for label in {f"{value:.17g}", f"{value:.3e}", f"{value:.20f}", padded}:
        if not label or not math.isfinite(reads_as := float(label)):  # (rounded past the largest float)
            continue
        message = case_label_mismatch(label)
        assert (message is None) == (label == switch_label(reads_as)), (label, message)
        if message is not None and (abs(reads_as) < 2**53 or not reads_as.is_integer()):
            expected = switch_label(reads_as)
            assert f"is matched as '{expected}'" in message or len(expected) > 40, (label, message)


@pytest.mark.parametrize("label", ["1.50", "01", "1e3", "3.0", "-0", "0x10", "True", "~"])
def test_a_reported_label_is_never_what_a_value_is_matched_as(label: str) -> None:
    values: list[object] = [True, False, None]
    try:
        number = float(label.replace("_", ""))
        values += [number, int(number)]
    except ValueError:
        values += [int(label, 0)] if label.startswith("0x") else []
    assert case_label_mismatch(label) is not None
    assert all(switch_label(v) != label for v in values)


def test_fd312_is_a_documented_warning() -> None:
    assert CODES["FD312"] == ("warning", "switch case that never matches the value it spells")


# --- both syntaxes, at the label ----------------------------------------------------------------------------------


def test_yaml_labels_are_reported_at_the_label_and_quoted_ones_are_strings() -> None:
    text = yaml_switch("1.50", '"2.50"', "'01'", "!!str 3.0", "True", "3", "1.5", "true", "4.0", "express")
    assert fd312(text) == [(7, 7, "/steps/0/cases/1.50", "1.50"), (11, 7, "/steps/0/cases/True", "True"),
                           (15, 7, "/steps/0/cases/4.0", "4.0")]


def test_yaml_flow_mapping_and_explicit_keys_are_reported_at_the_label() -> None:
    text = ("flowdsl: 1\nname: t\nsteps:\n  - switch: pick\n    on: \"${ x }\"\n"
            "    cases: {1e3: [a], \"1e4\": [b], ~: [c], 2: [d]}\n"
            "  - switch: other\n    on: \"${ y }\"\n    cases:\n      ? 6.0\n      : [e]\n")
    assert fd312(text) == [(6, 13, "/steps/0/cases/1e3", "1e3"), (6, 35, "/steps/0/cases/~0", "~"),
                           (10, 9, "/steps/1/cases/6.0", "6.0")]


def test_text_syntax_labels_are_reported_at_the_label_and_strings_are_strings() -> None:
    text = flow_switch("1.50", '"2.50"', "True", "01", "3", "1e-07", "1e-7", "true", "0x10", '"0x11"', "express")
    assert fd312(text, "spec.flow") == [(4, 8, "/steps/0/cases/1.50", "1.50"), (6, 8, "/steps/0/cases/True", "True"),
                                        (7, 8, "/steps/0/cases/01", "01"), (10, 8, "/steps/0/cases/1e-7", "1e-7"),
                                        (12, 8, "/steps/0/cases/0x10", "0x10")]


def test_the_text_line_of_a_yaml_case() -> None:
    (d,) = diagnostics(yaml_switch("1.50"), "orders.yaml")
    assert d.format() == ("orders.yaml:7:7: warning FD312: case '1.50' can only match the string '1.50': the number "
                          "1.5 is matched as '1.5' (write the case as 1.5, or quote it to mean the string)")


def test_labels_inside_a_group_are_checked() -> None:
    text = ("flowdsl: 1\nname: t\nsteps:\n  - for_each: each\n    items: \"${ rows }\"\n    steps:\n"
            "      - switch: pick\n        on: \"${ $item.n }\"\n        cases:\n          2.0: [a]\n")
    assert fd312(text) == [(10, 11, "/steps/0/steps/0/cases/2.0", "2.0")]


def test_labels_written_as_values_are_matched_give_no_warning() -> None:
    text = yaml_switch("1", "2", "true", "false", "null", "0.5", "-3", "express")
    assert fd312(text) == []
    assert fd312(flow_switch("1", "2", "true", "false", "null", "0.5", "-3", "express", '"1.50"'), "spec.flow") == []
