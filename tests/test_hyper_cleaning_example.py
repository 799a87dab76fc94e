"""The data hyper-cleaning example: its corruption and scoring, the CG hypergradient against an
exact solve, and a reduced run that beats the noisy baseline and flags the corrupted digits."""

from __future__ import annotations

import pytest
import torch

import mlodsl as ml

from example_loader import load_example

pytest.importorskip("sklearn")

REDUCED_OUTER_STEPS = 40  # 900 classifier steps (500 of warm-up); a few seconds on one core


@pytest.fixture(scope="module")
def example():
    return load_example("hyper_cleaning")


@pytest.fixture
def one_thread(example):
    with example.one_thread():
        yield


def test_splits_and_corruption(example):
    splits = example.make_splits(seed=0)
    assert [len(splits[k].y) for k in ("train", "val", "test")] == [900, 300, 597]
    wrong = splits["train"].y != splits["train_clean"].y
    assert wrong.sum().item() == 450                     # exactly half, never to the same class
    assert torch.equal(splits["train"].x, splits["train_clean"].x)
    again = example.make_splits(seed=0)
    assert torch.equal(again["train"].y, splits["train"].y)


def test_f1_score(example):
    corrupted = torch.tensor([True, True, True, True, False, False])
    flagged = torch.tensor([True, True, True, False, True, False])
    # precision 3/4, recall 3/4
    assert example.f1_score(flagged, corrupted) == pytest.approx(0.75)
    assert example.f1_score(corrupted, corrupted) == 1.0
    assert example.f1_score(~corrupted, corrupted) == 0.0


def test_cg_hypergradient_matches_an_exact_solve(example, one_thread):
    """After a few cleaner steps, the example's CG hypergradient against the dense solve."""
    program, _, _ = example.build_program(example.make_splits(seed=1))
    program.run(steps=example.WARMUP + 5 * example.INNER_STEPS)
    check = ml.check_hypergrad(program, "cleaner", reference="exact", max_exact_params=1000)
    assert check.relative_error < 1e-3 and check.cosine > 0.9999


def test_reduced_run_beats_the_baseline_and_flags_the_corrupted_digits(example, one_thread):
    row = example.run_seed(0, outer_steps=REDUCED_OUTER_STEPS)
    # Reduced run (seeds 0-2): baseline 0.83-0.87, oracle 0.93-0.96, cleaned 0.933-0.950, gap
    # closed 73-109 %, F1 0.937-0.943, mean weight 0.88-0.90 (clean) and 0.10-0.12 (corrupted).
    assert row["cleaned"] > row["baseline"] + 0.05
    assert row["gap_closed"] > 0.6
    assert row["f1"] > 0.85
    assert row["mean_weight_corrupted"] < 0.3 < 0.7 < row["mean_weight_clean"]


def test_example_prints_its_table(example, capsys):
    example.main(seeds=(0,), outer_steps=2, check=False)
    out = capsys.readouterr().out
    assert "cleaner -> classifier  grad=cg  inner_steps=10" in out
    for label in ("noisy baseline", "clean oracle", "hyper-cleaning, mlodsl cg", "gap closed",
                  "F1 of flagged"):
        assert f"| {label}" in out
    assert "wall time:" in out
