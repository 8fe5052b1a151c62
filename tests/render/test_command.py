"""The ``flowdsl diagram`` command: formats, files, run states, and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flowdsl.cli import app
from tests.render.cases import EXAMPLES, compile_plan, simulate

ECOMMERCE = str(EXAMPLES / "ecommerce_order" / "flow.yaml")
HAS_DOT = shutil.which("dot") is not None


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["diagram", *args])
    return result.exit_code, result.stdout, result.stderr


def test_ascii_to_stdout_by_default() -> None:
    code, out, _ = run(ECOMMERCE)
    assert code == 0
    assert out.startswith("ecommerce_order v1.0") and "┌" in out and "◉ end" in out


def test_ascii_only() -> None:
    code, out, _ = run(ECOMMERCE, "--format", "ascii", "--ascii-only")
    assert code == 0 and out.isascii() and "+---" in out


def test_mermaid_markdown() -> None:
    code, out, _ = run(ECOMMERCE, "-f", "mermaid", "--markdown")
    assert code == 0 and out.startswith("```mermaid\nflowchart TD\n") and out.endswith("```\n")


def test_format_from_output_suffix(tmp_path: Path) -> None:
    target = tmp_path / "flow.dot"
    code, out, err = run(ECOMMERCE, "-o", str(target))
    assert code == 0 and out == ""
    assert target.read_text(encoding="utf-8").startswith("digraph flowdsl {")
    assert "wrote" in err
    readme = tmp_path / "flow.md"
    assert run(ECOMMERCE, "-o", str(readme))[0] == 0
    assert readme.read_text(encoding="utf-8").startswith("```mermaid\nflowchart TD\n")


@pytest.mark.skipif(not HAS_DOT, reason="Graphviz 'dot' is not installed")
def test_svg_and_png_files(tmp_path: Path) -> None:
    for name, magic in (("flow.svg", b"<?xml"), ("flow.png", b"\x89PNG")):
        code, _, _ = run(ECOMMERCE, "-o", str(tmp_path / name))
        assert code == 0 and (tmp_path / name).read_bytes().startswith(magic)


def test_missing_dot_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    code, _, err = run(ECOMMERCE, "-f", "svg", "-o", str(tmp_path / "x.svg"))
    assert code == 2
    assert "'dot' program" in err and "graphviz" in err and "apt-get install graphviz" in err
    assert not (tmp_path / "x.svg").exists()


def test_run_states_from_a_recorded_run(tmp_path: Path) -> None:
    plan = compile_plan(Path(ECOMMERCE))
    run_input = {"order": {"id": "o", "customer_id": "c", "items": [], "total_amount": 1.0}}
    _, events = simulate(plan, fail={"process_payment"}, run_input=run_input, run_id="r-42")
    runs = tmp_path / "runs"
    runs.mkdir()
    header = {"type": "record", "plan": plan, "input": run_input}
    (runs / "r-42.jsonl").write_text("\n".join(json.dumps(x) for x in [header, *events]) + "\n", encoding="utf-8")
    code, out, err = run(ECOMMERCE, "-f", "mermaid", "--run", "r-42", "--runs-dir", str(runs))
    assert code == 0, err
    assert "st_failed" in out and "run r-42: compensated" in out and "warning" not in err
    code, out, _ = run(ECOMMERCE, "--events", str(runs / "r-42.jsonl"), "--ascii-only")
    assert code == 0 and "[FAILED] process_payment" in out
    header["plan"] = {**plan, "flow": {**plan["flow"], "description": "the flow as it was"}}  # (still a plan)
    (runs / "r-43.jsonl").write_text("\n".join(json.dumps(x) for x in [header, *events]) + "\n", encoding="utf-8")
    code, _, err = run(ECOMMERCE, "--run", "r-43", "--runs-dir", str(runs))
    assert code == 0 and "has changed since run r-43" in err


def test_usage_errors(tmp_path: Path) -> None:
    code, _, err = run(ECOMMERCE, "--run", "r-nope", "--runs-dir", str(tmp_path))
    assert code == 2 and "no recorded run 'r-nope'" in err
    code, _, err = run(ECOMMERCE, "--run", "../etc/passwd")
    assert code == 2 and "invalid run id" in err
    code, _, err = run(ECOMMERCE, "--run", "a", "--events", str(tmp_path / "e.jsonl"))
    assert code == 2 and "give one of them" in err
    code, _, err = run(ECOMMERCE, "-f", "mermaid", "--ascii-only")
    assert code == 2 and "--ascii-only applies to the ascii format" in err
    code, _, err = run(ECOMMERCE, "-f", "png", "--markdown", "-o", str(tmp_path / "x.png"))
    assert code == 2 and "--markdown" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n", encoding="utf-8")
    code, _, err = run(ECOMMERCE, "--events", str(bad))
    assert code == 2 and "bad.jsonl:1" in err


def test_spec_errors_print_like_validate(tmp_path: Path) -> None:
    spec = tmp_path / "broken.yaml"
    spec.write_text("flowdsl: 1\nname: broken\nsteps:\n  - a: {needs: [zzz]}\n", encoding="utf-8")
    code, out, err = run(str(spec))
    assert code == 1 and out == ""
    assert "broken.yaml:" in err and "error FD" in err
    code, _, err = run(str(tmp_path / "missing.yaml"))
    assert code == 2 and "FD101" in err


def test_width_option_degrades_instead_of_breaking() -> None:
    spec = str(EXAMPLES / "order_management" / "flow.yaml")
    code, out, _ = run(spec, "--width", "50")
    assert code == 0
    assert "╟─▶" in out  # lanes too wide for 50 columns hang one under another off a rail
    assert max(len(line) for line in out.splitlines()) <= 60


def test_a_run_recorded_by_the_local_runtime(tmp_path: Path) -> None:
    from flowdsl.runtime.local import run as run_locally

    plan = compile_plan(Path(ECOMMERCE))
    declined = json.loads((EXAMPLES / "ecommerce_order" / "inputs" / "payment_declined.json").read_text())
    result = run_locally(plan, declined, run_id="r-declined", runs_dir=tmp_path, seed=1)
    assert result.status == "compensated"
    code, out, err = run(ECOMMERCE, "--run", "r-declined", "--runs-dir", str(tmp_path))
    assert code == 0, err
    assert "✓ validate_order" in out and "↺ check_inventory" in out and "✗ process_payment" in out
    assert "↺ ↶ release_inventory" in out and "run r-declined: compensated" in out


def _record(path: Path, plan: dict, events: list[dict]) -> Path:
    header = {"type": "record", "plan": plan, "input": {}}
    path.write_text("\n".join(json.dumps(x) for x in [header, *events]) + "\n", encoding="utf-8")
    return path


def test_events_that_are_not_a_run_of_the_flow_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    code, out, err = run(ECOMMERCE, "--events", str(empty))
    assert code == 2 and out == "" and "holds no events" in err and "Traceback" not in err
    strangers = tmp_path / "strangers.jsonl"
    strangers.write_text("\n".join(json.dumps({"type": "step_succeeded", "step": s, "run_id": "r-x"})
                                   for s in ("alpha", "beta", "gamma")) + "\n", encoding="utf-8")
    code, _, err = run(ECOMMERCE, "--events", str(strangers))
    assert code == 2 and "not a run of flow 'ecommerce_order'" in err and "alpha" in err
    other = compile_plan(EXAMPLES / "order_management" / "flow.yaml")
    _, events = simulate(other, run_id="r-other")
    runs = tmp_path / "runs"
    runs.mkdir()
    _record(runs / "r-other.jsonl", other, events)
    for args in (("--run", "r-other", "--runs-dir", str(runs)), ("--events", str(runs / "r-other.jsonl"))):
        code, _, err = run(ECOMMERCE, *args)
        assert code == 2, err
        assert "run of flow 'order_management', not of 'ecommerce_order'" in " ".join(err.split())
        assert "has changed" not in err
    _record(runs / "r-bare.jsonl", other, [e for e in events if e.get("type") != "run_started"])
    code, _, err = run(ECOMMERCE, "--events", str(runs / "r-bare.jsonl"))  # the header still names the flow
    assert code == 2 and "order_management" in err


def test_events_without_a_run_id_are_captioned_by_their_file(tmp_path: Path) -> None:
    plan = compile_plan(Path(ECOMMERCE))
    _, events = simulate(plan, fail={"process_payment"})
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps({k: v for k, v in e.items() if k != "run_id"}) for e in events) + "\n",
                   encoding="utf-8")
    code, out, err = run(ECOMMERCE, "--events", str(log))
    assert code == 0, err
    assert "\nrun log.jsonl: " in out


def test_options_a_format_does_not_take_are_refused(tmp_path: Path) -> None:
    for fmt in ("mermaid", "dot", "svg", "png"):
        code, _, err = run(ECOMMERCE, "-f", fmt, "--width", "100", "-o", str(tmp_path / f"x.{fmt}"))
        assert code == 2 and "--width applies to the ascii format" in err
        assert not (tmp_path / f"x.{fmt}").exists()
    code, _, err = run(ECOMMERCE, "-f", "ascii", "--width", "100")
    assert code == 0 and err == ""


def test_an_output_suffix_that_contradicts_the_format_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "x.svg"
    code, _, err = run(ECOMMERCE, "-f", "png", "-o", str(target))
    assert code == 2 and "names a svg file but --format is png" in " ".join(err.split()) and ".png" in err
    assert not target.exists()
    code, _, err = run(ECOMMERCE, "-f", "mermaid", "-o", str(tmp_path / "x.dot"))
    assert code == 2 and "names a dot file" in err
    readme = tmp_path / "x.md"  # a Markdown file takes any text format, fenced
    assert run(ECOMMERCE, "-f", "ascii", "-o", str(readme))[0] == 0
    assert readme.read_text(encoding="utf-8").startswith("```text\necommerce_order")
    assert run(ECOMMERCE, "-f", "dot", "-o", str(tmp_path / "plain"))[0] == 0  # no suffix: nothing to contradict


def test_an_output_suffix_flowdsl_does_not_draw_is_refused(tmp_path: Path) -> None:
    """`-o x.jpg` wrote ASCII text into the .jpg, saying "wrote x.jpg (ascii)"."""
    target = tmp_path / "x.jpg"
    code, _, err = run(ECOMMERCE, "-o", str(target))
    said = " ".join(err.split())
    assert code == 2 and "flowdsl draws no .jpg files" in said and ".svg (svg)" in said and not target.exists()
    assert run(ECOMMERCE, "-f", "ascii", "-o", str(target))[0] == 0  # asked for: written as asked
    assert run(ECOMMERCE, "-o", str(tmp_path / "plain"))[0] == 0  # no suffix: ascii, as before


def test_a_missing_local_record_with_a_redis_url_in_the_environment_says_how_to_read_redis(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWDSL_REDIS_URL", "redis://127.0.0.1:1/0")
    code, _, err = run(ECOMMERCE, "--run", "r-1", "--runs-dir", str(tmp_path))
    said = " ".join(err.split())
    assert code == 2 and "no recorded run 'r-1'" in said and "is read with --redis-url URL" in said
    monkeypatch.delenv("FLOWDSL_REDIS_URL")
    assert "--redis-url" not in run(ECOMMERCE, "--run", "r-1", "--runs-dir", str(tmp_path))[2]


def test_redis_and_record_options_need_their_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWDSL_REDIS_URL", "redis://127.0.0.1:1/0")  # never reached: refused before connecting
    code, _, err = run(ECOMMERCE, "--prefix", "shop")
    assert code == 2 and "--prefix" in err and "--redis-url" in err
    code, _, err = run(ECOMMERCE, "--run", "r-1", "--prefix", "shop", "--runs-dir", str(tmp_path))
    assert code == 2 and "--prefix" in err
    code, _, err = run(ECOMMERCE, "--runs-dir", str(tmp_path))
    assert code == 2 and "--runs-dir" in err
    code, _, err = run(ECOMMERCE, "--run", "r-1", "--redis-url", "redis://127.0.0.1:1/0", "--runs-dir", str(tmp_path))
    assert code == 2 and "--runs-dir" in err
    code, _, err = run(ECOMMERCE, "--run", "r-1", "--redis-url", "redis://127.0.0.1:1/0",
                       "--events", str(tmp_path / "e.jsonl"))
    assert code == 2 and "give one of them" in err


def test_render_refuses_options_its_format_does_not_take() -> None:
    from flowdsl.render import RenderError, render

    plan = compile_plan(Path(ECOMMERCE))
    for fmt, options in (("mermaid", {"width": 100}), ("dot", {"ascii_only": True}), ("svg", {"markdown": True}),
                         ("png", {"markdown": True})):
        with pytest.raises(RenderError, match="applies to the"):
            render(plan, fmt, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(("fmt", "info"), [("mermaid", "mermaid"), ("ascii", "text"), ("dot", "dot")])
def test_render_fences_every_text_format_as_the_command_does(fmt: str, info: str) -> None:
    """docs/diagrams.md: ``--markdown`` applies to the text forms, and ``render()`` takes it as the command does."""
    from flowdsl.render import render

    plan = compile_plan(Path(ECOMMERCE))
    fenced = render(plan, fmt, markdown=True)
    code, out, _ = run(ECOMMERCE, "-f", fmt, "--markdown")
    assert code == 0 and fenced == out
    assert fenced == f"```{info}\n{render(plan, fmt)}```\n"
