"""Regenerate docs/quickstart_graph.svg, the README's drawing of the quickstart program.

Runs examples/quickstart.py's program (the full 2000 steps by default, about 10 s on two CPU
cores) and saves ``program.visualize()`` with its live figures. Needs Graphviz:
``pip install 'mlodsl[viz]'`` and the ``dot`` program.

Usage:
    python docs/render_graph.py [--steps 2000] [--out docs/quickstart_graph.svg]
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "quickstart_graph.svg"
STEPS = 2000


def load_quickstart():
    """examples/quickstart.py as a module."""
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render(steps: int = STEPS, out: Path = OUT) -> Path:
    """Run the quickstart program for ``steps`` classifier steps and save its drawing."""
    quickstart = load_quickstart()
    splits = quickstart.load_splits(quickstart.SEED)
    program, _, _ = quickstart.build_program(splits, quickstart.SEED)
    program.run(steps=steps)
    return program.visualize().save(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS, help=f"default {STEPS}")
    parser.add_argument("--out", type=Path, default=OUT, help=f"default {OUT.relative_to(ROOT)}")
    arguments = parser.parse_args()
    print(render(arguments.steps, arguments.out))
