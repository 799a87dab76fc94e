"""Trace-time checks of ``grad="unroll"``, ``init_from`` and ``tasks``: what the unrolled
interpreter (:mod:`mlodsl.unrolled`) can honour, each refusal naming the levels and the fix.

Unrolling nests: ``top`` may unroll ``mid`` while ``mid`` unrolls ``low``; ``top`` then
differentiates through ``mid``'s steps, each a gradient taken through ``low``'s steps. A level
that unrolls may also sit below a level with a joint implicit method (``exact``), which
differentiates the levels' optimality conditions and needs no Jacobian from the unrolled edge.
"""

from __future__ import annotations

from collections.abc import Sequence

from mlodsl import errors
from mlodsl.ir import LevelNode

_UNROLLS_IMPLICIT = (
    "level '{upper}' ({where}) unrolls '{lower}' (grad='unroll'), but '{lower}' computes its own "
    "hypergradient through {below} with grad='{method}'; differentiating through an implicit "
    "hypergradient is not supported. Use grad='unroll' on '{lower}' too (nested unrolling), "
    "or an implicit method such as grad='exact' on '{upper}'."
)
_EDGE_OVER_UNROLL = (
    "level '{upper}' ({where}) uses grad='{method}', whose chain rule needs, on every edge "
    "below it, the Jacobian of the lower level's best response; but its loss reads '{low}', "
    "which '{mid}' unrolls, and an unrolled edge gives that Jacobian only as a backward pass "
    "through the steps taken since '{mid}' last stepped. Use grad='unroll' on '{upper}' "
    "(nested unrolling), grad='exact' on '{upper}' (the total derivative), or an implicit "
    "method on '{mid}'."
)
_NESTED_CHECKPOINT = (
    "level '{upper}' ({where}) unrolls '{lower}', which unrolls {below} (nested unrolling), and "
    "'{level}' asks for checkpoint=True. Recomputing a step in the backward pass would read the "
    "fast weights of the level above it as they are then, not as they were at the step, so "
    "nested unrolling keeps every step's graph: use ml.hypergrad.unroll(checkpoint=False) (or "
    "steps=k to bound the memory)."
)
_NESTED_TASKS = (
    "level '{upper}' ({where}) unrolls '{lower}', which unrolls {below} (nested unrolling); "
    "tasks=True on '{tasks}' is supported only for a level whose unrolling upper has nothing "
    "above unrolling it. Unroll the task batch from the top level."
)


def check_unrolling(nodes: Sequence[LevelNode]) -> None:
    """grad='unroll', init_from and tasks=True: what the unrolled interpreter can honour."""
    by_name = {n.name: n for n in nodes}
    unrolled_by: dict[str, str] = {}
    for node in nodes:
        if not _unrolls(node):
            continue
        for lower in node.lowers:
            low = by_name[lower]
            if low.lowers and not _unrolls(low):
                raise errors.InvalidLevelError(_UNROLLS_IMPLICIT.format(
                    upper=node.name, where=node.defined_at, lower=lower,
                    below=_names(low.lowers), method=low.method.name))
            if lower in unrolled_by:
                raise errors.InvalidLevelError(
                    f"level '{lower}' ({low.defined_at}) is unrolled by both "
                    f"'{unrolled_by[lower]}' and '{node.name}'; one upper level may unroll it.")
            unrolled_by[lower] = node.name
            if low.lowers:
                _check_nested(node, low, by_name)
    for node in nodes:
        if node.method is None or _unrolls(node) or callable(getattr(node.method, "joint", None)):
            continue
        for mid in _below(node, by_name):
            if not _unrolls(mid):
                continue
            read = next((low for low in mid.lowers if low in node.reads), None)
            if read is not None:
                raise errors.InvalidLevelError(_EDGE_OVER_UNROLL.format(
                    upper=node.name, where=node.defined_at, method=node.method.name, low=read,
                    mid=mid.name))
    _check_init_from(nodes, by_name)


def _check_nested(top: LevelNode, mid: LevelNode, by_name: dict[str, LevelNode]) -> None:
    """``top`` unrolls ``mid``, which unrolls its own lowers."""
    names = dict(upper=top.name, where=top.defined_at, lower=mid.name,
                 below=_names(mid.lowers))
    for level in (top, mid):
        if level.method.checkpoint:
            raise errors.InvalidLevelError(_NESTED_CHECKPOINT.format(level=level.name, **names))
    for level in (mid, *(by_name[low] for low in mid.lowers)):
        if level.tasks:
            raise errors.InvalidLevelError(_NESTED_TASKS.format(tasks=level.name, **names))


def _check_init_from(nodes: Sequence[LevelNode], by_name: dict[str, LevelNode]) -> None:
    for node in nodes:
        if node.tasks and (node.init_from is None or node.accumulate != 1):
            raise errors.InvalidLevelError(
                f"level '{node.name}' ({node.defined_at}) has tasks=True, which adapts a batch of "
                "tasks in parallel from an upper level's parameters: it needs init_from=<the "
                "upper level> (with grad='unroll' or an implicit method there) and accumulate=1.")
        source = node.init_from
        if source is None:
            continue
        where = f"level '{node.name}' ({node.defined_at}) has init_from='{source}'"
        if source not in by_name:
            raise errors.UnknownLevelError(
                f"{where}, but no level with that name was traced."
                f"{errors.did_you_mean(source, by_name)} Traced levels: "
                f"{errors.listing(by_name)}.")
        if source not in node.uppers:
            raise errors.InvalidLevelError(
                f"{where}, so '{source}' must be directly above it: give '{source}' "
                f"upper_of='{node.name}' (with grad='unroll' for MAML, or an implicit method "
                "such as grad='cg' with a proximal term in the loss for iMAML).")
        if node.tasks and (node.lowers or by_name[source].method.name == "sama"):
            raise errors.InvalidLevelError(f"{where} and tasks=True: it must be a lowest level, "
                                           f"and '{source}' needs grad='unroll' or an implicit "
                                           "method other than 'sama'.")
        shapes = [tuple(p.shape) for p in node.params]
        theirs = [tuple(p.shape) for p in by_name[source].params]
        if shapes != theirs:
            raise errors.InvalidLevelError(
                f"{where}, but their parameters differ: {shapes} vs {theirs}. Build both "
                "modules with the same architecture.")


def _unrolls(node: LevelNode) -> bool:
    return getattr(node.method, "unrolls", False)


def _below(node: LevelNode, by_name: dict[str, LevelNode]) -> list[LevelNode]:
    found: list[LevelNode] = []
    for lower in node.lowers:
        found += [by_name[lower], *_below(by_name[lower], by_name)]
    return found


def _names(names: Sequence[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)
