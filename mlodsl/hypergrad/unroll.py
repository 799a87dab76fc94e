"""Unrolled (iterative) differentiation: reverse mode through the lower level's actual steps
(Maclaurin et al. 2015; Franceschi et al. 2017; MAML, Finn et al. 2017)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlodsl.hypergrad import kernels
from mlodsl.hypergrad.base import EdgeProblem, EdgeResult


@dataclass(frozen=True)
class Unroll:
    """``(d w_K / d lam)^T v`` by backpropagating through the ``K`` optimizer steps the lower
    level took since the upper level's previous update.

    The interpreter takes those steps functionally (parameters as tensors, the lower optimizer's
    differentiable twin, the module run through ``torch.func.functional_call``) when a level's
    upper chose this method; ``unrolls`` tells it to.
    """

    steps: int | None = None
    first_order: bool = False
    checkpoint: bool = False
    name: str = "unroll"
    unrolls: bool = True

    def __call__(self, edge: EdgeProblem, v: torch.Tensor) -> EdgeResult:
        end = edge.trajectory() if edge.trajectory is not None else None
        if end is None or not any(t.requires_grad for t in end):
            return EdgeResult(None, {"unrolled_steps": 0})
        grads = torch.autograd.grad(end, edge.upper_params, grad_outputs=kernels.unflat(v, end),
                                    allow_unused=True)
        return EdgeResult(kernels.flat_or_zeros(grads, edge.upper_params),
                          {"unrolled_steps": edge.state.get("unrolled_steps", 0)})


def unroll(*, steps: int | None = None, first_order: bool = False,
           checkpoint: bool = False) -> Unroll:
    """Unrolled differentiation through the lower level's optimizer steps.

    The lower level's ``inner_steps`` updates between two updates of this level are taken
    functionally with a differentiable twin of its own optimizer (SGD, Adam, AdamW, RMSprop, read
    from its param groups), and this level's hypergradient backpropagates through them. With
    ``init_from`` on the lower level it restarts from this level's parameters at each of this
    level's steps: MAML.

    Args:
        steps: Differentiate through only the last ``steps`` updates (truncated
            backpropagation); ``None``: all of them.
        first_order: Treat the lower gradients as constants (first-order MAML): no second-order
            graph, no dependence of the lower gradients on this level's parameters.
        checkpoint: Recompute each unrolled step in the backward pass (non-reentrant
            activation checkpointing), so memory stays flat as the number of steps grows.
    """
    if steps is not None and steps < 1:
        raise ValueError(f"unroll steps must be a positive integer or None, got {steps}")
    return Unroll(steps=steps, first_order=first_order, checkpoint=checkpoint)
