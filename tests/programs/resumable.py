"""A program with everything exact resumption must carry: a shuffling DataLoader drawing its
order from the global RNG, dropout, Adam, a StepLR scheduler and warm-started CG.

Run as a script by tests/test_checkpoint.py, in fresh processes:
    python resumable.py straight STEPS OUT               run STEPS, write the parameters
    python resumable.py save STEPS CKPT                  run STEPS, save a checkpoint
    python resumable.py resume CKPT STEPS OUT            load, run STEPS more, write parameters
    python resumable.py periodic STEPS DIR KILL_AT       checkpoint every 3 steps; SIGKILL
                                                         itself right after the one at KILL_AT
"""

from __future__ import annotations

import os
import signal
import sys

import torch
from torch.utils.data import DataLoader, TensorDataset

import mlodsl as ml


def build(**options):
    torch.manual_seed(0)
    x, y = torch.randn(60, 5), torch.randn(60, 1)
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Dropout(0.1),
                              torch.nn.Linear(16, 1))
    log_decay = torch.nn.Parameter(torch.full((2,), -2.0))
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)

    @ml.level(module=net, optimizer=optimizer,
              scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.7),
              data=DataLoader(TensorDataset(x[:40], y[:40]), batch_size=8, shuffle=True))
    def fit(batch, hpo):
        xb, yb = batch
        decay = hpo.exp()
        penalty = decay[0] * net[0].weight.pow(2).sum() + decay[1] * net[3].weight.pow(2).sum()
        return (net(xb) - yb).pow(2).mean() + penalty

    @ml.level(upper_of="fit", grad=ml.hypergrad.cg(iterations=3, mu=1.0, warm_start=True),
              module=log_decay, optimizer=torch.optim.Adam([log_decay], lr=0.05), inner_steps=2,
              data=DataLoader(TensorDataset(x[40:], y[40:]), batch_size=10, shuffle=True))
    def hpo(batch, fit):
        xb, yb = batch
        return (fit(xb) - yb).pow(2).mean()

    return ml.program(fit, hpo, seed=1, progress=False, **options), (fit, hpo)


def parameters(program) -> list[torch.Tensor]:
    return [p.detach().clone() for node in program.levels for p in node.params]


class KillAfter:
    """SIGKILL this process right after the periodic checkpoint of a given program step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, *, program, step, path):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "straight":
        program, _ = build()
        program.run(steps=int(argv[1]))
        torch.save(parameters(program), argv[2])
    elif mode == "save":
        program, _ = build()
        program.run(steps=int(argv[1]))
        program.save(argv[2])
    elif mode == "resume":
        _, levels = build()
        program = ml.load(argv[1], *levels, seed=1, progress=False)
        program.run(steps=int(argv[2]))
        torch.save(parameters(program), argv[3])
    elif mode == "periodic":
        program, _ = build(checkpoint_dir=argv[2], checkpoint_every=3,
                           hooks=[KillAfter(int(argv[3]))])
        program.run(steps=int(argv[1]))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv[1:])
