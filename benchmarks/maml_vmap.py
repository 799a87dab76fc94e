"""Time per MAML meta-step over a batch of tasks: mlodsl (tasks=True) against a hand-written
torch.func.vmap loop (the floor) and per-task Python loops: one with ``higher``, the
monkey-patching meta-learning library (``innerloop_ctx``, as its MAML examples use it), and a
minimal hand-written one that patches cloned parameters into the module (leaner than any
library; a lower bound for the per-task style).

One meta-step: T sinusoid tasks (K support + K query points each), one inner SGD step per task
from the meta parameters on an MLP 1-40-40-1 (second order), the meta-gradient of the mean query
loss, one Adam step. All three start from identical weights and cycle through the same
pre-drawn meta-batches. Before timing, one meta-step of each on the same tasks from the same
weights must give the same meta-gradient (max abs difference <= 1e-5, float32). ``higher`` is
optional (``pip install higher``, in the ``test`` extra); without it its row says so.

mlodsl calls vmap's and autograd's primitives directly (``mlodsl.batching``,
``mlodsl.autodiff``), skipping the per-call Python of ``torch.func.vmap`` and
``torch.autograd.grad``. The row "mlodsl, public vmap and autograd" turns that off
(``MLODSL_PUBLIC_VMAP=1``, ``MLODSL_PUBLIC_AUTOGRAD=1``): the interpreter's own overhead.

Timing alternates short blocks of the three in one process (drift in machine speed hits all of
them) and reports the median of the per-block ms/step. Runs on one thread by default: with
40 x 40 matrices a second thread costs more than it gives. ``--clock cpu`` times the process's
CPU time instead of wall time: on a machine whose cores are shared it leaves out the time the
process waits for a core (single-threaded, the two agree on a quiet machine).

    python benchmarks/maml_vmap.py [--tasks 25] [--shots 10] [--rounds 30] [--block 10]
                                   [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import mlodsl as ml
from mlodsl import autodiff, batching

INNER_LR, META_LR, HIDDEN, POOL = 0.01, 1e-3, 40, 8


def make_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, 1))


def make_tasks(tasks: int, shots: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """POOL meta-batches (x_support, y_support, x_query, y_query), each (tasks, shots, 1)."""
    gen = torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(POOL):
        amplitude = torch.rand(tasks, 1, 1, generator=gen) * 4.9 + 0.1
        phase = torch.rand(tasks, 1, 1, generator=gen) * math.pi
        x = torch.rand(tasks, 2 * shots, 1, generator=gen) * 10 - 5
        y = amplitude * torch.sin(x - phase)
        pool.append((x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]))
    return pool


# -- the three implementations: each returns (step(n), meta_net, grads_of_last_step) -------------

def mlodsl_stepper(pool):
    meta_net, learner_net = make_mlp(), make_mlp()
    captured: list[list[torch.Tensor]] = []

    @ml.level(module=learner_net, optimizer=torch.optim.SGD(learner_net.parameters(),
                                                            lr=INNER_LR),
              data=[(xs, ys) for xs, ys, _, _ in pool], init_from="meta", tasks=True)
    def learner(batch):
        x, y = batch
        return F.mse_loss(learner_net(x), y)

    @ml.level(upper_of="learner", grad="unroll", module=meta_net, inner_steps=1,
              optimizer=torch.optim.Adam(meta_net.parameters(), lr=META_LR),
              data=[(xq, yq) for _, _, xq, yq in pool])
    def meta(batch, learner):
        x, y = batch
        return F.mse_loss(learner(x), y)

    class Capture:  # only for the equality check: the timed steps copy nothing
        def on_hypergrad(self, *, program, level, step, grads, diagnostics):
            if not captured:
                captured.append([g.detach().clone() for g in grads])

    program = ml.program(learner, meta, hooks=[Capture()], progress=False)

    def step(n: int) -> None:
        program.run(steps=n)

    return step, meta_net, lambda: captured[0]


def public_stepper(pool):
    """mlodsl through torch.func.vmap and torch.autograd.grad themselves."""
    step, meta_net, grads = mlodsl_stepper(pool)

    def public_step(n: int) -> None:
        engine, primitives = autodiff.use_engine(False), batching.use_primitives(False)
        try:
            step(n)
        finally:
            autodiff.use_engine(engine)
            batching.use_primitives(primitives)

    return public_step, meta_net, grads


def floor_stepper(pool):
    """The same maths written directly with torch.func: grad of the support loss inside vmap,
    autograd for the meta-gradient, Adam."""
    net = make_mlp()
    params = dict(net.named_parameters())
    optimizer = torch.optim.Adam(net.parameters(), lr=META_LR)
    position = [0]

    def mse(p, x, y):
        return F.mse_loss(functional_call(net, p, (x,)), y)

    def query_loss(p, xs, ys, xq, yq):
        g = grad(mse)(p, xs, ys)
        return mse({k: v - INNER_LR * g[k] for k, v in p.items()}, xq, yq)

    batched = vmap(query_loss, in_dims=(None, 0, 0, 0, 0))

    def step(n: int) -> None:
        for _ in range(n):
            xs, ys, xq, yq = pool[position[0] % POOL]
            position[0] += 1
            loss = batched(params, xs, ys, xq, yq).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return step, net, lambda: [p.grad.clone() for p in net.parameters()]


def clone_module(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` whose parameters are differentiable clones of its own
    (graph back to the originals), written into ``_parameters`` directly: the monkey-patching
    way of making a module run on non-leaf tensors."""
    clone = copy.copy(module)
    clone._parameters = {name: None if p is None else p.clone()
                         for name, p in module._parameters.items()}
    clone._buffers = dict(module._buffers)
    clone._modules = {name: clone_module(child) for name, child in module._modules.items()}
    return clone


def adapt(module: nn.Module, loss: torch.Tensor, lr: float) -> None:
    """One differentiable SGD step, patched into the clone's ``_parameters``."""
    slots = [(m, name) for m in module.modules() for name, p in m._parameters.items()
             if p is not None]
    grads = torch.autograd.grad(loss, [m._parameters[name] for m, name in slots],
                                create_graph=True)
    for (m, name), g in zip(slots, grads):
        m._parameters[name] = m._parameters[name] - lr * g


def per_task_stepper(task_step_for):
    """A stepper that adapts one task at a time: ``task_step_for(net)`` gives a function
    ``(x_support, y_support, x_query, y_query, scale)`` that adapts to one task and
    backpropagates its query loss times ``scale`` into ``net``'s parameters (meta-gradients
    accumulate over the tasks); then one Adam step."""
    def make(pool):
        net = make_mlp()
        optimizer = torch.optim.Adam(net.parameters(), lr=META_LR)
        task_step = task_step_for(net)
        position = [0]

        def step(n: int) -> None:
            for _ in range(n):
                xs, ys, xq, yq = pool[position[0] % POOL]
                position[0] += 1
                optimizer.zero_grad(set_to_none=True)
                tasks = xs.shape[0]
                for i in range(tasks):
                    task_step(xs[i], ys[i], xq[i], yq[i], 1.0 / tasks)
                optimizer.step()

        return step, net, lambda: [p.grad.clone() for p in net.parameters()]

    return make


def clone_and_patch(net: nn.Module):
    """Per task: clone the network, adapt it (autograd.grad with create_graph=True)."""
    def task_step(xs, ys, xq, yq, scale):
        learner = clone_module(net)
        adapt(learner, F.mse_loss(learner(xs), ys), INNER_LR)
        (F.mse_loss(learner(xq), yq) * scale).backward()

    return task_step


def import_higher():
    """``higher`` if installed (its 2020 source makes Python warn about an ``is`` comparison
    when compiled; harmless), else ``None``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        try:
            import higher
        except ImportError:
            return None
    return higher


def with_higher(net: nn.Module):
    """Per task, ``higher.innerloop_ctx``: a patched functional copy of the network and a
    differentiable SGD step."""
    higher = import_higher()
    inner = torch.optim.SGD(net.parameters(), lr=INNER_LR)

    def task_step(xs, ys, xq, yq, scale):
        with higher.innerloop_ctx(net, inner, copy_initial_weights=False) as (f, opt):
            opt.step(F.mse_loss(f(xs), ys))
            (F.mse_loss(f(xq), yq) * scale).backward()

    return task_step


FLOOR, OURS = "torch.func.vmap by hand (floor)", "mlodsl, tasks=True"
PUBLIC = "mlodsl, public vmap and autograd"
HIGHER, LOOP = "per-task loop with higher", "per-task loop, minimal clone-and-patch"
IMPLEMENTATIONS = {FLOOR: floor_stepper, OURS: mlodsl_stepper, PUBLIC: public_stepper,
                   HIGHER: per_task_stepper(with_higher), LOOP: per_task_stepper(clone_and_patch)}


def available() -> dict:
    """The implementations that can run here (``higher`` is optional)."""
    return {label: make for label, make in IMPLEMENTATIONS.items()
            if label != HIGHER or import_higher() is not None}


def check_same_meta_gradient(pool, tolerance: float = 1e-5) -> float:
    """One meta-step of each on the same tasks from the same weights: same meta-gradient."""
    grads = {}
    for label, make in available().items():
        step, _, last_grads = make(pool)
        step(1)
        grads[label] = last_grads()
    reference = grads[FLOOR]
    worst = 0.0
    for label, gs in grads.items():
        for g, r in zip(gs, reference):
            worst = max(worst, (g - r).abs().max().item())
    assert worst <= tolerance, f"meta-gradients differ by {worst:.3g} (> {tolerance:g})"
    return worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=25, help="tasks per meta-step (25)")
    parser.add_argument("--shots", type=int, default=10, help="support (= query) points (10)")
    parser.add_argument("--rounds", type=int, default=30, help="alternating rounds (30)")
    parser.add_argument("--block", type=int, default=10, help="meta-steps per block (10)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time (default) or the process's CPU time")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        report(args)
    finally:
        torch.set_num_threads(threads)  # run_all.py runs the next benchmark in this process


def report(args: argparse.Namespace) -> None:
    """Check, time and print the table."""
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    pool = make_tasks(args.tasks, args.shots)
    worst = check_same_meta_gradient(pool)
    steppers = {label: make(pool)[0] for label, make in available().items()}
    for step in steppers.values():  # warm up (first calls build caches, vmap plans)
        step(3)
    times: dict[str, list[float]] = {label: [] for label in steppers}
    for _ in range(args.rounds):
        for label, step in steppers.items():
            start = clock()
            step(args.block)
            times[label].append(1000 * (clock() - start) / args.block)

    ms = {label: statistics.median(t) for label, t in times.items()}
    floor, ours = ms[FLOOR], ms[OURS]
    print(f"MAML meta-step, {args.tasks} tasks x {args.shots}+{args.shots} points, MLP "
          f"1-{HIDDEN}-{HIDDEN}-1, one inner SGD step, {args.threads} thread(s); median of "
          f"{args.rounds} alternating blocks of {args.block} steps, {args.clock} clock.")
    print()
    print(f"same meta-gradient on the same tasks: max abs difference {worst:.2g} (<= 1e-5)")
    print()
    print("| implementation | ms / meta-step | vs floor | vs mlodsl |")
    print("|---|---|---|---|")
    for label in IMPLEMENTATIONS:
        if label in ms:
            print(f"| {label} | {ms[label]:.2f} | {ms[label] / floor:.2f}x "
                  f"| {ms[label] / ours:.2f}x |")
        else:
            print(f"| {label} | not installed (pip install higher) | | |")
    print()
    summary = f"mlodsl / floor = {ours / floor:.2f}"
    for label, short in ((HIGHER, "higher loop"), (LOOP, "minimal loop")):
        if label in ms:
            summary += f"; {short} / mlodsl = {ms[label] / ours:.1f}"
    print(summary)


if __name__ == "__main__":
    main()
