"""Command-line arguments and paths whose bytes are not UTF-8 (Python keeps them as lone surrogates): every command
still ends with one clear line and, under ``--format json``, one whole JSON object on stdout — the byte written as
its JSON escape — never a traceback; and ``--set`` values that are Python's JSON extensions are taken as text."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flowdsl.runtime.codec import json_line
from flowdsl.runtime.inputs import read_input
from flowdsl.runtime.redis import RedisClient
from tests.runtime.conformance import HEADER

ROOT = Path(__file__).resolve().parents[2]


def _flowdsl(*args: str | bytes, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    return subprocess.run([sys.executable, "-m", "flowdsl", *args], cwd=cwd, env=env, capture_output=True,
                          timeout=60, check=False)


def test_json_line_escapes_a_lone_surrogate_and_keeps_other_text() -> None:
    line = json_line({"path": "u\udcffd/é", "n": 1})
    assert line.endswith("\n") and "\\udcff" in line and "é" in line
    assert json.loads(line) == {"path": "u\udcffd/é", "n": 1}
    line.encode("utf-8")  # it can be written


def test_a_runs_dir_that_is_not_utf8_still_gives_the_run_its_one_json_object(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(HEADER.format(name="s") + "steps: [conf.a]\n")
    ran = _flowdsl("run", "s.yaml", "--runs-dir", b"u\xffd", "--format", "json", "--set", "script={}", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)
    assert out["status"] == "completed" and out["record"].startswith("u\udcffd/")
    assert b"Traceback" not in ran.stderr
    assert (tmp_path / os.fsdecode(b"u\xffd")).is_dir()


@pytest.mark.parametrize("args", [
    [b"nope\xff.yaml", "--format", "json"],
    ["s.yaml", "--input", b"nope\xff.json", "--format", "json"],
    ["s.yaml", "--backend", "redis", "--redis-url", b"unix:///tmp/no\xff.sock", "--format", "json"],
])
def test_a_path_or_url_that_is_not_utf8_is_an_error_with_its_json_object(tmp_path: Path, args: list[Any]) -> None:
    (tmp_path / "s.yaml").write_text(HEADER.format(name="s") + "steps: [conf.a]\n")
    ran = _flowdsl("run", *args, cwd=tmp_path)
    assert ran.returncode == 2, ran.stderr
    assert b"Traceback" not in ran.stderr
    [line] = ran.stdout.decode("utf-8").splitlines()
    assert json.loads(line)["status"] in ("error", "rejected")
    # the byte, named by its escape: \xff as a message says a path's byte (its JSON: \\xff), else \udcff
    assert "\\udcff" in line or "\\\\xff" in line


def test_a_cancel_reason_that_is_not_utf8_is_a_usage_error_before_redis_is_asked(tmp_path: Path) -> None:
    ran = _flowdsl("cancel", "r1", "--reason", b"ab\xffc", "--redis-url", "unix:///tmp/flowdsl-none.sock",
                   "--format", "json", cwd=tmp_path)
    assert ran.returncode == 2
    assert b"Traceback" not in ran.stderr and b"Future exception" not in ran.stderr
    out = json.loads(ran.stdout)
    assert "'--reason'" in out["error"]["message"] and "byte 0xff" in out["error"]["message"]


def test_the_client_refuses_a_reason_it_cannot_send_before_sending_anything() -> None:
    async def main() -> None:
        async with RedisClient("unix:///tmp/flowdsl-none.sock") as client:
            with pytest.raises(ValueError, match="byte 0xff"):
                await client.cancel("r1", "ab\udcffc")
    asyncio.run(main())


def test_set_takes_nan_and_infinity_as_text_as_any_value_that_is_not_json() -> None:
    got = read_input(None, ["name=NaN", "code=Infinity", "low=-Infinity", "list=[1,NaN]", "n=1.5"])
    assert got == {"name": "NaN", "code": "Infinity", "low": "-Infinity", "list": "[1,NaN]", "n": 1.5}


@pytest.mark.parametrize("seed", ["7", 1.5, True])
def test_a_seed_that_is_not_an_integer_is_refused_by_both_runtimes_before_anything_runs(seed: Any) -> None:
    from flowdsl import compile_text
    from flowdsl.runtime.local import LocalRun

    plan = compile_text(HEADER.format(name="s") + "steps: [conf.a]\n")
    with pytest.raises(ValueError, match="the seed must be an integer or None"):
        LocalRun(plan, {}, seed=seed, record=False)

    async def submit() -> None:
        async with RedisClient("unix:///tmp/flowdsl-none.sock") as client:
            await client.submit(plan, {}, run_id="r1", seed=seed)
    with pytest.raises(ValueError, match="the seed must be an integer or None"):
        asyncio.run(submit())


@pytest.mark.parametrize("content", [b"", b"  \n\t", b"\xef\xbb\xbf\n"])
def test_an_empty_input_is_said_to_be_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes) -> None:
    import io

    from flowdsl.runtime.inputs import InputError

    path = tmp_path / "in.json"
    path.write_bytes(content)
    with pytest.raises(InputError, match=r"in\.json is empty: the run input must be a JSON object, e\.g\. \{\}"):
        read_input(str(path))
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(content)))
    with pytest.raises(InputError, match=r"^stdin is empty \(nothing was piped in\): the run input must be"):
        read_input("-")


@pytest.mark.parametrize("sets", [["a=1", "a=2"], ["a.b=1", "a=2"], ["a=2", "a.b=1"], ["x.y.z=1", "x.y={}"]])
def test_a_key_set_twice_is_refused_never_last_wins(sets: list[str]) -> None:
    from flowdsl.runtime.inputs import InputError

    with pytest.raises(InputError, match=rf"^--set {sets[1]}: it sets what --set {sets[0]} sets already "):
        read_input(None, sets)
    assert read_input(None, ["a.b=1", "a.c=2", "ab=3"]) == {"a": {"b": 1, "c": 2}, "ab": 3}
