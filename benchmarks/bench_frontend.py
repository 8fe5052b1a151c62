"""Front-end benchmark: load + validate + compile of generated specs, and CLI start-up time.

Run it with ``.venv/bin/python -m benchmarks.bench_frontend`` (``--quick`` for a
smoke run, ``--profile N`` to print a cProfile of the N-step case). It is a
measurement, not a test: nothing here asserts a time. Results and what the
profile showed are recorded in ``benchmarks/RESULTS.md`` under "Front end".

The specs are a realistic mix, generated deterministically (a fixed seed): plain
steps with options (compensations, retry policies, timeouts, ``with:`` mappings
with expressions, ``when:`` conditions, output names), sequences, parallel
groups of sequences, ``for_each`` fan-outs, ``switch`` groups and a few
``needs:`` DAG edges and ``$steps`` references.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SIZES = (100, 1_000, 10_000)


# --- spec generation ----------------------------------------------------------


class _Gen:
    """Builds spec data with exactly ``n`` steps (task nodes)."""

    def __init__(self, n: int, seed: int):
        self.rng = random.Random(seed)
        self.left = n
        self.count = 0

    def step_id(self) -> str:
        self.count += 1
        self.left -= 1
        return f"s{self.count}"

    def step(self, prev: str | None = None) -> Any:
        sid = self.step_id()
        rng = self.rng
        roll = rng.random()
        if roll < 0.35:
            return f"svc.{sid}"
        opts: dict[str, Any] = {"worker": f"svc.{sid}"}
        if rng.random() < 0.3:
            opts["compensate"] = f"svc.undo_{sid}" if rng.random() < 0.5 else {
                "worker": f"svc.undo_{sid}", "with": {"ref": "${ " + sid + "_ref }"}}
        if rng.random() < 0.3:
            opts["retry"] = rng.choice([3, {"attempts": 4, "backoff": "exponential", "initial": "200ms", "max": "5s",
                                            "jitter": "full", "on": ["Timeout"]}])
        if rng.random() < 0.3:
            opts["timeout"] = rng.choice(["500ms", "10s", "1m30s", 30])
        if rng.random() < 0.25:
            opts["with"] = {"order_id": "${ order.id }", "note": "step " + sid + " of ${ order.id }", "n": 3}
        if rng.random() < 0.05:
            opts["when"] = "${ order.total > " + str(rng.randint(1, 100)) + " }"
        if rng.random() < 0.05:
            opts["fail_when"] = "${ status = 'failed' }"
        if rng.random() < 0.2:
            opts["output"] = f"out_{sid}"
        if prev is not None and rng.random() < 0.03:
            opts.setdefault("with", {})["previous"] = "${ $steps." + prev + " }"
        return {sid: opts}

    def nodes(self, budget: int, depth: int) -> list[Any]:
        """A list of nodes holding about ``budget`` steps."""
        out: list[Any] = []
        stop = self.left - budget
        prev: str | None = None
        while self.left > max(stop, 0):
            roll = self.rng.random()
            room = self.left - max(stop, 0)
            if depth < 3 and room >= 6 and roll < 0.10:
                out.append({"parallel": f"p{self.count}", "branches": [
                    {"sequence": f"b{self.count}_{i}", "steps": self.nodes(2, depth + 1)}
                    for i in range(self.rng.randint(2, 3))]})
                prev = None
            elif depth < 3 and room >= 4 and roll < 0.16:
                out.append({"sequence": f"q{self.count}", "steps": self.nodes(3, depth + 1)})
                prev = None
            elif depth < 3 and room >= 3 and roll < 0.19:
                out.append({"for_each": f"f{self.count}", "items": "${ order.items }", "concurrency": 4,
                            "steps": self.nodes(2, depth + 1)})
                prev = None
            elif depth < 3 and room >= 4 and roll < 0.21:
                sw = f"w{self.count}"
                out.append({"switch": sw, "on": "${ order.shipping }",
                            "cases": {"express": self.nodes(1, depth + 1), "standard": self.nodes(1, depth + 1)},
                            "default": self.nodes(1, depth + 1)})
                prev = None
            else:
                node = self.step(prev)
                if prev is not None and self.rng.random() < 0.02:
                    (opts,) = node.values() if isinstance(node, dict) else ({},)
                    if isinstance(node, dict):
                        opts["needs"] = [prev]
                out.append(node)
                prev = next(iter(node)) if isinstance(node, dict) else node.rsplit(".", 1)[-1]
        return out


def generate_spec(n_steps: int, seed: int = 7) -> dict[str, Any]:
    """Spec data with exactly ``n_steps`` task steps (deterministic for a seed)."""
    gen = _Gen(n_steps, seed)
    steps = gen.nodes(n_steps, 0)
    return {
        "flowdsl": 1,
        "name": f"generated_{n_steps}",
        "description": f"A generated flow with {n_steps} steps.",
        "workers": ["svc"],
        "input": {"type": "object", "required": ["order"]},
        "timeout": "1h",
        "defaults": {"retry": {"attempts": 2, "backoff": "exponential", "initial": "100ms", "max": "2s"},
                     "timeout": "30s", "compensate": {"retry": {"attempts": 5}}},
        "steps": steps,
    }


def generate_yaml(n_steps: int, seed: int = 7) -> str:
    """The generated spec as block-style YAML text."""
    return yaml.safe_dump(generate_spec(n_steps, seed), sort_keys=False, default_flow_style=False, width=120)


# --- measurements -------------------------------------------------------------


def _front_end(text: str, filename: str) -> Any:
    from flowdsl.api import compile_loaded, load_text

    return compile_loaded(load_text(text, filename), filename)


PHASES = ("load", "schema", "model", "checks", "compile", "serialise")


def _phases(text: str, filename: str) -> dict[str, float]:
    """Seconds spent in each stage of one load + validate + compile (and serialising the plan)."""
    from flowdsl.api import load_text, plan_bytes
    from flowdsl.checks import check_flow
    from flowdsl.compiler import _Compiler
    from flowdsl.model import build_flow
    from flowdsl.schema import check_schema

    out: dict[str, float] = {}
    t0 = time.perf_counter()
    doc = load_text(text, filename)
    t1 = time.perf_counter()
    check_schema(doc.data)
    t2 = time.perf_counter()
    flow, _ = build_flow(doc.data, filename)
    t3 = time.perf_counter()
    check_flow(flow)
    t4 = time.perf_counter()
    plan = _Compiler(flow).run().plan
    t5 = time.perf_counter()
    plan_bytes(plan)
    t6 = time.perf_counter()
    for name, a, b in zip(PHASES, (t0, t1, t2, t3, t4, t5), (t1, t2, t3, t4, t5, t6), strict=True):
        out[name] = b - a
    return out


def time_front_end(text: str, filename: str, repeat: int) -> tuple[float, dict[str, float], Any]:
    """Median seconds of load + validate + compile over ``repeat`` runs (after one warm-up), the median of
    each stage, and the result."""
    result = _front_end(text, filename)
    times, stages = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        _front_end(text, filename)
        times.append(time.perf_counter() - t0)
        stages.append(_phases(text, filename))
    return statistics.median(times), {k: statistics.median(s[k] for s in stages) for k in PHASES}, result


def time_command(args: list[str], repeat: int = 5) -> float:
    """Median wall-clock seconds of a command (a fresh process each time)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(args, check=False, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile(n_steps: int, top: int = 25) -> str:
    text = generate_yaml(n_steps)
    _front_end(text, "bench.yaml")  # warm caches, as in the timed runs
    prof = cProfile.Profile()
    prof.enable()
    _front_end(text, "bench.yaml")
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    out.write("\n")
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="one run each, sizes 100 and 1,000 only")
    parser.add_argument("--profile", type=int, metavar="N", help="print a cProfile of the N-step case and exit")
    args = parser.parse_args(argv)
    if args.profile:
        print(profile(args.profile))
        return 0

    sizes = SIZES[:2] if args.quick else SIZES
    print(f"flowdsl front-end benchmark — {platform.python_implementation()} {platform.python_version()}, "
          f"{platform.machine()}, {os.cpu_count()} CPU(s), {time.strftime('%Y-%m-%d')}")
    print()
    print(f"{'steps':>7} {'nodes':>7} {'YAML KiB':>9} {'load+validate+compile':>22} {'per step':>10} {'growth':>7}")
    previous: tuple[int, float] | None = None
    breakdown: list[tuple[int, dict[str, float]]] = []
    for n in sizes:
        text = generate_yaml(n)
        repeat = 1 if args.quick else (7 if n <= 1_000 else 3)
        seconds, stages, result = time_front_end(text, "bench.yaml", repeat)
        if not result.ok:
            print(f"generated spec of {n} steps has errors:", *[d.format() for d in result.diagnostics[:5]],
                  sep="\n  ", file=sys.stderr)
            return 1
        nodes = len(result.plan["nodes"])
        growth = f"{seconds / previous[1] / (n / previous[0]):6.2f}x" if previous else "      -"
        print(f"{n:>7,} {nodes:>7,} {len(text.encode()) / 1024:>9.0f} {seconds * 1000:>19.1f} ms "
              f"{seconds / n * 1e6:>7.1f} µs {growth}")
        previous = (n, seconds)
        breakdown.append((n, stages))
    print()
    print("growth: (time ratio) / (size ratio) against the previous row; 1.00x is linear")
    print()
    print("by stage (ms, median; 'serialise' is plan_bytes, not part of the total above):")
    print(f"{'steps':>7} " + " ".join(f"{p:>9}" for p in PHASES))
    for n, stages in breakdown:
        print(f"{n:>7,} " + " ".join(f"{stages[p] * 1000:>9.1f}" for p in PHASES))
    print()

    exe = str(Path(sys.executable).with_name("flowdsl"))
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "small.yaml"
        small.write_text(generate_yaml(10), encoding="utf-8")
        repeat = 1 if args.quick else 5
        python = time_command([sys.executable, "-c", "pass"], repeat)
        help_s = time_command([exe, "--help"], repeat)
        validate_s = time_command([exe, "validate", "--no-import", str(small)], repeat)
    print(f"start-up (median of {repeat}, a fresh process each):")
    print(f"  python -c pass                       {python * 1000:7.0f} ms")
    print(f"  flowdsl --help                       {help_s * 1000:7.0f} ms")
    print(f"  flowdsl validate --no-import small   {validate_s * 1000:7.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
