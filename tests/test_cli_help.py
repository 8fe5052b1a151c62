"""What `--help` says: every default the options document (written ``[default: …]`` in their help, which rich
markup would otherwise take for a style tag and drop), and out-of-range values named as given."""

from __future__ import annotations

import itertools
import re
from unittest import mock

import pytest
import typer
import typer.rich_utils
from typer.testing import CliRunner

from flowdsl.cli import app


def _help_at(columns: int, *args: str) -> str:
    """What ``flowdsl ARGS --help`` prints ``columns`` wide. (typer reads $TERMINAL_WIDTH once, as typer.rich_utils
    is imported: the first test of a process to import it with that variable set fixed every later help's width,
    and under pytest-xdist the order of the tests decided which — so the width is set where typer keeps it.)"""
    with mock.patch.object(typer.rich_utils, "MAX_WIDTH", columns):
        result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.output


def _help(*command: str) -> str:
    return " ".join(_help_at(300, *command).split())


@pytest.mark.parametrize(("command", "said"), [
    (("run",), "[default: generated]"),
    (("run",), "[default: $FLOWDSL_RUNS_DIR or .flowdsl/runs]"),
    (("run",), "[default: $FLOWDSL_LATE_GRACE or 30]"),
    (("run",), "[default: the workers' setting]"),
    (("run",), "[default: $FLOWDSL_REDIS_URL or redis://localhost:6379/0]"),
    (("status",), "[default: $FLOWDSL_REDIS_PREFIX or flowdsl]"),
    (("show",), "[default: $FLOWDSL_RUNS_DIR or .flowdsl/runs]"),
    (("runs",), "[default: $FLOWDSL_RUNS_DIR or .flowdsl/runs]"),
    (("runs",), "[default: redis]"),
    (("convert",), "[default: from -o's suffix: .yaml/.yml or .flow]"),
    (("worker",), "[default: no limit]"),
])
def test_help_shows_each_documented_default(command: tuple[str, ...], said: str) -> None:
    assert said in _help(*command)


@pytest.mark.parametrize(("option", "value", "said"), [
    ("--late-grace", "31536001", "31536001 is not a number of seconds from 0 to 31536000"),
    ("--late-grace", "-0.5", "-0.5 is not a number of seconds"),
])
def test_an_out_of_range_value_is_named_as_given(option: str, value: str, said: str) -> None:
    result = CliRunner().invoke(app, ["run", "x.yaml", option, value], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert said in " ".join(result.output.split())


# --- the text reflows to the terminal: no line break inside a sentence -------------------------------------------

COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def _description(command: tuple[str, ...], columns: int) -> list[str]:
    """The lines of a command's help text as `--help` prints it ``columns`` wide: from its first line after
    ``Usage:`` to the first table of options, without the margin of one column."""
    lines = [line.rstrip() for line in _help_at(columns, *command).splitlines()]
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("Usage:")) + 1
    end = next(i for i, line in enumerate(lines) if line.startswith("╭"))
    assert all(not line or line.startswith(" ") for line in lines[start:end])
    return [line[1:] for line in lines[start:end]]


def test_every_command_is_checked() -> None:
    assert {"run", "status", "cancel", "signal", "worker", "runs", "workers", "dead-letters",
            "diagram"} <= set(COMMANDS)


@pytest.mark.parametrize("columns", [80, 120, 200])
@pytest.mark.parametrize("command", [(), *((c,) for c in COMMANDS)], ids=lambda c: " ".join(c) or "flowdsl")
def test_help_text_breaks_a_line_only_where_it_is_full(command: tuple[str, ...], columns: int) -> None:
    """A line of prose ends only where the next word would not fit (the terminal wraps it) or where its
    paragraph ends; only the items of a list (indented) start lines of their own. The help of `run` had line
    breaks from its docstring, which rich keeps, in the middle of sentences at every width."""
    room = columns - 2  # rich's margin of one column each side
    lines = _description(command, columns)
    assert any(lines)
    for line, after in itertools.pairwise(lines):
        if line and after and not after.startswith("  "):
            assert len(line) + 1 + len(after.split()[0]) > room, f"a line break inside a sentence: {line!r} / {after!r}"


@pytest.mark.parametrize("command", ["run", "resume", "status", "cancel", "signal", "worker", "runs", "workers",
                                     "dead-letters", "resolve", "prune"])
def test_exit_codes_are_listed_one_a_line(command: str) -> None:
    lines = _description((command,), 200)
    start = lines.index("Exit codes:") + 1
    items = lines[start:lines.index("", start)] if "" in lines[start:] else lines[start:]
    assert len(items) >= 2 and all(re.match(r"  \d+ +\S", item) for item in items), items
    assert [int(item.split()[0]) for item in items] == sorted(int(item.split()[0]) for item in items)


def test_the_list_of_commands_gives_each_a_summary_of_one_sentence_in_the_order_of_work() -> None:
    """`flowdsl --help` lists each command with the first paragraph of its help: one line at 200 columns (the
    summary of `convert` ran on into a second sentence, broken where its docstring's line ended), in the
    order a user meets them — specs, tests of flows, runs, the Redis runtime, looking after finished runs,
    diagrams — whatever module defines them."""
    output = _help_at(200)
    box = [line for line in output[output.index("Commands"):].splitlines() if line.startswith("│")]
    rows = [line.strip("│ ").split(None, 1) for line in box]
    assert all(len(row) == 2 and row[0] in COMMANDS for row in rows), box  # (a continued summary: no name)
    assert [row[0] for row in rows] == ["validate", "plan", "convert", "test", "run", "show", "resume", "worker",
                                        "status", "runs", "workers", "cancel", "signal", "dead-letters", "resolve",
                                        "prune", "diagram"]
