"""Per-step overhead of mlodsl against a hand-written PyTorch loop doing the same maths.

One bilevel step = one lower SGD step on a small MLP classifier with a learned per-layer weight
decay, then one upper Adam step on the validation loss with the hypergradient of the chosen
method. Both sides start from identical weights and see identical batches; rounds alternate
between them in one process so drift in machine speed hits both. Prints the median ratio.

mlodsl hands its backward passes straight to torch's autograd engine (``mlodsl.autodiff``),
skipping the ~40 us of Python that ``torch.autograd.grad`` spends on argument checks per call,
which the hand-written loop pays as any user's would. The third timing, "public autograd", runs
mlodsl with that turned off (``MLODSL_PUBLIC_AUTOGRAD=1``): its ratio is the interpreter's own
overhead over the hand-written loop.

    python benchmarks/overhead.py [--rounds 60] [--steps 20] [--methods finite_diff cg neumann]
                                  [--warmup 10]

Blocks of 20 steps alternate: much shorter blocks make both sides pay for refilling caches
with the other's model at every switch, which inflates times and ratios.

Peak memory: the most tensor memory alive at once during one bilevel step, above what was alive
before it (parameters, optimizer state), read from ``torch.profiler``'s allocation events. On
CPU neither ``tracemalloc`` (it sees Python's allocator, not torch's) nor the process's peak
resident size (hundreds of MiB of libraries and allocator caching around a few MiB of tensors,
and it only ever grows) can tell the methods apart; the profiler's events are torch's own
accounting of every tensor allocation and free, so the figure is exact and repeatable.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import mlodsl as ml
from mlodsl import autodiff

IN, HIDDEN, OUT, BATCH = 64, 128, 10, 256
CG_ITERS, CG_DAMPING, NEUMANN_ITERS, NEUMANN_ALPHA, FD_RADIUS = 5, 1.0, 5, 0.1, 0.01


def make_data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(BATCH, IN, generator=gen), torch.randint(0, OUT, (BATCH,), generator=gen))
               for _ in range(8)]
    val = [(torch.randn(BATCH, IN, generator=gen), torch.randint(0, OUT, (BATCH,), generator=gen))
           for _ in range(8)]
    return batches, val


def make_model(seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.ReLU(),
                              torch.nn.Linear(HIDDEN, OUT))
    log_wd = torch.nn.Parameter(torch.full((2,), -4.0))
    return net, log_wd


def penalty(net, log_wd):
    return log_wd[0].exp() * net[0].weight.pow(2).sum() + log_wd[1].exp() * net[2].weight.pow(2).sum()


def method_object(name: str):
    return {"finite_diff": ml.hypergrad.finite_diff(radius=FD_RADIUS),
            "cg": ml.hypergrad.cg(iterations=CG_ITERS, tol=0.0, mu=CG_DAMPING, warm_start=False),
            "neumann": ml.hypergrad.neumann(iterations=NEUMANN_ITERS, alpha=NEUMANN_ALPHA,
                                            refresh_every=10**9)}[name]


def mlodsl_stepper(method: str, batches, val):
    net, log_wd = make_model()

    @ml.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05), data=batches)
    def classifier(batch, hpo):
        x, y = batch
        return F.cross_entropy(net(x), y) + penalty(net, hpo.module)

    @ml.level(upper_of="classifier", grad=method_object(method), module=log_wd,
              optimizer=torch.optim.Adam([log_wd], lr=0.01), data=val)
    def hpo(batch, classifier):
        x, y = batch
        return F.cross_entropy(classifier(x), y)

    program = ml.program(classifier, hpo, progress=False)
    return lambda steps: program.run(steps=steps), net


def manual_stepper(method: str, batches, val):
    """The same maths written out by hand, as a user of plain PyTorch would."""
    net, log_wd = make_model()
    params = [p for p in net.parameters()]
    opt = torch.optim.SGD(params, lr=0.05)
    hopt = torch.optim.Adam([log_wd], lr=0.01)
    state = {"i": 0, "j": 0, "calls": 0, "lam": None}

    def flat(ts):
        return torch.cat([t.reshape(-1) for t in ts])

    def lower_loss(x, y):
        return F.cross_entropy(net(x), y) + penalty(net, log_wd)

    def hvp(g, v):
        return flat(torch.autograd.grad(g, params, grad_outputs=v, retain_graph=True))

    def step():
        x, y = batches[state["i"] % len(batches)]
        state["i"] += 1
        loss = lower_loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward(inputs=params)
        opt.step()

        xv, yv = val[state["j"] % len(val)]
        state["j"] += 1
        upper = F.cross_entropy(net(xv), yv)
        grads = torch.autograd.grad(upper, [log_wd, *params], allow_unused=True)
        direct = torch.zeros_like(log_wd) if grads[0] is None else grads[0]
        v = flat(grads[1:])
        if method == "finite_diff":
            eps = FD_RADIUS / float(v.norm())
            shift = [s * eps for s in torch.split(v, [p.numel() for p in params])]
            shift = [s.view_as(p) for s, p in zip(shift, params)]
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                torch._foreach_add_(params, shift)
            gp = torch.autograd.grad(lower_loss(x, y), log_wd)[0]
            with torch.no_grad():
                for p, s, o in zip(params, shift, saved):
                    p.copy_(o).sub_(s)
            gn = torch.autograd.grad(lower_loss(x, y), log_wd)[0]
            with torch.no_grad():
                torch._foreach_copy_(params, saved)
            implicit = (gn - gp) / (2 * eps)
        else:
            g = flat(torch.autograd.grad(lower_loss(x, y), params, create_graph=True))
            if method == "cg":
                u, r = torch.zeros_like(v), v.clone()
                p, rs = r.clone(), float(r @ r)
                for _ in range(CG_ITERS):
                    ap = hvp(g, p).add(p, alpha=CG_DAMPING)
                    curvature = float(p @ ap)
                    if curvature <= 0.0:
                        break
                    alpha = rs / curvature
                    u.add_(p, alpha=alpha)
                    r.sub_(ap, alpha=alpha)
                    rs_new = float(r @ r)
                    p.mul_(rs_new / rs).add_(r)
                    rs = rs_new
            else:
                if state["lam"] is None:  # same one-off eigenvalue estimate as mlodsl's guard
                    xpow = torch.randn(v.shape, generator=torch.Generator().manual_seed(0))
                    xpow = xpow / xpow.norm()
                    for _ in range(10):
                        y_ = hvp(g, xpow)
                        lam = float(y_.norm())
                        xpow = y_ / lam
                    state["lam"] = lam * 1.05
                alpha = min(NEUMANN_ALPHA, 1.0 / state["lam"])
                term, total = v.clone(), v.clone()
                for _ in range(NEUMANN_ITERS):
                    term = term - alpha * hvp(g, term)
                    total += term
                u = alpha * total
            implicit = -torch.autograd.grad(g, log_wd, grad_outputs=u)[0]
        log_wd.grad = direct + implicit
        hopt.step()

    def run(steps):
        for _ in range(steps):
            step()

    return run, net


def measure(method: str, rounds: int, steps: int, warmup: int = 10) -> dict[str, float | str]:
    """Median ms/step of both sides and their ratio over alternating rounds, then the peak
    memory of one more step of each."""
    batches, val = make_data()
    ours, net_a = mlodsl_stepper(method, batches, val)
    theirs, net_b = manual_stepper(method, batches, val)
    public_run, net_c = mlodsl_stepper(method, batches, val)

    def public(steps: int) -> None:
        previous = autodiff.use_engine(False)
        try:
            public_run(steps)
        finally:
            autodiff.use_engine(previous)

    sides = (ours, theirs, public)
    for fn in sides:
        fn(warmup)  # warm up allocators and autograd caches
    ratios, public_ratios, t_ours, t_theirs, t_public = [], [], [], [], []
    for r in range(rounds):
        times = {}
        for fn in sides[r % 3:] + sides[:r % 3]:  # each side goes first in turn
            start = time.perf_counter()
            fn(steps)
            times[fn] = time.perf_counter() - start
        t_ours.append(times[ours] / steps)
        t_theirs.append(times[theirs] / steps)
        t_public.append(times[public] / steps)
        ratios.append(times[ours] / times[theirs])
        public_ratios.append(times[public] / times[theirs])
    # Optimizer state and caches exist by now, so the measured step is a steady-state one.
    mem_ours, mem_theirs = peak_step_bytes(ours), peak_step_bytes(theirs)
    public(1)  # the same number of steps as the others
    same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) and torch.equal(a, c)
               for a, b, c in zip(net_a.parameters(), net_b.parameters(), net_c.parameters()))
    if not same:
        raise SystemExit(f"{method}: mlodsl and the hand-written loop diverged; not the same maths")
    return {"method": method, "mlodsl_ms": statistics.median(t_ours) * 1e3,
            "manual_ms": statistics.median(t_theirs) * 1e3, "ratio": statistics.median(ratios),
            "public_ms": statistics.median(t_public) * 1e3,
            "public_ratio": statistics.median(public_ratios),
            "mlodsl_peak_mib": mem_ours / 2**20, "manual_peak_mib": mem_theirs / 2**20}


def peak_step_bytes(run) -> int:
    """Most tensor bytes alive at once during ``run(1)``, counting only tensors it allocates.

    Sums the profiler's allocation (+) and free (-) events in time order; tensors that existed
    before (parameters, optimizer state) are the baseline and do not count.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run(1)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    alive = peak = 0
    for _, nbytes in events:
        alive += nbytes
        peak = max(peak, alive)
    return peak


def rows(methods=("finite_diff", "cg", "neumann"), rounds: int = 60, steps: int = 20,
         warmup: int = 10) -> list[dict[str, float | str]]:
    """One row per method: times (ms/step), their ratio, and peak step memory (MiB)."""
    return [measure(method, rounds, steps, warmup) for method in methods]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--methods", nargs="+", default=["finite_diff", "cg", "neumann"])
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (10)")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; MLP {IN}-{HIDDEN}-{OUT}, "
          f"batch {BATCH}; median of {args.rounds} alternating rounds of {args.steps} steps; "
          "peak memory: most tensor memory alive at once during one step, above what was alive "
          "before it (torch.profiler allocation events)")
    print()
    print("| method | mlodsl ms/step | hand-written ms/step | ratio "
          "| mlodsl peak MiB | hand-written peak MiB | public autograd ms/step | its ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows(args.methods, args.rounds, args.steps, args.warmup):
        print(f"| {row['method']} | {row['mlodsl_ms']:.3f} | {row['manual_ms']:.3f} "
              f"| {row['ratio']:.3f}x | {row['mlodsl_peak_mib']:.2f} "
              f"| {row['manual_peak_mib']:.2f} | {row['public_ms']:.3f} "
              f"| {row['public_ratio']:.3f}x |")

if __name__ == "__main__":
    main()
