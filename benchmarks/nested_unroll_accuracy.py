"""Nested unrolling against the closed-form total derivative, as the number of steps grows.

The 3-level quadratic of ``tests/quadratic.py`` (``make_chain3()``, float64): ``top`` unrolls
``mid``, which unrolls ``low``; ``K`` low steps per mid step and ``K`` mid steps per top step
(``K * K`` program steps), SGD at 2 / (lambda_min + lambda_max) for low (0.39) and for mid's
reduced Hessian (0.21). Prints, for the first top update, the relative error of the
hypergradient against the total derivative at the state reached (``Chain3.total``), its
distance to the edge-by-edge answer (``Chain3.edgewise``, what cg/neumann compute at depth)
relative to the total derivative's norm, the
wall time of the cycle, and the tensors saved for backward during it (count and bytes, a
measure of the graph kept).

    python benchmarks/nested_unroll_accuracy.py [--steps 5 10 20 30 40 50]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from quadratic import chain3_modules_program, make_chain3  # noqa: E402


class _Capture:
    def __init__(self) -> None:
        self.grads: list[torch.Tensor] = []

    def on_hypergrad(self, *, program, level, step, grads, diagnostics) -> None:
        if level == "top":
            self.grads.append(grads[0].detach().clone())


def measure(k: int) -> dict[str, float]:
    """One top cycle with ``k`` inner steps on both edges."""
    q = make_chain3()
    capture = _Capture()
    program = chain3_modules_program(q, inner_steps=(k, k), hooks=[capture])
    saved = {"count": 0, "bytes": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved["count"] += 1
        saved["bytes"] += t.numel() * t.element_size()
        return t

    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        program.run(steps=k * k)
    seconds = time.perf_counter() - start
    g = capture.grads[0]
    total, edgewise = q.total(), q.edgewise()
    return {"k": k, "error_total": float((g - total).norm() / total.norm()),
            "gap_edgewise": float((g - edgewise).norm() / total.norm()),
            "seconds": seconds, "saved": saved["count"], "saved_kib": saved["bytes"] / 1024}


def table(steps: tuple[int, ...] = (5, 10, 20, 30, 40, 50)) -> list[dict[str, float]]:
    """Print and return one row per ``K``."""
    rows = [measure(k) for k in steps]
    print("| K (low steps per mid step = mid steps per top step) | low steps per top step | "
          "rel. error vs total derivative | distance to edge-by-edge | time (s) | "
          "saved tensors | saved KiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['k'] ** 2} | {r['error_total']:.2e} | "
              f"{r['gap_edgewise']:.2f} | {r['seconds']:.2f} | {r['saved']} | "
              f"{r['saved_kib']:.0f} |")
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 30, 40, 50])
    return table(tuple(parser.parse_args(argv).steps))


if __name__ == "__main__":
    main()
