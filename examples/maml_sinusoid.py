"""MAML on sinusoid regression (Finn et al., 2017) with mlodsl, against a pretrained baseline.

Each task is a sine wave y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], observed at
K points x ~ U[-5, 5] (the support set) and queried at K more (the query set). A small MLP
(1-40-40-1, ReLU) should fit a new task after one or a few SGD steps on its K support points.

Two levels, each a plain decorated function written for ONE task:

* ``learner`` (lower) takes one SGD step (lr 0.01) on a task's support set. With
  ``init_from="meta"`` it restarts from the meta parameters at every meta step, and with
  ``tasks=True`` it adapts on the 25 tasks of a meta-batch at once (``torch.func.vmap``: one set
  of fast weights per task).
* ``meta`` (upper) is the query loss of each task with that task's adapted weights, averaged
  over the meta-batch; ``grad="unroll"`` differentiates it through the learner's step
  (second-order MAML), and Adam (lr 1e-3) updates the meta parameters.

The baseline is the same network pretrained on the same tasks by plain regression (every point
of every meta-batch, same optimizer, same number of iterations). Both are then evaluated on 600
new tasks from the same ranges: a copy of the network takes 1 and 10 plain SGD steps (lr 0.01)
on the task's K support points and is scored by its MSE on 100 points evenly spread on [-5, 5].

Run it with ``python examples/maml_sinusoid.py`` (about 3 minutes on one CPU core);
``--iterations`` sets the number of meta-iterations, ``--shots`` K (10; the paper also reports
5), ``--seed`` the initialization and the task streams.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import mlodsl as ml

SEED = 0
SHOTS = 10                         # K: support points per task (and query points in training)
META_BATCH = 25                    # tasks per meta-iteration
INNER_LR = 0.01                    # the learner's SGD step, in training and in evaluation
META_LR = 1e-3                     # Adam, for the meta parameters and the pretrained baseline
HIDDEN = 40
# Meta-iterations of a full run: about 8 ms each here (one CPU core), under 3 minutes. Measured
# 10-shot 1-step MSE (seed 0): ~0.47 after 10k iterations, ~0.38 after 20k, ~0.36 after 30k.
ITERATIONS = 20000
AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)
EVAL_TASKS = 600
EVAL_POINTS = 100                  # query points of an evaluation task, evenly spread on X_RANGE
EVAL_STEPS = 10                    # fine-tuning steps measured in evaluation (1 and 10 reported)
EVAL_STREAM = 1_000_003            # seed offset of the held-out tasks (never seen in training)

# Published figures for MAML on this protocol: 1 step, K points, 600 tasks, mean MSE.
REFERENCES = {
    10: "MAML 0.77 (+- 0.11) in the Meta-SGD paper's Table 1 (Li et al., 2017); a careful "
        "reimplementation trained for 70k iterations reaches about 0.36",
    5: "MAML 1.13 (+- 0.18) in the Meta-SGD paper's Table 1 (Li et al., 2017)",
}


# -- tasks ---------------------------------------------------------------------------------------

class Tasks(NamedTuple):
    """A batch of sinusoid tasks; x and y have shape (tasks, points, 1)."""

    amplitude: torch.Tensor
    phase: torch.Tensor
    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor


def uniform(shape: tuple[int, ...], bounds: tuple[float, float],
            generator: torch.Generator) -> torch.Tensor:
    low, high = bounds
    return torch.rand(shape, generator=generator) * (high - low) + low


def sample_tasks(n: int, shots: int, generator: torch.Generator,
                 query_x: torch.Tensor | None = None) -> Tasks:
    """``n`` tasks with ``shots`` random support points each; the query points are ``shots``
    random points too, or ``query_x`` (a 1-d tensor) shared by every task."""
    amplitude = uniform((n, 1, 1), AMPLITUDE, generator)
    phase = uniform((n, 1, 1), PHASE, generator)
    x_support = uniform((n, shots, 1), X_RANGE, generator)
    if query_x is None:
        x_query = uniform((n, shots, 1), X_RANGE, generator)
    else:
        x_query = query_x.reshape(1, -1, 1).expand(n, -1, 1)
    wave = lambda x: amplitude * torch.sin(x - phase)  # noqa: E731
    return Tasks(amplitude.flatten(), phase.flatten(), x_support, wave(x_support), x_query,
                 wave(x_query))


class TaskSampler:
    """Feeds the two levels of a meta-learning program the same tasks.

    ``support`` is the learner's data: every ``inner_steps`` calls it draws a fresh meta-batch
    of ``meta_batch`` tasks, keeps it, and returns its support sets ``(x, y)``, each of shape
    ``(meta_batch, shots, 1)``. ``query`` is the meta level's data: the query sets of that same
    meta-batch. Within a program step mlodsl steps the learner (which fetches its batch) before
    the meta level, so the two line up; ``query`` checks that they do.

    Tasks are drawn in float32 and handed out in ``dtype``.
    """

    def __init__(self, shots: int, meta_batch: int = META_BATCH, seed: int = SEED,
                 inner_steps: int = 1, dtype: torch.dtype = torch.float32) -> None:
        self.shots = shots
        self.dtype = dtype
        self.meta_batch = meta_batch
        self.inner_steps = inner_steps
        self.generator = torch.Generator().manual_seed(seed)
        self.current: Tasks | None = None
        self.drawn = 0                 # meta-batches drawn so far
        self._support_calls = 0        # support() calls on the current meta-batch
        self._queried = True

    def draw(self) -> Tasks:
        """A fresh meta-batch (becomes the current one)."""
        self.current = sample_tasks(self.meta_batch, self.shots, self.generator)
        self.drawn += 1
        self._support_calls = 0
        self._queried = False
        return self.current

    def support(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.current is None or self._support_calls == self.inner_steps:
            self.draw()
        self._support_calls += 1
        return self._cast(self.current.x_support, self.current.y_support)

    def query(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.current is None or self._queried or self._support_calls != self.inner_steps:
            raise RuntimeError(
                f"TaskSampler.query() called after {self._support_calls} support() call(s) on "
                f"meta-batch {self.drawn} (expected {self.inner_steps}, and one query per "
                "meta-batch): the meta level's data must follow the learner's, with "
                "inner_steps equal to the sampler's")
        self._queried = True
        return self._cast(self.current.x_query, self.current.y_query)

    def points(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every point (support and query) of a fresh meta-batch, as one regression batch of
        shape ``(meta_batch * 2 * shots, 1)``: the pretrained baseline's data."""
        tasks = self.draw()
        x = torch.cat([tasks.x_support, tasks.x_query], 1).reshape(-1, 1)
        y = torch.cat([tasks.y_support, tasks.y_query], 1).reshape(-1, 1)
        return self._cast(x, y)

    def _cast(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.to(self.dtype), y.to(self.dtype)


# -- model ---------------------------------------------------------------------------------------

def make_mlp(seed: int | None = None) -> nn.Sequential:
    if seed is not None:
        torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, 1))


# -- the programs --------------------------------------------------------------------------------

def build_maml_program(meta_net: nn.Module, sampler: TaskSampler, inner_lr: float = INNER_LR,
                       **options) -> ml.Program:
    """Second-order MAML: one SGD step per task on its support set, vmapped over the tasks.
    ``options`` go to ``ml.program`` (hooks, progress, ...)."""
    learner_net = copy.deepcopy(meta_net)  # same architecture; restarts from meta_net's values

    @ml.level(module=learner_net, optimizer=torch.optim.SGD(learner_net.parameters(),
                                                            lr=inner_lr),
              data=sampler.support, init_from="meta", tasks=True)
    def learner(batch):
        """One task's support loss."""
        x, y = batch
        return F.mse_loss(learner_net(x), y)

    @ml.level(upper_of="learner", grad="unroll", module=meta_net, inner_steps=1,
              optimizer=torch.optim.Adam(meta_net.parameters(), lr=META_LR),
              data=sampler.query)
    def meta(batch, learner):
        """One task's query loss, with that task's adapted learner."""
        x, y = batch
        return F.mse_loss(learner(x), y)

    return ml.program(learner, meta, **options)


def train_maml(iterations: int, shots: int, seed: int, progress: bool | None = None
               ) -> tuple[nn.Module, ml.Program, list[float], float]:
    """Meta-train; returns the meta network, the program, its meta losses and the seconds."""
    meta_net = make_mlp(seed)
    program = build_maml_program(meta_net, TaskSampler(shots, META_BATCH, seed),
                                 progress=progress)
    start = time.perf_counter()
    history = program.run(steps=iterations)
    seconds = time.perf_counter() - start
    return meta_net, program, history.series("meta", "loss"), seconds


def train_pretrained(iterations: int, shots: int, seed: int) -> nn.Module:
    """The baseline: the same network (same initialization) regressed on every point of the
    same meta-batches, with the same optimizer, for the same number of iterations."""
    net = make_mlp(seed)
    sampler = TaskSampler(shots, META_BATCH, seed)

    @ml.level(module=net, optimizer=torch.optim.Adam(net.parameters(), lr=META_LR),
              data=sampler.points)
    def pretrain(batch):
        x, y = batch
        return F.mse_loss(net(x), y)

    ml.program(pretrain, progress=False).run(steps=iterations)
    return net


# -- evaluation ----------------------------------------------------------------------------------

def evaluation_tasks(n: int, shots: int, seed: int) -> Tasks:
    """Held-out tasks from the training ranges, queried on an even grid over X_RANGE."""
    grid = torch.linspace(*X_RANGE, EVAL_POINTS)
    return sample_tasks(n, shots, torch.Generator().manual_seed(seed + EVAL_STREAM), grid)


def fine_tune_curves(net: nn.Module, tasks: Tasks, steps: int = EVAL_STEPS,
                     lr: float = INNER_LR) -> torch.Tensor:
    """Per task: a copy of ``net`` takes ``steps`` plain SGD steps (phi <- phi - lr grad, what
    ``torch.optim.SGD(lr=lr)`` does) on the support set; returns the query MSE before and after
    each step, shape (tasks, steps + 1). The tasks run side by side (``torch.vmap``); the
    copies are the dicts of adapted tensors, ``net`` itself is left as it is."""
    start = {name: p.detach() for name, p in net.named_parameters()}

    def mse(params, x, y):
        return F.mse_loss(torch.func.functional_call(net, params, (x,)), y)

    def one_task(x_support, y_support, x_query, y_query):
        params, curve = start, [mse(start, x_query, y_query)]
        for _ in range(steps):
            grads = torch.func.grad(mse)(params, x_support, y_support)
            params = {name: p - lr * grads[name] for name, p in params.items()}
            curve.append(mse(params, x_query, y_query))
        return torch.stack(curve)

    return torch.vmap(one_task)(tasks.x_support, tasks.y_support, tasks.x_query, tasks.y_query)


def summarize(curves: torch.Tensor, prefix: str) -> dict[str, float]:
    """Mean, 95% interval (1.96 std / sqrt(n)) and median after 0, 1 and EVAL_STEPS steps;
    ``worse``: tasks whose MSE after EVAL_STEPS steps is non-finite or above where it started
    (with K = 5, ten steps can diverge on a few tasks). Means and intervals are over the tasks
    with finite values."""
    out: dict[str, float] = {}
    for step in (0, 1, curves.shape[1] - 1):
        values = curves[:, step]
        finite = values[torch.isfinite(values)]
        out[f"{prefix}_{step}step"] = finite.mean().item()
        out[f"{prefix}_{step}step_ci"] = 1.96 * finite.std().item() / math.sqrt(len(finite))
        out[f"{prefix}_{step}step_median"] = finite.median().item()
    last = curves[:, -1]
    out[f"{prefix}_worse"] = int((~torch.isfinite(last) | (last > curves[:, 0])).sum())
    return out


# -- the report ----------------------------------------------------------------------------------

def table(rows: list[tuple[str, str]], results: dict[str, float]) -> list[str]:
    last = EVAL_STEPS
    lines = [f"| model | before adapting | 1 step | {last} steps | {last} steps: median "
             "(tasks worse than before) |", "|---|---|---|---|---|"]
    for label, key in rows:
        cell = lambda s: (f"{results[f'{key}_{s}step']:.3f} "  # noqa: E731
                          f"+- {results[f'{key}_{s}step_ci']:.3f}")
        lines.append(f"| {label} | {cell(0)} | {cell(1)} | {cell(last)} | "
                     f"{results[f'{key}_{last}step_median']:.3f} ({results[f'{key}_worse']}) |")
    return lines


def mean_of(values: list[float], first: bool, k: int) -> float:
    part = values[:k] if first else values[-k:]
    return sum(part) / max(len(part), 1)


def main(iterations: int = ITERATIONS, shots: int = SHOTS, quiet: bool = False, seed: int = SEED,
         eval_tasks: int = EVAL_TASKS) -> dict[str, float]:
    """Meta-train, pretrain the baseline, evaluate both; print and return the numbers.

    Args:
        iterations: Meta-iterations of MAML (each on META_BATCH tasks); also the baseline's
            pretraining iterations.
        shots: K, the support points per task (training and evaluation).
        quiet: Print nothing.
        seed: Seeds the initialization, the training tasks and the evaluation tasks.
        eval_tasks: Held-out evaluation tasks (600 in the protocol).

    Returns:
        For each model (``maml``, ``pretrained``):
        ``<model>_<s>step``, ``<model>_<s>step_ci`` (95% interval) and
        ``<model>_<s>step_median`` for s in 0, 1 and EVAL_STEPS, and ``<model>_worse`` (tasks
        worse after EVAL_STEPS steps than before adapting);
        also ``meta_loss_first`` / ``meta_loss_last`` (mean meta loss of the first and last
        500 iterations), ``train_s``, ``ms_per_iteration`` and ``wall_s``.
    """
    say = (lambda *a: None) if quiet else print
    wall = time.perf_counter()
    results: dict[str, float] = {}

    meta_net, program, meta_loss, train_s = train_maml(iterations, shots, seed,
                                                       progress=False if quiet else None)
    say(program)
    say()
    k = min(500, max(1, len(meta_loss) // 4))
    results.update(meta_loss_first=mean_of(meta_loss, True, k),
                   meta_loss_last=mean_of(meta_loss, False, k), train_s=train_s,
                   ms_per_iteration=1000 * train_s / max(iterations, 1))
    say(f"MAML, {shots}-shot: {iterations} meta-iterations of {META_BATCH} tasks in "
        f"{train_s:.1f} s ({results['ms_per_iteration']:.2f} ms each)")
    say(f"meta loss (query MSE after one step), mean of the first {k} iterations "
        f"{results['meta_loss_first']:.3f} -> last {k} {results['meta_loss_last']:.3f}")

    pretrained = train_pretrained(iterations, shots, seed)
    tasks = evaluation_tasks(eval_tasks, shots, seed)
    results.update(summarize(fine_tune_curves(meta_net, tasks), "maml"))
    results.update(summarize(fine_tune_curves(pretrained, tasks), "pretrained"))
    rows = [("MAML (mlodsl)", "maml"), ("pretrained on all tasks", "pretrained")]

    say()
    say(f"evaluation: {eval_tasks} held-out tasks (A in [{AMPLITUDE[0]:g}, {AMPLITUDE[1]:g}], "
        f"phase in [0, pi]); a copy of each net takes plain SGD steps (lr {INNER_LR:g}) on the "
        f"task's {shots} support points; MSE on {EVAL_POINTS} points evenly spread on "
        f"[{X_RANGE[0]:g}, {X_RANGE[1]:g}], mean +- 95% interval (1.96 std / sqrt(n))")
    for line in table(rows, results):
        say(line)
    if shots in REFERENCES:
        say(f"reference, {shots}-shot after 1 step: {REFERENCES[shots]}")
    results["wall_s"] = time.perf_counter() - wall
    say(f"wall time: {results['wall_s']:.1f} s")
    return results


if __name__ == "__main__":
    # Small matrices (40 x 40): a second thread costs more in synchronization than it gives,
    # and much more on a machine whose cores are shared.
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=ITERATIONS,
                        help=f"meta-iterations of {META_BATCH} tasks (default {ITERATIONS})")
    parser.add_argument("--shots", type=int, default=SHOTS,
                        help=f"support points per task, K (default {SHOTS})")
    parser.add_argument("--seed", type=int, default=SEED,
                        help=f"seed of the initialization and the task streams (default {SEED})")
    arguments = parser.parse_args()
    main(iterations=arguments.iterations, shots=arguments.shots, seed=arguments.seed)
