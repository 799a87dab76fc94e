"""Each implicit method's own promises: convergence, guards, warm starts, modes, clear errors."""

from __future__ import annotations

import pytest
import torch

import mlodsl as ml
from mlodsl.errors import HypergradError
from mlodsl.hypergrad import kernels
from quadratic import DTYPE, make_ridge, ridge_program


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def ill_conditioned_ridge(d: int = 8):
    r = make_ridge(n=80, d=d, scales=torch.logspace(0, 1.2, d, dtype=DTYPE))
    cond = torch.linalg.cond(r.hessian())
    assert cond >= 50
    return r


def test_cg_error_falls_with_iterations_on_ill_conditioned_problem():
    r = ill_conditioned_ridge()
    errors = []
    for k in range(1, 11):
        program = ridge_program(r, ml.hypergrad.cg(iterations=k, tol=0.0, warm_start=False))
        r.solve_lower()
        errors.append(rel_err(program.hypergrad("hpo")[0], r.hypergrad()))
    # Exact in dim(w) = 8 steps in exact arithmetic; round-off at condition ~100 costs one more.
    assert errors[7] <= 1e-9 and errors[8] <= 1e-10
    # Monotone up to round-off: every further iteration is at least as good.
    assert all(b <= a * (1 + 1e-6) + 1e-13 for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 1e3 * errors[-1]


def test_cg_exits_on_tolerance_and_never_produces_nan():
    r = make_ridge(d=6)
    program = ridge_program(r, ml.hypergrad.cg(iterations=400, tol=1e-12, warm_start=False),
                            lr=0.3)
    r.solve_lower()
    history = program.run(steps=3)
    used = history.series("hpo", "hpo->ridge/iterations")
    assert all(1 <= u <= 12 for u in used)  # far below 400 on a 6-parameter problem
    assert all(res <= 1e-12 for res in history.series("hpo", "hpo->ridge/residual"))
    assert torch.isfinite(r.lam).all()


def test_cg_warm_start_needs_fewer_products_during_training():
    def products(warm: bool) -> int:
        r = ill_conditioned_ridge()
        program = ridge_program(r, ml.hypergrad.cg(iterations=50, tol=1e-4, warm_start=warm),
                                lr=0.01, inner_steps=1)
        r.solve_lower()
        history = program.run(steps=30)
        return sum(history.series("hpo", "hpo->ridge/iterations"))

    assert products(warm=True) < 0.5 * products(warm=False)


def test_cg_never_returns_worse_than_its_start_on_indefinite_hessian():
    """A saddle-shaped lower level: CG stops at negative curvature, never carries a failed solve
    forward as a warm start, and the run stays finite."""
    w = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.1], dtype=DTYPE))
    lam = torch.nn.Parameter(torch.tensor([0.5, 0.5, 0.5], dtype=DTYPE))
    curv = torch.tensor([1.0, -3.0, 0.5], dtype=DTYPE)

    @ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.01))
    def saddle(up):
        return 0.5 * (curv * w * w).sum() - w @ up.module

    @ml.level(upper_of="saddle", grad=ml.hypergrad.cg(iterations=10), module=lam,
              optimizer=torch.optim.SGD([lam], lr=0.01))
    def up(saddle):
        return saddle.module.pow(2).sum()

    program = ml.program(saddle, up)
    history = program.run(steps=30)
    assert all(res <= 1.0 + 1e-12 for res in history.series("up", "up->saddle/residual"))
    assert torch.isfinite(lam).all() and torch.isfinite(w).all()


def test_cg_damping_solves_the_shifted_system():
    r = make_ridge(d=5)
    mu = 0.7
    program = ridge_program(r, ml.hypergrad.cg(iterations=5, tol=0.0, mu=mu))
    r.solve_lower()
    w = r.solution()
    g = r.Xv.T @ (r.Xv @ w - r.yv) / len(r.Xv)
    shifted = r.hessian() + mu * torch.eye(5, dtype=DTYPE)
    expected = -r.lam.detach().exp() * w * torch.linalg.solve(shifted, g)
    assert rel_err(program.hypergrad("hpo")[0], expected) <= 1e-10


def test_neumann_guard_converges_where_unguarded_step_diverges():
    r = ill_conditioned_ridge()
    lam_max = float(torch.linalg.eigvalsh(r.hessian()).max())
    assert lam_max > 2.0  # so a step of 1.0 is outside the convergence region

    # Unguarded: the plain series with alpha = 1 blows up.
    v = torch.randn(len(r.w), dtype=DTYPE)
    term = v.clone()
    for _ in range(30):
        term = term - 1.0 * (r.hessian() @ term)
    assert term.norm() > 1e6 * v.norm()

    program = ridge_program(r, ml.hypergrad.neumann(iterations=3000, alpha=1.0))
    r.solve_lower()
    history_free = program.hypergrad("hpo")[0]
    assert rel_err(history_free, r.hypergrad()) <= 1e-6


def test_neumann_records_step_and_eigenvalue():
    r = make_ridge()
    program = ridge_program(r, ml.hypergrad.neumann(iterations=20))
    record = program.run(steps=1)["hpo"][-1]
    true_max = float(torch.linalg.eigvalsh(r.hessian()).max())
    assert record["hpo->ridge/eigenvalue"] == pytest.approx(1.05 * true_max, rel=0.05)
    assert record["hpo->ridge/alpha"] == pytest.approx(1 / record["hpo->ridge/eigenvalue"])


def test_neumann_divergence_is_reported_not_applied():
    """A lower level with negative curvature makes the series grow: an error, and the upper
    parameter is left as it was."""
    w = torch.nn.Parameter(torch.tensor([0.3, -0.2], dtype=DTYPE))
    lam = torch.nn.Parameter(torch.tensor([0.5, 0.5], dtype=DTYPE))

    @ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.01))
    def saddle(up):
        return 0.5 * (w[0] ** 2 - 3.0 * w[1] ** 2) - w @ up.module

    @ml.level(upper_of="saddle", grad=ml.hypergrad.neumann(iterations=50), module=lam,
              optimizer=torch.optim.SGD([lam], lr=0.1))
    def up(saddle):
        return saddle.module.pow(2).sum()

    program = ml.program(saddle, up)
    before = lam.detach().clone()
    with pytest.raises(HypergradError, match=r"neumann.*diverged.*negative curvature"):
        program.run(steps=1)
    assert torch.equal(lam.detach(), before)


def identity_hessian_problem(optimizer_factory):
    gen = torch.Generator().manual_seed(5)
    M = torch.randn(4, 3, generator=gen, dtype=DTYPE)
    t = torch.randn(4, generator=gen, dtype=DTYPE)
    w = torch.nn.Parameter(torch.randn(4, generator=gen, dtype=DTYPE))
    lam = torch.nn.Parameter(torch.randn(3, generator=gen, dtype=DTYPE))
    lower_opt = optimizer_factory([w])

    @ml.level(module=w, optimizer=lower_opt)
    def low(up):
        return 0.5 * (w - M @ up.module).pow(2).sum()

    @ml.level(upper_of="low", grad="sama", module=lam, optimizer=torch.optim.SGD([lam], lr=0.0))
    def up(low):
        return 0.5 * (low.module - t).pow(2).sum()

    return ml.program(low, up), w, lower_opt, M, t


def test_sama_with_unit_sgd_step_is_exact_when_hessian_is_identity():
    program, w, _, M, t = identity_hessian_problem(lambda p: torch.optim.SGD(p, lr=1.0))
    (g,) = program.hypergrad("up")
    assert rel_err(g, M.T @ (w.detach() - t)) <= 1e-8


@pytest.mark.parametrize("factory", [
    lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9, dampening=0.1),
    lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9, nesterov=True),
    lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.8, 0.99)),
    lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
])
def test_sama_preconditions_by_the_optimizer_update_jacobian(factory):
    """On H = I, sama's bias is exactly its preconditioner P: it returns M^T P (w - t)."""
    program, w, opt, M, t = identity_hessian_problem(factory)
    program.run(steps=3)  # give the optimizer state (moments, step counts)
    group = opt.param_groups[0]
    if isinstance(opt, torch.optim.SGD):
        factor = (1 - group["dampening"]) * ((1 + group["momentum"]) if group["nesterov"] else 1)
        scale = torch.full_like(w, group["lr"] * factor)
    else:
        state = opt.state[w]
        b1, b2 = group["betas"]
        step = float(state["step"])
        v_hat = state["exp_avg_sq"] / (1 - b2 ** step)
        scale = group["lr"] * (1 - b1) / (1 - b1 ** step) / (v_hat.sqrt() + group["eps"])
    (g,) = program.hypergrad("up")
    assert rel_err(g, M.T @ (scale * (w.detach() - t))) <= 1e-8


def test_sama_rejects_unsupported_optimizers():
    program, *_ = identity_hessian_problem(lambda p: torch.optim.RMSprop(p, lr=0.1))
    with pytest.raises(HypergradError, match=r"'low' uses RMSprop.*SGD, Adam, AdamW"):
        program.hypergrad("up")


def test_finite_diff_has_the_bias_of_identity_inverse_hessian():
    """On ridge (H != I) finite_diff computes -(d2L/dlam dw) v with H^{-1} = I:
    -exp(lam) * w * v, exactly (the loss is quadratic in w, so the difference is exact)."""
    r = make_ridge()
    program = ridge_program(r, "finite_diff")
    r.solve_lower()
    w = r.w.detach()
    v = r.Xv.T @ (r.Xv @ w - r.yv) / len(r.Xv)
    expected = -r.lam.detach().exp() * w * v
    assert rel_err(program.hypergrad("hpo")[0], expected) <= 1e-8


def mlp_program(grad, lower_module=True):
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, dtype=DTYPE), torch.randn(32, 1, dtype=DTYPE)
    net = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(),
                              torch.nn.Linear(6, 1)).double()
    log_wd = torch.nn.Parameter(torch.tensor(-1.0, dtype=DTYPE))

    @ml.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    def fit(hpo):
        decay = sum(p.pow(2).sum() for p in net.parameters())
        return (net(x) - y).pow(2).mean() + hpo.exp() * decay

    @ml.level(upper_of="fit", grad=grad, module=log_wd, optimizer=torch.optim.SGD([log_wd], lr=0.1))
    def hpo(fit):
        return (fit(x[:8]) - y[:8]).pow(2).mean()

    return ml.program(fit, hpo)


@pytest.mark.parametrize("method", ["cg", "neumann"])
def test_forward_over_reverse_hvp_matches_reverse_over_reverse(method):
    options = {"mu": 1.0} if method == "cg" else {}  # damped: the MLP's Hessian is indefinite
    factory = getattr(ml.hypergrad, method)
    reverse = mlp_program(factory(iterations=15, hvp="reverse", **options)).hypergrad("hpo")[0]
    forward = mlp_program(factory(iterations=15, hvp="forward", **options)).hypergrad("hpo")[0]
    assert reverse.abs() > 1e-6
    assert rel_err(forward, reverse) <= 1e-10


def test_forward_hvp_needs_a_module():
    r = make_ridge()
    program = ridge_program(r, ml.hypergrad.cg(hvp="forward"))
    with pytest.raises(HypergradError, match=r"hvp='forward' on level 'ridge' needs .*nn.Module"):
        program.hypergrad("hpo")
    with pytest.raises(ValueError, match="hvp must be one of reverse, forward"):
        ml.hypergrad.cg(hvp="sideways")


class _CubeOnce(torch.autograd.Function):
    """x**3 whose backward cannot itself be differentiated."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * grad


@pytest.mark.parametrize("grad", ["cg", "neumann", "exact"])
def test_missing_second_order_rule_names_finite_diff(grad):
    w = torch.nn.Parameter(torch.ones(3, dtype=DTYPE))
    lam = torch.nn.Parameter(torch.ones(3, dtype=DTYPE))

    def build(method):
        @ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1))
        def low(up):
            # The only curvature in w comes through the once-differentiable cube.
            return _CubeOnce.apply(w).sum() - (w * up.module).sum()

        @ml.level(upper_of="low", grad=method, module=lam, optimizer=torch.optim.SGD([lam], lr=0.1))
        def up(low):
            return low.module.sum()

        return ml.program(low, up)

    with pytest.raises(HypergradError, match=r"'low'.*second-order rule.*finite_diff"):
        build(grad).hypergrad("up")
    (g,) = build("finite_diff").hypergrad("up")
    assert torch.isfinite(g).all()


def test_exact_refuses_large_problems_with_the_size():
    r = make_ridge(d=6)
    program = ridge_program(r, ml.hypergrad.exact(max_params=5))
    with pytest.raises(HypergradError, match=r"ridge\) have 6 parameters, above the limit of 5"):
        program.hypergrad("hpo")


def test_kernels_conjugate_gradient_solves_spd_system():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(20, 20, generator=gen, dtype=DTYPE)
    A = A @ A.T + 20 * torch.eye(20, dtype=DTYPE)
    b = torch.randn(20, generator=gen, dtype=DTYPE)
    x, used, residual = kernels.conjugate_gradient(lambda v: A @ v, b, None, 100, 1e-12)
    assert residual <= 1e-12 and used <= 20
    assert rel_err(x, torch.linalg.solve(A, b)) <= 1e-10
