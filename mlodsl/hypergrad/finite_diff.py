"""Finite-difference hypergradient (DARTS, Liu et al. 2019): ``H^{-1}`` taken as identity."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlodsl.hypergrad import kernels
from mlodsl.hypergrad.base import EdgeProblem, EdgeResult


@dataclass(frozen=True)
class FiniteDiff:
    """Central difference of ``dL/dlam`` at ``w +- eps v``, ``eps = radius / ||v||``."""

    radius: float = 0.01
    name: str = "finite_diff"

    def __call__(self, edge: EdgeProblem, v: torch.Tensor) -> EdgeResult:
        v_norm = v.norm()
        if float(v_norm) == 0.0:
            return EdgeResult(torch.zeros_like(kernels.flat(edge.upper_params)), {"eps": 0.0})
        eps = self.radius / v_norm
        params = edge.lower_params
        shift = [piece * eps for piece in kernels.unflat(v, params)]
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                torch._foreach_add_(params, shift)
            plus = self._upper_grad(edge)
            with torch.no_grad():
                for p, s, orig in zip(params, shift, saved):
                    p.copy_(orig).sub_(s)
            minus = self._upper_grad(edge)
        finally:
            # Copy back the saved values: adding and subtracting eps*v is not bit-exact.
            with torch.no_grad():
                torch._foreach_copy_(params, saved)
        if plus is None:
            return EdgeResult(None, {"eps": float(eps)})
        # (d w*/d lam)^T v = -(d^2 L / d lam d w) v under H^{-1} = I.
        return EdgeResult((minus - plus) / (2 * eps), {"eps": float(eps)})

    @staticmethod
    def _upper_grad(edge: EdgeProblem) -> torch.Tensor | None:
        grads = torch.autograd.grad(edge.lower_loss(), edge.upper_params, allow_unused=True)
        return kernels.flat_or_zeros(grads, edge.upper_params)


def finite_diff(*, radius: float = 0.01) -> FiniteDiff:
    """Finite-difference hypergradient, as in DARTS (Liu et al. 2019); alias ``"darts"``.

    Approximates the inverse Hessian by the identity and the mixed second derivative by a
    central difference, so it needs two extra gradients and no second-order graph. The lower
    level's parameters are restored bit-exactly afterwards.

    Args:
        radius: Perturbation size ``r``; ``eps = r / ||v||``.
    """
    if radius <= 0:
        raise ValueError(f"finite_diff radius must be positive, got {radius}")
    return FiniteDiff(radius=radius)
