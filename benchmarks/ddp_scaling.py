"""Step time of a data-parallel bilevel program on 1 and 2 CPU processes (gloo).

Each program step is one lower SGD step of an MLP classifier (64-256-256-10) on its share of a
global batch, and one upper step (learned per-layer weight decay) with a conjugate-gradient
hypergradient (5 iterations): 1 gradient + about 8 Hessian-vector-sized products, each averaged
over the ranks with one all-reduce. The global batch is the same in every configuration, so the
maths is identical and only the split changes:

* 1 process, 1 thread   (``distributed="ddp"`` in a world of one: the same code path)
* 2 processes, 1 thread each (``torchrun --standalone --nproc_per_node=2``)
* 1 process, 2 threads  (what the same two cores give through intra-op parallelism)

Each configuration runs in fresh processes; rounds alternate between them. Prints the median
milliseconds per program step and the speed-up of 2 processes over 1.

    python benchmarks/ddp_scaling.py [--rounds 3] [--steps 40] [--batch 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import mlodsl as ml

IN, HIDDEN, OUT = 64, 256, 10


def build(batch: int) -> ml.Program:
    gen = torch.Generator().manual_seed(0)
    n = 8 * batch
    x, y = torch.randn(n, IN, generator=gen), torch.randint(0, OUT, (n,), generator=gen)
    xv, yv = torch.randn(n, IN, generator=gen), torch.randint(0, OUT, (n,), generator=gen)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(),
                              torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh(),
                              torch.nn.Linear(HIDDEN, OUT))
    log_wd = torch.nn.Parameter(torch.full((3,), -4.0))
    loader = torch.utils.data.DataLoader
    dataset = torch.utils.data.TensorDataset

    @ml.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05),
              data=loader(dataset(x, y), batch_size=batch, shuffle=True))
    def classifier(batch, hpo):
        xb, yb = batch
        decay = sum(w.exp() * net[i].weight.pow(2).sum() for w, i in zip(hpo, (0, 2, 4)))
        return F.cross_entropy(net(xb), yb) + decay

    @ml.level(upper_of="classifier", module=log_wd, optimizer=torch.optim.Adam([log_wd], 1e-2),
              grad=ml.hypergrad.cg(iterations=5, tol=0.0, mu=1.0, warm_start=False),
              data=loader(dataset(xv, yv), batch_size=batch, shuffle=True))
    def hpo(batch, classifier):
        xb, yb = batch
        return F.cross_entropy(classifier(xb), yb)

    return ml.program(classifier, hpo, distributed="ddp", seed=0, progress=False)


def worker(steps: int, warmup: int, batch: int) -> None:
    """Run in each process: time ``steps`` program steps after ``warmup``; rank 0 prints."""
    program = build(batch)
    program.run(steps=warmup)
    torch.distributed.barrier() if ml.distributed.world_size() > 1 else None
    start = time.perf_counter()
    program.run(steps=steps)
    seconds = time.perf_counter() - start
    if ml.distributed.is_main():
        print(json.dumps({"world": ml.distributed.world_size(), "threads":
                          torch.get_num_threads(), "ms_per_step": 1e3 * seconds / steps}))


CONFIGS = {  # name: (processes, threads per process)
    "1 process, 1 thread": (1, 1),
    "2 processes, 1 thread each": (2, 1),
    "1 process, 2 threads": (1, 2),
}


def launch(processes: int, threads: int, args: argparse.Namespace) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("WORLD_SIZE", None)
    tail = [__file__, "--worker", "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--batch", str(args.batch), "--threads", str(threads)]
    command = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={processes}", *tail] if processes > 1
               else [sys.executable, *tail])
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("{"))
    return json.loads(line)["ms_per_step"]


def measure(rounds: int, args: argparse.Namespace) -> dict[str, float]:
    """Median ms per program step of each configuration over ``rounds`` alternating rounds."""
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(rounds):
        for name, (processes, threads) in CONFIGS.items():
            times[name].append(launch(processes, threads, args))
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"Global batch {args.batch}, {args.steps} timed steps after {args.warmup}, "
          f"{rounds} round(s); ms per program step (median over rounds):\n")
    print("| configuration | ms per step (median) | each round |")
    print("|---|---|---|")
    for name, value in medians.items():
        print(f"| {name} | {value:.1f} | {', '.join(f'{v:.1f}' for v in times[name])} |")
    one, two = medians["1 process, 1 thread"], medians["2 processes, 1 thread each"]
    print(f"\nSpeed-up of 2 processes over 1: {one / two:.2f}x "
          f"(1 process with 2 threads: {one / medians['1 process, 2 threads']:.2f}x).")
    return medians


def main(argv: list[str] | None = None) -> dict[str, float] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1024, help="global batch (even)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        torch.set_num_threads(args.threads)
        worker(args.steps, args.warmup, args.batch)
        return None
    return measure(args.rounds, args)


if __name__ == "__main__":
    main()
