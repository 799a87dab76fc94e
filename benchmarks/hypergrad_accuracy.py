"""Hypergradient accuracy against work, per method, on two ridge problems with closed forms.

Problems: ridge regression with a learned per-feature L2 penalty (float64), the lower level
solved exactly, the upper level a validation loss.
- diabetes: scikit-learn's diabetes data (442 x 10, standardized), split in halves.
- synthetic: 40 features stretched so the lower Hessian has condition number ~1e3.

Prints relative error vs. Hessian-vector products per method, then warm- against cold-started
CG during a training run (products needed for the same tolerance).

    python benchmarks/hypergrad_accuracy.py [--products 1 2 5 10 20 50 100] [--warm-steps 50]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import mlodsl as ml  # noqa: E402
from quadratic import DTYPE, make_ridge, ridge_from_data, ridge_program  # noqa: E402

PRODUCTS = (1, 2, 5, 10, 20, 50, 100)


def diabetes():
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    X = torch.tensor(X, dtype=DTYPE)
    y = torch.tensor(y, dtype=DTYPE)
    X = (X - X.mean(0)) / X.std(0)
    y = (y - y.mean()) / y.std()
    half = len(X) // 2
    return ridge_from_data(X[:half], y[:half], X[half:], y[half:], log_decay=-3.0)


def synthetic():
    return make_ridge(n=200, d=40, seed=1, scales=torch.logspace(0, 1.5, 40, dtype=DTYPE))


def error(problem, method) -> float:
    program = ridge_program(problem, method)
    problem.solve_lower()
    (g,) = program.hypergrad("hpo")
    ref = problem.hypergrad()
    return float((g - ref).norm() / ref.norm())


def accuracy_table(name: str, make, products=PRODUCTS) -> None:
    problem = make()
    cond = float(torch.linalg.cond(problem.hessian()))
    print(f"\n### {name}: {len(problem.w)} parameters, lower Hessian condition number {cond:.3g}\n")
    print("| method | " + " | ".join(f"{k} HVP" for k in products) + " |")
    print("|---|" + "---|" * len(products))
    rows = {
        "cg": lambda k: ml.hypergrad.cg(iterations=k, tol=0.0, warm_start=False),
        "neumann (guarded; +10 HVP per eigenvalue estimate)":
            lambda k: ml.hypergrad.neumann(iterations=k),
    }
    for label, factory in rows.items():
        cells = [f"{error(make(), factory(k)):.2e}" for k in products]
        print(f"| {label} | " + " | ".join(cells) + " |")
    fixed = {"finite_diff (0 HVP, 2 gradients)": ml.hypergrad.finite_diff(),
             "sama (lower SGD lr 0.1; 0 HVP, 2 gradients)": ml.hypergrad.sama(),
             "exact (dense solve)": ml.hypergrad.exact()}
    for label, method in fixed.items():
        print(f"| {label} | {error(make(), method):.2e} |" + " |" * (len(products) - 1))


def warm_start_table(steps: int = 50, tol: float = 1e-6) -> None:
    print(f"\n### Warm- vs cold-started CG over {steps} training steps (synthetic, tol {tol:g})\n")
    print("| CG start | HVPs in total | mean per step | final relative error |")
    print("|---|---|---|---|")
    for warm in (True, False):
        problem = synthetic()
        program = ridge_program(problem, ml.hypergrad.cg(iterations=200, tol=tol,
                                                         warm_start=warm), lr=0.002)
        problem.solve_lower()
        history = program.run(steps=steps)
        used = history.series("hpo", "hpo->ridge/iterations")
        problem.solve_lower()
        (g,) = program.hypergrad("hpo")
        ref = problem.hypergrad()
        err = float((g - ref).norm() / ref.norm())
        label = "warm (default)" if warm else "cold"
        print(f"| {label} | {sum(used)} | {sum(used) / len(used):.1f} | {err:.1e} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, nargs="+", default=list(PRODUCTS),
                        help="Hessian-vector products per column (1 2 5 10 20 50 100)")
    parser.add_argument("--warm-steps", type=int, default=50,
                        help="training steps of the warm- vs cold-start table (50)")
    args = parser.parse_args(argv)
    print("Relative error of the hypergradient against the closed form (float64).")
    accuracy_table("diabetes (scikit-learn)", diabetes, args.products)
    accuracy_table("synthetic, ill-conditioned", synthetic, args.products)
    warm_start_table(args.warm_steps)

if __name__ == "__main__":
    main()
