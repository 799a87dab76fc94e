"""Run every benchmark and write their tables, with the machine they ran on, to one page.

    python benchmarks/run_all.py                  # full runs -> docs/benchmarks.md (minutes)
    python benchmarks/run_all.py --quick          # tiny sizes: a smoke test, figures meaningless
    python benchmarks/run_all.py --only overhead maml_vmap --out /tmp/bench.md

Each benchmark is a script in this folder with a ``main(argv)`` (or a ``main()`` that parses
``sys.argv``) that prints Markdown: a line or two saying what was run, then its tables.
``BENCHMARKS`` lists them with the page's title and description for each and the arguments of
a full and of a quick run. To add a benchmark, write its script that way and add one entry.
The scripts run one after another in this process (each restores any global torch setting it
changes); a script that needs a fresh process per configuration (peak resident memory only
grows) starts its own children, as ``unroll_memory.py`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import inspect
import io
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PAGE = ROOT / "docs" / "benchmarks.md"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark script and how the page presents it."""

    script: str                   # file name in benchmarks/, without .py
    title: str                    # the page's section heading
    about: str                    # what it measures and how to read it (Markdown)
    full: tuple[str, ...] = ()    # arguments of the full run (the script's defaults if empty)
    quick: tuple[str, ...] = ()   # arguments of the smoke run (--quick)


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "overhead", "Overhead and peak memory against a hand-written loop",
        "One bilevel step (a lower SGD step on an MLP classifier with a learned per-layer weight "
        "decay, then an upper Adam step with the method's hypergradient), written with mlodsl "
        "and by hand in plain PyTorch; both must end with the same weights. Time per step is "
        "the median over rounds that alternate between the two; *ratio* is mlodsl's time over "
        "the hand-written one. Peak memory is the most tensor memory alive at once during one "
        "step above what was alive before it, from `torch.profiler`'s allocation events (on "
        "CPU, `tracemalloc` does not see torch's allocations and the process's resident size "
        "is too coarse for a few MiB). mlodsl calls the autograd engine directly, skipping "
        "the Python checks of `torch.autograd.grad` that the hand-written loop pays; the last "
        "two columns time mlodsl through the public function, i.e. the interpreter's own "
        "overhead ([design note](design/fast-paths.md)).",
        quick=("--rounds", "1", "--steps", "1", "--warmup", "1"),
    ),
    Benchmark(
        "hypergrad_accuracy", "Hypergradient accuracy against work",
        "Relative error of each method's hypergradient against the closed form on ridge "
        "regression with a learned per-feature penalty (float64, lower level solved exactly), "
        "as a function of the Hessian-vector products (HVP) it may use; then warm- against "
        "cold-started CG during training. See [Hypergradients](hypergradients.md) for the "
        "methods.",
        quick=("--products", "1", "5", "--warm-steps", "3"),
    ),
    Benchmark(
        "maml_vmap", "MAML: a meta-batch of tasks with vmap",
        "Time per MAML meta-step (sinusoid tasks, MLP 1-40-40-1, one inner SGD step, second "
        "order): mlodsl with `tasks=True` against the same maths written directly with "
        "`torch.func.vmap` (the floor) and against per-task Python loops: with `higher`, the "
        "monkey-patching meta-learning library, and a minimal hand-written clone-and-patch "
        "loop (a lower bound for that style), and mlodsl through the public `torch.func.vmap` "
        "and `torch.autograd.grad` ([design note](design/fast-paths.md)). All must give the "
        "same meta-gradient first.",
        quick=("--tasks", "2", "--shots", "2", "--rounds", "1", "--block", "1"),
    ),
    Benchmark(
        "unroll_memory", "Unrolled differentiation: memory with and without checkpointing",
        "Peak resident memory (above the process's baseline, one fresh process per "
        "configuration) of taking one hypergradient through K unrolled SGD steps of an MLP "
        "(64-256-256-10, batch 256), plain and with `ml.hypergrad.unroll(checkpoint=True)`.",
        quick=("--steps", "2"),
    ),
    Benchmark(
        "nested_unroll_accuracy", "Nested unrolling at three levels: error against steps",
        "`grad=\"unroll\"` on both edges of a three-level quadratic chain (float64): the "
        "relative error of the top level's hypergradient against the closed-form total "
        "derivative as the number K of unrolled steps per level grows, the distance to the "
        "edge-by-edge answer that cg/neumann compute, and the graph it keeps. See "
        "[Hypergradients](hypergradients.md#nested-unrolling).",
        quick=("--steps", "2", "4"),
    ),
    Benchmark(
        "ddp_scaling", "Data parallel: one process against two",
        "Time per program step of a bilevel program (MLP 64-256-256-10, global batch 1024, "
        "cg with 5 iterations) in one process with one thread, in two `torchrun` processes "
        "with one thread each (gloo on CPU), and in one process with two threads. Both "
        "parallel runs use the same two cores. See [Distributed](distributed.md).",
        quick=("--rounds", "1", "--steps", "2", "--warmup", "1", "--batch", "64"),
    ),
)


def machine() -> dict[str, str]:
    """What the figures depend on: CPU, threads, library versions, date, load."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "CPU": cpu,
        "logical CPUs": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "Python": platform.python_version(),
        "OS": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if hasattr(os, "getloadavg"):  # a busy machine makes every timing noisier
        info["load average at start (1 min)"] = f"{os.getloadavg()[0]:.2f}"
    return info


def run_one(bench: Benchmark, quick: bool) -> tuple[str, float]:
    """Import the script, run its ``main(argv)``, return (its Markdown, wall seconds).

    Raises:
        Exception: whatever the benchmark raised (``SystemExit`` included: a script that finds
            its two sides disagree exits).
    """
    path = HERE / f"{bench.script}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{bench.script}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as a normal import would (dataclasses look it up)
    spec.loader.exec_module(module)
    args = list(bench.quick if quick else bench.full)
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        if inspect.signature(module.main).parameters:
            module.main(args)
        else:  # a script whose main() reads sys.argv itself
            saved, sys.argv = sys.argv, [str(path), *args]
            try:
                module.main()
            finally:
                sys.argv = saved
    return out.getvalue().strip(), time.perf_counter() - start


def command(bench: Benchmark, quick: bool) -> str:
    """The command that reproduces one section alone."""
    args = bench.quick if quick else bench.full
    return " ".join(["python", f"benchmarks/{bench.script}.py", *args])


def render(sections: list[tuple[Benchmark, str, float | None]], info: dict[str, str],
           quick: bool) -> str:
    """The whole page."""
    lines = ["<!-- Generated by benchmarks/run_all.py: edit that script, not this page. -->", "",
             "# Benchmarks", ""]
    if quick:
        lines += ['!!! warning "Smoke run: these figures mean nothing"',
                  "    This page was written by `python benchmarks/run_all.py --quick`, which runs "
                  "every benchmark at tiny sizes to check that they work. Regenerate it with "
                  "`python benchmarks/run_all.py` on a quiet machine before reading any figure.",
                  ""]
    lines += ["Every table below comes from one command, `python benchmarks/run_all.py"
              + (" --quick" if quick else "") + "`, on this machine:", "",
              "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in info.items()), "",
              "Timings compare mlodsl with a hand-written equivalent measured side by side in "
              "one process, so ratios are steadier than absolute times; each section gives the "
              "command that reproduces it alone.", ""]
    for bench, body, seconds in sections:
        took = "failed" if seconds is None else f"{seconds:.0f} s"
        lines += [f"## {bench.title}", "", bench.about, "",
                  f"`{command(bench, quick)}` ({took}):", "", body, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: checks every benchmark runs; the figures mean nothing")
    parser.add_argument("--out", type=Path, default=PAGE,
                        help=f"page to write (default {PAGE.relative_to(ROOT)})")
    names = [b.script for b in BENCHMARKS]
    parser.add_argument("--only", nargs="+", choices=names, metavar="NAME",
                        help=f"run only these: {', '.join(names)}")
    args = parser.parse_args(argv)
    if str(ROOT) not in sys.path:  # benchmark this checkout's mlodsl
        sys.path.insert(0, str(ROOT))

    info = machine()
    sections, failed = [], []
    for bench in BENCHMARKS:
        if args.only and bench.script not in args.only:
            continue
        print(f"running {command(bench, args.quick)} ...", file=sys.stderr, flush=True)
        try:
            body, seconds = run_one(bench, args.quick)
        except (Exception, SystemExit):  # noqa: BLE001 - report every benchmark, then fail
            failed.append(bench.script)
            body, seconds = "```\n" + traceback.format_exc() + "```", None
            print(body, file=sys.stderr)
        sections.append((bench, body, seconds))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(sections, info, args.quick))
    print(f"wrote {args.out}", file=sys.stderr)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
