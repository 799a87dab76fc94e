"""DARTS-style architecture search (Liu et al. 2019) on 8x8 digits, with grad="finite_diff".

The search space is one small convolutional cell on the digit images (8x8, one channel): a
stem convolution gives node 0, and each of the nodes 1 and 2 sums *mixed operations* applied to
every earlier node (3 edges). A mixed operation is ``sum_o softmax(alpha_edge)_o * op_o(x)`` over

    zero, skip, avg_pool3x3, max_pool3x3, conv3x3, conv5x5

(each conv preceded by a ReLU). A linear classifier reads the nodes 1 and 2, average-pooled to 2x2.
Two levels, each a plain decorated function:

* ``supernet`` (lower) trains the network weights of every operation on the training split,
  with the current ``alpha`` mixing them (SGD with momentum, as in DARTS).
* ``arch`` (upper) trains ``alpha`` (3 edges x 6 operations) on the validation split, with
  the finite-difference hypergradient of DARTS: ``H^{-1}`` taken as ``xi`` times the identity,
  ``xi`` the weights' learning rate (DARTS's one-step approximation), and the mixed second
  derivative by a central difference of two training-loss gradients
  (``ml.hypergrad.finite_diff(xi=0.05)``; ``grad="darts"`` is the same method with ``xi=1``).
  As in later DARTS variants, ``alpha`` waits for a warm-up of the weights (``warmup=``):
  untrained convolutions would otherwise lose to the parameter-free operations at first.

After the search every edge keeps its strongest non-zero operation (as DARTS derives its
cells). That architecture and a few architectures drawn at random from the same space are then
trained from scratch with the same budget, and compared on the test split.
Run it with ``python examples/darts.py`` (a few minutes on two CPU cores).
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mlodsl as ml

SEED = 0
N_TRAIN, N_VAL = 600, 400          # the remaining 797 digits are the test split
CHANNELS = 8
NODES = 2                          # intermediate nodes; node j has an edge from each node i < j
OPS = ("zero", "skip", "avg_pool3x3", "max_pool3x3", "conv3x3", "conv5x5")
SEARCH_STEPS = 800                 # supernet steps (arch steps too, after the warm-up)
WARMUP = 200                       # supernet steps before alpha starts to move
TRAIN_STEPS = 1000                 # steps of each from-scratch training of a discrete net
RANDOM_ARCHS = 5
TRAIN_SEEDS = 2                    # from-scratch trainings per architecture (accuracy averaged)
BATCH = 32
WEIGHTS_LR = 0.05                  # SGD (momentum 0.9, cosine decay) for the network weights
XI = WEIGHTS_LR                    # finite_diff takes H^{-1} ~ XI * identity, as DARTS does


def edges(nodes: int = NODES) -> list[tuple[int, int]]:
    """(from node, to node) for every edge of the cell, in a fixed order."""
    return [(i, j) for j in range(1, nodes + 1) for i in range(j)]


# -- data ----------------------------------------------------------------------------------------

def load_splits(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The digits as (n, 1, 8, 8) images in [0, 1], shuffled once and split."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    cut = N_TRAIN + N_VAL
    return {"train": (x[:N_TRAIN], y[:N_TRAIN]), "val": (x[N_TRAIN:cut], y[N_TRAIN:cut]),
            "train+val": (x[:cut], y[:cut]), "test": (x[cut:], y[cut:])}


def loader(split: tuple[torch.Tensor, torch.Tensor], seed: int) -> DataLoader:
    return DataLoader(TensorDataset(*split), batch_size=BATCH, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


# -- the search space ----------------------------------------------------------------------------

class Zero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def make_op(name: str, channels: int = CHANNELS) -> nn.Module:
    """One candidate operation; every one keeps the shape (channels, 8, 8)."""
    if name == "zero":
        return Zero()
    if name == "skip":
        return nn.Identity()
    if name == "avg_pool3x3":
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    if name == "max_pool3x3":
        return nn.MaxPool2d(3, stride=1, padding=1)
    size = {"conv3x3": 3, "conv5x5": 5}[name]
    return nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, size, padding=size // 2))


class MixedOp(nn.Module):
    """sum_o weights_o * op_o(x): every candidate on one edge."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = nn.ModuleList(make_op(name) for name in OPS)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return sum(w * op(x) for w, op in zip(weights, self.ops))


class Cell(nn.Module):
    """Stem, NODES intermediate nodes, classifier. ``choice`` (one op name per edge) makes a
    discrete network; without it every edge is a :class:`MixedOp` weighted by ``alpha``."""

    def __init__(self, choice: Sequence[str] | None = None) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, CHANNELS, 3, padding=1)
        self.edges = edges()
        self.choice = None if choice is None else tuple(choice)
        self.ops = nn.ModuleList(MixedOp() if choice is None else make_op(name)
                                 for name in (choice or [None] * len(self.edges)))
        self.head = nn.Linear(NODES * CHANNELS * 4, 10)

    def forward(self, x: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        weights = None if alpha is None else F.softmax(alpha, dim=-1)
        nodes = [self.stem(x)]
        for j in range(1, NODES + 1):
            total = 0
            for k, (i, target) in enumerate(self.edges):
                if target == j:
                    op = self.ops[k]
                    total = total + (op(nodes[i]) if weights is None else op(nodes[i], weights[k]))
            nodes.append(total)
        features = torch.cat([F.adaptive_avg_pool2d(n, 2) for n in nodes[1:]], 1)
        return self.head(features.flatten(1))


def derive(alpha: torch.Tensor) -> list[str]:
    """Each edge's strongest operation other than 'zero' (how DARTS derives a cell)."""
    masked = alpha.detach().clone()
    masked[:, OPS.index("zero")] = -float("inf")
    return [OPS[k] for k in masked.argmax(1).tolist()]


def random_architecture(rng: random.Random) -> list[str]:
    """A uniformly random non-zero operation on every edge: the same space :func:`derive`
    chooses from."""
    return [rng.choice([op for op in OPS if op != "zero"]) for _ in edges()]


def weights_optimizer(net: nn.Module, steps: int) -> tuple[torch.optim.Optimizer, object]:
    """SGD with momentum and a cosine schedule, for the supernet and the retrained nets."""
    sgd = torch.optim.SGD(net.parameters(), lr=WEIGHTS_LR, momentum=0.9, weight_decay=3e-4)
    return sgd, torch.optim.lr_scheduler.CosineAnnealingLR(sgd, steps)


# -- the search program --------------------------------------------------------------------------

def build_search(splits: dict, seed: int, steps: int, grad="finite_diff", warmup: int = WARMUP,
                 **options) -> tuple[ml.Program, Cell, nn.Parameter]:
    """Supernet weights below, architecture weights above."""
    torch.manual_seed(seed)
    net = Cell()
    alpha = nn.Parameter(1e-3 * torch.randn(len(edges()), len(OPS)))
    sgd, cosine = weights_optimizer(net, steps)

    @ml.level(module=net, optimizer=sgd, scheduler=cosine, data=loader(splits["train"], seed),
              clip_grad_norm=5.0)
    def supernet(batch, arch):
        """Training loss of the network with every edge mixed by softmax(alpha)."""
        x, y = batch
        return F.cross_entropy(net(x, arch.module), y)

    @ml.level(upper_of="supernet", grad=grad, inner_steps=1, module=alpha, warmup=warmup,
              optimizer=torch.optim.Adam([alpha], lr=3e-3, betas=(0.5, 0.999),
                                         weight_decay=1e-3),
              data=loader(splits["val"], seed + 1))
    def arch(batch, supernet):
        """Validation loss of the supernet with the current alpha."""
        x, y = batch
        out = supernet(x, alpha)
        return {"loss": F.cross_entropy(out, y), "acc": (out.argmax(1) == y).float().mean()}

    return ml.program(supernet, arch, **options), net, alpha


# -- training discrete architectures from scratch ------------------------------------------------

def train_from_scratch(choice: Sequence[str], splits: dict, steps: int, seed: int) -> float:
    """Train the discrete cell on train+val for ``steps`` steps; return its test accuracy."""
    torch.manual_seed(seed)
    net = Cell(choice)
    sgd, cosine = weights_optimizer(net, steps)

    @ml.level(module=net, optimizer=sgd, scheduler=cosine, clip_grad_norm=5.0,
              data=loader(splits["train+val"], seed))
    def classifier(batch):
        x, y = batch
        return F.cross_entropy(net(x), y)

    ml.program(classifier, progress=False).run(steps=steps)
    net.eval()
    with torch.no_grad():
        x, y = splits["test"]
        return (net(x).argmax(1) == y).float().mean().item()


def search_method(grad: str, xi: float = XI):
    """The arch level's method: ``finite_diff`` with DARTS's ``xi``, or any other name."""
    return ml.hypergrad.finite_diff(xi=xi) if grad == "finite_diff" else grad


def main(search_steps: int = SEARCH_STEPS, train_steps: int = TRAIN_STEPS,
         random_archs: int = RANDOM_ARCHS, grad: str = "finite_diff", xi: float = XI,
         warmup: int = WARMUP, train_seeds: int = TRAIN_SEEDS, quiet: bool = False,
         seed: int = SEED) -> dict[str, object]:
    """Search, derive, retrain the result and random architectures; print and return figures.

    Args:
        search_steps: Supernet steps of the search (alpha takes one per step after the
            warm-up).
        train_steps: Steps of each from-scratch training.
        random_archs: Random architectures trained for comparison.
        grad: The arch level's hypergradient method (a name).
        xi: ``finite_diff``'s scale of the identity standing for ``H^{-1}``.
        warmup: Supernet steps before alpha starts to move.
        train_seeds: From-scratch trainings per architecture (initialization seeds).
        quiet: Print nothing.
        seed: Seeds the split, initializations, batch orders and the random architectures.

    Returns:
        ``choice`` (op per edge), ``alpha_softmax`` (rows per edge), ``searched_acc`` (mean
        over seeds) and ``searched_accs``, ``random_accs`` (a mean per random architecture),
        ``random_choices``, ``random_mean``, ``random_std`` (over architectures),
        ``search_s``, ``wall_s``.
    """
    say = (lambda *a: None) if quiet else print
    wall = time.perf_counter()
    splits = load_splits(seed)
    program, net, alpha = build_search(splits, seed, search_steps, search_method(grad, xi),
                                       warmup, progress=False if quiet else None)
    say(program)
    say()
    start = time.perf_counter()
    history = program.run(steps=search_steps)
    search_s = time.perf_counter() - start
    val_acc = history.series("arch", "acc")
    k = max(1, min(50, len(val_acc) // 4))
    say(f"search: {search_steps} supernet + {program.steps['arch']} arch steps in {search_s:.1f} s "
        f"({1000 * search_s / max(search_steps, 1):.1f} ms per step); supernet accuracy on "
        f"validation batches, mean of the first {k} steps {sum(val_acc[:k]) / k:.3f} -> "
        f"last {k} {sum(val_acc[-k:]) / k:.3f}")
    weights = F.softmax(alpha.detach(), dim=-1)
    choice = derive(alpha)
    say()
    say("| edge | " + " | ".join(OPS) + " | chosen |")
    say("|---|" + "---|" * (len(OPS) + 1))
    for (i, j), row, op in zip(edges(), weights.tolist(), choice):
        best = OPS[max(range(len(OPS)), key=row.__getitem__)]
        cells = " | ".join(f"**{w:.3f}**" if name == best else f"{w:.3f}"
                           for name, w in zip(OPS, row))
        say(f"| {i} -> {j} | {cells} | {op} ({row[OPS.index(op)]:.3f}) |")

    rng = random.Random(seed)
    random_choices = [random_architecture(rng) for _ in range(random_archs)]

    def trained(c: Sequence[str]) -> list[float]:
        return [train_from_scratch(c, splits, train_steps, seed + 7 + k)
                for k in range(train_seeds)]

    searched = trained(choice)
    per_random = [trained(c) for c in random_choices]
    accs = torch.tensor([sum(a) / len(a) for a in per_random])
    std = accs.std().item() if len(accs) > 1 else 0.0
    say()
    say(f"trained from scratch on train+val ({N_TRAIN + N_VAL} digits), {train_steps} steps, "
        f"{train_seeds} initialization seed(s) per architecture (mean, then each); test: "
        f"{len(splits['test'][1])} digits")
    say("| architecture | test acc |")
    say("|---|---|")
    label = f"finite_diff, xi={xi:g}" if grad == "finite_diff" else grad
    cell = lambda a: f"{sum(a) / len(a):.3f} ({', '.join(f'{x:.3f}' for x in a)})"  # noqa: E731
    say(f"| searched ({label}): {', '.join(choice)} | {cell(searched)} |")
    for c, a in zip(random_choices, per_random):
        say(f"| random: {', '.join(c)} | {cell(a)} |")
    say(f"| random, mean +- std over {random_archs} | {accs.mean():.3f} +- {std:.3f} |")
    results = {"choice": choice, "alpha_softmax": weights.tolist(),
               "searched_acc": sum(searched) / len(searched), "searched_accs": searched,
               "random_accs": accs.tolist(), "random_choices": random_choices,
               "random_mean": accs.mean().item(), "random_std": std, "search_s": search_s,
               "wall_s": time.perf_counter() - wall}
    say(f"wall time: {results['wall_s']:.1f} s")
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)  # small tensors; a second thread only adds synchronization
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--search-steps", type=int, default=SEARCH_STEPS,
                        help=f"supernet (and arch) steps of the search (default {SEARCH_STEPS})")
    parser.add_argument("--train-steps", type=int, default=TRAIN_STEPS,
                        help=f"steps of each from-scratch training (default {TRAIN_STEPS})")
    parser.add_argument("--random-archs", type=int, default=RANDOM_ARCHS,
                        help=f"random architectures to compare with (default {RANDOM_ARCHS})")
    parser.add_argument("--train-seeds", type=int, default=TRAIN_SEEDS,
                        help=f"trainings per architecture (default {TRAIN_SEEDS})")
    parser.add_argument("--grad", default="finite_diff",
                        help="the arch level's method: finite_diff (default), sama, cg, ...")
    parser.add_argument("--xi", type=float, default=XI,
                        help=f"finite_diff: H^-1 ~ xi * identity (default {XI:g}; 1 is 'darts')")
    parser.add_argument("--warmup", type=int, default=WARMUP,
                        help=f"supernet steps before alpha moves (default {WARMUP})")
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed (default {SEED})")
    arguments = parser.parse_args()
    main(search_steps=arguments.search_steps, train_steps=arguments.train_steps,
         random_archs=arguments.random_archs, grad=arguments.grad, xi=arguments.xi,
         warmup=arguments.warmup, train_seeds=arguments.train_seeds,
         seed=arguments.seed)
