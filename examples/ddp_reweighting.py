"""Data reweighting with distributed data parallel: learn class weights for an imbalanced
digits training set, on one process or several (``torchrun``).

Two levels:

* ``classifier`` (lower) trains a softmax regression on a long-tailed training split of
  scikit-learn's 8x8 digits (class 0 keeps 100 images, class 9 six). Its loss is a weighted
  cross-entropy: each example counts with the weight of its class.
* ``reweighter`` (upper) learns the ten class weights (``10 * softmax(logits)``, mean 1) so
  that the classifier does well on a small *balanced* validation split; conjugate-gradient
  implicit hypergradients.

The baseline is the same classifier with uniform weights (same initialization, batches and
steps). Both are scored on a balanced test split that neither level sees.

Run it on one process, or on two with data parallelism (the same results up to float
rounding: the DataLoaders' batch sizes are global batches, split between the ranks, and
``distributed="ddp"`` gives one process the same data order as several)::

    python examples/ddp_reweighting.py
    torchrun --nproc_per_node=2 examples/ddp_reweighting.py

With ``torchrun``, ``ml.program`` joins the process group by itself (gloo on CPU), every
gradient and Hessian-vector product is averaged over the ranks, and only rank 0 prints.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mlodsl as ml

SEED = 0
PER_CLASS_TEST, PER_CLASS_VAL = 60, 10
HEAD, TAIL = 100, 6            # training images of class 0 and of class 9 (geometric between)
BATCH, VAL_BATCH = 64, 100     # global batches: each of N ranks takes 1/N of every batch
INNER_STEPS = 10               # classifier steps between two reweighter steps
STEPS = 3000                   # classifier steps in a full run
CG = ml.hypergrad.cg(iterations=10)


def load_splits(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Balanced test and validation splits; a long-tailed training split from the rest."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    parts: dict[str, list[torch.Tensor]] = {"test": [], "val": [], "train": []}
    for c in range(10):
        index = (y == c).nonzero().squeeze(1)
        keep = round(HEAD * (TAIL / HEAD) ** (c / 9))
        parts["test"].append(index[:PER_CLASS_TEST])
        parts["val"].append(index[PER_CLASS_TEST:PER_CLASS_TEST + PER_CLASS_VAL])
        parts["train"].append(index[PER_CLASS_TEST + PER_CLASS_VAL:][:keep])
    mean = x[torch.cat(parts["train"])].mean(0)
    return {name: ((x[torch.cat(i)] - mean), y[torch.cat(i)]) for name, i in parts.items()}


def loader(split: tuple[torch.Tensor, torch.Tensor], batch_size: int) -> DataLoader:
    # drop_last: every global batch splits evenly between 1, 2 or 4 ranks.
    return DataLoader(TensorDataset(*split), batch_size=batch_size, shuffle=True,
                      drop_last=True)


def make_net(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(64, 10)


def weighted_loss(net: nn.Linear, batch: tuple, class_weights: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with each example weighted by its class (a mean over the batch), plus a
    small L2 term that keeps the lower problem strongly convex."""
    x, y = batch
    losses = F.cross_entropy(net(x), y, reduction="none")
    return (class_weights[y] * losses).mean() + 1e-3 * net.weight.pow(2).sum()


def build(splits: dict, seed: int, reweight: bool) -> tuple[ml.Program, nn.Linear]:
    """The two-level program, or (``reweight=False``) the classifier alone, uniform weights."""
    net = make_net(seed)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    if not reweight:
        @ml.level(module=net, optimizer=optimizer, data=loader(splits["train"], BATCH))
        def classifier(batch):
            return weighted_loss(net, batch, torch.ones(10))

        return ml.program(classifier, seed=seed, progress=False, distributed="ddp"), net
    logits = nn.Parameter(torch.zeros(10))

    @ml.level(module=net, optimizer=optimizer, data=loader(splits["train"], BATCH))
    def classifier(batch, reweighter):
        return weighted_loss(net, batch, 10 * torch.softmax(reweighter, 0))

    @ml.level(upper_of="classifier", grad=CG, module=logits, inner_steps=INNER_STEPS,
              optimizer=torch.optim.Adam([logits], lr=0.05),
              data=loader(splits["val"], VAL_BATCH))
    def reweighter(batch, classifier):
        x, y = batch
        return F.cross_entropy(classifier(x), y)

    return ml.program(classifier, reweighter, seed=seed, progress=False,
                      distributed="ddp"), net


@torch.no_grad()
def accuracy(net: nn.Module, split: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """(accuracy, accuracy of the five rarest classes) on a split."""
    x, y = split
    right = (net(x).argmax(1) == y).float()
    return right.mean().item(), right[y >= 5].mean().item()


def main(steps: int = STEPS, quiet: bool = False, seed: int = SEED) -> dict[str, float]:
    """Train with uniform and with learned class weights; print (rank 0) and return figures.

    Returns:
        ``baseline_test_acc``, ``reweighted_test_acc``, the same for the five rarest classes
        (``*_rare_acc``), ``world_size`` and ``wall_s``.
    """
    say = (lambda *a: None) if quiet or not ml.distributed.is_main() else print
    start = time.perf_counter()
    splits = load_splits(seed)
    counts = torch.bincount(splits["train"][1], minlength=10).tolist()
    say(f"training images per class: {counts}; world size {ml.distributed.world_size()}")
    program, net = build(splits, seed, reweight=True)
    program.run(steps=steps)
    baseline, baseline_net = build(splits, seed, reweight=False)
    baseline.run(steps=steps)
    weights = 10 * torch.softmax(program.level("reweighter").params[0].detach(), 0)
    results = {"world_size": ml.distributed.world_size(), "wall_s": time.perf_counter() - start}
    for name, model in (("baseline", baseline_net), ("reweighted", net)):
        results[f"{name}_test_acc"], results[f"{name}_rare_acc"] = accuracy(model,
                                                                             splits["test"])
    say("learned class weights: " + ", ".join(f"{w:.2f}" for w in weights.tolist()))
    say(f"test accuracy: uniform weights {results['baseline_test_acc']:.3f}, learned weights "
        f"{results['reweighted_test_acc']:.3f}")
    say(f"five rarest classes: uniform {results['baseline_rare_acc']:.3f}, learned "
        f"{results['reweighted_rare_acc']:.3f}  ({results['wall_s']:.1f} s)")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS, help="classifier steps")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    main(steps=args.steps, seed=args.seed)
