"""finite_diff's xi: H^{-1} taken as xi * I (DARTS's second-order term, xi = the lower level's
learning rate), against the closed form on ridge regression."""

from __future__ import annotations

import pytest

import mlodsl as ml
from quadratic import make_ridge, ridge_program


@pytest.mark.parametrize("xi", [1.0, 0.05])
def test_finite_diff_scales_the_identity_by_xi(xi):
    r = make_ridge()
    r.solve_lower()
    program = ridge_program(r, ml.hypergrad.finite_diff(xi=xi, radius=1e-3))
    (got,) = program.hypergrad("hpo")
    # hpo's loss reads lam only through the ridge weights: the whole answer is the mixed term,
    # -(d^2 L / d lam d w) (xi v) with v = dF/dw and d^2 L / d lam d w = diag(exp(lam) * w).
    w = r.w.detach()
    v = r.Xv.T @ (r.Xv @ w - r.yv) / len(r.Xv)
    expected = -xi * r.lam.detach().exp() * w * v
    assert (got - expected).norm() <= 1e-6 * expected.norm()


def test_xi_must_be_positive():
    with pytest.raises(ValueError, match="xi must be positive"):
        ml.hypergrad.finite_diff(xi=0.0)
