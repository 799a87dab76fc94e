"""Per-step overhead of mlodsl against a hand-written PyTorch loop doing the same maths.

One bilevel step = one lower SGD step on a small MLP classifier with a learned per-layer weight
decay, then one upper Adam step on the validation loss with the hypergradient of the chosen
method. Both sides start from identical weights and see identical batches; rounds alternate
between them in one process so drift in machine speed hits both. Prints the median ratio.

    python benchmarks/overhead.py [--rounds 60] [--steps 20] [--methods finite_diff cg neumann]

Blocks of 20 steps alternate: much shorter blocks make both sides pay for refilling caches
with the other's model at every switch, which inflates times and ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import mlodsl as ml

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


def measure(method: str, rounds: int, steps: int) -> tuple[float, float, float]:
    batches, val = make_data()
    ours, net_a = mlodsl_stepper(method, batches, val)
    theirs, net_b = manual_stepper(method, batches, val)
    ours(10), theirs(10)  # warm up allocators and autograd caches
    ratios, t_ours, t_theirs = [], [], []
    for r in range(rounds):
        order = (ours, theirs) if r % 2 == 0 else (theirs, ours)
        times = {}
        for fn in order:
            start = time.perf_counter()
            fn(steps)
            times[fn] = time.perf_counter() - start
        t_ours.append(times[ours] / steps)
        t_theirs.append(times[theirs] / steps)
        ratios.append(times[ours] / times[theirs])
    same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6)
               for a, b in zip(net_a.parameters(), net_b.parameters()))
    if not same:
        raise SystemExit(f"{method}: mlodsl and the hand-written loop diverged; not the same maths")
    return statistics.median(t_ours), statistics.median(t_theirs), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--methods", nargs="+", default=["finite_diff", "cg", "neumann"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; MLP {IN}-{HIDDEN}-{OUT}, "
          f"batch {BATCH}; median of {args.rounds} alternating rounds of {args.steps} steps")
    print("| method | mlodsl ms/step | hand-written ms/step | ratio |")
    print("|---|---|---|---|")
    for method in args.methods:
        ours, theirs, ratio = measure(method, args.rounds, args.steps)
        print(f"| {method} | {ours * 1e3:.3f} | {theirs * 1e3:.3f} | {ratio:.3f}x |")


if __name__ == "__main__":
    main()
