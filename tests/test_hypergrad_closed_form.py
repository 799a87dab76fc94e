"""Hypergradients against closed forms (float64) at two and three levels."""

from __future__ import annotations

import pytest
import torch

import mlodsl as ml
from quadratic import chain3_program, make_chain3, make_ridge, ridge_program


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("grad", ["exact", ml.hypergrad.cg(iterations=6, tol=0.0)])
def test_ridge_two_levels_exact_and_cg(grad):
    r = make_ridge(d=6)
    program = ridge_program(r, grad)
    r.solve_lower()
    (g,) = program.hypergrad("hpo")
    assert rel_err(g, r.hypergrad()) <= 1e-10


def test_hypergrad_does_not_apply_anything():
    r = make_ridge()
    program = ridge_program(r, "exact")
    r.solve_lower()
    before = (r.w.detach().clone(), r.lam.detach().clone())
    program.hypergrad("hpo")
    assert torch.equal(r.w, before[0]) and torch.equal(r.lam, before[1])
    assert r.lam.grad is None and program.steps["hpo"] == 0


def test_neumann_converges_to_closed_form():
    r = make_ridge(d=6)
    program = ridge_program(r, ml.hypergrad.neumann(iterations=400))
    r.solve_lower()
    (g,) = program.hypergrad("hpo")
    assert rel_err(g, r.hypergrad()) <= 1e-6


def test_lowest_level_hypergrad_is_its_plain_gradient():
    r = make_ridge()
    program = ridge_program(r, "exact")
    (g,) = program.hypergrad("ridge")
    w = r.w.detach().requires_grad_()
    loss = 0.5 * (r.X @ w - r.y).pow(2).mean() + 0.5 * (r.lam.detach().exp() * w**2).sum()
    (expected,) = torch.autograd.grad(loss, w)
    assert torch.allclose(g, expected, rtol=1e-12, atol=1e-14)


def identity_hessian_program(radius: float):
    """L(w; lam) = 1/2 |w - M lam|^2 has H = I, so H^{-1} = I holds exactly for finite_diff."""
    gen = torch.Generator().manual_seed(3)
    M = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    target = torch.randn(5, generator=gen, dtype=torch.float64)
    w = torch.nn.Parameter(torch.randn(5, generator=gen, dtype=torch.float64))
    lam = torch.nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64))

    @ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1))
    def low(up):
        return 0.5 * (w - M @ up.module).pow(2).sum()

    @ml.level(upper_of="low", grad=ml.hypergrad.finite_diff(radius=radius), module=lam,
              optimizer=torch.optim.SGD([lam], lr=0.1))
    def up(low):
        return 0.5 * (low.module - target).pow(2).sum()

    # dF/dlam = (dw*/dlam)^T (w - t) = M^T (w - t) with H = I.
    return ml.program(low, up), w, (lambda: M.T @ (w.detach() - target))


def test_finite_diff_exact_when_hessian_is_identity():
    program, _, expected = identity_hessian_program(radius=0.01)
    (g,) = program.hypergrad("up")
    assert rel_err(g, expected()) <= 1e-8


def test_finite_diff_restores_lower_parameters_bit_exactly():
    program, w, _ = identity_hessian_program(radius=0.37)
    before = w.detach().clone()
    program.hypergrad("up")
    assert torch.equal(w.detach(), before)


@pytest.mark.parametrize("mid", ["exact", "cg", "finite_diff"])
def test_three_levels_exact_is_the_total_derivative(mid):
    """exact on the top level differentiates through both levels below jointly, whatever the
    middle level's own method."""
    q = make_chain3()
    program = chain3_program(q, "exact", mid)
    (g,) = program.hypergrad("top")
    assert rel_err(g, q.total()) <= 1e-10
    assert rel_err(q.total(), q.edgewise()) > 0.05  # the two semantics really differ here


@pytest.mark.parametrize("top,mid", [(ml.hypergrad.cg(iterations=4, tol=0.0), "exact"),
                                     (ml.hypergrad.cg(iterations=4, tol=0.0),
                                      ml.hypergrad.cg(iterations=5, tol=0.0))])
def test_three_levels_edge_methods_use_their_own_hessian(top, mid):
    q = make_chain3()
    program = chain3_program(q, top, mid)
    (g,) = program.hypergrad("top")
    assert rel_err(g, q.edgewise()) <= 1e-10


def test_three_levels_finite_diff_uses_identity_on_every_edge():
    q = make_chain3()
    program = chain3_program(q, "finite_diff", "finite_diff")
    (g,) = program.hypergrad("top")
    assert rel_err(g, q.edgewise_identity()) <= 1e-8


def test_three_levels_gradient_flows_through_both_edges():
    """Dropping either edge's term changes the answer: both paths contribute."""
    q = make_chain3()
    program = chain3_program(q, ml.hypergrad.cg(iterations=4, tol=0.0), "exact")
    (g,) = program.hypergrad("top")
    lam, mu = q.lam.detach(), q.mu.detach()
    without_low_path = q.R @ lam + q.C.T @ torch.linalg.solve(q.Q, mu - q.s)
    assert rel_err(g, q.edgewise()) <= 1e-10
    assert rel_err(g, without_low_path) > 1e-3


def test_hypergradient_steps_follow_closed_form_during_a_run():
    """A run applies lr * (closed-form hypergradient): at w = w* the lower step leaves w in place
    (its gradient is zero), so hpo's SGD step must move lam by exactly that amount."""
    r = make_ridge()
    program = ridge_program(r, "exact", lr=0.1)
    r.solve_lower()
    lam_before, expected = r.lam.detach().clone(), r.hypergrad()
    program.run(steps=1)
    assert rel_err(lam_before - r.lam.detach(), 0.1 * expected) <= 1e-9
    record = program.history["hpo"][-1]
    assert record["hypergrad_norm"] == pytest.approx(float(expected.norm()), rel=1e-9)
    assert record["hpo->ridge/residual"] < 1e-10
