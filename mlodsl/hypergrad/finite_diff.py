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
    xi: float = 1.0
    name: str = "finite_diff"

    def __call__(self, edge: EdgeProblem, v: torch.Tensor) -> EdgeResult:
        mixed, eps = kernels.central_mixed_difference(
            edge.lower_loss, edge.lower_params, edge.upper_params, v, self.radius,
            scale=-self.xi)
        # (d w*/d lam)^T v = -xi (d^2 L / d lam d w) v under H^{-1} = xi I.
        return EdgeResult(mixed, {"eps": eps})


def finite_diff(*, radius: float = 0.01, xi: float = 1.0) -> FiniteDiff:
    """Finite-difference hypergradient, as in DARTS (Liu et al. 2019); alias ``"darts"``.

    Approximates the inverse Hessian by ``xi`` times the identity and the mixed second
    derivative by a central difference, so it needs two extra gradients and no second-order
    graph. The lower level's parameters are restored bit-exactly afterwards.

    Args:
        radius: Perturbation size ``r``; ``eps = r / ||v||``.
        xi: Scale of the identity standing for ``H^{-1}``. DARTS's second-order approximation
            uses the lower level's learning rate (one SGD step: ``dw/dlam ~ -xi d^2L/dw dlam``);
            the default 1.0 is the plain identity.

    Example:
        >>> @ml.level(upper_of="supernet", grad=ml.hypergrad.finite_diff(xi=0.05), ...)
    """
    if radius <= 0:
        raise ValueError(f"finite_diff radius must be positive, got {radius}")
    if not xi > 0:
        raise ValueError(f"finite_diff xi must be positive, got {xi}")
    return FiniteDiff(radius=radius, xi=xi)
