"""Calling a level's function: arguments by name, precision, loss checks, error context."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mlodsl.errors import LossError
from mlodsl.ir import LevelNode

_NOT_A_LOSS = (
    "level '{name}' ({where}) returned {what}; a level function must return a scalar loss "
    "tensor or a dict with a 'loss' entry (plus metrics to log)."
)
_NOT_SCALAR = (
    "level '{name}' ({where}) returned a loss of shape {shape}; it must be a scalar. Reduce it, "
    "e.g. with .mean() or .sum()."
)
_NO_GRAD = (
    "level '{name}' ({where}) returned a loss that does not require grad, so nothing can be "
    "learned from it. Compute it from the level's parameters (not under torch.no_grad() or "
    "from .detach()ed values)."
)


def add_note(error: BaseException, note: str) -> None:
    """Attach ``note`` to ``error`` once (the innermost level says where it happened)."""
    notes = getattr(error, "__notes__", None) or []
    if any(n.startswith("mlodsl: ") for n in notes):
        return
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # Python 3.10
        error.__notes__ = [*notes, note]  # type: ignore[attr-defined]


def split_loss(node: LevelNode, out: Any, require_grad: bool = True
               ) -> tuple[torch.Tensor, dict[str, Any]]:
    """The loss and a record of metrics (detached) from what a level function returned.

    ``require_grad=False`` inside ``torch.func.vmap``, whose per-task tensors do not report
    ``requires_grad``; the caller checks the combined loss instead.
    """
    if type(out) is torch.Tensor and out.ndim == 0:
        if out.requires_grad:  # the common case
            return out, {"loss": out.detach()}
        if not require_grad:  # one task inside vmap: the caller records the combined loss
            return out, {}
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise LossError(_NOT_A_LOSS.format(
                name=node.name, where=node.defined_at,
                what=f"a dict without a 'loss' entry (keys: {', '.join(map(str, out))})"))
        loss = out["loss"]
        record = {k: v.detach() if isinstance(v, torch.Tensor) else v
                  for k, v in out.items() if k != "loss"}
    else:
        loss, record = out, {}
    if not isinstance(loss, torch.Tensor):
        raise LossError(_NOT_A_LOSS.format(name=node.name, where=node.defined_at,
                                           what=f"a {type(loss).__name__} ({loss!r:.40})"))
    if loss.ndim != 0:
        raise LossError(_NOT_SCALAR.format(name=node.name, where=node.defined_at,
                                           shape=tuple(loss.shape)))
    if require_grad and not loss.requires_grad:
        raise LossError(_NO_GRAD.format(name=node.name, where=node.defined_at))
    record["loss"] = loss.detach()
    return loss, record


def mean_record(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Average the numeric entries of several micro-batch records (others: the last one's)."""
    if len(records) == 1:
        return records[0]
    merged = dict(records[-1])
    for key, value in merged.items():
        if isinstance(value, (torch.Tensor, int, float)) and not isinstance(value, bool):
            values = [r[key] for r in records if key in r]
            merged[key] = sum(values) / len(values)
    return merged
