"""The learning-rate schedule example: its pieces, its hypergradient against finite differences
of whole training runs, and a reduced run that beats the initial and the best constant rate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from example_loader import load_example, one_torch_thread

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def example():
    return load_example("lr_schedule")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster, and steadier on shared cores."""
    with one_torch_thread():
        yield


def test_phases_cover_each_run_in_order(example):
    assert [example.phase_of(k, 10, 5) for k in range(12)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 0, 0]
    rates = example.per_step(torch.log(torch.tensor([1.0, 2.0])), steps=4)
    assert rates == pytest.approx([1.0, 1.0, 2.0, 2.0])


def test_unrolled_hypergradient_matches_finite_differences_of_whole_runs(example):
    """The program's first hypergradient is d(val loss after a run)/d(log_lr): compare it with
    central differences of the same run done by plain PyTorch (same init and batches)."""
    steps, phases, seed = 20, 4, 0
    splits = example.load_splits(seed)
    captured = []

    class Hook:
        def on_hypergrad(self, *, program, level, step, grads, diagnostics):
            captured.append(grads[0].detach().clone())

    program, log_lr = example.build_program(splits, seed, steps, phases, hooks=[Hook()],
                                            progress=False)
    start = log_lr.detach().clone()
    program.run(steps=steps)
    assert len(captured) == 1

    def val_loss(log_rates):
        net = example.run_with_rates(example.per_step(log_rates, steps), splits, seed)
        with torch.no_grad():
            return F.cross_entropy(net(splits["val"][0]), splits["val"][1]).item()

    h = 0.05
    expected = torch.tensor([(val_loss(start + h * e) - val_loss(start - h * e)) / (2 * h)
                             for e in torch.eye(phases)])
    got = captured[0]
    cosine = (got @ expected / (got.norm() * expected.norm())).item()
    assert cosine > 0.99 and (got - expected).norm() <= 0.05 * expected.norm()


def test_the_restart_hook_gives_each_run_a_fresh_initialization(example):
    splits = example.load_splits(0)
    program, _ = example.build_program(splits, 0, steps=5, phases=1, progress=False)
    net = program.level("train").module
    program.run(steps=5)  # one run, then the hook re-initializes
    fresh = example.make_net()
    example.reinitialize(fresh, 0 + 1 + 1)  # the hook's seed (seed + 1) plus the run count
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), fresh.parameters()))


def test_reduced_run_beats_the_initial_schedule_and_the_best_constant_rate(example):
    result = example.main(meta_steps=30, steps=50, phases=5, eval_seeds=3,
                          grid=(0.1, 0.3, 0.5, 1.0), quiet=True)
    learned, best, initial = result["learned"], result["best_constant"], result["initial"]
    assert all(math.isfinite(r) for r in result["schedule"])
    assert learned["val_loss"] < 0.5 * initial["val_loss"]
    assert learned["test_acc"] > initial["test_acc"] + 0.03
    assert learned["val_loss"] < best["val_loss"]
    assert learned["test_loss"] < best["test_loss"]


def test_example_prints_program_schedule_and_table(example, capsys):
    example.main(meta_steps=2, steps=10, phases=2, eval_seeds=1, grid=(0.1,))
    out = capsys.readouterr().out
    assert "schedule -> train  grad=unroll  inner_steps=10" in out
    assert "learned schedule" in out and "| learned (unroll) |" in out
    assert "| constant 0.1 (best on val) |" in out and "wall time:" in out
