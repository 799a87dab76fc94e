"""iMAML on sinusoid regression (Rajeswaran et al., 2019) with mlodsl, against a pretrained
baseline: the same tasks, network, baseline and evaluation as ``examples/maml_sinusoid.py``.

MAML differentiates through the learner's steps. iMAML instead gives the learner a proximal
inner loss, the task loss plus ``lam/2 |phi - theta|^2``, lets it take several plain steps
towards that loss's minimum ``phi*`` from the meta parameters ``theta``, and differentiates the
minimum implicitly: the meta-gradient of a task is ``lam (H + lam I)^{-1} grad F(phi*)``, with
``H`` the Hessian of the task's support loss, solved by a few conjugate-gradient iterations.
Its memory does not grow with the number of inner steps.

Two levels, each written for ONE task:

* ``learner`` (lower): the support loss plus the proximal term; with ``init_from="meta"`` it
  restarts from the meta parameters at every meta step, and with ``tasks=True`` all 25 tasks
  of a meta-batch adapt at once (``torch.func.vmap``, one set of weights per task).
* ``meta`` (upper): the query loss of each task with that task's adapted weights, averaged;
  ``grad=ml.hypergrad.cg(...)`` solves one CG system per task (the learner's loss over the
  task batch is the sum of the tasks' losses, so its Hessian is block-diagonal) and averages
  the tasks' meta-gradients; Adam (lr 1e-3) updates the meta parameters.

Evaluation is the MAML example's: 600 held-out tasks, a copy of the network takes 1 and 10
plain SGD steps (lr 0.01, no proximal term) on K support points, MSE on 100 points.

Run it with ``python examples/imaml_sinusoid.py`` (a few minutes on one CPU core);
``--iterations``, ``--shots``, ``--seed`` as in the MAML example.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import mlodsl as ml

# The tasks, network, baseline and evaluation are the MAML example's, imported from beside this
# file (also when this file is loaded by path, as the tests do).
sys.path.insert(0, str(Path(__file__).resolve().parent))
import maml_sinusoid as maml  # noqa: E402

SEED, SHOTS, META_BATCH, META_LR = maml.SEED, maml.SHOTS, maml.META_BATCH, maml.META_LR
LAM = 2.0               # proximal strength lam: how far from theta a task's solution may go
INNER_STEPS = 10        # learner steps (Adam) per meta step, towards the proximal minimum
# The learner's Adam step. Plain SGD at 0.01 (MAML's inner step) is not stable here: iMAML's
# meta-gradient never sees the inner steps, the meta weights grow sharp, and after ~1000
# meta-iterations ten SGD steps blow up on a growing share of the tasks.
INNER_LR = 0.01
CG_ITERATIONS = 5       # per task, per meta step
CG_DAMPING = 0.0        # mu: CG solves (H + lam I + mu I) u = grad F
# Meta-iterations of a full run (each: 10 vmapped learner steps and 5 batched HVPs).
ITERATIONS = 2000


def build_imaml_program(meta_net: nn.Module, sampler: maml.TaskSampler, lam: float = LAM,
                        inner_steps: int = INNER_STEPS, inner_lr: float = INNER_LR,
                        cg_iterations: int = CG_ITERATIONS, cg_damping: float = CG_DAMPING,
                        **options) -> ml.Program:
    """iMAML: ``inner_steps`` Adam steps per task on its proximal support loss, vmapped over
    the tasks, and a per-task CG meta-gradient. ``sampler`` must have been built with the same
    ``inner_steps``. ``options`` go to ``ml.program``."""
    learner_net = copy.deepcopy(meta_net)  # same architecture; restarts from meta_net's values

    @ml.level(module=learner_net, optimizer=torch.optim.Adam(learner_net.parameters(),
                                                             lr=inner_lr),
              data=sampler.support, init_from="meta", tasks=True)
    def learner(batch, meta):
        """One task's support loss plus lam/2 |phi - theta|^2."""
        x, y = batch
        prox = sum((phi - theta).pow(2).sum()
                   for phi, theta in zip(learner_net.parameters(), meta.parameters()))
        return F.mse_loss(learner_net(x), y) + 0.5 * lam * prox

    @ml.level(upper_of="learner", grad=ml.hypergrad.cg(iterations=cg_iterations, mu=cg_damping),
              module=meta_net, inner_steps=inner_steps,
              optimizer=torch.optim.Adam(meta_net.parameters(), lr=META_LR),
              data=sampler.query)
    def meta(batch, learner):
        """One task's query loss, with that task's adapted learner."""
        x, y = batch
        return F.mse_loss(learner(x), y)

    # Should a task's adaptation blow up, its meta-batch is skipped, counted, and the next one
    # starts afresh from the meta weights.
    return ml.program(learner, meta, on_nonfinite="skip", **options)


def train_imaml(iterations: int, shots: int, seed: int, progress: bool | None = None,
                **settings) -> tuple[nn.Module, ml.Program, list[float], float]:
    """Meta-train; returns the meta network, the program, its meta losses and the seconds.
    ``settings``: ``lam``, ``inner_steps``, ``inner_lr``, ``cg_iterations``."""
    meta_net = maml.make_mlp(seed)
    steps = settings.get("inner_steps", INNER_STEPS)
    sampler = maml.TaskSampler(shots, META_BATCH, seed, inner_steps=steps)
    program = build_imaml_program(meta_net, sampler, progress=progress, **settings)
    start = time.perf_counter()
    history = program.run(steps=iterations * steps)
    seconds = time.perf_counter() - start
    return meta_net, program, history.series("meta", "loss"), seconds


def proximal_curves(net: nn.Module, tasks: maml.Tasks, lam: float, steps: int = maml.EVAL_STEPS,
                    lr: float = INNER_LR, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8) -> torch.Tensor:
    """Like ``maml.fine_tune_curves``, but each step is the learner's step in training: Adam
    (torch's update, fresh state) on the support loss plus ``lam/2 |phi - theta|^2``, theta
    being ``net``'s weights. Query MSE before and after each step, shape (tasks, steps + 1)."""
    start = {name: p.detach() for name, p in net.named_parameters()}

    def mse(params, x, y):
        return F.mse_loss(torch.func.functional_call(net, params, (x,)), y)

    def one_task(x_support, y_support, x_query, y_query):
        params, curve = start, [mse(start, x_query, y_query)]
        m = {k: torch.zeros_like(p) for k, p in start.items()}
        v = {k: torch.zeros_like(p) for k, p in start.items()}
        for t in range(1, steps + 1):
            grads = torch.func.grad(mse)(params, x_support, y_support)
            g = {k: grads[k] + lam * (p - start[k]) for k, p in params.items()}
            m = {k: betas[0] * m[k] + (1 - betas[0]) * g[k] for k in g}
            v = {k: betas[1] * v[k] + (1 - betas[1]) * g[k] ** 2 for k in g}
            params = {k: p - lr * (m[k] / (1 - betas[0] ** t))
                      / ((v[k] / (1 - betas[1] ** t)).sqrt() + eps) for k, p in params.items()}
            curve.append(mse(params, x_query, y_query))
        return torch.stack(curve)

    return torch.vmap(one_task)(tasks.x_support, tasks.y_support, tasks.x_query, tasks.y_query)


def main(iterations: int = ITERATIONS, shots: int = SHOTS, quiet: bool = False, seed: int = SEED,
         eval_tasks: int = maml.EVAL_TASKS, lam: float = LAM, inner_steps: int = INNER_STEPS,
         inner_lr: float = INNER_LR, cg_iterations: int = CG_ITERATIONS,
         cg_damping: float = CG_DAMPING) -> dict[str, float]:
    """Meta-train with iMAML, pretrain the baseline, evaluate both; print and return the
    numbers.

    Args:
        iterations: Meta-iterations (each on META_BATCH tasks, INNER_STEPS learner steps); also
            the baseline's pretraining iterations.
        shots: K, the support points per task (training and evaluation).
        quiet: Print nothing.
        seed: Seeds the initialization, the training tasks and the evaluation tasks.
        eval_tasks: Held-out evaluation tasks (600 in the protocol).
        lam: Proximal strength.
        inner_steps: Learner steps (Adam) per meta-iteration.
        inner_lr: The learner's Adam learning rate during meta-training.
        cg_iterations: Conjugate-gradient iterations per task and meta-iteration.
        cg_damping: Added to the diagonal of each task's system in CG.

    Returns:
        For each model and adaptation (``imaml``, ``pretrained``: plain SGD steps;
        ``imaml_prox``, ``pretrained_prox``: the proximal steps of training):
        ``<model>_<s>step``,
        ``<model>_<s>step_ci`` (95% interval) and ``<model>_<s>step_median`` for s in 0, 1 and
        10, and ``<model>_worse``; also ``meta_loss_first`` / ``meta_loss_last``,
        ``cg_residual`` (mean relative CG residual over the tasks, over the last iterations),
        ``cg_unsolved`` (tasks per meta-batch whose CG solve stayed at zero), ``skipped``
        (meta-batches skipped because a task's adaptation blew up), ``train_s``,
        ``ms_per_iteration`` and ``wall_s``.
    """
    say = (lambda *a: None) if quiet else print
    wall = time.perf_counter()
    results: dict[str, float] = {}

    meta_net, program, meta_loss, train_s = train_imaml(
        iterations, shots, seed, progress=False if quiet else None, lam=lam,
        inner_steps=inner_steps, inner_lr=inner_lr, cg_iterations=cg_iterations,
        cg_damping=cg_damping)
    say(program)
    say()
    k = min(500, max(1, len(meta_loss) // 4))
    residuals = program.history.series("meta", "meta->learner/residual")
    unsolved = program.history.series("meta", "meta->learner/unsolved_tasks")
    skipped = sum(r.get("skipped", 0) for r in program.history["meta"])
    results.update(meta_loss_first=maml.mean_of(meta_loss, True, k),
                   meta_loss_last=maml.mean_of(meta_loss, False, k),
                   cg_residual=maml.mean_of(residuals, False, k),
                   cg_unsolved=maml.mean_of(unsolved, False, k), skipped=skipped,
                   train_s=train_s,
                   ms_per_iteration=1000 * train_s / max(iterations, 1))
    say(f"iMAML, {shots}-shot, lam {lam:g}, {inner_steps} learner steps (Adam {inner_lr:g}), "
        f"{cg_iterations} CG iterations: {iterations} meta-iterations of {META_BATCH} tasks in "
        f"{train_s:.1f} s ({results['ms_per_iteration']:.2f} ms each)")
    say(f"meta loss (query MSE at the learner's end), mean of the first {k} iterations "
        f"{results['meta_loss_first']:.3f} -> last {k} {results['meta_loss_last']:.3f}")
    say(f"CG, mean of the last {k} iterations: relative residual {results['cg_residual']:.2f} "
        f"(mean over tasks), {results['cg_unsolved']:.1f} of {META_BATCH} tasks left at zero "
        "(non-positive curvature or a growing residual: no meta-gradient from them); "
        f"{skipped} meta-batches skipped as non-finite")

    pretrained = maml.train_pretrained(iterations, shots, seed)
    tasks = maml.evaluation_tasks(eval_tasks, shots, seed)
    results.update(maml.summarize(maml.fine_tune_curves(meta_net, tasks), "imaml"))
    results.update(maml.summarize(maml.fine_tune_curves(pretrained, tasks), "pretrained"))
    results.update(maml.summarize(proximal_curves(meta_net, tasks, lam, lr=inner_lr),
                                  "imaml_prox"))
    results.update(maml.summarize(proximal_curves(pretrained, tasks, lam, lr=inner_lr),
                                  "pretrained_prox"))
    rows = [("iMAML (mlodsl)", "imaml"), ("pretrained on all tasks", "pretrained"),
            (f"iMAML, adapted as in training (Adam {inner_lr:g}, lam {lam:g})", "imaml_prox"),
            ("pretrained, adapted the same way", "pretrained_prox")]

    say()
    say(f"evaluation: {eval_tasks} held-out tasks (A in [{maml.AMPLITUDE[0]:g}, "
        f"{maml.AMPLITUDE[1]:g}], phase in [0, pi]); a copy of each net takes plain SGD steps "
        f"(lr {maml.INNER_LR:g}, no proximal term) on the task's {shots} support points; MSE "
        f"on {maml.EVAL_POINTS} points evenly spread on [{maml.X_RANGE[0]:g}, "
        f"{maml.X_RANGE[1]:g}], mean +- 95% interval (1.96 std / sqrt(n))")
    for line in maml.table(rows, results):
        say(line)
    say("iMAML trains the meta weights for its own adaptation (last two rows: Adam steps on the "
        "proximal loss, as in training); nothing in it keeps them good for plain SGD steps at "
        "lr 0.01 (first row).")
    results["wall_s"] = time.perf_counter() - wall
    say(f"wall time: {results['wall_s']:.1f} s")
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)  # 40 x 40 matrices: a second thread costs more than it gives
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=ITERATIONS,
                        help=f"meta-iterations of {META_BATCH} tasks (default {ITERATIONS})")
    parser.add_argument("--shots", type=int, default=SHOTS,
                        help=f"support points per task, K (default {SHOTS})")
    parser.add_argument("--seed", type=int, default=SEED,
                        help=f"seed of the initialization and the task streams (default {SEED})")
    parser.add_argument("--lam", type=float, default=LAM,
                        help=f"proximal strength (default {LAM:g})")
    parser.add_argument("--inner-steps", type=int, default=INNER_STEPS,
                        help=f"learner steps per meta-iteration (default {INNER_STEPS})")
    parser.add_argument("--inner-lr", type=float, default=INNER_LR,
                        help=f"learner Adam learning rate (default {INNER_LR:g})")
    parser.add_argument("--cg-iterations", type=int, default=CG_ITERATIONS,
                        help=f"CG iterations per task (default {CG_ITERATIONS})")
    parser.add_argument("--cg-damping", type=float, default=CG_DAMPING,
                        help=f"CG damping mu (default {CG_DAMPING:g})")
    arguments = parser.parse_args()
    main(iterations=arguments.iterations, shots=arguments.shots, seed=arguments.seed,
         lam=arguments.lam, inner_steps=arguments.inner_steps, inner_lr=arguments.inner_lr,
         cg_iterations=arguments.cg_iterations, cg_damping=arguments.cg_damping)
