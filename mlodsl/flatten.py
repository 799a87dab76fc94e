"""Flat tuples of tensors for ``torch.func.vmap`` and recomputed steps: task batches and
functional optimizer states.

vmap's pytree handling of nested inputs and outputs (a plain SGD state is one empty dict per
parameter) costs as much as a small model's arithmetic, and a recomputed step's autograd
Function takes tensors only; both get flat tuples and rebuild the structure inside.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mlodsl.errors import HypergradError


def task_leaves(batch: Any, level: str, where: str
                ) -> tuple[list[Any], Callable[[tuple[Any, ...]], Any]]:
    """A task batch's tensors, checked to share one leading task dimension, and the function
    that rebuilds a batch of that structure from them (what vmap hands each task)."""
    if type(batch) in (tuple, list) and all(type(t) is torch.Tensor for t in batch):
        leaves, rebuild = list(batch), type(batch)  # the common case, without pytree's cost
    else:
        leaves, spec = torch.utils._pytree.tree_flatten(batch)
        rebuild = lambda flat: torch.utils._pytree.tree_unflatten(list(flat), spec)  # noqa: E731
    if not leaves or any(not isinstance(t, torch.Tensor) or t.ndim == 0
                         or t.shape[0] != leaves[0].shape[0] for t in leaves):
        raise HypergradError(
            f"level '{level}' ({where}) has tasks=True, so its batch must hold only tensors "
            "with the same leading task dimension; got "
            f"{[tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in leaves]}.")
    return leaves, rebuild


def flatten_state(state: list[dict[str, Any]]) -> tuple[list[list[str]], list[torch.Tensor]]:
    """An optimizer state (one dict per parameter) as its tensors in a fixed order, and the
    layout that :func:`unflatten_state` rebuilds it from."""
    keys = [sorted(k for k, v in entry.items() if isinstance(v, torch.Tensor)) for entry in state]
    return keys, [entry[k] for entry, names in zip(state, keys) for k in names]


def unflatten_state(keys: list[list[str]], tensors: Any) -> list[dict[str, torch.Tensor]]:
    """The inverse of :func:`flatten_state`."""
    it = iter(tensors)
    return [{k: next(it) for k in names} for names in keys]
