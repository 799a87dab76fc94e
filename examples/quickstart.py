"""Quickstart: learn a per-pixel weight decay for a digits classifier with mlodsl.

Two levels, each a plain decorated function:

* ``classifier`` (lower) trains a one-hidden-layer MLP on a small training split (200 of
  scikit-learn's 8x8 digits). Its loss is cross-entropy plus a learned L2 penalty: one decay per
  input pixel on the first layer (64 values) and one for the output layer.
* ``hpo`` (upper) trains the logarithms of those 65 decays on a held-out validation split, with
  implicit hypergradients computed by conjugate gradient through the classifier.

The decays start at a fixed value that is clearly too strong for this model. The script trains
the same classifier with that fixed decay as a baseline (same initialization, same batches, same
number of steps), then with the learned decays, and compares both on a test split that neither
level ever sees.

Run it with ``python examples/quickstart.py`` (10-15 s on two CPU cores); ``--steps`` sets the
classifier's number of training steps, ``--seed`` the split, initialization and batch order.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mlodsl as ml

SEED = 0
N_TRAIN, N_VAL = 200, 300          # the remaining 1297 digits are the test split
HIDDEN = 256                       # over-parameterized: ~19k weights for 200 examples
INIT_DECAY = 0.1                   # starting value of every decay (too strong on purpose)
INNER_STEPS = 5                    # classifier steps between two hpo steps
STEPS = 2000                       # classifier steps in a full run
# The MLP's Hessian is not positive definite. Undamped CG (the default, grad="cg") stops at the
# first direction of negative curvature and still learns (test acc 0.920 here); damping, i.e.
# solving (H + mu I) u = v, lets every iteration count and is a little steadier.
CG = ml.hypergrad.cg(iterations=10, mu=1.0)


# -- data ----------------------------------------------------------------------------------------

def load_splits(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Shuffle the digits once and split them; standardize with the training split's stats."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    train = slice(0, N_TRAIN)
    mean = x[train].mean(0)
    std = x[train].std(0).clamp_min(1.0)   # (raw pixels are 0..16) no blow-up of rare pixels
    x = (x - mean) / std
    return {
        "train": (x[train], y[train]),
        "val": (x[N_TRAIN:N_TRAIN + N_VAL], y[N_TRAIN:N_TRAIN + N_VAL]),
        "test": (x[N_TRAIN + N_VAL:], y[N_TRAIN + N_VAL:]),
    }


def loader(split: tuple[torch.Tensor, torch.Tensor], batch_size: int, seed: int) -> DataLoader:
    """A shuffling DataLoader with its own generator, so its batch order is reproducible."""
    return DataLoader(TensorDataset(*split), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


# -- model ---------------------------------------------------------------------------------------

def make_net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


def make_log_decay() -> dict[str, nn.Parameter]:
    """The hyperparameters: log of one decay per input pixel, and of one for the output layer."""
    start = math.log(INIT_DECAY)
    return {"pixels": nn.Parameter(torch.full((64,), start)),
            "output": nn.Parameter(torch.full((), start))}


def penalty(net: nn.Sequential, log_decay: Any) -> torch.Tensor:
    """sum_i exp(log_decay_i) * |weights out of pixel i|^2 + exp(log_out) * |output weights|^2."""
    pixel_norms = net[0].weight.pow(2).sum(0)            # (64,): one per input pixel
    return (log_decay["pixels"].exp() @ pixel_norms
            + log_decay["output"].exp() * net[2].weight.pow(2).sum())


@torch.no_grad()
def evaluate(net: nn.Module, split: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """(cross-entropy, accuracy) on a whole split."""
    x, y = split
    out = net(x)
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def classifier_optimizer(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)


# -- the programs ------------------------------------------------------------------------------

def build_program(splits: dict, seed: int) -> tuple[ml.Program, nn.Sequential, dict]:
    """The classifier and, above it, the level that learns the classifier's decays."""
    net = make_net(seed)
    log_decay = make_log_decay()

    @ml.level(module=net, optimizer=classifier_optimizer(net),
              data=loader(splits["train"], 64, seed))
    def classifier(batch, hpo):
        """Cross-entropy plus the decays that 'hpo' learns (read through its handle)."""
        x, y = batch
        return F.cross_entropy(net(x), y) + penalty(net, hpo)

    @ml.level(upper_of="classifier", grad=CG, module=log_decay,
              optimizer=torch.optim.Adam(log_decay.values(), lr=0.05),
              data=loader(splits["val"], 100, seed + 1), inner_steps=INNER_STEPS)
    def hpo(batch, classifier):
        """Validation loss of the current classifier; its hypergradient reaches the decays."""
        x, y = batch
        out = classifier(x)
        return {"loss": F.cross_entropy(out, y), "acc": (out.argmax(1) == y).float().mean()}

    return ml.program(classifier, hpo), net, log_decay


def train_baseline(splits: dict, steps: int, seed: int) -> nn.Sequential:
    """The same classifier (same initialization, optimizer and batches), every decay fixed at
    its starting value: a one-level program."""
    net = make_net(seed)
    fixed = {name: value.detach() for name, value in make_log_decay().items()}

    @ml.level(module=net, optimizer=classifier_optimizer(net),
              data=loader(splits["train"], 64, seed))
    def classifier(batch):
        x, y = batch
        return F.cross_entropy(net(x), y) + penalty(net, fixed)

    ml.program(classifier, progress=False).run(steps=steps)
    return net


# -- the report ----------------------------------------------------------------------------------

def describe_decays(log_decay: dict, blank: torch.Tensor) -> list[str]:
    """Summary of the learned decays; ``blank`` marks pixels that are 0 in every training image
    (no gradient ever reaches their decay, so it keeps its starting value)."""
    decay = log_decay["pixels"].detach().exp()
    used = decay[~blank]
    lines = [
        f"learned decays ({INIT_DECAY:g} at the start): output layer "
        f"{log_decay['output'].detach().exp():.3g}; the {len(used)} pixels that vary in the "
        f"training split: mean {used.mean():.3g}, median {used.median():.3g}, "
        f"min {used.min():.3g}, max {used.max():.3g}",
    ]
    order = decay.masked_fill(blank, float("nan"))
    strongest = [i for i in order.argsort(descending=True).tolist() if not blank[i]][:6]
    weakest = order.argsort().tolist()[:6]
    pixel = lambda i: f"({i // 8},{i % 8}) {decay[i]:.3g}"  # noqa: E731
    lines.append("strongest decay, pixel (row,col): " + ", ".join(map(pixel, strongest)))
    lines.append("weakest decay, pixel (row,col):   " + ", ".join(map(pixel, weakest)))
    lines.append(f"decay / starting decay, per pixel ({int(blank.sum())} blank in every "
                 "training image: '-'):")
    for row in range(8):
        cells = ("     -" if blank[i] else f"{decay[i] / INIT_DECAY:6.2f}"
                 for i in range(row * 8, row * 8 + 8))
        lines.append("  " + " ".join(cells))
    return lines


def main(steps: int = STEPS, quiet: bool = False, seed: int = SEED) -> dict[str, float]:
    """Train the classifier with fixed and with learned decays; print and return the numbers.

    Args:
        steps: Classifier training steps, for both runs (the hpo level takes
            ``steps // INNER_STEPS``).
        quiet: Print nothing.
        seed: Seeds the data split, the initialization and the batch order.

    Returns:
        ``baseline_test_acc``, ``learned_test_acc``, ``val_acc_before``, ``val_acc_after``,
        ``val_loss_before``, ``val_loss_after`` ("before" is the fixed starting decay) and
        ``wall_s``.
    """
    say = (lambda *a: None) if quiet else print
    start = time.perf_counter()
    splits = load_splits(seed)

    program, net, log_decay = build_program(splits, seed)
    say(program)                        # levels, edges, reads and the compiled schedule
    say()
    history = program.run(steps=steps)
    baseline_net = train_baseline(splits, steps, seed)

    say(program.visualize())            # the level graph, with step counts and last losses
    say()
    val_loss0, val_acc0 = evaluate(baseline_net, splits["val"])
    val_loss1, val_acc1 = evaluate(net, splits["val"])
    _, test_acc0 = evaluate(baseline_net, splits["test"])
    _, test_acc1 = evaluate(net, splits["test"])
    hpo_loss = history.series("hpo", "loss")
    k = max(1, min(20, len(hpo_loss) // 4))
    say(f"{steps} classifier steps, {program.steps['hpo']} hpo steps; {N_TRAIN} train / "
        f"{N_VAL} val / {len(splits['test'][1])} test digits")
    if hpo_loss:
        say(f"hpo loss (validation batches), mean of its first {k} steps "
            f"{sum(hpo_loss[:k]) / k:.3f} -> last {k} steps {sum(hpo_loss[-k:]) / k:.3f}")
    say(f"validation loss: fixed decay {val_loss0:.3f}   learned decay {val_loss1:.3f}")
    say(f"validation acc:  fixed decay {val_acc0:.3f}   learned decay {val_acc1:.3f}")
    say(f"test acc:        fixed decay {test_acc0:.3f}   learned decay {test_acc1:.3f}")
    blank = splits["train"][0].std(0) == 0
    for line in describe_decays(log_decay, blank):
        say(line)
    wall = time.perf_counter() - start
    say(f"wall time: {wall:.1f} s")
    return {"baseline_test_acc": test_acc0, "learned_test_acc": test_acc1,
            "val_acc_before": val_acc0, "val_acc_after": val_acc1,
            "val_loss_before": val_loss0, "val_loss_after": val_loss1, "wall_s": wall}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS,
                        help=f"classifier training steps (default {STEPS})")
    parser.add_argument("--seed", type=int, default=SEED,
                        help=f"seed of the split, initialization and batch order (default {SEED})")
    arguments = parser.parse_args()
    main(steps=arguments.steps, seed=arguments.seed)
