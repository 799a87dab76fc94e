"""ml.check_hypergrad, and every method against central finite differences of the re-solved
upper objective, at two and three levels."""

from __future__ import annotations

import pytest
import torch

import mlodsl as ml
from quadratic import make_ridge, nonlinear_chain3_program, ridge_program


@pytest.mark.parametrize("grad,tolerance", [
    ("exact", 1e-7),
    (ml.hypergrad.cg(iterations=6, tol=0.0), 1e-7),
    (ml.hypergrad.neumann(iterations=400), 1e-5),
])
def test_two_levels_against_finite_differences(grad, tolerance):
    r = make_ridge(d=6)
    program = ridge_program(r, grad, lr=0.5)
    report = ml.check_hypergrad(program, "hpo", reference="finite_difference",
                                solve_steps=300, epsilon=1e-5)
    assert report.lower_grad_norm < 1e-10
    assert report.relative_error < tolerance and report.cosine > 1 - tolerance


def test_check_restores_the_program_state():
    r = make_ridge()
    program = ridge_program(r, "cg", lr=0.5)
    program.run(steps=3)
    before = [r.w.detach().clone(), r.lam.detach().clone()]
    optimizer_state = program.level("ridge").optimizer.state_dict()
    ml.check_hypergrad(program, "hpo", reference="finite_difference", solve_steps=50)
    assert torch.equal(r.w, before[0]) and torch.equal(r.lam, before[1])
    assert program.level("ridge").optimizer.state_dict() == optimizer_state
    assert program.steps == {"program": 3, "ridge": 3, "hpo": 3}


def test_check_against_exact_reports_method_error():
    r = make_ridge(d=6)
    program = ridge_program(r, ml.hypergrad.cg(iterations=2, tol=0.0))
    r.solve_lower()
    coarse = ml.check_hypergrad(program, "hpo")
    assert coarse.reference == "exact" and coarse.method == "cg"
    assert 1e-6 < coarse.relative_error < 1.0
    assert "relative error" in str(coarse)


def test_three_levels_exact_matches_finite_differences_of_nonlinear_problem():
    """The exact method's joint implicit differentiation is the true total derivative, third
    derivatives included: checked on a non-quadratic chain by re-solving both levels below."""
    program, _ = nonlinear_chain3_program()
    report = ml.check_hypergrad(program, "top", reference="finite_difference", solve_steps=300,
                                epsilon=1e-5)
    assert report.lower_grad_norm < 1e-9
    assert report.relative_error < 1e-7


def test_three_levels_edgewise_methods_differ_from_total_derivative():
    """cg on the top edge inverts mid's own Hessian with low held fixed: close to, but not, the
    total derivative. The check makes the gap visible."""
    program, _ = nonlinear_chain3_program(grad_top=ml.hypergrad.cg(iterations=10, tol=0.0))
    report = ml.check_hypergrad(program, "top", reference="finite_difference", solve_steps=300)
    assert report.relative_error > 1e-3


def test_check_rejects_a_lowest_level():
    program = ridge_program(make_ridge(), "cg")
    with pytest.raises(ValueError, match="no levels below it"):
        ml.check_hypergrad(program, "ridge")
