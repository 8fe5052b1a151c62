"""The wheel ships the grammar and the schema as real files, and an installed flowdsl reads them from there.

In the source tree ``flowdsl/_data/`` holds symlinks to ``grammar/flowdsl.lark`` and the schemas of ``specs/``;
the wheel must carry the files themselves.
Builds the wheel once (a few seconds), installs it into a temporary directory
and runs a child interpreter that imports flowdsl from there only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = {
    "flowdsl/_data/flowdsl.lark": ROOT / "grammar" / "flowdsl.lark",
    "flowdsl/_data/flowdsl.schema.json": ROOT / "specs" / "flowdsl.schema.json",
    "flowdsl/_data/plan.schema.json": ROOT / "specs" / "plan.schema.json",
    "flowdsl/_data/flowdsl-test.schema.json": ROOT / "specs" / "flowdsl-test.schema.json",
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # without build isolation when hatchling is installed: offline and twice as fast
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("hatchling") else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True, timeout=180)
    (built,) = out.glob("flowdsl-*.whl")
    return built


def test_the_wheel_holds_the_grammar_and_schema_as_real_files(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        for name, source in DATA.items():
            info = zf.getinfo(name)
            mode = info.external_attr >> 16
            assert not (mode and (mode & 0o170000) == 0o120000), f"{name} is a symlink in the wheel"
            assert zf.read(name) == source.read_bytes(), f"{name} differs from {source.relative_to(ROOT)}"
        json.loads(zf.read("flowdsl/_data/flowdsl.schema.json"))
        names = zf.namelist()
        assert {"flowdsl/source.py", "flowdsl/cli.py", "flowdsl/textsyntax.py"} <= set(names)
        assert zf.read("flowdsl/py.typed") == b"", "the wheel must mark the package typed (PEP 561)"
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "flowdsl = flowdsl.launch:main" in zf.read(entry_points).decode()


_CHECK = """
import json, sys
from pathlib import Path
import flowdsl
from flowdsl import schema, textsyntax
from flowdsl.api import compile_text
here = Path(flowdsl.__file__).resolve().parent
schema_file = schema.data_file("flowdsl.schema.json", "specs")
plan = compile_text("flow packaged\\nstep a\\nstep b undo c\\n", filename="x.flow")
print(json.dumps({
    "package": str(here),
    "schema": str(schema_file),
    "schema_is_link": schema_file.is_symlink(),
    "schema_title": schema.spec_schema()["title"],
    "grammar": textsyntax._grammar_text()[:200],
    "root": plan["root"],
}))
"""


def test_an_installed_flowdsl_reads_its_data_from_the_package(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=120)
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout)
    package = target / "flowdsl"
    assert Path(found["package"]) == package.resolve(), "the child imported flowdsl from the source tree"
    assert Path(found["schema"]) == package / "_data" / "flowdsl.schema.json" and not found["schema_is_link"]
    assert found["schema_title"] == json.loads(DATA["flowdsl/_data/flowdsl.schema.json"].read_text())["title"]
    assert found["grammar"] == DATA["flowdsl/_data/flowdsl.lark"].read_text()[:200]
    assert found["root"] == ["a", "b"]
    assert not (target / "grammar").exists() and not (target / "specs").exists()
