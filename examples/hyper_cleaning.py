"""Data hyper-cleaning (Franceschi et al. 2017): learn one weight per training example so that
a classifier trained on half-corrupted labels does well on a small clean validation set.

Scikit-learn's digits are split into 900 training, 300 validation and 597 test digits; half of
the training labels (450, chosen at random) are replaced by a different class drawn uniformly.

Two levels, each a plain decorated function:

* ``classifier`` (lower) is multinomial logistic regression (64 -> 10) trained by full-batch
  SGD on the training digits. Its loss is the mean of the per-example cross-entropies, example
  ``i`` weighted by ``sigmoid(a_i)``, plus a small L2 penalty on the weights. The lower
  problem is then strongly convex, except along a common shift of the ten biases, which
  changes no prediction (so no loss, and no hypergradient either).
* ``cleaner`` (upper) trains the 900 logits ``a`` (0 at the start: every weight 0.5) with Adam
  on the classifier's cross-entropy on the validation digits. Its hypergradient is implicit
  (``grad="cg"``): conjugate gradient on the classifier's Hessian (650 parameters), warm-started
  from the previous step's solution. The classifier keeps training between two cleaner steps
  from where it is (a warm start of the lower problem) and trains alone for ``WARMUP`` steps
  first, so each hypergradient is taken near the classifier's optimum, as the implicit function
  theorem assumes.

Compared on the test digits, which neither level sees: the noisy baseline (the same classifier,
every weight 1), the clean oracle (trained on the 450 uncorrupted training digits only) and the
learned weights. A training example is flagged as corrupted when its learned weight is below
0.5; the printed share of weights between 0.1 and 0.9 shows that the learned weights are nearly
binary, so the threshold hardly matters. At the end the CG hypergradient is compared with a
dense (exact) solve at the final state.

Run it with ``python examples/hyper_cleaning.py`` (three seeds, about 20 s on two CPU cores);
``--seeds`` and ``--outer-steps`` reduce it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import mlodsl as ml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_noise import Split, flip_labels, one_thread  # noqa: E402

CLASSES = 10
N_TRAIN, N_VAL = 900, 300          # the remaining 597 digits are the test split
NOISE = 0.5                        # fraction of training labels corrupted
L2 = 0.03                          # penalty 0.5 * L2 * |W|^2 on the classifier's weights
LOWER_LR = 0.1                     # classifier: full-batch SGD, momentum 0.9
UPPER_LR = 0.1                     # cleaner: Adam on the logits
INNER_STEPS = 10                   # classifier steps between two cleaner steps
WARMUP = 500                       # classifier steps before the cleaner's first step
OUTER_STEPS = 200                  # cleaner steps in a full run
CG = ml.hypergrad.cg(iterations=20)  # the lower problem is convex: no damping needed
THRESHOLD = 0.5                    # weight below which an example is flagged as corrupted
SEEDS = (0, 1, 2)


# -- data ----------------------------------------------------------------------------------------

def make_splits(seed: int) -> dict[str, Split]:
    """``train`` (labels corrupted), ``train_clean`` (same digits, true labels), ``val`` and
    ``test``; pixels standardized with the training split's statistics."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    x, y = x[order], y[order]
    train = slice(0, N_TRAIN)
    mean = x[train].mean(0)
    std = x[train].std(0).clamp_min(1.0)   # (raw pixels are 0..16) no blow-up of rare pixels
    x = (x - mean) / std
    return {"train": Split(x[train], flip_labels(y[train], NOISE, generator)),
            "train_clean": Split(x[train], y[train]),
            "val": Split(x[N_TRAIN:N_TRAIN + N_VAL], y[N_TRAIN:N_TRAIN + N_VAL]),
            "test": Split(x[N_TRAIN + N_VAL:], y[N_TRAIN + N_VAL:])}


# -- model ---------------------------------------------------------------------------------------

def make_classifier() -> nn.Linear:
    """Multinomial logistic regression, started from zero (the lower problem is convex)."""
    model = nn.Linear(64, CLASSES)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    return model


def classifier_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LOWER_LR, momentum=0.9)


def weighted_loss(model: nn.Linear, split: Split, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy, example ``i`` weighted by ``weights[i]`` (1 if None), plus L2."""
    losses = F.cross_entropy(model(split.x), split.y, reduction="none")
    if weights is not None:
        losses = weights * losses
    return losses.mean() + 0.5 * L2 * model.weight.pow(2).sum()


@torch.no_grad()
def accuracy(model: nn.Module, split: Split) -> float:
    return (model(split.x).argmax(1) == split.y).float().mean().item()


def f1_score(flagged: torch.Tensor, corrupted: torch.Tensor) -> float:
    """F1 of the boolean ``flagged`` at finding the ``corrupted`` examples."""
    hits = (flagged & corrupted).sum().item()
    if hits == 0:
        return 0.0
    precision, recall = hits / flagged.sum().item(), hits / corrupted.sum().item()
    return 2 * precision * recall / (precision + recall)


# -- the programs --------------------------------------------------------------------------------

def build_program(splits: dict[str, Split], grad=CG) -> tuple[ml.Program, nn.Linear,
                                                              nn.Parameter]:
    """The classifier and, above it, the level that learns one weight per training example."""
    model = make_classifier()
    logits = nn.Parameter(torch.zeros(N_TRAIN))
    train, val = splits["train"], splits["val"]

    @ml.level(module=model, optimizer=classifier_optimizer(model), data=lambda: train)
    def classifier(batch, cleaner):
        """Weighted training loss: example i counts sigmoid(a_i)."""
        return weighted_loss(model, batch, torch.sigmoid(cleaner))

    @ml.level(upper_of="classifier", grad=grad, module=logits,
              optimizer=torch.optim.Adam([logits], lr=UPPER_LR), data=lambda: val,
              inner_steps=INNER_STEPS, warmup=WARMUP)
    def cleaner(batch, classifier):
        """Validation loss of the classifier trained on the weighted examples."""
        x, y = batch
        return F.cross_entropy(classifier(x), y)

    return ml.program(classifier, cleaner, progress=False), model, logits


def train_fixed(split: Split, steps: int) -> nn.Linear:
    """The same classifier and optimizer, every example weight 1: a one-level program."""
    model = make_classifier()

    @ml.level(module=model, optimizer=classifier_optimizer(model), data=lambda: split)
    def classifier(batch):
        return weighted_loss(model, batch, None)

    ml.program(classifier, progress=False).run(steps=steps)
    return model


def run_seed(seed: int, outer_steps: int = OUTER_STEPS, grad=CG, check: bool = False,
             show: Callable[..., None] | None = None) -> dict[str, float]:
    """Baseline, oracle and hyper-cleaning on one seed's split and corruption."""
    splits = make_splits(seed)
    steps = WARMUP + outer_steps * INNER_STEPS
    corrupted = splits["train"].y != splits["train_clean"].y
    clean = ~corrupted
    baseline = train_fixed(splits["train"], steps)
    oracle = train_fixed(Split(splits["train"].x[clean], splits["train"].y[clean]), steps)
    program, model, logits = build_program(splits, grad)
    if show is not None:
        show(program)                       # levels, edges, reads and the compiled schedule
        show()
    program.run(steps=steps)
    weights = torch.sigmoid(logits.detach())
    result = {
        "baseline": accuracy(baseline, splits["test"]),
        "oracle": accuracy(oracle, splits["test"]),
        "cleaned": accuracy(model, splits["test"]),
        "f1": f1_score(weights < THRESHOLD, corrupted),
        "undecided": ((weights > 0.1) & (weights < 0.9)).float().mean().item(),
        "mean_weight_clean": weights[clean].mean().item(),
        "mean_weight_corrupted": weights[corrupted].mean().item(),
        "cg_residual": program.history.series("cleaner", "cleaner->classifier/residual")[-1],
    }
    result["gap_closed"] = ((result["cleaned"] - result["baseline"])
                            / (result["oracle"] - result["baseline"]))
    if check:
        result["vs_exact"] = ml.check_hypergrad(program, "cleaner", reference="exact",
                                                max_exact_params=1000).relative_error
    return result


COLUMNS = [("baseline", "noisy baseline (test acc %)", 100), ("oracle", "clean oracle", 100),
           ("cleaned", "hyper-cleaning, mlodsl cg", 100), ("gap_closed", "gap closed (%)", 100),
           ("f1", "F1 of flagged (weight < 0.5)", 1)]


def table(rows: list[dict[str, float]], seeds: tuple[int, ...]) -> list[str]:
    """The Markdown result table: one column per seed and the mean ± std."""
    head = "| | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |"
    lines = [head, "|---" * (len(seeds) + 2) + "|"]
    for key, label, scale in COLUMNS:
        values = [scale * row[key] for row in rows]
        digits = 3 if scale == 1 else 1
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        cells = " | ".join(f"{v:.{digits}f}" for v in values)
        lines.append(f"| {label} | {cells} | {statistics.mean(values):.{digits}f} ± "
                     f"{std:.{digits}f} |")
    return lines


def describe(seed: int, row: dict[str, float]) -> str:
    """One seed's figures as a line of text."""
    text = (f"seed {seed}: test acc baseline {row['baseline']:.3f}  oracle {row['oracle']:.3f}  "
            f"cleaned {row['cleaned']:.3f}  (gap closed {100 * row['gap_closed']:.0f} %); "
            f"F1 {row['f1']:.3f}; mean weight clean {row['mean_weight_clean']:.2f}, "
            f"corrupted {row['mean_weight_corrupted']:.2f}; {100 * row['undecided']:.1f} % of "
            f"weights in (0.1, 0.9); last CG residual {row['cg_residual']:.1e}")
    if "vs_exact" in row:
        text += f"; CG vs exact hypergradient: relative error {row['vs_exact']:.1e}"
    return text


def main(seeds: tuple[int, ...] = SEEDS, outer_steps: int = OUTER_STEPS, quiet: bool = False,
         check: bool = True) -> dict:
    """Run baseline, oracle and hyper-cleaning for each seed; print and return the figures.

    Args:
        seeds: Each seeds one split and corruption.
        outer_steps: Cleaner steps (the classifier takes ``WARMUP + outer_steps *
            INNER_STEPS``, and so do the baseline and the oracle).
        quiet: Print nothing.
        check: Compare the final CG hypergradient with an exact dense solve.

    Returns:
        ``{"rows": [per-seed dicts: baseline, oracle, cleaned (test accuracies), gap_closed,
        f1, undecided, mean weights, cg_residual, vs_exact], "table": [Markdown lines],
        "wall_s": seconds}``.
    """
    say = (lambda *a: None) if quiet else print
    start = time.perf_counter()
    with one_thread():
        rows = []
        for seed in seeds:
            row = run_seed(seed, outer_steps, check=check, show=None if rows else say)
            rows.append(row)
            say(describe(seed, row))
        lines = table(rows, seeds)
        wall = time.perf_counter() - start
        say()
        say(f"{N_TRAIN} train ({int(NOISE * 100)} % labels corrupted) / {N_VAL} val / "
            f"{1797 - N_TRAIN - N_VAL} test digits; {outer_steps} cleaner steps, "
            f"{WARMUP + outer_steps * INNER_STEPS} classifier steps:")
        for line in lines:
            say(line)
        say(f"wall time: {wall:.1f} s")
        return {"rows": rows, "table": lines, "wall_s": wall}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS),
                        help="seeds of the split and corruption (default 0 1 2)")
    parser.add_argument("--outer-steps", type=int, default=OUTER_STEPS,
                        help=f"cleaner steps (default {OUTER_STEPS})")
    arguments = parser.parse_args()
    main(seeds=tuple(arguments.seeds), outer_steps=arguments.outer_steps)
