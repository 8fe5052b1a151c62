"""`flowdsl run --signal NAME:KEY=JSON` and `flowdsl resume --signal NAME:KEY=JSON` (the local runtime): the signals
of a keyed wait (a for_each over an order's parcels, each waiting for `delivered` keyed by its tracking number),
what is refused before anything runs (exit 2), parking with keyed waits and going on with them, and what the
progress, `show` and `--format json` say of them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flowdsl.cli import app
from tests.runtime.conformance import HEADER

#: a (undone by undo.a), the unkeyed wait for 'paid', then per parcel the wait for 'delivered' keyed by its tracking
#: number (its payload as `delivery`), then b
STEPS = ("steps:\n  - conf.a: {compensate: undo.a}\n  - wait: paid\n  - for_each: parcels\n"
         "    items: \"${ order.parcels }\"\n    as: parcel\n    steps:\n      - wait: delivered\n"
         "        key: \"${ $parcel.tracking }\"\n        output: delivery\n  - conf.b\n")
#: the order: two parcels, one tracked by an integer
ORDER = '{"order": {"parcels": [{"tracking": "1Z9"}, {"tracking": 42}]}}'


def cli(*args: str, stdin: str | None = None) -> Any:
    return CliRunner().invoke(app, list(args), input=stdin)


def spec(tmp: Path) -> str:
    path = tmp / "ship.yaml"
    path.write_text(HEADER.format(name="ship") + STEPS)
    return str(path)


def order(tmp: Path) -> str:
    """The file of the run input: :data:`ORDER`."""
    path = tmp / "order.json"
    path.write_text(ORDER)
    return str(path)


def said(text: str) -> str:
    return " ".join(text.split())


def test_keyed_signals_given_with_the_run_reach_the_wait_of_their_key(tmp_path: Path) -> None:
    runs = str(tmp_path / "runs")
    r = cli("run", spec(tmp_path), "--input", order(tmp_path), "--runs-dir", runs, "--run-id", "r1", "--signal", "paid",
            "--signal", 'delivered:42={"n": 42}', "--signal", "delivered:1Z9=@-", "--format", "json",
            stdin='{"n": 1}')
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "completed"
    assert out["context"]["parcels"] == [{"delivery": {"n": 1}}, {"delivery": {"n": 42}}]
    assert [(out["steps"][f"parcels[{i}]/delivered"]["signal"], out["steps"][f"parcels[{i}]/delivered"]["key"])
            for i in range(2)] == [("delivered", "1Z9"), ("delivered", "42")]
    assert out["steps"]["paid"]["key"] is None
    assert "waits for signals (one per instance, with its key)" not in r.stderr  # (sent: no note)
    text = cli("show", "r1", "--runs-dir", runs)
    lines = said(text.stdout + text.stderr)
    for line in ("✉ signal 'delivered' key '42' kept until an instance of wait 'delivered' starts with that key",
                 "⚐ parcels[0]/delivered waits for signal 'delivered' key '1Z9' (no deadline)",
                 "✉ signal 'delivered' key '1Z9' received by wait 'parcels[0]/delivered' (it had been kept until the "
                 "wait started)",
                 "parcels[1]/delivered: signal 'delivered' key '42'", "✉ signal 'paid' kept until wait 'paid' starts"):
        assert line in lines, line
    shown = cli("show", "r1", "--runs-dir", runs, "--format", "json")
    assert json.loads(shown.stdout)["steps"] == out["steps"]


@pytest.mark.parametrize(("value", "message"), [
    ("delivered={}", "--signal delivered: wait 'delivered' tells its instances apart by key: signal 'delivered' "
                     "needs a key"),
    ("delivered", "--signal delivered: wait 'delivered' tells its instances apart by key"),
    ("delivered:=x=y", "--signal delivered:: the key of signal 'delivered' is empty: a key is a non-empty string "
                       "(here the key ends at the first '=': a key holding '=' is sent from Python)"),
    ("paid:K", "--signal paid:K: wait 'paid' takes signal 'paid' without a key (it has no 'key:'): send it with none"),
    ("delivered:" + "x" * 201, "the key of signal 'delivered' has 201 characters: a key has at most 200"),
    ("delivered:1Z9=[1]", "--signal delivered:1Z9: the payload must be a JSON object, found an array"),
    (":1Z9={}", "--signal :1Z9={}: expected NAME, NAME=JSON or NAME=@FILE (a signal's name, then its payload: a JSON "
                "object), with NAME:KEY for a keyed wait's signal"),
])
def test_a_bad_keyed_signal_is_refused_before_the_run_starts(tmp_path: Path, value: str, message: str) -> None:
    r = cli("run", spec(tmp_path), "--input", order(tmp_path), "--runs-dir", str(tmp_path / "runs"), "--signal", value)
    assert r.exit_code == 2 and message in said(r.stderr), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "runs").exists()
    j = cli("run", spec(tmp_path), "--input", order(tmp_path), "--no-record", "--signal", value, "--format", "json")
    assert j.exit_code == 2 and json.loads(j.stdout)["error"]["type"] == "UsageError"


def test_a_keyed_signal_given_twice_is_refused_and_two_keys_are_not(tmp_path: Path) -> None:
    r = cli("run", spec(tmp_path), "--input", order(tmp_path), "--no-record", "--signal", "delivered:1Z9",
            "--signal", "delivered:1Z9={}")
    assert r.exit_code == 2 and "--signal: signal 'delivered' key '1Z9' is given twice" in said(r.stderr)
    r = cli("run", spec(tmp_path), "--input", order(tmp_path), "--no-record", "--signal", "paid",
            "--signal", "delivered:1Z9", "--signal", "delivered:42", "--format", "json")
    assert r.exit_code == 0, r.stderr


def test_a_keyed_wait_nothing_signals_is_noted(tmp_path: Path) -> None:
    from flowdsl import compile_spec
    from flowdsl.cli_signals import unsent_notes

    plan = compile_spec(spec(tmp_path)).plan
    assert plan is not None
    assert unsent_notes(plan, ["paid", "delivered"]) == []
    (note,) = unsent_notes(plan, ["paid"])
    assert note == ("wait 'delivered' (by key) waits for signals (one per instance, with its key) this command does "
                    "not send: a local run takes one only from Python (LocalRun.signal) or as it starts (`flowdsl run "
                    "… --signal delivered:KEY=JSON`); if the run reaches it, it waits for ever (Ctrl-C cancels the "
                    "run)")
    (parked,) = unsent_notes(plan, ["paid"], park=True)
    assert "`flowdsl resume … --signal delivered:KEY=JSON` sends it" in parked


def test_a_run_parked_at_keyed_waits_says_each_key_and_goes_on_with_them(tmp_path: Path) -> None:
    runs = str(tmp_path / "runs")
    r = cli("run", spec(tmp_path), "--input", order(tmp_path), "--runs-dir", runs, "--run-id", "p1", "--signal", "paid",
            "--park")
    assert r.exit_code == 5, r.stderr
    err = said(r.stderr)
    resume = f"flowdsl resume p1 --runs-dir {runs}"
    assert (f"`{resume} --signal delivered:1Z9=JSON` or `{resume} --signal delivered:42=JSON`") in err, err
    assert (f"parcels[0]/delivered: signal 'delivered' key '1Z9', no deadline — `{resume} --signal "
            "delivered:1Z9=JSON`") in err
    j = cli("show", "p1", "--runs-dir", runs, "--format", "json")
    parked = json.loads(j.stdout)["parked"]
    assert [(w["wait"], w["signal"], w["key"]) for w in parked["waits"]] == [
        ("parcels[0]/delivered", "delivered", "1Z9"), ("parcels[1]/delivered", "delivered", "42")]
    text = cli("show", "p1", "--runs-dir", runs)
    assert ("parked: nothing was left but waiting — parcels[0]/delivered (signal 'delivered' key '1Z9'), "
            "parcels[1]/delivered (signal 'delivered' key '42') — and its process let the run go") in \
        said(text.stdout + text.stderr)
    listed = cli("runs", "--backend", "local", "--runs-dir", runs, "--format", "json")
    (row,) = json.loads(listed.stdout)
    assert row["parked"]["waits"] == parked["waits"]

    r = cli("resume", "p1", "--runs-dir", runs, "--signal", "delivered:42", "--park")
    assert r.exit_code == 5, r.stderr
    assert "--signal delivered:42=JSON" not in said(r.stderr) and "--signal delivered:1Z9=JSON" in said(r.stderr)
    r = cli("resume", "p1", "--runs-dir", runs, "--signal", "delivered=@-", stdin="{}")
    assert r.exit_code == 2 and "signal 'delivered' needs a key" in said(r.stderr)
    r = cli("resume", "p1", "--runs-dir", runs, "--signal", 'delivered:1Z9={"n": 1}', "--format", "json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "completed" and out["context"]["parcels"] == [{"delivery": {"n": 1}}, {"delivery": {}}]
