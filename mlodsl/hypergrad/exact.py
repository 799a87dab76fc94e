"""Exact hypergradient: the true total derivative through every level below, by dense solves.

For an upper level with parameters ``lam`` and everything below it ``W = (w_1, ..., w_k)``, the
levels below are at their best response when each level's *reduced gradient* vanishes:
``G_i(W, lam) = 0``, where ``G_i`` is the gradient of level ``i``'s loss with respect to its own
parameters, counting how the levels below ``i`` respond to them (for a lowest level, its plain
gradient). The implicit function theorem on that joint system gives

    dW/dlam = -(dG/dW)^{-1} dG/dlam,   dF/dlam = dF/dlam (direct) + (dW/dlam)^T dF/dW,

and each ``G_i`` is built the same way, recursively, as a differentiable expression. At two
levels this is ``-(d^2 L / d lam d w) H^{-1} dF/dw``. At depth it is the exact total
derivative, which the edge-by-edge methods (cg, neumann, ...) only approximate: they invert each
level's own Hessian with the levels below it held fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlodsl.errors import HypergradError
from mlodsl.hypergrad import kernels
from mlodsl.hypergrad.base import EdgeResult, GraphView

_TOO_LARGE = (
    "grad='exact' on level '{upper}': the levels below it ({names}) have {n} parameters, above "
    "the limit of {limit} for dense Jacobians ({gib:.2f} GiB each). Use grad='cg' or "
    "'neumann', or raise the limit with ml.hypergrad.exact(max_params=...)."
)


_SINGULAR = (
    "grad='exact' on level '{level}': the Jacobian of the optimality conditions of the "
    "levels below it ('{below}') is singular, so their best response is not locally unique (a "
    "loss linear "
    "in its parameters, a flat direction, or an operation with no second-order rule). Add "
    "regularization to the lower loss, or use grad='finite_diff', which needs only first "
    "derivatives."
)


@dataclass(frozen=True)
class Exact:
    """Dense implicit differentiation of the joint optimality system of all lower levels."""

    max_params: int = 4096
    name: str = "exact"

    def joint(self, view: GraphView, upper: str, partials: dict[str, torch.Tensor | None]
              ) -> EdgeResult:
        """``(dW/dlam)^T dF/dW`` for everything ``W`` below ``upper``, given ``dF/dW``."""
        below = view.below[upper]
        lower_params = [p for name in below for p in view.params[name]]
        n = sum(p.numel() for p in lower_params)
        if n > self.max_params:
            raise HypergradError(_TOO_LARGE.format(
                upper=upper, names=", ".join(below), n=n, limit=self.max_params,
                gib=n * n * lower_params[0].element_size() / 2**30))
        cache: dict[str, torch.Tensor] = {}
        stacked = torch.cat([_reduced_gradient(view, name, cache) for name in below])
        jacobian = kernels.dense_jacobian(stacked, lower_params, upper)
        rhs = torch.cat([torch.zeros_like(kernels.flat(view.params[name]))
                         if partials[name] is None else partials[name] for name in below])
        u = _solve(jacobian.T, rhs, upper, below)
        residual = float((jacobian.T @ u - rhs).norm() / rhs.norm().clamp_min(1e-300))
        mixed = kernels.mixed_vjp(stacked, view.params[upper], u)
        return EdgeResult(None if mixed is None else -mixed,
                          {"residual": residual, "size": n})


def _reduced_gradient(view: GraphView, name: str, cache: dict[str, torch.Tensor]
                      ) -> torch.Tensor:
    """Differentiable gradient of ``name``'s loss w.r.t. its parameters, the levels below it
    responding through the implicit function theorem."""
    if name in cache:
        return cache[name]
    own = view.params[name]
    below = view.below[name]
    if not below:
        cache[name] = kernels.grad_graph(view.loss(name), own, name)
        return cache[name]
    lower_params = [p for lower in below for p in view.params[lower]]
    grads = torch.autograd.grad(view.loss(name), [*own, *lower_params], create_graph=True,
                                allow_unused=True)
    direct = kernels.flat_or_zeros(grads[:len(own)], own)
    if direct is None:
        direct = torch.zeros_like(kernels.flat(own))
    through_lowers = kernels.flat_or_zeros(grads[len(own):], lower_params)
    if through_lowers is not None:
        stacked = torch.cat([_reduced_gradient(view, lower, cache) for lower in below])
        jacobian = kernels.dense_jacobian(stacked, lower_params, name, create_graph=True)
        u = _solve(jacobian.T, through_lowers, name, below)
        mixed = torch.autograd.grad(stacked, own, grad_outputs=u, create_graph=True,
                                    allow_unused=True)
        correction = kernels.flat_or_zeros(mixed, own)
        if correction is not None:
            direct = direct - correction
    cache[name] = direct
    return direct


def _solve(matrix: torch.Tensor, rhs: torch.Tensor, level: str, below: tuple[str, ...]
           ) -> torch.Tensor:
    try:
        return torch.linalg.solve(matrix, rhs)
    except torch.linalg.LinAlgError as error:
        raise HypergradError(_SINGULAR.format(level=level, below="', '".join(below))) from error


def exact(*, max_params: int = 4096) -> Exact:
    """Exact hypergradient by dense implicit differentiation; the ground truth for tests.

    At any depth it returns the true total derivative of the level's loss, with every level
    below it at its best response (see the module docstring); the methods of the levels in
    between are not used for it.

    Args:
        max_params: Refuse when the levels below have more parameters in total than this
            (their joint Jacobian is ``n x n``).

    Example:
        >>> @ml.level(upper_of="ridge", grad=ml.hypergrad.exact(), ...)
    """
    return Exact(max_params=max_params)
