"""A small float64 bilevel program for the distributed tests, and the worker torchrun runs.

``build`` makes a per-feature weight-decay problem: ``low`` fits a linear classifier (its own
DataLoader, global batch 8), ``up`` learns the log decays on a validation DataLoader. Run by
tests/test_distributed.py as::

    python -m torch.distributed.run --standalone --nproc_per_node=2 ddp_bilevel.py MODE OUT

MODE ``cases`` runs every case of ``CASES`` (and the error cases) and saves, from rank 0, the
final parameters and messages to ``OUT/cases.pt``; ``failures CKPTS`` resumes a checkpoint folder of
a ``cases`` launch, then makes rank 1 raise, then (in a new program) hang, and saves what every
rank saw to ``OUT/failures-<rank>.pt``.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import mlodsl as ml

STEPS = 9
CASES = {  # name: (method, shuffle, other options of build)
    "cg": (lambda: ml.hypergrad.cg(iterations=5), False, {}),
    "cg_shuffled": (lambda: ml.hypergrad.cg(iterations=5), True, {}),
    "cg_forward_accumulate": (lambda: ml.hypergrad.cg(iterations=5, hvp="forward"), False,
                              {"accumulate": 2}),
    "unroll": (lambda: "unroll", False, {}),
    "unroll_shuffled_truncated": (lambda: ml.hypergrad.unroll(steps=2), True, {}),
    "neumann": (lambda: ml.hypergrad.neumann(iterations=4), False, {}),
    "finite_diff": (lambda: "finite_diff", True, {}),
    "sama": (lambda: "sama", False, {}),
    "exact": (lambda: "exact", False, {}),
}


def build(method="cg", distributed=None, shuffle=False, batch_size=8, fail=None, accumulate=1,
          **options):
    """The program; ``fail=(rank, step, kind)`` makes that rank raise or sleep at that step."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(5, 3, generator=g, dtype=torch.float64)
    x = torch.randn(48, 5, generator=g, dtype=torch.float64)
    xv = torch.randn(32, 5, generator=g, dtype=torch.float64)
    y, yv = (x @ teacher).argmax(1), (xv @ teacher).argmax(1)
    net = torch.nn.Linear(5, 3).double()
    with torch.no_grad():
        net.weight.copy_(0.1 * torch.randn(3, 5, generator=g, dtype=torch.float64))
        net.bias.zero_()
    log_decay = torch.nn.Parameter(torch.full((5,), -2.0, dtype=torch.float64))

    @ml.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.5),
              data=DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle),
              accumulate=accumulate)
    def low(batch, up, step):
        if fail is not None and ml.distributed.rank() == fail[0] and step == fail[1]:
            if fail[2] == "raise":
                raise RuntimeError("boom on purpose")
            time.sleep(fail[2])
        xb, yb = batch
        out = net(xb)
        return {"loss": F.cross_entropy(out, yb) + (up.exp() * net.weight.pow(2)).sum(),
                "acc": (out.argmax(1) == yb).double().mean()}

    @ml.level(upper_of="low", grad=method, module=log_decay, inner_steps=3,
              optimizer=torch.optim.Adam([log_decay], lr=0.1),
              data=DataLoader(TensorDataset(xv, yv), batch_size=8, shuffle=shuffle))
    def up(batch, low):
        xb, yb = batch
        return F.cross_entropy(low(xb), yb)

    return ml.program(low, up, distributed=distributed, seed=0, progress=False, **options)


def maml(distributed, steps: int = 6) -> list[torch.Tensor]:
    """examples/maml_sinusoid.py's program (tasks=True: tasks adapted in parallel, split
    between the ranks) with a meta-batch of 24 tasks; the meta network's final parameters."""
    path = Path(__file__).resolve().parents[2] / "examples" / "maml_sinusoid.py"
    spec = importlib.util.spec_from_file_location("maml_sinusoid", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    net = example.make_mlp(0)
    program = example.build_maml_program(net, example.TaskSampler(5, 24, 0),
                                         distributed=distributed, progress=False)
    program.run(steps=steps)
    return [p.detach().clone() for p in net.parameters()]


def final(program) -> dict[str, list[torch.Tensor]]:
    """Every level's parameters."""
    return {n.name: [p.detach().clone() for p in n.params] for n in program.levels}


def _error(fn) -> str:
    try:
        fn()
    except ml.MlodslError as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def _cases(out: Path) -> None:
    results: dict[str, object] = {}
    for name, (method, shuffle, more) in CASES.items():
        program = build(method(), "ddp", shuffle, **more)
        program.run(steps=STEPS)
        results[name] = final(program)
        if name == "cg":
            results["cg_history"] = [float(r["loss"]) for r in program.history["low"]]
    results["maml"] = maml("ddp")
    # Validation, loggers and early stopping: rank 0 validates and logs; every rank agrees.
    calls, rows = [], []

    def validate(low):
        calls.append(1)
        return {"acc": float(ml.distributed.rank() + 1)}  # rank 1 would report 2.0

    program = build("cg", "ddp", validation=validate, validate_every=2,
                    early_stopping=ml.EarlyStopping("acc", mode="max", patience=1),
                    logger=lambda metrics, step: rows.append(step))
    program.run(steps=STEPS)
    everyone = [None, None]
    torch.distributed.all_gather_object(everyone, (len(calls), len(rows), program.steps,
                                                   list(program.history.validation)))
    results["rank0"] = everyone
    # Checkpoint half-way (rank 0 writes), resume in a new program on the same ranks.
    first = build(CASES["cg_shuffled"][0](), "ddp", True, checkpoint_dir=out / "ckpts",
                  checkpoint_every=4)
    first.run(steps=5)
    second = build(CASES["cg_shuffled"][0](), "ddp", True).load(out / "ckpts")
    second.run(steps=STEPS - 4)
    results["resumed"] = final(second)
    results["checkpoints"] = sorted(p.name for p in (out / "ckpts").iterdir())
    results["not_divisible"] = _error(lambda: build("cg", "ddp", batch_size=7).run(steps=1))
    iterations = 5 if ml.distributed.rank() == 0 else 4
    results["mismatch"] = _error(lambda: build(ml.hypergrad.cg(iterations=iterations), "ddp")
                                 .run(steps=1))
    # A custom method that forgets to reduce: the drift check must catch it (last: the error
    # shuts the process group down).
    results["drift"] = _error(lambda: build(_Unreduced(), ml.distributed.ddp(check_every=1))
                              .run(steps=3))
    if ml.distributed.rank() == 0:
        torch.save(results, out / "cases.pt")


class _Unreduced:
    """A hypergradient rule computed from this rank's batch only (no mlodsl kernels)."""

    name = "unreduced"

    def __call__(self, edge, v):
        g = torch.autograd.grad(edge.lower_loss(), edge.lower_params, create_graph=True)
        flat = torch.cat([t.reshape(-1) for t in g])
        hv = torch.autograd.grad(flat, edge.lower_params, grad_outputs=v, retain_graph=True)
        u = v - 0.1 * torch.cat([t.reshape(-1) for t in hv])  # this rank's Hessian only
        mixed = torch.autograd.grad(flat, edge.upper_params, grad_outputs=u)
        return ml.hypergrad.EdgeResult(-torch.cat([t.reshape(-1) for t in mixed]), {})


def _failures(out: Path, checkpoints: Path) -> None:
    """Resume the ``cases`` launch's checkpoint in these fresh processes; then rank 1 raises at
    its step 3; then, in a new program (a new process group), it hangs."""
    seen: dict[str, object] = {}
    resumed = build(CASES["cg_shuffled"][0](), "ddp", True).load(checkpoints)
    resumed.run(steps=STEPS - 4)
    seen["resumed"] = final(resumed)
    for mode, kind in (("fail", "raise"), ("stuck", 5.0)):
        program = build("cg", ml.distributed.ddp(timeout_s=2.0), fail=(1, 3, kind))
        start = time.monotonic()
        try:
            message = _error(lambda: program.run(steps=STEPS))
        except RuntimeError as error:  # rank 1's own failure
            message = f"own: {error}"
        seen[mode] = {"message": message, "seconds": time.monotonic() - start}
    torch.save(seen, out / f"failures-{ml.distributed.rank()}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, folder = sys.argv[1], Path(sys.argv[2])
    _cases(folder) if mode == "cases" else _failures(folder, Path(sys.argv[3]))
