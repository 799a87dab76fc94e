"""The one interface every hypergradient method implements.

A method answers one question for one edge ``upper -> lower`` of the level graph: given a
vector ``v`` over the lower level's parameters (the upper objective's total gradient with
respect to them), return ``(d w_lower* / d w_upper)^T v``, the vector-Jacobian product of the
lower level's best response. The implicit function theorem gives

    (d w* / d lam)^T v = - (d^2 L / d lam d w) H^{-1} v,     H = d^2 L / d w d w,

where ``L`` is the lower level's loss. Methods differ in how they apply ``H^{-1}``. The chain
rule over a graph of any depth (:mod:`mlodsl.hypergrad.chain`) calls methods edge by edge.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class EdgeProblem:
    """What a method may use for one edge at one outer step.

    Attributes:
        upper: Name of the upper level.
        lower: Name of the lower level.
        upper_params: The upper level's trainable tensors.
        lower_params: The lower level's trainable tensors.
        lower_loss: Re-evaluates the lower level's loss at the current parameters on its
            current batch, with autograd recording.
        lower_optimizer: The lower level's optimizer (its state preconditions ``sama``).
        lower_module: The lower level's module (forward-mode HVPs swap its parameters).
        state: Persists across outer steps for this edge (warm starts, eigenvalue caches).
        tasks: For a ``tasks=True`` lower level, where each task's entries lie in the flat
            vector over its (per-task, stacked) parameters; its loss is then the sum of the
            tasks' losses, so ``H`` is block-diagonal and ``cg`` solves one system per task.
    """

    upper: str
    lower: str
    upper_params: tuple[torch.Tensor, ...]
    lower_params: tuple[torch.Tensor, ...]
    lower_loss: Callable[[], torch.Tensor]
    lower_optimizer: torch.optim.Optimizer | None = None
    lower_module: Any = None
    state: dict[str, Any] = field(default_factory=dict)
    tasks: Any = None


@dataclass
class EdgeResult:
    """A method's answer for one edge.

    Attributes:
        grad: Flat vector over the upper parameters, ``(d w_lower*/d w_upper)^T v``; ``None``
            when the lower loss does not read the upper parameters at all.
        diagnostics: Solver figures (residual norm, iterations, step size, ...) for the history.
    """

    grad: torch.Tensor | None
    diagnostics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GraphView:
    """What a joint method (one that handles everything below a level at once) may use.

    Attributes:
        params: Each level's trainable tensors.
        below: Each level's lower levels (all depths), deepest first.
        loss: Re-evaluates a level's loss at the current parameters on its current batch.
        carried: For each level, the lowers whose edge carries the hypergradient of a level
            further up (one whose function reads that lower or a level below it), so the edge
            is needed even where the level's own loss ignores that lower.
    """

    params: Mapping[str, tuple[torch.Tensor, ...]]
    below: Mapping[str, tuple[str, ...]]
    loss: Callable[[str], torch.Tensor]
    carried: Mapping[str, frozenset[str]] = field(default_factory=dict)


@runtime_checkable
class HypergradMethod(Protocol):
    """A hypergradient method: a small immutable object named after its maths.

    It implements one of three forms. An *edge* method is called once per edge with ``v``, the
    total derivative of the upper objective w.r.t. the lower level's parameters, and returns
    ``(d w_lower* / d w_upper)^T v`` (``__call__(edge, v) -> EdgeResult``). A *joint* method
    handles everything below the level at once (``joint(view, upper, partials)``, given the
    partial derivatives of the upper objective w.r.t. every level below), as ``exact`` does to
    give the true total derivative at any depth. An *unrolling* method (``unrolls = True``)
    makes the interpreter take the lower levels' steps differentiably and backpropagate
    through them.
    """

    name: str


def is_method(obj: Any) -> bool:
    """Whether ``obj`` implements either form of :class:`HypergradMethod`."""
    return isinstance(getattr(obj, "name", None), str) and (
        callable(obj) or callable(getattr(obj, "joint", None))
        or getattr(obj, "unrolls", False) is True)
