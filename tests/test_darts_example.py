"""The DARTS example: its search space, its arch hypergradient against DARTS's second-order
formula computed by autograd, and a reduced search that completes and moves alpha."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from example_loader import load_example, one_torch_thread

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def example():
    return load_example("darts")


@pytest.fixture(autouse=True)
def one_thread():
    with one_torch_thread():
        yield


def test_derived_and_random_architectures_come_from_the_same_space(example):
    alpha = torch.zeros(len(example.edges()), len(example.OPS))
    alpha[:, example.OPS.index("zero")] = 5.0           # zero is never kept
    alpha[0, example.OPS.index("conv5x5")] = 1.0
    choice = example.derive(alpha)
    assert choice[0] == "conv5x5" and "zero" not in choice and len(choice) == 3
    rng = random.Random(0)
    drawn = {op for _ in range(50) for op in example.random_architecture(rng)}
    assert drawn == set(example.OPS) - {"zero"}


def test_a_one_hot_mixed_op_is_that_op(example):
    torch.manual_seed(0)
    mixed = example.MixedOp()
    x = torch.randn(2, example.CHANNELS, 8, 8)
    for k, op in enumerate(mixed.ops):
        assert torch.allclose(mixed(x, F.one_hot(torch.tensor(k), len(example.OPS)).float()),
                              op(x))
    net = example.Cell(["skip", "conv3x3", "max_pool3x3"])
    assert net(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_arch_hypergradient_is_darts_second_order_formula(example):
    """dF/dalpha - xi (d^2 L_train / dalpha dw) dF/dw, the mixed term by the central difference
    of DARTS written out by hand: dL_train/dalpha at w +- eps dF/dw, eps = r / |dF/dw|. (The
    network is piecewise linear, so autograd's second derivative, which ignores the kinks, is
    not the reference.)"""
    splits = example.load_splits(0)
    one_batch = {name: tuple(t[:example.BATCH] for t in splits[name])
                 for name in ("train", "val")}                  # the same examples every step
    xi, radius = 0.5, 0.01
    method = example.ml.hypergrad.finite_diff(xi=xi, radius=radius)
    program, net, alpha = example.build_search(one_batch, 0, steps=20, warmup=0, grad=method,
                                               progress=False)
    program.run(steps=5)
    (got,) = program.hypergrad("arch")

    weights = list(net.parameters())
    x_val, y_val = one_batch["val"]
    x, y = one_batch["train"]
    direct, *v = torch.autograd.grad(F.cross_entropy(net(x_val, alpha), y_val),
                                     [alpha, *weights])
    eps = radius / torch.sqrt(sum(t.pow(2).sum() for t in v))
    saved = [p.detach().clone() for p in weights]

    def train_grad_at(sign):
        with torch.no_grad():
            for p, s, t in zip(weights, saved, v):
                p.copy_(s + sign * eps * t)
        return torch.autograd.grad(F.cross_entropy(net(x, alpha), y), alpha)[0]

    mixed = (train_grad_at(1) - train_grad_at(-1)) / (2 * eps)
    with torch.no_grad():
        for p, s in zip(weights, saved):
            p.copy_(s)
    expected = direct - xi * mixed
    assert (xi * mixed).norm() > 0.05 * expected.norm()        # the second-order term matters
    assert (got - expected).norm() <= 1e-3 * expected.norm()


def test_reduced_search_completes_and_moves_alpha(example):
    result = example.main(search_steps=100, warmup=30, train_steps=150, random_archs=2,
                          train_seeds=1, quiet=True)
    weights = torch.tensor(result["alpha_softmax"])
    assert weights.shape == (3, len(example.OPS))
    assert torch.allclose(weights.sum(1), torch.ones(3))
    assert (weights - 1 / len(example.OPS)).abs().max() > 0.03   # no longer uniform
    assert len(result["choice"]) == 3 and "zero" not in result["choice"]
    accs = [result["searched_acc"], *result["random_accs"]]
    assert all(0.5 < a <= 1.0 for a in accs)             # every net learned to read digits


def test_example_prints_program_choices_and_table(example, capsys):
    example.main(search_steps=4, warmup=2, train_steps=4, random_archs=2)
    out = capsys.readouterr().out
    assert "arch -> supernet  grad=finite_diff  inner_steps=1" in out
    assert "| 0 -> 1 |" in out and "| searched (finite_diff, xi=0.05):" in out
    assert "| random, mean +- std over 2 |" in out and "wall time:" in out
