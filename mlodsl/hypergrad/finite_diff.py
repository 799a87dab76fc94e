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
        mixed, eps = kernels.central_mixed_difference(
            edge.lower_loss, edge.lower_params, edge.upper_params, v, self.radius,
            scale=-1.0)
        # (d w*/d lam)^T v = -(d^2 L / d lam d w) v under H^{-1} = I.
        return EdgeResult(mixed, {"eps": eps})


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
