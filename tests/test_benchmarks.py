"""benchmarks/run_all.py: one command runs every benchmark and writes the Markdown page.

A smoke test at tiny sizes (``--quick``): it checks that each benchmark runs, that its table
lands in the page with the machine description, and that the page is valid for the docs site.
The figures themselves are not checked (performance is measured, not asserted).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_run_all():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module        # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_every_table(tmp_path):
    run_all = load_run_all()
    page = tmp_path / "benchmarks.md"
    assert run_all.main(["--quick", "--out", str(page)]) == 0
    text = page.read_text()

    assert "Smoke run" in text                       # a quick page says its figures mean nothing
    for key in ("| CPU |", "| torch threads |", "| torch |", "| date |"):
        assert key in text
    sections = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    assert [s.splitlines()[0] for s in sections] == [b.title for b in run_all.BENCHMARKS]
    for section in sections:                         # each section holds a filled-in table
        table = [line for line in section.splitlines() if line.startswith("|")]
        assert len(table) >= 3, section
        assert "---" in table[1]
    overhead = sections[0]
    assert "peak MiB" in overhead
    for method in ("finite_diff", "cg", "neumann"):
        row = next(line for line in overhead.splitlines() if line.startswith(f"| {method} |"))
        peak = float(row.split("|")[5])
        assert peak > 0                              # the profiler saw the step's tensors


def test_a_failing_benchmark_is_reported_and_fails_the_run(tmp_path, monkeypatch):
    run_all = load_run_all()
    broken = run_all.Benchmark("hypergrad_accuracy", "Broken", "passes a bad argument",
                               quick=("--no-such-option",))
    monkeypatch.setattr(run_all, "BENCHMARKS", (broken,))
    page = tmp_path / "benchmarks.md"
    assert run_all.main(["--quick", "--out", str(page)]) == 1
    assert "## Broken" in page.read_text() and "failed" in page.read_text()


def test_a_new_benchmark_plugs_in_with_one_entry(tmp_path, monkeypatch):
    """Scripts with main(argv) and with a main() that reads sys.argv both work."""
    run_all = load_run_all()
    (tmp_path / "with_argv.py").write_text(
        "def main(argv):\n    print('| size |\\n|---|\\n| ' + argv[-1] + ' |')\n")
    (tmp_path / "reads_sys_argv.py").write_text(
        "import sys\n\ndef main():\n    print('| size |\\n|---|\\n| ' + sys.argv[-1] + ' |')\n")
    monkeypatch.setattr(run_all, "HERE", tmp_path)
    monkeypatch.setattr(run_all, "BENCHMARKS", (
        run_all.Benchmark("with_argv", "First", "about it", full=("--n", "1000"),
                          quick=("--n", "7")),
        run_all.Benchmark("reads_sys_argv", "Second", "about it", quick=("--n", "8")),
    ))
    page = tmp_path / "page.md"
    assert run_all.main(["--quick", "--out", str(page)]) == 0
    text = page.read_text()
    assert "## First" in text and "| 7 |" in text
    assert "`python benchmarks/with_argv.py --n 7`" in text        # the command to reproduce
    assert "## Second" in text and "| 8 |" in text
    assert run_all.main(["--out", str(page), "--only", "with_argv"]) == 0
    text = page.read_text()
    assert "| 1000 |" in text and "## Second" not in text and "Smoke run" not in text
