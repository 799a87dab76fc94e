"""Nested unrolling (top unrolls mid, which unrolls low) and unrolling below an implicit level:
against the closed-form total derivative, central finite differences of the unrolled
computation, truncation, and the run-time bookkeeping (records, warmup, accumulation, resume)."""

from __future__ import annotations

import pytest
import torch

import mlodsl as ml
from quadratic import DTYPE, chain3_modules_program, chain3_top_loss, make_chain3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class Capture:
    """The hypergradients ``top`` applied, in order."""

    def __init__(self):
        self.grads = []

    def on_hypergrad(self, *, program, level, step, grads, diagnostics):
        if level == "top":
            self.grads.append(grads[0].detach().clone())


def nested_hypergrad(k_mid, k_top, cycles=1, seed=0, hooks=(), **options):
    q = make_chain3(seed=seed)
    capture = Capture()
    program = chain3_modules_program(q, inner_steps=(k_mid, k_top), hooks=[capture, *hooks],
                                     **options)
    program.run(steps=cycles * k_mid * k_top)
    return capture.grads, q, program


def test_nested_unroll_converges_to_the_closed_form_total_derivative():
    """Low and mid contract (SGD at 2 / (lambda_min + lambda_max) of P and of mid's reduced
    Hessian Q + K'K: rates 0.60 and 0.68 per step), so the Jacobians of the unrolled ends
    approach the best-response Jacobians geometrically: about 50x less error per 10 steps."""
    errors = {}
    for k in (10, 20, 45):
        grads, q, _ = nested_hypergrad(k, k)
        errors[k] = rel_err(grads[0], q.total())
    assert errors[45] <= 1e-8
    assert errors[10] > 10 * errors[20] > 100 * errors[45]  # geometric, not a fixed bias


def test_nested_steps_are_each_levels_own_update():
    """The values: low steps on its gradient at fixed mu; mid on the gradient of its loss
    through low's steps since its previous update, that trajectory's start held fixed. (Low's
    fast weights are ancestors of mid's, so a careless gradient w.r.t. them would count the
    path through mid's earlier update too.)"""
    q = make_chain3()
    w, mu, lam = q.w.detach().clone(), q.mu.detach().clone(), q.lam.detach()
    expected = []
    for _ in range(4):
        mu = mu.detach().requires_grad_()
        w = w.detach()
        for _ in range(3):
            w = w - 0.39 * (q.P @ w - q.B @ mu)
        (g,) = torch.autograd.grad(0.5 * mu @ q.Q @ mu - mu @ (q.C @ lam)
                                   + 0.5 * (w - q.c).pow(2).sum(), mu)
        mu = mu - 0.21 * g
        expected.append((w.detach(), mu.detach()))
    program = chain3_modules_program(q, inner_steps=(3, 2))
    for w_ref, mu_ref in expected:
        program.run(steps=3)
        assert torch.allclose(q.w, w_ref, rtol=0, atol=1e-13)
        assert torch.allclose(q.mu, mu_ref, rtol=0, atol=1e-13)


def finite_difference(build, run_steps, eps=1e-5, before=0):
    """Central differences of top's loss at the end of the unrolled dynamics, re-run from the
    same start for each perturbation of lam (after ``before`` unperturbed steps). ``build``
    returns a fresh ``(program, lam, top_loss, captured_grads)``."""
    n = build()[1].numel()
    out = torch.zeros(n, dtype=DTYPE)
    for i in range(n):
        values = []
        for sign in (1.0, -1.0):
            program, lam, top_loss, _ = build()
            program.run(steps=before)
            with torch.no_grad():
                lam[i] += sign * eps
                perturbed = lam.clone()
            program.run(steps=run_steps)
            with torch.no_grad():  # top's loss as top's update saw it, before its own step
                lam.copy_(perturbed)
            values.append(float(top_loss().detach()))
        out[i] = (values[0] - values[1]) / (2 * eps)
    return out


@pytest.mark.parametrize("momentum,cycles,init_from", [
    (0.0, 1, False), (0.5, 1, False), (0.5, 2, False), (0.0, 1, True), (0.0, 2, True)])
def test_nested_unroll_is_the_derivative_of_the_unrolled_computation(momentum, cycles,
                                                                      init_from):
    """A non-quadratic chain (third derivatives matter), few steps (far from converged): the
    hypergradient is the exact derivative of top's loss w.r.t. lam through mid's 3 steps, each
    a gradient through low's 2 steps. With 2 cycles, the second one starts from the first's
    ends (momentum buffers included) as constants, after top stepped (lr 0.1). With init_from,
    low restarts from mid's fast weights after each of mid's steps (MAML inside the chain)."""
    k_mid, k_top, steps = 2, 3, 6

    def build():
        q = make_chain3(dw=4, seed=1)
        capture = Capture()
        program = chain3_modules_program(
            q, lrs=(0.2, 0.2, 0.1 if cycles == 2 else 0.0), inner_steps=(k_mid, k_top),
            nonlinear=True, momentum=momentum, hooks=[capture],
            low_options={"init_from": "mid"} if init_from else None)
        return (program, q.lam, lambda: chain3_top_loss(q, q.mu, q.w, nonlinear=True),
                capture.grads)

    program, _, _, grads = build()
    program.run(steps=cycles * steps)
    expected = finite_difference(build, steps, before=(cycles - 1) * steps)
    assert len(grads) == cycles and rel_err(grads[-1], expected) <= 1e-7


def test_init_from_inside_a_nested_chain_restarts_low_from_mids_fast_weights():
    q = make_chain3(dw=4)
    program = chain3_modules_program(q, inner_steps=(2, 3), low_options={"init_from": "mid"})
    program.run(steps=2)  # low took 2 steps, then mid its first
    mu1, w_end = q.mu.detach().clone(), q.w.detach().clone()
    assert not torch.allclose(w_end, mu1)
    program.run(steps=1)  # a new episode: from mu1, one SGD step of 1/2 w'Pw - w'B mu1
    assert torch.allclose(q.w, mu1 - 0.39 * (q.P @ mu1 - q.B @ mu1), rtol=0, atol=1e-14)


def test_two_level_unroll_is_the_derivative_of_the_unrolled_computation():
    """The same check at two levels: a non-quadratic lower level, 4 momentum-SGD steps."""
    gen = torch.Generator().manual_seed(5)
    A = torch.randn(4, 4, generator=gen, dtype=DTYPE)
    A = A @ A.T / 4 + torch.eye(4, dtype=DTYPE)
    B, t = torch.randn(4, 3, generator=gen, dtype=DTYPE), torch.randn(4, generator=gen,
                                                                       dtype=DTYPE)
    w0, lam0 = torch.randn(4, generator=gen, dtype=DTYPE), torch.randn(3, generator=gen,
                                                                        dtype=DTYPE)

    def build():
        w = torch.nn.ParameterList([torch.nn.Parameter(w0.clone())])
        lam = torch.nn.Parameter(lam0.clone())
        capture = Capture()

        @ml.level(module=w, optimizer=torch.optim.SGD(w.parameters(), lr=0.2, momentum=0.5))
        def low(top):
            return 0.5 * w[0] @ A @ w[0] + 0.1 * w[0].pow(4).sum() - w[0] @ torch.tanh(B @ top)

        @ml.level(upper_of="low", grad="unroll", module=lam, inner_steps=4,
                  optimizer=torch.optim.SGD([lam], lr=0.0))
        def top(low):
            return torch.log1p((low.module[0] - t).pow(2)).sum() + 0.1 * lam.pow(2).sum()

        program = ml.program(low, top, hooks=[capture], progress=False)
        return (program, lam, lambda: torch.log1p((w[0] - t).pow(2)).sum()
                + 0.1 * lam.pow(2).sum(), capture.grads)

    program, _, _, grads = build()
    program.run(steps=4)
    expected = finite_difference(build, 4)
    assert rel_err(grads[0], expected) <= 1e-7


def test_truncated_outer_unroll_differentiates_only_mids_last_step():
    """top's steps=1: mid's earlier updates and low's steps (which read only mid's constant
    fast weights) are constants, so dF/dlam = R lam + (d mu_end / d lam)'(mu_end - s) with
    d mu_end / d lam = lr_mid * C (mid's gradient holds -C lam)."""
    grads, q, _ = nested_hypergrad(3, 4, grad_top=ml.hypergrad.unroll(steps=1))
    lam, mu = q.lam.detach(), q.mu.detach()
    expected = q.R @ lam + 0.21 * q.C.T @ (mu - q.s)
    assert rel_err(grads[0], expected) <= 1e-12


def test_truncated_inner_unroll_cuts_lows_earlier_steps_for_top_too():
    """mid's steps=1: each mid gradient sees only low's last step (d w_end/d mu = lr B), and
    low's earlier steps are constants for top as well. So D_j = d mu_j/d lam follows
    D_{j+1} = (I - lr_mid (Q + lr_low^2 B'B)) D_j + lr_mid C, and top reads low's end through
    D_{K-1} (low's last cycle ran on mu_{K-1})."""
    k_mid, k_top, lr_low, lr_mid = 3, 4, 0.39, 0.21
    grads, q, _ = nested_hypergrad(k_mid, k_top, grad_mid=ml.hypergrad.unroll(steps=1))
    step = torch.eye(4, dtype=DTYPE) - lr_mid * (q.Q + lr_low**2 * q.B.T @ q.B)
    D = [torch.zeros(4, 3, dtype=DTYPE)]
    for _ in range(k_top):
        D.append(step @ D[-1] + lr_mid * q.C)
    w, mu = q.w.detach(), q.mu.detach()
    expected = (q.R @ q.lam.detach() + D[-1].T @ (mu - q.s)
                + (lr_low * q.B @ D[-2]).T @ (w - q.t))
    assert rel_err(grads[0], expected) <= 1e-12


def test_first_order_outer_unroll_keeps_only_the_direct_term():
    """top's first_order=True: mid's gradients are constants and its trajectory starts from a
    copy, so nothing below depends on lam: the hypergradient is the direct term R lam."""
    grads, q, _ = nested_hypergrad(3, 2, grad_top=ml.hypergrad.unroll(first_order=True))
    assert rel_err(grads[0], q.R @ q.lam.detach()) <= 1e-12


class CaptureMid:
    def __init__(self):
        self.calls = []

    def on_hypergrad(self, *, program, level, step, grads, diagnostics):
        if level == "mid":
            self.calls.append((step, float(torch.linalg.vector_norm(grads[0]))))


def test_nested_records_and_schedule():
    mid_hook = CaptureMid()
    grads, q, program = nested_hypergrad(3, 2, cycles=2, hooks=[mid_hook])
    assert len(grads) == 2
    norms = program.history.series("mid", "hypergrad_norm")
    assert [step for step, _ in mid_hook.calls] == [1, 2, 3, 4]
    assert [norm for _, norm in mid_hook.calls] == pytest.approx([float(n) for n in norms])
    assert program.history.series("top", "top->mid/unrolled_steps") == [2, 2]
    assert program.history.series("mid", "mid->low/unrolled_steps") == [3, 3, 3, 3]
    assert len(program.history.series("mid", "hypergrad_norm")) == 4
    assert "every 6 steps" in str(program.compile())
    # after top's update everything below is written back and its trajectory dropped: nothing
    # keeps a graph, and the next steps start from the real parameters
    runtime = program._runtime
    assert all(t.grad_fn is None for tensors in runtime.unroller.fast.values() for t in tensors)
    assert all(p.grad_fn is None for level in ("low", "mid") for p in runtime.nodes[level].params)


def test_accumulation_on_either_level_gives_the_same_hypergradient():
    """Deterministic data: averaging two identical micro-batches changes nothing, whether on
    mid (inside top's trajectory) or on top (two backward passes through one trajectory)."""
    base, _, _ = nested_hypergrad(3, 2)
    for level in ("mid", "top"):
        q = make_chain3()
        capture = Capture()
        program = chain3_modules_program(q, inner_steps=(3, 2), hooks=[capture],
                                         **{f"{level}_options": {"accumulate": 2}})
        program.run(steps=6)
        assert rel_err(capture.grads[0], base[0]) <= 1e-12, level


def test_top_warmup_finishes_the_trajectories_until_it_steps():
    """With top warming up for one cycle, its first hypergradient goes through the second
    cycle only: the same as the second hypergradient of a run without warmup (top's lr is 0)."""
    base, _, _ = nested_hypergrad(3, 2, cycles=2)
    q = make_chain3()
    capture = Capture()
    program = chain3_modules_program(q, inner_steps=(3, 2), hooks=[capture],
                                     top_options={"warmup": 6})
    program.run(steps=12)
    assert len(capture.grads) == 1
    assert rel_err(capture.grads[0], base[1]) <= 1e-12


def test_resume_restarts_nested_trajectories(tmp_path):
    grads, _, program = nested_hypergrad(3, 2)
    program.save(tmp_path / "one.pt")
    program.run(steps=6)
    program.load(tmp_path / "one.pt")
    program.run(steps=6)
    assert len(grads) == 3 and torch.allclose(grads[2], grads[1], rtol=1e-12, atol=0)


def test_check_hypergrad_compares_nested_unroll_with_exact():
    grads, q, program = nested_hypergrad(20, 20)
    program.run(steps=20 * 20 - 1)  # one step short of the next top update
    before = program._runtime.unroller.end["low"][0].detach().clone()
    report = ml.check_hypergrad(program, "top", reference="exact")
    assert report.method == "unroll" and report.relative_error < 1e-3
    assert torch.equal(program._runtime.unroller.end["low"][0], before)
    program.run(steps=1)  # the trajectory's graph survived the inspection
    assert len(grads) == 2 and rel_err(grads[1], q.total()) < 1e-3


def test_inspecting_mid_differentiates_its_fast_weights():
    """program.hypergrad('mid') on a nested mid: the gradient of mid's loss w.r.t. its current
    fast weights through low's steps since mid's last update."""
    q = make_chain3()
    program = chain3_modules_program(q, inner_steps=(5, 2))
    program.run(steps=7)  # mid stepped once; low took 2 steps since
    (g,) = program.hypergrad("mid")
    mu, w_end = q.mu.detach(), q.w.detach()  # the modules mirror the fast weights
    # low's 2 SGD steps from w0: w_end = S^2 w0 + (S + I) lr B mu, S = I - lr P
    S = torch.eye(5, dtype=DTYPE) - 0.39 * q.P
    jacobian = (S + torch.eye(5, dtype=DTYPE)) @ (0.39 * q.B)
    expected = q.Q @ mu - q.C @ q.lam.detach() + jacobian.T @ (w_end - q.c)
    assert rel_err(g, expected) <= 1e-12


def test_exact_over_a_level_that_unrolls_is_the_total_derivative():
    """Mixed: mid steps on its unrolled hypergradient through low; top's exact differentiates
    the optimality conditions of both, a true total derivative (for quadratics, anywhere)."""
    q = make_chain3()
    capture = Capture()
    program = chain3_modules_program(q, grad_top="exact", inner_steps=(4, 2), hooks=[capture])
    assert rel_err(program.hypergrad("top")[0], q.total()) <= 1e-10
    program.run(steps=8)
    assert rel_err(capture.grads[0], q.total()) <= 1e-10


def test_cg_over_a_level_that_unrolls_holds_low_fixed():
    """Mixed, edge by edge: top reads only mid, so its cg hypergradient inverts mid's own
    Hessian Q with low held fixed: R lam + C' Q^{-1} (mu - s)."""
    q = make_chain3()
    capture = Capture()
    program = chain3_modules_program(q, grad_top=ml.hypergrad.cg(iterations=4, tol=0.0),
                                     inner_steps=(4, 2), hooks=[capture], top_reads_low=False)
    program.run(steps=8)
    lam, mu = q.lam.detach(), q.mu.detach()
    expected = q.R @ lam + q.C.T @ torch.linalg.solve(q.Q, mu - q.s)
    assert rel_err(capture.grads[0], expected) <= 1e-10


def test_check_hypergrad_by_finite_differences_leaves_the_run_as_it_was():
    """The finite-difference reference re-solves mid and low (functional steps, graphs and
    all) for each perturbation; afterwards the trajectories are back where they were."""
    results = []
    for check in (False, True):
        grads, _, program = nested_hypergrad(5, 3)
        program.run(steps=7)
        if check:
            report = ml.check_hypergrad(program, "top", reference="finite_difference",
                                        solve_steps=150)
            assert report.relative_error < 1e-6 and report.lower_grad_norm < 1e-6
        program.run(steps=8)
        results.append(grads[-1])
    assert len(grads) == 2 and torch.equal(results[0], results[1])


def test_four_nested_levels_are_the_derivative_of_the_unrolled_computation():
    """l3 unrolls l2 unrolls l1 unrolls l0 (two steps each, momentum on l2, non-quadratic),
    and l3 also reads l0 directly: one backward pass through 8 + 4 + 2 nested steps."""
    def build():
        gen = torch.Generator().manual_seed(7)
        mats = [0.5 * torch.randn(3, 3, generator=gen, dtype=DTYPE) for _ in range(3)]
        mods = [torch.nn.ParameterList([torch.nn.Parameter(torch.randn(3, generator=gen,
                                                                       dtype=DTYPE))])
                for _ in range(3)]
        top = torch.nn.Parameter(torch.randn(3, generator=gen, dtype=DTYPE))
        grads = []

        class Keep:
            def on_hypergrad(self, *, program, level, step, grads, diagnostics):
                if level == "l3":
                    kept.append(grads[0].detach().clone())

        kept = grads

        def sgd(i, **options):
            return torch.optim.SGD(mods[i].parameters(), lr=0.3, **options)

        @ml.level(module=mods[0], optimizer=sgd(0))
        def l0(l1):
            x = mods[0][0]
            return (0.5 * x.pow(2).sum() + 0.05 * x.pow(4).sum()
                    - x @ torch.tanh(mats[0] @ l1.module[0]))

        @ml.level(upper_of="l0", grad="unroll", inner_steps=2, module=mods[1], optimizer=sgd(1))
        def l1(l0, l2):
            x = mods[1][0]
            return (0.5 * x.pow(2).sum() - x @ torch.tanh(mats[1] @ l2.module[0])
                    + torch.log1p((l0.module[0] - 1).pow(2)).sum())

        @ml.level(upper_of="l1", grad="unroll", inner_steps=2, module=mods[2],
                  optimizer=sgd(2, momentum=0.5))
        def l2(l1, l3):
            x = mods[2][0]
            return (0.5 * x.pow(2).sum() - x @ torch.tanh(mats[2] @ l3)
                    + 0.5 * (l1.module[0] + 0.5).pow(2).sum())

        def top_loss():
            return (0.5 * (mods[2][0] - 1).pow(2).sum() + torch.sin(mods[0][0]).sum()
                    + 0.1 * top.pow(2).sum())

        @ml.level(upper_of="l2", grad="unroll", inner_steps=2, module=top,
                  optimizer=torch.optim.SGD([top], lr=0.0))
        def l3(l2, l0):
            return top_loss()

        program = ml.program(l0, l1, l2, l3, hooks=[Keep()], progress=False)
        return program, top, top_loss, grads

    program, _, _, grads = build()
    program.run(steps=8)
    expected = finite_difference(build, 8)
    assert len(grads) == 1 and rel_err(grads[0], expected) <= 1e-7


def test_nested_unrolling_is_refused_under_data_parallelism():
    """Distributed runs have been verified equal to one process for one level of unrolling
    only: a nested chain is refused with the reason and the way out, not run unverified."""
    from mlodsl import consistency

    _, _, program = nested_hypergrad(2, 2, cycles=0)
    with pytest.raises(ml.errors.DistributedError, match="level 'mid' .* unrolls its lowers "
                       "while 'top' unrolls it .*one process, or use an implicit method"):
        consistency.check_supported(program._graph)
