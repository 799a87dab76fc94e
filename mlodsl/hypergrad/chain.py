"""The chain rule over a level graph of any depth.

For an upper level ``top`` with loss ``F``, let ``v[X]`` be the total derivative of ``F`` with
respect to level ``X``'s parameters, counting every path from ``X`` up to ``top``. Processing
the levels below ``top`` deepest first,

    v[X] = dF/dw_X (direct) + sum over lowers Z of X of  (d w_Z* / d w_X)^T v[Z],

where each edge's vector-Jacobian product comes from the method ``X`` chose (``grad=``). The
hypergradient of ``top`` is ``v[top]``. Each edge applies the inverse Hessian of its own lower
level's loss with that level's own lowers held fixed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from mlodsl import autodiff, distributed
from mlodsl.errors import HypergradError, NoDependencyError
from mlodsl.hypergrad import kernels
from mlodsl.hypergrad.base import EdgeProblem, GraphView, HypergradMethod

_UPPER_IGNORES_LOWER = (
    "level '{upper}' ({where}) is upper_of '{lower}', but its loss does not depend on "
    "'{lower}' or on any level below it, so its hypergradient through '{lower}' is zero. "
    "Read the lower level in the loss (call {lower}(x) for an nn.Module level, or use "
    "{lower}.module), or remove it from upper_of."
)
_LOWER_IGNORES_UPPER = (
    "level '{lower}' ({where}) is below '{upper}', but its loss does not read the parameters "
    "of '{upper}', so its best response does not depend on them and the implicit "
    "hypergradient is zero. Use '{upper}' in the loss of '{lower}' (add a parameter named "
    "'{upper}'), or remove the upper_of edge."
)
_NO_EDGE_RULE = (
    "the hypergradient of level '{top}' ({where}) reaches '{lower}' through the edge "
    "'{upper}' -> '{lower}', whose method grad='{method}' has no per-edge rule: an unrolled edge "
    "is differentiated only by a backward pass through its steps, from a level that unrolls "
    "'{upper}' too. Use grad='unroll' (nested) or grad='exact' on '{top}', or an implicit "
    "method on '{upper}'."
)


def total_hypergrad(
    top_loss: torch.Tensor,
    top: str,
    view: GraphView,
    lowers: Mapping[str, Sequence[str]],
    methods: Mapping[str, HypergradMethod],
    edge_problem: Callable[[str, str], EdgeProblem],
    where: Mapping[str, str],
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Hypergradient of ``top`` (direct term included), one tensor per parameter.

    Args:
        top_loss: ``top``'s loss, with its autograd graph.
        top: The upper level's name.
        view: Every level's parameters, levels below (deepest first) and loss.
        lowers: Each level's direct lowers.
        methods: Each upper level's hypergradient method.
        edge_problem: Builds the :class:`EdgeProblem` for ``(upper, lower)``.
        where: Each level's ``file:line``, for errors.

    Returns:
        ``(gradients, diagnostics)``; diagnostics hold ``hypergrad_norm`` and solver figures
        keyed ``"upper->lower/figure"`` (``"upper->a,b/figure"`` for a joint method over
        several direct lowers).
    """
    params = view.params
    below = view.below[top]
    names = (top, *below)
    flat_params = [p for name in names for p in params[name]]
    grads = autodiff.grad(top_loss, flat_params, allow_unused=True)
    # Distributed: the global loss's partial derivatives, one all-reduce for all of them.
    distributed.mean_all_([g for g in grads if g is not None],
                          f"the all-reduce of the partial derivatives of '{top}'")
    partial: dict[str, torch.Tensor | None] = {}
    start = 0
    for name in names:
        count = len(params[name])
        partial[name] = kernels.flat_or_zeros(grads[start:start + count], params[name])
        start += count

    def reads_below(lower: str) -> bool:
        return any(partial[n] is not None for n in (lower, *view.below[lower]))

    for lower in lowers[top]:
        # An edge that carries a higher level's hypergradient is fine (learning by ignoring:
        # pretraining sits above finetuning without reading it); its own update is then its
        # plain gradient.
        if (partial[lower] is None and not reads_below(lower)
                and lower not in view.carried.get(top, ())):
            raise NoDependencyError(_UPPER_IGNORES_LOWER.format(
                upper=top, lower=lower, where=where[top]))

    v = dict(partial)  # becomes the total derivative as levels are processed bottom-up
    diagnostics: dict[str, Any] = {}
    # A joint method on top answers from the partial derivatives alone: the edges below it
    # would only add to v[...] of levels it never reads.
    joint_top = callable(getattr(methods[top], "joint", None))
    for upper in (top,) if joint_top else (*below, top):
        if not lowers[upper]:
            continue
        method = methods[upper]
        if callable(getattr(method, "joint", None)):
            if not any(reads_below(lower) for lower in lowers[upper]):
                continue
            result = method.joint(view, upper, partial)
            _check_reads_upper(result.grad, upper, lowers[upper], where)
            _accumulate(v, upper, result.grad)
            edge = f"{upper}->{','.join(lowers[upper])}"
            diagnostics.update({f"{edge}/{k}": x for k, x in result.diagnostics.items()})
            continue
        for lower in lowers[upper]:
            if v[lower] is None:
                continue
            if not callable(method):  # an unrolled edge has no vector-Jacobian product here
                raise HypergradError(_NO_EDGE_RULE.format(
                    top=top, where=where[top], upper=upper, lower=lower, method=method.name))
            result = method(edge_problem(upper, lower), v[lower])
            _check_reads_upper(result.grad, upper, (lower,), where)
            _accumulate(v, upper, result.grad)
            diagnostics.update({f"{upper}->{lower}/{k}": x for k, x in result.diagnostics.items()})

    total = v[top]
    if total is None:
        total = torch.zeros_like(kernels.flat(params[top]))
    norm = torch.linalg.vector_norm(total)
    diagnostics["hypergrad_norm"] = norm
    return kernels.unflat(total, params[top]), diagnostics


def carried_edges(reads: Mapping[str, Sequence[str]], below: Mapping[str, Sequence[str]],
                  lowers: Mapping[str, Sequence[str]]) -> dict[str, frozenset[str]]:
    """For each level, its lowers whose edge a level further up needs: one that reads (has the
    handle of) that lower or a level below it. See :attr:`GraphView.carried`."""
    carried = {}
    for upper, its_lowers in lowers.items():
        above = [a for a, levels in below.items() if upper in levels]
        carried[upper] = frozenset(
            low for low in its_lowers
            if any(r in (low, *below.get(low, ())) for a in above for r in reads[a]))
    return carried


def _check_reads_upper(grad: torch.Tensor | None, upper: str, lowers: Sequence[str],
                       where: Mapping[str, str]) -> None:
    if grad is None:
        lower = lowers[0]
        raise NoDependencyError(_LOWER_IGNORES_UPPER.format(upper=upper, lower=lower,
                                                            where=where[lower]))


def _accumulate(v: dict[str, torch.Tensor | None], name: str, term: torch.Tensor | None) -> None:
    if term is not None:
        v[name] = term if v[name] is None else v[name] + term
