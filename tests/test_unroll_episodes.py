"""Unrolled training runs as episodes: a hook re-initializes the lower level between upper
steps, and a per-step learning-rate schedule read through the reserved name ``step`` (also
under checkpoint=True, which recomputes the steps after the counters have moved on)."""

from __future__ import annotations

import pytest
import torch

import mlodsl as ml
from quadratic import DTYPE
from test_unroll import Capture, problem


def test_a_hook_can_restart_the_lower_level_between_upper_steps():
    lr, K = 0.1, 3
    A, B, t, w0, lam0 = problem()
    params = torch.nn.ParameterList([torch.nn.Parameter(w0.clone())])
    lam = torch.nn.Parameter(lam0.clone())
    capture = Capture()
    reset = -w0  # where every later episode starts

    @ml.level(module=params, optimizer=torch.optim.SGD([params[0]], lr=lr))
    def low(up):
        return 0.5 * params[0] @ A @ params[0] - params[0] @ (B @ up.module)

    @ml.level(upper_of="low", grad="unroll", module=lam, inner_steps=K,
              optimizer=torch.optim.SGD([lam], lr=0.0))
    def up(low):
        return 0.5 * (low.module[0] - t).pow(2).sum()

    class Restart:
        def on_step_end(self, *, program, level, step, metrics):
            if level == "up":
                with torch.no_grad():
                    params[0].copy_(reset)

    program = ml.program(low, up, hooks=[capture, Restart()], progress=False)
    program.run(steps=2 * K)
    step = torch.eye(4, dtype=DTYPE) - lr * A
    jacobian = sum(torch.linalg.matrix_power(step, j) for j in range(K)) @ (lr * B)
    for start, grad in zip((w0, reset), capture.grads):
        w = start.clone()
        for _ in range(K):
            w = step @ w + lr * B @ lam0
        expected = jacobian.T @ (w - t)
        assert (grad - expected).norm() / expected.norm() <= 1e-10


def schedule_program(checkpoint, K=4):
    """A level named 'train' (a name nn.Module already has) whose SGD learning rate at each
    step comes from its upper level's per-step log learning rates."""
    A, B, t, w0, lam0 = problem(seed=2)
    params = torch.nn.ParameterList([torch.nn.Parameter(w0.clone())])
    log_lr = torch.nn.Parameter(torch.log(torch.tensor([0.05, 0.1, 0.2, 0.15], dtype=DTYPE)))
    sgd = torch.optim.SGD([params[0]], lr=0.1, momentum=0.5)
    capture = Capture()

    @ml.level(module=params, optimizer=sgd)
    def train(schedule, step):
        sgd.param_groups[0]["lr"] = schedule.exp()[step % K]
        return 0.5 * params[0] @ A @ params[0] - params[0] @ (B @ lam0)

    @ml.level(upper_of="train", grad=ml.hypergrad.unroll(checkpoint=checkpoint),
              module=log_lr, inner_steps=K, optimizer=torch.optim.SGD([log_lr], lr=0.0))
    def schedule(train):
        return 0.5 * (train.module[0] - t).pow(2).sum()

    program = ml.program(train, schedule, hooks=[capture], progress=False)

    def by_hand(start):
        rates = log_lr.detach().clone().requires_grad_()
        w, buf = start, None
        for k in range(K):
            g = A @ w - B @ lam0
            buf = g if buf is None else 0.5 * buf + g
            w = w - rates.exp()[k] * buf
        (grad,) = torch.autograd.grad(0.5 * (w - t).pow(2).sum(), rates)
        return grad

    return program, capture, params, by_hand


@pytest.mark.parametrize("checkpoint", [False, True])
def test_per_step_learning_rates_through_the_reserved_step(checkpoint):
    program, capture, params, by_hand = schedule_program(checkpoint)
    start = params[0].detach().clone()
    program.run(steps=4)
    expected = by_hand(start)
    assert (capture.grads[0] - expected).norm() / expected.norm() <= 1e-10
    # Each entry is used once: every one of them has its own, non-zero derivative.
    assert (capture.grads[0].abs() > 1e-6).all()
