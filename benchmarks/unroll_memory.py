"""Peak memory of unrolled differentiation with and without checkpointing.

Each configuration runs in its own process (peak resident memory only grows), unrolling an MLP
lower level (64-256-256-10, batch 256) for K steps of SGD under a learned weight decay, then
taking one hypergradient. Prints the peak resident set size above the process's baseline
(here the resident size is the right measure: the graph of K unrolled steps is tens to
hundreds of MiB, far above the noise of the interpreter and allocator), and the memory of the
K sets of weights the trajectory must hold (one per step: what checkpointing cannot drop). The
child processes run two at a time.

    python benchmarks/unroll_memory.py [--steps 5 20 80]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor


def high_water_kib() -> float:
    """This process's peak resident size, KiB. Linux's VmHWM belongs to the process's own
    memory map; getrusage's ru_maxrss would also carry the high-water mark of the process it was
    forked from (the kernel folds it in at exec), which hides the child's own peak when the
    parent, e.g. run_all.py after other benchmarks, is larger."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def child(steps: int, checkpoint: bool) -> None:
    import torch
    import torch.nn.functional as F

    import mlodsl as ml

    torch.manual_seed(0)
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(),
                              torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10))
    log_decay = torch.nn.Parameter(torch.tensor(-3.0))

    @ml.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05))
    def fit(hpo):
        decay = sum(p.pow(2).sum() for p in net.parameters())
        return F.cross_entropy(net(x), y) + hpo.exp() * decay

    @ml.level(upper_of="fit", grad=ml.hypergrad.unroll(checkpoint=checkpoint), module=log_decay,
              inner_steps=steps, optimizer=torch.optim.SGD([log_decay], lr=0.1))
    def hpo(fit):
        return F.cross_entropy(fit(x), y)

    program = ml.program(fit, hpo, progress=False)
    base = high_water_kib()
    program.run(steps=steps)
    peak = high_water_kib()
    weights = sum(p.numel() * p.element_size() for p in net.parameters())
    print((peak - base) / 1024, steps * weights / 2**20)  # KiB -> MiB on Linux


def peak_mib(steps: int, checkpoint: bool) -> tuple[float, float]:
    """Peak resident MiB above baseline of one configuration, in a fresh process, and the MiB
    of its steps' weights."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(steps),
                          str(int(checkpoint))], capture_output=True, text=True, check=True)
    peak, weights = map(float, out.stdout.strip().splitlines()[-1].split())
    return peak, weights


def rows(steps: list[int]) -> list[tuple[int, float, float, float]]:
    """(unrolled steps, peak MiB plain, peak MiB with checkpoint=True, MiB of the steps'
    weights) per entry of ``steps``."""
    configs = [(k, checkpoint) for k in steps for checkpoint in (False, True)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        peaks = list(pool.map(lambda c: peak_mib(*c), configs))
    return [(k, peaks[2 * i][0], peaks[2 * i + 1][0], peaks[2 * i][1])
            for i, k in enumerate(steps)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 20, 80])
    args = parser.parse_args(argv)
    print("| unrolled steps | peak MiB, plain | peak MiB, checkpoint=True "
          "| the steps' weights, MiB |")
    print("|---|---|---|---|")
    for steps, plain, checkpointed, weights in rows(args.steps):
        print(f"| {steps} | {plain:.0f} | {checkpointed:.0f} | {weights:.0f} |")

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), bool(int(sys.argv[3])))
    else:
        main()
