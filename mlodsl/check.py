"""``ml.check_hypergrad``: how far a level's hypergradient is from a trusted reference."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from mlodsl.dsl import Level
from mlodsl.hypergrad import exact
from mlodsl.hypergrad import kernels


@dataclass(frozen=True)
class HypergradCheck:
    """The result of :func:`check_hypergrad`.

    Attributes:
        level: The level checked.
        method: Its hypergradient method.
        reference: ``"exact"`` or ``"finite_difference"``.
        relative_error: ``||g - g_ref|| / ||g_ref||``.
        cosine: Cosine similarity between ``g`` and ``g_ref``.
        hypergrad: The method's hypergradient (flat).
        expected: The reference (flat).
        lower_grad_norm: For finite differences, the largest gradient norm left in the levels
            below after re-solving them (how well they were solved); ``None`` for ``exact``.
    """

    level: str
    method: str
    reference: str
    relative_error: float
    cosine: float
    hypergrad: torch.Tensor
    expected: torch.Tensor
    lower_grad_norm: float | None = None

    def __str__(self) -> str:
        text = (f"hypergradient of '{self.level}' ({self.method}) vs {self.reference}: relative "
                f"error {self.relative_error:.3e}, cosine {self.cosine:.6f}")
        if self.lower_grad_norm is not None:
            text += f" (levels below re-solved to gradient norm {self.lower_grad_norm:.1e})"
        return text


def check_hypergrad(program: Any, level: str | Level, *, reference: str = "auto",
                    epsilon: float = 1e-4, solve_steps: int = 500,
                    max_exact_params: int = 2048) -> HypergradCheck:
    """Compare ``level``'s hypergradient with a reference, leaving the program untouched.

    ``reference="exact"`` uses the dense total derivative at the current state (small problems).
    ``"finite_difference"`` first re-solves the levels below by running the program's own
    schedule for them for ``solve_steps`` program steps on their current batches, computes the
    hypergradient there, then perturbs each of the level's parameters by ``+-epsilon``,
    re-solves again and differences the level's loss: the method-free ground truth, as good as
    the re-solve. ``"auto"`` picks exact when the levels below have at most
    ``max_exact_params`` parameters. Parameters, optimizer and solver state are restored.

    Returns:
        A :class:`HypergradCheck` with relative error and cosine.

    Example:
        >>> print(ml.check_hypergrad(program, "hpo"))
        hypergradient of 'hpo' (cg) vs exact: relative error 3.1e-07, cosine 1.000000
    """
    node = program.level(level)
    runtime = program._runtime
    name = node.name
    below = runtime.view.below[name]
    if not below:
        raise ValueError(f"level '{name}' ({node.defined_at}) has no levels below it; its "
                         "gradient is a plain gradient, with nothing to check")
    if reference == "auto":
        size = sum(p.numel() for lower in below for p in runtime.params[lower])
        reference = "exact" if size <= max_exact_params else "finite_difference"
    if reference not in ("exact", "finite_difference"):
        raise ValueError(f"reference must be 'auto', 'exact' or 'finite_difference', "
                         f"got {reference!r}")

    lower_grad_norm = None
    with _preserved(runtime, (name, *below)):
        if reference == "exact":
            g = kernels.flat(runtime.hypergrad(name))
            methods = {**runtime.methods, name: exact(max_params=max_exact_params)}
            expected = kernels.flat(runtime.hypergrad(name, methods))
        else:
            # Implicit methods assume the levels below are solved: compare where they are.
            lower_grad_norm = _solve_below(runtime, below, solve_steps)
            g = kernels.flat(runtime.hypergrad(name))
            expected, worst = _finite_difference(runtime, name, below, epsilon, solve_steps)
            lower_grad_norm = max(lower_grad_norm, worst)
    error = float((g - expected).norm() / expected.norm().clamp_min(1e-300))
    cosine = float(torch.nn.functional.cosine_similarity(g, expected, dim=0, eps=1e-300))
    return HypergradCheck(level=name, method=node.method.name, reference=reference,
                          relative_error=error, cosine=cosine, hypergrad=g, expected=expected,
                          lower_grad_norm=lower_grad_norm)


def _finite_difference(runtime: Any, name: str, below: tuple[str, ...], epsilon: float,
                       solve_steps: int) -> tuple[torch.Tensor, float]:
    params = runtime.params[name]
    flat_params = kernels.flat(params).detach()
    expected = torch.zeros_like(flat_params)
    worst = 0.0
    for i in range(flat_params.numel()):
        values = []
        for sign in (1.0, -1.0):
            with _preserved(runtime, (name, *below)):
                with torch.no_grad():
                    shifted = flat_params.clone()
                    shifted[i] += sign * epsilon
                    for p, piece in zip(params, kernels.unflat(shifted, params)):
                        p.copy_(piece)
                worst = max(worst, _solve_below(runtime, below, solve_steps))
                loss = runtime.loss_of(name)
                values.append(float(loss.detach()))
        expected[i] = (values[0] - values[1]) / (2 * epsilon)
    return expected, worst


def _solve_below(runtime: Any, below: tuple[str, ...], steps: int) -> float:
    """Train the levels below with the program's own schedule on their current batches; return
    the largest gradient norm left among the lowest of them."""
    actions = [a for a in runtime.schedule.actions if a.level in below]
    for step in range(1, steps + 1):
        for action in actions:
            if step % action.every == 0:
                runtime.update(action.level, runtime.current_batches(action.level))
    worst = 0.0
    unroller = runtime.unroller
    for lower in below:
        if not runtime.view.below[lower]:
            params = runtime.params[lower]
            unrolled = unroller is not None and lower in unroller.upper_of
            if unrolled:  # its loss reads its fast weights: differentiate leaf copies of them
                params = unroller.leaf_copies(lower)
            try:
                loss = runtime.loss_of(lower)
            finally:
                if unrolled:
                    unroller.fast[lower] = unroller.end[lower]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            flat = kernels.flat_or_zeros(grads, params)
            worst = max(worst, 0.0 if flat is None else float(flat.norm()))
    return worst


_UNROLLER_TABLES = ("fast", "end", "state", "taken", "since")


class _preserved:
    """Restore parameters, gradients, optimizer states and solver state on exit."""

    def __init__(self, runtime: Any, names: tuple[str, ...]) -> None:
        self.runtime, self.names = runtime, names

    def __enter__(self) -> None:
        rt = self.runtime
        self.params = {n: [p.detach().clone() for p in rt.params[n]] for n in self.names}
        self.grads = {n: [p.grad for p in rt.params[n]] for n in self.names}
        self.optim = {n: copy.deepcopy(rt.nodes[n].optimizer.state_dict()) for n in self.names}
        self.edges = {k: copy.deepcopy(e.state) for k, e in rt.edges.items()}
        # Unrolled trajectories: their tables hold tensors that steps replace, never modify,
        # so shallow copies bring back the trajectory, graph included.
        self.unrolled = None if rt.unroller is None else {
            table: dict(getattr(rt.unroller, table)) for table in _UNROLLER_TABLES}

    def __exit__(self, *exc: Any) -> None:
        rt = self.runtime
        with torch.no_grad():
            for n in self.names:
                for p, saved, grad in zip(rt.params[n], self.params[n], self.grads[n]):
                    p.copy_(saved)
                    p.grad = grad
                rt.nodes[n].optimizer.load_state_dict(self.optim[n])
        for k, e in rt.edges.items():
            e.state.clear()
            e.state.update(self.edges[k])
        for table, saved in (self.unrolled or {}).items():
            getattr(rt.unroller, table).clear()
            getattr(rt.unroller, table).update(saved)
