"""Learning-by-ignoring chains: a middle level that parameterizes the level below it without
reading it in its own loss, while the top level reads that lowest level."""

from __future__ import annotations

import pytest
import torch

import mlodsl as ml
from mlodsl.errors import NoDependencyError
from quadratic import DTYPE


def chain(top_reads_low=True, grad_top="exact", grad_mid="exact", seed=0):
    """low: 1/2 V'PV - V'BW; mid: 1/2 W'QW - W'Ca (does not read low); top: 1/2|V - t|^2 +
    1/2 a'Ra (reads low, or mid only)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=DTYPE)

    def spd(k):
        M = rand(k, k)
        return M @ M.T / k + torch.eye(k, dtype=DTYPE)

    P, Q, R = spd(4), spd(3), spd(2)
    B, C, t = rand(4, 3), rand(3, 2), rand(4)
    V, W, a = (torch.nn.Parameter(rand(n)) for n in (4, 3, 2))

    @ml.level(module=V, optimizer=torch.optim.SGD([V], lr=0.1))
    def low(mid):
        return 0.5 * V @ P @ V - V @ (B @ mid.module)

    @ml.level(upper_of="low", grad=grad_mid, module=W, optimizer=torch.optim.SGD([W], lr=0.1))
    def mid(top):
        return 0.5 * W @ Q @ W - W @ (C @ top.module)

    if top_reads_low:
        @ml.level(upper_of="mid", grad=grad_top, module=a,
                  optimizer=torch.optim.SGD([a], lr=0.1))
        def top(low):
            return 0.5 * (low.module - t).pow(2).sum() + 0.5 * a @ R @ a
    else:
        @ml.level(upper_of="mid", grad=grad_top, module=a,
                  optimizer=torch.optim.SGD([a], lr=0.1))
        def top(mid):
            return 0.5 * mid.module.pow(2).sum() + 0.5 * a @ R @ a

    def expected():
        # V* = P^-1 B W, W* = Q^-1 C a: the edge-by-edge answer is the total derivative here.
        v = V.detach() - t
        return R @ a.detach() + C.T @ torch.linalg.solve(Q, B.T @ torch.linalg.solve(P, v))

    return ml.program(low, mid, top, progress=False), expected, (W, Q, C, a)


@pytest.mark.parametrize("grad", ["exact", ml.hypergrad.cg(iterations=20, tol=0.0)])
def test_hypergradient_flows_through_an_edge_the_middle_level_does_not_read(grad):
    program, expected, _ = chain(grad_top=grad, grad_mid=grad)
    program.run(steps=3)
    (got,) = program.hypergrad("top")
    assert (got - expected()).norm() / expected().norm() <= 1e-8


def test_the_middle_level_takes_its_plain_gradient():
    program, _, (W, Q, C, a) = chain()
    before, a_before = W.detach().clone(), a.detach().clone()
    program.run(steps=1)  # each level steps once, bottom-up; the middle steps before the top
    assert torch.allclose(W.detach(), before - 0.1 * (Q @ before - C @ a_before), atol=1e-12)


def test_an_edge_nobody_needs_is_still_an_error():
    program, _, _ = chain(top_reads_low=False)
    with pytest.raises(NoDependencyError, match=r"'mid'.*upper_of 'low'.*does not depend"):
        program.run(steps=1)
