"""Exact implicit hypergradient: materialize the lower Hessian and solve densely."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlodsl.errors import HypergradError
from mlodsl.hypergrad import kernels
from mlodsl.hypergrad.base import EdgeProblem, EdgeResult

_TOO_LARGE = (
    "grad='exact' on edge {upper} -> {lower}: level '{lower}' has {n} parameters, above the "
    "limit of {limit} for a dense Hessian ({gib:.2f} GiB). Use grad='cg' or 'neumann', or raise "
    "the limit with ml.hypergrad.exact(max_params=...)."
)


@dataclass(frozen=True)
class Exact:
    """Dense solve ``H u = v`` (implicit function theorem, e.g. Bengio 2000; Pedregosa 2016)."""

    max_params: int = 4096
    name: str = "exact"

    def __call__(self, edge: EdgeProblem, v: torch.Tensor) -> EdgeResult:
        n = v.numel()
        if n > self.max_params:
            raise HypergradError(_TOO_LARGE.format(
                upper=edge.upper, lower=edge.lower, n=n, limit=self.max_params,
                gib=n * n * v.element_size() / 2**30))
        g = kernels.grad_graph(edge.lower_loss(), edge.lower_params)
        hessian = kernels.dense_hessian(g, edge.lower_params, edge.lower)
        u = torch.linalg.solve(hessian, v)
        residual = float((hessian @ u - v).norm() / v.norm().clamp_min(1e-300))
        mixed = kernels.mixed_vjp(g, edge.upper_params, u)
        return EdgeResult(None if mixed is None else -mixed,
                          {"residual": residual, "iterations": 1})


def exact(*, max_params: int = 4096) -> Exact:
    """Exact implicit hypergradient by a dense Hessian solve; the ground truth for tests.

    Args:
        max_params: Refuse lower levels with more parameters than this (the Hessian is
            ``n x n``).

    Example:
        >>> @ml.level(upper_of="ridge", grad=ml.hypergrad.exact(), ...)
    """
    return Exact(max_params=max_params)
