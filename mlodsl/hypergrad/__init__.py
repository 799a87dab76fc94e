"""Hypergradient methods: one file per method, sharing the kernels in ``kernels``.

Strings given to ``@ml.level(grad=...)`` map to the factories here with their defaults; this
table is the only place that switches on method names.
"""

from __future__ import annotations

from collections.abc import Callable

from mlodsl import errors
from mlodsl.hypergrad.base import EdgeProblem, EdgeResult, GraphView, HypergradMethod, is_method
from mlodsl.hypergrad.cg import cg
from mlodsl.hypergrad.exact import exact
from mlodsl.hypergrad.finite_diff import finite_diff
from mlodsl.hypergrad.neumann import neumann
from mlodsl.hypergrad.sama import sama
from mlodsl.hypergrad.unroll import unroll

DEFAULT = "cg"

_FACTORIES: dict[str, Callable[[], HypergradMethod]] = {
    "cg": cg,
    "neumann": neumann,
    "finite_diff": finite_diff,
    "darts": finite_diff,
    "exact": exact,
    "sama": sama,
    "unroll": unroll,
}


def resolve_method(grad: str | HypergradMethod) -> HypergradMethod:
    """Turn ``grad=`` (a name or a method object) into a method object.

    Raises:
        UnknownGradMethodError: the name is not a known method.
    """
    if isinstance(grad, str):
        if grad in _FACTORIES:
            return _FACTORIES[grad]()
        raise errors.UnknownGradMethodError(
            f"grad={grad!r} is not a hypergradient method.{errors.did_you_mean(grad, _FACTORIES)}"
            f" Known methods: {errors.listing(_FACTORIES)}."
        )
    if is_method(grad):
        return grad
    raise errors.UnknownGradMethodError(
        f"grad must be a method name or an ml.hypergrad method object, got "
        f"{type(grad).__name__}. Known methods: {errors.listing(_FACTORIES)}."
    )


__all__ = [
    "DEFAULT", "EdgeProblem", "EdgeResult", "GraphView", "HypergradMethod", "cg", "exact",
    "finite_diff",
    "neumann", "resolve_method", "sama", "unroll",
]
