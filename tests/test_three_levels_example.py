"""The learning-by-ignoring example: its data and pieces, its three-level hypergradient against
the exact total derivative, and a reduced run that beats the baselines without reweighting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mlodsl as ml

from example_loader import load_example, one_torch_thread

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def example():
    return load_example("three_levels")


@pytest.fixture(scope="module")
def data(example):
    return example.load_splits(0)


@pytest.fixture(autouse=True)
def one_thread():
    with one_torch_thread():
        yield


def test_half_of_the_source_is_relabelled_by_one(example, data):
    x, y = data["source"]
    _, clean = data["clean_source"]
    bad = data["corrupted"]
    assert x.shape == (example.N_SOURCE, example.COMPONENTS)
    assert torch.equal(y[bad], (clean[bad] + 1) % 10) and torch.equal(y[~bad], clean[~bad])
    assert 0.4 < bad.float().mean().item() < 0.6
    sizes = [len(data[k][1]) for k in ("target", "val", "test")]
    assert sizes == [example.N_TARGET, example.N_VAL, 1797 - example.N_SOURCE - sum(sizes[:2])]


def test_weighted_loss_is_a_weighted_mean(example, data):
    net = example.make_linear()
    torch.nn.init.normal_(net.weight, generator=torch.Generator().manual_seed(0))
    x, y = data["source"]
    plain = example.weighted_ce(net, (x, y), None)
    assert torch.allclose(example.weighted_ce(net, (x, y), torch.full((len(y),), 3.0)), plain)
    only_first = torch.full((len(y),), -60.0)
    only_first[0] = 60.0
    decay = 0.5 * example.DECAY * sum(p.pow(2).sum() for p in net.parameters())
    expected = F.cross_entropy(net(x[:1]), y[:1]) + decay
    assert torch.allclose(example.weighted_ce(net, (x, y), only_first), expected, atol=1e-5)


def test_the_hypergradient_flows_through_both_edges_and_matches_the_total_derivative(
        example, data):
    """Pretraining does not read finetuning, so the edge-by-edge chain (cg on both edges) is
    the total derivative here: it must agree with the dense exact answer."""
    cg = ml.hypergrad.cg(iterations=200, tol=1e-12)
    program, parts = example.build_program(data, cg, cg, progress=False)
    program.run(steps=40)
    check = ml.check_hypergrad(program, "reweight", reference="exact")
    assert check.relative_error < 1e-3 and check.cosine > 0.9999
    # The validation loss reads only the finetuned model: a non-zero answer for the logits has
    # crossed both edges (reweight -> pretrain -> finetune).
    assert check.expected.abs().max() > 1e-6
    rows = program.history.rows()
    last = next(r for r in reversed(rows) if r["level"] == "reweight")
    assert "reweight->pretrain/residual" in last and "pretrain->finetune/residual" in last


def test_reduced_run_beats_the_baselines_without_reweighting(example):
    rows = example.main(steps=300, methods=["cg", "finite_diff"], quiet=True)
    plain = max(rows["target only"]["test_acc"],
                rows["pretrain + finetune (no upper)"]["test_acc"])
    for label in ("three levels: cg", "three levels: finite_diff"):
        assert rows[label]["test_acc"] > plain + 0.05
        # relabelled source examples end up with much smaller weights than clean ones
        assert rows[label]["w_corrupt"] < 0.5 * rows[label]["w_clean"]
    assert rows["oracle: pretrain on the clean source + finetune"]["test_acc"] > plain


def test_example_prints_the_program_and_table(example, capsys):
    example.main(steps=20, methods=["cg"])
    out = capsys.readouterr().out
    assert "reweight -> pretrain  grad=cg  inner_steps=2" in out
    assert "pretrain -> finetune  grad=cg  inner_steps=5" in out
    assert "| three levels: cg |" in out and "| pretrain + finetune (no upper) |" in out
