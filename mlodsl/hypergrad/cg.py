"""Conjugate-gradient implicit hypergradient (Pedregosa 2016; Rajeswaran et al. 2019)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlodsl.hypergrad import blocks, kernels
from mlodsl.hypergrad.base import EdgeProblem, EdgeResult


@dataclass(frozen=True)
class CG:
    """Solve ``(H + mu I) u = v`` by conjugate gradient, then apply the mixed derivative."""

    iterations: int = 10
    tol: float = 1e-10
    mu: float = 0.0
    warm_start: bool = True
    hvp: str = "reverse"
    name: str = "cg"

    def __call__(self, edge: EdgeProblem, v: torch.Tensor) -> EdgeResult:
        g = kernels.grad_graph(edge.lower_loss(), edge.lower_params, edge.lower)

        hessian = kernels.hessian_operator(self.hvp, g, edge.lower_params, edge.lower,
                                           edge.lower_module, edge.lower_loss)

        def matvec(x: torch.Tensor) -> torch.Tensor:
            hx = hessian(x)
            return hx.add(x, alpha=self.mu) if self.mu else hx

        if edge.tasks is not None:  # new tasks at every step: nothing to warm-start from
            u, used, residual, unsolved = blocks.conjugate_gradient(
                matvec, v.detach(), edge.tasks, self.iterations, self.tol)
            mixed = kernels.mixed_vjp(g, edge.upper_params, u)
            return EdgeResult(None if mixed is None else -mixed, {
                "residual": residual, "iterations": used, "unsolved_tasks": unsolved})
        previous = edge.state.get("cg_solution") if self.warm_start else None
        if previous is not None and previous.shape != v.shape:
            previous = None
        u, used, residual = kernels.conjugate_gradient(matvec, v.detach(), previous,
                                                       self.iterations, self.tol)
        if self.warm_start and residual < 1.0:  # never carry a failed solve forward
            edge.state["cg_solution"] = u.detach()
        mixed = kernels.mixed_vjp(g, edge.upper_params, u)
        return EdgeResult(None if mixed is None else -mixed,
                          {"residual": residual, "iterations": used})


def cg(*, iterations: int = 10, tol: float = 1e-10, mu: float = 0.0,
       warm_start: bool = True, hvp: str = "reverse") -> CG:
    """Conjugate-gradient implicit hypergradient (Pedregosa 2016; Rajeswaran et al. 2019).

    Args:
        iterations: Most CG iterations (Hessian-vector products) per hypergradient.
        tol: Stop when the residual is below ``tol * ||v||``.
        mu: Damping: solve ``(H + mu I) u = v``; use ``mu > 0`` for non-convex lower levels.
        warm_start: Start from the previous outer step's solution.
        hvp: Hessian-vector products by ``"reverse"``-over-reverse autograd (default) or
            ``"forward"``-over-reverse ``torch.func`` (needs an ``nn.Module`` lower level).

    Example:
        >>> @ml.level(upper_of="classifier", grad=ml.hypergrad.cg(iterations=20, mu=1e-3), ...)
    """
    if iterations < 1:
        raise ValueError(f"cg iterations must be >= 1, got {iterations}")
    if tol < 0 or mu < 0:
        raise ValueError(f"cg tol and mu must be >= 0, got tol={tol}, mu={mu}")
    kernels.check_hvp_mode(hvp)
    return CG(iterations=iterations, tol=tol, mu=mu, warm_start=warm_start, hvp=hvp)
