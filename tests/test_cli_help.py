"""What `--help` says: every default the options document (written ``[default: …]`` in their help, which rich
markup would otherwise take for a style tag and drop), and out-of-range values named as given."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flowdsl.cli import app


def _help(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


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
