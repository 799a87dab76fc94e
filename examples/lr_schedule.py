"""Learn a learning-rate schedule by differentiating through whole training runs (grad="unroll").

Two levels, each a plain decorated function:

* ``train`` (lower) trains a small MLP on 500 of scikit-learn's 8x8 digits with minibatch SGD
  for ``STEPS`` steps (one *training run*). At every step its function sets the optimizer's
  learning rate from the schedule level: ``exp(log_lr[phase])``, a tensor, so the update
  depends differentiably on it.
* ``schedule`` (upper) owns ``log_lr``, one log learning rate per phase of the run, and is
  trained on the validation loss of the network at the end of the run. With
  ``grad="unroll"`` its hypergradient is reverse-mode differentiation through all the SGD steps
  the run took (Maclaurin et al. 2015; Franceschi et al. 2017); ``--checkpoint`` recomputes
  each step during the backward pass instead of storing it.

After each schedule update a hook re-initializes the network (a fresh random initialization)
and clears the optimizer, so every hypergradient is that of a whole training run from scratch:
the schedule learns what helps a run end well, not one lucky trajectory.

The learned schedule is then compared, on runs with new initializations and batch orders, with
the schedule it started from (a constant learning rate, too small) and with the best constant
learning rate of a grid (chosen on the validation loss), all with the same budget of ``STEPS``
SGD steps. Run it with ``python examples/lr_schedule.py`` (about a minute on two CPU cores).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mlodsl as ml

SEED = 0
N_TRAIN, N_VAL = 500, 300          # the remaining 997 digits are the test split
HIDDEN = 64
BATCH = 10                         # small batches: noisy steps, so the schedule matters
STEPS = 100                        # SGD steps of one training run (2 epochs)
PHASES = 10                        # the schedule has one learning rate per phase of 10 steps
INIT_LR = 0.05                     # the starting schedule: constant, too small
META_STEPS = 80                    # schedule updates (each one a whole training run)
META_LR = 0.1                      # Adam on log_lr
GRID = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)  # constant rates of the baseline grid
EVAL_SEEDS = 5                     # fresh runs (initialization + batch order) per schedule
EVAL_STREAM = 10_000               # seed offset of the evaluation runs (never used in training)


# -- data and model ------------------------------------------------------------------------------

def load_splits(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Shuffle the digits once and split them; standardize with the training split's stats."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    mean, std = x[:N_TRAIN].mean(0), x[:N_TRAIN].std(0).clamp_min(1.0)
    x = (x - mean) / std
    cut = N_TRAIN + N_VAL
    return {"train": (x[:N_TRAIN], y[:N_TRAIN]), "val": (x[N_TRAIN:cut], y[N_TRAIN:cut]),
            "test": (x[cut:], y[cut:])}


def make_net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 10))


def reinitialize(net: nn.Module, seed: int) -> None:
    """A fresh random initialization, reproducible from ``seed``."""
    torch.manual_seed(seed)
    for layer in net:
        if isinstance(layer, nn.Linear):
            layer.reset_parameters()


def batches(split: tuple[torch.Tensor, torch.Tensor], seed: int) -> DataLoader:
    return DataLoader(TensorDataset(*split), batch_size=BATCH, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


def phase_of(step: int, steps: int = STEPS, phases: int = PHASES) -> int:
    """The schedule entry used at a level step (counted over all runs, from 0)."""
    return (step % steps) * phases // steps


@torch.no_grad()
def evaluate(net: nn.Module, split: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """(cross-entropy, accuracy) on a whole split."""
    out = net(split[0])
    return F.cross_entropy(out, split[1]).item(), (out.argmax(1) == split[1]).float().mean().item()


# -- the program ---------------------------------------------------------------------------------

class Restart:
    """Hook: after each update of ``upper``, a fresh initialization and optimizer for ``net``,
    so the next hypergradient is that of a new training run."""

    def __init__(self, upper: str, net: nn.Module, optimizer: torch.optim.Optimizer,
                 seed: int) -> None:
        self.upper, self.net, self.optimizer, self.seed = upper, net, optimizer, seed

    def on_step_end(self, *, program, level, step, metrics):
        if level == self.upper:
            reinitialize(self.net, self.seed + step)
            self.optimizer.state.clear()


def build_program(splits: dict, seed: int, steps: int = STEPS, phases: int = PHASES,
                  checkpoint: bool = False, meta_lr: float = META_LR, **options
                  ) -> tuple[ml.Program, nn.Parameter]:
    """The training run below, the schedule above it; returns the program and ``log_lr``."""
    net = make_net()
    reinitialize(net, seed)
    sgd = torch.optim.SGD(net.parameters(), lr=INIT_LR)
    log_lr = nn.Parameter(torch.full((phases,), math.log(INIT_LR)))
    x_val, y_val = splits["val"]

    @ml.level(module=net, optimizer=sgd, data=batches(splits["train"], seed))
    def train(batch, schedule, step):
        """One SGD step of the run; its learning rate is read from the schedule level."""
        sgd.param_groups[0]["lr"] = schedule.exp()[phase_of(step, steps, phases)]
        x, y = batch
        return F.cross_entropy(net(x), y)

    @ml.level(upper_of="train", grad=ml.hypergrad.unroll(checkpoint=checkpoint), module=log_lr,
              optimizer=torch.optim.Adam([log_lr], lr=meta_lr), inner_steps=steps,
              data=lambda: (x_val, y_val))
    def schedule(batch, train):
        """Validation loss at the end of the run, differentiated through all its steps."""
        x, y = batch
        out = train(x)
        return {"loss": F.cross_entropy(out, y), "acc": (out.argmax(1) == y).float().mean()}

    options["hooks"] = [*options.get("hooks", ()), Restart("schedule", net, sgd, seed + 1)]
    return ml.program(train, schedule, **options), log_lr


# -- plain training runs, for the comparison -----------------------------------------------------

def run_with_rates(rates: Sequence[float], splits: dict, seed: int) -> nn.Module:
    """One training run from scratch: step ``k`` of SGD uses ``rates[k]``. The same network,
    initialization rule, batch size and optimizer as the program's lower level."""
    net = make_net()
    reinitialize(net, seed)
    sgd = torch.optim.SGD(net.parameters(), lr=rates[0])
    data = iter(())
    loader = batches(splits["train"], seed)
    for rate in rates:
        batch = next(data, None)
        if batch is None:
            data = iter(loader)
            batch = next(data)
        sgd.param_groups[0]["lr"] = float(rate)
        sgd.zero_grad()
        F.cross_entropy(net(batch[0]), batch[1]).backward()
        sgd.step()
    return net


def per_step(log_lr: torch.Tensor, steps: int = STEPS) -> list[float]:
    """A per-phase schedule expanded to one learning rate per step."""
    rates = log_lr.detach().exp().tolist()
    return [rates[phase_of(k, steps, len(rates))] for k in range(steps)]


def score(rates: Sequence[float], splits: dict, seeds: Sequence[int]) -> dict[str, float]:
    """Mean and std over fresh runs of the final validation/test loss and accuracy."""
    figures: dict[str, list[float]] = {k: [] for k in ("val_loss", "val_acc", "test_loss",
                                                       "test_acc")}
    for seed in seeds:
        net = run_with_rates(rates, splits, seed)
        for split in ("val", "test"):
            loss, acc = evaluate(net, splits[split])
            figures[f"{split}_loss"].append(loss if math.isfinite(loss) else float("inf"))
            figures[f"{split}_acc"].append(acc)
    out = {}
    for key, values in figures.items():
        t = torch.tensor(values)
        out[key], out[f"{key}_std"] = t.mean().item(), (t.std().item() if len(t) > 1 else 0.0)
    return out


# -- the report ----------------------------------------------------------------------------------

def main(meta_steps: int = META_STEPS, steps: int = STEPS, phases: int = PHASES,
         checkpoint: bool = False, meta_lr: float = META_LR, quiet: bool = False, seed: int = SEED,
         eval_seeds: int = EVAL_SEEDS, grid: Sequence[float] = GRID) -> dict[str, object]:
    """Learn the schedule, then compare it with the initial one and the best constant rate.

    Args:
        meta_steps: Schedule updates; each is one training run of ``steps`` SGD steps.
        steps: SGD steps of a training run (the budget of every schedule compared).
        phases: Learning rates in the schedule (each held for ``steps // phases`` steps).
        checkpoint: Recompute the run's steps in the backward pass (less memory).
        quiet: Print nothing.
        seed: Seeds the split, initializations and batch orders.
        eval_seeds: Fresh runs per schedule in the comparison.
        grid: The constant learning rates tried by the baseline.

    Returns:
        ``learned``, ``initial``, ``best_constant`` (dicts of mean/std figures from
        :func:`score`), ``best_rate``, ``grid`` (rate -> figures), ``schedule`` (the learned
        rates per phase), ``meta_loss_first``/``meta_loss_last``, ``train_s``, ``wall_s``.
    """
    say = (lambda *a: None) if quiet else print
    wall = time.perf_counter()
    splits = load_splits(seed)
    program, log_lr = build_program(splits, seed, steps, phases, checkpoint, meta_lr,
                                    progress=False if quiet else None)
    say(program)
    say()
    start = time.perf_counter()
    history = program.run(steps=meta_steps * steps)
    train_s = time.perf_counter() - start
    meta_loss = history.series("schedule", "loss")
    k = max(1, min(10, len(meta_loss) // 4))
    learned = log_lr.detach().exp().tolist()
    say(f"{meta_steps} schedule updates, each through a run of {steps} SGD steps "
        f"(batch {BATCH}), in {train_s:.1f} s ({1000 * train_s / max(meta_steps, 1):.0f} ms per "
        f"update{', checkpointed' if checkpoint else ''})")
    say(f"validation loss at the end of a run, mean of the first {k} runs "
        f"{sum(meta_loss[:k]) / k:.3f} -> last {k} runs {sum(meta_loss[-k:]) / k:.3f}")
    say(f"learned schedule (learning rate per phase of {steps // phases} steps; "
        f"{INIT_LR:g} at the start):")
    say("  " + " ".join(f"{r:.3g}" for r in learned))

    seeds = [seed + EVAL_STREAM + i for i in range(eval_seeds)]
    results: dict[str, object] = {"schedule": learned}
    results["grid"] = {rate: score([rate] * steps, splits, seeds) for rate in grid}
    best_rate = min(grid, key=lambda r: results["grid"][r]["val_loss"])
    results.update(best_rate=best_rate, best_constant=results["grid"][best_rate],
                   initial=score([INIT_LR] * steps, splits, seeds),
                   learned=score(per_step(log_lr, steps), splits, seeds))
    say()
    say(f"{eval_seeds} fresh runs per schedule (new initializations and batch orders), "
        f"{steps} SGD steps each; mean +- std; test: {len(splits['test'][1])} digits")
    say("| schedule | val loss | test loss | test acc |")
    say("|---|---|---|---|")
    rows = [(f"initial (constant {INIT_LR:g})", results["initial"])]
    rows += [(f"constant {r:g}" + (" (best on val)" if r == best_rate else ""),
              results["grid"][r]) for r in grid]
    rows.append(("learned (unroll)", results["learned"]))
    for label, s in rows:
        say(f"| {label} | {s['val_loss']:.3f} +- {s['val_loss_std']:.3f} | "
            f"{s['test_loss']:.3f} +- {s['test_loss_std']:.3f} | "
            f"{s['test_acc']:.3f} +- {s['test_acc_std']:.3f} |")
    results.update(meta_loss_first=sum(meta_loss[:k]) / k, meta_loss_last=sum(meta_loss[-k:]) / k,
                   train_s=train_s, wall_s=time.perf_counter() - wall)
    say(f"wall time: {results['wall_s']:.1f} s")
    return results


if __name__ == "__main__":
    # Tiny matrices: one thread avoids synchronization costs (large on shared cores).
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-steps", type=int, default=META_STEPS,
                        help=f"schedule updates, one training run each (default {META_STEPS})")
    parser.add_argument("--steps", type=int, default=STEPS,
                        help=f"SGD steps of a training run (default {STEPS})")
    parser.add_argument("--phases", type=int, default=PHASES,
                        help=f"learning rates in the schedule (default {PHASES})")
    parser.add_argument("--checkpoint", action="store_true",
                        help="recompute the unrolled steps in the backward pass")
    parser.add_argument("--meta-lr", type=float, default=META_LR,
                        help=f"Adam's learning rate on log_lr (default {META_LR})")
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed (default {SEED})")
    arguments = parser.parse_args()
    main(meta_steps=arguments.meta_steps, steps=arguments.steps, phases=arguments.phases,
         checkpoint=arguments.checkpoint, meta_lr=arguments.meta_lr, seed=arguments.seed)
