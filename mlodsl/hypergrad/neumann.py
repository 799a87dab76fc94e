"""Neumann-series implicit hypergradient (Lorraine et al. 2020), with a step-size guard."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlodsl.errors import HypergradError
from mlodsl.hypergrad import kernels
from mlodsl.hypergrad.base import EdgeProblem, EdgeResult

_DIVERGED = (
    "grad='neumann' on edge {upper} -> {lower} diverged: the last series term is {ratio:.3g} "
    "times ||v|| with step size {alpha:.3g} (estimated largest Hessian eigenvalue {lam:.3g}). "
    "The Hessian of '{lower}' has negative curvature there, or the estimate is stale: use "
    "grad=ml.hypergrad.cg(mu=...) (damped), or lower refresh_every."
)


@dataclass(frozen=True)
class Neumann:
    """``H^{-1} v ~ alpha sum_k (I - alpha H)^k v``, step capped below ``2 / lambda_max``."""

    iterations: int = 10
    alpha: float | None = None
    power_iterations: int = 10
    refresh_every: int = 50
    hvp: str = "reverse"
    name: str = "neumann"

    def __call__(self, edge: EdgeProblem, v: torch.Tensor) -> EdgeResult:
        g = kernels.grad_graph(edge.lower_loss(), edge.lower_params, edge.lower)

        matvec = kernels.hessian_operator(self.hvp, g, edge.lower_params, edge.lower,
                                          edge.lower_module, edge.lower_loss)

        lam = self._largest_eigenvalue(edge, matvec, v)
        # The series converges for alpha < 2 / lam; 1 / lam keeps every factor in [0, 1).
        safe = 1.0 / lam if lam > 0 else 1.0
        alpha = safe if self.alpha is None else min(self.alpha, safe)
        term, total = v.detach().clone(), v.detach().clone()
        for _ in range(self.iterations):
            term.sub_(matvec(term), alpha=alpha)
            total.add_(term)
        # With H positive semi-definite and alpha < 2 / lambda_max every factor of (I - alpha H)
        # has magnitude below 1, so no term can outgrow v: growth (or NaN) is divergence, and
        # a growing component dominates the last term, so checking it once suffices.
        ratio = float(term.norm()) / max(float(v.norm()), 1e-300)
        if not ratio <= 1.0 + 1e-3:
            raise HypergradError(_DIVERGED.format(upper=edge.upper, lower=edge.lower,
                                                  ratio=ratio, alpha=alpha, lam=lam))
        mixed = kernels.mixed_vjp(g, edge.upper_params, total.mul_(alpha))
        return EdgeResult(None if mixed is None else -mixed,
                          {"iterations": self.iterations, "alpha": alpha, "eigenvalue": lam,
                           "last_term": ratio})

    def _largest_eigenvalue(self, edge: EdgeProblem, matvec, v: torch.Tensor) -> float:
        calls = edge.state.get("neumann_calls", 0)
        edge.state["neumann_calls"] = calls + 1
        if "neumann_eigenvalue" in edge.state and calls % self.refresh_every:
            return edge.state["neumann_eigenvalue"]
        generator = torch.Generator().manual_seed(calls)
        lam = kernels.power_iteration(matvec, v, self.power_iterations, generator)
        # Power iteration approaches lambda_max from below: leave a margin.
        edge.state["neumann_eigenvalue"] = lam * 1.05
        return lam * 1.05


def neumann(*, iterations: int = 10, alpha: float | None = None, power_iterations: int = 10,
            refresh_every: int = 50, hvp: str = "reverse") -> Neumann:
    """Neumann-series implicit hypergradient (Lorraine et al. 2020).

    The step ``alpha`` is capped at ``1 / lambda_max(H)``, with ``lambda_max`` estimated by a
    few power iterations, cached and refreshed every ``refresh_every`` calls; a series that
    still grows is reported as an error, never applied.

    Args:
        iterations: Terms of the series (Hessian-vector products).
        alpha: Step size; ``None`` uses ``1 / lambda_max``.
        power_iterations: Power iterations per eigenvalue estimate.
        refresh_every: Re-estimate the eigenvalue every this many hypergradients.
        hvp: ``"reverse"`` or ``"forward"`` Hessian-vector products, as in :func:`cg`.
    """
    if iterations < 0 or power_iterations < 1 or refresh_every < 1:
        raise ValueError("neumann needs iterations >= 0, power_iterations >= 1, "
                         "refresh_every >= 1")
    if alpha is not None and alpha <= 0:
        raise ValueError(f"neumann alpha must be positive, got {alpha}")
    kernels.check_hvp_mode(hvp)
    return Neumann(iterations=iterations, alpha=alpha, power_iterations=power_iterations,
                   refresh_every=refresh_every, hvp=hvp)
