"""Three levels: learning by ignoring (Xie et al. 2021) on digits, with every hypergradient method.

A model is pretrained on a large *source* set, half of whose labels follow another labelling
(the digit's label plus one: data that transfers negatively), then finetuned on a small clean
*target* set. Which source examples should pretraining ignore? Three levels, each a plain
decorated function, on 16 principal components of scikit-learn's 8x8 digits:

* ``finetune`` (lowest) trains a softmax classifier ``V`` on 40 target examples, pulled towards
  the pretrained weights: ``CE_target(V) + lam/2 |V - W|^2`` (it reads ``pretrain``).
* ``pretrain`` (middle, above ``finetune``) trains ``W`` on the 900 source examples, each
  weighted by ``sigmoid(a_i)`` (it reads ``reweight``). Its own loss does not read
  ``finetune``, so its update is its plain gradient; the edge ``pretrain -> finetune`` carries
  the top level's hypergradient.
* ``reweight`` (top, above ``pretrain``) learns one logit ``a_i`` per source example from the
  target validation loss of the *finetuned* model. Its hypergradient flows through both edges:
  ``dF/da = (dW*/da)^T (dV*/dW)^T dF/dV``, the ``reweight -> pretrain`` edge with the top's
  method and the ``pretrain -> finetune`` edge with the middle level's method.

Every method that applies is run (``cg``, ``neumann``, ``finite_diff``, ``sama``, ``exact``, and
a mixed pair), against three baselines with the same steps: the target set alone, pretraining
on every source example then finetuning (no upper level), and a two-level program whose
reweighting reads the *pretrained* model's validation loss (no finetuning level in between).
Run it with ``python examples/three_levels.py`` (a few minutes on two CPU cores).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import mlodsl as ml

SEED = 0
N_SOURCE, N_TARGET, N_VAL = 900, 40, 200   # the remaining 657 digits are the target test split
COMPONENTS = 16                            # principal components of the pixels
CORRUPT = 0.5                              # fraction of source examples labelled (y + 1) % 10
PROX = 0.3                                 # lam: pull of the finetuned weights to the pretrained
DECAY = 1e-3                               # weight decay of the pretraining loss
LR = 0.5                                   # full-batch gradient descent, both model levels
FINETUNE_STEPS = 5                         # finetune steps per pretrain step
PRETRAIN_STEPS = 2                         # pretrain steps per reweight step
STEPS = 1500                               # program steps (finetune steps) of a full run
META_LR = 0.1                              # Adam on the example logits
# (label, top method, middle method): the methods of the reweight and pretrain levels
METHODS = (
    ("exact", "exact", "exact"),
    ("cg", ml.hypergrad.cg(iterations=10), ml.hypergrad.cg(iterations=10)),
    ("neumann", ml.hypergrad.neumann(iterations=10), ml.hypergrad.neumann(iterations=10)),
    ("finite_diff", "finite_diff", "finite_diff"),
    ("sama", "sama", "sama"),
    ("cg / finite_diff", ml.hypergrad.cg(iterations=10), "finite_diff"),
)


# -- data ----------------------------------------------------------------------------------------

Split = tuple[torch.Tensor, torch.Tensor]


def load_splits(seed: int) -> dict[str, object]:
    """Source (half relabelled), target train/val/test; pixels projected on the source's
    principal components and standardized."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen)
    x, y = x[order], y[order]
    mean = x[:N_SOURCE].mean(0)
    basis = torch.linalg.svd(x[:N_SOURCE] - mean, full_matrices=False).Vh[:COMPONENTS]
    z = (x - mean) @ basis.T
    z = z / z[:N_SOURCE].std(0)
    corrupted = torch.rand(N_SOURCE, generator=gen) < CORRUPT
    y_source = torch.where(corrupted, (y[:N_SOURCE] + 1) % 10, y[:N_SOURCE])
    a, b, c = N_SOURCE, N_SOURCE + N_TARGET, N_SOURCE + N_TARGET + N_VAL
    return {"source": (z[:a], y_source), "clean_source": (z[:a], y[:a]), "corrupted": corrupted,
            "target": (z[a:b], y[a:b]), "val": (z[b:c], y[b:c]), "test": (z[c:], y[c:])}


# -- models --------------------------------------------------------------------------------------

def make_linear() -> torch.nn.Linear:
    """A softmax classifier starting at zero (so every run starts from the same point)."""
    layer = torch.nn.Linear(COMPONENTS, 10)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    return layer


def proximity(model: torch.nn.Module, anchor: Sequence[torch.Tensor]) -> torch.Tensor:
    """lam/2 |V - W|^2 over all parameters."""
    return 0.5 * PROX * sum((p - q).pow(2).sum() for p, q in zip(model.parameters(), anchor))


def weighted_ce(model: torch.nn.Module, split: Split, logits: torch.Tensor | None
                ) -> torch.Tensor:
    """Cross-entropy with per-example weights sigmoid(logits), normalized to a weighted mean,
    plus the pretraining weight decay."""
    x, y = split
    losses = F.cross_entropy(model(x), y, reduction="none")
    if logits is None:
        loss = losses.mean()
    else:
        weights = torch.sigmoid(logits)
        loss = (weights * losses).sum() / weights.sum()
    return loss + 0.5 * DECAY * sum(p.pow(2).sum() for p in model.parameters())


@torch.no_grad()
def accuracy(model: torch.nn.Module, split: Split) -> float:
    return (model(split[0]).argmax(1) == split[1]).float().mean().item()


def sgd(model: torch.nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=LR)


# -- the three-level program ---------------------------------------------------------------------

def build_program(data: dict, top_method, mid_method, **options
                  ) -> tuple[ml.Program, dict[str, object]]:
    """Learning by ignoring; returns the program and its models and example logits."""
    pre_net, fine_net = make_linear(), make_linear()
    logits = torch.nn.Parameter(torch.zeros(N_SOURCE))
    source, target, val = data["source"], data["target"], data["val"]

    @ml.level(module=fine_net, optimizer=sgd(fine_net), data=lambda: target)
    def finetune(batch, pretrain):
        """Target loss, pulled towards the pretrained weights."""
        x, y = batch
        return F.cross_entropy(fine_net(x), y) + proximity(fine_net, pretrain.parameters())

    @ml.level(upper_of="finetune", grad=mid_method, inner_steps=FINETUNE_STEPS,
              module=pre_net, optimizer=sgd(pre_net), data=lambda: source)
    def pretrain(batch, reweight):
        """Source loss, each example weighted by the top level."""
        return weighted_ce(pre_net, batch, reweight.module)

    @ml.level(upper_of="pretrain", grad=top_method, inner_steps=PRETRAIN_STEPS, module=logits,
              optimizer=torch.optim.Adam([logits], lr=META_LR), data=lambda: val)
    def reweight(batch, finetune):
        """Validation loss of the finetuned model."""
        x, y = batch
        out = finetune(x)
        return {"loss": F.cross_entropy(out, y), "acc": (out.argmax(1) == y).float().mean()}

    program = ml.program(finetune, pretrain, reweight, **options)
    return program, {"pretrain": pre_net, "finetune": fine_net, "logits": logits}


# -- baselines -----------------------------------------------------------------------------------

def target_only(data: dict, steps: int) -> torch.nn.Module:
    """The target set alone, same steps, pulled towards zero instead of pretrained weights."""
    net = make_linear()
    zero = [torch.zeros_like(p) for p in net.parameters()]

    @ml.level(module=net, optimizer=sgd(net), data=lambda: data["target"])
    def finetune(batch):
        x, y = batch
        return F.cross_entropy(net(x), y) + proximity(net, zero)

    ml.program(finetune, progress=False).run(steps=steps)
    return net


def pretrain_then_finetune(data: dict, steps: int, source: str = "source") -> torch.nn.Module:
    """No upper level: pretrain on every example of ``source`` (uniform weights), then
    finetune towards the result; as many steps of each as in the three-level program."""
    pre_net, fine_net = make_linear(), make_linear()

    @ml.level(module=pre_net, optimizer=sgd(pre_net), data=lambda: data[source])
    def pretrain(batch):
        return weighted_ce(pre_net, batch, None)

    ml.program(pretrain, progress=False).run(steps=steps // FINETUNE_STEPS)
    anchor = [p.detach() for p in pre_net.parameters()]

    @ml.level(module=fine_net, optimizer=sgd(fine_net), data=lambda: data["target"])
    def finetune(batch):
        x, y = batch
        return F.cross_entropy(fine_net(x), y) + proximity(fine_net, anchor)

    ml.program(finetune, progress=False).run(steps=steps)
    return fine_net


def two_level(data: dict, steps: int, method="cg") -> tuple[torch.nn.Module, torch.Tensor]:
    """Reweighting against the *pretrained* model's validation loss (two levels), then
    finetuning towards it; the same steps and optimizers."""
    pre_net = make_linear()
    logits = torch.nn.Parameter(torch.zeros(N_SOURCE))

    @ml.level(module=pre_net, optimizer=sgd(pre_net), data=lambda: data["source"])
    def pretrain(batch, reweight):
        return weighted_ce(pre_net, batch, reweight.module)

    @ml.level(upper_of="pretrain", grad=method, inner_steps=PRETRAIN_STEPS, module=logits,
              optimizer=torch.optim.Adam([logits], lr=META_LR), data=lambda: data["val"])
    def reweight(batch, pretrain):
        x, y = batch
        return F.cross_entropy(pretrain(x), y)

    ml.program(pretrain, reweight, progress=False).run(steps=steps // FINETUNE_STEPS)
    anchor = [p.detach() for p in pre_net.parameters()]
    fine_net = make_linear()

    @ml.level(module=fine_net, optimizer=sgd(fine_net), data=lambda: data["target"])
    def finetune(batch):
        x, y = batch
        return F.cross_entropy(fine_net(x), y) + proximity(fine_net, anchor)

    ml.program(finetune, progress=False).run(steps=steps)
    return fine_net, logits.detach()


# -- the report ----------------------------------------------------------------------------------

def weight_summary(logits: torch.Tensor, corrupted: torch.Tensor) -> dict[str, float]:
    """Mean weight of clean and relabelled source examples, and how well a weight below 0.5
    flags a relabelled one (F1)."""
    weights = torch.sigmoid(logits.detach())
    flagged = weights < 0.5
    tp = (flagged & corrupted).sum().item()
    precision = tp / max(flagged.sum().item(), 1)
    recall = tp / max(corrupted.sum().item(), 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"w_clean": weights[~corrupted].mean().item(),
            "w_corrupt": weights[corrupted].mean().item(), "f1": f1}


def main(steps: int = STEPS, methods: Sequence[str] | None = None, quiet: bool = False,
         seed: int = SEED) -> dict[str, dict[str, float]]:
    """Run the three-level program with each method and the baselines; print the table.

    Args:
        steps: Program steps (finetune steps); pretrain takes ``steps // FINETUNE_STEPS``,
            reweight ``steps // (FINETUNE_STEPS * PRETRAIN_STEPS)``.
        methods: Labels from ``METHODS`` to run (default: all).
        quiet: Print nothing.
        seed: Seeds the split and the relabelled examples.

    Returns:
        One dict per row label: ``test_acc``, and for the reweighting rows ``ms_per_step``
        (wall time per program step), ``w_clean``, ``w_corrupt``, ``f1``.
    """
    say = (lambda *a: None) if quiet else print
    wall = time.perf_counter()
    torch.manual_seed(seed)
    data = load_splits(seed)
    rows: dict[str, dict[str, float]] = {}
    rows["target only"] = {"test_acc": accuracy(target_only(data, steps), data["test"])}
    rows["pretrain + finetune (no upper)"] = {
        "test_acc": accuracy(pretrain_then_finetune(data, steps), data["test"])}
    start = time.perf_counter()
    net, logits = two_level(data, steps)
    rows["two levels: reweight for the pretrained model (cg)"] = {
        "test_acc": accuracy(net, data["test"]),
        "ms_per_step": 1000 * (time.perf_counter() - start) / steps,
        **weight_summary(logits, data["corrupted"])}
    chosen = [m for m in METHODS if methods is None or m[0] in methods]
    for index, (label, top, mid) in enumerate(chosen):
        program, parts = build_program(data, top, mid, progress=False)
        if index == 0:
            say(program)
            say()
        start = time.perf_counter()
        history = program.run(steps=steps)
        seconds = time.perf_counter() - start
        edges = sorted(k for k in history.rows()[-1] if "->" in k)
        rows[f"three levels: {label}"] = {
            "test_acc": accuracy(parts["finetune"], data["test"]),
            "ms_per_step": 1000 * seconds / steps,
            **weight_summary(parts["logits"], data["corrupted"])}
        say(f"{label}: {seconds:.1f} s; last reweight step diagnostics: " + ", ".join(
            f"{k} {float(history.rows()[-1][k]):.3g}" for k in edges if k in history.rows()[-1]))
    rows["oracle: pretrain on the clean source + finetune"] = {
        "test_acc": accuracy(pretrain_then_finetune(data, steps, "clean_source"), data["test"])}

    say()
    say(f"{N_SOURCE} source digits ({int(data['corrupted'].sum())} relabelled y+1), "
        f"{N_TARGET} target / {N_VAL} val / {len(data['test'][1])} test; {steps} finetune "
        f"steps, {steps // FINETUNE_STEPS} pretrain, {steps // (FINETUNE_STEPS * PRETRAIN_STEPS)}"
        " reweight")
    say("| program | test acc | ms / step | weight clean / relabelled | F1 (weight < 0.5) |")
    say("|---|---|---|---|---|")
    for label, row in rows.items():
        timing = f"{row['ms_per_step']:.1f}" if "ms_per_step" in row else ""
        weights = (f"{row['w_clean']:.2f} / {row['w_corrupt']:.2f}" if "w_clean" in row else "")
        f1 = f"{row['f1']:.2f}" if "f1" in row else ""
        say(f"| {label} | {row['test_acc']:.3f} | {timing} | {weights} | {f1} |")
    say(f"wall time: {time.perf_counter() - wall:.1f} s")
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny matrices; a second thread only adds synchronization
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS,
                        help=f"program (finetune) steps (default {STEPS})")
    parser.add_argument("--methods", nargs="*", default=None,
                        help="labels of the methods to run (default: all): "
                             + ", ".join(repr(m[0]) for m in METHODS))
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed (default {SEED})")
    arguments = parser.parse_args()
    main(steps=arguments.steps, methods=arguments.methods, seed=arguments.seed)
