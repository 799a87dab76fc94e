"""Unrolled (iterative) differentiation: reverse mode through the lower level's actual steps
(Maclaurin et al. 2015; Franceschi et al. 2017; MAML, Finn et al. 2017)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Unroll:
    """Backpropagation through the ``K`` optimizer steps the lower level took since the upper
    level's previous update.

    Unlike the implicit methods this is not a per-edge rule: ``unrolls`` tells the interpreter
    to take the lower level's steps functionally (parameters as tensors, the lower optimizer's
    differentiable twin, the module run through ``torch.func.functional_call``), after which
    one backward pass from the upper loss gives the whole hypergradient.
    """

    steps: int | None = None
    first_order: bool = False
    checkpoint: bool = False
    name: str = "unroll"
    unrolls: bool = True


def unroll(*, steps: int | None = None, first_order: bool = False,
           checkpoint: bool = False) -> Unroll:
    """Unrolled differentiation through the lower level's optimizer steps.

    The lower level's ``inner_steps`` updates between two updates of this level are taken
    functionally with a differentiable twin of its own optimizer (SGD, Adam, AdamW, RMSprop, read
    from its param groups), and this level's hypergradient backpropagates through them. With
    ``init_from`` on the lower level it restarts from this level's parameters at each of this
    level's steps: MAML.

    Unrolling nests: when the lower level has ``grad="unroll"`` on its own lowers, its steps
    are taken functionally as well, each on a gradient (``create_graph=True``) through the steps
    of the levels below it, and this level differentiates through all of them: the derivative
    of the truncated computation, which approaches the total derivative as the steps grow
    (memory grows with the product of the levels' step counts; ``checkpoint`` is refused).

    Args:
        steps: Differentiate through only the last ``steps`` updates (truncated
            backpropagation); ``None``: all of them.
        first_order: Treat the lower gradients as constants (first-order MAML): no second-order
            graph, no dependence of the lower gradients on this level's parameters.
        checkpoint: Recompute each unrolled step in the backward pass (non-reentrant
            activation checkpointing): a step's activations are not kept, only its
            parameters, so memory grows more slowly with the number of steps.
    """
    if steps is not None and steps < 1:
        raise ValueError(f"unroll steps must be a positive integer or None, got {steps}")
    return Unroll(steps=steps, first_order=first_order, checkpoint=checkpoint)
